"""Bounded cost per sample (issue 22, item 4): a huge caption, a huge image or a huge tar member costs about what a
normal sample costs, and is counted under the same reason by the index tool and the torch loader."""

import json
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from fixtures_ecosystem import encode, make_photo, photo_sizes, pixparse_shards
from tiny_run import tiny_fit

from dissect_fast.data import samples
from dissect_fast.data.index import index_shards, load_shard_meta, scan_shard
from dissect_fast.data.loader import ShardDataset, TorchLoader
from dissect_fast.data.shards import DatasetIndex, shard_stem, tokenizer_for

BIG_SIDE = 13_000  #: a 13,000 x 13,000 PNG: 169 Mpx, under PIL's own bomb limit (179 Mpx), ~160 KB on disk


def _transform():
    from open_clip import image_transform

    return image_transform(16, is_train=False)


def _photos(n, seed=0, prefix="s"):
    rng = np.random.default_rng(seed)
    sizes = photo_sizes(32)
    rows = []
    for i in range(n):
        im, caption = make_photo(rng, sizes[i % len(sizes)])
        rows.append({"__key__": f"{prefix}{i:06d}", "jpg": encode(im), "txt": caption})
    return rows


def _write(path, rows):
    with wds.TarWriter(str(path), mtime=1_700_000_000.0) as w:
        for row in rows:
            w.write(row)
    return str(path)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def big_png(tmp_path_factory) -> bytes:
    """A solid black 13,000 x 13,000 RGB PNG, compressed row by row (never 500 MB in memory)."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * BIG_SIDE)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(BIG_SIDE)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", BIG_SIDE, BIG_SIDE, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _loader(shards, index=None, workers=0, **kw):
    ds = ShardDataset(
        shards,
        8,
        _transform(),
        77,
        train=False,
        num_ids=index.num_ids if index is not None else None,
        first_ids=index.first_ids() if index is not None else None,
        need_ids=index is not None,
        **kw,
    )
    return TorchLoader(ds, workers, torch.device("cpu"), drop_last=False)


# ----------------------------------------------------------------------------- captions
def test_cut_caption_bounds_one_long_word_and_keeps_word_boundaries():
    limit = samples.caption_limit(77)
    assert samples.cut_caption("a photo of a dog", 77) == ("a photo of a dog", False)
    text, cut = samples.cut_caption("x" * 200_000, 77)
    assert cut and text == "x" * limit  # a single word longer than the limit is cut too
    words = "word " * 1000
    text, cut = samples.cut_caption(words, 77)
    assert cut and len(text) <= limit and text.split() == ["word"] * len(text.split())  # no half word
    text, cut = samples.cut_caption("a" + " " * 5000 + "b " * 1000, 77)  # whitespace cannot use up the budget
    assert cut and text.startswith("a b b") and len(text.split()) > 77


def test_long_caption_reaches_the_tokenizer_bounded_and_counted(tmp_path):
    """A 200,000-character one-word caption among good samples: the tokenizer only ever sees bounded text (it
    refuses anything longer, so the old unbounded path fails here at once instead of stalling for minutes)."""
    rows = _photos(9)
    rows[4]["txt"] = "y" * 200_000
    shard = _write(tmp_path / "long-0000.tar", rows)
    clip = tokenizer_for(77)
    longest = []

    def bounded_tokenizer(texts, context_length):
        longest.append(max(len(t) for t in texts))
        assert longest[-1] <= samples.caption_limit(context_length), "an unbounded caption reached BPE"
        return clip(texts, context_length=context_length)

    loader = _loader([shard], tokenizer=bounded_tokenizer)
    ids = [i for _, _, b in loader for i in b.tolist()]
    assert len(ids) == 9 and max(longest) == samples.caption_limit(77)
    assert loader.stats["caption_too_long"] == 1 and loader.stats["bad_samples"] == 0


def test_txt_member_is_read_up_to_a_cap(tmp_path):
    """A 2 MB caption member is read up to MAX_TXT_BYTES (the rest of it skipped in the stream); it still trains."""
    rows = _photos(3)
    rows[1]["txt"] = "ünïcode " * 250_000  # multi-byte characters: the cut may fall inside one
    shard = _write(tmp_path / "txt-0000.tar", rows)
    got = list(samples.iter_shard_file(shard, Counter()))
    assert len(got[1]["txt"]) == samples.MAX_TXT_BYTES and got[1]["__txt_cut__"]
    stats: Counter = Counter()
    text = samples.bounded_caption(got[1], 77, stats)
    assert text.startswith("ünïcode ünïcode") and len(text) <= samples.caption_limit(77)
    assert stats["caption_too_long"] == 1
    assert samples.bounded_caption(got[0], 77, stats) == rows[0]["txt"] and stats["caption_too_long"] == 1


# ----------------------------------------------------------------------------- images
def test_huge_png_is_rejected_from_its_header_with_little_memory(big_png, tmp_path):
    """Decoding the 13,000 x 13,000 PNG (507 MB of pixels) raises peak RSS by < 100 MB: the size is read first."""
    path = tmp_path / "big.png"
    path.write_bytes(big_png)
    code = f"""
import resource
from dissect_fast.data import samples
data = open({str(path)!r}, "rb").read()
samples.decode_image(open({str(path)!r}.replace("big", "small"), "rb").read())  # warm-up: PIL's plugins loaded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    samples.decode_image(data)
    reason = "decoded"
