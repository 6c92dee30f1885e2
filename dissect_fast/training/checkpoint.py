"""Atomic, verified checkpoints that open_clip can load (``state_dict`` key) and that resume a run exactly.

Writing (``ioutil.atomic_write``): the state is serialised into ``<path>.tmp.<pid>.<thread>`` while its
SHA-256 is computed, fsynced, renamed over ``<path>`` (atomic on POSIX) and the directory fsynced; then a sidecar
``<path>.sha256`` (JSON: size, sha256, epoch, step) is written the same way. The old sidecar is
removed *before* the rename, so a sidecar that exists always describes the file beside it: a
mismatch means the file was damaged after it was written. A process killed at any point leaves
the previous file whole (plus, at worst, a stale ``.tmp.*`` file that the next run removes).

Reading: ``load_checkpoint`` checks size and hash against the sidecar when there is one, then
``torch.load``s; any failure is a ``CheckpointError``. ``find_resumable`` returns the newest
checkpoint of a run folder that passes both, so ``--resume latest`` falls back past a damaged file.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from dissect_fast.ioutil import atomic_write, fsync_dir

log = logging.getLogger("dissect_fast")
SIDECAR = ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or foreign; the message names the file."""


class DiskFullError(OSError):
    """No space left while writing a checkpoint; the previous checkpoint is intact."""


def rng_state() -> dict:
    st = np.random.get_state()
    assert isinstance(st, tuple)  # legacy=True (the default): ("MT19937", keys, pos, ...)
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


class _HashingWriter:
    """File wrapper that hashes what goes through it (torch.save needs write/flush only)."""

    def __init__(self, f) -> None:
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        n = self.f.write(b)
        self.h.update(memoryview(b)[:n] if n is not None else b)
        self.size += n if n is not None else len(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_atomic(path: str, write, before_replace=None) -> None:
    """``write(fileobj)`` through ``ioutil.atomic_write`` (temporary file, fsync, rename over ``path``, fsync
    the folder). ENOSPC (or a quota) becomes DiskFullError; the temporary file is removed on any failure."""
    try:
        with atomic_write(path, "wb", before_replace=before_replace) as f:
            write(f)
    except BaseException as e:
        if _is_enospc(e):
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on the device while writing checkpoint {path}: free space there or "
                f"point --logs at a bigger disk; the previous checkpoint is intact",
            ) from e
        raise


def _is_enospc(e: BaseException | None) -> bool:
    for _ in range(8):  # torch.save may wrap the OSError in a RuntimeError
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _write_sidecar(path: str, meta: dict) -> None:
    data = json.dumps(meta).encode()
    _write_atomic(path + SIDECAR, lambda f: f.write(data))


def save_checkpoint(state: dict, path: str) -> dict:
    """Atomically write ``state`` to ``path`` with a verified sidecar; returns the sidecar's content."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    meta: dict = {}

    def write(f):
        hw = _HashingWriter(f)
        torch.save(state, hw)  # type: ignore[arg-type]  # torch.save's hint says IO[bytes]; write/flush suffice
        meta.update(size=hw.size, sha256=hw.h.hexdigest())

    _write_atomic(path, write, before_replace=lambda: _remove(path + SIDECAR))
    # until the new sidecar exists, `path` is checked by loading it; a sidecar always matches its file
    meta.update(epoch=state.get("epoch"), step=state.get("step"), epoch_step=state.get("epoch_step", 0))
    _write_sidecar(path, meta)
    return meta


def link_checkpoint(src: str, dst: str) -> None:
    """Make ``dst`` the same checkpoint as ``src`` (a hard link, so no second copy on disk; a copy where
    the file system has no hard links), atomically, sidecar included."""

    tmp = f"{dst}.tmp.{os.getpid()}"
    _remove(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        _remove(dst + SIDECAR)
        os.replace(tmp, dst)
    except BaseException as e:
        _remove(tmp)
        if _is_enospc(e):
            raise DiskFullError(
                errno.ENOSPC, f"no space left on the device while writing {dst}; {src} is intact"
            ) from e
        raise
    if os.path.isfile(src + SIDECAR):
        with open(src + SIDECAR, "rb") as f:
            data = f.read()
        _write_atomic(dst + SIDECAR, lambda f: f.write(data))
    fsync_dir(os.path.dirname(dst))


def read_sidecar(path: str) -> dict | None:
    try:
        with open(path + SIDECAR) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def verify_checkpoint(path: str) -> None:
    """Raise CheckpointError when ``path`` does not match its sidecar (size, then SHA-256)."""
    meta = read_sidecar(path)
    if meta is None:
        return  # no sidecar (a file from elsewhere, or a kill between rename and sidecar): loading checks it
    size = os.path.getsize(path)
    if size != meta.get("size"):
        raise CheckpointError(f"checkpoint {path} is damaged: {size} bytes, its sidecar says {meta.get('size')}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is damaged: its SHA-256 does not match {path}{SIDECAR}")


#: one checkpoint loaded with ``keep=True`` (the resume's config, read while the flags are parsed), handed to the
#: next load of the same file (the Trainer's resume) instead of verifying and reading it a second time
_kept: dict[tuple, dict] = {}


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # latest.pt is a hard link to epoch_N.pt: same key


def load_checkpoint(path: str, verify: bool = True, keep: bool = False) -> dict:
    """Load a checkpoint written by save_checkpoint; CheckpointError for a damaged or foreign file. ``keep``: also
    keep it for the next call on the same (unchanged) file, which then returns it without reading the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    key = _file_key(path)
    if key in _kept:
        return _kept[key] if keep else _kept.pop(key)
    if verify:
        verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no state_dict: not a dissect_fast/open_clip checkpoint")
    if keep:
        _kept.clear()
        _kept[key] = ckpt
    return ckpt


