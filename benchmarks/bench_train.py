"""Wall-clock of DISSect against full-data training, side by side, with a per-phase breakdown (``TimedSteps``): every
configuration trains the same model on the same shards in this process; benchmarks/README.md has the details.

    python -m benchmarks.bench_train --device cpu --tiny                # ~1 minute on a 2-core CPU
    python -m benchmarks.bench_train --train-data SHARDS --model ViT-B-32 --batch-size 1024 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
from typing import Any

import torch

from benchmarks import harness

CPU_TARGET = {"config": "dissect-r0.3", "max_ratio": 0.75}
GPU_TARGETS = {"dissect-r0.2": 0.58, "cheapest_overlap>=0.9": 0.45, "full_vs_open_clip": 1.3, "data_share": 0.05}
# flag: (default, --tiny default); tiny-vit, not micro-vit: in micro-vit the optimizer's fixed cost dominates a step
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "model": ("ViT-B-32", "tiny-vit"),
    "batch-size": (1024, 64),
    "steps": (50, 2),
    "warmup-steps": (15, 2),
    "rounds": (1, 5),
    "num-train": (98304, 4096),
    "image-size": (224, 32),
    "workers": (8, 1),
    "score-resolutions": ("160,128,96", "16"),
    "score-patch-dropouts": ("0.25,0.5,0.75", "0.5"),
    "overlap-steps": (300, 8),
    "overlap-pool": (8, 4),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--tiny", action="store_true", help="tiny synthetic data and model (tiny-vit): the CPU mode")
    add("--train-data", default=None, help="shards with index.json (default: synthetic data in --data-cache)")
    cache = os.path.join(tempfile.gettempdir(), "dissect_bench_data")
    add("--data-cache", default=cache, help="folder of the synthetic shards, written once and reused")
    for flag, (full, tiny) in DEFAULTS.items():
        add(f"--{flag}", type=type(full), default=None, help=f"default {full} (--tiny: {tiny})")
    add("--epoch-samples", type=int, default=None, help="samples per epoch-equivalent (default: the training set)")
    backends = ["auto", "torch", "gpu", "dali", "synthetic"]
    add("--data-backend", default="auto", choices=backends, help="the trainer's loader (synthetic: no shards, no peer)")
    add("--precision", default="auto", help="as the trainer's --precision")
    add("--compile", action="store_true", help="torch.compile the forwards (GPU runs should)")
    add("--configs", default=None, help="comma list of configurations to run (full always runs)")
    add("--no-peer", action="store_true", help="skip open_clip's trainer")
    add("--no-overlap", action="store_true", help="skip the agreement run")
    add("--out", default=None, help="JSON path (default benchmarks/results/train-<device>-<date>.json)")
    add("--no-save", action="store_true", help="print only (tests)")
    a = p.parse_args(argv)
    for flag, defaults in DEFAULTS.items():
        if getattr(a, key := flag.replace("-", "_")) is None:
            setattr(a, key, defaults[a.tiny])
    a.score_resolutions = [int(x) for x in str(a.score_resolutions).split(",") if x]
    a.score_patch_dropouts = [float(x) for x in str(a.score_patch_dropouts).split(",") if x]
    if a.steps < 2 or a.rounds < 1:
        p.error("--steps must be >= 2 and --rounds >= 1")
    return a


def configurations(a, device: torch.device) -> list[tuple[str, dict]]:
    """(name, settings) of every configuration, full data first; settings: ``SelectConfig`` fields (``select``) and
    the ``ModelConfig`` fields it changes (``model``)."""

    def dissect(rate: float = 0.2, backend: str = "auto", **model) -> dict:
        select = {"strategy": "dissect-warmup", "warmup_point": 1, "rate": rate, "backend": backend}
        return {"select": select, "model": model}

    rows = [("full", {"select": {"strategy": "full"}, "model": {}})]
    rows += [(f"dissect-r{r}", dissect(r)) for r in (0.2, 0.3, 0.5)]
    rows += [("random-r0.2", {"select": {"strategy": "random", "rate": 0.2}, "model": {}})]
    rows += [("dissect-r0.2-torch-select", dissect(backend="torch"))]
    rows += [(f"dissect-r0.2-res{R}", dissect(score_resolution=R)) for R in a.score_resolutions]
    rows += [(f"dissect-r0.2-pd{P}", dissect(score_patch_dropout=P)) for P in a.score_patch_dropouts]
    if device.type == "cuda" and a.compile:
        rows += [("dissect-r0.2-cudagraphs", dissect(score_cudagraphs=True))]
    if a.configs:
        keep = set(a.configs.split(",")) | {"full"}
        if unknown := keep - {n for n, _ in rows} - {"open_clip"}:
            raise SystemExit(f"--configs: unknown configuration(s) {sorted(unknown)}; known: {[n for n, _ in rows]}")
        rows = [r for r in rows if r[0] in keep]
    return rows


def _write_part(job: tuple) -> None:
    from dissect_fast.tools.synthetic import write_split

    write_split(*job, progress=False)


def prepare_data(a) -> str:
    """--train-data, or synthetic shards written once per --data-cache: parts with disjoint id ranges written by
    parallel processes, merged under one dataset index."""
    import multiprocessing

    from dissect_fast.data.shards import DatasetIndex, ShardInfo

    if a.train_data or a.data_backend == "synthetic":  # synthetic: random batches made on the device
        return a.train_data or ""
    root = os.path.join(a.data_cache, f"synth-{a.num_train}-{a.image_size}", "train")
    if os.path.isfile(os.path.join(root, "index.json")):
        return root
    parts = max(1, min(os.cpu_count() or 1, a.num_train // 4096))
    sizes = [a.num_train // parts + (i < a.num_train % parts) for i in range(parts)]
    per_shard = max(64, min(1024, a.num_train // (16 * parts)))
    print(f"writing {a.num_train} synthetic samples at {a.image_size} px to {root} ({parts} processes)", flush=True)
    jobs = [
        (os.path.join(root, f"part-{i:02d}"), n, sum(sizes[:i]), 0.4, a.image_size, 1000 + i, per_shard)
        for i, n in enumerate(sizes)
    ]
    if len(jobs) == 1:
        _write_part(jobs[0])
    else:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            pool.map(_write_part, jobs)
    idx = [DatasetIndex.load(j[0]) for j in jobs]
    shards = [ShardInfo(os.path.relpath(os.path.join(ix.root, s.path), root), s.count) for ix in idx for s in ix.shards]
    meta: dict[str, Any] = {"context_length": idx[0].context_length, "has_tokens": idx[0].has_tokens}
    DatasetIndex(num_samples=a.num_train, id_min=0, id_max=a.num_train - 1, shards=shards, **meta).save(root)
    return root


def train_config(a, data: str, logs: str, name: str, settings: dict, compile: bool | None = None, steps=None):
    """One configuration's TrainConfig. ``steps``: the fit's length; its epoch is one step longer, so the fit ends
    inside the epoch (no evaluation, no checkpoint) and its one log step (a host sync) is its last."""
    from dissect_fast.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SelectConfig, TrainConfig

    n = None if steps is None else (steps + 1) * a.batch_size
    d = {"batch_size": a.batch_size, "workers": a.workers, "data_backend": a.data_backend}
    m: dict[str, Any] = {"model": a.model, "precision": a.precision, "device": a.device}
    m["compile"] = a.compile if compile is None else compile
    r: dict[str, Any] = {"progress": False, "tensorboard": False, "plots": False}
    r["log_every_n_steps"] = steps or RunConfig.log_every_n_steps
    return TrainConfig(
        data=DataConfig(train_data=data, train_num_samples=n, **d),
        model=ModelConfig(**m, **settings.get("model", {})),
        optim=OptimConfig(epochs=2, lr=1e-4, warmup=10),
        select=SelectConfig(**settings["select"]),
        run=RunConfig(logs=logs, name=name, **r),
    )


def _seed_history(ctx) -> None:
    """A filled history (random scores): the delta top-k of the timed steps sees realistic keys."""
    if ctx.strategy.history is not None:
        g = torch.Generator(device=ctx.device).manual_seed(0)
        h = ctx.strategy.history.values
        h.copy_(torch.rand(h.shape, device=ctx.device, generator=g) * 40)


def run_config(a, data: str, name: str, settings: dict, logs: str, dataset_samples: int | None) -> dict:
    """One configuration's fit with its ``TimedSteps``: its row."""
    import gc

    from dissect_fast.training.callbacks import Callback
    from dissect_fast.training.loop import Trainer
    from dissect_fast.training.timing import TimedSteps

    n = a.warmup_steps + a.steps * a.rounds
    restarts = dataset_samples is not None and n > dataset_samples // a.batch_size
    if restarts:
        print(f"[bench_train] warning: {n} steps exceed one pass over the data: use more data", file=sys.stderr)
    seed = type("SeedHistory", (Callback,), {"on_fit_start": lambda self, ctx: _seed_history(ctx)})()
    tm = TimedSteps(a.warmup_steps, a.steps, a.rounds)
    t = Trainer(train_config(a, data, logs, name, settings, steps=n), [seed, tm])
    metrics = t.fit(max_steps=n, start_epoch=1)
    n_epoch = a.epoch_samples or dataset_samples or t.num_samples
    loss = metrics[-1]["train_loss"] if metrics else float("nan")
    row = {
        **{"config": name, "settings": settings, "k": t.k, "batch_size": a.batch_size, "rounds": a.rounds},
        **harness.step_stats(tm.step_s, tm.phases, a.batch_size),
        "epoch_samples": n_epoch,
        "epoch_s": round(statistics.median(tm.step_s) * math.ceil(n_epoch / a.batch_size), 3),
        "wall_s": round(tm.wall_s, 4),
        "phases_sum_s": round(sum(sum(ph.values()) for ph in tm.phases), 4),
        "loader_restarts_in_timed_steps": restarts,
        "final_loss": round(loss, 4) if math.isfinite(loss) else None,
        "timing": "cuda events" if t.device.type == "cuda" else "perf_counter",
    }
    cuda = t.device.type == "cuda"
    del t
    torch._dynamo.reset()  # drop compiled graphs that still reference the model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run_configs(a, data: str, configs: list[tuple[str, dict]], logs: str) -> list[dict]:
    """Time every configuration, one after the other."""
    from dissect_fast.data.shards import resolve_data

    n = None
    if a.data_backend != "synthetic":
        index = resolve_data(data, "--train-data")[1]
        n = index.num_samples if index is not None else None
    rows, out = [], sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the trainers' output; progress lines go to ``out``
        for name, settings in configs:
            print(f"[bench_train] {name} ...", file=out, flush=True)
            rows.append(run_config(a, data, name, settings, logs, n))
    return rows


