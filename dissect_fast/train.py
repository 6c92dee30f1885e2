"""Entry point: ``torchrun dissect_fast/train.py ...`` or ``python -m dissect_fast.train ...``."""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script by torchrun: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> list[dict]:
    from dissect_fast.config import config_from_args
    from dissect_fast.distributed import cleanup
    from dissect_fast.reliability import RunStopped
    from dissect_fast.trainer import Trainer

    cfg = config_from_args(argv)
    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # set-up errors: a message, not a traceback
        print(f"dissect_fast.train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return trainer.fit()
    except RunStopped as e:  # a full disk, bad data, non-finite steps, SIGTERM/SIGINT: a message, not a traceback
        print(f"dissect_fast.train: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    finally:
        cleanup(trainer.dist)


if __name__ == "__main__":
    main()
