"""Data made the way the ecosystem makes it, for the end-to-end tests in ``test_real_inputs.py``.

Everything here is written with webdataset's own ``webdataset.TarWriter`` (never with
``dissect_fast.data.shards.ShardWriter``), so the shards carry only what public releases carry:

* :func:`pixparse_shards`: like Hugging Face ``pixparse/cc3m-wds`` (``cc3m-train-0000.tar``, ...;
  per sample ``jpg`` + ``txt``; keys ``000000123`` unique across shards);
* :func:`img2dataset_shards`: like img2dataset's webdataset output (``00000.tar``, ...; per sample
  ``jpg`` + ``txt`` + ``json``; keys ``shard * 10**4 + index`` padded to 9 digits; beside each tar a
  ``00000_stats.json`` and, when pyarrow is installed, a ``00000.parquet``);
* :func:`openclip_csv`: an open_clip CSV (tab separated, columns ``filepath`` and ``title``) over a
  folder of image files.

Awkward members (:class:`Awkward`) are planted on request: a PNG stored under the ``jpg`` key, a
CMYK JPEG, a 1x1 JPEG (dead-link placeholder), a sample without ``txt``, random bytes as ``jpg``,
and a truncated tar (written whole, then cut inside a member near 60 % of its size). Every builder
returns a :class:`ShardSet` that says what a correct reader must keep, count as bad (by reason),
convert, and cannot know about (the samples after the cut of a truncated tar).

Images are small (<= 64 px a side) so the tests stay fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- images and captions
COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 210, 40),
    "purple": (130, 50, 160),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {
    "sky": ((120, 170, 230), (230, 240, 250)),
    "grass": ((40, 120, 40), (150, 200, 90)),
    "sand": ((200, 170, 110), (240, 220, 170)),
    "night": ((10, 10, 40), (60, 60, 110)),
    "stone": ((90, 90, 90), (170, 170, 170)),
}
SHAPES = ("circle", "square", "triangle", "stripe")
TEMPLATES = (
    "a {c} {s} on a {b} background",
    "photo of a {c} {s} against the {b}",
    "{c} {s}, {b} in the background",  # commas, as real captions have
    "close-up of a {c} {s} over {b}",
    "a small {c} {s} and a {b} backdrop",
)


def photo_sizes(image_size: int = 64) -> list[tuple[int, int]]:
    """(width, height) of the generated photos: landscape, portrait and square, none over ``image_size``."""
    s = int(image_size)
    if s < 16:
        raise ValueError(f"image_size must be >= 16 px, got {s}")
    return [(s, s * 3 // 4), (s * 5 // 8, s * 15 // 16), (s * 3 // 4, s * 3 // 4), (s, s * 9 // 16)]


def make_photo(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """An RGB picture (vertical gradient + a coloured shape + a little sensor noise) and a caption for it."""
    w, h = size
    bname = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[bname])
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    arr = top * (1 - t) + bottom * t + np.zeros((h, w, 3), np.float32)
    arr += rng.normal(0, 6, arr.shape).astype(np.float32)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    cname = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    d = ImageDraw.Draw(im)
    cx, cy = int(rng.integers(w // 4, 3 * w // 4 + 1)), int(rng.integers(h // 4, 3 * h // 4 + 1))
    r = int(rng.integers(max(3, min(w, h) // 6), max(4, min(w, h) // 3) + 1))
    col = COLOURS[cname]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    else:
        d.rectangle([0, cy - r // 2, w - 1, cy + r // 2], fill=col)
    caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(c=cname, s=shape, b=bname)
    return im, caption


def encode(im: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format=fmt)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    """An RGB PNG (what img2dataset/pixparse sometimes store under the ``jpg`` key)."""
    return encode(im.convert("RGB"), "PNG")


def cmyk_jpeg_bytes(im: Image.Image) -> bytes:
    """A CMYK JPEG (Adobe-style print images are common in web crawls)."""
    return encode(im.convert("CMYK"), "JPEG", 90)


def tiny_jpeg_bytes() -> bytes:
    """A 1x1 JPEG: the placeholder some hosts serve for a dead link."""
    return encode(Image.new("RGB", (1, 1), (255, 255, 255)), "JPEG", 90)


def corrupt_bytes(rng: np.random.Generator, n: int = 600) -> bytes:
    """Random bytes that PIL cannot identify as any image."""
    b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return b"\x00\x11" + b[2:]  # never a JPEG/PNG/GIF/... signature


# ----------------------------------------------------------------------------- what was written
@dataclass
class Awkward:
    """How many samples of each awkward kind to plant (spread over the shards, one sample each).

    ``truncated``: also write one more shard of ``per_shard`` clean samples and cut it inside a
    member near 60 % of its size."""

    png_as_jpg: int = 0  #: PNG data under the ``jpg`` key: good, decoded by content (``image_not_jpeg``)
    cmyk: int = 0  #: CMYK JPEG: good, converted to RGB (``image_converted``)
    tiny: int = 0  #: 1x1 JPEG: bad, ``tiny_image``
    no_txt: int = 0  #: no caption member: bad, ``missing_field``
    corrupt: int = 0  #: random bytes as ``jpg``: bad, ``corrupt_image``
    truncated: bool = False  #: one extra shard cut mid-member: 1 sample counted ``truncated_tar``

    @classmethod
    def every_kind(cls, n: int = 1) -> Awkward:
        return cls(png_as_jpg=n, cmyk=n, tiny=n, no_txt=n, corrupt=n, truncated=True)

    def plan(self) -> list[str]:
        """The per-sample kinds, in planting order."""
        return (
            ["png_as_jpg"] * self.png_as_jpg
            + ["cmyk"] * self.cmyk
            + ["tiny"] * self.tiny
            + ["no_txt"] * self.no_txt
            + ["corrupt"] * self.corrupt
        )


BAD_REASON = {"tiny": "tiny_image", "no_txt": "missing_field", "corrupt": "corrupt_image"}
CONVERT_REASON = {"png_as_jpg": "image_not_jpeg", "cmyk": "image_converted"}


@dataclass
class ShardSet:
    """Shards written by a builder, and what a correct reader of them must report."""

    root: Path
    shards: list[Path]  #: every tar, in name order (the truncated one included)
    pattern: str  #: brace pattern over ``shards``: ``root/cc3m-train-{0000..0002}.tar``
    written: int  #: sample groups written (before any truncation)
    good: int  #: samples a correct reader keeps
    bad: Counter  #: reason -> planted bad samples a correct reader counts (``truncated_tar`` included)
    converted: Counter  #: reason -> planted good samples that need a conversion (PNG, CMYK)
    lost_uncounted: int = 0  #: samples after the cut of a truncated tar: nobody can know they existed
    keys: list[str] = field(default_factory=list)  #: keys of the good samples, in tar order
    kinds: dict = field(default_factory=dict)  #: key -> awkward kind, for planted samples
    truncated_shard: Path | None = None
    kept_in_truncated: int = 0  #: samples of the truncated shard before the cut sample

    @property
    def bad_total(self) -> int:
        return int(sum(self.bad.values()))


def _positions(n_total: int, k: int, rng: np.random.Generator) -> list[int]:
    """k distinct sample positions spread over [0, n_total), none at the very first sample."""
    if k > n_total - 1:
        raise ValueError(f"cannot plant {k} awkward samples among {n_total}")
    return sorted(int(p) for p in rng.choice(np.arange(1, n_total), size=k, replace=False))


def _awkward_sample(kind: str, im: Image.Image, caption: str, rng: np.random.Generator) -> dict:
    """Members of a planted sample: {'jpg': bytes, 'txt': str} with the awkward change."""
    if kind == "png_as_jpg":
        return {"jpg": png_bytes(im), "txt": caption}
    if kind == "cmyk":
        return {"jpg": cmyk_jpeg_bytes(im), "txt": caption}
    if kind == "tiny":
        return {"jpg": tiny_jpeg_bytes(), "txt": caption}
    if kind == "no_txt":
        return {"jpg": encode(im)}
    if kind == "corrupt":
        return {"jpg": corrupt_bytes(rng), "txt": caption}
    raise ValueError(f"unknown awkward kind {kind!r}")


def truncate_in_member(path: str | os.PathLike, fraction: float = 0.6) -> tuple[int, str]:
    """Cut a tar written whole inside the last member of the sample that spans ``fraction`` of its size.

    Cutting inside a sample's *last* member makes the outcome the same for every reader: the
    samples before it are complete, the cut one is lost (a reader counts it ``truncated_tar``), the
    rest are gone. Returns (complete samples before the cut, key of the cut sample)."""
    path = Path(path)
    size = path.stat().st_size
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
    keys: list[str] = []
    last: dict[str, tarfile.TarInfo] = {}
    for m in members:
        key = os.path.basename(m.name).split(".", 1)[0]
        if key not in last:
            keys.append(key)
        last[key] = m
    target = fraction * size
    cut_key = next((k for k in keys if last[k].offset_data + last[k].size >= target), keys[-1])
    m = last[cut_key]
    cut = m.offset_data + max(1, m.size // 2)
    if cut >= m.offset_data + m.size:  # a 1-byte member: cut its header instead
        cut = m.offset + 256
    with open(path, "r+b") as f:
        f.truncate(cut)
    return keys.index(cut_key), cut_key


def _shard_set(root: Path, shards: list[Path], pattern: str) -> ShardSet:
    return ShardSet(root=root, shards=shards, pattern=pattern, written=0, good=0, bad=Counter(), converted=Counter())


def _write_shards(
    root: Path,
    names: list[str],
    per_shard: int,
    key_of,
    image_size: int,
    seed: int,
    awkward: Awkward | None,
    extra_members,
    after_shard=None,
) -> ShardSet:
    """Shared writer loop; ``key_of(shard, index, global_index)`` names samples, ``extra_members(key, im,
    caption, status)`` adds format-specific members (img2dataset's json), ``after_shard(i, name, rows)``
    writes side files."""
    import webdataset as wds

    awkward = awkward or Awkward()
    rng = np.random.default_rng(seed)
    sizes = photo_sizes(image_size)
    n_regular = len(names) - (1 if awkward.truncated else 0)
    total_regular = n_regular * per_shard
    kinds_at = dict(zip(_positions(total_regular, len(awkward.plan()), rng), awkward.plan()))
    shards = [root / n for n in names]
    out = _shard_set(root, shards, "")
    g = 0
    for si, shard in enumerate(shards):
        rows = []
        with wds.TarWriter(str(shard), mtime=1_700_000_000.0) as w:
            for i in range(per_shard):
                key = key_of(si, i, g)
                im, caption = make_photo(rng, sizes[g % len(sizes)])
                kind = kinds_at.get(g) if si < n_regular else None
                sample = _awkward_sample(kind, im, caption, rng) if kind else {"jpg": encode(im), "txt": caption}
                sample.update(extra_members(key, im, caption, sample))
                w.write({"__key__": key, **sample})
                rows.append((key, im, caption, sample))
                out.written += 1
                if kind:
                    out.kinds[key] = kind
                    if kind in BAD_REASON:
                        out.bad[BAD_REASON[kind]] += 1
                    else:
                        out.converted[CONVERT_REASON[kind]] += 1
                if kind not in BAD_REASON and si < n_regular:
                    out.keys.append(key)
                g += 1
        if after_shard is not None:
            after_shard(si, shard, rows)
        if awkward.truncated and si == len(shards) - 1:
            kept, _ = truncate_in_member(shard)
            out.truncated_shard = shard
            out.kept_in_truncated = kept
            out.keys += [r[0] for r in rows[:kept]]
            out.bad["truncated_tar"] += 1
            out.lost_uncounted = per_shard - kept - 1
    out.good = len(out.keys)
    return out


# ----------------------------------------------------------------------------- pixparse/cc3m-wds
def pixparse_shards(
    directory: str | os.PathLike,
    n: int,
    per_shard: int,
    image_size: int = 64,
    seed: int = 0,
    awkward: Awkward | None = None,
) -> ShardSet:
    """``n`` samples as Hugging Face ``pixparse/cc3m-wds`` shards: ``cc3m-train-0000.tar``, ...; members
    ``KEY.jpg`` and ``KEY.txt`` only (no id, no tokens); keys ``000000000`` .. unique across shards.

    ``n`` must be a multiple of ``per_shard``. With ``awkward.truncated`` one more shard of ``per_shard``
    samples is written and cut (it is not part of ``n``)."""
    if n <= 0 or per_shard <= 0 or n % per_shard:
        raise ValueError(f"n ({n}) must be a positive multiple of per_shard ({per_shard})")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    awkward = awkward or Awkward()
    n_shards = n // per_shard + (1 if awkward.truncated else 0)
    names = [f"cc3m-train-{i:04d}.tar" for i in range(n_shards)]
    out = _write_shards(
        root,
        names,
        per_shard,
        lambda si, i, g: f"{g:09d}",
        image_size,
        seed,
        awkward,
        lambda key, im, caption, sample: {},
    )
    out.pattern = str(root / f"cc3m-train-{{0000..{n_shards - 1:04d}}}.tar")
    return out


# ----------------------------------------------------------------------------- img2dataset
def _img2dataset_json(key: str, im: Image.Image, caption: str, sample: dict, url_host: str) -> dict:
    """The per-sample json img2dataset writes (``url``, ``caption``, ``key``, ``status``, sizes, ``sha256``...)."""
    data = sample["jpg"]
    return {
        "url": f"https://{url_host}/images/{key}.jpg",
        "caption": caption if "txt" in sample else None,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": im.width,
        "height": im.height,
        "original_width": im.width * 4,
        "original_height": im.height * 4,
        "exif": "{}",
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def img2dataset_shards(
    directory: str | os.PathLike,
    n_shards: int,
    per_shard: int,
    image_size: int = 64,
    seed: int = 0,
    awkward: Awkward | None = None,
    parquet: bool = True,
) -> ShardSet:
    """img2dataset's ``--output_format webdataset`` layout: ``00000.tar``, ... with ``jpg``, ``txt`` and
    ``json`` per sample, keys ``shard * 10**4 + index`` zero padded to 9 digits, and beside each tar
    ``00000_stats.json`` and (pandas + pyarrow installed, ``parquet``) ``00000.parquet``.

    ``n_shards`` regular shards; with ``awkward.truncated`` one more, cut (``0000{n_shards}.tar``)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    awkward = awkward or Awkward()
    total = n_shards + (1 if awkward.truncated else 0)
    names = [f"{i:05d}.tar" for i in range(total)]
    want_parquet = (
        parquet and importlib.util.find_spec("pyarrow") is not None and importlib.util.find_spec("pandas") is not None
    )

    def extra(key, im, caption, sample):
        return {"json": _img2dataset_json(key, im, caption, sample, "img.example.org")}

    def side_files(si: int, shard: Path, rows: list) -> None:
        stem = shard.with_suffix("")
        stats = {
            "count": len(rows),
            "successes": len(rows),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": 1.25,
            "bytes_downloaded": sum(len(r[3]["jpg"]) for r in rows),
            "start_time": 1_700_000_000.0,
            "end_time": 1_700_000_001.25,
            "status_dict": {"success": len(rows)},
        }
        (Path(f"{stem}_stats.json")).write_text(json.dumps(stats, indent=4))
        if want_parquet:
            import pandas as pd

            meta = [r[3]["json"] for r in rows]
            pd.DataFrame(meta).to_parquet(f"{stem}.parquet", index=False)

    out = _write_shards(
        root, names, per_shard, lambda si, i, g: f"{si * 10**4 + i:09d}", image_size, seed, awkward, extra, side_files
    )
    out.pattern = str(root / f"{{00000..{total - 1:05d}}}.tar")
    return out


# ----------------------------------------------------------------------------- open_clip CSV
@dataclass
class CsvSet:
    csv: Path
    images: Path
    rows: int  #: rows in the CSV
    good: int  #: rows with an existing image and a caption
    missing_images: int


def openclip_csv(
    directory: str | os.PathLike, n: int, image_size: int = 64, seed: int = 0, missing_images: int = 0
) -> CsvSet:
    """``directory/train.csv`` as open_clip reads it (``--csv-img-key filepath --csv-caption-key title
    --csv-separator "\\t"``) over ``directory/images/NN/NNNNNN.jpg`` (paths relative to ``images``);
    the last ``missing_images`` rows name files that do not exist (a broken download)."""
    root = Path(directory)
    images = root / "images"
    rng = np.random.default_rng(seed)
    sizes = photo_sizes(image_size)
    lines = ["filepath\ttitle"]
    for i in range(n + missing_images):
        rel = f"{i // 100:02d}/{i:06d}.jpg"
        im, caption = make_photo(rng, sizes[i % len(sizes)])
        if i < n:
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            (images / rel).write_bytes(encode(im))
        lines.append(f"{rel}\t{caption}")
    csv = root / "train.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return CsvSet(csv=csv, images=images, rows=n + missing_images, good=n, missing_images=missing_images)