def measure_overlap(t, a) -> dict:
    """Top-k agreement of every cheap scorer with full-resolution scoring, for the clipscore key and the delta key.
    ``t``: an eager Trainer with a history strategy (``dissect-momentum``: the history fills as it trains on a pool
    of ``a.overlap_pool`` batches for ``a.overlap_steps`` steps); every step each scorer scores the same batch with
    the same weights, ranked by the product's selection op without its history update. Delta overlaps count only
    steps where every sample has a history value."""
    from dissect_fast.model import ScoringPass
    from dissect_fast.selection.strategies import score_and_select

    t.model.train()
    pool: list = []
    while len(pool) < a.overlap_pool:
        before = len(pool)
        pool += [b for b, _ in zip(t.train_loader, range(a.overlap_pool - len(pool)))]
        if len(pool) == before:
            raise RuntimeError("the training loader yielded no batch: too few samples for the batch size")
    cheap = {f"dissect-r0.2-res{R}": {"resolution": R} for R in a.score_resolutions}
    cheap.update({f"dissect-r0.2-pd{P}": {"patch_dropout": P} for P in a.score_patch_dropouts})
    scorers = {n: ScoringPass(t.model, t.precision, t.device, False, **kw) for n, kw in cheap.items()}
    hist, k, dev = t.strategy.history.values, t.k, t.device
    sums = {n: torch.zeros(2, device=dev) for n in cheap}  # [score-key, delta-key] overlap sums
    n_delta, zeros = torch.zeros((), device=dev), torch.zeros((), device=dev)

    def top(feats, ids, key):  # the selection op without its history update: (index, score, delta)
        f, g = feats
        return score_and_select(f, g, ids, hist, k, momentum=None, key=key, scale=100.0, backend="torch")

    for step in range(a.overlap_steps):
        images, tokens, ids = pool[step % len(pool)]
        all_seen = (~torch.isnan(hist[ids])).all().float()
        feats = {"full": t.forwards.score(images, tokens), **{n: sc(images, tokens) for n, sc in scorers.items()}}
        for n in sums:
            for j, key in enumerate(("score", "delta")):
                m = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
                m[top(feats["full"], ids, key)[0]] = True
                sums[n][j] += m[top(feats[n], ids, key)[0]].sum().float() / k * (all_seen if j else 1.0)
        zeros += (top(feats["full"], ids, "score")[1] == 0).float().mean()
        n_delta += all_seen
        t.train_step(0, images, tokens, ids)  # full-resolution DISSect trains the shared weights
    nd, steps = int(n_delta), a.overlap_steps

    def shares(v: torch.Tensor) -> dict:
        return {"score_key": round(float(v[0]) / steps, 4), "delta_key": round(float(v[1]) / nd, 4) if nd else None}

    return {
        "steps": steps,
        "pool_batches": a.overlap_pool,
        "k": k,
        "delta_steps": nd,
        "strategy_trained": "dissect-momentum (full-resolution scoring)",
        "zero_score_share": round(float(zeros) / steps, 4),
        "overlap": {n: shares(v) for n, v in sums.items()},
    }


