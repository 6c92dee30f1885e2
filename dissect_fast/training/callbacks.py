"""What the training loop calls at defined points, so the loop itself stays the step and the epoch.

The Trainer calls each hook of its callbacks in list order; a hook a callback does not override costs
nothing (the trainer only calls overridden ones). Points, in order:

``on_fit_start``       after set-up and resume, before the first epoch
``on_epoch_start``     each epoch, before its first batch is read
``on_step_start``      before a step waits for its batch (per step: profiling window and phase timing only)
``on_batch``           the step's batch arrived
``on_step_end``        after the optimizer step (``trainer.step`` counts it)
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
import signal
import sys
import time
from typing import Any

import torch

from dissect_fast.evaluation.retrieval import evaluate
from dissect_fast.selection.names import WARMUP_STRATEGIES
from dissect_fast.training.diagnostics import plot_epoch, plot_history, write_record
from dissect_fast.training.distributed import check_in_sync, elastic_restart_count
from dissect_fast.training.logs import StepLog, init_wandb

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


class Callback:
    """Base class: every hook does nothing. ``t`` is the Trainer."""

    def on_fit_start(self, t) -> None: ...
    def on_epoch_start(self, t, epoch: int) -> None: ...
    def on_step_start(self, t) -> None: ...
    def on_batch(self, t) -> None: ...
    def on_step_end(self, t, epoch: int, n_steps: int) -> None: ...
    def on_log_step(self, t, epoch: int, n_steps: int, lr: float, read: dict) -> None: ...
    def on_epoch_steps_end(self, t, epoch: int) -> None: ...
    def on_epoch_end(self, t, epoch: int, metrics: dict) -> None: ...
    def on_stopped(self, t, metrics: dict) -> None: ...
    def on_fit_end(self, t) -> None: ...
    def on_fit_exit(self, t) -> None: ...


def overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


# ------------------------------------------------------------------ start-up
def run_summary(t) -> str:
    """The short human summary a run starts with (model, data, samples, strategy, k of B, epochs, run folder); the
    full config and provenance are in RUN/config.json and RUN/provenance.json."""
    cfg = t.cfg
    d, o, s = cfg.data, cfg.optim, cfg.select
    ranks = t.dist.world_size
    lines = [
        f"run {t.run_dir}",
        f"  model     {t.model_name} on {t.device} ({t.precision})",
        f"  data      {d.train_data or 'synthetic'} ({t.data_backend} loader): {t.num_samples:,} samples per epoch"
        + (f", validation {d.val_data}" if d.val_data else ""),
        f"  strategy  {s.strategy}: k = {t.k} of B = {d.batch_size} per rank and step"
        + (f" (r = {s.rate}, warm-up point {s.warmup_point} epochs)" if s.strategy in WARMUP_STRATEGIES else "")
        + (f" (r = {s.rate})" if s.strategy not in WARMUP_STRATEGIES and s.strategy != "full" else ""),
        f"  schedule  {o.epochs} epochs x {t.steps_per_epoch:,} steps on {ranks} rank(s), lr {o.lr:g} "
        f"({o.lr_scheduler}, {o.warmup} warm-up steps)",
    ]
    if t.step:
        lines.append(f"  resumed   at step {t.step:,}: epoch {t.start_epoch + 1} is next")
    lines.append("  full config and provenance: config.json, provenance.json and out.log in the run folder")
    return "\n".join(lines)


def warmup_warning(t) -> str | None:
    """A line when --warmup is longer than the whole run: the LR never reaches --lr (it stays a fraction of it)."""
    o, total = t.cfg.optim, t.total_steps
    if o.warmup <= total:
        return None
    return (
        f"--warmup {o.warmup} steps is longer than the whole run ({total:,} steps: {t.steps_per_epoch:,} per epoch x "
        f"{o.epochs} epochs): the LR peaks at {o.lr * total / o.warmup:.2g}, {100 * total / o.warmup:.0f}% of --lr "
        f"{o.lr:g}; lower --warmup "
        f"(e.g. --warmup {max(1, total // 10)}) for a warm-up over the first tenth of the run"
    )


def log_run_start(t) -> None:
    """On the main rank: the start-up summary, and the --warmup warning when it applies."""
    if not t.dist.is_main:
        return
    log.info("%s", run_summary(t))
    warning = warmup_warning(t)
    if warning:
        log.warning("%s", warning)


# ------------------------------------------------------------------ evaluation
class Evaluation(Callback):
    """--val-data retrieval R@K every --val-every epochs and zero-shot every --zeroshot-frequency epochs (and after
    the last epoch), on the main rank; adds val/ and zeroshot metrics to the epoch's."""

    def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
        cfg, last = t.cfg, epoch + 1 == t.cfg.optim.epochs
        if not t.dist.is_main:
            return
        if t.val_loader is not None and ((epoch + 1) % cfg.run.val_every == 0 or last):
            metrics.update(evaluate(t.model, t.val_loader, t.precision, t.device))
        f = cfg.run.zeroshot_frequency
        if t.zeroshot_sets and f and ((epoch + 1) % f == 0 or last):
            metrics.update(t.zeroshot_eval())


