"""DALI index files and the dataset index for webdataset shards (``dissect-fast index``).

DALI's ``fn.readers.webdataset`` reads samples at the byte offsets listed in an ``.idx`` file
(format ``v1.2``, as written by the ``wds2idx`` tool shipped in the DALI wheel: a header line
``v1.2 N``, then one line per sample of ``ext offset size name`` groups). We write those files
ourselves, from one Python pass over each tar through the same reader and rules as the torch
loader (:mod:`dissect_fast.data.samples`), because that pass is where bad data gets caught: DALI cannot skip a sample inside its graph (a decode error invalidates the pipeline and
a truncated tar is an I/O error), so a sample goes into the ``.idx`` only when it

* passes :func:`samples.check_fields` (image, caption, id; or its shard has no ids at all: see
  *id assignment* below);
* lies completely inside the tar (a truncated tar loses the sample it broke in, like the
  torch loader);
* passes :func:`samples.check_image` at the level chosen by ``verify``: ``decode`` (default for the
  command: PIL decodes it at 1/8 scale, which runs the entropy decoder over all the data and costs
  ~0.5 ms per 400x300 JPEG), ``header`` (PIL reads format and size, so ``tiny_image`` is caught; JPEG/PNG
  end markers), or ``none`` (for shards we just wrote ourselves from decoded images).

Every excluded sample is counted by the same reason names (:data:`samples.BAD_REASONS`) in a
sidecar ``<stem>.idx.json`` so that the DALI loader reports the same ``bad_samples`` as the
torch loader would. Components are written under canonical names (``img``, ``tok``, ``txt``,
``id``) whatever the tar calls them, so one DALI ``ext`` list fits every shard.

*Bounded cost.* Images over ``max_image_pixels`` (``image_too_large``, from the header at ``verify`` header or
decode) and members over ``max_member_bytes`` (``member_too_large``, never read) are left out like other bad
samples, under the names the torch loader uses; a ``txt`` component is listed with its size capped at
:data:`samples.MAX_TXT_BYTES`, so DALI reads a bounded caption whatever the tar holds.

*Pairing.* The sidecar holds the SHA-1 of its ``.idx`` (an edited or foreign ``.idx`` is not used: the loader
builds its own) and :func:`check_idx_pairing` checks an ``.idx`` against the tar's own member headers (each
component's name and size at its offset, and one key per sample), so a sample pointed at its neighbour's image
is refused before training.

*Id assignment.* Shards made elsewhere (img2dataset, public CC3M/CC12M releases) have no ``id``
field. A shard none of whose samples has one gets ``first_id + position``, ``position`` being the
sample's ordinal among all sample groups of the tar (bad ones included, so ids do not move when
the verification level changes), and ``first_id`` the running count over such shards in command
line order, after the largest stored id. ``first_id`` is recorded in ``index.json`` (the torch loader
reads it there) and in the sidecar (the DALI loader's offset -> id map).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from dissect_fast.data import samples
from dissect_fast.data.samples import VERIFY_LEVELS, BadSample
from dissect_fast.data.shards import (
    DEFAULT_CONTEXT_LENGTH,
    INDEX_NAME,
    DatasetIndex,
    ShardInfo,
    expand_shards,
    shard_stem,
)
from dissect_fast.ioutil import atomic_write, write_json_atomic

log = logging.getLogger("dissect_fast")

IDX_VERSION = "v1.2"
META_FORMAT = "dissect_fast/idx1"


# ----------------------------------------------------------------------------- paths
def idx_paths(shard: str, out_dir: str | None = None) -> tuple[str, str]:
    """(``.idx``, ``.idx.json``) for a shard: in ``out_dir`` when given, else beside the shard."""
    d = out_dir if out_dir is not None else os.path.dirname(os.path.abspath(shard))
    stem = os.path.join(d, shard_stem(shard))
    return stem + ".idx", stem + ".idx.json"


# ----------------------------------------------------------------------------- scanning
@dataclass
class _Group:
    """One sample group of a tar as the scan saw it (no pixel data kept)."""

    position: int
    members: dict  #: ext -> samples.Member
    reason: str | None  #: why it is bad, judged as if ids were assigned (``need_id=False``)
    stored_id: int | None
    has_id: bool
    tok_len: int | None  #: bytes of the tok field
    txt_ok: bool
    clean: int | None


def _scan_groups(path: str, verify: str, stats: Counter, max_pixels: int, max_bytes: int) -> list[_Group]:
    """Every complete sample group of a tar, in order, judged by the shared sample rules."""
    groups = []
    for s in samples.iter_shard_file(path, stats, members=True, max_member_bytes=max_bytes):
        reason, sid = None, None
        try:
            sid = samples.check_fields(s, first_id=None, num_ids=None, need_id=False)
            samples.check_image(s[samples.image_field(s)], verify, max_pixels)
        except BadSample as e:
            reason = e.reason
        try:
            txt_ok = "txt" in s and bool(samples.caption_text(s))
        except BadSample:
            txt_ok = False
        clean = s.get("clean")
        groups.append(
            _Group(
                position=s["__position__"],
                members=s["__members__"],
                reason=reason,
                stored_id=sid,
                has_id="id" in s,
                tok_len=len(s["tok"]) if "tok" in s else None,
                txt_ok=txt_ok,
                clean=clean[0] if clean is not None and len(clean) == 1 else None,
            )
        )
    return groups


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
    max_image_pixels: int = samples.MAX_IMAGE_PIXELS
    max_member_bytes: int = samples.MAX_MEMBER_BYTES

    @property
    def count(self) -> int:
        return int(self.positions.size)

    def sample_ids(self) -> np.ndarray:
        if self.ids is not None:
            return self.ids
        if self.first_id is None:
            raise ValueError(f"{self.shard}: ids are assigned but first_id is not set")
        return self.first_id + self.positions.astype(np.int64)


def scan_shard(
    path: str,
    verify: str = "decode",
    max_image_pixels: int = samples.MAX_IMAGE_PIXELS,
    max_member_bytes: int = samples.MAX_MEMBER_BYTES,
) -> ShardScan:
    """Read one shard, validate every sample, and return the good ones with their .idx lines."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    stats: Counter = Counter()
    groups = _scan_groups(path, verify, stats, max_image_pixels, max_member_bytes)
    assign = bool(groups) and not any(g.has_id for g in groups)
    positions, ids, clean, lines, tok_lens = [], [], [], [], set()
    has_tok = has_txt = True
    for g in groups:
        reason = g.reason
        if reason is None and not assign and not g.has_id:  # a sample without id among samples with ids
            reason = "missing_field"
        if reason is not None:
            samples.count_bad(stats, reason, path)
            continue
        positions.append(g.position)
        if not assign:
            ids.append(g.stored_id)
        clean.append(255 if g.clean is None else int(bool(g.clean)))
        has_tok &= g.tok_len is not None
        has_txt &= g.txt_ok
        if g.tok_len is not None:
            tok_lens.add(g.tok_len // 4)
        img = samples.image_field(g.members)
        comps = [("img", g.members[img])] + [(e, g.members[e]) for e in ("tok", "txt", "id") if e in g.members]
        lines.append(" ".join(f"{e} {m.offset} {_listed_size(e, m.size)} {_safe_name(m.name)}" for e, m in comps))
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
        max_image_pixels=max_image_pixels,
        max_member_bytes=max_member_bytes,
    )


