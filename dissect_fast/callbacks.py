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
import time
from typing import Any

import torch

from dissect_fast.diagnostics import plot_epoch, plot_history, write_record
from dissect_fast.distributed import check_in_sync, elastic_restart_count
from dissect_fast.evaluate import evaluate
from dissect_fast.logging_utils import StepLog, init_wandb

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
    """--record: ``select_record/record_{epoch}.npz`` per epoch (``diagnostics.write_record``; a collective)."""

    def on_epoch_end(self, t, epoch: int, metrics: dict) -> None:
        write_record(t.diag, t.dist, t.strategy.history, t.cfg.select.strategy, t.run_dir, epoch)


# ------------------------------------------------------------------ run folder outputs (main rank)
class MetricsLog(Callback):
    """RUN/metrics.jsonl (one line per epoch) and RUN/steps.jsonl (one per log step; train/ scalars and, without
    a progress bar, open_clip's log line), with TensorBoard (``t.tb``) and wandb (``t.wandb``) as sinks."""

    def __init__(self) -> None:
        self.step_log: StepLog | None = None

    def on_fit_start(self, t) -> None:
        self.step_log = StepLog(t.run_dir, t.tb, t.wandb, line=not t.cfg.run.progress)

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


class ProgressBar(Callback):
    """--progress: a tqdm bar per epoch with loss, samples/s and lr at log steps."""

    def __init__(self) -> None:
        self.bar: Any = None  # the epoch's tqdm bar
        self.t0, self.n0 = 0.0, 0

    def on_epoch_start(self, t, epoch: int) -> None:
        from tqdm import tqdm

        self.n0 = t.epoch_step
        self.bar = tqdm(total=t.steps_per_epoch, initial=self.n0, desc=f"epoch {epoch}", unit="step", leave=False)
        self.t0 = time.time()

    def on_log_step(self, t, epoch: int, n_steps: int, lr: float, read: dict) -> None:
        rate = n_steps * t.cfg.data.batch_size * t.dist.world_size * t.accum / max(1e-9, time.time() - self.t0)
        self.bar.set_postfix(loss=f"{read['loss']:.3f}", samples_s=f"{rate:.0f}", lr=f"{lr:.2e}")

    def on_step_end(self, t, epoch: int, n_steps: int) -> None:
        self.bar.update(1)

    def on_epoch_steps_end(self, t, epoch: int) -> None:
        self.close()

    def on_fit_exit(self, t) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
