"""Wall-clock of DISSect against full-data training, side by side, with a per-phase breakdown.

    python benchmarks/bench_train.py --device cpu --tiny                 # ~1 minute on a 2-core CPU
    python benchmarks/bench_train.py --train-data SHARDS --model ViT-B-32 --batch-size 1024 --compile
    dissect-fast bench train [same flags]
    python benchmarks/bench_train.py --report                           # README table + chart from results/

Every configuration trains the same model on the same shards in this one process, one after the other, through
the loop users run: a ``Trainer`` built from a ``TrainConfig`` (``train_config``), then ``Trainer.fit`` limited to
``--warmup-steps`` untimed steps (compilation, autotuning, loader start-up) plus ``--rounds`` x ``--steps`` timed
steps (``Trainer.max_steps``). A step is one iteration of the fit's loop: the wait for the batch, the trainer's LR
schedule, ``train_step`` and the loop's bookkeeping. A ``dissect_fast.training.timing.TimedSteps`` callback attaches a
``PhaseTimer`` to the timed steps only and splits each into phases (data wait, scoring forward, selection, train
forward + backward, optimizer, sync, other) with CUDA events on GPU and perf_counter on CPU; row numbers come from
``benchkit.step_stats``. The fit starts in epoch 1 (``trainer.start_epoch = 1``), the epoch after the warm-up
point of ``dissect-warmup --warmup-point 1``: DISSect rows time the steady state (scoring pass + delta top-k every
step) with a history buffer filled with random scores. The epoch is one step longer than the fit
(``--train-num-samples``), so no epoch end (evaluation, checkpoint) falls into the run, and the loop's one host
sync (its log step) comes after the last timed step. With ``--rounds`` > 1 each configuration's fit runs in its
own thread and waits for its turn before each timed block, so the blocks of all configurations interleave
round-robin (a drift in machine load hits them alike); one thread runs at a time.

Measured semantics since the benchmark drives ``fit`` (the stored ``results/train-cpu-2026-11-23.json``
predates this: it called ``train_step`` in a loop of its own): the learning rate is the trainer's schedule (10
warm-up steps, then cosine over the configured run) instead of a fixed cosine over 10,000 steps; the loop's
per-step bookkeeping is inside the timed step (after the optimizer step: the non-finite loss mask, counters,
callbacks, in ``other``; the LR scheduler, set before the scoring pass, in ``score``); ``final_loss`` is the
fit's training loss (its mean over the run's steps), no longer the last step's; each row records its config
fields (``settings``) instead of command-line flags (``flags``).

open_clip's own trainer runs as a subprocess on the same shards, model and batch; its per-step "Batch (t)" log
lines (``--log-every-n-steps 1``) after the same warm-up give its step time.

Cheap scoring: rows ``dissect-r0.2-res{R}`` / ``-pd{P}`` score at resolution R / with patch dropout
P. Their agreement with full-resolution scoring is measured in a separate, untimed run: a model
trained with full-resolution DISSect (``dissect-momentum``, so the history fills) over a pool of
cached batches, every cheap scorer scoring the same batch with the same weights each step; the
overlap |top-k(full) & top-k(cheap)| / k is reported for the CLIPScore key and for the DISSect
delta key (steps where every sample in the batch has a history value). The same run measures
``--score-precision``: the overlap of fp32 scoring (no autocast, as the reference scores) with bf16-autocast
scoring (``score_precision_fp32_vs_bf16``).
Results: benchmarks/results/train-<device>-<date>.json (``benchkit.header``: device, versions, commit, command,
date; then the rows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # benchmarks/ is not a package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchkit  # noqa: E402

ROOT = benchkit.ROOT
RESULTS = benchkit.RESULTS
README = ROOT / "benchmarks" / "README.md"
CPU_TARGET = {"config": "dissect-r0.3", "max_ratio": 0.75}
GPU_TARGETS = {"dissect-r0.2": 0.58, "cheapest_overlap>=0.9": 0.45, "full_vs_open_clip": 1.3, "data_share": 0.05}
# tiny-vit, not micro-vit: micro-vit is so small that per-op overheads and the optimizer's fixed cost (its
# vocabulary embedding is most of its parameters) dominate a step, which no real model resembles.
TINY = {
    "model": "tiny-vit",
    "batch_size": 64,
    "steps": 2,
    "warmup_steps": 2,
    "rounds": 5,
    "num_train": 4096,
    "image_size": 32,
    "score_resolutions": "16",
    "score_patch_dropouts": "0.5",
    "overlap_steps": 8,
    "overlap_pool": 4,
    "workers": 1,
}


# ----------------------------------------------------------------------------------------- set-up
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dissect-fast bench train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tiny", action="store_true", help="tiny synthetic data and model (tiny-vit): the CPU mode")
    p.add_argument(
        "--train-data", default=None, help="shard dir with index.json (default: synthetic data written to --data-cache)"
    )
    p.add_argument(
        "--data-cache",
        default=os.path.join(tempfile.gettempdir(), "dissect_bench_data"),
        help="where synthetic data is written once and reused",
    )
    p.add_argument("--num-train", type=int, default=None, help="synthetic samples (default 98304; tiny 4096)")
    p.add_argument("--image-size", type=int, default=None, help="synthetic image side (default 224; tiny 32)")
    p.add_argument("--model", default=None, help="default ViT-B-32 (tiny: tiny-vit)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default 1024; tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per block (default 50; tiny 2)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed blocks of --steps per configuration, "
        "interleaved round-robin when > 1 (default 1; tiny 5: a shared CPU's load drifts)",
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 15; tiny 2)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 8; tiny 1)")
    p.add_argument(
        "--data-backend", default="auto", choices=["auto", "torch", "dali"], help="loader (auto: DALI when it imports)"
    )
    p.add_argument("--precision", default="auto", help="as the trainer's --precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the forwards (GPU runs should)")
    p.add_argument("--configs", default=None, help="comma list of configuration names to run (full always runs)")
    p.add_argument(
        "--score-resolutions",
        default=None,
        help="comma list of cheap scoring resolutions (default 160,128,96; tiny 16)",
    )
    p.add_argument("--score-patch-dropouts", default=None, help="comma list (default 0.25,0.5,0.75; tiny 0.5)")
    p.add_argument("--overlap-steps", type=int, default=None, help="steps of the agreement run (default 300)")
    p.add_argument("--overlap-pool", type=int, default=None, help="cached batches it cycles over (default 8)")
    p.add_argument(
        "--epoch-samples",
        type=int,
        default=None,
        help="samples per epoch for the epoch-equivalent wall-clock (default: the training set's size)",
    )
    p.add_argument("--no-peer", action="store_true", help="skip open_clip's trainer")
    p.add_argument("--no-overlap", action="store_true", help="skip the agreement run")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train-<device>-<date>.json)")
    p.add_argument("--no-save", action="store_true", help="print only (tests)")
    p.add_argument(
        "--report",
        action="store_true",
        help="regenerate the table and chart in benchmarks/README.md from the stored results and exit",
    )
    a = p.parse_args(argv)
    gpu = a.device != "cpu" and torch.cuda.is_available()
    defaults = (
        TINY
        if a.tiny
        else {
            "model": "ViT-B-32",
            "batch_size": 1024,
            "steps": 50,
            "warmup_steps": 15,
            "rounds": 1,
            "num_train": 98304,
            "image_size": 224,
            "score_resolutions": "160,128,96",
            "score_patch_dropouts": "0.25,0.5,0.75",
            "overlap_steps": 300,
            "overlap_pool": 8,
            "workers": 8 if gpu else 2,
        }
    )
    for k, v in defaults.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.score_resolutions = [int(x) for x in str(a.score_resolutions).split(",") if x]
    a.score_patch_dropouts = [float(x) for x in str(a.score_patch_dropouts).split(",") if x]
    if a.steps < 2 or a.rounds < 1:
        p.error("--steps must be >= 2 and --rounds >= 1")
    return a


def configurations(a: argparse.Namespace, device: torch.device) -> list[tuple[str, dict]]:
    """(name, settings) of every configuration, the full-data reference first. Settings: the fields of its
    ``SelectConfig`` (``select``) and the ``ModelConfig`` fields it changes (``model``)."""

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
        unknown = keep - {n for n, _ in rows} - {"open_clip"}
        if unknown:
            raise SystemExit(f"--configs: unknown configuration(s) {sorted(unknown)}; known: {[n for n, _ in rows]}")
        rows = [r for r in rows if r[0] in keep]
    return rows


def _write_part(job: tuple) -> None:
    from dissect_fast.tools.synthetic import write_split

    part_dir, n, first_id, image_size, seed, per_shard = job
    write_split(part_dir, n, first_id, 0.4, image_size, seed, per_shard, progress=False)


def write_parts(root: str, sizes: list[int], image_size: int, per_shard: int) -> None:
    """Synthetic shards in ``root``: one part per size, written in parallel processes with disjoint id ranges,
    merged under one dataset index."""
    import multiprocessing

    from dissect_fast.data.shards import DatasetIndex, ShardInfo

    jobs, first = [], 0
    for i, n in enumerate(sizes):
        jobs.append((os.path.join(root, f"part-{i:02d}"), n, first, image_size, 1000 + i, per_shard))
        first += n
    if len(jobs) == 1:
        _write_part(jobs[0])
    else:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            pool.map(_write_part, jobs)
    idx = [DatasetIndex.load(j[0]) for j in jobs]
    shards = [ShardInfo(os.path.relpath(os.path.join(ix.root, s.path), root), s.count) for ix in idx for s in ix.shards]
    DatasetIndex(
        num_samples=sum(ix.num_samples for ix in idx),
        id_min=0,
        id_max=first - 1,
        shards=shards,
        context_length=idx[0].context_length,
        has_tokens=idx[0].has_tokens,
    ).save(root)


def prepare_data(a: argparse.Namespace) -> str:
    """--train-data, or a synthetic set (written once per --data-cache, in parallel parts with
    disjoint id ranges, merged under one dataset index)."""
    if a.train_data:
        return a.train_data
    root = os.path.join(a.data_cache, f"synth-{a.num_train}-{a.image_size}", "train")
    if os.path.isfile(os.path.join(root, "index.json")):
        return root
    parts = max(1, min(os.cpu_count() or 1, a.num_train // 4096))
    sizes = [a.num_train // parts + (i < a.num_train % parts) for i in range(parts)]
    per_shard = max(64, min(1024, a.num_train // (16 * parts)))
    print(f"writing {a.num_train} synthetic samples at {a.image_size} px to {root} ({parts} processes)", flush=True)
    write_parts(root, sizes, a.image_size, per_shard)
    return root


# ----------------------------------------------------------------------------------------- one configuration
def train_config(
    a, data: str, logs: str, name: str, settings: dict, compile: bool | None = None, steps: int | None = None
):
    """The TrainConfig of one configuration (``settings``: see ``configurations``). ``steps``: the run's length;
    its epoch is then one step longer (``train_num_samples``), so a fit stopped after ``steps`` steps ends inside
    the epoch (no evaluation, no checkpoint), and its one log step (a host sync) is its last step."""
    from dissect_fast.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SelectConfig, TrainConfig

    return TrainConfig(
        data=DataConfig(
            train_data=data,
            train_num_samples=None if steps is None else (steps + 1) * a.batch_size,
            batch_size=a.batch_size,
            workers=a.workers,
            data_backend=a.data_backend,
        ),
        model=ModelConfig(
            model=a.model,
            precision=a.precision,
            device=a.device,
            compile=a.compile if compile is None else compile,
            **settings.get("model", {}),
        ),
        optim=OptimConfig(epochs=2, lr=1e-4, warmup=10),
        select=SelectConfig(**settings["select"]),
        run=RunConfig(
            logs=logs,
            name=name,
            progress=False,
            tensorboard=False,
            plots=False,
            log_every_n_steps=steps or RunConfig.log_every_n_steps,
        ),
    )


def batches(trainer):
    """Endless batches from the trainer's loader (a new pass when the shards run out)."""
    while True:
        got = 0
        for b in trainer.train_loader:
            got += 1
            yield b
        if not got:
            raise RuntimeError("the training loader yielded no batch: too few samples for the batch size")


