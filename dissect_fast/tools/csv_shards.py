"""Shards from a folder of images and a CSV of captions (the CC3M / CyCLIP layout).

Rows whose image is missing or unreadable, or whose caption is empty, are skipped and counted;
the counts are printed and stored in the dataset index. ``--noise`` swaps captions between a
random fraction of the pairs (for experiments), recorded in the clean flags.

Rows are grouped by image: rows naming the same file, or files with the same bytes (a hash of the content), are one
image. ``--val-fraction`` holds out whole images (every caption of a validation image is in validation, none in
training), and a noisy pair always gets the caption of another image (see :func:`grouped_noisy_permutation`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections import Counter

import numpy as np
from PIL import Image

from dissect_fast.data.shards import DEFAULT_CONTEXT_LENGTH, tokenize, tokenizer_for
from dissect_fast.tools.writer import DEFAULT_LOADER_WORKERS, DEFAULT_WORLD_SIZE, ShardWriter, shard_sizes

log = logging.getLogger("dissect_fast")

IMG_KEYS = ("filepath", "file", "image", "img", "path")  #: open_clip's default first, then common names
CAPTION_KEYS = ("title", "caption", "text")


def read_table(csv_path: str, img_key: str | None, cap_key: str | None, sep: str | None):
    """(columns, separator, rows as dicts, image key, caption key). Separator: ``sep``, else a tab when the header
    line has one (open_clip's default), else a comma. A key left as None is the first of the usual column names
    the header has; a missing column is a ValueError naming its flag."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        header = f.readline()
        f.seek(0)
        delim = sep or ("\t" if "\t" in header else ",")
        reader = csv.DictReader(f, delimiter=delim)
        fields = list(reader.fieldnames or [])
        img_key = img_key or next((k for k in IMG_KEYS if k in fields), IMG_KEYS[0])
        cap_key = cap_key or next((k for k in CAPTION_KEYS if k in fields), CAPTION_KEYS[0])
        for k, flag in ((img_key, "--csv-img-key"), (cap_key, "--csv-caption-key")):
            if k not in fields:
                raise ValueError(
                    f"{flag} {k!r}: no such column in {csv_path} (columns: {fields}; separator "
                    f"{delim!r}, set by --csv-separator)"
                )
        return fields, delim, list(reader), img_key, cap_key


def _read_rows(csv_path: str, img_key: str | None, cap_key: str | None, sep: str | None) -> list[tuple[str, str]]:
    """(image path, caption) rows (``read_table``'s rules)."""
    _, _, rows, img_key, cap_key = read_table(csv_path, img_key, cap_key, sep)
    return [(row[img_key] or "", row[cap_key] or "") for row in rows]


def load_jpeg(path: str) -> bytes:
    """The image as JPEG bytes: JPEG files pass through after a decode check; other formats are re-encoded."""
    with open(path, "rb") as f:
        return to_jpeg(f.read())


def to_jpeg(data: bytes) -> bytes:
    """``data`` (an image file's bytes) as JPEG bytes: :func:`load_jpeg`'s rule."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            return data
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()


def content_key(data: bytes) -> bytes:
    """The key that groups rows by image: a hash of the file's bytes (the same JPEG under two paths is one image)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def group_ids(keys: list) -> np.ndarray:
    """One int per row: rows with equal keys get the same number (numbered in order of first appearance)."""
    seen: dict = {}
    return np.asarray([seen.setdefault(k, len(seen)) for k in keys], dtype=np.int64)


def _derangeable(groups: np.ndarray) -> bool:
    """Whether the rows can be permuted so that none keeps a caption of its own group: no group holds more than
    half of them."""
    return np.bincount(groups).max() * 2 <= groups.size


def grouped_noisy_permutation(
    groups: np.ndarray, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(caption_source, clean) like :func:`~dissect_fast.tools.synthetic.noisy_permutation`, but a noisy pair never
    gets a caption of its own image (``groups[i]``: the image of row i).

    ``round(noise * n)`` rows are chosen at random; when they are all of different images the result is the same
    as ``noisy_permutation``'s (a random cyclic shift of the chosen rows). Otherwise the chosen rows, ordered by
    image (images in random order), are shifted by s in [m, k - m] (m: the most rows of one image, k: rows chosen),
    which maps no row into its own image's run. A choice where one image holds more than half of the chosen rows
    is redrawn; when none can be found the noisy share is made smaller, with a warning.
    """
    groups = np.asarray(groups, dtype=np.int64)
    n = groups.size
    src = np.arange(n)
    n_noisy = int(round(noise * n))
    if n_noisy < 2:
        return src, src == np.arange(n)
    noisy = rng.choice(n, n_noisy, replace=False)
    if np.unique(groups[noisy]).size == n_noisy:  # every chosen row a different image: the ungrouped rule
        src[noisy] = np.roll(noisy, int(rng.integers(1, n_noisy)))
        return src, src == np.arange(n)
    for _ in range(32):
        if _derangeable(groups[noisy]):
            break
        noisy = rng.choice(n, n_noisy, replace=False)
    else:  # few images: take rows round-robin over the images, dropping from the largest until it fits
        order = rng.permutation(n)
        rank = np.empty(n, dtype=np.int64)
        seen: Counter = Counter()
        for i in order:
            rank[i], seen[groups[i]] = seen[groups[i]], seen[groups[i]] + 1
        noisy = order[np.argsort(rank[order], kind="stable")][:n_noisy]
        while noisy.size >= 2 and not _derangeable(groups[noisy]):
            big = np.bincount(groups[noisy]).argmax()
            noisy = np.delete(noisy, np.flatnonzero(groups[noisy] == big)[-1])
        log.warning(
            "noise %s: only %d of the %d noisy pairs can get a caption of another image (the rows show too few "
            "distinct images)",
            noise,
            noisy.size if noisy.size >= 2 else 0,
            n_noisy,
        )
        if noisy.size < 2:
            return src, src == np.arange(n)
    g = groups[noisy]
    shuffled = rng.permutation(noisy.size)  # random order inside an image ...
    image_rank = rng.permutation(int(g.max()) + 1)  # ... and of the images
    ordered = noisy[shuffled][np.argsort(image_rank[g[shuffled]], kind="stable")]
    k, m = ordered.size, int(np.bincount(g).max())
    shift = int(rng.integers(m, k - m + 1))
    src[ordered] = np.roll(ordered, -shift)
    return src, src == np.arange(n)


def split_by_group(groups: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows), both sorted: whole groups (images) in random order go to validation until
    it holds the number of rows closest to ``round(val_fraction * n)``; at least one image is left for training.
    With one row per image this is the row split (the same rows for the same seed)."""
    groups = np.asarray(groups, dtype=np.int64)
    n, num_groups = groups.size, int(groups.max()) + 1
    order = rng.permutation(num_groups)  # drawn whatever the fraction: the noise that follows is the same
    target = int(round(val_fraction * n))
    if target == 0:
        return np.zeros(0, dtype=np.int64), np.arange(n)
    if num_groups < 2:
        raise ValueError(
            f"--val-fraction {val_fraction}: the rows show one image only, so no image is left for training; "
            f"add images or drop --val-fraction"
        )
    cum = np.cumsum(np.bincount(groups, minlength=num_groups)[order])
    k = int(np.argmin(np.abs(cum[: num_groups - 1] - target))) + 1  # images in validation: 1 .. num_groups - 1
    is_val = np.isin(groups, order[:k])
    return np.flatnonzero(is_val), np.flatnonzero(~is_val)


def csv_to_shards(
    csv_path: str,
    images: str,
    out: str,
    *,
    img_key: str | None = None,
    caption_key: str | None = None,
    sep: str | None = None,
    noise: float = 0.0,
    val_fraction: float = 0.0,
    seed: int = 0,
    samples_per_shard: int | None = None,
    world_size: int = DEFAULT_WORLD_SIZE,
    workers: int = DEFAULT_LOADER_WORKERS,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    progress: bool = True,
):
    """Write ``out/train`` (and ``out/val`` when val_fraction > 0); returns (train index, val index, skips).

    Validation holds whole images (rows grouped by image file and by image bytes). ``samples_per_shard`` None:
    :func:`~dissect_fast.tools.writer.shard_sizes` picks it for ``world_size`` ranks x ``workers`` loader workers."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"--csv {csv_path}: no such file")
    if not os.path.isdir(images):
        raise FileNotFoundError(f"--images {images}: no such directory")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"--noise must be in [0, 1), got {noise}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rows = _read_rows(csv_path, img_key, caption_key, sep)
    skipped: Counter = Counter()
    good: list[tuple[bytes, str]] = []
    keys: list[bytes] = []
    by_path: dict[str, tuple[bytes, bytes] | str] = {}  # path -> (content key, JPEG) or the skip reason
    by_content: dict[bytes, bytes] = {}  # content key -> JPEG: one copy in memory per image
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="reading images", unit="img", leave=False)
    for fname, cap in it:
        cap = cap.strip()
        if not cap:
            skipped["empty_caption"] += 1
            continue
        path = os.path.realpath(fname if os.path.isabs(fname) else os.path.join(images, fname))
        if path not in by_path:
            by_path[path] = _load(path, by_content)
        got = by_path[path]
        if isinstance(got, str):
            skipped[got] += 1
            continue
        keys.append(got[0])
        good.append((got[1], cap))
    if not good:
        raise ValueError(f"{csv_path}: no usable rows ({dict(skipped)})")
    groups = group_ids(keys)
    rng = np.random.default_rng(seed)
    val_idx, train_idx = split_by_group(groups, val_fraction, rng)
    tok = tokenizer_for(context_length)

    def write(split: str, idx: np.ndarray, split_noise: float):
        caps = [good[i][1] for i in idx]
        src, clean = grouped_noisy_permutation(groups[idx], split_noise, rng)
        tokens = tokenize(tok, [caps[j] for j in src], context_length)
        sizes = shard_sizes(len(idx), samples_per_shard, world_size, workers)
        w = ShardWriter(os.path.join(out, split), sizes[0], sizes=sizes)
        for pos, i in enumerate(idx):
            w.write(pos, good[i][0], caps[src[pos]], tokens[pos], bool(clean[pos]) if noise > 0 else None)
        return w.finish(context_length, skipped=dict(skipped))

    train = write("train", train_idx, noise)
    val = write("val", val_idx, 0.0) if val_idx.size else None
    return train, val, dict(skipped)


def _load(path: str, by_content: dict[bytes, bytes]) -> tuple[bytes, bytes] | str:
    """(content key, JPEG bytes) of an image file, or the reason it is skipped (missing_image, corrupt_image)."""
    if not os.path.isfile(path):
        return "missing_image"
    with open(path, "rb") as f:
        data = f.read()
    key = content_key(data)
    if key not in by_content:
        try:
            by_content[key] = to_jpeg(data)
        except Exception:  # noqa: BLE001 -- PIL raises many types on corrupt data
            return "corrupt_image"
    return key, by_content[key]
