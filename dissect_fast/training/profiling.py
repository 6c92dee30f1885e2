"""Where a training step's time goes: the step's phases, and the ``--profile-steps A:B`` window.

The trainer splits every step into :data:`PHASES` and reports their boundaries to a *phase marker*
(``callbacks.Context.timer``, None by default: then the step runs none of this code): ``step()`` as a step
begins (its first phase, ``data``, is the wait for the batch), ``mark(phase)`` as ``phase`` ends
and the next phase of :data:`PHASES` begins. The phases are defined here once; two markers read them:

* :class:`dissect_fast.training.timing.PhaseTimer` (benchmarks): per-phase durations from CUDA events;
* :class:`RangeMarker`: a named range per phase, and ``ProfilerStep#N`` per step, in a torch.profiler
  trace (``record_function``) and, on CUDA, as NVTX ranges for Nsight Systems.

:class:`StepProfiler` runs the window: at global step A it starts torch.profiler (and, on CUDA,
``cudaProfilerStart`` so that ``nsys profile --capture-range=cudaProfilerApi`` captures exactly the
window) and attaches a RangeMarker; at step B it stops both and writes ``RUN/profile/``: the Chrome
trace, ``top_ops.txt`` and ``phases.json``. Starting and stopping synchronise the device once each,
between steps; the steps outside the window run no profiling code.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
from typing import Protocol

import torch

log = logging.getLogger("dissect_fast")

#: the phases of a training step, in the order the trainer marks them (benchmarks/README.md explains each)
PHASES = ("data", "score", "select", "train", "optim", "sync", "other")
_NEXT = dict(itertools.pairwise(PHASES))

#: Chrome-trace categories: host-side kernel launches, and the device work they launch
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


class PhaseMarker(Protocol):
    """What the trainer calls at phase boundaries (see the module docstring)."""

    def step(self) -> None:
        """A step begins (and the previous one, if any, ends); its first phase is ``data``."""

    def mark(self, phase: str) -> None:
        """``phase`` ends here; the next phase of PHASES begins."""


class RangeMarker:
    """Phase boundaries as nested ranges: ``ProfilerStep#N`` around each step (the name torch.profiler and
    TensorBoard's profiler plugin use for steps), one range per phase inside it. record_function ranges
    reach the torch.profiler trace; on CUDA the same names are pushed as NVTX ranges. Every call is also
    forwarded to ``inner`` (a marker attached before the window, e.g. a PhaseTimer)."""

    def __init__(self, first_step: int, cuda: bool, inner: PhaseMarker | None = None) -> None:
        self.next_step, self.cuda, self.inner = first_step, cuda, inner
        self.steps = 0  #: steps begun inside this marker
        self._open: list[torch.autograd.profiler.record_function] = []  # step range, then the phase range

    def _push(self, name: str) -> None:
        r = torch.autograd.profiler.record_function(name)
        r.__enter__()
        self._open.append(r)
        if self.cuda:
            torch.cuda.nvtx.range_push(name)

    def _pop(self) -> None:
        self._open.pop().__exit__(None, None, None)
        if self.cuda:
            torch.cuda.nvtx.range_pop()

    def step(self) -> None:
        if self.inner is not None:
            self.inner.step()
        self.close()
        self._push(f"ProfilerStep#{self.next_step}")
        self._push(PHASES[0])
        self.next_step += 1
        self.steps += 1

    def mark(self, phase: str) -> None:
        if self.inner is not None:
            self.inner.mark(phase)
        if not self._open:  # no step begun (train_step called directly): nothing to range
            return
        if len(self._open) > 1:
            self._pop()
        nxt = _NEXT.get(phase)
        if nxt is not None:
            self._push(nxt)

    def close(self) -> None:
        """End the open ranges (the step in progress, or the last one of an epoch or window)."""
        while self._open:
            self._pop()


class StepProfiler:
    """``--profile-steps A:B``: a torch.profiler trace of global steps A..B-1 with the phases as ranges.

    Args:
        start, stop: the window, global 0-based steps [start, stop).
        out_dir: where the trace, ``top_ops.txt`` and ``phases.json`` go (``RUN/profile``).
        device: the training device; CUDA adds CUDA activity, NVTX ranges and cudaProfilerStart/Stop.
        rank: names the trace ``rank{rank}.pt.trace.json`` (every rank writes its own).
        summary: write ``top_ops.txt`` and ``phases.json`` (the main rank).
        record_shapes, with_stack: torch.profiler's options (off: they inflate the trace and its overhead).
    """

    def __init__(
        self,
        start: int,
        stop: int,
        out_dir: str,
        device: torch.device,
        *,
        rank: int = 0,
        summary: bool = True,
        record_shapes: bool = False,
        with_stack: bool = False,
    ) -> None:
        if not 0 <= start < stop:
            raise ValueError(f"--profile-steps {start}:{stop}: need 0 <= A < B")
        self.start, self.stop, self.out_dir, self.device = start, stop, out_dir, device
        self.cuda = device.type == "cuda"
        self.rank, self.summary = rank, summary
        self.record_shapes, self.with_stack = record_shapes, with_stack
        self.marker: RangeMarker | None = None  #: attached while the window is open
        self.trace: str | None = None  #: the trace file, once written
        self.profiled: tuple[int, int] | None = None  #: the steps [first, end) the trace holds
        self._prof: torch.profiler.profile | None = None

    # ------------------------------------------------------------------ the window
    def marker_for(self, step: int, current: PhaseMarker | None, epoch_end: bool = False) -> PhaseMarker | None:
        """The marker for global step ``step``, asked before its data wait: opens the window at ``start`` (the
        returned RangeMarker wraps ``current``), closes it at ``stop``; ``current`` otherwise. ``epoch_end``:
        asked after an epoch's last step, so that the epoch's end (evaluation, checkpoint) lies outside the
        step ranges."""
        if self._prof is None:
            if not epoch_end and self.trace is None and self.start <= step < self.stop:
                return self._begin(step, current)
            return current
        if step >= self.stop:
            return self._end()
        if epoch_end:
            assert self.marker is not None  # set with self._prof
            self.marker.close()
        return current

    def _begin(self, step: int, current: PhaseMarker | None) -> RangeMarker:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)  # the steps before the window stay out of it
        self._prof = torch.profiler.profile(
            activities=acts, record_shapes=self.record_shapes, with_stack=self.with_stack
        )
        self._prof.start()
        if self.cuda:
            torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi starts here
        self.marker = RangeMarker(step, self.cuda, inner=current)
        return self.marker

    def _end(self) -> PhaseMarker | None:
        marker, prof = self.marker, self._prof
        assert marker is not None and prof is not None  # the window is open
        marker.close()
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the window's last kernels finish inside the trace
            torch.cuda.profiler.stop()
        prof.stop()
        self._prof = self.marker = None
        first = marker.next_step - marker.steps
        self.profiled = (first, marker.next_step)
        self._write(prof, marker.steps)
        return marker.inner

    def close(self) -> None:
        """End a window still open (the run stopped inside it): what it traced is written."""
        if self._prof is not None:
            self._end()

    # ------------------------------------------------------------------ the outputs
    def _write(self, prof: torch.profiler.profile, steps: int) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        self.trace = os.path.join(self.out_dir, f"rank{self.rank}.pt.trace.json")
        prof.export_chrome_trace(self.trace)
        assert self.profiled is not None  # set by _end
        first, end = self.profiled
        if self.summary:
            avg = prof.key_averages()
            head = f"steps {first}..{end - 1} ({steps} steps) on {self.device}"
            parts = [f"# {head}: top ops by self CPU time\n", avg.table(sort_by="self_cpu_time_total", row_limit=15)]
            if self.cuda:
                parts += [
                    f"\n\n# {head}: top ops by self CUDA time\n",
                    avg.table(sort_by="self_cuda_time_total", row_limit=15),
                ]
            with open(os.path.join(self.out_dir, "top_ops.txt"), "w") as f:
                f.write("".join(parts) + "\n")
            with open(self.trace) as f:
                events = json.load(f).get("traceEvents", [])
            totals = {
                "steps": [first, end],
                "steps_profiled": steps,
                "device": str(self.device),
                "trace": os.path.basename(self.trace),
                **phase_totals(events, steps, self.cuda),
            }
            with open(os.path.join(self.out_dir, "phases.json"), "w") as f:
                json.dump(totals, f, indent=1)
        log.info("profile: steps %d..%d traced to %s", first, end - 1, self.trace)

    def report(self) -> None:
        """Log where the trace is and how to open it (end of the run)."""
        if self.trace is None:
            log.warning(
                "--profile-steps %d:%d: no step of the window ran in this run (resumed past it?); no trace written",
                self.start,
                self.stop,
            )
            return
        assert self.profiled is not None  # set with the trace
        first, end = self.profiled
        log.info(
            "profile of steps %d..%d: %s (per-phase totals: %s, top ops: %s)",
            first,
            end - 1,
            self.trace,
            os.path.join(self.out_dir, "phases.json"),
            os.path.join(self.out_dir, "top_ops.txt"),
        )
        log.info(
            "open it in https://ui.perfetto.dev or `tensorboard --logdir %s` (torch-tb-profiler plugin)", self.out_dir
        )


def phase_totals(events: list[dict], steps: int, device_times: bool) -> dict:
    """Per-phase totals from a Chrome trace's events (what ``phases.json`` holds).

    ``cpu_ms``: host time inside the phase's ranges. The step never waits for the device, so on CUDA this is
    launch time, and device work shows where the host first waits for it. ``device_ms`` (``device_times``):
    the duration of the kernels, copies and memsets launched while the phase's range was open, on any host
    thread (backward launches from autograd's own thread while the main thread sits in ``train``); kernels
    on concurrent streams add up. ``*_per_step``: divided by ``steps``."""
    ranges = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    out: dict[str, dict] = {p: {"ranges": 0, "cpu_ms": 0.0} for p in PHASES}
    step_ms, spans = 0.0, []
    for e in ranges:
        name, dur = e.get("name", ""), float(e.get("dur", 0.0))
        if name in out:
            out[name]["ranges"] += 1
            out[name]["cpu_ms"] += dur / 1e3
            spans.append((float(e["ts"]), float(e["ts"]) + dur, name))
        elif name.startswith("ProfilerStep#"):
            step_ms += dur / 1e3
    if device_times:
        for p in PHASES:
            out[p]["device_ms"] = 0.0
        spans.sort()
        starts = [s[0] for s in spans]
        launched = {}  # correlation id -> phase
        for e in events:
            if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {}):
                i = bisect.bisect_right(starts, float(e["ts"])) - 1
                if i >= 0 and float(e["ts"]) <= spans[i][1]:
                    launched[e["args"]["correlation"]] = spans[i][2]
        for e in events:
            if e.get("cat") in _DEVICE_CATS and e.get("args", {}).get("correlation") in launched:
                out[launched[e["args"]["correlation"]]]["device_ms"] += float(e.get("dur", 0.0)) / 1e3
    n = max(1, steps)
    for v in out.values():
        for k in [k for k in v if k.endswith("_ms")]:
            v[k] = round(v[k], 4)
            v[f"{k}_per_step"] = round(v[k] / n, 4)
    return {
        "step_ms": round(step_ms, 4),
        "step_ms_per_step": round(step_ms / n, 4),
        "phases": out,
        "notes": "cpu_ms: host time in the phase's ranges (on CUDA mostly launch time: the step does not wait "
        "for the device). device_ms: duration of the device work launched inside the phase's ranges, "
        "from any host thread.",
    }