class ConfigRun:
    """One configuration: its Trainer (epoch 1, a filled history, ``max_steps`` = warm-up + rounds x steps) and
    the TimedSteps callback its fit runs with. ``fit()`` runs the whole fit here; with --rounds > 1, ``start()``
    runs it in a thread up to the first timed block and ``next_block()`` lets it run one more block."""

    def __init__(self, a, data: str, name: str, settings: dict, logs: str, dataset_samples: int | None) -> None:
        from dissect_fast.training.loop import Trainer
        from dissect_fast.training.timing import TimedSteps

        self.a, self.name, self.settings, self.dataset_samples = a, name, settings, dataset_samples
        n = a.warmup_steps + a.steps * a.rounds
        self.restarts = dataset_samples is not None and n > dataset_samples // a.batch_size
        if self.restarts:
            print(
                f"[bench_train] warning: {a.warmup_steps} + {a.rounds} x {a.steps} steps exceed one pass over "
                f"the data ({dataset_samples // a.batch_size} batches): loader restarts fall into timed steps; "
                f"use more data",
                file=sys.stderr,
            )
        t = self.trainer = Trainer(train_config(a, data, logs, name, settings, steps=n))
        if t.strategy.history is not None:  # a filled history: the delta top-k sees realistic keys
            g = torch.Generator(device=t.device).manual_seed(0)
            t.strategy.history.values.copy_(torch.rand(t.num_ids, device=t.device, generator=g) * 40)
        t.start_epoch = 1  # dissect-warmup --warmup-point 1: epoch 1 is the steady state (scoring + delta top-k)
        t.max_steps = n
        self.timing = TimedSteps(a.warmup_steps, a.steps, a.rounds)
        t.callbacks.append(self.timing)
        self.metrics: list[dict] = []
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def fit(self) -> None:
        self.metrics = self.trainer.fit()

    # --rounds > 1: the fit in a thread of its own, waiting for its turn before each timed block
    def start(self) -> None:
        """Start the fit; return once it has warmed up and waits before its first timed block."""
        self._go, self._parked = threading.Event(), threading.Event()
        self.timing.before_block = self._wait_turn
        self.thread = threading.Thread(target=self._run, name=f"fit-{self.name}", daemon=True)
        self.thread.start()
        self._wait_parked()

    def next_block(self) -> None:
        """Let the fit run its next timed block (after the last: to its end); return when it waits again."""
        self._parked.clear()
        self._go.set()
        self._wait_parked()

    def _run(self) -> None:
        try:
            self.fit()
        except BaseException as e:  # noqa: BLE001 (handed to the main thread)
            self.error = e
        finally:
            self._parked.set()

    def _wait_turn(self, t) -> None:  # in the fit's thread
        self._parked.set()
        self._go.wait()
        self._go.clear()

    def _wait_parked(self) -> None:
        self._parked.wait()
        if self.error is not None:
            raise RuntimeError(f"{self.name}: the fit failed") from self.error

    def row(self) -> dict:
        a, t, tm = self.a, self.trainer, self.timing
        stats = benchkit.step_stats(tm.step_s, tm.phases, a.batch_size)
        n_epoch = a.epoch_samples or self.dataset_samples or t.num_samples
        loss = self.metrics[-1]["train_loss"] if self.metrics else float("nan")
        return {
            "config": self.name,
            "settings": self.settings,
            "k": t.k,
            "batch_size": a.batch_size,
            "rounds": a.rounds,
            **stats,
            "epoch_samples": n_epoch,
            "epoch_s": round(statistics.median(tm.step_s) * math.ceil(n_epoch / a.batch_size), 3),
            "wall_s": round(tm.wall_s, 4),
            "phases_sum_s": round(sum(sum(ph.values()) for ph in tm.phases), 4),
            "loader_restarts_in_timed_steps": self.restarts,
            "final_loss": round(loss, 4) if math.isfinite(loss) else None,
            "timing": "cuda events" if t.device.type == "cuda" else "perf_counter",
        }

    def close(self) -> None:
        import gc

        cuda = self.trainer.device.type == "cuda"
        if self.thread is not None:
            self.thread.join()
        del self.trainer
        if self.a.rounds == 1:  # nothing else is alive: drop compiled graphs that still reference the model
            torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def run_configs(a, data: str, configs: list[tuple[str, dict]], logs: str) -> list[dict]:
    """Time every configuration; with --rounds > 1 all fits stay alive, each in its thread, and their timed blocks
    are interleaved round-robin, so a drift in machine load hits every configuration alike."""
    from dissect_fast.data.shards import resolve_data

    index = resolve_data(data, "--train-data")[1]
    dataset_samples = index.num_samples if index is not None else None
    rows = []
    if a.rounds == 1:
        for name, settings in configs:
            print(f"[bench_train] {name} ...", flush=True)
            with contextlib.redirect_stdout(sys.stderr):
                r = ConfigRun(a, data, name, settings, logs, dataset_samples)
                r.fit()
            rows.append(r.row())
            r.close()
            print(f"[bench_train] {name}: {rows[-1]['median_step_ms']:.2f} ms/step", flush=True)
        return rows
    runs, out = [], sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the trainers' output; the progress lines go to ``out``
        for name, settings in configs:
            print(f"[bench_train] {name}: build + warm-up ...", file=out, flush=True)
            runs.append(ConfigRun(a, data, name, settings, logs, dataset_samples))
            runs[-1].start()
        for k in range(a.rounds):
            print(f"[bench_train] round {k + 1}/{a.rounds}", file=out, flush=True)
            for r in runs:
                r.next_block()
    rows = [r.row() for r in runs]
    for r in runs:
        r.close()
    return rows


