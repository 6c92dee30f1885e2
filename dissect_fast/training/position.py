"""The loop's position as a checkpoint component: where a resumed run continues, and the counts that run on
across every start of a run."""

from __future__ import annotations

import time

from dissect_fast.training.callbacks import Context


class Progress:
    """The loop's position as a checkpoint component: ``epoch`` (epochs done), ``step``, the epochs' ``metrics``,
    and ``samples_seen`` / ``wall_s`` across every start of the run (they continue on resume)."""

    def __init__(self, ctx: Context, samples_per_step: int) -> None:
        self.ctx, self.samples_per_step = ctx, samples_per_step
        self.epoch_done = 0  #: what the next save records as ``epoch``
        self.base = (0, 0, 0.0)  #: (step, samples_seen, wall_s) this start continues from
        self.t0 = time.time()  #: wall_s counts from here (this start's fit), plus the earlier starts' time

    def samples_seen(self) -> int:
        step0, seen0, _ = self.base
        return seen0 + (self.ctx.step - step0) * self.samples_per_step

    def wall_s(self, since: float | None = None) -> float:
        return round(self.base[2] + time.time() - (self.t0 if since is None else since), 3)

    def state_dict(self) -> dict:
        c = self.ctx
        return {"epoch": self.epoch_done, "step": c.step, "metrics": c.metrics} | {
            "samples_seen": self.samples_seen(),
            "wall_s": self.wall_s(),
        }

    def load_state_dict(self, state: dict) -> None:
        c = self.ctx
        c.start_epoch, c.step = int(state["epoch"]), int(state["step"])
        c.metrics = list(state.get("metrics", []))
        last = c.metrics[-1] if c.metrics else {}
        seen = int(state.get("samples_seen", c.step * self.samples_per_step))  # older checkpoints: from the step
        self.base = (c.step, seen, float(state.get("wall_s", last.get("wall_s", 0.0))))
