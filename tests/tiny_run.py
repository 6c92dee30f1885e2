"""Tiny CPU training runs for the tests: the flags of a short run in one place, so a test states only what it
changes.

    from tiny_run import tiny_argv, tiny_fit, tiny_trainer

    t, metrics = tiny_fit(tmp_path, "run", "--select-strategy", "dissect-momentum", data=tiny_data)

``tiny_argv`` is the command line (``dissect_fast.train``'s flags): a micro model on the CPU for 2 epochs, no
progress bar, TensorBoard or plots, and ``extra`` last (a flag given again there wins: argparse keeps the last).
Keyword arguments set the common flags; None leaves a flag out (the trainer's default then applies).
"""

from __future__ import annotations

from pathlib import Path


def tiny_argv(
    logs,
    name: str | None,
    *extra: str,
    data: Path | None = None,
    val: bool = False,
    synthetic: bool = False,
    model: str = "micro-vit",
    batch: int = 40,
    epochs: int = 2,
    lr: str | None = "1e-3",
    warmup: int = 2,
    workers: int | None = 0,
    plots: bool = False,
    tensorboard: bool = False,
) -> list[str]:
    """The flags of a tiny run. ``data``: a folder with ``train`` (and ``val``: ``val=True``) shards, as the
    ``tiny_data`` fixture makes; ``synthetic``: ``--data-backend synthetic`` instead; ``name`` None: no
    ``--name``."""
    argv: list[str] = []
    if data is not None:
        argv += ["--train-data", str(Path(data) / "train")]
        if val:
            argv += ["--val-data", str(Path(data) / "val")]
    if synthetic:
        argv += ["--data-backend", "synthetic"]
    argv += ["--model", model, "--batch-size", str(batch), "--epochs", str(epochs)]
    if lr is not None:
        argv += ["--lr", str(lr)]
    argv += ["--warmup", str(warmup)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    argv += ["--logs", str(logs), *(["--name", name] if name else []), "--no-progress"]
    argv += [] if tensorboard else ["--no-tensorboard"]
    argv += [] if plots else ["--no-plots"]
    return [*argv, "--device", "cpu", *extra]


def tiny_trainer(logs, name: str | None, *extra: str, **kw):
    """A Trainer of ``tiny_argv(logs, name, *extra, **kw)``."""
    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    return Trainer(config_from_args(tiny_argv(logs, name, *extra, **kw)))


def tiny_fit(logs, name: str | None, *extra: str, **kw):
    """(the Trainer, its ``fit()`` metrics) of ``tiny_argv(logs, name, *extra, **kw)``."""
    t = tiny_trainer(logs, name, *extra, **kw)
    return t, t.fit()