# ----------------------------------------------------------------------------------------- agreement
def measure_overlap(t, a) -> dict:
    """Top-k agreement of every cheap scorer with full-resolution scoring (module docstring). ``t``: a Trainer
    with a history strategy (``dissect-momentum``: the history fills), built eagerly (untimed: compiling seven
    scorers would only cost time; numerics match to bf16 rounding). Reads ``a.overlap_steps``, ``a.overlap_pool``,
    ``a.score_resolutions`` and ``a.score_patch_dropouts``."""
    from dissect_fast.model import ScoringPass
    from dissect_fast.selection.strategies import clip_scores, scaled_cosines, topk_positions

    t.model.train()
    it = batches(t)
    pool = [next(it) for _ in range(a.overlap_pool)]
    del it
    cheap = {f"dissect-r0.2-res{R}": {"resolution": R} for R in a.score_resolutions}
    cheap.update({f"dissect-r0.2-pd{P}": {"patch_dropout": P} for P in a.score_patch_dropouts})
    scorers = {n: ScoringPass(t.model, t.precision, t.device, False, **kw) for n, kw in cheap.items()}
    # --score-precision: the reference's fp32 scoring (no autocast) against bf16 autocast, same weights and batch
    by_precision = {p: ScoringPass(t.model, p, t.device, False) for p in ("fp32", "amp_bf16")}
    k, dev = t.k, t.device
    sums = {n: torch.zeros(2, device=dev) for n in scorers}  # [score-key overlap, delta-key overlap] sums
    prec_sum = torch.zeros(2, device=dev)
    n_delta = torch.zeros((), device=dev)
    zeros = torch.zeros((), device=dev)  # share of full-resolution scores clamped to 0 (ties in the keys)
    hist = t.strategy.history.values

    def inter(a_idx: torch.Tensor, b_idx: torch.Tensor, B: int) -> torch.Tensor:
        m = torch.zeros(B, dtype=torch.bool, device=dev)
        m[a_idx] = True
        return m[b_idx].sum().float() / k

    for step in range(a.overlap_steps):
        images, tokens, ids = pool[step % len(pool)]
        B = ids.shape[0]
        h = hist[ids]
        seen = ~torch.isnan(h)
        all_seen = seen.all().float()
        feats = t.forwards.score(images, tokens)
        s_full = clip_scores(*feats, 100.0)
        top_s = topk_positions(scaled_cosines(*feats, 100.0), k)  # clipscore's key: the unclamped score
        zeros += (s_full == 0).float().mean()
        top_d = topk_positions(torch.where(seen, h - s_full, torch.zeros_like(s_full)), k)
        for n, sc in scorers.items():
            f_c = sc(images, tokens)
            s = clip_scores(*f_c, 100.0)
            d = torch.where(seen, h - s, torch.zeros_like(s))
            sums[n][0] += inter(top_s, topk_positions(scaled_cosines(*f_c, 100.0), k), B)
            sums[n][1] += inter(top_d, topk_positions(d, k), B) * all_seen
        f32, f16 = by_precision["fp32"](images, tokens), by_precision["amp_bf16"](images, tokens)
        for j, (a32, a16) in enumerate(
            (
                (scaled_cosines(*f32, 100.0), scaled_cosines(*f16, 100.0)),
                (h - clip_scores(*f32, 100.0), h - clip_scores(*f16, 100.0)),
            )
        ):
            if j == 1:
                a32, a16 = (torch.where(seen, x, torch.zeros_like(x)) for x in (a32, a16))
            prec_sum[j] += inter(topk_positions(a32, k), topk_positions(a16, k), B) * (all_seen if j else 1.0)
        n_delta += all_seen
        t.train_step(0, images, tokens, ids)  # full-resolution DISSect trains the shared weights
    nd = int(n_delta)
    out = {
        "steps": a.overlap_steps,
        "pool_batches": a.overlap_pool,
        "k": k,
        "delta_steps": nd,
        "strategy_trained": "dissect-momentum (full-resolution scoring)",
        "zero_score_share": round(float(zeros) / a.overlap_steps, 4),
        "overlap": {
            n: {
                "score_key": round(float(v[0]) / a.overlap_steps, 4),
                "delta_key": round(float(v[1]) / nd, 4) if nd else None,
            }
            for n, v in sums.items()
        },
        # |top-k(fp32 scoring) & top-k(bf16-autocast scoring)| / k on the same weights (--score-precision)
        "score_precision_fp32_vs_bf16": {
            "score_key": round(float(prec_sum[0]) / a.overlap_steps, 4),
            "delta_key": round(float(prec_sum[1]) / nd, 4) if nd else None,
        },
    }
    return out


