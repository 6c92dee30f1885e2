"""Atomic file writes: a temporary file beside the target, optionally fsynced, renamed over the target.

Readers (a resumed run, a watcher tailing the run folder, another rank) see the old file or the new one,
never a half-written one; with ``fsync`` a crash right after the rename cannot leave an empty file either.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

__all__ = ["atomic_write", "fsync_dir", "write_json_atomic", "write_text_atomic"]


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    fsync: bool = True,
    before_replace: Callable[[], None] | None = None,
    **open_kw: Any,
) -> Iterator[IO]:
    """``with atomic_write(path, "wb") as f: ...``: ``f`` is a temporary file (``PATH.tmp.PID.THREAD``) in
    ``path``'s folder (same file system), renamed over ``path`` when the block ends cleanly and removed when it
    raises. ``fsync``: the file before the rename and the folder after it. ``before_replace``: called once the
    file is complete (and synced), just before the rename (e.g. to drop a sidecar that describes the old file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if fsync:
        fsync_dir(os.path.dirname(path))


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    with atomic_write(path, "w", fsync=fsync) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, fsync: bool = True, **dump_kw: Any) -> None:
    """``json.dump(obj, **dump_kw)`` into ``path``, atomically."""
    with atomic_write(path, "w", fsync=fsync) as f:
        json.dump(obj, f, **dump_kw)
