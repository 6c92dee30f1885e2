"""Which per-pair signal separates clean from noisy pairs on real photos, and when?

One full-data training run (the real-photo grid's data and model, ``bench_real.GRIDS``); after every epoch the
current model embeds every training pair (eval mode, no gradient) and the benchmark scores each pair with several
candidate selection keys, then reports per epoch the ROC AUC of each key for clean vs noisy pairs and the clean share
of what a per-batch top-k (r = 0.3, random batches of the training batch size) would train on:

* ``cos``: 100 cos(f_i, g_i), the current score (clipscore's key, warmup-clipscore after W);
* ``cos_mean``: the mean of ``cos`` over the epochs so far (a time-averaged warm-up snapshot);
* ``margin``: cos(f_i, g_i) minus the mean cosine of image i with all captions and of caption i with all images
  (the pair's agreement beyond what its image and its caption score with anything);
* ``neg_loss``: minus the symmetric InfoNCE loss of the pair inside a random batch (small_loss's key);
* ``neg_rank``: minus the rank of caption i among all captions for image i, averaged with the reverse direction.

    python benchmarks/real_signals.py --data ../shared/data/flickr8k-dev          # ~3 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # benchmarks/ is not a package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchkit  # noqa: E402
from bench_real import GRIDS, auc, ensure_data  # noqa: E402

from dissect_fast.config import config_from_args  # noqa: E402
from dissect_fast.data.loader import eval_loader  # noqa: E402
from dissect_fast.data.shards import resolve_data  # noqa: E402
from dissect_fast.training.callbacks import Callback  # noqa: E402
from dissect_fast.training.loop import Trainer  # noqa: E402

RATE = 0.3
SIGNALS = ("cos", "cos_mean", "margin", "neg_loss", "neg_rank")


def embed_pairs(t: Trainer, shards, index) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Unit image and text features of every training pair in id order, with the current weights (eval mode)."""
    pre = open_clip.image_transform(t.model.visual.image_size, is_train=False)  # the eval transform
    loader = eval_loader(shards, index, 500, pre, t.context_length, 0, t.device, need_ids=True)
    fs, gs, ids = [], [], []
    was_training = t.model.training
    t.model.eval()
    with torch.no_grad():
        for images, tokens, i in loader:
            out = t.model(images, tokens)
            fs.append(F.normalize(out["image_features"].float(), dim=-1))
            gs.append(F.normalize(out["text_features"].float(), dim=-1))
            ids.append(i.cpu().numpy())
    t.model.train(was_training)
    order = np.argsort(np.concatenate(ids))
    return torch.cat(fs)[order], torch.cat(gs)[order], np.concatenate(ids)[order]


def signals(f: torch.Tensor, g: torch.Tensor, logit_scale: float, batch: int, rng: np.random.Generator) -> dict:
    sim = f @ g.t()  # [N, N] cosines (N = a few thousand)
    n = sim.shape[0]
    diag = sim.diagonal()
    out = {"cos": (100 * diag).numpy()}
    out["margin"] = (diag - 0.5 * (sim.mean(1) + sim.mean(0))).numpy()
    out["neg_rank"] = -0.5 * ((sim > diag[:, None]).sum(1) + (sim > diag[None, :]).sum(0)).float().numpy()
    loss = np.empty(n, dtype=np.float32)
    perm = rng.permutation(n)
    for s in range(0, n, batch):
        b = torch.from_numpy(perm[s : s + batch])
        logits = logit_scale * sim[b][:, b]
        lab = torch.arange(len(b))
        li = F.cross_entropy(logits, lab, reduction="none") + F.cross_entropy(logits.t(), lab, reduction="none")
        loss[b.numpy()] = (0.5 * li).numpy()
    out["neg_loss"] = -loss
    return out


