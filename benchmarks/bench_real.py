"""Selection on real photos: which pairs does each rule train on, and what recall does it buy per wall-clock?

Data: any folder in the CC3M / CyCLIP CSV layout (``captions.csv`` with columns ``image`` and ``caption``, several
captions per image allowed, and ``images/``), e.g. ``../shared/data/flickr8k-dev``. Images sorted by file name:
the last ``val_images`` are held out (their first caption: the clean validation split, never trained on); the
first ``train_images`` with ``captions_per_image`` captions each are the training pairs (an image whose bytes equal
a held-out image's, under another name, is skipped: the split is by image), of which a ``noise`` share get the
caption of another image (``dissect-fast shards --noise``: rows grouped by image, clean flags recorded). Images are shrunk once to ``image_px`` on the shorter side before sharding, so that the CPU grid times
training rather than decoding larger JPEGs.

Every run trains the same model, epochs, schedule and seed through ``Trainer.fit`` and stores per epoch: the clean
share of the trained pairs, the mean score of clean / noisy pairs split into "trained at some epoch >= W" vs not
(trajectories), how well the score separates clean from noisy pairs (ROC AUC), retrieval on the held-out images
(R@1/R@5 both directions), the cumulative training wall-clock (evaluation excluded) and the samples forwarded and
backpropagated. Runs are ordered by priority and the JSON is rewritten after each, so a cut run keeps what
finished; an existing JSON resumes.

    dissect-fast bench real --data ../shared/data/flickr8k-dev               # the CPU grid (GRIDS["cpu"])
    dissect-fast bench real --data DIR --grid quick --out /tmp/r              # tiny (tests)
    dissect-fast bench real --plots-only --json benchmarks/results/real-flickr8k-dev-cpu.json
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
import time
from dataclasses import replace

import numpy as np

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # benchmarks/ is not a package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchkit  # noqa: E402
from bench_quality import group_means, machine_load  # noqa: E402

from dissect_fast.selection.names import WARMUP_STRATEGIES  # noqa: E402

RATE = 0.3
NOISE_MAIN = 0.4
#: grid presets: data size, model, epochs, warm-up point, noise levels, seeds, strategies, sweeps
GRIDS = {
    "quick": dict(
        train_images=60,
        captions_per_image=2,
        val_images=20,
        image_px=32,
        model="micro-rn",
        batch_size=20,
        epochs=3,
        warmup_point=1,
        lr=3e-3,
        lr_warmup=5,
        noises=[0.4, 0.0],
        seeds=[0],
        strategies=["full", "warmup-snapshot"],
        more_seeds=[],
        sweep_points=[],
        sweep_strategies=[],
        warmup_train="full",
    ),
    # the CPU grid: 2,000 photos x 2 captions (4,000 pairs), a 32 px ResNet tower from scratch, 16 epochs; 1,000
    # held-out photos for recall (chance R@5 = 0.5%)
    "cpu": dict(
        train_images=2000,
        captions_per_image=2,
        val_images=1000,
        image_px=32,
        model="micro-rn",
        batch_size=100,
        epochs=16,
        warmup_point=4,
        lr=3e-3,
        lr_warmup=50,
        noises=[0.4, 0.0, 0.2],
        seeds=[0],
        strategies=["full", "warmup-snapshot", "warmup-clipscore", "dissect-warmup", "clipscore", "random"],
        more_seeds=[1, 2],
        sweep_points=[1, 2, 8],
        sweep_strategies=["warmup-snapshot", "warmup-clipscore", "dissect-warmup"],
        warmup_train="full",
    ),
}


def plan_runs(g: dict) -> list[dict]:
    """Every run of a grid in priority order: 40% noise (all strategies), the warm-up point sweep at 40%, the other
    warm-up mode at 40%, more seeds at 40%, then the other noise levels."""
    runs: list[dict] = []

    def add(noise, strategy, seed, sweep="main", **over):
        r = dict(
            noise=noise,
            strategy=strategy,
            seed=seed,
            rate=1.0 if strategy == "full" else RATE,
            sweep=sweep,
            epochs=g["epochs"],
            warmup_point=g["warmup_point"],
            warmup_train=g["warmup_train"] if strategy in WARMUP_STRATEGIES else "random",
            model=g["model"],
        )
        r.update(over)
        if r not in runs:
            runs.append(r)

    s0 = g["seeds"][0]
    for s in g["strategies"]:
        add(NOISE_MAIN, s, s0)
    for wp in g["sweep_points"]:
        for s in g["sweep_strategies"]:
            add(NOISE_MAIN, s, s0, sweep="warmup_point", warmup_point=wp)
    other = "random" if g["warmup_train"] == "full" else "full"
    for s in g["sweep_strategies"]:
        add(NOISE_MAIN, s, s0, sweep="warmup_train", warmup_train=other)
    for seed in g["more_seeds"]:
        for s in g["strategies"]:
            add(NOISE_MAIN, s, seed)
    for noise in g["noises"]:
        if noise != NOISE_MAIN:
            for s in g["strategies"]:
                add(noise, s, s0)
    return runs


# ----------------------------------------------------------------------------------------------- data
def read_captions(folder: str) -> dict[str, list[str]]:
    """image file name -> its captions, in file order (``captions.csv``, columns image and caption)."""
    path = os.path.join(folder, "captions.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {folder}: no captions.csv (the CC3M/CyCLIP layout: captions.csv + images/)")
    by: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by.setdefault(row["image"], []).append(row["caption"])
    return by


def shrink_images(src: str, dst: str, names: list[str], px: int) -> None:
    """JPEGs with the shorter side ``px`` (aspect kept), written once."""
    from PIL import Image

    os.makedirs(dst, exist_ok=True)
    for n in names:
        out = os.path.join(dst, n)
        if os.path.isfile(out):
            continue
        with Image.open(os.path.join(src, n)) as im:
            im = im.convert("RGB")
            s = px / min(im.size)
            im.resize((max(px, round(im.width * s)), max(px, round(im.height * s))), Image.BICUBIC).save(
                out + ".tmp", format="JPEG", quality=90
            )
        os.replace(out + ".tmp", out)


def ensure_data(folder: str, work: str, g: dict, noise: float) -> tuple[str, str]:
    """(train shards, val shards) for one noise level; built once per work folder."""
    from dissect_fast.data.shards import INDEX_NAME, DatasetIndex
    from dissect_fast.tools.csv_shards import csv_to_shards

    by = read_captions(folder)
    names = sorted(by)
    n_tr, n_va, c = g["train_images"], g["val_images"], g["captions_per_image"]
    if n_tr + n_va > len(names):
        raise ValueError(f"--data {folder}: {len(names)} images, the grid needs {n_tr} + {n_va}")
    val = names[-n_va:]
    train = _train_images(os.path.join(folder, "images"), names[:-n_va], val, n_tr)
    images = os.path.join(work, f"images-{g['image_px']}px")
    shrink_images(os.path.join(folder, "images"), images, train + val, g["image_px"])
    tag = f"tr{n_tr}x{c}-va{n_va}-{g['image_px']}px"
    val_dir = os.path.join(work, f"val-{tag}")
    if not os.path.isfile(os.path.join(val_dir, "train", INDEX_NAME)):
        rows = [(n, by[n][0]) for n in val]
        _write_csv(os.path.join(work, f"val-{tag}.csv"), rows)
        csv_to_shards(os.path.join(work, f"val-{tag}.csv"), images, val_dir, samples_per_shard=1000, progress=False)
    train_dir = os.path.join(work, f"train-{tag}-noise{round(100 * noise)}")
    if not os.path.isfile(os.path.join(train_dir, "train", INDEX_NAME)):
        rows = [(n, cap) for n in train for cap in by[n][:c]]
        _write_csv(os.path.join(work, f"train-{tag}.csv"), rows)
        csv_to_shards(
            os.path.join(work, f"train-{tag}.csv"),
            images,
            train_dir,
            noise=noise,
            seed=0,
            samples_per_shard=max(100, len(rows) // 4),
            progress=False,
        )
    split = os.path.join(train_dir, "train")
    index = DatasetIndex.load(split)
    if index.clean_file is None:  # noise 0: shards records flags only for noisy sets; here every pair is clean
        np.save(os.path.join(split, "clean.npy"), np.ones(index.num_ids, dtype=np.uint8))
        replace(index, clean_file="clean.npy").save(split)
    return split, os.path.join(val_dir, "train")


def _train_images(images: str, candidates: list[str], val: list[str], n: int) -> list[str]:
    """The first ``n`` of ``candidates`` whose bytes are not those of a validation image (the split is by image,
    also when one photo is stored under two names)."""
    from dissect_fast.tools.csv_shards import content_key

    def key(name: str) -> bytes:
        with open(os.path.join(images, name), "rb") as f:
            return content_key(f.read())

    held_out = {key(v) for v in val}
    out = []
    for name in candidates:
        if len(out) == n:
            break
        if key(name) not in held_out:
            out.append(name)
    if len(out) < n:
        raise ValueError(f"--data {images}: {len(out)} training images differ from the validation ones, need {n}")
    return out


def _write_csv(path: str, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------- one run
def auc(score: np.ndarray, clean: np.ndarray) -> float | None:
    """ROC AUC of ``score`` for clean vs noisy pairs (ties count half); None when a class is empty or unscored."""
    ok = ~np.isnan(score)
    s, c = score[ok], clean[ok]
    n_pos, n_neg = int(c.sum()), int((~c).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(s)
    return float((ranks[c].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties given their group's average rank (no loop over samples)."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def train_one(r: dict, g: dict, train: str, val: str, work: str, device: str) -> dict:
    from dissect_fast.config import config_from_args
    from dissect_fast.training.callbacks import Callback
    from dissect_fast.training.loop import Trainer

    name = f"{r['sweep']}-noise{round(100 * r['noise'])}-{r['strategy']}-W{r['warmup_point']}-s{r['seed']}"
    run_dir = os.path.join(work, "runs", name)
    if os.path.isdir(run_dir):  # a stale, unfinished attempt: start clean
        shutil.rmtree(run_dir)
    argv = [
        *("--train-data", train, "--val-data", val, "--model", r["model"]),
        *("--batch-size", str(g["batch_size"]), "--epochs", str(r["epochs"]), "--lr", str(g["lr"])),
        *("--warmup", str(g["lr_warmup"]), "--wd", "0.1", "--workers", "1", "--data-backend", "torch"),
        *("--logs-dir", os.path.join(work, "runs"), "--name", name, "--seed", str(r["seed"]), "--device", device),
        *("--no-progress", "--no-plots", "--no-tensorboard", "--val-every", "1", "--log-every-n-steps", "1000"),
        *("--select-strategy", r["strategy"], "--select-rate", str(r["rate"])),
        *("--warmup-point", str(r["warmup_point"]), "--warmup-train", r["warmup_train"], "--save-frequency", "0"),
    ]
    t = Trainer(config_from_args(argv))
    if t.diag.clean is None:
        raise RuntimeError(f"{train}: the shards carry no clean flags")
    logging.getLogger("dissect_fast").setLevel(logging.WARNING)
    strat, B, k = t.strategy, g["batch_size"], t.k
    scores, trained = [], []
    clean_holder: list[np.ndarray] = []

    class PerIdArrays(Callback):
        """Each epoch's per-id scores and trained flags, read before the next epoch resets them."""

        def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
            a = t.diag.arrays()
            scores.append(a["score"])
            trained.append(a["trained"] > 0)
            clean_holder[:] = [a["clean"].astype(bool)]

    t.callbacks.append(PerIdArrays())
    load0 = machine_load()
    t0 = time.time()
    metrics = t.fit()
    wall_total = time.time() - t0
    clean = clean_holder[0]
    score = np.stack(scores)
    W = min(r["warmup_point"], r["epochs"] - 1) if r["strategy"] in WARMUP_STRATEGIES else 0
    trained_after = np.stack(trained)[W:].any(axis=0)
    fwd = bwd = 0
    fwd_cum, bwd_cum, train_wall_cum = [], [], []
    wall = 0.0
    for epoch, m in enumerate(metrics):
        full_batch = strat.trains_full_batch(epoch) or r["strategy"] == "full"
        fwd += t.steps_per_epoch * ((B if strat.needs_scoring(epoch) else 0) + (B if full_batch else k))
        bwd += m["select/trained_samples"]
        wall += m["epoch_wall_s"]
        fwd_cum.append(int(fwd))
        bwd_cum.append(int(bwd))
        train_wall_cum.append(round(wall, 2))
    sel = metrics[W:]
    cf_after = sum(x["select/clean_fraction"] * x["select/trained_samples"] for x in sel) / max(
        1, sum(x["select/trained_samples"] for x in sel)
    )

    def per_epoch(key: str) -> list:
        return [m.get(key) for m in metrics]

    row = dict(r)
    row.update(
        {
            "clean_fraction_per_epoch": [round(x["select/clean_fraction"], 4) for x in metrics],
            "clean_fraction_after_warmup": round(cf_after, 4),
            "base_clean_fraction": round(float(clean.mean()), 4),
            "score_auc_per_epoch": [None if (v := auc(s, clean)) is None else round(v, 4) for s in score],
            "score_clean_mean_per_epoch": [round(x.get("diag/score_clean_mean", float("nan")), 3) for x in metrics],
            "score_noisy_mean_per_epoch": [round(x.get("diag/score_noisy_mean", float("nan")), 3) for x in metrics],
            "trajectories": group_means(score, trained_after, clean),
            "train_loss_per_epoch": [round(x["train_loss"], 4) for x in metrics],
            "i2t_R@1_per_epoch": per_epoch("val/image_to_text_R@1"),
            "i2t_R@5_per_epoch": per_epoch("val/image_to_text_R@5"),
            "t2i_R@1_per_epoch": per_epoch("val/text_to_image_R@1"),
            "t2i_R@5_per_epoch": per_epoch("val/text_to_image_R@5"),
            "train_wall_s_cum": train_wall_cum,
            "samples_forwarded_cum": fwd_cum,
            "samples_backpropagated_cum": bwd_cum,
            "train_wall_s": train_wall_cum[-1],
            "wall_s_with_eval": round(wall_total, 2),
            "compute_units": int(fwd + 2 * bwd),  # forward 1, backward ~2 per sample
            "warmup_unscored_fraction": next(
                (m["select/warmup_unscored_fraction"] for m in metrics if "select/warmup_unscored_fraction" in m),
                None,
            ),
            "steps_per_epoch": t.steps_per_epoch,
            "k": k,
            "batch_size": B,
            "load_start": load0,
            "load_end": machine_load(),
        }
    )
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints are not needed
    return row


