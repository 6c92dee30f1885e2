"""Entry point: ``torchrun dissect_fast/train.py ...`` or ``python -m dissect_fast.train ...``."""

from __future__ import annotations

import glob
import os
import shutil
import sys

if __package__ in (None, ""):  # run as a script by torchrun: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def new_run_folder(run_cfg) -> bool:
    """Whether the run folder this process is about to use does not exist yet (read before the Trainer names and
    makes it): only such a folder may be removed again when the run fails before its first step. A run without
    --name gets a fresh name unless it is a torchelastic restart, which reuses its first attempt's folder."""
    from dissect_fast.training.distributed import elastic_restart_count

    if run_cfg.name is None:
        return elastic_restart_count() == 0
    return not os.path.exists(os.path.join(run_cfg.logs, run_cfg.name))


def remove_unstarted_run(run_dir: str) -> bool:
    """Remove ``run_dir`` when it holds no checkpoint (a run that failed before its first step: its folder would
    block the name); returns whether it was removed."""
    if not os.path.isdir(run_dir) or glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def main(argv: list[str] | None = None, callbacks: list | None = None) -> list[dict]:
    """Parse, build the run, train. ``callbacks``: added to the run's own (a test entry point's)."""
    from dissect_fast.config import config_from_args

    cfg = config_from_args(argv)  # first, without torch: --help and flag errors answer at once
    from dissect_fast.training.callbacks import StepsSeen
    from dissect_fast.training.distributed import cleanup
    from dissect_fast.training.loop import Trainer
    from dissect_fast.training.reliability import RunStopped

    fresh = new_run_folder(cfg.run)
    seen = StepsSeen()
    try:
        trainer = Trainer(cfg, callbacks=[seen, *(callbacks or [])])
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # set-up errors: a message, not a traceback
        print(f"dissect_fast.train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return trainer.fit()
    except BaseException as e:
        if fresh and seen.steps == 0 and trainer.run.dist.is_main and remove_unstarted_run(trainer.run.run_dir):
            print(
                f"dissect_fast.train: the run failed before its first step; removed {trainer.run.run_dir}",
                file=sys.stderr,
            )
        if isinstance(e, RunStopped):  # a full disk, bad data, non-finite steps, SIGTERM/SIGINT: a message
            print(f"dissect_fast.train: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        raise
    finally:
        cleanup(trainer.run.dist)


if __name__ == "__main__":
    main()
