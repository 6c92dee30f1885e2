"""Quality of offline subsets (clipcov, clipscore, random) vs online DISSect, on noisy synthetic data.

    python benchmarks/bench_subset_quality.py                 # defaults: ~15 min on 2 idle CPU cores (OMP_NUM_THREADS=1)
    python benchmarks/bench_subset_quality.py --num-train 600 --epochs 2 --ref-epochs 1   # smoke run

Protocol (one seed, one synthetic set with ``--noise`` of the captions swapped):

1. ``reference``: a short full-data warm-up run (``--ref-epochs``); its checkpoint is the
   reference model of the offline methods.
2. ``dissect-fast embed`` of every training pair with that checkpoint.
3. ``dissect-fast select-subset`` keeps ``--fraction`` of the pairs by clipcov (k-means proxy
   classes on the text embeddings, ``--clusters``), clipscore and random.
4. Each subset trains a fresh model for ``--epochs`` epochs (``--subset``); for reference, the
   same model trains ``--epochs`` epochs on full data and with online ``dissect-warmup`` at
   r = ``--fraction`` (``--ref-epochs`` warm-up epochs on full batches, then selection).

Every run uses the same model, batch size, learning rate and seed. Reported per run: R@1 in both
directions on the clean validation split after the last epoch, the training wall-clock, and for the
offline methods also the cost of the reference run, embedding and selection; the clean share of
each chosen subset (the synthetic set's ground-truth flags, ``DatasetIndex.clean_flags()``).
The JSON is rewritten after every run (a partial run still leaves its finished rows), with the
machine load: on a shared machine the wall-clock numbers are only as quiet as that load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import benchkit  # benchmarks/ is not a package
from bench_subset import provenance


def train(a, data: Path, logs: Path, name: str, epochs: int, select: dict, subset: Path | None = None) -> dict:
    """One training run in this process (``select``: its SelectConfig fields); its last metrics row and wall-clock."""
    from dissect_fast.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SelectConfig, TrainConfig
    from dissect_fast.training.loop import Trainer

    cfg = TrainConfig(
        data=DataConfig(
            train_data=str(data / "train"),
            val_data=str(data / "val"),
            batch_size=a.batch_size,
            workers=a.workers,
            data_backend="torch",
            subset=None if subset is None else str(subset),
        ),
        model=ModelConfig(model=a.model, device="cpu"),
        optim=OptimConfig(epochs=epochs, lr=a.lr, warmup=a.warmup, wd=0.1),
        select=SelectConfig(**select),
        run=RunConfig(
            logs=str(logs), name=name, seed=a.seed, progress=False, tensorboard=False, plots=False, val_every=epochs
        ),
    )
    shutil.rmtree(logs / name, ignore_errors=True)  # a re-run starts afresh (the trainer refuses an existing run)
    trainer = Trainer(cfg)
    logging.getLogger("dissect_fast").setLevel(logging.WARNING)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    metrics = trainer.fit()
    wall = time.perf_counter() - t
    last = metrics[-1]
    clean = [m["select/clean_fraction"] for m in metrics if "select/clean_fraction" in m]
    return {
        "epochs": epochs,
        "steps_per_epoch": trainer.steps_per_epoch,
        "train_samples": trainer.num_samples,
        "i2t_R@1": last["val/image_to_text_R@1"],
        "t2i_R@1": last["val/text_to_image_R@1"],
        "i2t_R@5": last.get("val/image_to_text_R@5"),
        "t2i_R@5": last.get("val/text_to_image_R@5"),
        "clean_share_trained_last_epoch": clean[-1] if clean else None,
        "train_wall_s": round(wall, 1),
        "load_avg_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "checkpoint": str(logs / name / "checkpoints" / "latest.pt"),
    }


def table(res: dict) -> str:
    """Markdown table of the finished runs (pairs trained per epoch: after dissect-warmup's warm-up)."""
    s = res["settings"]
    k = int(s["fraction"] * s["batch_size"])
    rows = [
        (
            "| run | pairs trained / epoch | i->t R@1 | t->i R@1 | clean share | train wall (s) "
            "| + reference/embed/select (s) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["runs"].items():
        clean = r.get("subset_clean_share", r.get("clean_share_trained_last_epoch"))
        over = r.get("offline_overhead_s")
        per_epoch = r["steps_per_epoch"] * (k if name.startswith("dissect") else s["batch_size"])
        rows.append(
            f"| {name} | {per_epoch:,} | {r['i2t_R@1']:.1f} | {r['t2i_R@1']:.1f} "
            f"| {'-' if clean is None else f'{clean:.3f}'} | {r['train_wall_s']:.0f} "
            f"| {'-' if over is None else f'{over:.0f}'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench_subset_quality", help="data, runs, embeddings, subsets")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=10, help="epochs of every compared run")
    p.add_argument("--ref-epochs", type=int, default=4, help="reference run = dissect-warmup's warm-up point")
    p.add_argument("--clusters", type=int, default=8, help="clipcov proxy classes (k-means on text embeddings)")
    p.add_argument("--model", default="micro-vit")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=10, help="LR warm-up steps")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated runs (random,clipscore,clipcov,dissect-warmup,full)")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/subset-quality-cpu-<date>.json)")
    a = p.parse_args(argv)

    import torch

    from dissect_fast.data.shards import INDEX_NAME, DatasetIndex
    from dissect_fast.offline.embed import main_embed
    from dissect_fast.offline.subset import main_select_subset
    from dissect_fast.tools.synthetic import make_synthetic

    work = Path(a.work)
    data, logs = work / "data", work / "runs"
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"subset-quality-cpu-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in vars(a) if k not in ("out", "only")}
    res: dict = dict(
        provenance("cpu", argv, "subset_quality", "bench_subset_quality.py"), settings=settings, runs={}, offline={}
    )
    res["load_avg_at_start"] = os.getloadavg()

    def save() -> None:
        res["load_average_at_end"] = os.getloadavg()
        res["table_md"] = table(res)
        benchkit.write_json(out, res)

    t = time.perf_counter()
    if not (data / "train" / INDEX_NAME).is_file():
        make_synthetic(str(data), a.num_train, a.num_val, a.noise, 32, a.seed, samples_per_shard=500, progress=False)
    res["offline"]["synth_s"] = round(time.perf_counter() - t, 1)
    clean = DatasetIndex.load(str(data / "train")).clean_flags()
    assert clean is not None, "the synthetic set writes clean flags"
    res["clean_share_all"] = float(clean.mean())

    # 1. reference model: a short full-data run
    ref = train(a, data, logs, "reference", a.ref_epochs, {"strategy": "full"})
    res["offline"]["reference"] = ref
    save()
    print(f"reference ({a.ref_epochs} epochs): i->t R@1 {ref['i2t_R@1']:.1f}, {ref['train_wall_s']:.0f}s", flush=True)

    # 2. embeddings with `dissect-fast embed`
    emb_dir = work / "embeddings"
    t = time.perf_counter()
    main_embed(["--checkpoint", ref["checkpoint"], "--data", str(data / "train"), "--out", str(emb_dir),
                "--device", "cpu", "--batch-size", "250", "--workers", "0"])  # fmt: skip
    res["offline"]["embed_s"] = round(time.perf_counter() - t, 1)

    # 3.-4. subsets, then training on each
    wanted = set(a.only.split(",")) if a.only else None
    for method in ("clipcov", "clipscore", "random"):
        if wanted and method not in wanted:
            continue
        sub = work / "subsets" / f"{method}.npy"
        t = time.perf_counter()
        extra = ["--clusters", str(a.clusters)]  # same proxy classes for every method's per-class report
        main_select_subset(["--embeddings", str(emb_dir), "--method", method, "--fraction", str(a.fraction),
                            "--device", "cpu", "--seed", str(a.seed), "--out", str(sub), *extra])  # fmt: skip
        select_s = time.perf_counter() - t
        ids = np.load(sub)
        info = json.loads(sub.with_suffix(".json").read_text())
        r = train(a, data, logs, f"subset-{method}", a.epochs, {"strategy": "full"}, subset=sub)
        r.update(
            subset_size=len(ids),
            subset_clean_share=float(clean[ids].mean()),
            mean_clipscore_subset=info["mean_clipscore_subset"],
            mean_clipscore_all=info["mean_clipscore_all"],
            select_s=round(select_s, 2),
            offline_overhead_s=round(ref["train_wall_s"] + res["offline"]["embed_s"] + select_s, 1),
        )
        res["runs"][f"{method} {a.fraction:.0%} subset"] = r
        save()
        print(f"{method}: clean share {r['subset_clean_share']:.3f}, i->t R@1 {r['i2t_R@1']:.1f}", flush=True)

    online = [
        (
            "dissect-warmup",
            {"strategy": "dissect-warmup", "rate": a.fraction, "warmup_point": a.ref_epochs, "warmup_train": "full"},
        ),
        ("full", {"strategy": "full"}),
    ]
    for name, select in online:
        if wanted and name not in wanted:
            continue
        r = train(a, data, logs, name, a.epochs, select)
        label = f"{name} (online, r={a.fraction})" if name != "full" else "full data"
        res["runs"][label] = r
        save()
        print(f"{name}: i->t R@1 {r['i2t_R@1']:.1f}, {r['train_wall_s']:.0f}s", flush=True)
    res["torch_threads"] = torch.get_num_threads()
    save()
    print(res["table_md"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
