"""What the training loop calls at defined points, so the loop itself stays the step and the epoch.

The loop calls each hook of its callbacks in list order with a :class:`Context` (the loop's position and the run's
components, not the loop itself); a hook a callback does not override costs nothing (the loop calls only overridden
ones). Points, in order:

``on_fit_start``       after set-up and resume, before the first epoch
``on_epoch_start``     each epoch, before its first batch is read
``on_step_start``      before a step waits for its batch (per step: profiling window and phase timing only)
``on_batch``           the step's batch arrived
``on_step_end``        after the optimizer step (``ctx.step`` counts it)
``on_log_step``        every --log-every-n-steps steps and at the epoch's last, with the values read then
``on_epoch_steps_end`` after the epoch's last step, before its metrics are computed
``on_epoch_end``       the epoch's metrics (callbacks may add to them), before the checkpoint
``on_stopped``         the run stops on a policy (bad data): the metrics with a ``stopped`` message
``on_fit_end``         after the last epoch
``on_fit_exit``        always, last: release what the run held (also after an exception)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dissect_fast.evaluation.retrieval import evaluate
from dissect_fast.selection.names import WARMUP_STRATEGIES
from dissect_fast.training.diagnostics import plot_epoch, plot_history, write_record
from dissect_fast.training.distributed import check_in_sync
from dissect_fast.training.logs import StepLog, init_wandb
from dissect_fast.training.profiling import PhaseMarker

if TYPE_CHECKING:
    from dissect_fast.training.build import Run

log = logging.getLogger("dissect_fast")

HOOKS = (
    "on_fit_start",
    "on_epoch_start",
    "on_step_start",
    "on_batch",
    "on_step_end",
    "on_log_step",
    "on_epoch_steps_end",
    "on_epoch_end",
    "on_stopped",
    "on_fit_end",
    "on_fit_exit",
)


@dataclass
class Context:
    """What a callback sees: the loop's position (the loop keeps it here, so callbacks read it live), the epochs'
    metrics, the run's components (``run``: model, strategy, data, diagnostics, ...), and the places callbacks
    fill in: the phase marker the step reports to, the TensorBoard writer and the wandb run."""

    run: Run
    step: int = 0  #: optimizer steps done, over the whole run
    epoch: int = 0  #: the epoch in progress (0-based)
    epoch_step: int = 0  #: steps done in the epoch in progress
    start_epoch: int = 0  #: the epoch this start of the run began with (after a resume: the next one)
    metrics: list[dict] = field(default_factory=list)  #: one dict per finished epoch
    last_trained: int = 0  #: samples the last step trained on (a shape: no sync)
    #: a PhaseMarker told each phase's end (a benchmark's timing.PhaseTimer, the --profile-steps window's);
    #: None: the step runs no timing code
    timer: PhaseMarker | None = None
    tb: Any = None  #: the TensorBoard writer (--tensorboard, main rank; TensorBoard)
    wandb: Any = None  #: the wandb run (--report-to wandb, main rank; Wandb)

    # the components callbacks read most
    cfg = property(lambda self: self.run.cfg)
    dist = property(lambda self: self.run.dist)
    device = property(lambda self: self.run.device)
    run_dir = property(lambda self: self.run.run_dir)
    model = property(lambda self: self.run.model)
    strategy = property(lambda self: self.run.strategy)
    diag = property(lambda self: self.run.diag)
    profiler = property(lambda self: self.run.profiler)


class Callback:
    """Base class: every hook does nothing. ``ctx`` is the loop's :class:`Context`."""

    def on_fit_start(self, ctx) -> None: ...
    def on_epoch_start(self, ctx, epoch: int) -> None: ...
    def on_step_start(self, ctx) -> None: ...
    def on_batch(self, ctx) -> None: ...
    def on_step_end(self, ctx, epoch: int, n_steps: int) -> None: ...
    def on_log_step(self, ctx, epoch: int, n_steps: int, lr: float, read: dict) -> None: ...
    def on_epoch_steps_end(self, ctx, epoch: int) -> None: ...
    def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None: ...
    def on_stopped(self, ctx, metrics: dict) -> None: ...
    def on_fit_end(self, ctx) -> None: ...
    def on_fit_exit(self, ctx) -> None: ...


def overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