def _order_key(path: str) -> tuple:
    """Newest first: by the step recorded in the sidecar, else by the epoch in the name, then mtime."""
    meta = read_sidecar(path) or {}
    m = re.fullmatch(r"epoch_(\d+)\.pt", os.path.basename(path))
    step = meta.get("step")
    return (step if isinstance(step, int) else -1, int(m.group(1)) if m else -1, os.path.getmtime(path))


def find_resumable(ckpt_dir: str, keep: bool = False, report: bool = True) -> tuple[str, dict] | None:
    """The newest checkpoint in ``ckpt_dir`` that verifies and loads, with its content; damaged ones are
    skipped (and logged: ``report``). None when the folder holds no checkpoint at all. ``keep``: as in
    load_checkpoint."""
    cands = [p for p in glob.glob(os.path.join(ckpt_dir, "*.pt")) if os.path.isfile(p)]
    errors = []
    for p in sorted(cands, key=_order_key, reverse=True):
        try:
            return p, load_checkpoint(p, keep=keep)
        except CheckpointError as e:
            if report:
                log.warning("--resume latest: skipping %s", e)
            errors.append(str(e))
    if errors:
        raise CheckpointError(f"--resume latest: no intact checkpoint in {ckpt_dir}: " + "; ".join(errors))
    return None


def epoch_checkpoints(ckpt_dir: str) -> dict[int, str]:
    """``{N: path}`` of the ``epoch_N.pt`` files in ``ckpt_dir``."""
    out = {}
    for p in glob.glob(os.path.join(ckpt_dir, "epoch_*.pt")):
        m = re.fullmatch(r"epoch_(\d+)\.pt", os.path.basename(p))
        if m and os.path.isfile(p):
            out[int(m.group(1))] = p
    return out


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint, then its sidecar (a kill in between leaves an orphan sidecar, which nothing reads)."""
    _remove(path)
    _remove(path + SIDECAR)
    fsync_dir(os.path.dirname(path))


#: ioutil.atomic_write's PATH.tmp.PID.THREAD, link_checkpoint's PATH.tmp.PID
_TMP_PID = re.compile(r"\.tmp\.(\d+)(?:\.\d+)?$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0 checks without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(ckpt_dir: str) -> list[str]:
    """Delete the ``*.tmp.<pid>[.<thread>]`` files whose writer is gone (a killed process); returns what was
    removed. A file whose pid is alive on this host is another process's write in flight and is kept; this
    process's own pid counts as gone (it writes nothing while the run starts; a restarted container may reuse
    the pid). Called while holding the run folder's lock, so no other run writes there."""
    gone = []
    for p in glob.glob(os.path.join(ckpt_dir, "*.tmp.*")):
        m = _TMP_PID.search(p)
        if m is None:
            continue  # not one of our temporary names
        pid = int(m.group(1))
        if pid != os.getpid() and pid_alive(pid):
            log.info("kept %s: its writer (pid %d) is alive", p, pid)
            continue
        _remove(p)
        gone.append(p)
    return gone


