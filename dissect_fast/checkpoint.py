"""Atomic checkpoints that open_clip can load (``state_dict`` key) and that resume a run exactly."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def rng_state() -> dict:
    st = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file, fsync, then rename: a reader sees the old or the new file, whole."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by save_checkpoint; a clear error for a damaged or foreign file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RuntimeError(f"checkpoint {path} has no state_dict: not a dissect_fast/open_clip checkpoint")
    return ckpt


def strip_prefixes(sd: dict) -> dict:
    """Model weights without torch.compile / DDP wrappers' prefixes, as open_clip expects."""
    out = {}
    for k, v in sd.items():
        for p in ("_orig_mod.", "module."):
            k = k.replace(p, "")
        out[k] = v
    return out