def run_peer(a, data: str, device: torch.device, logs: str) -> dict:
    """open_clip_train.main on the same shards, model, batch, precision and workers."""
    from dissect_fast.data.shards import resolve_data

    precision = a.precision if a.precision != "auto" else ("amp_bf16" if device.type == "cuda" else "fp32")
    n = a.warmup_steps + a.steps * a.rounds
    flags = ["--train-data", "::".join(resolve_data(data, "--train-data")[0]), "--logs", logs, "--model", a.model]
    flags += f"--dataset-type webdataset --train-num-samples {n * a.batch_size} --batch-size {a.batch_size}".split()
    flags += f"--precision {precision} --workers {a.workers} --epochs 1 --lr 1e-4 --warmup 10 --seed 0".split()
    flags += ["--name", f"peer-{os.getpid()}", "--device", device.type, *(["--torchcompile"] if a.compile else [])]
    return {
        "config": "open_clip",
        "batch_size": a.batch_size,
        **harness.run_open_clip(flags, a.warmup_steps, a.batch_size),
    }


def summarise(rows: list[dict], overlap: dict | None) -> None:
    full = next(r for r in rows if r["config"] == "full")
    base_score = next((r["phases_ms_per_step"]["score"] for r in rows if r["config"] == "dissect-r0.2"), None)
    for r in (r for r in rows if "median_step_ms" in r):
        r["ratio_to_full"] = round(r["median_step_ms"] / full["median_step_ms"], 4)
        if "min_step_ms" in r:  # the least-disturbed step: a robust estimate on a shared, loaded CPU
            r["ratio_to_full_min"] = round(r["min_step_ms"] / full["min_step_ms"], 4)
        ph = r.get("phases_ms_per_step")
        if ph and base_score and r["config"].startswith("dissect-r0.2-") and ph["score"] > 0:
            r["score_speedup"] = round(base_score / ph["score"], 3)
        if overlap and r["config"] in overlap["overlap"]:
            r["topk_overlap"] = overlap["overlap"][r["config"]]
    peer = next((r for r in rows if r["config"] == "open_clip" and "samples_per_s" in r), None)
    if peer:
        full["vs_open_clip_samples_per_s"] = round(full["samples_per_s"] / peer["samples_per_s"], 3)


