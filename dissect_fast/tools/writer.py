"""Writing shards in this project's format (``synth``, ``shards``): ids, tokens and clean flags stored per sample.

Shards made elsewhere need no writer: ``dissect-fast index`` indexes them as they are.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tarfile

import numpy as np

from dissect_fast.data.index import build_shard_index
from dissect_fast.data.shards import DatasetIndex, ShardInfo, encode_id

#: what ``shard_sizes`` plans for when not told: ranks (more shards than a run needs cost little) and loader
#: workers per rank (the trainer's --workers default)
DEFAULT_WORLD_SIZE = 8
DEFAULT_LOADER_WORKERS = 2
SHARDS_PER_LOADER = 8  #: shards each (rank, worker) reader gets at least, so that shards end evenly
MIN_SAMPLES_PER_SHARD = 32
MAX_SAMPLES_PER_SHARD = 10_000


def shard_sizes(
    n: int,
    samples_per_shard: int | None = None,
    world_size: int = DEFAULT_WORLD_SIZE,
    workers: int = DEFAULT_LOADER_WORKERS,
) -> list[int]:
    """Samples in each shard for ``n`` samples. ``samples_per_shard`` given: full shards of that size and the rest in
    the last. None: ``SHARDS_PER_LOADER`` shards per rank and loader worker (``world_size`` x ``workers``, workers 0
    counted as 1) of sizes that differ by at most one, each between ``MIN_SAMPLES_PER_SHARD`` and
    ``MAX_SAMPLES_PER_SHARD`` samples (so small sets get fewer shards, large sets more)."""
    if n < 1:
        raise ValueError(f"no samples to write (n = {n})")
    if samples_per_shard is not None:
        if samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
        full, rest = divmod(n, samples_per_shard)
        return [samples_per_shard] * full + ([rest] if rest else [])
    if world_size < 1 or workers < 0:
        raise ValueError(f"--world-size must be >= 1 and --workers >= 0, got {world_size} and {workers}")
    target = SHARDS_PER_LOADER * world_size * max(1, workers)
    count = max(math.ceil(n / MAX_SAMPLES_PER_SHARD), min(target, max(1, n // MIN_SAMPLES_PER_SHARD)))
    base, extra = divmod(n, count)
    return [base + 1] * extra + [base] * (count - extra)


class ShardWriter:
    """Writes samples into numbered tar shards and collects what the dataset index needs.

    ``sizes``: the number of samples of each shard (``shard_sizes``); past its end, ``samples_per_shard``."""

    def __init__(
        self, out_dir: str, samples_per_shard: int = 1000, prefix: str = "shard", sizes: list[int] | None = None
    ) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.per_shard, self.prefix = out_dir, samples_per_shard, prefix
        self.sizes = list(sizes or [])
        self.shards: list[ShardInfo] = []
        self.ids: list[int] = []
        self.clean: dict[int, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._mtime = 0  # fixed: the same samples give byte-identical shards

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(os.path.join(self.out_dir, name), "w")
        self.shards.append(ShardInfo(name, 0))
        self._count = 0

    def _add(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode = len(data), self._mtime, 0o444
        assert self._tar is not None  # opened by write
        self._tar.addfile(ti, io.BytesIO(data))

    def write(self, sample_id: int, jpg: bytes, caption: str, tokens: np.ndarray | None, clean: bool | None) -> None:
        if self._tar is None or self._count >= self._capacity():
            self.close_shard()
            self._open()
        key = f"{sample_id:012d}"
        self._add(f"{key}.jpg", jpg)
        self._add(f"{key}.txt", caption.encode("utf-8"))
        if tokens is not None:
            self._add(f"{key}.tok", np.ascontiguousarray(tokens, dtype="<i4").tobytes())
        self._add(f"{key}.id", encode_id(sample_id))
        if clean is not None:
            self._add(f"{key}.clean", bytes([1 if clean else 0]))
            self.clean[sample_id] = int(bool(clean))
        self._count += 1
        self.shards[-1].count = self._count
        self.ids.append(sample_id)

    def _capacity(self) -> int:
        """Samples the open shard takes."""
        k = len(self.shards) - 1
        return self.sizes[k] if 0 <= k < len(self.sizes) else self.per_shard

    def close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def finish(self, context_length: int, has_tokens: bool = True, skipped: dict | None = None) -> DatasetIndex:
        """Close the last shard, write clean.npy and index.json; returns the index."""
        self.close_shard()
        if not self.ids:
            raise ValueError(f"no samples were written to {self.out_dir}")
        ids = np.asarray(self.ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate sample ids were written")
        clean_file = None
        if self.clean:
            flags = np.zeros(int(ids.max()) + 1, dtype=np.uint8)
            flags[list(self.clean)] = list(self.clean.values())
            np.save(os.path.join(self.out_dir, "clean.npy"), flags)
            clean_file = "clean.npy"
        idx = DatasetIndex(
            num_samples=len(ids),
            id_min=int(ids.min()),
            id_max=int(ids.max()),
            shards=self.shards,
            context_length=context_length,
            has_tokens=has_tokens,
            clean_file=clean_file,
            skipped=dict(skipped or {}),
            root=os.path.abspath(self.out_dir),
        )
        idx.save(self.out_dir)
        write_dali_indexes([os.path.join(self.out_dir, s.path) for s in self.shards])
        return idx


def write_dali_indexes(shards: list[str]) -> None:
    """DALI ``.idx`` files (+ sidecars) beside freshly written shards, so the DALI loader can start at once.

    Pure Python (no DALI needed: shards are often written on machines without it). Tolerant: a
    failure only means the DALI loader builds the files itself later, so it is logged, not raised.
    """
    try:
        for path in shards:
            build_shard_index(path, verify="none")  # we encoded the images ourselves
    except Exception as e:  # noqa: BLE001
        logging.getLogger("dissect_fast").debug("no DALI .idx files for %s: %s", os.path.dirname(shards[0]), e)
