"""Caption noise for any data (``dissect-fast noise``): shuffle a share of the captions, record which pairs stay clean.

``synth`` and ``shards --noise`` make noisy data of their own; this command makes it from data people already
have, so that selection under noisy correspondence can be studied on it:

* **shards** (webdataset tars, ours or made elsewhere: img2dataset, pixparse, ...): every sample is read by the
  project's sample rules (:mod:`dissect_fast.data.samples`), so its id is its stored ``id`` or, in shards without
  one, ``first_id + position`` from the dataset index (run ``dissect-fast index`` first). Bad samples are counted
  by reason and left out. Among the good samples a share ``noise`` (exactly ``round(noise * n)``) is chosen with
  :func:`~dissect_fast.tools.csv_shards.grouped_noisy_permutation` (seeded); every chosen pair gets the caption of
  another chosen pair of a different image (samples with the same image bytes are one image: several captions of
  one photo never trade captions and count as noisy); ``txt`` and, when present, the stored ``tok`` ids move
  together.
  Output: one tar per input tar, same file names and sample keys, every sample with its image, ``json`` and other
  members byte for byte, its ``id`` written as a member (the same id as in the input, so results map back), a
  1-byte ``clean`` member, and ``index.json`` + ``clean.npy`` + DALI ``.idx`` files (what the trainer reads; the
  diagnostics take the clean flags from ``clean.npy``), and ``caption_source.npy`` (int64 by id: the id whose
  caption the sample now has; -1 for ids not written). Metadata members are not rewritten: img2dataset's ``json``
  still holds the original caption.
* **an open_clip CSV**: the trainer reads shards, not CSVs, so the CSV is converted the way ``dissect-fast shards``
  does (JPEG + caption + open_clip tokens per sample) with the noise applied (rows grouped by image file and
  bytes, as above); ids are the CSV's data row numbers
  (0-based, header excluded). Beside the shards, ``OUT/<name of the CSV>`` is the same table restricted to the
  rows written, with the noisy captions and two more columns, ``id`` and ``clean``.

Shards that already carry clean flags (``synth`` output) keep them: a pair is clean when it was clean and its
caption did not move.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm
from webdataset.gopen import gopen

from dissect_fast.data import samples
from dissect_fast.data.index import index_shards
from dissect_fast.data.samples import VERIFY_LEVELS, BadSample, MissingIdsError, missing_ids_message
from dissect_fast.data.shards import (
    DEFAULT_CONTEXT_LENGTH,
    INDEX_NAME,
    DatasetIndex,
    check_ids_known,
    encode_id,
    is_url,
    resolve_data,
    shard_stem,
    tokenize,
    tokenizer_for,
)
from dissect_fast.tools.csv_shards import content_key, group_ids, grouped_noisy_permutation, load_jpeg, read_table
from dissect_fast.tools.writer import ShardWriter, shard_sizes

log = logging.getLogger("dissect_fast")

CAPTION_FIELDS = ("txt", "tok")  #: the fields that move with a caption
CSV_SUFFIXES = (".csv", ".tsv")
SOURCE_FILE = "caption_source.npy"


@dataclass
class NoiseResult:
    """What :func:`add_noise` wrote: per written sample (in output order) its id, the id whose caption it got and
    its clean flag."""

    index: DatasetIndex
    ids: np.ndarray
    caption_source: np.ndarray
    clean: np.ndarray
    skipped: dict
    csv: str | None = None  #: the noisy CSV (CSV input)

    @property
    def moved(self) -> int:
        return int((self.caption_source != self.ids).sum())


def _check_noise(noise: float) -> None:
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"--noise must be in [0, 1), got {noise}")


def _permute(groups: np.ndarray, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(caption source, clean) of ``n = len(groups)`` samples; ``groups[i]``: sample i's image (never its source)."""
    n = len(groups)
    src, moved_not = grouped_noisy_permutation(groups, noise, np.random.default_rng(seed))
    if int(round(noise * n)) == 1:
        log.warning("--noise %s of %d samples is one pair: a caption cannot move among one pair, none moved", noise, n)
    return src, moved_not


# ----------------------------------------------------------------------------- shards
@dataclass
class _Scan:
    """The good samples of one shard (pass 1): positions, ids, caption fields and stored clean flags."""

    shard: str
    positions: list
    ids: list
    captions: list  #: dict field -> bytes per good sample
    clean_in: list  #: stored clean flag (0/1) or None
    stats: Counter
    images: list  #: per good sample, the content key of its image bytes (samples of one image: one key)


