"""Selection quality: which pairs does each strategy train on, and what does the model learn from them?

Synthetic data with known noisy correspondence (a fraction of training captions permuted; the
validation split is clean). Every strategy trains the same model with the same epochs, schedule
and seed; per run the benchmark stores final R@1/R@5 both directions on the clean validation
split, the clean share of the trained samples per epoch, wall-clock, samples forwarded and
backpropagated, and the mean CLIPScore of clean / noisy pairs split into "trained after the
warm-up point" vs "not trained" per epoch (score trajectories).

Runs are ordered by priority (50% noise first, then the other noise levels, then more seeds,
then sweeps) and the JSON is rewritten after every run, so a run cut short keeps what finished;
an existing JSON is resumed (finished runs are skipped).

    dissect-fast bench quality --grid reduced                # CPU grid (see GRIDS)
    dissect-fast bench quality --grid full --device cuda     # the full grid, on a GPU
    dissect-fast bench quality --grid quick --out /tmp/q     # 1 seed, 2 strategies, tiny data (tests)
    dissect-fast bench quality --plots-only --json benchmarks/results/quality-cpu-reduced.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

import numpy as np

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # benchmarks/ is not a package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchkit  # noqa: E402

from dissect_fast.selection.names import STRATEGIES as _ALL
from dissect_fast.selection.names import WARMUP_STRATEGIES

STRATEGIES = list(_ALL)
#: grid presets: data size, model, epochs, warm-up point, noise levels, seeds, strategies, sweeps
GRIDS = {
    "quick": dict(
        num_train=200,
        num_val=50,
        batch_size=40,
        epochs=2,
        warmup_point=1,
        model="micro-rn",
        lr=3e-3,
        lr_warmup=5,
        noises=[0.5],
        seeds=[0],
        strategies=["random", "dissect-gain"],
        dissect_rates=[],
        sweeps=False,
    ),
    # CPU grid, sized to finish within an hour on a 2-core machine: the demo's learning regime (micro-rn,
    # 2,000 pairs, 30 epochs: at 40% noise full-data training reaches R@1 ~13% on 500 clean pairs, chance 0.2%; noisy
    # pairs' scores keep rising late); 3 seeds at 50% noise, 1 seed at the other noise levels
    "reduced": dict(
        num_train=2000,
        num_val=500,
        batch_size=100,
        epochs=30,
        warmup_point=10,
        model="micro-rn",
        lr=3e-3,
        lr_warmup=50,
        noises=[0.5, 0.0, 0.2, 0.7],
        seeds=[0, 1, 2],
        warmup_train="full",
        strategies=[
            "full",
            "dissect-warmup",
            "dissect-gain",
            "warmup-clipscore",
            "random",
            "clipscore",
            "dissect-momentum",
            "small_loss",
            "big_loss",
        ],
        more_seed_noises=[0.5],
        more_seed_strategies=[
            "full",
            "dissect-warmup",
            "dissect-gain",
            "warmup-clipscore",
            "random",
            "clipscore",
            "dissect-momentum",
        ],
        dissect_rates=[0.2, 0.5],
        dissect_rate_noises=[0.5],
        dissect_rate_strategies=["dissect-warmup"],
        dissect_rate_more_seeds=False,
        sweeps=True,
        sweep_strategies=["dissect-warmup", "warmup-clipscore"],
        sweep_epochs=False,
    ),
    # follow-up to the reduced grid: its 50% noise runs of the two rules that keep a warm-up snapshot, at the
    # later warm-up point W = 20 (where warmup-clipscore's sweep run reached 0.966 clean), all three seeds
    "reduced-w20": dict(
        num_train=2000,
        num_val=500,
        batch_size=100,
        epochs=30,
        warmup_point=20,
        model="micro-rn",
        lr=3e-3,
        lr_warmup=50,
        noises=[0.5],
        seeds=[0, 1, 2],
        warmup_train="full",
        strategies=["warmup-clipscore", "dissect-warmup"],
        dissect_rates=[],
        sweeps=False,
    ),
    # the reduced grid's regime at 5x the data and every seed and sweep; sized for a GPU (tiny-vit, the earlier
    # choice, barely left chance level on this task: a 32 px ViT learns colour and position far slower than a CNN)
    "full": dict(
        num_train=10000,
        num_val=1000,
        batch_size=100,
        epochs=30,
        warmup_point=10,
        model="micro-rn",
        lr=3e-3,
        lr_warmup=100,
        noises=[0.0, 0.2, 0.5, 0.7],
        seeds=[0, 1, 2],
        warmup_train="full",
        strategies=STRATEGIES,
        dissect_rates=[0.2, 0.5],
        sweeps=True,
    ),
}
RATE = 0.3
DISSECT = ("dissect-warmup", "dissect-gain")  #: also run at DISSect's other rates
WARMUP = WARMUP_STRATEGIES  #: strategies with a warm-up point and mode


def plan_runs(g: dict) -> list[dict]:
    """Every run of a grid, in priority order. A run is a dict of its settings (its identity).

    Optional grid keys limit the expensive parts: ``warmup_train`` (the warm-up strategies' mode in the
    main grid; the sweep runs the other), ``more_seed_strategies`` / ``more_seed_noises``,
    ``dissect_rate_strategies`` / ``dissect_rate_noises``, ``sweep_strategies`` (warm-up point and data
    size sweeps) and ``sweep_epochs`` (the doubled-epochs runs).
    """
    runs: list[dict] = []
    main_mode = g.get("warmup_train", "random")

    def add(noise, strategy, seed, rate=RATE, sweep="main", **over):
        r = dict(
            noise=noise,
            strategy=strategy,
            seed=seed,
            rate=1.0 if strategy == "full" else rate,
            sweep=sweep,
            num_train=g["num_train"],
            epochs=g["epochs"],
            warmup_point=g["warmup_point"],
            warmup_train=main_mode if strategy in WARMUP else "random",
            momentum=0.9,
            model=g["model"],
        )
        r.update(over)
        if r not in runs:
            runs.append(r)

    seeds, noises, strategies = g["seeds"], g["noises"], g["strategies"]
    seed_strategies = [s for s in strategies if s in g.get("more_seed_strategies", strategies)]
    seed_noises = [n for n in noises if n in g.get("more_seed_noises", noises)]
    rate_strategies = [s for s in g.get("dissect_rate_strategies", DISSECT) if s in strategies]
    sweep_strategies = [s for s in g.get("sweep_strategies", WARMUP) if s in strategies]
    first = noises[0]  # priority: first noise level (50%), all strategies at r, first seed
    for s in strategies:
        add(first, s, seeds[0])
    for noise in noises[1:]:  # then the other noise levels
        for s in strategies:
            add(noise, s, seeds[0])
    for seed in seeds[1:]:  # then more seeds at the first noise level
        for s in seed_strategies:
            add(first, s, seed)
    for noise in g.get("dissect_rate_noises", noises):  # then DISSect's other rates
        for s in rate_strategies:
            for rate in g["dissect_rates"]:
                add(noise, s, seeds[0], rate=rate)
    if g["sweeps"]:  # then the sweeps at 50% noise, first seed
        seed, e, w = seeds[0], g["epochs"], g["warmup_point"]
        other_mode = "full" if main_mode == "random" else "random"
        for s in WARMUP:
            if s in strategies:
                add(0.5, s, seed, sweep="warmup_train", warmup_train=other_mode)
        for s in sweep_strategies:
            for wp in sorted({max(1, w // 2), min(e - 1, 2 * w)} - {w}):
                add(0.5, s, seed, sweep="warmup_point", warmup_point=wp)
        for m in (0.5, 0.99):
            add(0.5, "dissect-momentum", seed, sweep="momentum", momentum=m)
        for s in ("full", *sweep_strategies):
            add(0.5, s, seed, sweep="data_size", num_train=g["num_train"] // 2)
            if g.get("sweep_epochs", True):
                add(0.5, s, seed, sweep="epochs", epochs=2 * e)
    for seed in seeds[1:]:  # the rest of the grid with more seeds
        for noise in [n for n in noises[1:] if n in seed_noises]:
            for s in seed_strategies:
                add(noise, s, seed)
        for noise in g.get("dissect_rate_noises", noises) if g.get("dissect_rate_more_seeds", True) else []:
            for s in rate_strategies:
                for rate in g["dissect_rates"]:
                    add(noise, s, seed, rate=rate)
    return runs


def run_key(r: dict) -> str:
    return json.dumps(r, sort_keys=True)


def machine_load() -> dict:
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    return {"loadavg_1_5_15": [round(x, 2) for x in la], "cpu_count": os.cpu_count()}


def ensure_data(root: str, noise: float, num_train: int, num_val: int) -> str:
    from dissect_fast.data.shards import INDEX_NAME
    from dissect_fast.tools.synthetic import make_synthetic

    d = os.path.join(root, f"data-n{num_train}-noise{int(round(100 * noise))}")
    if not os.path.isfile(os.path.join(d, "train", INDEX_NAME)):
        make_synthetic(
            d, num_train, num_val, noise, 32, seed=0, samples_per_shard=max(50, num_train // 4), progress=False
        )
    return d


def group_means(score: np.ndarray, trained_after: np.ndarray, clean: np.ndarray) -> dict:
    """Mean CLIPScore per epoch of clean/noisy x trained-after-warm-up/not (NaN = not scored)."""
    out = {}
    for label, cm in (("clean", clean), ("noisy", ~clean)):
        for tl, tm in (("trained", trained_after), ("not_trained", ~trained_after)):
            m = cm & tm
            vals = score[:, m]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(vals, axis=1) if m.any() else np.full(score.shape[0], np.nan)
            out[f"{label}_{tl}"] = [None if not np.isfinite(v) else round(float(v), 3) for v in mean]
            out[f"n_{label}_{tl}"] = int(m.sum())
    return out


def train_one(r: dict, g: dict, data: str, work: str, device: str) -> dict:
    from dissect_fast.config import config_from_args
    from dissect_fast.data.dali_loader import dali_if_available
    from dissect_fast.training.callbacks import Callback
    from dissect_fast.training.loop import Trainer

    name = f"{r['sweep']}-noise{int(100 * r['noise'])}-{r['strategy']}-r{r['rate']}-s{r['seed']}-{abs(hash(run_key(r))) % 10**6}"
    argv = [
        "--train-data",
        os.path.join(data, "train"),
        "--val-data",
        os.path.join(data, "val"),
        "--model",
        r["model"],
        "--batch-size",
        str(g["batch_size"]),
        "--epochs",
        str(r["epochs"]),
        "--lr",
        str(g["lr"]),
        "--warmup",
        str(g["lr_warmup"]),
        "--wd",
        "0.1",
        "--workers",
        "1",
        "--data-backend",
        dali_if_available(),
        "--logs",
        work,
        "--name",
        name,
        "--seed",
        str(r["seed"]),
        "--device",
        device,
        "--no-progress",
        "--no-plots",
        "--no-tensorboard",
        "--val-every",
        str(r["epochs"]),
        "--log-every-n-steps",
        "1000",
        "--select-strategy",
        r["strategy"],
        "--select-rate",
        str(r["rate"]),
        "--warmup-point",
        str(r["warmup_point"]),
        "--warmup-train",
        r["warmup_train"],
        "--momentum",
        str(r["momentum"]),
        "--save-frequency",
        "0",
    ]
    run_dir = os.path.join(work, name)
    if os.path.isdir(run_dir):  # a stale, unfinished attempt: start clean (no resume across bench runs)
        import shutil

        shutil.rmtree(run_dir)
    t = Trainer(config_from_args(argv))
    if t.diag.clean is None:
        raise RuntimeError(f"{data}: the shards carry no clean flags; the quality benchmark needs synthetic data")
    logging.getLogger("dissect_fast").setLevel(logging.WARNING)
    strat, steps, B, k = t.strategy, t.steps_per_epoch, g["batch_size"], t.k
    scores, trained, arrays = [], [], []

    class PerIdArrays(Callback):
        """Each epoch's per-id scores and trained flags, read before the next epoch resets them."""

        def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
            arrays[:] = [t.diag.arrays()]
            scores.append(arrays[0]["score"])
            trained.append(arrays[0]["trained"] > 0)

    t.callbacks.append(PerIdArrays())
    load0 = machine_load()
    t0 = time.time()
    metrics = t.fit()  # the last epoch evaluates (--val-every epochs) and alone writes a checkpoint
    wall = time.time() - t0
    forwarded = backprop = 0
    for epoch, m in enumerate(metrics):
        full_batch = strat.trains_full_batch(epoch) or r["strategy"] == "full"
        forwarded += steps * ((B if strat.needs_scoring(epoch) else 0) + (B if full_batch else k))
        backprop += m["select/trained_samples"]
    a = arrays[0]
    clean = a["clean"].astype(bool)
    score = np.stack(scores)
    W = min(r["warmup_point"], r["epochs"] - 1)
    trained_after = np.stack(trained)[W:].any(axis=0)
    last = metrics[-1]
    sel = [x for x in metrics[W:]]
    cf_after = sum(x["select/clean_fraction"] * x["select/trained_samples"] for x in sel) / max(
        1, sum(x["select/trained_samples"] for x in sel)
    )
    row = dict(r)
    row.update(
        {
            "i2t_R@1": last["val/image_to_text_R@1"],
            "i2t_R@5": last["val/image_to_text_R@5"],
            "t2i_R@1": last["val/text_to_image_R@1"],
            "t2i_R@5": last["val/text_to_image_R@5"],
            "clean_fraction_per_epoch": [round(x["select/clean_fraction"], 4) for x in metrics],
            "clean_fraction_after_warmup": round(cf_after, 4),
            "base_clean_fraction": round(float(clean.mean()), 4),
            "score_clean_mean_per_epoch": [round(x.get("diag/score_clean_mean", float("nan")), 3) for x in metrics],
            "score_noisy_mean_per_epoch": [round(x.get("diag/score_noisy_mean", float("nan")), 3) for x in metrics],
            "trajectories": group_means(score, trained_after, clean),
            "train_loss_per_epoch": [round(x["train_loss"], 4) for x in metrics],
            "wall_s": round(wall, 2),
            "samples_forwarded": int(forwarded),
            "samples_backpropagated": int(backprop),
            # compute in forward-sample equivalents: a forward 1, a backward ~2 (so a trained sample costs 3)
            "compute_units": int(forwarded + 2 * backprop),
            "steps_per_epoch": steps,
            "k": k,
            "batch_size": B,
            "load_start": load0,
            "load_end": machine_load(),
        }
    )
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are not needed
    return row