except samples.BadSample as e:
    reason = e.reason
print(reason, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    (tmp_path / "small.png").write_bytes(encode(make_photo(np.random.default_rng(0), (32, 24))[0], "PNG"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reason, added_mb = out.stdout.split()
    assert reason == "image_too_large" and float(added_mb) < 100, out.stdout


def test_pixel_limit_and_bombs_give_one_reason_on_every_path(big_png, tmp_path):
    """An oversized image as the LAST sample of a shard without ids: the index tool and the torch loader both say
    image_too_large (the loader used to say id_out_of_range: the index's id range ended before the bomb)."""
    rows = _photos(7)
    rows.append({"__key__": "s999999", "jpg": big_png, "txt": "a very large black square"})
    shard = _write(tmp_path / "bomb-0000.tar", rows)
    idx = index_shards([shard], str(tmp_path), verify="decode", workers=1, progress=False)
    assert idx.skipped.get("image_too_large") == 1 and "corrupt_image" not in idx.skipped
    meta = load_shard_meta(shard, [str(tmp_path)])  # what the DALI loader reads: the .idx leaves it out, counted
    assert meta is not None and meta.samples == 7 and meta.skipped.get("image_too_large") == 1
    loader = _loader([shard], DatasetIndex.load(str(tmp_path)))
    assert sum(b.shape[0] for _, _, b in loader) == 7
    assert loader.stats["image_too_large"] == 1 and loader.stats["bad_samples"] == 1, dict(loader.stats)
    # over PIL's own bomb limit (it raises in Image.open): the same reason, not corrupt_image
    huge = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", huge) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )
    for check in (lambda: samples.decode_image(bomb), lambda: samples.check_image(bomb, "header")):
        with pytest.raises(samples.BadSample) as e:
            check()
        assert e.value.reason == "image_too_large"


def test_member_over_the_byte_cap_is_skipped_unread(tmp_path):
    """A 12 MB member with --max-member-bytes 1 MiB: the sample is bad (member_too_large) in the stream reader, the
    index tool and the loader, and the member is never held in memory."""
    rows = _photos(4)
    rows[2]["jpg"] = np.random.default_rng(1).integers(0, 255, 12 << 20, dtype=np.uint8).tobytes()
    shard = _write(tmp_path / "big-0000.tar", rows)
    stats: Counter = Counter()
    tracemalloc.start()
    try:
        got = list(samples.iter_shard_file(shard, stats, max_member_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20 and len(got) == 4 and "jpg" not in got[2]
    with pytest.raises(samples.BadSample, match="member_too_large"):
        samples.check_fields(got[2], 0, None)
    scan = scan_shard(shard, "header", max_member_bytes=1 << 20)
    assert scan.count == 3 and scan.skipped.get("member_too_large") == 1
    loader = _loader([shard], max_member_bytes=1 << 20)
    assert sum(b.shape[0] for _, _, b in loader) == 3 and loader.stats["member_too_large"] == 1


def test_idx_lists_a_capped_caption_size(tmp_path):
    """DALI reads what the .idx lists: a huge caption member is listed with at most MAX_TXT_BYTES."""
    rows = _photos(2)
    rows[0]["txt"] = "words " * 100_000
    shard = _write(tmp_path / "cap-0000.tar", rows)
    index_shards([shard], str(tmp_path), verify="header", workers=1, progress=False)
    lines = (tmp_path / f"{shard_stem(shard)}.idx").read_text().splitlines()[1:]
    sizes = [dict(zip(ln.split()[0::4], map(int, ln.split()[2::4])))["txt"] for ln in lines]
    with tarfile.open(shard) as tf:
        real = sorted(m.size for m in tf.getmembers() if m.name.endswith(".txt"))
    assert real[-1] > samples.MAX_TXT_BYTES and max(sizes) == samples.MAX_TXT_BYTES and min(sizes) == real[0]


# ----------------------------------------------------------------------------- a training run
def test_training_counts_cut_captions_and_honours_max_image_pixels(tmp_path):
    """A tiny run: the cut caption is a count (the sample trains), images over --max-image-pixels are bad samples
    with their reason, both in the epoch's metrics."""
    data = tmp_path / "data" / "train"
    pixparse_shards(data, 240, 80, image_size=64, seed=2)
    # one caption of a single 5,000-character word, written over the second sample of the first shard (40x60 px)
    first = sorted(data.glob("*.tar"))[0]
    with tarfile.open(first) as tf:
        rows: dict = {}
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            rows.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    rows[sorted(rows)[1]]["txt"] = b"z" * 5000
    _write(first, list(rows.values()))
    # 64x48 photos have 3,072 px, the others <= 2,400: a quarter of the samples are too large
    shards = [str(p) for p in sorted(data.glob("*.tar"))]
    idx = index_shards(shards, str(data), verify="header", workers=1, progress=False, max_image_pixels=2500)
    assert idx.num_samples == 180 and idx.skipped["image_too_large"] == 60
    _, metrics = tiny_fit(
        tmp_path, "run", "--max-image-pixels", "2500", "--max-bad-fraction", "1", data=tmp_path / "data", epochs=1
    )
    m = metrics[-1]
    assert m["data/caption_too_long"] == 1 and m["data/image_too_large"] == 60, json.dumps(m)
