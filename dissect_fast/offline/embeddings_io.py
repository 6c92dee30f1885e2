"""On-disk embeddings of a training set: a resumable writer and a validating reader.

Layout of an embeddings directory (written by ``dissect-fast embed``, read by ``select-subset``)::

    ids.npy     int64   [rows]       sample ids (the ids stored in the shards)
    image.npy   float16 [rows, D]    image embeddings f_i of a reference model
    text.npy    float16 [rows, D]    text embeddings g_i
    meta.json   {"count": n, "dim": D, "dtype": "float16", "model": ..., "checkpoint": ..., ...}

All three arrays are ``.npy`` files (``np.lib.format.open_memmap``), so they can be memory-mapped
and read with plain ``np.load``. Only the first ``meta["count"]`` rows are valid: the writer
flushes the arrays *before* it rewrites ``meta.json`` (atomically), so after a crash ``count``
never points past rows that are on disk, and a resumed writer continues at ``count``. When the
writer is given the exact number of samples as ``capacity`` (the dataset index knows it), the
files never need to be copied; otherwise they grow by doubling and are trimmed on ``close()``.
Embeddings need not be normalised: every consumer normalises them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from dissect_fast.ioutil import write_json_atomic

FORMAT = "dissect_fast.embeddings"
VERSION = 1
DTYPES = ("float16", "float32")
_ARRAYS = ("ids", "image", "text")


class EmbeddingsError(ValueError):
    """An embeddings directory is missing, inconsistent or does not match what was asked for."""


def _to_numpy(x: Any, dtype: DTypeLike) -> np.ndarray:
    """numpy or torch (any dtype, any device, bf16 included) -> numpy array of ``dtype``."""
    if hasattr(x, "detach"):  # torch tensor without importing torch here
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x).astype(dtype, copy=False)


class EmbeddingWriter:
    """Append ``(ids, image, text)`` batches to memory-mapped ``.npy`` files; resumable.

    ``EmbeddingWriter(out_dir, dim)`` creates the directory, or reopens it when ``meta.json`` is
    already there (dim and dtype must match): ``count`` then starts at the persisted value and
    ``done_mask(ids)`` tells which ids are already written, so the caller can skip them.
    ``meta`` (model name, checkpoint path, ...) is stored in ``meta.json``. ``flush()`` makes
    the rows written so far durable; it runs every ``flush_every`` rows and on ``close()``.
    Appending an id that is already written is an error (the reader would reject the directory).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        dim: int,
        dtype: str = "float16",
        *,
        capacity: int | None = None,
        meta: dict | None = None,
        flush_every: int = 1 << 18,
    ) -> None:
        if dim < 1:
            raise EmbeddingsError(f"embedding dim must be >= 1, got {dim}")
        if dtype not in DTYPES:
            raise EmbeddingsError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if capacity is not None and capacity < 1:
            raise EmbeddingsError(f"capacity must be >= 1, got {capacity}")
        self.dir = Path(out_dir)
        self.dim, self.dtype, self.flush_every = int(dim), dtype, int(flush_every)
        self.meta: dict[str, Any] = {}
        self._since_flush = 0
        self._sorted_ids: list[np.ndarray] | None = None  # sorted runs of written ids (done_mask)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / "meta.json").exists():
            self._reopen(meta)
        else:
            self._create(capacity or (1 << 16), meta)

    # -- open / create -------------------------------------------------------------------------
    def _create(self, rows: int, meta: dict | None) -> None:
        self.count = 0
        self._open_arrays(rows, mode="w+")
        self.meta = {**(meta or {}), "format": FORMAT, "version": VERSION}
        self.flush()

    def _reopen(self, meta: dict | None) -> None:
        old = json.loads((self.dir / "meta.json").read_text())
        if old.get("dim") != self.dim or old.get("dtype") != self.dtype:
            raise EmbeddingsError(
                f"{self.dir} holds dim={old.get('dim')} dtype={old.get('dtype')}, asked to resume with "
                f"dim={self.dim} dtype={self.dtype}: use another --out or the same model"
            )
        for key in ("model", "checkpoint"):
            if meta and key in meta and key in old and meta[key] != old[key]:
                raise EmbeddingsError(f"{self.dir} was written with {key}={old[key]!r}, resuming with {meta[key]!r}")
        self.count = int(old["count"])
        self.ids = np.load(self.dir / "ids.npy", mmap_mode="r+")
        self.image = np.load(self.dir / "image.npy", mmap_mode="r+")
        self.text = np.load(self.dir / "text.npy", mmap_mode="r+")
        if not (len(self.ids) == len(self.image) == len(self.text) >= self.count):
            raise EmbeddingsError(f"{self.dir}: array lengths disagree with meta.json count={self.count}")
        self.meta = {**old, **(meta or {})}

    def _open_arrays(self, rows: int, mode: str) -> None:
        fmt = np.lib.format
        self.ids = fmt.open_memmap(self.dir / "ids.npy", mode=mode, dtype=np.int64, shape=(rows,))
        self.image = fmt.open_memmap(self.dir / "image.npy", mode=mode, dtype=self.dtype, shape=(rows, self.dim))
        self.text = fmt.open_memmap(self.dir / "text.npy", mode=mode, dtype=self.dtype, shape=(rows, self.dim))

    def _resize(self, rows: int) -> None:
        """Copy the valid rows into files of ``rows`` rows (chunked), then swap them in atomically."""
        old = {name: getattr(self, name) for name in _ARRAYS}
        for name in _ARRAYS:
            src = old[name]
            tmp = self.dir / f"{name}.npy.resize"
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(rows, *src.shape[1:]))
            n = min(self.count, rows)
            for a in range(0, n, 1 << 20):
                dst[a : min(n, a + (1 << 20))] = src[a : min(n, a + (1 << 20))]
            dst.flush()
            del dst
        for name in _ARRAYS:
            setattr(self, name, None)
        del old
        for name in _ARRAYS:
            os.replace(self.dir / f"{name}.npy.resize", self.dir / f"{name}.npy")
        self.ids = np.load(self.dir / "ids.npy", mmap_mode="r+")
        self.image = np.load(self.dir / "image.npy", mmap_mode="r+")
        self.text = np.load(self.dir / "text.npy", mmap_mode="r+")

    # -- writing -------------------------------------------------------------------------------
    def done_mask(self, ids: Any) -> np.ndarray:
        """Boolean mask: which of ``ids`` are already written (use it to skip work on resume)."""
        ids = _to_numpy(ids, np.int64).reshape(-1)
        if self._sorted_ids is None:  # ids already on disk when the writer was opened
            self._sorted_ids = [np.sort(np.asarray(self.ids[: self.count]))]
        mask = np.zeros(len(ids), dtype=bool)
        for done in self._sorted_ids:
            if len(done):
                pos = np.searchsorted(done, ids).clip(max=len(done) - 1)
                mask |= done[pos] == ids
        return mask

    def _remember(self, ids: np.ndarray) -> None:
        """Add ids to the sorted runs behind done_mask: runs of halving size, merged like a binary
        counter, so membership costs O(log^2 N) per id and all merges O(N log N) in total."""
        runs = self._sorted_ids
        assert runs is not None  # set by done_mask, which append calls first
        runs.append(np.sort(ids))
        while len(runs) >= 2 and len(runs[-1]) * 2 >= len(runs[-2]):
            last = runs.pop()
            runs[-1] = np.sort(np.concatenate([runs[-1], last]))

    def append(self, ids: Any, image: Any, text: Any) -> None:
        """Write one batch: ids [b] int64, image [b, D], text [b, D] (numpy or torch, any float)."""
        ids = _to_numpy(ids, np.int64).reshape(-1)
        image, text = _to_numpy(image, np.float32), _to_numpy(text, np.float32)
        b = len(ids)
        if image.shape != (b, self.dim) or text.shape != (b, self.dim):
            raise EmbeddingsError(
                f"append: expected image and text of shape ({b}, {self.dim}), got {image.shape} and {text.shape}"
            )
        if b == 0:
            return
        with np.errstate(over="ignore"):  # as stored: float16 overflows to Inf, refused below
            image, text = image.astype(self.dtype), text.astype(self.dtype)
        if not (np.isfinite(image).all() and np.isfinite(text).all()):
            raise EmbeddingsError(f"append: embeddings contain NaN or Inf (or values beyond {self.dtype}'s range)")
        if len(np.unique(ids)) != b or self.done_mask(ids).any():
            raise EmbeddingsError("append: duplicate sample ids (check done_mask() before embedding a batch)")
        if self.count + b > len(self.ids):
            self._resize(max(2 * len(self.ids), self.count + b))
        sl = slice(self.count, self.count + b)
        self.ids[sl], self.image[sl], self.text[sl] = ids, image, text
        self.count += b
        self._remember(ids)
        self._since_flush += b
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Make the rows written so far durable: arrays first, then ``meta.json`` with the count."""
        for name in _ARRAYS:
            getattr(self, name).flush()
        self.meta.update(count=self.count, dim=self.dim, dtype=self.dtype)
        write_json_atomic(self.dir / "meta.json", self.meta, indent=1, sort_keys=True)
        self._since_flush = 0

    def close(self) -> None:
        """Flush, and trim the files to exactly ``count`` rows when they were over-allocated."""
        if self.count != len(self.ids) and self.count > 0:
            self._resize(self.count)
        self.flush()

    def __enter__(self) -> EmbeddingWriter:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what is durable; a rerun resumes from it
            self.flush()


@dataclass
class Embeddings:
    """A loaded embeddings directory; ``image``/``text`` are read-only memmaps (not normalised)."""

    ids: np.ndarray  #: int64 [N] sample ids, unique
    image: np.ndarray  #: [N, D] float16/float32 memmap, image embeddings f_i
    text: np.ndarray  #: [N, D] float16/float32 memmap, text embeddings g_i
    meta: dict = field(default_factory=dict)  #: meta.json (count, dim, dtype, model, checkpoint, ...)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.image.ndim != 2 or self.text.ndim != 2:
            raise EmbeddingsError(f"image/text must be 2-D, got {self.image.shape} and {self.text.shape}")
        if self.image.shape != self.text.shape or self.image.shape[0] != n:
            raise EmbeddingsError(
                f"inconsistent shapes: ids [{n}], image {list(self.image.shape)}, text {list(self.text.shape)}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.image.shape[1])

    @classmethod
    def from_arrays(cls, ids: Any, image: Any, text: Any, meta: dict | None = None) -> Embeddings:
        """In-memory embeddings (tests, benchmarks): same checks as ``load_embeddings``."""
        ids = _to_numpy(ids, np.int64).reshape(-1)
        emb = cls(ids=ids, image=np.asarray(image), text=np.asarray(text), meta=dict(meta or {}))
        _check_unique(ids, "<arrays>")
        return emb


def check_finite_rows(
    finite: np.ndarray, ids: np.ndarray, what: str = "--embeddings", id_name: str = "sample ids"
) -> None:
    """EmbeddingsError naming the first rows (and their sample ids) where the bool mask ``finite`` [N] is false: a
    NaN or Inf row has no cosine, no cluster and no rank, and would be picked by position instead."""
    bad = np.flatnonzero(~np.asarray(finite, dtype=bool))
    if len(bad):
        more = ", ..." if len(bad) > 5 else ""
        raise EmbeddingsError(
            f"{what}: {len(bad)} of {len(finite)} rows hold NaN or Inf (rows {', '.join(map(str, bad[:5]))}{more}; "
            f"{id_name} {', '.join(str(int(i)) for i in ids[bad[:5]])}{more}): re-embed the set with a healthy "
            f"reference model into a new `dissect-fast embed --out`"
        )


def _check_unique(ids: np.ndarray, where: str) -> None:
    s = np.sort(ids)
    dup = s[1:][s[1:] == s[:-1]]
    if len(dup):
        raise EmbeddingsError(
            f"{where}: {len(dup)} duplicate sample ids (e.g. {dup[:5].tolist()}); every id must be unique "
            "(were two runs of `embed` written into one directory?)"
        )


def load_embeddings(path: str | os.PathLike, *, check_ids: bool = True) -> Embeddings:
    """Open an embeddings directory (memory-mapped, read-only) and validate it."""
    d = Path(path)
    if not (d / "meta.json").is_file():
        raise EmbeddingsError(f"{d}: not an embeddings directory (no meta.json); write one with `dissect-fast embed`")
    meta = json.loads((d / "meta.json").read_text())
    count, dim = int(meta.get("count", -1)), int(meta.get("dim", -1))
    if count < 0 or dim < 1:
        raise EmbeddingsError(f"{d}/meta.json: needs count >= 0 and dim >= 1, got {meta}")
    arrays = {}
    for name in _ARRAYS:
        f = d / f"{name}.npy"
        if not f.is_file():
            raise EmbeddingsError(f"{d}: missing {name}.npy")
        arrays[name] = np.load(f, mmap_mode="r")
    ids, image, text = arrays["ids"], arrays["image"], arrays["text"]
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise EmbeddingsError(f"{d}/ids.npy: expected int64 [rows], got {ids.dtype} {list(ids.shape)}")
    for name, a in (("image", image), ("text", text)):
        if a.ndim != 2 or a.shape[1] != dim or a.shape[0] < count:
            raise EmbeddingsError(
                f"{d}/{name}.npy: shape {list(a.shape)} does not hold count={count} rows of dim={dim}"
            )
        if str(a.dtype) != meta.get("dtype", str(a.dtype)):
            raise EmbeddingsError(f"{d}/{name}.npy: dtype {a.dtype} but meta.json says {meta['dtype']}")
    if len(ids) < count:
        raise EmbeddingsError(f"{d}/ids.npy: {len(ids)} rows, meta.json count={count}")
    ids = np.asarray(ids[:count])
    if check_ids:
        _check_unique(ids, str(d))
    return Embeddings(ids=ids, image=image[:count], text=text[:count], meta=meta)