# ----------------------------------------------------------------------------------------------- summaries
def r5(row: dict, i: int = -1) -> float:
    """Mean of both directions' R@5 at epoch index i."""
    return 0.5 * (row["i2t_R@5_per_epoch"][i] + row["t2i_R@5_per_epoch"][i])


def summarise(doc: dict) -> list[dict]:
    """Mean +- std over seeds per (sweep, noise, strategy, warm-up point, warm-up mode), with the costs relative to
    full data at the same noise and seed, and when (share of full data's training wall-clock) the run first
    reached full data's final R@5."""
    rows = doc["runs"]
    full = {(x["noise"], x["seed"]): x for x in rows if x["strategy"] == "full"}
    groups: dict = {}
    for x in rows:
        key = (x["sweep"], x["noise"], x["strategy"], x["warmup_point"], x["warmup_train"])
        groups.setdefault(key, []).append(x)
    out = []
    for key, xs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "main", kv[0][0], -kv[0][1], kv[0][2])):
        s = dict(zip(("sweep", "noise", "strategy", "warmup_point", "warmup_train"), key), seeds=len(xs))
        s["clean_after_warmup"] = _ms([x["clean_fraction_after_warmup"] for x in xs])
        s["base_clean"] = xs[0]["base_clean_fraction"]
        s["final_R@5"] = _ms([r5(x) for x in xs])
        s["best_R@5"] = _ms([max(r5(x, i) for i in range(len(x["i2t_R@5_per_epoch"]))) for x in xs])
        rel_wall, rel_compute, reach = [], [], []
        for x in xs:
            f = full.get((x["noise"], x["seed"]))
            if f is None:
                continue
            rel_wall.append(x["train_wall_s"] / f["train_wall_s"])
            rel_compute.append(x["compute_units"] / f["compute_units"])
            target = r5(f)
            hit = next((i for i in range(len(x["i2t_R@5_per_epoch"])) if r5(x, i) >= target), None)
            reach.append(None if hit is None else x["train_wall_s_cum"][hit] / f["train_wall_s"])
        s["wall_vs_full"] = _ms(rel_wall) if rel_wall else None
        s["compute_vs_full"] = _ms(rel_compute) if rel_compute else None
        s["reach_full_R@5_at_wall"] = reach
        out.append(s)
    return out