def _open(shard: str):
    if is_url(shard):
        return gopen(shard)
    return open(shard, "rb")


def _scan(job: tuple[str, int | None, int | None, str]) -> _Scan:
    shard, first_id, num_ids, verify = job
    stats: Counter = Counter()
    out = _Scan(shard, [], [], [], [], stats, [])
    any_id = no_id = 0
    with _open(shard) as f:
        for s in samples.iter_shard(f, shard, stats):
            if first_id is None and "id" not in s:
                no_id += 1  # in a shard without ids and no index: an error (below), else a bad sample
                samples.count_bad(stats, "missing_field", shard)
                continue
            any_id += "id" in s
            try:
                sid = samples.check_fields(s, first_id, num_ids)
                image = s[samples.image_field(s)]
                samples.check_image(image, verify)
            except BadSample as e:
                samples.count_bad(stats, e.reason, shard)
                continue
            out.images.append(content_key(image))
            out.positions.append(s["__position__"])
            out.ids.append(sid)
            out.captions.append({k: s[k] for k in CAPTION_FIELDS if k in s})
            c = s.get("clean")
            out.clean_in.append(int(bool(c[0])) if c is not None and len(c) == 1 else None)
    if no_id and not any_id:
        raise MissingIdsError("--in: " + missing_ids_message(shard))
    return out


def _write_shard(job: tuple) -> int:
    """Pass 2: copy the good samples of ``shard`` into ``dest`` with their new caption fields, id and clean flag."""
    shard, dest, positions, ids, captions, clean = job
    want = dict(zip(positions, range(len(positions))))
    tmp = dest + ".part"
    written = 0
    with _open(shard) as f, tarfile.open(tmp, "w") as tar:
        for s in samples.iter_shard(f, shard, Counter()):
            k = want.get(s["__position__"])
            if k is None:
                continue
            members: dict[str, bytes] = {}
            for ext, data in s.items():
                if ext.startswith("__") or ext in ("id", "clean"):
                    continue
                if ext in CAPTION_FIELDS:
                    members.update(captions[k])  # the new caption fields, where the old ones were
                    continue
                members[ext] = data
            members.update(captions[k])  # no-op when already placed (keeps the first position)
            members["id"] = encode_id(ids[k])
            members["clean"] = bytes([int(clean[k])])
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size, ti.mtime, ti.mode = len(data), 0, 0o444
                tar.addfile(ti, io.BytesIO(data))
            written += 1
    if written != len(positions):
        os.remove(tmp)
        raise RuntimeError(f"{shard}: changed while it was read ({written} of {len(positions)} samples found again)")
    os.replace(tmp, dest)
    return written