# ----------------------------------------------------------------------------------------- open_clip peer
def shard_list(data: str) -> list[str]:
    from dissect_fast.data.shards import resolve_data

    return resolve_data(data, "--train-data")[0]


def run_peer(a, data: str, device: torch.device, logs: str) -> dict:
    """open_clip_train.main on the same shards, model, batch and precision; per-step times from its log."""
    row = {"config": "open_clip", "batch_size": a.batch_size, "steps": a.steps}
    try:
        import open_clip_train  # noqa: F401
        import pandas  # noqa: F401  (open_clip_train imports it)
    except ImportError as e:
        return {**row, "skipped": f"open_clip_train cannot run here: {e}"}
    n_steps = a.warmup_steps + a.steps * a.rounds
    precision = a.precision if a.precision != "auto" else ("amp_bf16" if device.type == "cuda" else "fp32")
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "open_clip_peer.py"),
        "--train-data",
        "::".join(shard_list(data)),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(n_steps * a.batch_size),
        "--batch-size",
        str(a.batch_size),
        "--model",
        a.model,
        "--precision",
        precision,
        "--workers",
        str(a.workers),
        "--epochs",
        "1",
        "--lr",
        "1e-4",
        "--warmup",
        "10",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--report-to",
        "",
        "--logs",
        logs,
        "--name",
        f"peer-{os.getpid()}-{time.time_ns()}",
        "--device",
        "cuda" if device.type == "cuda" else "cpu",
        "--seed",
        "0",
    ]
    if a.compile:
        argv.append("--torchcompile")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600, check=False)
    wall = time.perf_counter() - t0
    log = p.stdout + p.stderr
    pat = re.compile(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")
    found = [(float(m.group(1)), float(m.group(2))) for m in pat.finditer(log)]
    if p.returncode != 0 or len(found) <= a.warmup_steps:
        tail = " | ".join(log.strip().splitlines()[-3:])
        return {**row, "skipped": f"open_clip trainer failed (exit {p.returncode}, {len(found)} step lines): {tail}"}
    timed = found[a.warmup_steps :]
    # open_clip prints averages since its last log line; with --log-every-n-steps 1 each line is one step
    # (its first line times the first batch alone, inside the warm-up we skip).
    step_s = statistics.median(b for _, b in timed)
    return {
        **row,
        "steps": len(timed),
        "median_step_ms": round(step_s * 1e3, 4),
        "samples_per_s": round(a.batch_size / step_s, 2),
        "data_wait_ms_per_step": round(statistics.median(d for d, _ in timed) * 1e3, 4),
        "wall_s_incl_startup": round(wall, 2),
        "timing": "open_clip log, Batch (t) per step (host wall-clock, 3 decimals)",
        "command": " ".join(argv[1:]),
    }


# ----------------------------------------------------------------------------------------- report
def summarise(rows: list[dict], overlap: dict | None) -> None:
    full = next(r for r in rows if r["config"] == "full")
    base_score = next((r["phases_ms_per_step"]["score"] for r in rows if r["config"] == "dissect-r0.2"), None)
    for r in rows:
        if "median_step_ms" not in r:
            continue
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


def print_table(rows: list[dict]) -> None:
    print(markdown_table(rows))


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
        "top-k overlap",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "skipped" in r:
            cells = [r["config"], *[""] * (len(head) - 2), "skipped: " + r["skipped"][:80].replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        ph = r.get("phases_ms_per_step") or {}
        ov = r.get("topk_overlap")
        ovs = ""
        if ov:
            dk = "n/a" if ov["delta_key"] is None else f"{ov['delta_key']:.3f}"
            ovs = f"{ov['score_key']:.3f} (score) / {dk} (delta)"
        cells = [
            r["config"],
            str(r.get("k", "")),
            f"{r['samples_per_s']:.0f}",
            f"{r['median_step_ms']:.2f}",
            f"{r['epoch_s']:.1f}" if "epoch_s" in r else "",
            f"{r['ratio_to_full']:.3f}" if "ratio_to_full" in r else "",
            *(f"{ph[p]:.2f}" if p in ph else "" for p in PHASES),
            f"{r['score_speedup']:.2f}" if "score_speedup" in r else "",
            ovs,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_breakdown(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dissect_fast.training.timing import PHASES

    rows = [r for r in result["rows"] if r.get("phases_ms_per_step")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for p in PHASES:
        vals = [r["phases_ms_per_step"][p] for r in rows]
        ax.barh([r["config"] for r in rows], vals, left=left, label=p)
        left = [x + v for x, v in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (per-phase medians over the timed steps)")
    ax.set_title(f"{result['device']}: {result['model']}, batch {result['batch_size']}")
    ax.legend(ncol=len(PHASES), fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.06))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- bench_train:begin (generated by bench_train.py --report) -->", "<!-- bench_train:end -->"


def report() -> int:
    """Rewrite the generated block of benchmarks/README.md from stored train-*.json: per device, every
    file of its newest date, rows merged by configuration (a later file wins; each row keeps the ratio
    measured against the full-data row of its own invocation)."""
    groups: dict[str, list[dict]] = {}
    for f in sorted(RESULTS.glob("train-*.json")):
        r = json.loads(f.read_text())
        r["file"] = f.name
        groups.setdefault(r["device"], []).append(r)
    parts = []
    for device, runs in sorted(groups.items()):
        day = max(r["date"][:10] for r in runs)
        runs = sorted((r for r in runs if r["date"][:10] == day), key=lambda r: r["date"])
        merged: dict[str, dict] = {}
        for r in runs:
            for row in r["rows"]:
                merged[row["config"]] = {**row, "file": r["file"]}
        last = dict(runs[-1], rows=list(merged.values()))
        png = RESULTS / (Path(runs[-1]["file"]).stem + ".png")
        plot_breakdown(last, png)
        files = ", ".join(f"`results/{r['file']}`" for r in runs)
        cmds = "; ".join(f"`{r['command']}`" for r in runs)
        parts.append(
            f"### {device} ({day}, commit {runs[-1]['commit']})\n\n"
            f"{cmds} -- model {last['model']}, batch {last['batch_size']}, {last['steps']} timed steps x "
            f"{last.get('rounds', 1)} round(s) after {last['warmup_steps']} warm-up steps, precision "
            f"{last['precision']}, compile {last['compile']}. Stored in {files}.\n\n{markdown_table(last['rows'])}\n\n"
            + "".join(f"{r['verdict']}\n" for r in runs if r.get("verdict"))
            + f"\n![phase breakdown](results/{png.name})\n"
        )
    block = BEGIN + "\n" + "\n".join(parts) + END
    text = README.read_text() if README.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    README.write_text(text)
    print(f"wrote {README} ({len(parts)} device(s))")
    return 0


def verdict(rows: list[dict], device: torch.device) -> str:
    by = {r["config"]: r for r in rows if "ratio_to_full" in r}
    if device.type != "cuda":
        r = by.get(CPU_TARGET["config"])
        if r is None:
            return ""
        ok = r["ratio_to_full"] <= CPU_TARGET["max_ratio"]
        out = (
            f"CPU target: {CPU_TARGET['config']} costs {r['ratio_to_full']:.3f} x full data by median step "
            f"(target <= {CPU_TARGET['max_ratio']}): {'met' if ok else 'NOT met'}; by fastest step "
            f"{r.get('ratio_to_full_min', float('nan')):.3f} x."
        )
        a, b = by.get("dissect-r0.2"), by.get("dissect-r0.2-torch-select")
        if a and b:  # on CPU both run the same torch selection: their gap is the measurement noise
            gap = max(a["median_step_ms"], b["median_step_ms"]) / min(a["median_step_ms"], b["median_step_ms"])
            out += (
                f" Noise check: dissect-r0.2 and dissect-r0.2-torch-select run identical code on CPU; their "
                f"median steps differ by {gap:.2f} x."
            )
        return out
    out = []
    if "dissect-r0.2" in by:
        v = by["dissect-r0.2"]["ratio_to_full"]
        out.append(f"dissect r=0.2 full-res scoring: {v:.3f} x full (target <= {GPU_TARGETS['dissect-r0.2']})")
    cheap = [r for n, r in by.items() if r.get("topk_overlap") and (r["topk_overlap"]["delta_key"] or 0) >= 0.9]
    if cheap:
        best = min(cheap, key=lambda r: r["ratio_to_full"])
        out.append(
            f"cheapest scoring with delta top-k overlap >= 0.9: {best['config']} at "
            f"{best['ratio_to_full']:.3f} x full (target <= {GPU_TARGETS['cheapest_overlap>=0.9']})"
        )
    full = by.get("full", {})
    if "vs_open_clip_samples_per_s" in full:
        out.append(
            f"full data vs open_clip trainer: {full['vs_open_clip_samples_per_s']:.2f} x samples/s "
            f"(target >= {GPU_TARGETS['full_vs_open_clip']})"
        )
    shares = [r["data_share"] for r in by.values() if "data_share" in r]
    if shares:
        out.append(f"max data-wait share: {max(shares):.3f} (target < {GPU_TARGETS['data_share']})")
    return "; ".join(out) + ("." if out else "")


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    if argv is not None and "--report" in argv or argv is None and "--report" in sys.argv[1:]:
        return report()
    a = parse_args(argv)
    import logging

    from dissect_fast.model import resolve_device
    from dissect_fast.training.loop import Trainer

    logging.getLogger("dissect_fast").setLevel(logging.WARNING)
    device = resolve_device(a.device)
    data = prepare_data(a)
    logs = tempfile.mkdtemp(prefix="bench_train_logs_")
    rows: list[dict] = []
    overlap = None
    try:
        rows = run_configs(a, data, configurations(a, device), logs)
        if not a.no_overlap and (a.score_resolutions or a.score_patch_dropouts):
            print("[bench_train] top-k agreement of cheap scoring ...", flush=True)
            with contextlib.redirect_stdout(sys.stderr):
                settings = {"select": {"strategy": "dissect-momentum", "rate": 0.2}}
                t = Trainer(train_config(a, data, logs, "overlap", settings, compile=False))
                overlap = measure_overlap(t, a)
                del t
        if not a.no_peer and (not a.configs or "open_clip" in a.configs.split(",")):
            print("[bench_train] open_clip trainer (peer) ...", flush=True)
            rows.append(run_peer(a, data, device, logs))
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    summarise(rows, overlap)
    result = {
        **benchkit.header("train", "bench_train.py", device, argv),
        "model": a.model,
        "batch_size": a.batch_size,
        "steps": a.steps,
        "rounds": a.rounds,
        "warmup_steps": a.warmup_steps,
        "precision": a.precision,
        "compile": a.compile,
        "data": data,
        "workers": a.workers,
        "tiny": a.tiny,
        "rows": rows,
        "overlap": overlap,
    }
    result["verdict"] = verdict(rows, device)
    print_table(rows)
    r03 = next((r for r in rows if r["config"] == "dissect-r0.3"), None)
    if r03:
        print(f"ratio dissect-r0.3 / full: {r03['ratio_to_full']:.3f}")
    if result["verdict"]:
        print(result["verdict"])
    if not a.no_save:
        out = benchkit.write_json(benchkit.result_path("train", result["device"], a.out), result)
        print(f"wrote {out}")
    main.last_result = result  # for tests and callers that import the module
    return 0


if __name__ == "__main__":
    sys.exit(main())
