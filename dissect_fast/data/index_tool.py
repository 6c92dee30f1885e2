"""DALI index files and the dataset index for webdataset shards (``dissect-fast index``).

DALI's ``fn.readers.webdataset`` reads samples at the byte offsets listed in an ``.idx`` file
(format ``v1.2``, as written by the ``wds2idx`` tool shipped in the DALI wheel: a header line
``v1.2 N``, then one line per sample of ``ext offset size name`` groups). We write those files
ourselves, from one Python pass over each tar that mirrors the torch loader's reading
(:func:`dissect_fast.data.loader.iter_tar_samples`), because that pass is where bad data gets
caught: DALI cannot skip a sample inside its graph (a decode error invalidates the pipeline and
a truncated tar is an I/O error), so a sample goes into the ``.idx`` only when it

* has an image (``jpg``/``jpeg``/``png``/``webp``), a caption (``tok`` or non-empty ``txt``)
  and an 8-byte ``id`` (or its shard has no ids at all: see *id assignment* below);
* lies completely inside the tar (a truncated tar loses the sample it broke in, like the
  torch loader);
* passes the image check chosen by ``verify``: ``decode`` (default for the command: PIL decodes
  it at 1/8 scale, which runs the entropy decoder over all the data and costs ~0.5 ms per
  400x300 JPEG), ``header`` (JPEG SOI/EOI markers, PNG signature/IEND, RIFF size), or ``none``
  (for shards we just wrote ourselves from decoded images).

Every excluded sample is counted by the torch loader's reason names (``missing_field``,
``bad_id``, ``bad_caption``, ``bad_tokens``, ``corrupt_image``, ``truncated_tar``, ...) in a
sidecar ``<stem>.idx.json`` so that the DALI loader reports the same ``bad_samples`` as the
torch loader would. Components are written under canonical names (``img``, ``tok``, ``txt``,
``id``) whatever the tar calls them, so one DALI ``ext`` list fits every shard.

*Id assignment.* Shards made elsewhere (img2dataset, public CC3M/CC12M releases) have no ``id``
field. A shard none of whose samples has one gets ``first_id + position``, ``position`` being the
sample's ordinal among all sample groups of the tar (bad ones included, so ids do not move when
the verification level changes), and ``first_id`` the running count over such shards in command
line order, after the largest stored id. ``first_id`` is recorded in the sidecar; both loaders
get it through :func:`assigned_first_ids`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from dissect_fast.data.shards import (
    DEFAULT_CONTEXT_LENGTH,
    INDEX_NAME,
    TAR_ERRORS,
    DatasetIndex,
    ShardInfo,
    decode_id,
    encode_id,
    expand_shards,
    iter_tar_members,
)

log = logging.getLogger("dissect_fast")

IDX_VERSION = "v1.2"
META_FORMAT = "dissect_fast/idx1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the torch loader's order of preference
VERIFY_LEVELS = ("none", "header", "decode")


# ----------------------------------------------------------------------------- paths
def shard_stem(shard: str) -> str:
    base = os.path.basename(shard)
    return base.removesuffix(".tar")


def idx_paths(shard: str, out_dir: str | None = None) -> tuple[str, str]:
    """(``.idx``, ``.idx.json``) for a shard: in ``out_dir`` when given, else beside the shard."""
    d = out_dir if out_dir is not None else os.path.dirname(os.path.abspath(shard))
    stem = os.path.join(d, shard_stem(shard))
    return stem + ".idx", stem + ".idx.json"


# ----------------------------------------------------------------------------- scanning
def _image_ok(data: bytes, ext: str, verify: str) -> bool:
    if verify == "none":
        return len(data) > 0
    if verify == "header":
        if ext in ("jpg", "jpeg"):
            return len(data) > 4 and data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" in data[-64:]
        if ext == "png":
            return data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in data[-16:]
        if ext == "webp":
            return (len(data) > 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP"
                    and int.from_bytes(data[4:8], "little") + 8 <= len(data))
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if verify == "header":
                return True
            if im.format == "JPEG":  # decode at 1/8 scale: every entropy-coded byte is still read
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types on corrupt data
        return False


@dataclass
class _Group:
    """One sample group of a tar as the scan saw it (no pixel data kept)."""

    position: int
    key: str
    members: dict = field(default_factory=dict)  #: ext -> (offset, size, name)
    img_ext: str | None = None
    img_ok: bool = False
    id_bytes: bytes | None = None
    tok_len: int | None = None  #: bytes of the tok field
    txt_ok: bool = False
    clean: int | None = None
    beyond_eof: bool = False  #: a component DALI would read ends past the end of the file


def _new_group(position: int, key: str) -> _Group:
    return _Group(position, key)


def _scan_groups(path: str, verify: str, stats: Counter) -> list[_Group]:
    """All complete sample groups of a tar, in order; mirrors ``loader.iter_tar_samples`` exactly:
    the same grouping by key, and a tar that breaks drops the group being read, counted."""
    groups: list[_Group] = []
    current: _Group | None = None

    def close(g: _Group) -> None:
        g.img_ext = next((e for e in IMAGE_EXTS if e in g.members), None)
        groups.append(g)

    pending: dict = {}  # ext -> data for the open group (only what validation needs)
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for key, ext, m, data in iter_tar_members(tf):
                if current is not None and current.key != key:
                    _finish_group(current, pending, verify)
                    close(current)
                    current, pending = None, {}
                if current is None:
                    current = _new_group(len(groups), key)
                current.members[ext] = (m.offset_data, m.size, os.path.basename(m.name))
                if ext in IMAGE_EXTS or ext in ("id", "tok", "txt", "clean"):
                    pending[ext] = data
                    # a stream read of a cut member returns short data without an error: the torch loader
                    # then rejects it by content; DALI would read past the end, so it is flagged here too
                    current.beyond_eof |= m.offset_data + m.size > file_size
    except TAR_ERRORS as e:
        reason = "not_a_tar" if current is None and "empty" not in str(e) else "truncated_tar"
        stats[reason] += 1
        stats[f"shard:{os.path.basename(path)}"] += 1
        current = None
        stats["bad_samples"] += 1
    if current is not None:
        _finish_group(current, pending, verify)
        close(current)
    return groups


def _finish_group(g: _Group, data: dict, verify: str) -> None:
    img_ext = next((e for e in IMAGE_EXTS if e in g.members), None)
    if img_ext is not None:
        g.img_ok = _image_ok(data[img_ext], img_ext, verify)
    g.id_bytes = data.get("id")
    if "tok" in data:
        g.tok_len = len(data["tok"])
    if "txt" in data:
        try:
            g.txt_ok = bool(data["txt"].decode("utf-8").strip())
        except UnicodeDecodeError:
            g.txt_ok = False
    if "clean" in data and len(data["clean"]) == 1:
        g.clean = data["clean"][0]


def _classify(g: _Group, assign_ids: bool) -> str | None:
    """Skip reason (the torch loader's, checked in its order) or None when the sample is good."""
    if g.img_ext is None or (g.id_bytes is None and not assign_ids):
        return "missing_field"
    if g.id_bytes is not None:
        if len(g.id_bytes) != 8:
            return "bad_id"
        if decode_id(g.id_bytes) < 0:
            return "id_out_of_range"
    if g.tok_len is not None:
        if g.tok_len == 0 or g.tok_len % 4:
            return "bad_tokens"
    elif not g.txt_ok:
        return "bad_caption"
    if not g.img_ok:
        return "corrupt_image"
    if g.beyond_eof:
        return "truncated_tar"
    return None


@dataclass
class ShardScan:
    """What indexing one shard found; ids are None for an id-assigned shard until ``first_id`` is set."""

    shard: str
    groups: int
    positions: np.ndarray  #: ordinal of each good sample among the tar's groups
    ids: np.ndarray | None  #: stored ids of the good samples (None: the shard has no id field)
    clean: np.ndarray | None  #: uint8 clean flag per good sample (255 = unknown)
    tok_len: int | None  #: stored token count, when every good sample has one and they agree
    has_tok: bool
    has_txt: bool
    skipped: dict
    tar_size: int
    verify: str
    idx_lines: list[str] = field(repr=False, default_factory=list)
    first_id: int | None = None

    @property
    def count(self) -> int:
        return int(self.positions.size)

    def sample_ids(self) -> np.ndarray:
        if self.ids is not None:
            return self.ids
        if self.first_id is None:
            raise ValueError(f"{self.shard}: ids are assigned but first_id is not set")
        return self.first_id + self.positions.astype(np.int64)


def scan_shard(path: str, verify: str = "decode") -> ShardScan:
    """Read one shard, validate every sample, and return the good ones with their .idx lines."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    stats: Counter = Counter()
    groups = _scan_groups(path, verify, stats)
    assign = bool(groups) and all(g.id_bytes is None for g in groups)
    positions, ids, clean, lines, tok_lens = [], [], [], [], set()
    has_tok = has_txt = True
    for g in groups:
        reason = _classify(g, assign)
        if reason is not None:
            stats[reason] += 1
            stats["bad_samples"] += 1
            stats[f"shard:{os.path.basename(path)}"] += 1
            continue
        positions.append(g.position)
        if not assign:
            ids.append(decode_id(g.id_bytes))
        clean.append(255 if g.clean is None else int(bool(g.clean)))
        has_tok &= g.tok_len is not None
        has_txt &= g.txt_ok
        if g.tok_len is not None:
            tok_lens.add(g.tok_len // 4)
        comps = [("img", *g.members[g.img_ext])]
        comps += [(e, *g.members[e]) for e in ("tok", "txt", "id") if e in g.members]
        lines.append(" ".join(f"{e} {off} {size} {_safe_name(name)}" for e, off, size, name in comps))
    n = len(positions)
    return ShardScan(
        shard=path,
        groups=len(groups),
        positions=np.asarray(positions, dtype=np.int64),
        ids=None if assign else np.asarray(ids, dtype=np.int64),
        clean=np.asarray(clean, dtype=np.uint8) if n and any(c != 255 for c in clean) else None,
        tok_len=tok_lens.pop() if has_tok and len(tok_lens) == 1 else None,
        has_tok=bool(n) and has_tok,
        has_txt=bool(n) and has_txt,
        skipped=dict(stats),
        tar_size=os.path.getsize(path),
        verify=verify,
        idx_lines=lines,
    )


def _safe_name(name: str) -> str:
    return "".join("_" if c.isspace() else c for c in name) or "_"


# ----------------------------------------------------------------------------- writing
def write_idx(scan: ShardScan, out_dir: str | None = None) -> tuple[str, str]:
    """Write ``<stem>.idx`` (DALI) and ``<stem>.idx.json`` (counts, skips, id assignment), atomically."""
    idx_path, meta_path = idx_paths(scan.shard, out_dir)
    os.makedirs(os.path.dirname(idx_path), exist_ok=True)
    tmp = idx_path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{IDX_VERSION} {scan.count}\n")
        f.writelines(line + "\n" for line in scan.idx_lines)
    os.replace(tmp, idx_path)
    meta = {
        "format": META_FORMAT,
        "shard": os.path.basename(scan.shard),
        "tar_size": scan.tar_size,
        "verify": scan.verify,
        "groups": scan.groups,
        "samples": scan.count,
        "skipped": scan.skipped,
        "has_id_field": scan.ids is not None,
        "first_id": scan.first_id,
        "has_tok": scan.has_tok,
        "has_txt": scan.has_txt,
        "tok_len": scan.tok_len,
        # positions of the good samples: only needed to turn DALI's (tar, offset) into an assigned id
        "positions": scan.positions.tolist() if scan.ids is None else None,
    }
    tmp = meta_path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, meta_path)
    return idx_path, meta_path


def build_shard_index(shard: str, out_dir: str | None = None, verify: str = "none",
                      first_id: int | None = None) -> ShardScan:
    """Scan one shard and write its .idx + sidecar (used by ShardWriter.finish and the DALI loader)."""
    scan = scan_shard(shard, verify)
    if scan.ids is None:
        scan.first_id = 0 if first_id is None else first_id
    write_idx(scan, out_dir)
    return scan


@dataclass
class ShardMeta:
    """A shard's sidecar, read back."""

    idx_path: str
    samples: int
    groups: int
    skipped: dict
    has_id_field: bool
    first_id: int | None
    has_tok: bool
    has_txt: bool
    tok_len: int | None
    positions: list | None
    verify: str


def load_shard_meta(shard: str, search_dirs: list[str | None] = (None,)) -> ShardMeta | None:
    """The shard's .idx + sidecar from the first of ``search_dirs`` (None = beside the shard) that has
    an up-to-date pair (same tar size), or None."""
    size = os.path.getsize(shard) if os.path.exists(shard) else -1
    for d in search_dirs:
        idx_path, meta_path = idx_paths(shard, d)
        if not (os.path.isfile(idx_path) and os.path.isfile(meta_path)):
            continue
        try:
            with open(meta_path) as f:
                m = json.load(f)
        except (OSError, ValueError):
            continue
        if m.get("format") != META_FORMAT or m.get("tar_size") != size or m.get("shard") != os.path.basename(shard):
            continue
        return ShardMeta(idx_path, m["samples"], m["groups"], m["skipped"], m["has_id_field"], m["first_id"],
                         m["has_tok"], m["has_txt"], m["tok_len"], m.get("positions"), m.get("verify", "none"))
    return None


def assigned_first_ids(shards: list[str], index_root: str | None = None) -> dict[str, int]:
    """{shard path: first id} for the shards whose samples get ``first_id + position`` as id.

    The torch loader must use it for samples without an ``id`` field::

        first = assigned_first_ids(shards, index.root if index else None)   # once, at construction
        for pos, raw in enumerate(iter_tar_samples(path, stats)):          # position counts every group
            if "id" not in raw and path in first:
                raw["id"] = encode_id(first[path] + pos)
    """
    out = {}
    for s in shards:
        m = load_shard_meta(s, [index_root, None] if index_root else [None])
        if m is not None and not m.has_id_field and m.first_id is not None:
            out[s] = int(m.first_id)
    return out


def fill_assigned_id(raw: dict, first_id: int | None, position: int) -> None:
    """Give a raw sample dict without ``id`` its assigned id (no-op when it has one or the shard has no assignment)."""
    if "id" not in raw and first_id is not None:
        raw["id"] = encode_id(first_id + position)


# ----------------------------------------------------------------------------- the command
def _scan_for_pool(args: tuple[str, str]) -> ShardScan:
    return scan_shard(*args)


def index_shards(shards: list[str], out_dir: str, verify: str = "decode", workers: int = 0,
                 progress: bool = True) -> DatasetIndex:
    """Index shards made elsewhere: .idx + sidecar per shard and ``index.json`` (+ ``clean.npy``) in ``out_dir``."""
    if not shards:
        raise ValueError("no shards given")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    stems = Counter(shard_stem(s) for s in shards)
    dup = [s for s, c in stems.items() if c > 1]
    if dup:
        raise ValueError(f"shards share file names ({dup[:3]}): their .idx files would collide in {out_dir}; "
                         f"index each directory separately")
    os.makedirs(out_dir, exist_ok=True)
    workers = workers or min(len(shards), os.cpu_count() or 1)
    jobs = [(s, verify) for s in shards]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        it = pool.map(_scan_for_pool, jobs, chunksize=1) if pool else map(_scan_for_pool, jobs)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(shards), desc="index", unit="shard")
        scans = list(it)
    finally:
        if pool:
            pool.shutdown()

    stored = [s.ids for s in scans if s.ids is not None and s.ids.size]
    next_id = int(max(a.max() for a in stored)) + 1 if stored else 0
    for s in scans:
        if s.ids is None:  # assigned: after every stored id, in command-line order
            s.first_id = next_id
            next_id += s.groups
    all_ids = np.concatenate([s.sample_ids() for s in scans]) if scans else np.zeros(0, np.int64)
    if all_ids.size == 0:
        raise ValueError(f"no readable samples in {len(shards)} shard(s)")
    uniq = np.unique(all_ids)
    if uniq.size != all_ids.size:
        raise ValueError(f"{all_ids.size - uniq.size} duplicate sample ids across the shards: the history buffer "
                         f"needs unique ids (rewrite the shards' id fields, or remove them to get assigned ids)")
    for s in scans:
        write_idx(s, out_dir)

    skipped: Counter = Counter()
    for s in scans:
        skipped.update({k: v for k, v in s.skipped.items() if not k.startswith("shard:")})
    clean_file = None
    if any(s.clean is not None for s in scans):
        flags = np.zeros(int(all_ids.max()) + 1, dtype=np.uint8)
        for s in scans:
            if s.clean is not None:
                c = s.clean
                flags[s.sample_ids()[c != 255]] = c[c != 255]
        np.save(os.path.join(out_dir, "clean.npy"), flags)
        clean_file = "clean.npy"
    has_tok = all(s.has_tok for s in scans if s.count)
    tok_lens = {s.tok_len for s in scans if s.count}
    ctx = tok_lens.pop() if has_tok and len(tok_lens) == 1 and None not in tok_lens else DEFAULT_CONTEXT_LENGTH
    out_abs = os.path.abspath(out_dir)
    infos = []
    for s in scans:
        p = os.path.abspath(s.shard)
        rel = os.path.relpath(p, out_abs)
        infos.append(ShardInfo(rel if not rel.startswith("..") else p, s.count))
    idx = DatasetIndex(
        num_samples=int(all_ids.size),
        id_min=int(all_ids.min()),
        id_max=int(all_ids.max()),
        shards=infos,
        context_length=int(ctx),
        has_tokens=has_tok,
        clean_file=clean_file,
        skipped=dict(skipped),
        root=out_abs,
    )
    idx.save(out_dir)
    n_assigned = sum(1 for s in scans if s.ids is None)
    log.info("indexed %d shard(s): %d samples, ids %d..%d%s, skipped %s -> %s", len(scans), idx.num_samples,
             idx.id_min, idx.id_max, f", ids assigned in {n_assigned} shard(s)" if n_assigned else "",
             dict(skipped) or "none", os.path.join(out_dir, INDEX_NAME))
    return idx


def main_index(argv: list[str] | None = None) -> int:
    """``dissect-fast index SHARDS... [--out DIR] [--verify decode|header|none] [--workers N]``."""
    p = argparse.ArgumentParser(
        prog="dissect-fast index",
        description="Write DALI .idx files and the dataset index (index.json) for webdataset shards made "
                    "elsewhere (img2dataset output, public CC3M/CC12M releases). Unreadable samples are left out "
                    "of the .idx and counted; samples without an id field get first_id + position.",
    )
    p.add_argument("shards", nargs="+", help="shard files, directories, brace patterns or globs")
    p.add_argument("--out", default=None, help="where index.json and the .idx files go (default: the first "
                                               "shard's directory)")
    p.add_argument("--verify", choices=VERIFY_LEVELS, default="decode",
                   help="image check: decode (PIL at 1/8 scale, catches corrupt and truncated data), header "
                        "(markers only), none")
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    shards: list[str] = []
    for spec in a.shards:
        shards += expand_shards(spec)
    if not shards:
        p.error(f"no shards match {a.shards}")
    out = a.out or os.path.dirname(os.path.abspath(shards[0]))
    index_shards(shards, out, verify=a.verify, workers=a.workers, progress=not a.no_progress)
    return 0
