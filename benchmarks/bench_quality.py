"""Selection quality: which pairs does each strategy train on, and what does the model learn from them? Every
strategy trains the same model, epochs, schedule and seed on pairs with known noisy correspondence: synthetic
pairs (default) or, with ``--data DIR``, a folder of photos in the CSV layout (captions.csv + images/).

    python -m benchmarks.bench_quality --grid reduced             # CPU grid, about an hour on 2 cores
    python -m benchmarks.bench_quality --grid quick --out /tmp/q  # 1 seed, 2 strategies, tiny data (tests)
    python -m benchmarks.bench_quality --data ../shared/data/flickr8k-dev --grid cpu  # real photos
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks import harness
from dissect_fast.selection.names import WARMUP_STRATEGIES

RATE = 0.3
MAIN = ["full", "dissect-warmup", "dissect-gain", "warmup-clipscore", "random", "clipscore", "dissect-momentum"]
_BASE = dict(num_val=500, batch_size=100, epochs=30, warmup_point=10, model="micro-rn", lr=3e-3, lr_warmup=50,
             warmup_train="full", noises=[0.5], seeds=[0, 1, 2], sweeps=[])  # fmt: skip
#: synthetic grids. ``reduced``: the demo's regime (2,000 pairs, 30 epochs), about an hour on a 2-core CPU;
#: ``reduced-w20``: its 50% noise runs of the snapshot rules at W = 20. The first noise level goes first.
GRIDS = {
    "quick": dict(_BASE, num_train=200, num_val=50, batch_size=40, epochs=2, warmup_point=1, lr_warmup=5,
                  warmup_train="random", seeds=[0], strategies=["random", "dissect-gain"]),
    "reduced": dict(_BASE, num_train=2000, noises=[0.5, 0.0, 0.2, 0.7], strategies=[*MAIN, "small_loss", "big_loss"],
                    seed_strategies=MAIN, dissect_rates=[0.2, 0.5], rate_strategies=["dissect-warmup"],
                    sweeps=["warmup_train", "warmup_point", "momentum", "data_size"],
                    sweep_strategies=["dissect-warmup", "warmup-clipscore"]),
    "reduced-w20": dict(_BASE, num_train=2000, warmup_point=20, strategies=["warmup-clipscore", "dissect-warmup"]),
}  # fmt: skip
#: ``--data`` grids. ``cpu``: 2,000 photos x 2 captions, a 32 px ResNet tower from scratch, 16 epochs, 1,000 held out
_PHOTO = dict(captions_per_image=2, image_px=32, model="micro-rn", lr=3e-3, warmup_train="full", val_every=1)
PHOTO_GRIDS = {
    "quick": dict(_PHOTO, train_images=60, val_images=20, batch_size=20, epochs=3, warmup_point=1, lr_warmup=5,
                  noises=[0.4, 0.0], seeds=[0], strategies=["full", "warmup-snapshot"], sweeps=[]),
    "cpu": dict(_PHOTO, train_images=2000, val_images=1000, batch_size=100, epochs=16, warmup_point=4, lr_warmup=50,
                noises=[0.4, 0.0, 0.2], seeds=[0, 1, 2], sweeps=["warmup_point", "warmup_train"], sweep_points=[1, 2, 8],
                strategies=["full", "warmup-snapshot", "warmup-clipscore", "dissect-warmup", "clipscore", "random"],
                sweep_strategies=["warmup-snapshot", "warmup-clipscore", "dissect-warmup"]),
}  # fmt: skip


def plan_runs(g: dict) -> list[dict]:
    """Every run of a grid in priority order (a run is a dict of its settings: its identity): the first noise level,
    the other levels, more seeds at the first level (``seed_strategies``), other rates, then the ``sweeps``."""
    runs: list[dict] = []
    main_mode, (noise0, *_), (seed0, *more_seeds) = g["warmup_train"], g["noises"], g["seeds"]

    def add(noise, strategy, seed, rate=RATE, sweep="main", **over):
        r = dict(noise=noise, strategy=strategy, seed=seed, rate=1.0 if strategy == "full" else rate, sweep=sweep,
                 num_train=g.get("num_train"), epochs=g["epochs"], warmup_point=g["warmup_point"],
                 warmup_train=main_mode if strategy in WARMUP_STRATEGIES else "random", momentum=0.9,
                 model=g["model"])  # fmt: skip
        r.update(over)
        if r not in runs:
            runs.append(r)

    strategies, w = g["strategies"], g["warmup_point"]
    sweep_strategies = [s for s in g.get("sweep_strategies", ()) if s in strategies]
    for noise in g["noises"]:
        for s in strategies:
            add(noise, s, seed0)
    for seed in more_seeds:
        for s in g.get("seed_strategies", strategies):
            add(noise0, s, seed)
    for s in g.get("rate_strategies", ()):
        for rate in g["dissect_rates"]:
            add(noise0, s, seed0, rate=rate)
    for sweep in g["sweeps"]:
        if sweep == "warmup_train":
            for s in (s for s in WARMUP_STRATEGIES if s in strategies):
                add(noise0, s, seed0, sweep=sweep, warmup_train="full" if main_mode == "random" else "random")
        elif sweep == "warmup_point":
            for s in sweep_strategies:
                for wp in g.get("sweep_points", sorted({max(1, w // 2), min(g["epochs"] - 1, 2 * w)} - {w})):
                    add(noise0, s, seed0, sweep=sweep, warmup_point=wp)
        elif sweep == "momentum":
            for m in (0.5, 0.99):
                add(noise0, "dissect-momentum", seed0, sweep=sweep, momentum=m)
        else:  # data_size: half the training pairs
            for s in ("full", *sweep_strategies):
                add(noise0, s, seed0, sweep=sweep, num_train=g["num_train"] // 2)
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


def main(argv: list[str] | None = None) -> int:
    p = harness.grid_parser("python -m benchmarks.bench_quality", __doc__, {**GRIDS, **PHOTO_GRIDS}, None)
    p.add_argument("--data", default=None, help="a folder with captions.csv and images/ (default: synthetic pairs)")
    p.add_argument("--data-name", default=None, help="how results name the --data folder (default: its name)")
    a = p.parse_args(argv)
    grids, kind = (PHOTO_GRIDS, "real") if a.data else (GRIDS, "quality")
    a.grid = a.grid or ("cpu" if a.data else "reduced")
    if a.grid not in grids:
        p.error(f"--grid {a.grid}: not a grid for {'--data' if a.data else 'synthetic pairs'} ({', '.join(grids)})")
    g, work, name = grids[a.grid], a.work or f"runs/bench_{kind}", a.data_name or os.path.basename(str(a.data))
    fields = {
        **harness.header(kind, "bench_quality", a.device, argv),
        **({"data_name": name} if a.data else {}),
        "settings": dict(g, rate=RATE, device=a.device),
        "note": "wall-clock is comparable only between runs at a similar load (load_start/load_end per run); "
        "compute_units (forward = 1, backward = 2 per sample) is the load-free cost",
    }

    def run_one(r: dict) -> dict:
        if a.data:
            train, val = harness.csv_folder_data(a.data, work, g, r["noise"])
        else:
            train, val = harness.synthetic_data(work, r["noise"], r["num_train"], g["num_val"])
        run = f"{r['sweep']}-noise{round(100 * r['noise'])}-{r['strategy']}-r{r['rate']}-W{r['warmup_point']}-s{r['seed']}"
        load = harness.machine_load()
        metrics, arrays, wall = harness.train_run(harness.train_argv(r, g, train, val, work, run, a.device))
        row = harness.selection_row(r, metrics, arrays, wall, load)
        if a.data:  # the score's ROC AUC for clean vs noisy pairs, and the training time without evaluation
            row["score_auc_per_epoch"] = [None if (v := auc(s, arrays["clean"])) is None else round(v, 4)
                                          for s in arrays["score"]]  # fmt: skip
            row["train_wall_s"] = row["train_wall_s_cum"][-1]
        return row

    def describe(r: dict, row: dict) -> str:
        return (
            f"{r['sweep']} noise {r['noise']:.0%} {r['strategy']} r={r['rate']} W={r['warmup_point']} seed "
            f"{r['seed']}: R@1 i2t {row['i2t_R@1']:.1f} t2i {row['t2i_R@1']:.1f}, clean share (>= W) "
            f"{row['clean_fraction_after_warmup']:.3f} (base {row['base_clean_fraction']:.2f}), {row['wall_s']:.0f} s"
        )

    tag = a.tag or "-".join([*([name] if a.data else []), a.device, a.grid])
    return harness.grid_main(p, a, kind, tag, fields, plan_runs(g), run_one, describe)


if __name__ == "__main__":
    raise SystemExit(main())