# ------------------------------------------------------------------ start-up
def run_summary(ctx) -> str:
    """The short human summary a run starts with (model, data, samples, strategy, k of B, epochs, run folder); the
    full config and provenance are in RUN/config.json and RUN/provenance.json."""
    cfg = ctx.cfg
    d, o, s = cfg.data, cfg.optim, cfg.select
    ranks = ctx.dist.world_size
    lines = [
        f"run {ctx.run_dir}",
        f"  model     {ctx.run.model_name} on {ctx.device} ({ctx.run.precision})",
        f"  data      {d.train_data or 'synthetic'} ({ctx.run.data_backend} loader): {ctx.run.num_samples:,} samples per epoch"
        + (f", validation {d.val_data}" if d.val_data else ""),
        f"  strategy  {s.strategy}: k = {ctx.run.k} of B = {d.batch_size} per rank and step"
        + (f" (r = {s.rate}, warm-up point {s.warmup_point} epochs)" if s.strategy in WARMUP_STRATEGIES else "")
        + (f" (r = {s.rate})" if s.strategy not in WARMUP_STRATEGIES and s.strategy != "full" else ""),
        f"  schedule  {o.epochs} epochs x {ctx.run.steps_per_epoch:,} steps on {ranks} rank(s), lr {o.lr:g} "
        f"({o.lr_scheduler}, {o.warmup} warm-up steps)",
    ]
    if ctx.step:
        lines.append(f"  resumed   at step {ctx.step:,}: epoch {ctx.start_epoch + 1} is next")
    lines.append("  full config and provenance: config.json, provenance.json and out.log in the run folder")
    return "\n".join(lines)


def warmup_warning(ctx) -> str | None:
    """A line when --warmup is longer than the whole run: the LR never reaches --lr (it stays a fraction of it)."""
    o, total = ctx.cfg.optim, ctx.run.total_steps
    if o.warmup <= total:
        return None
    return (
        f"--warmup {o.warmup} steps is longer than the whole run ({total:,} steps: {ctx.run.steps_per_epoch:,} per epoch x "
        f"{o.epochs} epochs): the LR peaks at {o.lr * total / o.warmup:.2g}, {100 * total / o.warmup:.0f}% of --lr "
        f"{o.lr:g}; lower --warmup "
        f"(e.g. --warmup {max(1, total // 10)}) for a warm-up over the first tenth of the run"
    )


def log_run_start(ctx) -> None:
    """On the main rank: the start-up summary, and the --warmup warning when it applies."""
    if not ctx.dist.is_main:
        return
    log.info("%s", run_summary(ctx))
    warning = warmup_warning(ctx)
    if warning:
        log.warning("%s", warning)


# ------------------------------------------------------------------ evaluation
class Evaluation(Callback):
    """--val-data retrieval R@K every --val-every epochs and zero-shot every --zeroshot-frequency epochs (and after
    the last epoch), on the main rank; adds val/ and zeroshot metrics to the epoch's."""

    def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None:
        cfg, last = ctx.cfg, epoch + 1 == ctx.cfg.optim.epochs
        if not ctx.dist.is_main:
            return
        if ctx.run.val_loader is not None and ((epoch + 1) % cfg.run.val_every == 0 or last):
            metrics.update(evaluate(ctx.model, ctx.run.val_loader, ctx.run.precision, ctx.device))
        f = cfg.run.zeroshot_frequency
        if ctx.run.zeroshot_sets and f and ((epoch + 1) % f == 0 or last):
            metrics.update(self.zeroshot(ctx.run))

    @staticmethod
    def zeroshot(run) -> dict:
        """Zero-shot top-1/top-5 on each set, with a classifier built from the current text tower (open_clip's)."""
        from dissect_fast.data.shards import tokenizer_for
        from dissect_fast.evaluation.zeroshot import run_zeroshot

        tok = run.tokenizer or tokenizer_for(run.context_length)  # the model's own unless it is CLIP BPE
        d = run.cfg.data
        return run_zeroshot(run.model, run.zeroshot_sets, tok, run.device, run.precision, d.batch_size, d.workers)


class HistorySync(Callback):
    """Several ranks with a history: every --check-sync-every steps and at each epoch's end the replicas'
    checksums must agree (HistoryDesyncError otherwise); the epoch's go into its metrics. A host sync."""

    def on_step_end(self, ctx, epoch: int, n_steps: int) -> None:
        every = ctx.cfg.dist.check_sync_every
        if every and ctx.step % every == 0:
            self.check(ctx)

    def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None:
        metrics["dist/history_checksums"] = self.check(ctx)

    @staticmethod
    def check(ctx) -> list[list[int]]:
        return check_in_sync(ctx.strategy.history.checksum(), ctx.dist, ctx.step)


