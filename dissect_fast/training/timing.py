"""Per-phase step timing for benchmarks: CUDA events on GPU, perf_counter on CPU.

A :class:`dissect_fast.training.profiling.PhaseMarker`: the trainer calls ``mark(phase)`` at the end of each
phase of a step (the phases: ``dissect_fast.training.profiling.PHASES``) when a timer is attached
(``callbacks.Context.timer``; None by default, and then the step runs no timing code at all). A segment
between two consecutive marks is charged to the later mark's phase. On CUDA every mark records
an event into the current stream (no host synchronisation), so phases are measured on the GPU's
timeline: a host stall (e.g. waiting for data) only shows where it leaves the GPU idle. Events
are read once, in ``collect()``, after one synchronize. On CPU, ops run synchronously and a mark
reads ``time.perf_counter()``. :class:`TimedSteps` attaches timers to a window of ``Trainer.fit``'s steps.
"""

from __future__ import annotations

import statistics
import time

import torch

from dissect_fast.training.callbacks import PhaseTiming
from dissect_fast.training.profiling import PHASES

__all__ = ["PHASES", "PhaseTimer", "TimedSteps"]


class PhaseTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self._bounds: list[int] = []  # indices into _marks where a step begins

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        """End of ``phase``: the time since the previous mark is charged to it."""
        self._marks.append((phase, self._now()))

    def step(self) -> None:
        """Step boundary (call before each step and once after the last): closes the previous step;
        the time since its last mark (loop overhead) is charged to ``other``."""
        self._bounds.append(len(self._marks))
        self.mark("other")

    def collect(self) -> dict:
        """Seconds per phase (summed over the timed steps, and the per-step median), per-step durations."""
        if self.cuda:
            torch.cuda.synchronize()
        if len(self._bounds) < 2:
            raise RuntimeError("PhaseTimer.collect: call step() before the first and after the last step")
        first, last = self._bounds[0], self._bounds[-1]

        def dt(a, b) -> float:
            if self.cuda:
                return a.elapsed_time(b) / 1e3
            return b - a

        per_step = []
        for a, b in zip(self._bounds, self._bounds[1:]):
            ph = dict.fromkeys(PHASES, 0.0)
            for i in range(a + 1, b + 1):
                name, t = self._marks[i]
                ph[name] = ph.get(name, 0.0) + dt(self._marks[i - 1][1], t)
            per_step.append(ph)
        steps = [dt(self._marks[a][1], self._marks[b][1]) for a, b in zip(self._bounds, self._bounds[1:])]
        return {
            "phases_s": {p: sum(ph[p] for ph in per_step) for p in per_step[0]},
            "phases_median_s": {p: statistics.median(ph[p] for ph in per_step) for p in per_step[0]},
            "per_step_phases_s": per_step,
            "step_s": steps,
            "median_step_s": statistics.median(steps),
            "total_s": dt(self._marks[first][1], self._marks[last][1]),
        }


class TimedSteps(PhaseTiming):
    """A callback that times global steps ``start .. start + blocks * block - 1`` of ``Trainer.fit``, per phase,
    and leaves every other step untimed (the trainer runs no timing code outside the window).

    Each block of ``block`` steps gets a fresh :class:`PhaseTimer` (``ctx.timer``): the device is synchronised
    before the block's first step and after its last, so a block's steps are measured whole. ``before_block``:
    a function of the callbacks.Context called before each block (``benchmarks/bench_train.py`` hands its turn to the next
    configuration there). After the fit: ``step_s`` (per-step seconds), ``phases`` (per-step seconds per phase),
    ``wall_s`` (host wall-clock of the blocks). A subclass of PhaseTiming, so the trainer adds no second one."""

    def __init__(self, start: int, block: int, blocks: int = 1, before_block=None) -> None:
        self.start, self.block, self.end = start, block, start + block * blocks
        self.before_block = before_block
        self.step_s: list[float] = []
        self.phases: list[dict] = []
        self.wall_s = 0.0
        self._timer: PhaseTimer | None = None
        self._w0 = 0.0

    def on_step_start(self, ctx) -> None:
        if self.start <= ctx.step < self.end and (ctx.step - self.start) % self.block == 0:
            if self.before_block is not None:
                self.before_block(ctx)
            _sync(ctx.device)
            ctx.timer = self._timer = PhaseTimer(ctx.device)
            self._w0 = time.perf_counter()
        super().on_step_start(ctx)  # the timer's step boundary (and a --profile-steps window, if any)

    def on_step_end(self, ctx, epoch: int, n_steps: int) -> None:
        if self._timer is not None and (ctx.step - self.start) % self.block == 0:  # the block's last step
            self._timer.step()
            _sync(ctx.device)
            self.wall_s += time.perf_counter() - self._w0
            res = self._timer.collect()
            self.step_s += res["step_s"]
            self.phases += res["per_step_phases_s"]
            ctx.timer = self._timer = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
