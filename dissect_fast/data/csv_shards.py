"""Shards from a folder of images and a CSV of captions (the CC3M / CyCLIP layout).

Rows whose image is missing or unreadable, or whose caption is empty, are skipped and counted;
the counts are printed and stored in the dataset index. ``--noise`` swaps captions between a
random fraction of the pairs (for experiments), recorded in the clean flags.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter

import numpy as np
from PIL import Image

from dissect_fast.data.shards import DEFAULT_CONTEXT_LENGTH, tokenize, tokenizer_for
from dissect_fast.data.synthetic import noisy_permutation
from dissect_fast.data.writer import ShardWriter

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
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            return data
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()


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
    samples_per_shard: int = 1000,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    progress: bool = True,
):
    """Write ``out/train`` (and ``out/val`` when val_fraction > 0); returns (train index, val index, skips)."""
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
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="reading images", unit="img", leave=False)
    for fname, cap in it:
        cap = cap.strip()
        if not cap:
            skipped["empty_caption"] += 1
            continue
        path = fname if os.path.isabs(fname) else os.path.join(images, fname)
        if not os.path.isfile(path):
            skipped["missing_image"] += 1
            continue
        try:
            good.append((load_jpeg(path), cap))
        except Exception:  # PIL raises many types on corrupt data
            skipped["corrupt_image"] += 1
    if not good:
        raise ValueError(f"{csv_path}: no usable rows ({dict(skipped)})")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(good))
    n_val = int(round(val_fraction * len(good)))
    val_idx, train_idx = order[:n_val], np.sort(order[n_val:])
    tok = tokenizer_for(context_length)

    def write(split: str, idx: np.ndarray, split_noise: float):
        caps = [good[i][1] for i in idx]
        src, clean = noisy_permutation(len(idx), split_noise, rng)
        tokens = tokenize(tok, [caps[j] for j in src], context_length)
        w = ShardWriter(os.path.join(out, split), samples_per_shard)
        for pos, i in enumerate(idx):
            w.write(pos, good[i][0], caps[src[pos]], tokens[pos], bool(clean[pos]) if noise > 0 else None)
        return w.finish(context_length, skipped=dict(skipped))

    train = write("train", train_idx, noise)
    val = write("val", np.sort(val_idx), 0.0) if n_val else None
    return train, val, dict(skipped)
