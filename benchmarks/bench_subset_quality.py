"""Quality of offline subsets (clipcov, clipscore, random) vs online DISSect, on noisy synthetic data.

    python -m benchmarks.bench_subset_quality          # defaults: ~15 min on 2 idle CPU cores (OMP_NUM_THREADS=1)
    python -m benchmarks.bench_subset_quality --num-train 600 --epochs 2 --ref-epochs 1   # smoke run

Protocol (one seed, one synthetic set with ``--noise`` of the captions swapped): 1. ``reference``: a short
full-data run (``--ref-epochs``), the offline methods' reference model; 2. ``dissect-fast embed`` of every training
pair with it; 3. ``dissect-fast select-subset`` keeps ``--fraction`` of the pairs by clipcov (k-means proxy classes
on the text embeddings, ``--clusters``), clipscore and random; 4. each subset trains a fresh model for ``--epochs``
(``--subset``); for comparison the same model trains on full data and with online ``dissect-warmup`` at r =
``--fraction`` (``--ref-epochs`` warm-up epochs on full batches). Same model, batch, lr and seed everywhere. Per
run: R@1 both ways on the clean validation split, the training wall-clock, the trainer's accounting, and for the
offline methods the cost of reference, embedding and selection and the clean share of the subset.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import harness


def table(res: dict) -> str:
    """Markdown table of the finished runs (pairs trained in the last epoch, from the trainer's accounting)."""
    rows = ["| run | pairs trained / epoch | i->t R@1 | t->i R@1 | clean share | train wall (s) "
            "| + reference/embed/select (s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in res["runs"].items():
        clean, over = (
            r["subset_clean_share"] if "subset_clean_share" in r else r["clean_fraction_per_epoch"][-1],
            r.get("offline_overhead_s"),
        )
        rows.append(f"| {name} | {np.diff([0, *r['samples_backpropagated_cum']])[-1]:,} "
                    f"| {r['i2t_R@1']:.1f} | {r['t2i_R@1']:.1f} | {clean:.3f} | {r['wall_s']:.0f} "
                    f"| {'-' if over is None else f'{over:.0f}'} |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_subset_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated runs (random,clipscore,clipcov,dissect-warmup,full)")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/subset-quality-cpu-<date>.json)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dissect_fast.offline.embed import main_embed
    from dissect_fast.offline.subset import main_select_subset

    work, wanted = Path(a.work), set(a.only.split(",")) if a.only else None
    out = harness.result_path("subset-quality", "cpu", a.out)
    g = {"batch_size": a.batch_size, "lr": a.lr, "lr_warmup": a.warmup}
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "only")}
    res: dict = {**harness.header("subset_quality", "bench_subset_quality", "cpu", argv), "settings": settings}
    res.update(runs={}, offline={})

    def train(name: str, epochs: int, strategy: str = "full", *extra: str, label: str = "", **info) -> dict:
        r = {"model": a.model, "epochs": epochs, "seed": a.seed, "strategy": strategy, "rate": a.fraction,
             "warmup_point": a.ref_epochs, "warmup_train": "full"}  # fmt: skip
        argv_t = harness.train_argv(r, g, train_dir, val_dir, str(work / "runs"), name, "cpu", *extra)
        load = harness.machine_load()
        row = harness.selection_row(info, *harness.train_run(argv_t, keep=name == "reference"), load)
        res["runs" if name != "reference" else "offline"][label or name] = row
        res["table_md"] = table(res)
        harness.write_json(out, res)
        print(f"{name}: i->t R@1 {row['i2t_R@1']:.1f}, {row['wall_s']:.0f}s", flush=True)
        return row

    t = time.perf_counter()
    train_dir, val_dir = harness.synthetic_data(str(work / "data"), a.noise, a.num_train, a.num_val)
    res["offline"]["synth_s"] = round(time.perf_counter() - t, 1)
    from dissect_fast.data.shards import DatasetIndex

    clean = DatasetIndex.load(train_dir).clean_flags()
    assert clean is not None, "the synthetic set writes clean flags"
    res["clean_share_all"] = float(clean.mean())
    ref = train("reference", a.ref_epochs)  # 1. the reference model, then 2. its embeddings
    t, emb_dir = time.perf_counter(), work / "embeddings"
    ckpt = work / "runs" / "reference" / "checkpoints" / f"epoch_{a.ref_epochs}.pt"
    main_embed(["--checkpoint", str(ckpt), "--data", train_dir, "--out", str(emb_dir), "--device", "cpu",
                "--batch-size", "250", "--workers", "0"])  # fmt: skip
    res["offline"]["embed_s"] = round(time.perf_counter() - t, 1)
    for method in (m for m in ("clipcov", "clipscore", "random") if not wanted or m in wanted):  # 3.-4.
        sub, t = work / "subsets" / f"{method}.npy", time.perf_counter()
        main_select_subset(["--embeddings", str(emb_dir), "--method", method, "--fraction", str(a.fraction), "--device",
                            "cpu", "--seed", str(a.seed), "--out", str(sub), "--clusters", str(a.clusters)])  # fmt: skip
        select_s, ids, info = time.perf_counter() - t, np.load(sub), json.loads(sub.with_suffix(".json").read_text())
        info = {"subset_size": len(ids), "subset_clean_share": float(clean[ids].mean()),
                "mean_clipscore_subset": info["mean_clipscore_subset"], "mean_clipscore_all": info["mean_clipscore_all"],
                "select_s": round(select_s, 2),
                "offline_overhead_s": round(ref["wall_s"] + res["offline"]["embed_s"] + select_s, 1)}  # fmt: skip
        train(
            f"subset-{method}",
            a.epochs,
            "full",
            "--subset",
            str(sub),
            label=f"{method} {a.fraction:.0%} subset",
            **info,
        )
    for name in (n for n in ("dissect-warmup", "full") if not wanted or n in wanted):
        train(name, a.epochs, name, label=f"{name} (online, r={a.fraction})" if name != "full" else "full data")
    res["table_md"] = table(res)
    print(res["table_md"], f"\nwrote {harness.write_json(out, res)}")


if __name__ == "__main__":
    main()