def _pool_map(fn, jobs: list, workers: int, progress: bool, desc: str):
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        it = pool.map(fn, jobs, chunksize=1) if pool else map(fn, jobs)
        if progress:
            it = tqdm(it, total=len(jobs), desc=desc, unit="shard", leave=False)
        return list(it)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def noise_shards(
    spec: str,
    out: str,
    noise: float,
    seed: int = 0,
    *,
    data_index: str | None = None,
    verify: str = "decode",
    workers: int = 0,
    progress: bool = True,
) -> NoiseResult:
    """Shuffle a share ``noise`` of the captions of the shards ``spec`` (anything ``--train-data`` takes) into ``out``."""
    _check_noise(noise)
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"--verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    shards, index = resolve_data(spec, "--in", data_index)
    check_ids_known(shards, index, "--in")
    stems = Counter(shard_stem(s) for s in shards)
    dup = sorted(s for s, c in stems.items() if c > 1)
    if dup:
        raise ValueError(f"--in: shards share file names ({dup[:3]}): the output keeps the names; noise each set apart")
    os.makedirs(out, exist_ok=True)
    dests = [os.path.join(out, shard_stem(s) + ".tar") for s in shards]
    inputs = {os.path.realpath(s) for s in shards if not is_url(s)}
    if any(os.path.realpath(d) in inputs for d in dests):
        raise ValueError(f"--out {out}: would overwrite the input shards; write the noisy copy to another directory")

    first_ids = index.first_ids() if index is not None else {}
    num_ids = index.num_ids if index is not None else None
    jobs = [(s, first_ids.get(shard_stem(s)), num_ids, verify) for s in shards]
    scans = _pool_map(_scan, jobs, workers, progress, "noise: reading")

    stats: Counter = Counter()
    seen: set[int] = set()
    for sc in scans:  # the first good copy of an id is kept, like the loader
        stats.update(sc.stats)
        keep = []
        for i, sid in enumerate(sc.ids):
            if sid not in seen:
                seen.add(sid)
                keep.append(i)
        if len(keep) < len(sc.ids):
            samples.count_bad(stats, "duplicate_id", sc.shard, len(sc.ids) - len(keep))
            for name in ("positions", "ids", "captions", "clean_in", "images"):
                setattr(sc, name, [getattr(sc, name)[i] for i in keep])
    ids = np.asarray([i for sc in scans for i in sc.ids], dtype=np.int64)
    n = ids.size
    if n == 0:
        raise ValueError(f"--in {spec}: no good samples ({_bad(stats)})")
    src, unmoved = _permute(group_ids([k for sc in scans for k in sc.images]), noise, seed)
    captions = [c for sc in scans for c in sc.captions]
    clean_in = np.asarray([1 if c is None else c for sc in scans for c in sc.clean_in], dtype=bool)
    clean = unmoved & clean_in
    if not clean_in.all():
        log.info("%d sample(s) were already flagged noisy in the input: they stay noisy", int((~clean_in).sum()))

    wjobs, start = [], 0
    for sc, dest in zip(scans, dests):
        k = len(sc.ids)
        if k:
            sl = slice(start, start + k)
            wjobs.append((sc.shard, dest, sc.positions, sc.ids, [captions[j] for j in src[sl]], clean[sl].tolist()))
        start += k
    _pool_map(_write_shard, wjobs, workers, progress, "noise: writing")

    quiet = logging.getLogger("dissect_fast")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "indexed ... skipped none" would contradict the skips reported below
    try:
        idx = index_shards([j[1] for j in wjobs], out, verify="none", workers=workers, progress=False)
    finally:
        quiet.setLevel(level)
    skipped = {k: v for k, v in stats.items() if not k.startswith("shard:")}
    idx.skipped = skipped
    idx.save(out)
    _save_source(out, ids, ids[src])
    _log_done(n, src, skipped, out)
    return NoiseResult(idx, ids, ids[src], clean, skipped)


def _save_source(out: str, ids: np.ndarray, source_ids: np.ndarray) -> None:
    a = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    a[ids] = source_ids
    np.save(os.path.join(out, SOURCE_FILE), a)


def _bad(stats: dict) -> str:
    """The skip counts by reason, for a message."""
    return ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if not k.startswith("shard:")) or "none"


def _log_done(n: int, src: np.ndarray, skipped: dict, out: str) -> None:
    moved = int((src != np.arange(n)).sum())
    log.info("noise: %d of %d captions moved; skipped: %s -> %s", moved, n, _bad(skipped), out)