def topk_clean_share(key: np.ndarray, clean: np.ndarray, batch: int, rng: np.random.Generator, reps: int = 5) -> float:
    """Clean share of the per-batch top-k (k = RATE * batch) over random batches, ``reps`` shuffles averaged."""
    k, hits, total = int(RATE * batch), 0, 0
    for _ in range(reps):
        perm = rng.permutation(len(key))
        for s in range(0, len(key) - batch + 1, batch):
            b = perm[s : s + batch]
            top = b[np.argsort(-key[b], kind="stable")[:k]]
            hits += int(clean[top].sum())
            total += k
    return hits / max(1, total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with captions.csv and images/ (e.g. flickr8k-dev)")
    p.add_argument("--grid", default="cpu", choices=sorted(GRIDS), help="data, model and schedule of this grid")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--work", default="runs/bench_real")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/real-signals-<data>-cpu.json)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    g = GRIDS[a.grid]
    name = os.path.basename(os.path.normpath(a.data))
    out = a.out or str(benchkit.RESULTS / f"real-signals-{name}-{a.grid}.json")
    train, val = ensure_data(a.data, a.work, g, a.noise)
    shards, index = resolve_data(train, "--train-data")
    clean = np.load(os.path.join(train, "clean.npy")).astype(bool)
    argv_t = [
        *("--train-data", train, "--val-data", val, "--model", g["model"], "--batch-size", str(g["batch_size"])),
        *("--epochs", str(g["epochs"]), "--lr", str(g["lr"]), "--warmup", str(g["lr_warmup"]), "--wd", "0.1"),
        *("--workers", "1", "--data-backend", "torch", "--logs-dir", os.path.join(a.work, "runs")),
        *("--name", "signals", "--device", "cpu", "--no-progress", "--no-plots", "--no-tensorboard"),
        *("--val-every", "1", "--save-frequency", "0", "--seed", "0"),
    ]
    run_dir = os.path.join(a.work, "runs", "signals")
    if os.path.isdir(run_dir):  # an earlier attempt: start clean
        shutil.rmtree(run_dir)
    t = Trainer(config_from_args(argv_t))
    rng = np.random.default_rng(0)
    per_epoch: list[dict] = []
    history: list[np.ndarray] = []

    class Probe(Callback):
        def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
            f, gg, ids = embed_pairs(t, shards, index)
            c = clean[ids]
            sig = signals(f, gg, float(t.model.logit_scale.exp()), g["batch_size"], rng)
            history.append(sig["cos"])
            sig["cos_mean"] = np.mean(history, axis=0)
            row = {
                "epoch": epoch + 1,
                "R@5": 0.5 * (metrics["val/image_to_text_R@5"] + metrics["val/text_to_image_R@5"]),
            }
            for s in SIGNALS:
                row[f"auc_{s}"] = round(auc(sig[s].astype(float), c) or float("nan"), 4)
                row[f"topk_clean_{s}"] = round(topk_clean_share(sig[s], c, g["batch_size"], rng), 4)
            per_epoch.append(row)
            print(row, flush=True)

    t.callbacks.append(Probe())
    t0 = time.time()
    t.fit()
    doc = {
        **benchkit.header("real-signals", "real_signals.py", "cpu", argv),
        "data_name": name,
        "grid": a.grid,
        "settings": dict(g, noise=a.noise, rate=RATE),
        "base_clean_fraction": round(float(clean.mean()), 4),
        "wall_s": round(time.time() - t0, 1),
        "signals": {s: __doc__.split(f"``{s}``: ")[1].split("\n*")[0].strip() for s in SIGNALS},
        "per_epoch": per_epoch,
    }
    benchkit.write_json(out, doc)
    plot(doc, out.replace(".json", ".png"))
    print(f"wrote {out}")
    return 0


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in doc["per_epoch"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for s in SIGNALS:
        axes[0].plot(ep, [r[f"auc_{s}"] for r in doc["per_epoch"]], marker="o", ms=3, label=s)
        axes[1].plot(ep, [r[f"topk_clean_{s}"] for r in doc["per_epoch"]], marker="o", ms=3, label=s)
    axes[0].axhline(0.5, color="gray", lw=0.8)
    axes[1].axhline(doc["base_clean_fraction"], color="gray", lw=0.8, label="base rate")
    axes[0].set_ylabel("ROC AUC, clean vs noisy pairs")
    axes[1].set_ylabel(f"clean share of the per-batch top {RATE:.0%}")
    for ax in axes:
        ax.set_xlabel("epoch of full-data training (signal from the model after it)")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{doc['data_name']}, {doc['settings']['noise']:.0%} noisy captions: candidate selection keys", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
