"""The shard format and the dataset index.

A sample in a shard (webdataset layout, one tar member per field, grouped by ``__key__``):

==========  ==========================================================================
``jpg``     JPEG bytes
``txt``     caption, UTF-8
``tok``     open_clip token ids, little-endian int32 x context length (default 77)
``id``      global sample id, little-endian int64 (8 bytes): indexes the history buffer
``clean``   optional, 1 byte: 1 = the caption belongs to the image (diagnostics only)
==========  ==========================================================================

Binary ``tok`` and ``id`` fields can be read without parsing by DALI's webdataset reader. Every
split directory holds ``index.json`` (counts, id range, shard list) and, when clean flags are
known, ``clean.npy`` (uint8 by id) so that diagnostics never need the flag in the data path.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

INDEX_NAME = "index.json"
FORMAT = "dissect_fast/1"
DEFAULT_CONTEXT_LENGTH = 77


@dataclass
class ShardInfo:
    path: str  #: relative to the index's directory (or absolute)
    count: int


@dataclass
class DatasetIndex:
    """What the trainer needs to know before reading a sample."""

    num_samples: int
    id_min: int
    id_max: int
    shards: list[ShardInfo]
    context_length: int = DEFAULT_CONTEXT_LENGTH
    has_tokens: bool = True
    clean_file: str | None = None  #: clean.npy beside the index, uint8 indexed by id
    skipped: dict = field(default_factory=dict)  #: reason -> count, from the tool that wrote the shards
    root: str = ""  #: directory of index.json (not stored)

    @property
    def num_ids(self) -> int:
        """Size of a history buffer indexed by id."""
        return self.id_max + 1

    def shard_paths(self) -> list[str]:
        return [s.path if os.path.isabs(s.path) else os.path.join(self.root, s.path) for s in self.shards]

    def clean_flags(self) -> np.ndarray | None:
        if not self.clean_file:
            return None
        return np.load(os.path.join(self.root, self.clean_file))

    def save(self, directory: str) -> str:
        d = asdict(self)
        d.pop("root")
        d["format"] = FORMAT
        path = os.path.join(directory, INDEX_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "DatasetIndex":
        if os.path.isdir(path):
            path = os.path.join(path, INDEX_NAME)
        with open(path) as f:
            d = json.load(f)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: not a dissect_fast dataset index (run `dissect-fast index` on the shards)")
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d, root=os.path.dirname(os.path.abspath(path)))


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a directory, a brace pattern (``a-{000..009}.tar``), a glob, or a ``::``-list."""
    import braceexpand

    out: list[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            out += sorted(glob.glob(os.path.join(part, "*.tar")))
            continue
        for p in braceexpand.braceexpand(part):
            out += sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    return out


def resolve_data(spec: str, flag: str = "--train-data") -> tuple[list[str], DatasetIndex | None]:
    """Shards and, when there is one, the dataset index for a data flag; a clear error if nothing matches."""
    idx = None
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, INDEX_NAME)):
        idx = DatasetIndex.load(spec)
        paths = idx.shard_paths()
    else:
        paths = expand_shards(spec)
        if paths:
            cand = os.path.join(os.path.dirname(os.path.abspath(paths[0])), INDEX_NAME)
            if os.path.isfile(cand):
                full = DatasetIndex.load(cand)
                wanted = {os.path.abspath(p) for p in paths}
                if {os.path.abspath(p) for p in full.shard_paths()} == wanted:
                    idx = full
    if not paths:
        raise FileNotFoundError(f"{flag} {spec!r}: no shards found (expected a directory, brace pattern or glob)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{flag}: {len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    return paths, idx


def encode_id(i: int) -> bytes:
    return int(i).to_bytes(8, "little", signed=True)


def decode_id(b: bytes) -> int:
    if len(b) != 8:
        raise ValueError(f"id field has {len(b)} bytes, expected 8")
    return int.from_bytes(b, "little", signed=True)


class ShardWriter:
    """Writes samples into numbered tar shards and collects what the dataset index needs."""

    def __init__(self, out_dir: str, samples_per_shard: int = 1000, prefix: str = "shard") -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.per_shard, self.prefix = out_dir, samples_per_shard, prefix
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
        self._tar.addfile(ti, io.BytesIO(data))

    def write(self, sample_id: int, jpg: bytes, caption: str, tokens: np.ndarray | None, clean: bool | None) -> None:
        if self._tar is None or self._count >= self.per_shard:
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
        from dissect_fast.data.index_tool import build_shard_index

        for path in shards:
            build_shard_index(path, verify="none")  # we encoded the images ourselves
    except Exception as e:  # noqa: BLE001
        logging.getLogger("dissect_fast").debug("no DALI .idx files for %s: %s", os.path.dirname(shards[0]), e)


#: what a broken shard raises while it is streamed (truncated, not a tar, unreadable)
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


def iter_tar_members(tf: tarfile.TarFile):
    """(key, ext, member, data) for each regular file named ``KEY.EXT`` of a tar opened in stream mode.

    ``key`` keeps the member's folder (webdataset's grouping), ``ext`` is lower-cased; directories and
    names without an extension are skipped. Errors of a broken tar propagate (``TAR_ERRORS``): the
    training loader and the index tool each count them, and must group members identically.
    """
    for m in tf:
        if not m.isfile():
            continue
        base = os.path.basename(m.name)
        if "." not in base:
            continue
        key, ext = base.split(".", 1)
        yield os.path.join(os.path.dirname(m.name), key), ext.lower(), m, tf.extractfile(m).read()


def tokenizer_for(context_length: int = DEFAULT_CONTEXT_LENGTH):
    """open_clip's default (CLIP BPE) tokenizer, which every open_clip model without an HF text tower uses."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def tokenize(tokenizer, captions: list[str], context_length: int) -> np.ndarray:
    return tokenizer(captions, context_length=context_length).numpy().astype(np.int32)