# ----------------------------------------------------------------------------- CSV
def noise_csv(
    csv_path: str,
    out: str,
    noise: float,
    seed: int = 0,
    *,
    images: str | None = None,
    img_key: str | None = None,
    caption_key: str | None = None,
    sep: str | None = None,
    verify: str = "decode",
    samples_per_shard: int | None = None,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    progress: bool = True,
) -> NoiseResult:
    """Shards (+ a noisy copy of the CSV) from an open_clip CSV with a share ``noise`` of its captions shuffled.

    Image paths are relative to ``images`` (default: the CSV's folder). Rows with an empty caption, a missing or
    unreadable image are skipped and counted (``empty_caption``, ``missing_image``, ``corrupt_image``,
    ``tiny_image``). Rows naming the same file, or files with the same bytes, are one image: a noisy row gets the
    caption of another image. ``samples_per_shard`` None: ``dissect_fast.tools.writer.shard_sizes``'s choice."""

    _check_noise(noise)
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"--verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"--in {csv_path}: no such file")
    images = images if images is not None else os.path.dirname(os.path.abspath(csv_path))
    if not os.path.isdir(images):
        raise FileNotFoundError(f"--images {images}: no such directory")
    out_csv = os.path.join(out, os.path.basename(csv_path))
    if os.path.exists(out_csv) and os.path.samefile(out_csv, csv_path):
        raise ValueError(f"--out {out}: would overwrite the input CSV; write the noisy copy to another directory")
    fields, delim, rows, img_key, cap_key = read_table(csv_path, img_key, caption_key, sep)

    def path_of(row: dict) -> str:
        p = row[img_key] or ""
        return p if os.path.isabs(p) else os.path.join(images, p)

    skipped: Counter = Counter()
    good: list[int] = []  # row numbers = ids
    keys: list[bytes] = []  # per good row, the content key of its image
    checked: dict[str, bytes | str] = {}  # image path -> content key, or the reason it is bad
    it = enumerate(rows)
    if progress:
        it = tqdm(it, total=len(rows), desc="noise: checking images", unit="img", leave=False)
    for i, row in it:  # pass 1: which rows are usable (images are not kept in memory)
        if not (row[cap_key] or "").strip():
            skipped["empty_caption"] += 1
            continue
        path = os.path.realpath(path_of(row))
        if path not in checked:
            checked[path] = _check_file(path, verify)
        key = checked[path]
        if isinstance(key, str):
            skipped[key] += 1
            continue
        good.append(i)
        keys.append(key)
    if not good:
        raise ValueError(f"--in {csv_path}: no usable rows ({_bad(skipped)})")
    n = len(good)
    src, clean = _permute(group_ids(keys), noise, seed)
    caps = [rows[i][cap_key].strip() for i in good]
    tok = tokenizer_for(context_length)
    os.makedirs(out, exist_ok=True)
    sizes = shard_sizes(n, samples_per_shard)
    w = ShardWriter(out, sizes[0], sizes=sizes)
    kept: list[int] = []
    chunk = 4096
    bar = None
    if progress:
        bar = tqdm(total=n, desc="noise: writing", unit="img", leave=False)
    for a in range(0, n, chunk):  # pass 2: load, tokenise the new captions in chunks, write
        b = min(n, a + chunk)
        tokens = tokenize(tok, [caps[j] for j in src[a:b]], context_length)
        for k in range(a, b):
            try:
                jpg = load_jpeg(path_of(rows[good[k]]))
            except Exception:  # noqa: BLE001 -- PIL raises many types; pass 1 at --verify none does not decode
                skipped["corrupt_image"] += 1
                continue
            w.write(good[k], jpg, caps[src[k]], tokens[k - a], bool(clean[k]))
            kept.append(k)
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    if len(kept) < n:
        log.warning(
            "%d image(s) passed --verify %s but did not decode: left out, so the noisy share is not exact "
            "(use --verify decode)",
            n - len(kept),
            verify,
        )
    idx = w.finish(context_length, skipped=dict(skipped))
    kept_a = np.asarray(kept, dtype=np.int64)
    good_a = np.asarray(good, dtype=np.int64)
    ids, source_ids = good_a[kept_a], good_a[src[kept_a]]
    _save_source(out, ids, source_ids)

    out_fields = fields + [c for c in ("id", "clean") if c not in fields]
    tmp = out_csv + ".part"
    with open(tmp, "w", newline="", encoding="utf-8") as fo:
        wr = csv.DictWriter(fo, fieldnames=out_fields, delimiter=delim, extrasaction="ignore")
        wr.writeheader()
        for k in kept:
            row = dict(rows[good[k]])
            row[cap_key] = caps[src[k]]
            row["id"] = good[k]
            row["clean"] = int(clean[k])
            wr.writerow(row)
    os.replace(tmp, out_csv)
    _log_done(n, src, dict(skipped), out)
    return NoiseResult(idx, ids, source_ids, clean[kept_a], dict(skipped), csv=out_csv)


def _check_file(path: str, verify: str) -> bytes | str:
    """The content key of an image file that passes ``--verify``, or the reason it is left out."""
    if not os.path.isfile(path):
        return "missing_image"
    with open(path, "rb") as f:
        data = f.read()
    try:
        samples.check_image(data, verify)
    except BadSample as e:
        return e.reason
    return content_key(data)


# ----------------------------------------------------------------------------- the command
def is_csv(spec: str) -> bool:
    return spec.lower().endswith(CSV_SUFFIXES) and not is_url(spec)


