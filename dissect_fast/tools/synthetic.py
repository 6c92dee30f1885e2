"""A procedurally generated image-caption data set with known noisy correspondence.

Images show 1-3 shapes of one colour, size and position on a light or dark background; captions
describe them through varied templates. A fraction ``noise`` of the training pairs gets the caption
of another sample (a derangement among the noisy ones), so the ground truth of every pair is known.
The validation split is clean. Deterministic for a seed.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from dissect_fast.data.shards import DEFAULT_CONTEXT_LENGTH, tokenize, tokenizer_for
from dissect_fast.tools.writer import ShardWriter

SHAPES = ["circle", "square", "triangle", "cross", "diamond", "ring", "star", "bar"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "pink": (245, 120, 180),
}
SIZES = ["small", "large"]
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
COUNTS = ["one", "two", "three"]
BACKGROUNDS = {"dark": (25, 25, 35), "light": (225, 225, 215)}
TEMPLATES = [
    "{count} {size} {colour} {shapes} in the {pos}",
    "a picture of {count} {colour} {shapes} at the {pos} on a {bg} background",
    "{count} {colour} {shapes}, {size}, {pos}",
    "there {be} {count} {size} {colour} {shapes} in the {pos} of the image",
    "a {bg} image with {count} {colour} {shapes} in the {pos}",
    "{pos}: {count} {size} {colour} {shapes}",
]


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(1, int(r / 2.5)))
    elif shape == "star":
        pts = []
        for j in range(10):
            a = -math.pi / 2 + j * math.pi / 5
            rr = r if j % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=colour)
    elif shape == "bar":
        d.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=colour)


def render(attrs: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one sample at 4x resolution and downsample (anti-aliased), with jitter and pixel noise."""
    s = size * 4
    bg = np.array(BACKGROUNDS[attrs["bg"]]) + rng.integers(-15, 16, 3)
    img = Image.new("RGB", (s, s), tuple(int(c) for c in np.clip(bg, 0, 255)))
    d = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[attrs["colour"]]) + rng.integers(-20, 21, 3), 0, 255))
    n = COUNTS.index(attrs["count"]) + 1
    r = s * (0.07 if attrs["size"] == "small" else 0.13) * (1 if n == 1 else 0.75)
    px, py = POSITIONS[attrs["pos"]]
    layouts: dict[int, list[tuple[float, float]]] = {
        1: [(0, 0)],
        2: [(-1, 0), (1, 0)],
        3: [(-1, 0.6), (1, 0.6), (0, -0.9)],
    }
    for ox, oy in layouts[n]:
        jx, jy = rng.normal(0, 0.02, 2) * s
        _draw_shape(d, attrs["shape"], px * s + ox * 1.15 * r + jx, py * s + oy * 1.15 * r + jy, r, colour)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def caption(attrs: dict, rng: np.random.Generator) -> str:
    t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    plural = attrs["count"] != "one"
    shapes = attrs["shape"] + ("es" if attrs["shape"] == "cross" and plural else "s" if plural else "")
    return t.format(
        count=attrs["count"],
        size=attrs["size"],
        colour=attrs["colour"],
        shapes=shapes,
        pos=attrs["pos"],
        bg=attrs["bg"],
        be="are" if plural else "is",
    )


def sample_attrs(rng: np.random.Generator) -> dict:
    return {
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
        "size": SIZES[int(rng.integers(len(SIZES)))],
        "pos": list(POSITIONS)[int(rng.integers(len(POSITIONS)))],
        "count": COUNTS[int(rng.integers(len(COUNTS)))],
        "bg": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
    }


def noisy_permutation(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """caption_source[i] = the sample whose caption pair i gets; clean[i] = caption_source[i] == i.

    The noisy subset is a random cyclic shift of itself, so no noisy pair keeps its own caption.
    """
    src = np.arange(n)
    n_noisy = int(round(noise * n))
    if n_noisy >= 2:
        noisy = rng.choice(n, n_noisy, replace=False)
        src[noisy] = np.roll(noisy, int(rng.integers(1, n_noisy)))
    return src, src == np.arange(n)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_split(
    out_dir: str,
    n: int,
    first_id: int,
    noise: float,
    image_size: int,
    seed: int,
    samples_per_shard: int,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    progress: bool = True,
):
    rng = np.random.default_rng(seed)
    attrs = [sample_attrs(rng) for _ in range(n)]
    caps = [caption(a, rng) for a in attrs]
    src, clean = noisy_permutation(n, noise, rng)
    tok = tokenizer_for(context_length)
    tokens = tokenize(tok, [caps[j] for j in src], context_length)
    w = ShardWriter(out_dir, samples_per_shard)
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"synth {out_dir}", unit="img", leave=False)
    for i in it:
        jpg = encode_jpeg(render(attrs[i], image_size, rng))
        w.write(first_id + i, jpg, caps[src[i]], tokens[i], bool(clean[i]))
    return w.finish(context_length)


def make_synthetic(
    out: str,
    num_train: int,
    num_val: int,
    noise: float = 0.4,
    image_size: int = 32,
    seed: int = 0,
    samples_per_shard: int = 1000,
    progress: bool = True,
):
    """Write ``out/train`` and ``out/val`` shard directories; returns their indexes."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"--noise must be in [0, 1), got {noise}")
    if num_train < 1 or num_val < 0:
        raise ValueError("--num-train must be >= 1 and --num-val >= 0")
    if image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {image_size}")
    import os

    train = write_split(
        os.path.join(out, "train"), num_train, 0, noise, image_size, seed, samples_per_shard, progress=progress
    )
    val = None
    if num_val:
        val = write_split(
            os.path.join(out, "val"),
            num_val,
            0,
            0.0,
            image_size,
            seed + 1_000_003,
            samples_per_shard,
            progress=progress,
        )
    return train, val