def disk_full_stop(e: BaseException, run_dir: str, latest: str | None) -> BaseException | None:
    """A RunStopped (exit 3) for ENOSPC/EDQUOT raised anywhere in a run (a log line, metrics, TensorBoard, a
    plot), naming what to do; None for any other error (and for a RunStopped, already worded)."""
    from dissect_fast.training.reliability import RunStopped

    if isinstance(e, RunStopped) or not _is_enospc(e):
        return None
    what = getattr(e, "filename", None) or "the run folder"
    return RunStopped(
        f"no space left on the device while writing {what}: free space there or point --logs at a bigger disk, "
        f"then continue the run in {run_dir} with --resume latest; last good checkpoint: {latest}"
    )


def strip_prefixes(sd: dict) -> dict:
    """Model weights without torch.compile / DDP wrappers' prefixes, as open_clip expects."""
    out = {}
    for k, v in sd.items():
        for p in ("_orig_mod.", "module."):
            k = k.replace(p, "")
        out[k] = v
    return out


class Stateful(Protocol):
    """Anything a checkpoint holds: it saves and loads itself."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


#: a Part's key for a component whose state dict's own keys sit at the checkpoint's top level (open_clip reads
#: ``epoch`` there, and older checkpoints have them there)
TOP = ""


@dataclass
class Part:
    """One stateful component of a checkpoint, under ``key`` (``TOP``: merged into the top level). ``optional``:
    checkpoints written before the component existed lack it; it then loads ``{}``."""

    key: str
    obj: Stateful
    optional: bool = False


def gather_state(parts: list[Part]) -> dict:
    """The checkpoint state of ``parts``: each component's ``state_dict()`` under its key."""
    out: dict = {}
    for p in parts:
        sd = p.obj.state_dict()
        if p.key == TOP:
            out.update(sd)
        else:
            out[p.key] = sd
    return out


def restore_state(parts: list[Part], state: dict) -> None:
    """Load ``state`` (a checkpoint, as :func:`gather_state` writes it) into ``parts``, in list order."""
    for p in parts:
        if p.key == TOP:
            p.obj.load_state_dict(state)
        elif p.key in state or not p.optional:
            p.obj.load_state_dict(state[p.key])
        else:
            p.obj.load_state_dict({})


def check_model_name(state: dict, model_name: str, where: str) -> None:
    """A checkpoint continues only the model it was trained with (``where``: the flag and file, for the message)."""
    if state.get("model_name") != model_name:
        raise ValueError(
            f"{where}: checkpoint was trained with model {state.get('model_name')!r}, this run builds "
            f"{model_name!r}: pass the same --model"
        )


