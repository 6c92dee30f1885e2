"""Where a result came from: commit, versions, device, host, date and command, computed here and nowhere else.

A run folder's ``provenance.json`` (``run_folder.write_run_start``) and every benchmark's JSON
(``benchmarks/benchkit.py``) carry :func:`provenance`. Importing this module imports no torch (the GPU check's
parent process reads the commit before any phase starts): torch is imported only to name a device or a version.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import shlex
import subprocess
import sys

__all__ = ["device_name", "git_commit", "provenance", "utc_now", "versions"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def git_commit() -> str:
    """HEAD of the checkout this package runs from, ``+dirty`` when tracked files differ from it; ``unknown``
    without git (a wheel, or a working tree copied without ``.git``)."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def device_name(device=None) -> str:
    """The GPU's name, or ``cpu (PROCESSOR, N cores, T torch threads)``; ``device``: a torch.device or a string
    (None: cuda when available)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)"
    )


def _module_version(name: str) -> str | None:
    try:
        return getattr(importlib.import_module(name), "__version__", "?")
    except Exception:  # noqa: BLE001 (a missing or broken package is recorded as None, never fatal)
        return None


def versions(*extra: str) -> dict:
    """Python, torch (and its CUDA), open_clip and numpy, plus the modules named in ``extra`` (None: not
    importable)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "open_clip", "numpy", *extra):
        out[name] = _module_version(name)
    torch = sys.modules.get("torch")
    out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: UP017 (3.10)


def provenance(device=None, *, command: str | None = None, modules: tuple[str, ...] = ()) -> dict:
    """``commit``, ``date`` (UTC), ``device`` (:func:`device_name`), ``host``, ``platform`` (OS), ``versions``
    (:func:`versions` with ``modules``) and ``command`` (default: this process's command line)."""
    if command is None:
        command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    return {
        "commit": git_commit(),
        "date": utc_now(),
        "device": device_name(device),
        "host": platform.node(),
        "platform": platform.platform(),
        "versions": versions(*modules),
        "command": command,
    }