COLUMNS = {"k": "d", "samples_per_s": ".0f", "median_step_ms": ".2f", "epoch_s": ".1f", "ratio_to_full": ".3f"}


def markdown_table(rows: list[dict]) -> str:
    from dissect_fast.training.timing import PHASES

    head = [
        "config",
        "k",
        "samples/s",
        "ms/step",
        "epoch s",
        "x full",
        *(f"{p} ms" for p in PHASES),
        "score x",
        "top-k",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['config']} |{' |' * (len(head) - 2)} skipped: {r['skipped'][:80].replace('|', '/')} |")
            continue
        ph, ov = r.get("phases_ms_per_step") or {}, r.get("topk_overlap")
        dk = "" if not ov else "n/a" if ov["delta_key"] is None else f"{ov['delta_key']:.3f}"
        cells = [r["config"], *(format(r[k], f) if k in r else "" for k, f in COLUMNS.items())]
        cells += [*(f"{ph[p]:.2f}" if p in ph else "" for p in PHASES)]
        cells += [f"{r['score_speedup']:.2f}" if "score_speedup" in r else ""]
        lines.append("| " + " | ".join([*cells, f"{ov['score_key']:.3f} (score) / {dk} (delta)" if ov else ""]) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict], device: torch.device) -> str:
    by = {r["config"]: r for r in rows if "ratio_to_full" in r}
    if device.type != "cuda":
        if (r := by.get(CPU_TARGET["config"])) is None:
            return ""
        met = "met" if r["ratio_to_full"] <= CPU_TARGET["max_ratio"] else "NOT met"
        return (
            f"CPU target: {CPU_TARGET['config']} costs {r['ratio_to_full']:.3f} x full data by median step (target "
            f"<= {CPU_TARGET['max_ratio']}): {met}; by fastest step {r.get('ratio_to_full_min', float('nan')):.3f} x."
        )
    out, t = [], GPU_TARGETS
    if "dissect-r0.2" in by:
        out.append(f"dissect-r0.2: {by['dissect-r0.2']['ratio_to_full']:.3f} x full (target <= {t['dissect-r0.2']})")
    if cheap := [r for r in by.values() if r.get("topk_overlap") and (r["topk_overlap"]["delta_key"] or 0) >= 0.9]:
        b = min(cheap, key=lambda r: r["ratio_to_full"])
        out.append(
            f"cheapest scoring with delta top-k overlap >= 0.9: {b['config']} at {b['ratio_to_full']:.3f} x full"
            f" (target <= {t['cheapest_overlap>=0.9']})"
        )
    if "vs_open_clip_samples_per_s" in (full := by.get("full", {})):
        x = full["vs_open_clip_samples_per_s"]
        out.append(f"full data vs open_clip trainer: {x:.2f} x samples/s (target >= {t['full_vs_open_clip']})")
    if shares := [r["data_share"] for r in by.values() if "data_share" in r]:
        out.append(f"max data-wait share: {max(shares):.3f} (target < {t['data_share']})")
    return "; ".join(out) + ("." if out else "")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import logging
    import shutil

    from dissect_fast.model import resolve_device
    from dissect_fast.training.loop import Trainer

    logging.getLogger("dissect_fast").setLevel(logging.WARNING)
    device, data = resolve_device(a.device), prepare_data(a)
    logs, overlap = tempfile.mkdtemp(prefix="bench_train_logs_"), None
    try:
        rows = run_configs(a, data, configurations(a, device), logs)
        if not a.no_overlap and (a.score_resolutions or a.score_patch_dropouts):
            print("[bench_train] top-k agreement of cheap scoring ...", flush=True)
            with contextlib.redirect_stdout(sys.stderr):
                settings = {"select": {"strategy": "dissect-momentum", "rate": 0.2}}
                overlap = measure_overlap(Trainer(train_config(a, data, logs, "overlap", settings, False)), a)
        if not a.no_peer and data and (not a.configs or "open_clip" in a.configs.split(",")):
            print("[bench_train] open_clip trainer (peer) ...", flush=True)
            rows.append(run_peer(a, data, device, logs))
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    summarise(rows, overlap)
    result = {
        **harness.header("train", "bench_train", device, argv),
        **{k: getattr(a, k) for k in ("model", "batch_size", "steps", "rounds", "warmup_steps", "precision")},
        **{k: getattr(a, k) for k in ("compile", "workers", "tiny")},
        "data": data,
        "rows": rows,
        "overlap": overlap,
        "verdict": verdict(rows, device),
    }
    print(markdown_table(rows))
    if r03 := next((r for r in rows if r["config"] == "dissect-r0.3"), None):
        print(f"ratio dissect-r0.3 / full: {r03['ratio_to_full']:.3f}")
    print(result["verdict"])
    if not a.no_save:
        print(f"wrote {harness.write_json(harness.result_path('train', result['device'], a.out), result)}")
    main.last_result = result  # type: ignore[attr-defined]  # for tests and callers that import the module
    return 0


if __name__ == "__main__":
    sys.exit(main())
