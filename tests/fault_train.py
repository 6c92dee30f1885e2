"""A test entry point: ``dissect_fast/train.py`` with fault injection, launched by torchrun in the tests.

Environment (RANK:STEP, the global step after which the fault happens on that rank):

``DISSECT_FAST_TEST_KILL_AT_STEP``   SIGKILL the process (first attempt only, not after a torchelastic restart):
                                     tests elastic restarts and the resume from the last checkpoint
``DISSECT_FAST_TEST_DRIFT_AT_STEP``  change history entry 0 on that rank: tests that --check-sync-every catches
                                     replicas that diverged
"""

from __future__ import annotations

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from dissect_fast.training.callbacks import Callback  # noqa: E402
from dissect_fast.training.distributed import elastic_restart_count  # noqa: E402

KILL_VAR, DRIFT_VAR = "DISSECT_FAST_TEST_KILL_AT_STEP", "DISSECT_FAST_TEST_DRIFT_AT_STEP"


def step_for_rank(var: str, rank: int) -> int | None:
    """The step of ``var`` (RANK:STEP) when it names ``rank``; None when unset or for another rank."""
    v = os.environ.get(var)
    if not v:
        return None
    try:
        r, s = (int(x) for x in v.split(":"))
    except ValueError:
        raise ValueError(f"{var}={v!r}: expected RANK:STEP") from None
    return s if r == rank else None


class FaultInjection(Callback):
    """After global step ``kill_step``: SIGKILL this process; after ``drift_step``: corrupt history entry 0."""

    def __init__(self, kill_step: int | None, drift_step: int | None) -> None:
        self.kill_step, self.drift_step = kill_step, drift_step

    def on_step_end(self, ctx, epoch: int, n_steps: int) -> None:
        history = ctx.strategy.history
        if ctx.step == self.drift_step and history is not None:
            with torch.no_grad():
                h0 = history.values[:1]
                h0.copy_(torch.nan_to_num(h0.float(), nan=0.0) + 1.0)
        if ctx.step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    from dissect_fast.train import main as train_main

    rank = int(os.environ.get("RANK", "0"))
    kill = step_for_rank(KILL_VAR, rank) if elastic_restart_count() == 0 else None
    train_main(sys.argv[1:], callbacks=[FaultInjection(kill, step_for_rank(DRIFT_VAR, rank))])


if __name__ == "__main__":
    main()
