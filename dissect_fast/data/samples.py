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
``not_in_subset`` (filtered by ``--subset``).
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

#: reason -> what it means (the README's bad-data table is this dict)
BAD_REASONS = {
    "not_a_tar": "a shard that is not a tar at all (empty, HTML error page, ...): counted once per shard",
    "truncated_tar": "a shard that ends early: the sample being read is lost, the rest of the shard is missing",
    "missing_field": "no image field, no caption (`txt` or `tok`), or no `id` in a shard the index gives no ids",
    "bad_id": "an `id` field that is not 8 bytes",
    "id_out_of_range": "an id < 0 or >= the dataset index's id range",
    "duplicate_id": "an id already seen this epoch by the same loader worker (the first good copy is kept)",
    "bad_tokens": "a `tok` field that is empty or not a whole number of int32",
    "bad_caption": "an empty or non-UTF-8 `txt` caption (shards without `tok`)",
    "tiny_image": f"an image smaller than {MIN_IMAGE_SIDE} px a side",
    "corrupt_image": "image bytes that do not decode",
}

#: what a broken shard raises while it is streamed
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default skip_meta


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


def iter_shard(fileobj, shard: str, stats: Counter, members: bool = False) -> Iterator[dict]:
    """The sample groups of one tar stream, in order: dicts of ``ext -> bytes`` plus ``__key__``,
    ``__url__`` (= ``shard``) and ``__position__``; with ``members`` also ``__members__`` (ext -> :class:`Member`).

    A stream that is not a tar counts ``not_a_tar``; one that breaks after its first member counts
    ``truncated_tar`` and drops the group being read. Both count one bad sample for the shard.
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
                fm = tf.extractfile(m)
                assert fm is not None  # a regular member
                data = fm.read()
                if len(data) < m.size:  # a stream read of a cut member returns short data without an error
                    raise tarfile.ReadError(f"{m.name}: {len(data)} of {m.size} bytes")
                if ext in current:
                    stats["duplicate_member"] += 1
                    continue
                current[ext] = data
                if members:
                    current["__members__"][ext] = Member(m.offset_data, m.size, os.path.basename(m.name))
    except TAR_ERRORS:
        count_bad(stats, "truncated_tar" if read_any else "not_a_tar", shard)
        return  # the group being read when the tar broke is incomplete: dropped (counted above)
    if current is not None:
        yield current


def iter_shard_file(path: str, stats: Counter, members: bool = False) -> Iterator[dict]:
    """:func:`iter_shard` over a local tar file."""
    with open(path, "rb") as f:
        yield from iter_shard(f, path, stats, members)


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
    """The stripped UTF-8 caption; BadSample("bad_caption") when empty or not UTF-8."""
    try:
        text = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("bad_caption") from None
    if not text:
        raise BadSample("bad_caption")
    return text


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


def decode_image(data: bytes, stats: Counter | None = None):
    """A PIL RGB image; BadSample("tiny_image" | "corrupt_image"); counts ``image_not_jpeg`` / ``image_converted``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if min(im.size) < MIN_IMAGE_SIDE:
                raise BadSample("tiny_image")
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


def check_image(data: bytes, level: str) -> None:
    """The index tool's image check; BadSample like :func:`decode_image`.

    ``none``: non-empty; ``header``: PIL reads the header (format, size: ``tiny_image``) and the JPEG/PNG end
    markers are there; ``decode``: a full decode (JPEGs at 1/8 scale, which still reads every entropy-coded byte).
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {level!r}")
    if not data:
        raise BadSample("corrupt_image")
    if level == "none":
        return
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if min(im.size) < MIN_IMAGE_SIDE:
                raise BadSample("tiny_image")
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
