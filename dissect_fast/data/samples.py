"""What a sample is: the one set of rules every reader of shards follows.

The torch loader, the index tool (and through its ``.idx`` files the DALI loader), ``eval``, ``embed``
and the offline tools all read tars through :func:`iter_shard` and judge samples with the functions
below, so a sample is good, bad (with the same reason) and has the same id on every path.

**Grouping** (webdataset's rules, :func:`webdataset.tariterators.base_plus_ext`): regular members only;
names webdataset treats as metadata (``__*__``) and names without an extension are skipped; the key is
the member path up to the first dot of its file name, the extension (lower-cased) names the field;
consecutive members with the same key form one sample. A field that repeats inside a sample is ignored
after its first copy (``duplicate_member``, counted, not bad). A sample's **position** is its ordinal
among all sample groups of its tar, good or bad.

**Ids.** A stored ``id`` field (8 bytes, little-endian int64) is the sample's id. Shards made elsewhere
(pixparse ``cc3m-wds``, img2dataset) have none: ``dissect-fast index`` gives each such shard a
``first_id`` (recorded in ``index.json``) and its samples get ``first_id + position``, on every path.

**Bad samples**, checked in this order; the first failure is the reason (:data:`BAD_REASONS`).
Counted, not bad: ``image_converted`` (grayscale, CMYK, palette or alpha converted to RGB),
``image_not_jpeg`` (PNG/WebP/... data under an image key, decoded by content), ``duplicate_member``,
``not_in_subset`` (filtered by ``--subset``), ``caption_too_long`` (see below).

**Bounded cost per sample.** No sample may cost much more than a normal one to read, tokenise or decode:

* a member larger than ``max_member_bytes`` (``--max-member-bytes``, default 64 MiB) is never read into memory
  (the tar stream skips over it) and makes its sample bad: ``member_too_large``;
* a ``txt`` member is read up to :data:`MAX_TXT_BYTES` only, and a caption longer than
  :data:`CAPTION_CHARS_PER_TOKEN` x context length characters (616 for 77 tokens) is cut before tokenising, at
  the last whitespace inside the limit (a single word longer than the limit is cut too). Such a sample still
  trains, with the cut caption, and is counted ``caption_too_long``: only the first context-length tokens are
  used anyway, and 616 characters of text hold far more than 77 tokens, so for real captions the tokens do
  not change; what is bounded is CLIP BPE's cost, roughly quadratic in the length of one word (a
  200,000-character word took minutes; a 616-character one takes ~40 ms);
* an image with more than ``max_image_pixels`` pixels (``--max-image-pixels``, default 40 Mpx, well below
  PIL's own 179 Mpx bomb limit) is bad, ``image_too_large``, judged from its header before any pixel is
  decoded, on every path (index tool, torch loader, DALI through the index tool's ``.idx``).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  #: image fields, in order of preference
MIN_IMAGE_SIDE = 8  #: smaller images are placeholders or tracking pixels (1x1 of dead links), not training data
EOT_TOKEN = 49407  #: open_clip's CLIP tokenizer end-of-text id
VERIFY_LEVELS = ("none", "header", "decode")  #: how closely the index tool checks images
MAX_IMAGE_PIXELS = 40_000_000  #: default --max-image-pixels: larger images are bad (``image_too_large``)
MAX_MEMBER_BYTES = 64 << 20  #: default --max-member-bytes: larger tar members are bad (``member_too_large``)
MAX_TXT_BYTES = 64 << 10  #: a ``txt`` member is read up to this many bytes (the rest is skipped unread)
CAPTION_CHARS_PER_TOKEN = 8  #: captions are cut to this many characters per token of context before tokenising

#: reason -> what it means (the README's bad-data table is this dict)
BAD_REASONS = {
    "not_a_tar": "a shard that is not a tar at all (empty, HTML error page, ...): counted once per shard",
    "truncated_tar": "a shard that ends early: the sample being read is lost, the rest of the shard is missing",
    "member_too_large": "a tar member over --max-member-bytes (default 64 MiB): skipped in the stream, never read",
    "missing_field": "no image field, no caption (`txt` or `tok`), or no `id` in a shard the index gives no ids",
    "bad_id": "an `id` field that is not 8 bytes",
    "id_out_of_range": "an id < 0 or >= the dataset index's id range",
    "duplicate_id": "an id already seen this epoch by the same loader worker (the first good copy is kept)",
    "bad_tokens": "a `tok` field that is empty or not a whole number of int32",
    "bad_caption": "an empty or non-UTF-8 `txt` caption (shards without `tok`)",
    "tiny_image": f"an image smaller than {MIN_IMAGE_SIDE} px a side",
    "image_too_large": "an image over --max-image-pixels (default 40 Mpx; decompression bombs), seen in its header",
    "corrupt_image": "image bytes that do not decode",
}

#: what a broken shard raises while it is streamed
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default skip_meta
_WORD = re.compile(r"\S+")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a key of :data:`BAD_REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MissingIdsError(ValueError):
    """Samples without an ``id`` field in a shard the dataset index gives no ids (the command to run is in the message)."""


def missing_ids_message(shard: str) -> str:
    return (
        f"{shard}: its samples have no `id` field and no dataset index gives them ids (shards from pixparse, "
        f"img2dataset, ...): run `dissect-fast index SHARDS --out DIR` once, then pass the shards as before "
        f"(index.json is found beside local shards; for pipe:/http URLs add --data-index DIR)"
    )


@dataclass(frozen=True)
class Member:
    """Where a field's bytes lie in its tar (what DALI's ``.idx`` files list)."""

    offset: int
    size: int
    name: str


def split_name(name: str) -> tuple[str, str] | None:
    """(key, ext) of a tar member name by webdataset's rules, or None for a name webdataset skips."""
    if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
        return None
    if _META.match(name):
        return None
    key, ext = base_plus_ext(name)
    if key is None:
        return None
    return key, ext.lower()