def write_json(path: str, doc: dict) -> None:
    benchkit.write_json(path, doc)


# ---------------------------------------------------------------- summaries and plots
def _stats(vals):
    v = np.asarray([x for x in vals if x is not None], dtype=float)
    return (float(v.mean()), float(v.std()), len(v)) if len(v) else (float("nan"), float("nan"), 0)


def summarise(doc: dict) -> list[dict]:
    """Mean +- std over seeds per (sweep, noise, strategy, rate, warm-up point, warm-up mode, momentum, data, epochs)."""
    groups: dict = {}
    for row in doc["runs"]:
        key = tuple(
            row[k]
            for k in (
                "sweep",
                "noise",
                "strategy",
                "rate",
                "warmup_point",
                "warmup_train",
                "momentum",
                "num_train",
                "epochs",
            )
        )
        groups.setdefault(key, []).append(row)
    full_cost = {}
    for key, rows in groups.items():
        if key[2] == "full":
            full_cost[(key[1], key[7], key[8])] = np.mean([x["compute_units"] for x in rows])
    out = []
    for key, rows in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != "main", kv[0][0], kv[0][1], kv[0][2], kv[0][3])
    ):
        s = dict(
            zip(
                (
                    "sweep",
                    "noise",
                    "strategy",
                    "rate",
                    "warmup_point",
                    "warmup_train",
                    "momentum",
                    "num_train",
                    "epochs",
                ),
                key,
            )
        )
        s["seeds"] = len(rows)
        for m in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "clean_fraction_after_warmup", "wall_s", "compute_units"):
            s[m] = _stats([x[m] for x in rows])[:2]
        fc = full_cost.get((key[1], key[7], key[8]))
        s["compute_vs_full"] = float(s["compute_units"][0] / fc) if fc else None
        out.append(s)
    return out


