"""The shard format, the dataset index and shard lists.

A sample in a shard (webdataset layout, one tar member per field, grouped by key; the rules every
reader follows are in :mod:`dissect_fast.data.samples`):

==========  ==========================================================================
``jpg``     image bytes (``jpeg``, ``png``, ``webp`` are read too, whatever the content)
``txt``     caption, UTF-8
``tok``     optional: open_clip token ids, little-endian int32 x context length (default 77)
``id``      optional: global sample id, little-endian int64 (8 bytes): indexes the history buffer
``clean``   optional, 1 byte: 1 = the caption belongs to the image (diagnostics only)
==========  ==========================================================================

Shards made elsewhere (pixparse ``cc3m-wds``: ``jpg`` + ``txt``; img2dataset: ``jpg`` + ``txt`` + ``json``)
carry no ``id``: ``dissect-fast index`` gives each such shard a ``first_id`` in ``index.json`` and its
samples get ``first_id + position``. Every split directory holds ``index.json`` (counts, id range, shard
list with first ids) and, when clean flags are known, ``clean.npy`` (uint8 by id) so that diagnostics
never need the flag in the data path.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from dissect_fast.ioutil import write_json_atomic

INDEX_NAME = "index.json"
FORMAT = "dissect_fast/1"
DEFAULT_CONTEXT_LENGTH = 77
_URL = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")  # webdataset URLs: pipe:CMD, http://, s3://, file://, ...


def is_url(spec: str) -> bool:
    """A webdataset URL (``pipe:``, ``http://``, ...) rather than a local path."""
    return bool(_URL.match(spec))


def shard_stem(shard: str) -> str:
    """A shard's name without folder and ``.tar``; for URLs the last ``NAME.tar`` in it (``pipe:cat /d/00012.tar`` ->
    ``00012``). The index keys shards by this name, so the same shard read by path or by URL finds its entry."""
    if is_url(shard):
        found = re.findall(r"([^/\s'\"]+)\.tar\b", shard)
        if found:
            return found[-1]
    return os.path.basename(shard).removesuffix(".tar")


@dataclass
class ShardInfo:
    path: str  #: relative to the index's directory (or absolute)
    count: int  #: good samples
    first_id: int | None = None  #: samples get first_id + position (shards without an id field), else None
    groups: int | None = None  #: sample groups in the tar, good or bad (ids first_id .. first_id + groups - 1)


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

    def first_ids(self) -> dict[str, int]:
        """{shard stem: first id} of the shards whose samples get ``first_id + position`` as id."""
        return {shard_stem(s.path): s.first_id for s in self.shards if s.first_id is not None}

    def covering(self, shards: list[str]) -> DatasetIndex | None:
        """This index restricted to ``shards`` (matched by shard name, so URLs match too), or None when
        some shard is not in it. The id range stays the whole index's, so ids mean the same thing."""
        by_stem = {shard_stem(s.path): s for s in self.shards}
        picked = [by_stem[shard_stem(p)] for p in shards if shard_stem(p) in by_stem]
        if not shards or len(picked) < len(shards):
            return None
        if len(picked) == len(self.shards):
            return self
        return replace(self, shards=picked, num_samples=sum(s.count for s in picked))

    def clean_flags(self) -> np.ndarray | None:
        if not self.clean_file:
            return None
        return np.load(os.path.join(self.root, self.clean_file))

    def save(self, directory: str) -> str:
        d = asdict(self)
        d.pop("root")
        d["format"] = FORMAT
        path = os.path.join(directory, INDEX_NAME)
        write_json_atomic(path, d, fsync=False, indent=1)
        return path

    @classmethod
    def load(cls, path: str) -> DatasetIndex:
        if os.path.isdir(path):
            path = os.path.join(path, INDEX_NAME)
        with open(path) as f:
            d = json.load(f)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: not a dissect_fast dataset index (run `dissect-fast index` on the shards)")
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d, root=os.path.dirname(os.path.abspath(path)))


def expand_shards(spec: str) -> list[str]:
    """Shards of a data flag: ``::``-joined sources, each a directory (its ``*.tar``), a brace pattern
    (``a-{000..009}.tar``), a glob, a file or a webdataset URL (``pipe:aws s3 cp s3://b/{0..9}.tar -``).
    Braces and ``::`` are expanded by webdataset's own rules."""
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for p in expand_urls(spec):
        if is_url(p):
            out.append(p)
        elif os.path.isdir(p):
            out += sorted(glob.glob(os.path.join(p, "*.tar")))
        elif any(c in p for c in "*?["):
            out += sorted(glob.glob(p))
        else:
            out.append(p)
    return out


def find_index(shards: list[str], explicit: str | None = None) -> DatasetIndex | None:
    """The dataset index covering ``shards``: ``explicit`` (an index.json or its folder) when given, else the
    ``index.json`` beside the local shards (one folder's index must cover them all)."""
    if explicit:
        idx = DatasetIndex.load(explicit)
        cov = idx.covering(shards)
        if cov is None:
            raise ValueError(
                f"--data-index {explicit}: does not list every shard given (re-run `dissect-fast index` on all of them)"
            )
        return cov
    dirs = {os.path.dirname(os.path.abspath(p)) for p in shards if not is_url(p)}
    for d in sorted(dirs):
        cand = os.path.join(d, INDEX_NAME)
        if os.path.isfile(cand):
            cov = DatasetIndex.load(cand).covering(shards)
            if cov is not None:
                return cov
    return None