def count_bad(stats: Counter, reason: str, shard: str, n: int = 1) -> None:
    """Count ``n`` bad samples of ``shard`` for ``reason`` (also the totals the trainer reports)."""
    stats[reason] += n
    stats["bad_samples"] += n
    stats[f"shard:{os.path.basename(shard)}"] += n


def iter_shard(
    fileobj, shard: str, stats: Counter, members: bool = False, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[dict]:
    """The sample groups of one tar stream, in order: dicts of ``ext -> bytes`` plus ``__key__``,
    ``__url__`` (= ``shard``) and ``__position__``; with ``members`` also ``__members__`` (ext -> :class:`Member`).

    A stream that is not a tar counts ``not_a_tar``; one that breaks after its first member counts
    ``truncated_tar`` and drops the group being read. Both count one bad sample for the shard.
    A member over ``max_member_bytes`` is not read (the stream skips it in fixed-size blocks) and its group gets
    ``__too_large__`` (:func:`check_fields` makes it ``member_too_large``); a ``txt`` member over
    :data:`MAX_TXT_BYTES` is read up to that size only and its group gets ``__txt_cut__``.
    """
    current: dict | None = None
    position = 0
    read_any = False
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for m in tf:
                read_any = True
                if not m.isreg():
                    continue
                kx = split_name(m.name)
                if kx is None:
                    continue
                key, ext = kx
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                    position += 1
                if current is None:
                    current = {"__key__": key, "__url__": shard, "__position__": position}
                    if members:
                        current["__members__"] = {}
                if ext in current:
                    stats["duplicate_member"] += 1
                    continue
                if m.size > max_member_bytes:
                    current["__too_large__"] = True  # not read: tarfile skips the data when it moves on
                    continue
                want = min(m.size, MAX_TXT_BYTES) if ext == "txt" else m.size
                fm = tf.extractfile(m)
                assert fm is not None  # a regular member
                data = fm.read(want)
                if len(data) < want:  # a stream read of a cut member returns short data without an error
                    raise tarfile.ReadError(f"{m.name}: {len(data)} of {m.size} bytes")
                if want < m.size:
                    current["__txt_cut__"] = True
                current[ext] = data
                if members:
                    current["__members__"][ext] = Member(m.offset_data, m.size, os.path.basename(m.name))
    except TAR_ERRORS:
        count_bad(stats, "truncated_tar" if read_any else "not_a_tar", shard)
        return  # the group being read when the tar broke is incomplete: dropped (counted above)
    if current is not None:
        yield current


def iter_shard_file(
    path: str, stats: Counter, members: bool = False, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[dict]:
    """:func:`iter_shard` over a local tar file."""
    with open(path, "rb") as f:
        yield from iter_shard(f, path, stats, members, max_member_bytes)


def image_field(sample: dict) -> str | None:
    return next((e for e in IMAGE_EXTS if e in sample), None)


def sample_id(sample: dict, first_id: int | None) -> int | None:
    """The stored id, or ``first_id + position`` in a shard the index gives ids; None when neither exists.
    Raises BadSample("bad_id") for an id field that is not 8 bytes."""
    raw = sample.get("id")
    if raw is None:
        return None if first_id is None else first_id + sample["__position__"]
    if len(raw) != 8:
        raise BadSample("bad_id")
    return int.from_bytes(raw, "little", signed=True)


def check_fields(sample: dict, first_id: int | None, num_ids: int | None, need_id: bool = True) -> int | None:
    """The sample's id after the field checks that need no decoding (missing fields, id, tokens, caption).

    Raises BadSample with the reason; ``need_id=False`` (evaluation) lets samples without an id through
    with id None. ``num_ids`` None checks only id >= 0.
    """
    if sample.get("__too_large__"):
        raise BadSample("member_too_large")
    if image_field(sample) is None or ("tok" not in sample and "txt" not in sample):
        raise BadSample("missing_field")
    sid = sample_id(sample, first_id)
    if sid is None and need_id:
        raise BadSample("missing_field")
    if sid is not None and (sid < 0 or (num_ids is not None and sid >= num_ids)):
        raise BadSample("id_out_of_range")
    if "tok" in sample:
        if len(sample["tok"]) == 0 or len(sample["tok"]) % 4:
            raise BadSample("bad_tokens")
    else:
        caption_text(sample)
    return sid


def caption_text(sample: dict) -> str:
    """The stripped UTF-8 caption; BadSample("bad_caption") when empty or not UTF-8. A ``txt`` member read only
    up to :data:`MAX_TXT_BYTES` (``__txt_cut__``) may end inside a character: that partial character is dropped."""
    data = sample["txt"]
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        if not (sample.get("__txt_cut__") and e.start >= len(data) - 3 and e.reason == "unexpected end of data"):
            raise BadSample("bad_caption") from None
        text = data[: e.start].decode("utf-8").strip()
    if not text:
        raise BadSample("bad_caption")
    return text


def caption_limit(context_length: int) -> int:
    """The most characters of a caption that are tokenised for a model of ``context_length`` tokens."""
    return CAPTION_CHARS_PER_TOKEN * int(context_length)


def cut_caption(text: str, context_length: int) -> tuple[str, bool]:
    """``(text, False)`` when it is within :func:`caption_limit`; else ``(cut, True)``: whitespace runs collapsed
    (as CLIP BPE's own clean-up does, so that spaces cannot use up the budget), then cut at the last whitespace
    inside the limit, or at the limit when the text has no whitespace there (one long word). Linear time: the
    tokeniser then sees a bounded string (CLIP BPE is roughly quadratic in the length of one word)."""
    limit = caption_limit(context_length)
    if len(text) <= limit:
        return text, False
    words: list[str] = []
    n = -1  # length of " ".join(words)
    for m in _WORD.finditer(text):
        w = m.group()
        if n + 1 + len(w) > limit:
            if not words:
                words.append(w[:limit])
            break
        words.append(w)
        n += 1 + len(w)
    return " ".join(words), True


def bounded_caption(sample: dict, context_length: int, stats: Counter | None = None) -> str:
    """:func:`caption_text` cut by :func:`cut_caption`; a cut (or a ``txt`` member read only in part) is counted
    ``caption_too_long`` in ``stats`` (a count, not a bad sample: the sample trains with the cut caption)."""
    text, cut = cut_caption(caption_text(sample), context_length)
    if (cut or sample.get("__txt_cut__")) and stats is not None:
        stats["caption_too_long"] += 1
    return text


def cut_captions(captions: list[str], context_length: int) -> tuple[list[str], int]:
    """:func:`cut_caption` over a list: (the captions, how many were cut), for the writers and the DALI loader."""
    out, n = [], 0
    for c in captions:
        c, was_cut = cut_caption(c, context_length)
        out.append(c)
        n += was_cut
    return out, n


def fit_tokens(tok: np.ndarray, context_length: int) -> np.ndarray:
    """Stored token ids resized to the model's context length, as open_clip's tokenizer would have
    written them: pad with zeros, or truncate and end with the end-of-text token."""
    n = tok.shape[0]
    if n == context_length:
        return tok
    if n < context_length:
        return np.pad(tok, (0, context_length - n))
    out = tok[:context_length].copy()
    if out[-1] != 0:
        out[-1] = EOT_TOKEN
    return out


def _check_size(im, max_pixels: int) -> None:
    """``tiny_image`` / ``image_too_large`` from the size PIL read in the header (no pixel decoded yet)."""
    if min(im.size) < MIN_IMAGE_SIDE:
        raise BadSample("tiny_image")
    if im.size[0] * im.size[1] > max_pixels:
        raise BadSample("image_too_large")


def _open_image(data: bytes):
    """``PIL.Image.open`` with PIL's own bomb check (over ~179 Mpx) reported as ``image_too_large``, not corrupt."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides, below
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise BadSample("image_too_large") from None


def decode_image(data: bytes, stats: Counter | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """A PIL RGB image; BadSample("tiny_image" | "image_too_large" | "corrupt_image") (the size is checked from the
    header, before decoding); counts ``image_not_jpeg`` / ``image_converted``."""
    try:
        with _open_image(data) as im:
            _check_size(im, max_pixels)
            im.load()
            if stats is not None:
                if im.format != "JPEG":
                    stats["image_not_jpeg"] += 1
                if im.mode != "RGB":
                    stats["image_converted"] += 1
            return im.convert("RGB")
    except BadSample:
        raise
    except Exception:  # noqa: BLE001 -- PIL raises many types on corrupt data
        raise BadSample("corrupt_image") from None


def check_image(data: bytes, level: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """The index tool's image check; BadSample like :func:`decode_image`.

    ``none``: non-empty; ``header``: PIL reads the header (format, size: ``tiny_image``, ``image_too_large``) and
    the JPEG/PNG end markers are there; ``decode``: also a full decode (JPEGs at 1/8 scale, which still reads
    every entropy-coded byte).
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {level!r}")
    if not data:
        raise BadSample("corrupt_image")
    if level == "none":
        return
    try:
        with _open_image(data) as im:
            _check_size(im, max_pixels)
            if level == "header":
                if im.format == "JPEG" and b"\xff\xd9" not in data[-64:]:
                    raise BadSample("corrupt_image")
                if im.format == "PNG" and b"IEND" not in data[-16:]:
                    raise BadSample("corrupt_image")
                return
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except BadSample:
        raise
    except Exception:  # noqa: BLE001
        raise BadSample("corrupt_image") from None


def peek_has_ids(url: str) -> bool | None:
    """Whether the first sample of a shard (path or webdataset URL, ``pipe:`` included) has an ``id`` field;
    None when the shard yields no sample."""
    from webdataset.gopen import gopen

    stream = gopen(url)
    try:
        for s in iter_shard(stream, url, Counter()):
            return "id" in s
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 -- a pipe closed early reports the broken pipe: irrelevant here
            pass
    return None