class ModelWeights:
    """The model's weights under ``state_dict`` (open_clip's key), without compile/DDP prefixes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return strip_prefixes(self.model.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class RunIdentity:
    """What the checkpoint was trained as: model name, model config (rebuilds the model anywhere), the resolved
    run config. Loading checks nothing more: ``resume.find_resume`` checked it before the model was built."""

    def __init__(self, model_name: str, model_cfg: dict | None, config: dict) -> None:
        self.model_name, self.model_cfg, self.config = model_name, model_cfg, config

    def state_dict(self) -> dict:
        return {"model_name": self.model_name, "model_cfg": self.model_cfg, "config": self.config}

    def load_state_dict(self, state: dict) -> None:
        return None


class RngStreams:
    """Python's, NumPy's and torch's (CPU and CUDA) global RNG streams."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class GeneratorState:
    """A ``torch.Generator``'s stream (the selection's)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class Checkpointer:
    """One run's checkpoints in ``RUN/checkpoints``: what to resume from, which file each save writes (the
    --save-frequency policy), the mid-epoch position of an interrupted epoch, --delete-previous-checkpoint.

    Writes happen on the main rank only (``is_main``); every rank reads the same files to resume.
    """

    def __init__(self, run_dir: str, epochs: int, save_frequency: int, delete_previous: bool, is_main: bool) -> None:
        self.dir = os.path.join(run_dir, "checkpoints")
        self.epochs, self.save_frequency, self.delete_previous = epochs, save_frequency, delete_previous
        self.is_main = is_main

    # ---------------------------------------------------------------- resume
    def load_resume(self, resume: str | None, restarted: bool) -> tuple[str, dict] | None:
        """(path, state) of the checkpoint to resume from, verified and loaded once; None: start fresh. After a
        torchelastic restart (``restarted``) and with ``--resume latest``: this run's newest checkpoint that
        verifies and loads (damaged ones are logged and skipped); else the file ``--resume`` names."""
        if restarted or resume == "latest":
            found = find_resumable(self.dir)
            if found is not None or resume in (None, "latest"):
                return found
        if resume is None:
            return None
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        return resume, load_checkpoint(resume)

    def latest(self) -> str | None:
        """checkpoints/latest.pt when it exists: the last good checkpoint."""
        p = os.path.join(self.dir, "latest.pt")
        return p if os.path.isfile(p) else None

    def remove_stale(self) -> None:
        """Remove checkpoint writes a killed process left unfinished (main rank, at the run's start)."""
        if self.is_main:
            for p in remove_stale_temporaries(self.dir):
                log.warning("removed %s, a checkpoint write that did not finish (killed process)", p)

    # ---------------------------------------------------------------- save
    def write(self, state: dict, name: str) -> str:
        """Atomic, verified write of checkpoints/<name>; latest.pt then names the same file. A full disk stops
        the run (RunStopped) with the previous checkpoint intact."""
        from dissect_fast.training.reliability import RunStopped, check_finite_state

        path = os.path.join(self.dir, name)
        check_finite_state(state, name, self.latest())  # NaN/Inf weights or optimizer state: not written, run stops
        try:
            save_checkpoint(state, path)
            if name != "latest.pt":
                link_checkpoint(path, os.path.join(self.dir, "latest.pt"))
        except DiskFullError as e:
            raise RunStopped(f"{e.strerror}; last good checkpoint: {self.latest()}") from e
        return path

    def save_epoch(self, state_fn, epoch_done: int) -> None:
        """The end-of-epoch checkpoint of ``state_fn()``. Every --save-frequency epochs and after the last:
        checkpoints/epoch_N.pt, which latest.pt then names; other epochs write latest.pt alone
        (--save-most-recent: it always holds the newest state). --delete-previous-checkpoint: the older
        epoch_M.pt go once epoch_N.pt verifies."""
        if not self.is_main:
            return
        f = self.save_frequency
        if epoch_done == self.epochs or (f > 0 and epoch_done % f == 0):
            path = self.write(state_fn(), f"epoch_{epoch_done}.pt")
            if self.delete_previous:
                self._delete_previous(path, epoch_done)
        else:
            self.write(state_fn(), "latest.pt")

    def save_position(self, state_fn) -> str | None:
        """Mid-epoch (a stop signal): ``state_fn()``, which holds the data position inside the epoch under
        ``epoch_resume`` (``epoch``, ``epoch_step``, RNG streams, the epoch's partial sums), to latest.pt; the
        epoch_*.pt are not touched. Resuming re-enters the epoch there (``epoch_position``). Returns the path on
        the main rank."""
        if not self.is_main:
            return None
        state = state_fn()
        state["epoch_step"] = state["epoch_resume"]["epoch_step"]
        return self.write(state, "latest.pt")

    @staticmethod
    def epoch_position(state: dict) -> dict | None:
        """The data position inside an epoch an interrupted run's checkpoint holds; None: an epoch's end."""
        return state.get("epoch_resume")

    def _delete_previous(self, path: str, epoch_done: int) -> None:
        """Remove epoch_M.pt (M < ``epoch_done``) and their sidecars, once ``path`` verifies against its sidecar."""
        try:
            if read_sidecar(path) is None:
                raise CheckpointError(f"checkpoint {path} has no sidecar")
            verify_checkpoint(path)
        except (CheckpointError, OSError) as e:
            log.error("--delete-previous-checkpoint: %s; the older epoch checkpoints are kept", e)
            return
        for epoch, old in sorted(epoch_checkpoints(self.dir).items()):
            if epoch < epoch_done:
                remove_checkpoint(old)
                log.info("--delete-previous-checkpoint: removed %s", old)