def resolve_data(
    spec: str, flag: str = "--train-data", index: str | None = None
) -> tuple[list[str], DatasetIndex | None]:
    """Shards and, when there is one, the dataset index for a data flag; a clear error if nothing matches."""
    idx: DatasetIndex | None
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, INDEX_NAME)) and not index:
        idx = DatasetIndex.load(spec)
        paths = idx.shard_paths()
    else:
        paths = expand_shards(spec)
        if not paths:
            raise FileNotFoundError(
                f"{flag} {spec!r}: no shards found (expected a directory, a brace pattern, a "
                f"glob, a `::`-joined list or a webdataset URL such as pipe:...)"
            )
        idx = find_index(paths, index)
    if not paths:
        raise FileNotFoundError(f"{flag} {spec!r}: its index lists no shards")
    missing = [p for p in paths if not is_url(p) and not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{flag}: {len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    dup = len(paths) - len(set(paths))
    if dup:
        raise ValueError(f"{flag} {spec!r}: {dup} shard(s) are listed more than once (overlapping patterns?)")
    return paths, idx


def check_id_ranges(index: DatasetIndex, flag: str = "--train-data") -> None:
    """Refuse an index whose shards' assigned id ranges overlap (two shards would share ids, and so history
    entries, whatever the loader's worker count): ``[first_id, first_id + groups)`` of each shard given ids."""
    spans = sorted(
        (s.first_id, s.first_id + (s.groups if s.groups is not None else s.count), s.path)
        for s in index.shards
        if s.first_id is not None
    )
    for (lo, hi, a), (lo2, _, b) in zip(spans, spans[1:]):
        if lo2 < hi:
            raise ValueError(
                f"{flag}: index.json gives shards {a} and {b} overlapping ids ({lo}..{hi - 1} and from {lo2}): "
                f"re-run `dissect-fast index` on the shards"
            )


def check_index_count(index: DatasetIndex, shard: str, found: int) -> None:
    """Refuse a shard whose good samples (``found``, e.g. in its ``.idx``) differ from its count in ``index``."""
    listed = next((s.count for s in index.shards if shard_stem(s.path) == shard_stem(shard)), None)
    if listed is not None and listed != found:
        raise ValueError(
            f"{shard}: index.json lists {listed} good samples, its .idx {found}: the index does not describe "
            f"this shard; re-run `dissect-fast index` on the shards"
        )


def count_mismatch(expected: int, stats: dict) -> str | None:
    """Why one complete pass over shards whose index counts sum to ``expected`` good samples contradicts the
    index (the loader's counters ``stats``), else None: more good samples than listed (stale or edited counts),
    or fewer samples of any kind than listed good ones, shards that broke being counted already. (Samples outside
    ``--subset`` are counted before their image is decoded, so they bound only the second test.)"""
    good = int(stats.get("ok", 0))
    seen = good + int(stats.get("not_in_subset", 0)) + int(stats.get("bad_samples", 0))
    broken = stats.get("not_a_tar", 0) or stats.get("truncated_tar", 0)
    if good > expected or (seen < expected and not broken):
        return (
            f"index.json lists {expected} good samples in the shards read, but a full pass over them read {good} "
            f"good ({seen - good} bad or outside --subset): the index does not describe these shards; re-run "
            f"`dissect-fast index` on them"
        )
    return None


def encode_id(i: int) -> bytes:
    return int(i).to_bytes(8, "little", signed=True)


def tokenizer_for(context_length: int = DEFAULT_CONTEXT_LENGTH):
    """open_clip's default (CLIP BPE) tokenizer, which every open_clip model without an HF text tower uses."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def tokenize(tokenizer, captions: list[str], context_length: int) -> np.ndarray:
    """Token ids of ``captions``, each cut first to a bounded length (:func:`samples.cut_caption`): a caption of one
    huge word would otherwise stall CLIP BPE for minutes."""
    from dissect_fast.data.samples import cut_captions

    captions, _ = cut_captions(captions, context_length)
    return tokenizer(captions, context_length=context_length).numpy().astype(np.int32)


def check_ids_known(shards: list[str], index: DatasetIndex | None, flag: str = "--train-data") -> None:
    """Fail before any training when the shards carry no ids and no dataset index gives them any (shards made
    elsewhere that were never indexed): the first shard is peeked. With an index, shards without a first id
    were checked to hold ids when it was written."""
    from dissect_fast.data.samples import MissingIdsError, missing_ids_message, peek_has_ids

    if index is not None or not shards:
        return
    if peek_has_ids(shards[0]) is False:
        raise MissingIdsError(f"{flag}: " + missing_ids_message(shards[0]))
