"""Selection on real photos: which pairs does each rule train on, and what recall does it buy per wall-clock?

Data: a folder in the CC3M/CyCLIP CSV layout (``captions.csv`` + ``images/``, e.g. ``../shared/data/flickr8k-dev``)
through ``harness.csv_folder_data`` (the last images by name held out; ``noise`` of the training captions moved).
Every run trains the same model, epochs, schedule and seed (``harness.grid_main``) and stores per epoch what
``harness.selection_row`` stores, held-out recall every epoch, and the score's ROC AUC for clean vs noisy pairs.

    python -m benchmarks.bench_real --data ../shared/data/flickr8k-dev          # the CPU grid
    python -m benchmarks.bench_real --data DIR --grid quick --out /tmp/r         # tiny (tests)
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks import harness
from dissect_fast.selection.names import WARMUP_STRATEGIES

RATE, NOISE_MAIN = 0.3, 0.4
#: ``cpu``: 2,000 photos x 2 captions, a 32 px ResNet tower from scratch, 16 epochs, 1,000 held-out photos
GRIDS = {
    "quick": dict(train_images=60, captions_per_image=2, val_images=20, image_px=32, model="micro-rn", batch_size=20,
                  epochs=3, warmup_point=1, lr=3e-3, lr_warmup=5, noises=[0.4, 0.0], seeds=[0],
                  strategies=["full", "warmup-snapshot"], more_seeds=[], sweep_points=[], sweep_strategies=[],
                  warmup_train="full", val_every=1),
    "cpu": dict(train_images=2000, captions_per_image=2, val_images=1000, image_px=32, model="micro-rn",
                batch_size=100, epochs=16, warmup_point=4, lr=3e-3, lr_warmup=50, noises=[0.4, 0.0, 0.2], seeds=[0],
                strategies=["full", "warmup-snapshot", "warmup-clipscore", "dissect-warmup", "clipscore", "random"],
                more_seeds=[1, 2], sweep_points=[1, 2, 8],
                sweep_strategies=["warmup-snapshot", "warmup-clipscore", "dissect-warmup"], warmup_train="full",
                val_every=1),
}  # fmt: skip


def plan_runs(g: dict) -> list[dict]:
    """In priority order: 40% noise (all strategies), the warm-up point sweep, the other warm-up mode, more seeds,
    then the other noise levels."""
    runs: list[dict] = []

    def add(noise, strategy, seed, sweep="main", **over):
        r = dict(noise=noise, strategy=strategy, seed=seed, rate=1.0 if strategy == "full" else RATE, sweep=sweep,
                 epochs=g["epochs"], warmup_point=g["warmup_point"],
                 warmup_train=g["warmup_train"] if strategy in WARMUP_STRATEGIES else "random", model=g["model"])  # fmt: skip
        r.update(over)
        if r not in runs:
            runs.append(r)

    s0 = g["seeds"][0]
    for s in g["strategies"]:
        add(NOISE_MAIN, s, s0)
    for wp in g["sweep_points"]:
        for s in g["sweep_strategies"]:
            add(NOISE_MAIN, s, s0, sweep="warmup_point", warmup_point=wp)
    for s in g["sweep_strategies"]:
        add(NOISE_MAIN, s, s0, sweep="warmup_train", warmup_train="random" if g["warmup_train"] == "full" else "full")
    for seed in g["more_seeds"]:
        for s in g["strategies"]:
            add(NOISE_MAIN, s, seed)
    for noise in (n for n in g["noises"] if n != NOISE_MAIN):
        for s in g["strategies"]:
            add(noise, s, s0)
    return runs


def auc(score: np.ndarray, clean: np.ndarray) -> float | None:
    """ROC AUC of ``score`` for clean vs noisy pairs (ties count half, NaN left out); None when a class is empty."""
    ok = ~np.isnan(score)
    s, c = score[ok], clean[ok]
    n_pos, n_neg = int(c.sum()), int((~c).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="stable")  # 1-based ranks, a tie group given its average rank
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return float((ranks[c].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def r5(row: dict, i: int = -1) -> float:
    """Mean of both directions' R@5 at epoch index i."""
    return 0.5 * (row["i2t_R@5_per_epoch"][i] + row["t2i_R@5_per_epoch"][i])


def main(argv: list[str] | None = None) -> int:
    p = harness.grid_parser("python -m benchmarks.bench_real", __doc__, GRIDS, "cpu")
    p.add_argument("--data", default=None, help="folder with captions.csv and images/ (e.g. flickr8k-dev)")
    p.add_argument("--data-name", default=None, help="how results name the data (default: the folder's name)")
    a = p.parse_args(argv)
    if not a.data:
        p.error("--data is required (a folder with captions.csv and images/, e.g. ../shared/data/flickr8k-dev)")
    g, work = GRIDS[a.grid], a.work or "runs/bench_real"
    name = a.data_name or os.path.basename(os.path.normpath(a.data or "data"))
    fields = {
        **harness.header("real", "bench_real", a.device, argv),
        "data_name": name,
        "settings": dict(g, rate=RATE, device=a.device),
        "note": "train wall-clock excludes evaluation; it is comparable only between runs at a similar load "
        "(load_start/load_end per run); compute_units (forward = 1, backward = 2 per sample) is the load-free cost",
    }

    def run_one(r: dict) -> dict:
        train, val = harness.csv_folder_data(a.data, work, g, r["noise"])
        run = f"{r['sweep']}-noise{round(100 * r['noise'])}-{r['strategy']}-W{r['warmup_point']}-s{r['seed']}"
        load = harness.machine_load()
        metrics, arrays, wall = harness.train_run(harness.train_argv(r, g, train, val, work, run, a.device))
        row = harness.selection_row(r, metrics, arrays, wall, load)
        row["score_auc_per_epoch"] = [None if (v := auc(s, arrays["clean"])) is None else round(v, 4)
                                      for s in arrays["score"]]  # fmt: skip
        return {**row, "train_wall_s": row["train_wall_s_cum"][-1]}

    def describe(r: dict, row: dict) -> str:
        return (
            f"{r['sweep']} noise {r['noise']:.0%} {r['strategy']} W={r['warmup_point']} seed {r['seed']}: clean share "
            f"(>= W) {row['clean_fraction_after_warmup']:.3f} (base {row['base_clean_fraction']:.2f}), "
            f"R@5 {r5(row):.2f}, train {row['train_wall_s']:.0f} s"
        )

    tag = a.tag or f"{name}-{a.device}-{a.grid}"
    return harness.grid_main(p, a, "real", tag, fields, plan_runs(g), run_one, describe)


if __name__ == "__main__":
    raise SystemExit(main())
