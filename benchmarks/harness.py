"""What the benchmarks share (benchmarks/README.md, "The harness"): result files with provenance, step statistics,
the grid runner with its two data sources, and open_clip's trainer as the peer (``python -m benchmarks.harness
open_clip [open_clip_train flags]``). Importing it imports no torch."""

from __future__ import annotations

import csv
import datetime
import functools
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


# ------------------------------------------------------------------------------------------------ result files
def machine_load() -> dict:
    """The host's load average (1, 5, 15 min) and CPU count: wall-clock is comparable only at a similar load."""
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}


def header(benchmark: str, module: str, device=None, argv: list[str] | None = None, modules=()) -> dict:
    """``{"benchmark", commit, date, device, host, platform, versions, command, load}``; the command is ``python -m
    benchmarks.MODULE`` with ``argv`` (None: this process's flags)."""
    from dissect_fast.provenance import provenance

    command = shlex.join(["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])
    out = provenance(device, command=command, modules=tuple(modules))
    return {"benchmark": benchmark, **out, "load": machine_load()}


def result_path(kind: str, device_name: str, out: str | Path | None = None) -> Path:
    """``out``, else benchmarks/results/KIND-DEVICE-DATE.json (DEVICE: ``cpu`` or the GPU's name as a slug)."""
    tag = "cpu" if device_name.startswith("cpu") else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return Path(out) if out else RESULTS / f"{kind}-{tag}-{datetime.date.today().isoformat()}.json"


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON, written atomically; values JSON cannot hold are written as strings."""
    from dissect_fast.ioutil import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, fsync=False) as f:
        f.write(json.dumps(obj, indent=1, default=str) + "\n")
    return Path(path)


def step_stats(step_s: list[float], phases: list[dict], batch_size: int) -> dict:
    """A row's numbers from ``TimedSteps``: median, fastest and mean step, samples/s at the median step, per-phase
    medians and means (ms), and the data wait's share of the per-phase medians."""
    med, ms = statistics.median(step_s), lambda f, p: round(f(s[p] for s in phases) * 1e3, 4)
    ph_med = {p: ms(statistics.median, p) for p in phases[0]}
    return {
        "steps": len(step_s),
        "median_step_ms": round(med * 1e3, 4),
        "min_step_ms": round(min(step_s) * 1e3, 4),
        "mean_step_ms": round(statistics.fmean(step_s) * 1e3, 4),
        "samples_per_s": round(batch_size / med, 2),
        "phases_ms_per_step": ph_med,
        "phases_mean_ms_per_step": {p: ms(statistics.fmean, p) for p in phases[0]},
        "data_share": round(ph_med["data"] / max(1e-12, sum(ph_med.values())), 4),
    }


# ------------------------------------------------------------------------------------------------ grids
def grid_parser(prog: str, doc: str, grids: dict, default: str):
    """The flags every grid benchmark takes (its own are added by the caller)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=default, choices=sorted(grids), help="a GRIDS key; --data: quick, cpu")
    p.add_argument("--out", default=str(RESULTS), help="folder for the result JSON and its table")
    p.add_argument("--tag", default=None, help="the result's name: KIND-TAG.json")
    p.add_argument("--work", default=None, help="data and scratch run folders (default runs/bench_KIND)")
    p.add_argument("--device", default="cpu", help="the trainer's --device")
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting new runs after this long")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    return p


def grid_main(p, a, kind: str, tag: str, fields: dict, runs: list[dict], run_one, describe) -> int:
    """Run every planned run (a dict of settings: its identity) that ``OUT/KIND-TAG.json`` does not hold yet,
    rewriting it after each (a cut run keeps what finished; a rerun resumes); then its table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(a.out, f"{kind}-{tag}.json")
    doc = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    if doc.get("grid_name") not in (None, a.grid):
        p.error(f"{path} holds grid {doc['grid_name']!r}, not {a.grid!r}: pass another --tag")
    doc = {**doc, **fields, "grid_name": a.grid, "planned_runs": len(runs)}
    done, t0, n_new = {json.dumps({k: r.get(k) for k in runs[0]}, sort_keys=True) for r in doc["runs"]}, time.time(), 0
    for i, r in enumerate(x for x in runs if json.dumps(x, sort_keys=True) not in done):
        if (a.max_minutes is not None and time.time() - t0 > 60 * a.max_minutes) or n_new == a.max_runs:
            print(f"[{kind}] stopped by --max-minutes/--max-runs: {len(doc['runs'])}/{len(runs)} runs stored")
            break
        doc["runs"].append(run_one(r))
        doc["completed_runs"], n_new = len(doc["runs"]), n_new + 1
        write_json(path, doc)
        print(f"[{kind}] {len(done) + i + 1}/{len(runs)} {describe(r, doc['runs'][-1])}", flush=True)
    if doc["runs"]:
        Path(a.out, f"{path.stem}-table.md").write_text((text := grid_table(doc)) + "\n")
        print(text)
    print(f"[{kind}] {len(doc['runs'])} runs in {path}")
    return 0


def train_argv(r: dict, g: dict, train: str, val: str, logs: str, name: str, device: str, *extra: str) -> list[str]:
    """Trainer flags of one grid run: ``r`` (strategy, rate, seed, epochs, warm-up point and mode, model, optional
    momentum) over the grid ``g`` (batch size, lr, lr warm-up, optional ``val_every``), then ``extra``."""
    return [
        *("--train-data", train, "--val-data", val, "--model", r["model"], "--batch-size", str(g["batch_size"])),
        *("--epochs", str(r["epochs"]), "--lr", str(g["lr"]), "--warmup", str(g["lr_warmup"]), "--wd", "0.1"),
        *("--workers", "1", "--data-backend", "torch", "--logs", logs, "--name", name, "--seed", str(r["seed"])),
        *("--device", device, "--no-progress", "--no-plots", "--no-tensorboard", "--log-every-n-steps", "1000"),
        *("--val-every", str(g.get("val_every", r["epochs"])), "--save-frequency", "0"),
        *("--select-strategy", r["strategy"], "--select-rate", str(r["rate"])),
        *("--warmup-point", str(r["warmup_point"]), "--warmup-train", r["warmup_train"]),
        *("--momentum", str(r.get("momentum", 0.9)), *extra),
    ]


def train_run(argv: list[str]) -> tuple[list[dict], dict, float]:
    """One ``Trainer(cfg).fit()`` on data with clean flags (its run folder removed after): the epochs' metrics, per-id
    arrays (``score``, ``trained`` [epochs, ids], ``clean`` [ids]) and the wall-clock."""
    import logging

    from dissect_fast.config import config_from_args
    from dissect_fast.training.callbacks import Callback
    from dissect_fast.training.loop import Trainer

    cfg, per_epoch = config_from_args(argv), []
    run_dir = os.path.join(cfg.run.logs, cfg.run.name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale, unfinished attempt: no resume across bench runs

    class PerIdArrays(Callback):
        def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None:  # before the next epoch resets them
            per_epoch.append(ctx.diag.arrays())

    t = Trainer(cfg, callbacks=[PerIdArrays()])
    if t.diag.clean is None:
        raise RuntimeError(f"{cfg.data.train_data}: the shards carry no clean flags; the benchmark needs them")
    logging.getLogger("dissect_fast").setLevel(logging.WARNING)
    t0 = time.time()
    metrics, wall = t.fit(), time.time() - t0
    del t
    shutil.rmtree(run_dir, ignore_errors=True)
    arrays = {k: np.stack([a[k] for a in per_epoch]) for k in ("score", "trained")}
    return metrics, {**arrays, "trained": arrays["trained"] > 0, "clean": per_epoch[-1]["clean"].astype(bool)}, wall


def selection_row(r: dict, metrics: list[dict], arrays: dict, wall: float, load_start: dict) -> dict:
    """A grid's row: the settings ``r``, the trainer's epoch accounting, recall per epoch, and the mean score per epoch
    of clean / noisy pairs trained after the warm-up or not (trajectories); "after the warm-up": from the first
    selecting epoch (a strategy that never selects: every epoch)."""
    first = next((i for i, m in enumerate(metrics) if m["selecting"]), 0)
    trained = arrays["trained"][first:].any(axis=0)
    fwd, bwd = (np.cumsum([m[k] for m in metrics]).tolist() for k in ("samples_forwarded", "samples_trained"))
    after = [(m["clean_share_trained"], m["samples_trained"]) for m in metrics[first:]]
    row = {
        **r,
        "clean_fraction_per_epoch": [round(m["clean_share_trained"], 4) for m in metrics],
        "clean_fraction_after_warmup": round(sum(c * n for c, n in after) / max(1, sum(n for _, n in after)), 4),
        "first_selecting_epoch": first + 1,
        "base_clean_fraction": round(float(arrays["clean"].mean()), 4),
        "trajectories": {},
        "train_loss_per_epoch": [round(m["train_loss"], 4) for m in metrics],
        "train_wall_s_cum": np.round(np.cumsum([m["epoch_wall_s"] for m in metrics]), 2).tolist(),
        **{"samples_forwarded_cum": fwd, "samples_backpropagated_cum": bwd},
        **{"samples_forwarded": fwd[-1], "samples_backpropagated": bwd[-1], "compute_units": fwd[-1] + 2 * bwd[-1]},
        **{"wall_s": round(wall, 2), "load_start": load_start, "load_end": machine_load()},
    }  # compute_units: forward-sample equivalents, a forward 1, a backward ~2
    for label, cm in (("clean", arrays["clean"]), ("noisy", ~arrays["clean"])):
        for tl, m in (("trained", cm & trained), ("not_trained", cm & ~trained)):
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(arrays["score"][:, m], axis=1) if m.any() else np.full(len(metrics), np.nan)
            row["trajectories"][f"{label}_{tl}"] = [round(float(v), 3) if np.isfinite(v) else None for v in mean]
            row["trajectories"][f"n_{label}_{tl}"] = int(m.sum())
    for d, key in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
        for k in ("R@1", "R@5"):
            row[f"{d}_{k}_per_epoch"] = [m.get(f"val/{key}_{k}") for m in metrics]
            row[f"{d}_{k}"] = row[f"{d}_{k}_per_epoch"][-1]
    return row


#: the table's columns (those docs/findings.md quotes) and their formats
TABLE = {"sweep": "", "noise": ".0%", "strategy": "", "rate": "", "warmup_point": "", "seed": "", "i2t_R@1": ".1f"}
TABLE |= {"t2i_R@1": ".1f", "i2t_R@5": ".1f", "t2i_R@5": ".1f", "clean_fraction_after_warmup": ".3f"}
TABLE |= {"base_clean_fraction": ".2f", "compute_units": "d", "samples_forwarded": "d", "wall_s": ".0f"}


def grid_table(doc: dict) -> str:
    """A markdown line per run, in the order they ran; ``-``: not measured."""
    lines = ["| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE)]
    for row in doc["runs"]:
        cells = ("-" if row.get(k) is None else format(row[k], f) for k, f in TABLE.items())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ dataset adapters
def synthetic_data(work: str, noise: float, num_train: int, num_val: int, seed: int = 0) -> tuple[str, str]:
    """(train, val) shards of the synthetic set with ``noise`` of the captions permuted (clean flags), made once."""
    from dissect_fast.tools.synthetic import make_synthetic

    d = os.path.join(work, f"data-n{num_train}-noise{round(100 * noise)}")
    if not os.path.isfile(os.path.join(d, "train", "index.json")):
        make_synthetic(
            d, num_train, num_val, noise, 32, seed, samples_per_shard=max(50, num_train // 4), progress=False
        )
    return os.path.join(d, "train"), os.path.join(d, "val")


def train_images(images: str, candidates: list[str], val: list[str], n: int) -> list[str]:
    """The first ``n`` candidates whose bytes are no validation image's (the split is by image, also when one photo
    is stored under two names)."""
    from dissect_fast.tools.csv_shards import content_key

    key = lambda name: content_key(Path(images, name).read_bytes())  # noqa: E731
    held_out = {key(v) for v in val}
    out = [c for c in candidates if key(c) not in held_out][:n]
    if len(out) < n:
        raise ValueError(f"--data {images}: {len(out)} training images differ from the validation ones, need {n}")
    return out


def _csv_shards(work: str, name: str, rows: list, images: str, **kw) -> str:
    from dissect_fast.tools.csv_shards import csv_to_shards

    out = os.path.join(work, name)
    if not os.path.isfile(os.path.join(out, "train", "index.json")):
        with open(out + ".csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("image", "caption"), *rows])
        csv_to_shards(out + ".csv", images, out, progress=False, **kw)
    return os.path.join(out, "train")


def csv_folder_data(folder: str, work: str, g: dict, noise: float) -> tuple[str, str]:
    """(train, val) shards from a CSV-layout folder: the last ``val_images`` by name held out (first caption each), the
    first ``train_images`` others (by content) give ``captions_per_image`` pairs each, ``noise`` of them moved to
    another image (clean flags); images shrunk once to ``image_px`` on their shorter side."""
    from dataclasses import replace

    from PIL import Image

    from dissect_fast.data.shards import DatasetIndex

    if not os.path.isfile(path := os.path.join(folder, "captions.csv")):
        raise FileNotFoundError(f"--data {folder}: no captions.csv (the CC3M/CyCLIP layout: captions.csv + images/)")
    by: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by.setdefault(row["image"], []).append(row["caption"])
    names, n_tr, n_va, c, px = sorted(by), g["train_images"], g["val_images"], g["captions_per_image"], g["image_px"]
    if n_tr + n_va > len(names):
        raise ValueError(f"--data {folder}: {len(names)} images, the grid needs {n_tr} + {n_va}")
    val = names[-n_va:]
    train = train_images(os.path.join(folder, "images"), names[:-n_va], val, n_tr)
    images = os.path.join(work, f"images-{px}px")
    os.makedirs(images, exist_ok=True)
    for n in (n for n in train + val if not os.path.isfile(os.path.join(images, n))):
        with Image.open(os.path.join(folder, "images", n)) as im:
            s = px / min(im.size)
            im = im.convert("RGB").resize((max(px, round(im.width * s)), max(px, round(im.height * s))), 3)
            im.save(os.path.join(images, n) + ".tmp", format="JPEG", quality=90)
        os.replace(os.path.join(images, n) + ".tmp", os.path.join(images, n))
    tag, rows = f"tr{n_tr}x{c}-va{n_va}-{px}px", [(n, cap) for n in train for cap in by[n][:c]]
    val_dir = _csv_shards(work, f"val-{tag}", [(n, by[n][0]) for n in val], images, samples_per_shard=1000)
    name, per_shard = f"train-{tag}-noise{round(100 * noise)}", max(100, len(rows) // 4)
    split = _csv_shards(work, name, rows, images, noise=noise, seed=0, samples_per_shard=per_shard)
    index = DatasetIndex.load(split)
    if index.clean_file is None:  # the shards tool records flags only for noisy sets; here every pair is clean
        np.save(os.path.join(split, "clean.npy"), np.ones(index.num_ids, dtype=np.uint8))
        replace(index, clean_file="clean.npy").save(split)
    return split, val_dir


# ------------------------------------------------------------------------------------------------ open_clip peer
def patch_open_clip_data() -> None:
    """So open_clip reads our shards as its own: our model configs registered; its tar expander given only the fields
    it reads (our binary ``id`` would be parsed as text) and, on webdataset >= 1.0, no end-of-file sample."""
    import open_clip
    import open_clip_train.data as oc_data
    import webdataset
    from webdataset import tariterators

    open_clip.add_model_config(str(ROOT / "dissect_fast" / "model_configs"))
    kw = {"eof_value": None} if int(webdataset.__version__.split(".")[0]) >= 1 else {}
    oc_data.tar_file_expander = functools.partial(tariterators.tar_file_expander, select_files=_open_clip_field, **kw)


def _open_clip_field(fname: str) -> bool:
    return fname.rsplit(".", 1)[-1].lower() in {"jpg", "jpeg", "png", "webp", "txt"}


def run_open_clip(flags: list[str], warmup_steps: int, batch_size: int) -> dict:
    """open_clip's trainer in a subprocess with ``flags`` (one log line per step): its step time is the median of the
    "Batch (t)" lines (host wall-clock, 3 decimals) after ``warmup_steps``. A row, or ``{"skipped": why}``."""
    try:
        import open_clip_train  # noqa: F401
        import pandas  # noqa: F401  (open_clip_train imports it)
    except ImportError as e:
        return {"skipped": f"open_clip_train cannot run here: {e}"}
    argv = [sys.executable, "-m", "benchmarks.harness", "open_clip", *flags, "--log-every-n-steps", "1"]
    t0 = time.perf_counter()
    p = subprocess.run([*argv, "--save-frequency", "0", "--report-to", ""], capture_output=True, text=True, env=ENV)
    wall, log = time.perf_counter() - t0, p.stdout + p.stderr
    found = [(float(d), float(b)) for d, b in re.findall(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),", log)]
    if p.returncode != 0 or len(found) <= warmup_steps:
        tail = " | ".join(log.strip().splitlines()[-3:])
        return {"skipped": f"open_clip trainer failed (exit {p.returncode}, {len(found)} step lines): {tail}"}
    timed = found[warmup_steps:]  # its first line times the first batch alone: inside the warm-up
    step_s = statistics.median(b for _, b in timed)
    return {
        **{"steps": len(timed), "median_step_ms": round(step_s * 1e3, 4)},
        **{"samples_per_s": round(batch_size / step_s, 2), "wall_s_incl_startup": round(wall, 2)},
        "data_wait_ms_per_step": round(statistics.median(d for d, _ in timed) * 1e3, 4),
        **{"timing": "open_clip log, Batch (t) per step", "command": shlex.join(argv[1:])},
    }


if __name__ == "__main__":
    if sys.argv[1:2] != ["open_clip"]:
        raise SystemExit("usage: python -m benchmarks.harness open_clip [open_clip_train flags]")
    patch_open_clip_data()
    from open_clip_train.main import main as oc_main

    oc_main(sys.argv[2:])