def add_noise(spec: str, out: str, noise: float, seed: int = 0, **kw) -> NoiseResult:
    """:func:`noise_csv` for a ``.csv``/``.tsv`` file, else :func:`noise_shards`; keyword arguments go to the one
    chosen (a CSV-only option given with shards is an error)."""
    csv_only = ("images", "img_key", "caption_key", "sep", "samples_per_shard", "context_length")
    if is_csv(spec):
        kw = {k: v for k, v in kw.items() if k not in ("data_index", "workers")}
        return noise_csv(spec, out, noise, seed, **kw)
    given = [k for k in csv_only if kw.get(k) is not None]
    if given:
        raise ValueError(f"--in {spec}: {', '.join(given)} apply to CSV input only (a .csv or .tsv file)")
    kw = {k: v for k, v in kw.items() if k not in csv_only}
    return noise_shards(spec, out, noise, seed, **kw)


def main_noise(argv: list[str] | None = None) -> int:
    """``dissect-fast noise --in SHARDS_OR_CSV --out DIR --noise F [--seed S] ...``."""
    p = argparse.ArgumentParser(
        prog="dissect-fast noise",
        description="Give a share of the pairs another pair's caption (noisy correspondence) in any data, and "
        "write the clean flags the trainer's diagnostics read. Shards (webdataset tars: ours, img2dataset, "
        "pixparse, ...; index those without an id field with `dissect-fast index` first) are copied to --out "
        "with the same file names, keys, ids, images and other members; noisy pairs get another pair's `txt` "
        "(and `tok`). An open_clip CSV is converted to shards like `dissect-fast shards` does (the trainer "
        "reads shards, not CSVs; ids are the CSV's row numbers), plus a copy of the CSV with the noisy "
        "captions and `id` and `clean` columns. --out gets index.json, clean.npy (1 = clean, by id) and "
        f"{SOURCE_FILE} (the id whose caption each id has): train with --train-data OUT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--in",
        dest="inp",
        required=True,
        help="shards (a directory, brace pattern, glob, `::` list or webdataset URL) or a .csv/.tsv file",
    )
    p.add_argument("--out", required=True, help="directory for the noisy shards (not the input's)")
    p.add_argument(
        "--noise",
        type=float,
        required=True,
        help="share of the good pairs whose caption moves, in [0, 1): exactly round(noise * n) pairs",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of noisy pairs and their captions")
    p.add_argument("--data-index", default=None, help="dataset index of --in when it is not beside the shards")
    p.add_argument(
        "--verify",
        choices=VERIFY_LEVELS,
        default="decode",
        help="image check before the noisy subset is chosen (as for `dissect-fast index`); bad samples are left out",
    )
    p.add_argument("--workers", type=int, default=0, help="processes for shards (0: all cores)")
    p.add_argument("--images", default=None, help="CSV: folder the image paths are relative to (None: the CSV's)")
    p.add_argument(
        "--csv-img-key",
        default=None,
        help="CSV: image path column (None: the first of filepath, file, image, img, path in the header)",
    )
    p.add_argument(
        "--csv-caption-key",
        default=None,
        help="CSV: caption column (None: the first of title, caption, text in the header)",
    )
    p.add_argument("--csv-separator", default=None, help="CSV: None = tab if the header has tabs, else comma")
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help="CSV: samples per shard (None: as `dissect-fast shards` picks it, >= 8 shards per rank and worker)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    kw = dict(verify=a.verify, progress=not a.no_progress)
    if is_csv(a.inp):
        kw.update(
            images=a.images,
            img_key=a.csv_img_key,
            caption_key=a.csv_caption_key,
            sep=a.csv_separator,
            samples_per_shard=a.samples_per_shard,
        )
    else:
        given = [
            f
            for f, v in (
                ("--images", a.images),
                ("--csv-img-key", a.csv_img_key),
                ("--csv-caption-key", a.csv_caption_key),
                ("--csv-separator", a.csv_separator),
                ("--samples-per-shard", a.samples_per_shard),
            )
            if v is not None
        ]
        if given:
            p.error(f"{' '.join(given)}: for CSV input only (--in {a.inp} is not a .csv/.tsv file)")
        kw.update(data_index=a.data_index, workers=a.workers)
    try:
        r = add_noise(a.inp, a.out, a.noise, a.seed, **kw)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(
        f"wrote {r.index.num_samples} samples in {len(r.index.shards)} shard(s) to {a.out}: {r.moved} caption(s) "
        f"moved ({r.moved / max(1, r.ids.size):.1%}), clean flags in {os.path.join(a.out, 'clean.npy')}"
        + (f", noisy CSV {r.csv}" if r.csv else "")
        + f"; skipped: {_bad(r.skipped)}"
        + f" -> {os.path.join(a.out, INDEX_NAME)}"
    )
    return 0