def _safe_name(name: str) -> str:
    return "".join("_" if c.isspace() else c for c in name) or "_"


def _listed_size(ext: str, size: int) -> int:
    """The size an ``.idx`` lists for a component: a caption is read up to MAX_TXT_BYTES only."""
    return min(size, samples.MAX_TXT_BYTES) if ext == "txt" else size


def check_idx_pairing(shard: str, idx_path: str, max_rows: int | None = None) -> None:
    """ValueError naming the first sample of ``idx_path`` that does not match the tar ``shard``: a component whose
    offset is not the data of a member of that name and size (the member header is the 512-byte block just before
    the data), or components of different sample keys on one line. One small read per component, no image data;
    ``max_rows``: only that many evenly spaced samples (the first and the last included)."""
    with open(idx_path) as f:
        _, *lines = f.read().splitlines()
    rows = range(len(lines))
    if max_rows is not None and len(lines) > max_rows:
        rows = np.unique(np.linspace(0, len(lines) - 1, max_rows).round().astype(int)).tolist()
    with open(shard, "rb") as t:
        for row in rows:
            line = lines[row]
            c = line.split()
            comps = [c[j : j + 4] for j in range(0, len(c), 4)]
            keys = set()
            for ext, off, size, name in comps:
                problem = None
                t.seek(max(0, int(off) - tarfile.BLOCKSIZE))
                try:
                    info = tarfile.TarInfo.frombuf(t.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
                except tarfile.TarError:
                    info = None
                if info is None or int(off) < tarfile.BLOCKSIZE:
                    problem = f"no tar member header before offset {off}"
                elif int(size) != _listed_size(ext, info.size):
                    problem = f"{ext} lists {size} bytes, the member at that offset has {info.size}"
                elif len(info.name) < 99 and _safe_name(os.path.basename(info.name)) != name:
                    problem = f"{ext} names {name}, the member at that offset is {os.path.basename(info.name)}"
                if problem:
                    raise ValueError(
                        f"{idx_path}: sample {row} does not match {shard} ({problem}): the .idx was made for other "
                        f"data; re-run `dissect-fast index` on the shards"
                    )
                kx = samples.split_name(name)
                keys.add(kx[0] if kx else name)
            if len(keys) > 1:
                raise ValueError(
                    f"{idx_path}: sample {row} mixes members of different samples ({sorted(keys)}); re-run "
                    f"`dissect-fast index` on the shards"
                )


# ----------------------------------------------------------------------------- writing
def write_idx(scan: ShardScan, out_dir: str | None = None) -> tuple[str, str]:
    """Write ``<stem>.idx`` (DALI) and ``<stem>.idx.json`` (counts, skips, id assignment), atomically."""
    idx_path, meta_path = idx_paths(scan.shard, out_dir)
    os.makedirs(os.path.dirname(idx_path), exist_ok=True)
    text = f"{IDX_VERSION} {scan.count}\n" + "".join(line + "\n" for line in scan.idx_lines)
    data = text.encode("utf-8", "surrogateescape")
    with atomic_write(idx_path, "wb", fsync=False) as f:
        f.write(data)
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
        "max_image_pixels": scan.max_image_pixels,
        "max_member_bytes": scan.max_member_bytes,
        "idx_sha1": hashlib.sha1(data).hexdigest(),
        # positions of the good samples: only needed to turn DALI's (tar, offset) into an assigned id
        "positions": scan.positions.tolist() if scan.ids is None else None,
    }
    write_json_atomic(meta_path, meta, fsync=False)
    return idx_path, meta_path