class HistorySync(Callback):
    """Several ranks with a history: every --check-sync-every steps and at each epoch's end the replicas'
    checksums must agree (HistoryDesyncError otherwise); the epoch's go into its metrics. A host sync."""

    def on_step_end(self, t, epoch: int, n_steps: int) -> None:
        every = t.cfg.dist.check_sync_every
        if every and t.step % every == 0:
            self.check(t)

    def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
        metrics["dist/history_checksums"] = self.check(t)

    @staticmethod
    def check(t) -> list[list[int]]:
        return check_in_sync(t.strategy.history.checksum(), t.dist, t.step)


class Record(Callback):
    """--record: ``select_record/record_{epoch + 1}.npz`` per epoch (``diagnostics.write_record``; a collective)."""

    def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
        write_record(t.diag, t.dist, t.strategy.history, t.cfg.select.strategy, t.run_dir, epoch)


# ------------------------------------------------------------------ run folder outputs (main rank)
class MetricsLog(Callback):
    """RUN/metrics.jsonl (one line per epoch) and RUN/steps.jsonl (one per log step; train/ scalars and, without
    a progress bar, open_clip's log line), with TensorBoard (``t.tb``) and wandb (``t.wandb``) as sinks."""

    def __init__(self) -> None:
        self.step_log: StepLog | None = None

    def on_fit_start(self, t) -> None:
        self.step_log = StepLog(t.run_dir, t.tb, t.wandb, line=not progress_bar_shown(t.cfg.run))

    def on_log_step(self, t, epoch: int, n_steps: int, lr: float, read: dict) -> None:
        b, world = t.cfg.data.batch_size * t.accum, t.dist.world_size  # samples read per step and rank
        rec = {
            "step": t.step,
            "epoch": epoch + 1,
            "epoch_step": n_steps,
            "loss": read["loss"],
            "lr": lr,
            "logit_scale": read["logit_scale"],
            "samples_per_s": b * world / max(1e-9, read["batch_time_s"]),
            "data_time_s": read["data_time_s"],
            "batch_time_s": read["batch_time_s"],
            "selected_share": t.last_trained / b,
        }
        if "clean_share" in read:  # the shards have clean flags: share of clean pairs trained in the window
            rec["clean_share"] = read["clean_share"]
        assert self.step_log is not None  # set by on_fit_start
        self.step_log.log(rec, n_steps, t.steps_per_epoch, b, world)

    def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
        self._append(t, metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if t.tb is not None:
            for k, v in scalars.items():
                t.tb.add_scalar(k, v, t.step)
        if t.wandb is not None:
            t.wandb.log(scalars, step=t.step)

    def on_stopped(self, t, metrics: dict) -> None:
        self._append(t, metrics)

    @staticmethod
    def _append(t, metrics: dict) -> None:
        with open(os.path.join(t.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")


class TensorBoard(Callback):
    """--tensorboard: a SummaryWriter in RUN/tensorboard as ``t.tb`` (MetricsLog writes to it)."""

    def on_fit_start(self, t) -> None:
        from torch.utils.tensorboard import SummaryWriter

        t.tb = SummaryWriter(os.path.join(t.run_dir, "tensorboard"))

    def on_fit_end(self, t) -> None:
        if t.tb is not None:
            t.tb.close()


class Wandb(Callback):
    """--report-to wandb: the wandb run as ``t.wandb``; finished at the end, marked failed when the run stops
    early (``--resume latest`` continues it)."""

    def on_fit_start(self, t) -> None:
        t.wandb = init_wandb(t.cfg.run, t.cfg.to_dict(), t.run_dir)

    def on_fit_end(self, t) -> None:
        t.wandb.finish()
        t.wandb = None

    def on_fit_exit(self, t) -> None:
        if t.wandb is not None:
            t.wandb.finish(exit_code=1)
            t.wandb = None


class Plots(Callback):
    """--plots: per-epoch score/delta histograms (clean flags) and the history plots on eval epochs and the last."""

    def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
        out = os.path.join(t.run_dir, "plots")
        if t.diag.clean is not None:
            plot_epoch(t.diag.arrays(), epoch + 1, out)
        if any(k.startswith("val/") for k in metrics) or epoch + 1 == t.cfg.optim.epochs:
            plot_history(t.metrics, out)  # the epoch's metrics are in t.metrics already


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

    def on_epoch_start(self, t, epoch: int) -> None:
        from tqdm import tqdm

        if not progress_bar_shown(t.cfg.run):
            return
        self.n0 = t.epoch_step
        desc = f"epoch {epoch + 1}/{t.cfg.optim.epochs}"
        self.bar = tqdm(total=t.steps_per_epoch, initial=self.n0, desc=desc, unit="step", leave=False)
        self.t0 = time.time()

    def on_log_step(self, t, epoch: int, n_steps: int, lr: float, read: dict) -> None:
        if self.bar is None:
            return
        rate = n_steps * t.cfg.data.batch_size * t.dist.world_size * t.accum / max(1e-9, time.time() - self.t0)
        self.bar.set_postfix(loss=f"{read['loss']:.3f}", samples_s=f"{rate:.0f}", lr=f"{lr:.2e}")

    def on_step_end(self, t, epoch: int, n_steps: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_steps_end(self, t, epoch: int) -> None:
        self.close()

    def on_fit_exit(self, t) -> None:
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

    def on_step_end(self, t, epoch: int, n_steps: int) -> None:
        self.steps += 1


class EpochEndFunction(Callback):
    """A plain function of the epoch's metrics on the main rank (``Trainer.on_epoch_end``, e.g. the demo's line)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
        self.fn(metrics)


# ------------------------------------------------------------------ timing and profiling
class PhaseTiming(Callback):
    """Tells the phase marker (``t.timer``: a PhaseTimer set by a benchmark, or the --profile-steps window's
    RangeMarker) where each step begins and where its wait for the batch (the ``data`` phase) ends; opens and
    closes the --profile-steps window between steps. Installed only while a timer or a profiler exists, so a
    plain run calls none of this."""

    def on_step_start(self, t) -> None:
        if t.profiler is not None:
            t.timer = t.profiler.marker_for(t.step, t.timer)
        if t.timer is not None:
            t.timer.step()

    def on_batch(self, t) -> None:
        if t.timer is not None:
            t.timer.mark("data")

    def on_epoch_steps_end(self, t, epoch: int) -> None:
        if t.profiler is not None:  # a window ending with the epoch closes now; the epoch's end is no step
            t.timer = t.profiler.marker_for(t.step, t.timer, epoch_end=True)

    def on_fit_end(self, t) -> None:
        if t.profiler is not None:
            t.profiler.report()

    def on_fit_exit(self, t) -> None:
        if t.profiler is not None:  # a run stopped inside the window still writes what it traced
            t.profiler.close()


# ------------------------------------------------------------------ test-only fault injection
class FaultInjection(Callback):
    """Fault injection for the tests ONLY. ``kill_step``: SIGKILL this process after that global step (tests
    elastic restarts); ``drift_step``: corrupt history entry 0 after that step (tests that --check-sync-every
    catches diverged replicas)."""

    KILL_VAR, DRIFT_VAR = "DISSECT_FAST_TEST_KILL_AT_STEP", "DISSECT_FAST_TEST_DRIFT_AT_STEP"

    def __init__(self, kill_step: int | None = None, drift_step: int | None = None) -> None:
        self.kill_step, self.drift_step = kill_step, drift_step

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection | None:
        """The torchrun-launched tests' entry point, read once at set-up: ``DISSECT_FAST_TEST_KILL_AT_STEP`` /
        ``DISSECT_FAST_TEST_DRIFT_AT_STEP`` = RANK:STEP (the kill only on the first attempt, not after a
        torchelastic restart). None when neither applies to this rank."""
        kill = cls._parse(cls.KILL_VAR, rank) if elastic_restart_count() == 0 else None
        drift = cls._parse(cls.DRIFT_VAR, rank)
        return cls(kill, drift) if kill is not None or drift is not None else None

    @staticmethod
    def _parse(var: str, rank: int) -> int | None:
        v = os.environ.get(var)
        if not v:
            return None
        try:
            r, s = (int(x) for x in v.split(":"))
        except ValueError:
            raise ValueError(f"{var}={v!r}: expected RANK:STEP (test-only variable)") from None
        return s if r == rank else None

    def on_step_end(self, t, epoch: int, n_steps: int) -> None:
        history = t.strategy.history
        if t.step == self.drift_step and history is not None:
            with torch.no_grad():
                h0 = history.values[:1]
                h0.copy_(torch.nan_to_num(h0.float(), nan=0.0) + 1.0)
        if t.step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