def format_table(doc: dict) -> str:
    rows = [
        "| sweep | noise | strategy | r | W | warm-up | beta | N | epochs | seeds | i2t R@1 | t2i R@1 | i2t R@5 "
        "| clean share trained (epochs >= W) | compute vs full | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pm(x, d=1):
        return f"{x[0]:.{d}f} ± {x[1]:.{d}f}"

    for s in summarise(doc):
        hist = s["strategy"] in WARMUP
        rows.append(
            f"| {s['sweep']} | {s['noise']:.0%} | {s['strategy']} | {s['rate']} | {s['warmup_point'] if hist else '-'} "
            f"| {s['warmup_train'] if hist else '-'} | {s['momentum'] if s['strategy'] == 'dissect-momentum' else '-'} "
            f"| {s['num_train']} | {s['epochs']} | {s['seeds']} | {pm(s['i2t_R@1'])} | {pm(s['t2i_R@1'])} "
            f"| {pm(s['i2t_R@5'])} | {pm(s['clean_fraction_after_warmup'], 3)} "
            f"| {s['compute_vs_full']:.2f} | {pm(s['wall_s'], 0)} |"
            if s["compute_vs_full"] is not None
            else f"| {s['sweep']} | {s['noise']:.0%} | {s['strategy']} | {s['rate']} | {s['warmup_point'] if hist else '-'} "
            f"| {s['warmup_train'] if hist else '-'} | {s['momentum'] if s['strategy'] == 'dissect-momentum' else '-'} "
            f"| {s['num_train']} | {s['epochs']} | {s['seeds']} | {pm(s['i2t_R@1'])} | {pm(s['t2i_R@1'])} "
            f"| {pm(s['i2t_R@5'])} | {pm(s['clean_fraction_after_warmup'], 3)} | n/a | {pm(s['wall_s'], 0)} |"
        )
    return "\n".join(rows)


def make_plots(doc: dict, out_dir: str, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    main = [r for r in doc["runs"] if r["sweep"] == "main" and r["rate"] in (RATE, 1.0)]
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in main)]
    # 1. R@1 vs noise per strategy
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for s in strategies:
        pts = {}
        for r in main:
            if r["strategy"] == s:
                pts.setdefault(r["noise"], []).append(0.5 * (r["i2t_R@1"] + r["t2i_R@1"]))
        xs = sorted(pts)
        ax.errorbar(
            [100 * x for x in xs],
            [np.mean(pts[x]) for x in xs],
            yerr=[np.std(pts[x]) for x in xs],
            marker="o",
            ms=3,
            capsize=2,
            label=s,
        )
    ax.set_xlabel("noisy pairs in training data (%)")
    ax.set_ylabel("R@1, mean of both directions (%)")
    ax.set_title(f"clean validation R@1 (r = {RATE}; full = all data)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}-r1-vs-noise.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    # 2. clean fraction over epochs at 50% noise
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for s in strategies:
        runs = [r for r in main if r["strategy"] == s and r["noise"] == 0.5]
        if runs:
            cf = np.array([r["clean_fraction_per_epoch"] for r in runs])
            ax.plot(range(1, cf.shape[1] + 1), cf.mean(0), marker="o", ms=3, label=s)
    wp = doc["settings"]["warmup_point"]
    ax.axvline(wp + 0.5, ls="--", color="gray", lw=1, label=f"warm-up point W={wp}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean share of trained samples")
    ax.set_title("50% noise (base rate 0.5), r = 0.3", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}-clean-fraction.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    # 3. trajectories: clean/noisy x trained/not, for the history strategies at 50% noise, first seed
    traj = [
        s
        for s in ("full", "dissect-warmup", "dissect-gain", "warmup-clipscore", "dissect-momentum")
        if any(r["strategy"] == s and r["noise"] == 0.5 for r in main)
    ]
    if traj:
        fig, axes = plt.subplots(1, len(traj), figsize=(3.6 * len(traj), 3.4), squeeze=False)
        for ax, s in zip(axes[0], traj):
            r = [x for x in main if x["strategy"] == s and x["noise"] == 0.5][0]
            t = r["trajectories"]
            ep = range(1, r["epochs"] + 1)
            for key, c, ls in (
                ("clean_trained", "tab:green", "-"),
                ("clean_not_trained", "tab:green", ":"),
                ("noisy_trained", "tab:red", "-"),
                ("noisy_not_trained", "tab:red", ":"),
            ):
                y = [np.nan if v is None else v for v in t[key]]
                ax.plot(ep, y, ls, color=c, marker="o", ms=2, label=f"{key.replace('_', ' ')} (n={t['n_' + key]})")
            ax.axvline(r["warmup_point"] + 0.5, ls="--", color="gray", lw=1)
            ax.set_title(f"{s}, seed {r['seed']}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("mean CLIPScore of the group")
        fig.suptitle(
            "50% noise: score trajectories, split by 'trained at some epoch >= W' (dashed line: W)", fontsize=9
        )
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{prefix}-trajectories.png"))
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dissect-fast bench quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--grid", default="reduced", choices=sorted(GRIDS))
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="folder for quality-<tag>.json, the table and the plots",
    )
    p.add_argument("--tag", default=None, help="default: <device>-<grid>")
    p.add_argument("--work", default="runs/bench_quality", help="synthetic data and scratch run folders")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting new runs after this long")
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--plots-only", action="store_true", help="only (re)write table and plots from --json")
    p.add_argument("--json", default=None, help="with --plots-only: the results file")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    g = GRIDS[a.grid]
    tag = a.tag or f"{a.device}-{a.grid}"
    path = a.json or os.path.join(a.out, f"quality-{tag}.json")
    prefix = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(a.out, exist_ok=True)
    if a.plots_only:
        doc = benchkit.load_json(path)
        if doc is None:
            p.error(f"--json {path}: no such file")
    else:
        runs = plan_runs(g)
        fields = {
            "settings": dict(g, rate=RATE, device=a.device),
            "planned_runs": len(runs),
            **benchkit.header("quality", "bench_quality.py", a.device, argv),
            "note": "wall-clock is only comparable between runs with a similar load average (load_start/load_end "
            "per run); compute_units (forward = 1, backward = 2 per sample) is the load-free cost",
        }
        try:
            doc = benchkit.grid_doc(path, a.grid, fields)
        except ValueError as e:
            p.error(str(e))

        def run_one(r: dict) -> dict:
            return train_one(r, g, ensure_data(a.work, r["noise"], r["num_train"], g["num_val"]), a.work, a.device)

        def describe(r: dict, row: dict) -> str:
            return (
                f"{r['sweep']} noise {r['noise']:.0%} {r['strategy']} r={r['rate']} seed {r['seed']}: R@1 i2t "
                f"{row['i2t_R@1']:.1f} t2i {row['t2i_R@1']:.1f}, clean share (>= W) "
                f"{row['clean_fraction_after_warmup']:.3f}, {row['wall_s']:.0f} s, load {row['load_end']['loadavg_1_5_15'][0]}"
            )

        benchkit.run_grid(
            path, doc, runs, run_one, describe, max_minutes=a.max_minutes, max_runs=a.max_runs, tag="quality"
        )
    benchkit.write_grid_report(doc, a.out, prefix, format_table, make_plots)
    print(f"[quality] {len(doc['runs'])} runs in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