def build_shard_index(
    shard: str,
    out_dir: str | None = None,
    verify: str = "none",
    first_id: int | None = None,
    max_image_pixels: int = samples.MAX_IMAGE_PIXELS,
    max_member_bytes: int = samples.MAX_MEMBER_BYTES,
) -> ShardScan:
    """Scan one shard and write its .idx + sidecar (used by ShardWriter.finish and the DALI loader)."""
    scan = scan_shard(shard, verify, max_image_pixels, max_member_bytes)
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


def load_shard_meta(
    shard: str,
    search_dirs: Sequence[str | None] = (None,),
    max_image_pixels: int | None = None,
    max_member_bytes: int | None = None,
) -> ShardMeta | None:
    """The shard's .idx + sidecar from the first of ``search_dirs`` (None = beside the shard) that has
    an up-to-date pair (same tar size, the ``.idx`` unchanged since the sidecar was written (its SHA-1), and, when
    given, built with the same bounded-cost limits), or None."""
    size = os.path.getsize(shard) if os.path.exists(shard) else -1
    want = {"max_image_pixels": max_image_pixels, "max_member_bytes": max_member_bytes}
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
        if any(v is not None and m.get(k) != v for k, v in want.items()):
            continue  # indexed under other limits (or before there were any): its good samples may not be ours
        with open(idx_path, "rb") as f:
            if hashlib.sha1(f.read()).hexdigest() != m.get("idx_sha1"):
                log.warning(
                    "%s: changed since `dissect-fast index` wrote it (or written by another tool): not used", idx_path
                )
                continue
        return ShardMeta(
            idx_path,
            m["samples"],
            m["groups"],
            m["skipped"],
            m["has_id_field"],
            m["first_id"],
            m["has_tok"],
            m["has_txt"],
            m["tok_len"],
            m.get("positions"),
            m.get("verify", "none"),
        )
    return None


# ----------------------------------------------------------------------------- the command
def _scan_for_pool(args: tuple[str, str, int, int]) -> ShardScan:
    return scan_shard(*args)


