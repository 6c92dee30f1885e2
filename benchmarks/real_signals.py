"""Which per-pair signal separates clean from noisy pairs on real photos, and when?

One full-data training run (the real-photo grid's data and model, ``bench_real.GRIDS``); after every epoch the
current model embeds every training pair (eval mode, no gradient), each pair is scored with several candidate
selection keys, and the result holds per epoch the ROC AUC of each key for clean vs noisy pairs and the clean share
of what a per-batch top-k (r = 0.3, random batches of the training batch size) would train on:

* ``cos``: 100 cos(f_i, g_i), the current score (clipscore's key, warmup-clipscore after W);
* ``cos_mean``: the mean of ``cos`` over the epochs so far (a time-averaged warm-up snapshot);
* ``margin``: cos(f_i, g_i) minus the mean cosine of image i with all captions and of caption i with all images;
* ``neg_loss``: minus the symmetric InfoNCE loss of the pair inside a random batch (small_loss's key);
* ``neg_rank``: minus the rank of caption i among all captions for image i, averaged with the reverse direction.

    python -m benchmarks.real_signals --data ../shared/data/flickr8k-dev          # ~3 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.bench_real import GRIDS, auc

RATE = 0.3
SIGNALS = ("cos", "cos_mean", "margin", "neg_loss", "neg_rank")


def embed_pairs(ctx, shards, index) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Unit image and text features of every training pair in id order, with the current weights (eval mode)."""
    import open_clip

    from dissect_fast.data.loader import eval_loader

    model = ctx.model
    pre = open_clip.image_transform(model.visual.image_size, is_train=False)
    loader = eval_loader(shards, index, 500, pre, ctx.run.context_length, 0, ctx.device, need_ids=True)
    fs, gs, ids, was_training = [], [], [], model.training
    model.eval()
    with torch.no_grad():
        for images, tokens, i in loader:
            out = model(images, tokens)
            fs.append(F.normalize(out["image_features"].float(), dim=-1))
            gs.append(F.normalize(out["text_features"].float(), dim=-1))
            ids.append(i.cpu().numpy())
    model.train(was_training)
    order = np.argsort(np.concatenate(ids))
    return torch.cat(fs)[order], torch.cat(gs)[order], np.concatenate(ids)[order]


def signals(f: torch.Tensor, g: torch.Tensor, logit_scale: float, batch: int, rng: np.random.Generator) -> dict:
    sim = f @ g.t()  # [N, N] cosines (N = a few thousand)
    diag = sim.diagonal()
    out = {"cos": (100 * diag).numpy(), "margin": (diag - 0.5 * (sim.mean(1) + sim.mean(0))).numpy()}
    out["neg_rank"] = -0.5 * ((sim > diag[:, None]).sum(1) + (sim > diag[None, :]).sum(0)).float().numpy()
    loss, perm = np.empty(sim.shape[0], dtype=np.float32), rng.permutation(sim.shape[0])
    for s in range(0, sim.shape[0], batch):
        b = torch.from_numpy(perm[s : s + batch])
        logits, lab = logit_scale * sim[b][:, b], torch.arange(len(b))
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
            hits += int(clean[b[np.argsort(-key[b], kind="stable")[:k]]].sum())
            total += k
    return hits / max(1, total)


def main(argv: list[str] | None = None) -> int:
    from dissect_fast.data.shards import resolve_data
    from dissect_fast.training.callbacks import Callback

    p = argparse.ArgumentParser(prog="python -m benchmarks.real_signals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data", required=True, help="folder with captions.csv and images/ (e.g. flickr8k-dev)")
    p.add_argument("--grid", default="cpu", choices=sorted(GRIDS), help="data, model and schedule of this grid")
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--work", default="runs/bench_real")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/real-signals-<data>-<grid>.json)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    g, name = GRIDS[a.grid], os.path.basename(os.path.normpath(a.data))
    batch = int(g["batch_size"])  # type: ignore[call-overload]
    out = a.out or str(harness.RESULTS / f"real-signals-{name}-{a.grid}.json")
    train, val = harness.csv_folder_data(a.data, a.work, g, a.noise)
    shards, index = resolve_data(train, "--train-data")
    clean = np.load(os.path.join(train, "clean.npy")).astype(bool)
    r = dict(model=g["model"], epochs=g["epochs"], seed=0, strategy="full", rate=1.0, warmup_point=1,
             warmup_train="random")  # fmt: skip
    argv_t = harness.train_argv(r, dict(g, val_every=1), train, val, os.path.join(a.work, "runs"), "signals", "cpu")
    rng, per_epoch, history = np.random.default_rng(0), [], []

    class Probe(Callback):
        def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None:
            f, gg, ids = embed_pairs(ctx, shards, index)
            c = clean[ids]
            sig = signals(f, gg, ctx.model.logit_scale.exp().item(), batch, rng)
            history.append(sig["cos"])
            sig["cos_mean"] = np.mean(history, axis=0)
            row = {
                "epoch": epoch + 1,
                "R@5": 0.5 * (metrics["val/image_to_text_R@5"] + metrics["val/text_to_image_R@5"]),
            }
            for s in SIGNALS:
                row[f"auc_{s}"] = round(auc(sig[s].astype(float), c) or float("nan"), 4)
                row[f"topk_clean_{s}"] = round(topk_clean_share(sig[s], c, batch, rng), 4)
            per_epoch.append(row)
            print(row, flush=True)

    wall = harness.train_run(argv_t, callbacks=[Probe()])[2]
    doc = {
        **harness.header("real-signals", "real_signals", "cpu", argv),
        **{"data_name": name, "grid": a.grid, "settings": dict(g, noise=a.noise, rate=RATE)},
        **{"base_clean_fraction": round(float(clean.mean()), 4), "wall_s": round(wall, 1)},
        "signals": {s: __doc__.split(f"``{s}``: ")[1].split("\n*")[0].strip() for s in SIGNALS},
        "per_epoch": per_epoch,
    }
    harness.write_json(out, doc)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, what, base) in zip(axes, (("auc", "ROC AUC, clean vs noisy pairs", 0.5),
                                            ("topk_clean", f"clean share of the per-batch top {RATE:.0%}", doc["base_clean_fraction"]))):  # fmt: skip
        for s in SIGNALS:
            ax.plot([x["epoch"] for x in per_epoch], [x[f"{key}_{s}"] for x in per_epoch], marker="o", ms=3, label=s)
        ax.axhline(base, color="gray", lw=0.8)
        ax.set(xlabel="epoch of full-data training", ylabel=what)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}, {a.noise:.0%} noisy captions: candidate selection keys", fontsize=9)
    harness._save(fig, out.replace(".json", ".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