class Record(Callback):
    """--record: ``select_record/record_{epoch + 1}.npz`` per epoch (``diagnostics.write_record``; a collective)."""

    def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None:
        write_record(ctx.diag, ctx.dist, ctx.strategy.history, ctx.cfg.select.strategy, ctx.run_dir, epoch)


# ------------------------------------------------------------------ run folder outputs (main rank)
class MetricsLog(Callback):
    """RUN/metrics.jsonl (one line per epoch) and RUN/steps.jsonl (one per log step; train/ scalars and, without
    a progress bar, open_clip's log line), with TensorBoard (``ctx.tb``) and wandb (``ctx.wandb``) as sinks."""

    def __init__(self) -> None:
        self.step_log: StepLog | None = None

    def on_fit_start(self, ctx) -> None:
        self.step_log = StepLog(ctx.run_dir, ctx.tb, ctx.wandb, line=not progress_bar_shown(ctx.cfg.run))

    def on_log_step(self, ctx, epoch: int, n_steps: int, lr: float, read: dict) -> None:
        b, world = ctx.cfg.data.batch_size * ctx.run.accum, ctx.dist.world_size  # samples read per step and rank
        rec = {
            "step": ctx.step,
            "epoch": epoch + 1,
            "epoch_step": n_steps,
            "loss": read["loss"],
            "lr": lr,
            "logit_scale": read["logit_scale"],
            "samples_per_s": b * world / max(1e-9, read["batch_time_s"]),
            "data_time_s": read["data_time_s"],
            "batch_time_s": read["batch_time_s"],
            "selected_share": ctx.last_trained / b,
        }
        if "clean_share" in read:  # the shards have clean flags: share of clean pairs trained in the window
            rec["clean_share"] = read["clean_share"]
        assert self.step_log is not None  # set by on_fit_start
        self.step_log.log(rec, n_steps, ctx.run.steps_per_epoch, b, world)

    def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None:
        self._append(ctx, metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if ctx.tb is not None:
            for k, v in scalars.items():
                ctx.tb.add_scalar(k, v, ctx.step)
        if ctx.wandb is not None:
            ctx.wandb.log(scalars, step=ctx.step)

    def on_stopped(self, ctx, metrics: dict) -> None:
        self._append(ctx, metrics)

    @staticmethod
    def _append(ctx, metrics: dict) -> None:
        with open(os.path.join(ctx.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")


class TensorBoard(Callback):
    """--tensorboard: a SummaryWriter in RUN/tensorboard as ``ctx.tb`` (MetricsLog writes to it)."""

    def on_fit_start(self, ctx) -> None:
        from torch.utils.tensorboard import SummaryWriter

        ctx.tb = SummaryWriter(os.path.join(ctx.run_dir, "tensorboard"))

    def on_fit_end(self, ctx) -> None:
        if ctx.tb is not None:
            ctx.tb.close()


class Wandb(Callback):
    """--report-to wandb: the wandb run as ``ctx.wandb``; finished at the end, marked failed when the run stops
    early (``--resume latest`` continues it)."""

    def on_fit_start(self, ctx) -> None:
        ctx.wandb = init_wandb(ctx.cfg.run, ctx.cfg.to_dict(), ctx.run_dir)

    def on_fit_end(self, ctx) -> None:
        ctx.wandb.finish()
        ctx.wandb = None

    def on_fit_exit(self, ctx) -> None:
        if ctx.wandb is not None:
            ctx.wandb.finish(exit_code=1)
            ctx.wandb = None


class Plots(Callback):
    """--plots: per-epoch score/delta histograms (clean flags) and the history plots on eval epochs and the last."""

    def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None:
        out = os.path.join(ctx.run_dir, "plots")
        if ctx.diag.clean is not None:
            plot_epoch(ctx.diag.arrays(), epoch + 1, out)
        if any(k.startswith("val/") for k in metrics) or epoch + 1 == ctx.cfg.optim.epochs:
            plot_history(ctx.metrics, out)  # the epoch's metrics are in ctx.metrics already


def progress_bar_shown(run_cfg) -> bool:
    """Whether the run draws a progress bar: --progress (the default) and stderr is a terminal. Elsewhere (SLURM
    logs, pipes, files) a bar's carriage returns make an unreadable log: open_clip's ``Train Epoch:`` lines are
    logged every --log-every-n-steps steps instead (``StepLog``)."""
    return bool(run_cfg.progress) and sys.stderr.isatty()


class ProgressBar(Callback):
    """--progress: a tqdm bar per epoch (numbered from 1, as in the logs, metrics.jsonl and checkpoint names) with
    loss, samples/s and lr at log steps; nothing when stderr is not a terminal (``progress_bar_shown``)."""

    def __init__(self) -> None:
        self.bar: Any = None  # the epoch's tqdm bar
        self.t0, self.n0 = 0.0, 0

    def on_epoch_start(self, ctx, epoch: int) -> None:
        from tqdm import tqdm

        if not progress_bar_shown(ctx.cfg.run):
            return
        self.n0 = ctx.epoch_step
        desc = f"epoch {epoch + 1}/{ctx.cfg.optim.epochs}"
        self.bar = tqdm(total=ctx.run.steps_per_epoch, initial=self.n0, desc=desc, unit="step", leave=False)
        self.t0 = time.time()

    def on_log_step(self, ctx, epoch: int, n_steps: int, lr: float, read: dict) -> None:
        if self.bar is None:
            return
        rate = (
            n_steps * ctx.cfg.data.batch_size * ctx.dist.world_size * ctx.run.accum / max(1e-9, time.time() - self.t0)
        )
        self.bar.set_postfix(loss=f"{read['loss']:.3f}", samples_s=f"{rate:.0f}", lr=f"{lr:.2e}")

    def on_step_end(self, ctx, epoch: int, n_steps: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_steps_end(self, ctx, epoch: int) -> None:
        self.close()

    def on_fit_exit(self, ctx) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepsSeen(Callback):
    """Counts the steps this process trained (``dissect_fast.train`` removes the folder of a new run that failed
    before its first one)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, ctx, epoch: int, n_steps: int) -> None:
        self.steps += 1


class EpochEndFunction(Callback):
    """A plain function of the epoch's metrics on the main rank (e.g. the demo's progress line)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_epoch_end(self, ctx, epoch: int, metrics: dict) -> None:
        if ctx.dist.is_main:
            self.fn(metrics)


# ------------------------------------------------------------------ timing and profiling
class PhaseTiming(Callback):
    """Tells the phase marker (``ctx.timer``: a PhaseTimer set by a benchmark's callback, or the --profile-steps window's
    RangeMarker) where each step begins and where its wait for the batch (the ``data`` phase) ends; opens and
    closes the --profile-steps window between steps. Installed only while a timer or a profiler exists, so a
    plain run calls none of this."""

    def on_step_start(self, ctx) -> None:
        if ctx.profiler is not None:
            ctx.timer = ctx.profiler.marker_for(ctx.step, ctx.timer)
        if ctx.timer is not None:
            ctx.timer.step()

    def on_batch(self, ctx) -> None:
        if ctx.timer is not None:
            ctx.timer.mark("data")

    def on_epoch_steps_end(self, ctx, epoch: int) -> None:
        if ctx.profiler is not None:  # a window ending with the epoch closes now; the epoch's end is no step
            ctx.timer = ctx.profiler.marker_for(ctx.step, ctx.timer, epoch_end=True)

    def on_fit_end(self, ctx) -> None:
        if ctx.profiler is not None:
            ctx.profiler.report()

    def on_fit_exit(self, ctx) -> None:
        if ctx.profiler is not None:  # a run stopped inside the window still writes what it traced
            ctx.profiler.close()


def run_callbacks(ctx: Context) -> list[Callback]:
    """The run's own callbacks in call order (an epoch's evaluation before its metrics are written)."""
    run, cfg = ctx.run, ctx.run.cfg
    out: list[Callback] = []
    if run.profiler is not None:
        out.append(PhaseTiming())
    out.append(Evaluation())
    if cfg.run.record:
        out.append(Record())
    if run.dist.enabled and run.strategy.history is not None:
        out.append(HistorySync())
    if not run.dist.is_main:
        return out
    if cfg.run.tensorboard:
        out.append(TensorBoard())
    if "wandb" in cfg.run.report_to.split(","):
        out.append(Wandb())
    out.append(MetricsLog())
    if cfg.run.plots:
        out.append(Plots())
    if cfg.run.progress:
        out.append(ProgressBar())
    return out