def index_shards(
    shards: list[str],
    out_dir: str,
    verify: str = "decode",
    workers: int = 0,
    progress: bool = True,
    max_image_pixels: int = samples.MAX_IMAGE_PIXELS,
    max_member_bytes: int = samples.MAX_MEMBER_BYTES,
) -> DatasetIndex:
    """Index shards made elsewhere: .idx + sidecar per shard and ``index.json`` (+ ``clean.npy``) in ``out_dir``."""
    if not shards:
        raise ValueError("no shards given")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    stems = Counter(shard_stem(s) for s in shards)
    dup = [s for s, c in stems.items() if c > 1]
    if dup:
        raise ValueError(
            f"shards share file names ({dup[:3]}): their .idx files would collide in {out_dir}; "
            f"index each directory separately"
        )
    os.makedirs(out_dir, exist_ok=True)
    workers = workers or min(len(shards), os.cpu_count() or 1)
    jobs = [(s, verify, max_image_pixels, max_member_bytes) for s in shards]
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
        raise ValueError(
            f"{all_ids.size - uniq.size} duplicate sample ids across the shards: the history buffer "
            f"needs unique ids (rewrite the shards' id fields, or remove them to get assigned ids)"
        )
    for s in scans:
        write_idx(s, out_dir)

    skipped: Counter = Counter()
    for s in scans:
        skipped.update({k: v for k, v in s.skipped.items() if not k.startswith("shard:")})
    # the id range covers every assigned id, bad samples' included: a bad last sample then gets its own reason
    # from every reader (image_too_large, ...) instead of id_out_of_range
    id_max = max([int(all_ids.max())] + [s.first_id + s.groups - 1 for s in scans if s.first_id is not None])
    clean_file = None
    if any(s.clean is not None for s in scans):
        flags = np.zeros(id_max + 1, dtype=np.uint8)
        for s in scans:
            if s.clean is not None:
                c = s.clean
                flags[s.sample_ids()[c != 255]] = c[c != 255]
        np.save(os.path.join(out_dir, "clean.npy"), flags)
        clean_file = "clean.npy"
    has_tok = all(s.has_tok for s in scans if s.count)
    tok_lens = {s.tok_len for s in scans if s.count}
    ctx = tok_lens.pop() if has_tok and len(tok_lens) == 1 and None not in tok_lens else DEFAULT_CONTEXT_LENGTH
    assert ctx is not None  # None not in tok_lens
    out_abs = os.path.abspath(out_dir)
    infos = []
    for s in scans:
        p = os.path.abspath(s.shard)
        rel = os.path.relpath(p, out_abs)
        infos.append(ShardInfo(rel if not rel.startswith("..") else p, s.count, s.first_id, s.groups))
    idx = DatasetIndex(
        num_samples=int(all_ids.size),
        id_min=int(all_ids.min()),
        id_max=id_max,
        shards=infos,
        context_length=int(ctx),
        has_tokens=has_tok,
        clean_file=clean_file,
        skipped=dict(skipped),
        root=out_abs,
    )
    idx.save(out_dir)
    n_assigned = sum(1 for s in scans if s.ids is None)
    log.info(
        "indexed %d shard(s): %d samples, ids %d..%d%s, skipped %s -> %s",
        len(scans),
        idx.num_samples,
        idx.id_min,
        idx.id_max,
        f", ids assigned in {n_assigned} shard(s)" if n_assigned else "",
        dict(skipped) or "none",
        os.path.join(out_dir, INDEX_NAME),
    )
    return idx


def main_index(argv: list[str] | None = None) -> int:
    """``dissect-fast index SHARDS... [--out DIR] [--verify decode|header|none] [--workers N]``."""
    p = argparse.ArgumentParser(
        prog="dissect-fast index",
        description="Write DALI .idx files and the dataset index (index.json) for webdataset shards made "
        "elsewhere (img2dataset output, public CC3M/CC12M releases). Unreadable samples are left out "
        "of the .idx and counted; samples without an id field get first_id + position.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("shards", nargs="+", help="shard files, directories, brace patterns or globs")
    p.add_argument(
        "--out", default=None, help="where index.json and the .idx files go (default: the first shard's directory)"
    )
    p.add_argument(
        "--verify",
        choices=VERIFY_LEVELS,
        default="decode",
        help="image check: decode (PIL at 1/8 scale, catches corrupt and truncated data), header (markers only), none",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=samples.MAX_IMAGE_PIXELS,
        help="images with more pixels are bad samples (image_too_large), judged from the header",
    )
    p.add_argument(
        "--max-member-bytes",
        type=int,
        default=samples.MAX_MEMBER_BYTES,
        help="larger tar members are bad samples (member_too_large), skipped unread",
    )
    p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    shards: list[str] = []
    for spec in a.shards:
        shards += expand_shards(spec)
    if not shards:
        p.error(f"no shards match {a.shards}")
    out = a.out or os.path.dirname(os.path.abspath(shards[0]))
    try:
        idx = index_shards(
            shards,
            out,
            verify=a.verify,
            workers=a.workers,
            progress=not a.no_progress,
            max_image_pixels=a.max_image_pixels,
            max_member_bytes=a.max_member_bytes,
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    assigned = sum(1 for s in idx.shards if s.first_id is not None)
    bad = {k: v for k, v in idx.skipped.items() if k != "bad_samples"}
    print(
        f"indexed {len(idx.shards)} shard(s): {idx.num_samples} good samples, ids {idx.id_min}..{idx.id_max}"
        + (f" (assigned in {assigned} shard(s) without an id field)" if assigned else "")
        + f"; skipped {idx.skipped.get('bad_samples', 0)} bad {json.dumps(bad) if bad else ''}"
        + f" -> {os.path.join(out, INDEX_NAME)}"
    )
    return 0