def _ms(v: list[float]) -> list[float]:
    a = np.asarray(v, dtype=float)
    return [round(float(a.mean()), 4), round(float(a.std()), 4)]


def format_table(doc: dict) -> str:
    lines = [
        "| sweep | noise | strategy | W | warm-up | seeds | clean share trained (epochs >= W) | final R@5 | best R@5 "
        "| train wall vs full | compute vs full | reached full's final R@5 at (share of full's wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summarise(doc):
        warm = s["strategy"] in WARMUP_STRATEGIES

        def pm(v, d=3):
            return "n/a" if v is None else f"{v[0]:.{d}f} ± {v[1]:.{d}f}"

        reach = ", ".join("never" if x is None else f"{x:.2f}" for x in s["reach_full_R@5_at_wall"]) or "n/a"
        lines.append(
            f"| {s['sweep']} | {s['noise']:.0%} | {s['strategy']} | {s['warmup_point'] if warm else '-'} "
            f"| {s['warmup_train'] if warm else '-'} | {s['seeds']} | {pm(s['clean_after_warmup'])} "
            f"(base {s['base_clean']:.2f}) | {pm(s['final_R@5'], 2)} | {pm(s['best_R@5'], 2)} "
            f"| {pm(s['wall_vs_full'], 2)} | {pm(s['compute_vs_full'], 2)} | {reach} |"
        )
    return "\n".join(lines)


def make_plots(doc: dict, out_dir: str, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    main = [x for x in doc["runs"] if x["sweep"] == "main" and x["noise"] == NOISE_MAIN]
    strategies = list(dict.fromkeys(x["strategy"] for x in main))
    first = {s: next(x for x in main if x["strategy"] == s) for s in strategies}
    W = doc["settings"]["warmup_point"]
    # 1. clean share of the trained pairs per epoch
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for s in strategies:
        cf = np.array([x["clean_fraction_per_epoch"] for x in main if x["strategy"] == s])
        ax.plot(range(1, cf.shape[1] + 1), cf.mean(0), marker="o", ms=3, label=s)
    ax.axvline(W + 0.5, ls="--", color="gray", lw=1, label=f"warm-up point W={W}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean share of trained pairs")
    ax.set_title(f"{doc['data_name']}, {NOISE_MAIN:.0%} noisy captions, r = {RATE} (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}-clean-share.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    # 2. R@5 against training wall-clock and against trained samples
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for s in strategies:
        x = first[s]
        y = [r5(x, i) for i in range(len(x["i2t_R@5_per_epoch"]))]
        axes[0].plot(x["train_wall_s_cum"], y, marker="o", ms=3, label=s)
        axes[1].plot(x["samples_backpropagated_cum"], y, marker="o", ms=3, label=s)
    axes[0].set_xlabel("training wall-clock (s, evaluation excluded)")
    axes[1].set_xlabel("trained (backpropagated) samples")
    chance = 500 / doc["settings"]["val_images"]  # R@5 of a random ranking, in %
    for ax in axes:
        ax.axhline(chance, color="gray", lw=0.8, ls=":", label="chance")
        ax.set_ylabel("held-out R@5, mean of both directions (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{doc['data_name']}, {NOISE_MAIN:.0%} noise, seed {doc['settings']['seeds'][0]}", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}-r5-vs-wall.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    # 3. how well the score separates clean from noisy pairs, per epoch (ROC AUC)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for s in strategies:
        y = [np.nan if v is None else v for v in first[s]["score_auc_per_epoch"]]
        ax.plot(range(1, len(y) + 1), y, marker="o", ms=3, label=s)
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ROC AUC of the score, clean vs noisy")
    ax.set_title("does the current score still rank clean pairs above noisy ones?", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}-score-auc.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    # 4. trajectories: clean/noisy x trained-after-W/not
    traj = [s for s in strategies if s != "random"]
    fig, axes = plt.subplots(1, len(traj), figsize=(3.4 * len(traj), 3.3), squeeze=False)
    for ax, s in zip(axes[0], traj):
        x = first[s]
        tr = x["trajectories"]
        ep = range(1, x["epochs"] + 1)
        for key, c, ls in (
            ("clean_trained", "tab:green", "-"),
            ("clean_not_trained", "tab:green", ":"),
            ("noisy_trained", "tab:red", "-"),
            ("noisy_not_trained", "tab:red", ":"),
        ):
            y = [np.nan if v is None else v for v in tr[key]]
            ax.plot(ep, y, ls, color=c, marker="o", ms=2, label=f"{key.replace('_', ' ')} (n={tr['n_' + key]})")
        if s in WARMUP_STRATEGIES:
            ax.axvline(x["warmup_point"] + 0.5, ls="--", color="gray", lw=1)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=5.5)
    axes[0][0].set_ylabel("mean CLIPScore of the group")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}-trajectories.png"))
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    # 5. warm-up point sweep: clean share after W against W
    sweep = [x for x in doc["runs"] if x["noise"] == NOISE_MAIN and x["seed"] == doc["settings"]["seeds"][0]]
    sweep = [x for x in sweep if x["sweep"] in ("main", "warmup_point") and x["strategy"] in WARMUP_STRATEGIES]
    sweep = [x for x in sweep if x["warmup_train"] == doc["settings"]["warmup_train"]]
    if sweep:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for s in dict.fromkeys(x["strategy"] for x in sweep):
            pts = sorted((x["warmup_point"], x["clean_fraction_after_warmup"]) for x in sweep if x["strategy"] == s)
            ax.plot([p for p, _ in pts], [c for _, c in pts], marker="o", label=s)
        ax.axhline(1 - NOISE_MAIN, color="gray", lw=0.8, label="base rate")
        ax.set_xlabel("warm-up point W (epochs)")
        ax.set_ylabel("clean share trained after W")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{prefix}-warmup-point.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dissect-fast bench real", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=None, help="folder with captions.csv and images/ (e.g. flickr8k-dev)")
    p.add_argument("--data-name", default=None, help="how results name the data (default: the folder's name)")
    p.add_argument("--grid", default="cpu", choices=sorted(GRIDS))
    p.add_argument("--out", default=str(benchkit.RESULTS), help="folder for real-<tag>.json, table and plots")
    p.add_argument("--tag", default=None, help="default: <data name>-<device>-<grid>")
    p.add_argument("--work", default="runs/bench_real", help="shrunk images, shards and scratch run folders")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting new runs after this long")
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--plots-only", action="store_true", help="only (re)write table and plots from --json")
    p.add_argument("--json", default=None, help="with --plots-only: the results file")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    g = GRIDS[a.grid]
    if not a.plots_only and not a.data:
        p.error("--data is required (a folder with captions.csv and images/, e.g. ../shared/data/flickr8k-dev)")
    name = a.data_name or os.path.basename(os.path.normpath(a.data or "data"))
    tag = a.tag or f"{name}-{a.device}-{a.grid}"
    path = a.json or os.path.join(a.out, f"real-{tag}.json")
    prefix = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(a.out, exist_ok=True)
    if a.plots_only:
        doc = benchkit.load_json(path)
        if doc is None:
            p.error(f"--json {path}: no such file")
    else:
        runs = plan_runs(g)
        fields = {
            **benchkit.header("real", "bench_real.py", a.device, argv),
            "data_name": name,
            "settings": dict(g, rate=RATE, device=a.device),
            "planned_runs": len(runs),
            "note": "train wall-clock excludes evaluation; it is comparable only between runs with a similar "
            "load average (load_start/load_end per run); compute_units (forward = 1, backward = 2 per sample) "
            "is the load-free cost",
        }
        try:
            doc = benchkit.grid_doc(path, a.grid, fields)
        except ValueError as e:
            p.error(str(e))

        def run_one(r: dict) -> dict:
            train, val = ensure_data(a.data, a.work, g, r["noise"])
            return train_one(r, g, train, val, a.work, a.device)

        def describe(r: dict, row: dict) -> str:
            return (
                f"{r['sweep']} noise {r['noise']:.0%} {r['strategy']} W={r['warmup_point']} seed {r['seed']}: clean "
                f"share (>= W) {row['clean_fraction_after_warmup']:.3f} (base {row['base_clean_fraction']:.2f}), "
                f"R@5 {r5(row):.2f}, train {row['train_wall_s']:.0f} s, load {row['load_end']['loadavg_1_5_15'][0]}"
            )

        benchkit.run_grid(
            path, doc, runs, run_one, describe, max_minutes=a.max_minutes, max_runs=a.max_runs, tag="real"
        )
    benchkit.write_grid_report(doc, a.out, prefix, format_table, make_plots)
    print(f"[real] {len(doc['runs'])} runs in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
