"""The DALI data loader: shards read by DALI's webdataset reader, JPEGs decoded and augmented on the GPU.

A drop-in for :class:`dissect_fast.data.loader.TorchLoader`: the same ``set_epoch(epoch)``, iteration
over ``(images, tokens, ids)`` on the training device (float32 [B,3,H,W] normalised, int64 [B,L],
int64 [B]) and ``stats`` (a Counter of the last epoch's skip reasons, ``bad_samples`` and ``ok``).

* Reading: ``fn.readers.webdataset`` over per-shard ``.idx`` files (see :mod:`.index_tool`), which
  list only the samples that passed validation: corrupt images, missing fields and the broken
  tail of a truncated tar never reach DALI (it cannot skip inside its graph). Their counts come
  from the ``.idx`` sidecars and are reported once per epoch by the rank that reads the shard.
  Should DALI still fail on a sample, the epoch ends early on this rank, logged and counted
  (``dali_error``), and the sample named in DALI's message is left out of later epochs.
* Order: shards are shuffled per epoch (the torch loader's seed rule) and split over ranks by
  the reader (``shard_id``/``num_shards``, contiguous sample ranges); samples are shuffled in a
  buffer (``random_shuffle``/``initial_fill``) seeded by (seed, epoch, rank). The pipeline is
  rebuilt every epoch, so the epoch number alone determines the order and a resumed run at an
  epoch boundary sees what an uninterrupted one would have.
* End of epoch: no sample is duplicated to fill a batch (``pad_last_batch=False``); training drops
  the short last batch (``LastBatchPolicy.DROP``, counted as ``dropped_tail``), evaluation keeps it
  (``PARTIAL``).
* Images: ``device="mixed"`` decoding (nvJPEG, the hardware decoder where the GPU has one); train:
  decode a random crop (RandomResizedCrop's scale/ratio) and resize it; eval: open_clip's
  Resize(shortest side) + CenterCrop with torchvision's exact output size and crop offsets;
  normalisation with the model preprocess's mean/std, all on the GPU. ``device_id=None`` runs the
  same graph on the CPU (tests, CI).
* Captions: stored ``tok`` ids resized to the model's context length on the device
  (:func:`fit_tokens_batch`, the batched twin of ``loader.fit_tokens``); shards without ``tok`` are
  tokenised from ``txt`` in a background thread (slow: a warning says so).
* Ids: the ``id`` field read as int64; shards without one get ``first_id + position`` from their
  sidecar, looked up from DALI's ``source_info`` (tar path and byte offset of the image) over the whole
  batch at once with numpy (:class:`SourceIds`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dissect_fast.data import samples
from dissect_fast.data.index import (
    ShardMeta,
    build_shard_index,
    check_idx_pairing,
    idx_paths,
    load_shard_meta,
    scan_shard,
    write_idx,
)
from dissect_fast.data.samples import EOT_TOKEN, MissingIdsError, missing_ids_message
from dissect_fast.data.shards import DatasetIndex, check_index_count, shard_stem, tokenizer_for

log = logging.getLogger("dissect_fast")

try:  # the default of every open_clip model's preprocess (Preprocess.from_transform reads the model's own)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
except ImportError:  # pragma: no cover - open_clip is a dependency; the values, for a bare DALI test
    OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
    OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


_DATA_OPS = ("fn.decoders", "fn.readers", "fn.peek_image_shape")  # operators that fail on bad input data


def dali_unavailable_reason() -> str | None:
    """None when DALI imports, else why not (for a skip or a fallback to the torch loader)."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken CUDA library underneath
        return f"nvidia-dali is not usable: {type(e).__name__}: {e}"
    return None


def dali_if_available() -> str:
    """``dali`` when DALI imports, else ``torch``: the demo and the quality benchmark use DALI on CPU too
    (about 3x the torch loader's rate on small JPEGs), while the trainer's ``auto`` keeps it for CUDA."""
    return "torch" if dali_unavailable_reason() else "dali"


def fit_tokens_batch(tok: torch.Tensor, context_length: int) -> torch.Tensor:
    """``loader.fit_tokens`` for a whole [B, n] batch on its device: pad with zeros, or truncate and
    end every row whose last kept token is not padding with the end-of-text token."""
    n = tok.shape[1]
    if n == context_length:
        return tok
    if n < context_length:
        return torch.nn.functional.pad(tok, (0, context_length - n))
    out = tok[:, :context_length].clone()
    last = out[:, -1]
    out[:, -1] = torch.where(last != 0, torch.full_like(last, EOT_TOKEN), last)
    return out


# ----------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """The image transform, as DALI needs it; :meth:`from_transform` reads it off open_clip's."""

    image_size: tuple[int, int] = (224, 224)  #: (H, W)
    mode: str = "shortest"  #: crop (RandomResizedCrop) | shortest (Resize short side + CenterCrop) | squash
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN
    std: tuple[float, ...] = OPENAI_DATASET_STD
    scale: tuple[float, float] = (0.9, 1.0)  #: RandomResizedCrop area range (open_clip's default)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"  #: bicubic | bilinear

    def __post_init__(self) -> None:
        if self.mode not in ("crop", "shortest", "squash"):
            raise ValueError(f"Preprocess.mode must be crop, shortest or squash, got {self.mode!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"Preprocess.interpolation must be bicubic or bilinear, got {self.interpolation!r}")
        if self.mode == "shortest" and self.image_size[0] != self.image_size[1]:
            raise ValueError("Preprocess: the shortest-side resize supports square image sizes only")

    @classmethod
    def from_transform(cls, transform) -> Preprocess:
        """Parameters of an open_clip/torchvision Compose (RandomResizedCrop | Resize [+ CenterCrop],
        Normalize); a clear error for steps DALI does not reproduce (colour jitter, grayscale, ...)."""
        from torchvision import transforms as T

        steps = getattr(transform, "transforms", [transform])
        kw: dict = {}
        unsupported = []
        for t in steps:
            name = type(t).__name__
            if isinstance(t, T.RandomResizedCrop):
                kw.update(
                    image_size=tuple(t.size),
                    mode="crop",
                    scale=tuple(t.scale),
                    ratio=tuple(t.ratio),
                    interpolation=_interp_name(t.interpolation),
                )
            elif isinstance(t, T.Resize):
                size = t.size if isinstance(t.size, int) else list(t.size)
                if isinstance(size, list) and len(size) == 1:
                    size = size[0]
                if isinstance(size, int):
                    kw.update(image_size=(size, size), mode="shortest")
                else:
                    kw.update(image_size=tuple(size), mode="squash")
                kw["interpolation"] = _interp_name(t.interpolation)
            elif isinstance(t, T.CenterCrop):
                if kw.get("mode") != "shortest" or tuple(t.size) != kw["image_size"]:
                    unsupported.append(f"{name}{tuple(t.size)} after {kw.get('mode')}")
            elif isinstance(t, T.Normalize):
                kw.update(mean=tuple(float(m) for m in t.mean), std=tuple(float(s) for s in t.std))
            elif name in ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb", "function"):
                continue
            else:
                unsupported.append(name)
        if unsupported or "mode" not in kw:
            raise ValueError(
                f"--data-backend dali cannot reproduce this image transform ({unsupported or 'no resize'}); it "
                f"supports RandomResizedCrop, Resize(+CenterCrop) and Normalize: use --data-backend torch"
            )
        return cls(**kw)


def _interp_name(mode) -> str:
    name = str(getattr(mode, "value", mode)).lower()
    return "bilinear" if "bilinear" in name else "bicubic"


# ----------------------------------------------------------------------------- the DALI graph
def build_pipeline(
    paths: list[str],
    index_paths: list[str],
    *,
    batch_size: int,
    preprocess: Preprocess,
    train: bool,
    caption: str = "tok",
    id_field: bool = True,
    source_info: bool = False,
    device_id: int | None = None,
    num_threads: int = 4,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    shuffle_buffer: int = 2000,
    hw_decoder_load: float = 0.65,
    prefetch: int = 2,
):
    """The DALI pipeline: outputs ``images`` (float32 CHW, normalised), ``tokens`` (int32 [B, n] or the
    caption bytes when ``caption="txt"``), then ``ids`` (int64 [B, 1]) and/or ``source_info`` (uint8)."""
    from nvidia.dali import fn, types  # optional dependency (the gpu extra): imported only when used
    from nvidia.dali import math as dmath
    from nvidia.dali.pipeline import Pipeline

    gpu = device_id is not None
    pipe = Pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=prefetch
    )
    ext = ["img", caption] + (["id"] if id_field else [])
    dtypes = [types.UINT8, types.INT32 if caption == "tok" else types.UINT8] + ([types.INT64] if id_field else [])
    p = preprocess
    H, W = p.image_size
    interp = types.INTERP_CUBIC if p.interpolation == "bicubic" else types.INTERP_LINEAR
    with pipe:
        outs: Any = fn.readers.webdataset(  # one DataNode per ext (the stub's return: a union with None)
            paths=paths,
            index_paths=index_paths,
            ext=ext,
            dtypes=dtypes,
            missing_component_behavior="error",
            random_shuffle=train and shuffle_buffer > 1,
            initial_fill=max(1, shuffle_buffer),
            shard_id=shard_id,
            num_shards=num_shards,
            stick_to_shard=True,
            pad_last_batch=False,
            name="reader",
        )
        enc = outs[0]
        dev = "mixed" if gpu else "cpu"
        dec_kw = {"device": dev, "output_type": types.RGB, "adjust_orientation": False}
        if gpu:
            dec_kw["hw_decoder_load"] = hw_decoder_load
        if p.mode == "crop":
            # one fused op: nvJPEG decodes only the random crop window (RandomResizedCrop's sampling)
            images = fn.decoders.image_random_crop(
                enc, random_area=list(p.scale), random_aspect_ratio=list(p.ratio), num_attempts=10, **dec_kw
            )
            images = fn.resize(images, resize_x=W, resize_y=H, interp_type=interp, antialias=True)
        elif p.mode == "squash":
            images = fn.decoders.image(enc, jpeg_fancy_upsampling=True, **dec_kw)
            images = fn.resize(images, resize_x=W, resize_y=H, interp_type=interp, antialias=True)
        else:
            # torchvision's Resize(S) + CenterCrop(S) exactly: long side int(S * long / short), crop offset
            # round((size - S) / 2) with Python's round-half-to-even
            images = fn.decoders.image(enc, jpeg_fancy_upsampling=True, **dec_kw)
            shape = fn.peek_image_shape(enc, adjust_orientation=False, dtype=types.INT64)
            h, w = shape[0], shape[1]
            short = dmath.min(h, w)
            nh, nw = h * H // short, w * H // short
            images = fn.resize(
                images,
                resize_x=fn.cast(nw, dtype=types.FLOAT),
                resize_y=fn.cast(nh, dtype=types.FLOAT),
                interp_type=interp,
                antialias=True,
            )
            dy, dx = nh - H, nw - W
            ay = dy // 2 + (dy % 2) * ((dy // 2) % 2)
            ax = dx // 2 + (dx % 2) * ((dx // 2) % 2)
            images = fn.slice(images, start=fn.cast(fn.stack(ay, ax), dtype=types.INT32), shape=[H, W], axis_names="HW")
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in p.mean],
            std=[255.0 * s for s in p.std],
        )
        text = fn.pad(outs[1], fill_value=0)  # stored lengths may differ between shards
        result = [images, text.gpu() if gpu and caption == "tok" else text]
        if id_field:
            result.append(outs[2].gpu() if gpu else outs[2])
        if source_info:
            result.append(fn.pad(fn.get_property(enc, key="source_info"), fill_value=0))
        pipe.set_outputs(*result)
    return pipe


# ----------------------------------------------------------------------------- ids from source_info
_OFFSET_BITS = 40  #: image offsets below 1 TiB: (shard, offset) packs into one int64 key
_MAX_DIGITS = 19  #: decimal digits of an int64


class SourceIds:
    """DALI's ``source_info`` rows -> sample ids for shards without an ``id`` field, with numpy over the batch
    (no Python loop over samples).

    A row is ``"<tar path>:<offset of the image data>:<member name>"`` (uint8, zero padded). The tar path is
    matched against the shard paths of each distinct path length (a handful of lengths, not one per sample):
    the row's first ``L`` bytes, viewed as one fixed-width byte string, are found by ``searchsorted`` among the
    sorted paths of that length, shortest first (a path may contain ``:``). The decimal offset that follows is
    parsed with byte arithmetic, and ``(shard, offset)``, packed into one int64, is found by ``searchsorted``
    among the sorted keys of all shards' samples."""

    def __init__(self, shards: list[_Shard]) -> None:
        paths = [s.path.encode("utf-8", "surrogateescape") for s in shards]
        self.path_len = np.asarray([len(p) for p in paths], dtype=np.int64)
        self.groups = []  #: (length, sorted paths as bytes dtype, their shard numbers)
        for n in sorted(set(self.path_len.tolist())):
            sel = np.flatnonzero(self.path_len == n)
            names = np.asarray([paths[i] for i in sel], dtype=f"S{n}")
            o = np.argsort(names)
            self.groups.append((n, names[o], sel[o]))
        offs = [s.offsets if s.offsets is not None else np.zeros(0, np.int64) for s in shards]
        if any(len(o) and int(o.max()) >= 1 << _OFFSET_BITS for o in offs) or len(shards) >= 1 << (63 - _OFFSET_BITS):
            raise ValueError("DaliLoader: shards over 1 TiB or over 8M shards cannot map source_info to ids")
        empty = np.zeros(0, np.int64)
        self.keys = np.concatenate([empty] + [(np.int64(i) << _OFFSET_BITS) | o for i, o in enumerate(offs)])
        self.ids = np.concatenate([empty] + [s.offset_ids for s in shards if s.offsets is not None])
        if len(self.keys) != len(self.ids) or not np.all(np.diff(self.keys) > 0):
            raise ValueError("DaliLoader: image offsets must be sorted and unique within each shard")

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.uint8).reshape(len(rows), -1)
        b, w = rows.shape
        shard = np.full(b, -1, dtype=np.int64)
        for n, names, which in self.groups:  # one pass per distinct path length
            cand = np.flatnonzero((shard < 0) & (rows[:, n] == ord(":"))) if n < w else np.zeros(0, np.int64)
            if not len(cand):
                continue
            head = np.ascontiguousarray(rows[cand, :n]).view(f"S{n}").ravel()
            j = np.minimum(np.searchsorted(names, head), len(names) - 1)
            hit = names[j] == head
            shard[cand[hit]] = which[j[hit]]
        if (shard < 0).any():
            raise KeyError(f"DaliLoader: source_info names no shard of this epoch: {self._row(rows, shard < 0)}")
        start = self.path_len[shard] + 1  # the offset's first digit
        at = start[:, None] + np.arange(_MAX_DIGITS)
        digit = rows[np.arange(b)[:, None], np.minimum(at, w - 1)].astype(np.int64) - ord("0")
        ok = np.cumprod((at < w) & (digit >= 0) & (digit <= 9), axis=1).astype(bool)  # up to the first non-digit
        ndig = ok.sum(axis=1)
        offset = (np.where(ok, digit, 0) * 10 ** np.maximum(ndig[:, None] - 1 - np.arange(_MAX_DIGITS), 0)).sum(1)
        key = (shard << _OFFSET_BITS) | offset
        i = np.searchsorted(self.keys, key)
        found = np.zeros(b, dtype=bool)
        inside = i < len(self.keys)
        found[inside] = self.keys[i[inside]] == key[inside]
        if not (found & (ndig > 0)).all():
            raise KeyError(f"DaliLoader: no sample at this source_info offset: {self._row(rows, ~found | (ndig == 0))}")
        return self.ids[i]

    @staticmethod
    def _row(rows: np.ndarray, mask) -> str:
        return rows[np.flatnonzero(mask)[0]].tobytes().rstrip(b"\0").decode("utf-8", "surrogateescape")


# ----------------------------------------------------------------------------- the loader
def _key(name: str) -> str:
    kx = samples.split_name(name)
    return kx[0] if kx else name


@dataclass
class _Shard:
    path: str
    idx: str  #: the .idx DALI reads (possibly a filtered copy)
    count: int
    skipped: Counter  #: reasons the shard lost samples (static: the same every epoch)
    offsets: np.ndarray | None = None  #: sorted image data offsets, when ids come from source_info ...
    offset_ids: np.ndarray | None = None  #: ... and the ids of those samples
    verify: str = "none"  #: the image check its .idx was built with
    first_id: int | None = None  #: its sidecar's: ids first_id + position when the samples have no id field


class DaliLoader:
    """Iterable of (images, tokens, ids) on ``device`` read by DALI; ``stats`` holds the last epoch's counts.

    Args:
        shards: tar paths (every rank gets the full list; the reader splits samples over ranks).
        batch_size: per rank.
        context_length: the model's; stored token ids are padded/truncated to it.
        preprocess: image transform (:meth:`Preprocess.from_transform` of the model's preprocess).
        train: shuffle + random-resized-crop + drop the short last batch; else center crop, keep it.
        device: where batches land; ``cuda`` decodes with ``device="mixed"``, ``cpu`` runs on the CPU.
        seed, rank, world_size: order and split, as in ``ShardDataset``.
        workers: DALI CPU threads (reading, CPU-side ops; all decoding on CPU when ``device`` is cpu).
        shuffle_buffer: the reader's ``initial_fill``.
        index: the dataset index, whose directory is searched for ``.idx`` files first.
        subset_mask, num_ids: like ``ShardDataset``: samples outside the subset or the id range are
            left out of this loader's ``.idx`` copies (so they are never decoded).
        drop_last: default ``train``.
        verify: image check when a shard has no ``.idx`` yet and the loader has to build one.
        hw_decoder_load: share of JPEGs for the hardware decoder (A100/H100); the rest go to CUDA.
        tokenizer: the model's own tokenizer when it is not CLIP BPE: captions are read from ``txt`` and tokenised
            with it (stored ``tok`` ids, CLIP BPE, are not read); None: stored ``tok`` ids, else CLIP BPE.
        max_image_pixels, max_member_bytes: the bounded-cost limits; ``.idx`` files indexed under other limits are
            not used (the loader builds its own), so a sample is bad for the same reason as in the torch loader.
    """

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        context_length: int,
        preprocess: Preprocess,
        *,
        train: bool,
        device: torch.device | str,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 4,
        shuffle_buffer: int = 2000,
        index: DatasetIndex | None = None,
        subset_mask: np.ndarray | None = None,
        num_ids: int | None = None,
        drop_last: bool | None = None,
        verify: str = "header",
        hw_decoder_load: float = 0.65,
        prefetch: int = 2,
        tokenizer=None,
        max_image_pixels: int = samples.MAX_IMAGE_PIXELS,
        max_member_bytes: int = samples.MAX_MEMBER_BYTES,
    ) -> None:
        reason = dali_unavailable_reason()
        if reason:
            raise ImportError(
                f"--data-backend dali: {reason} (pip install nvidia-dali-cuda130, or use --data-backend torch)"
            )
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"DaliLoader: bad batch_size {batch_size} / rank {rank} of {world_size}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch_size, self.context_length, self.preprocess = batch_size, context_length, preprocess
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.threads, self.shuffle_buffer = max(2, workers), shuffle_buffer
        self.drop_last = train if drop_last is None else drop_last
        self.hw_decoder_load, self.prefetch = hw_decoder_load, prefetch
        self.epoch = 0
        self.stats: Counter = Counter()
        self._tmp = tempfile.mkdtemp(prefix="dissect_dali_")
        self._tokenizer, self._own_tokenizer = tokenizer, tokenizer is not None
        self._subset_mask, self._num_ids = subset_mask, num_ids
        self.max_image_pixels, self.max_member_bytes = max_image_pixels, max_member_bytes
        self._ids_seen: list[np.ndarray] | None = []  #: every shard's ids, for the duplicate check at set-up
        self.shards, self.caption, self.id_field = self._prepare(list(shards), index, verify)
        self.num_samples = sum(s.count for s in self.shards)
        if self.caption == "txt":
            log.warning(
                "DaliLoader: shards have no pre-tokenised `tok` field: captions are tokenised on the CPU in a "
                "background thread, which may bound throughput (re-write the shards with tokens)"
            )

    # ------------------------------------------------------------------ set-up
    def _prepare(self, paths, index, verify):
        search = [index.root] if index is not None and index.root else []
        first_ids = index.first_ids() if index is not None else {}
        cache = os.path.join(os.environ.get("DISSECT_FAST_CACHE", os.path.expanduser("~/.cache/dissect_fast")), "idx")
        metas: list[ShardMeta] = []
        built = 0
        limits = {"max_image_pixels": self.max_image_pixels, "max_member_bytes": self.max_member_bytes}
        for p in paths:
            cdir = os.path.join(cache, hashlib.sha1(os.path.abspath(os.path.dirname(p)).encode()).hexdigest()[:16])
            m = load_shard_meta(p, search + [None, cdir], **limits)
            if m is None:  # no (up-to-date) .idx: build one once, into a cache directory
                first = first_ids.get(shard_stem(p))
                scan = build_shard_index(p, out_dir=cdir, verify=verify, first_id=first, **limits)
                if scan.ids is None and first is None and self.train:
                    raise MissingIdsError(missing_ids_message(p))
                m = load_shard_meta(p, [cdir], **limits)
                assert m is not None  # just built
                built += 1
            else:  # a sample of its rows against the tar's member headers: an .idx made for other data is refused
                check_idx_pairing(p, m.idx_path, max_rows=32)
            if index is not None and search and os.path.dirname(m.idx_path) == os.path.abspath(search[0]):
                check_index_count(index, p, m.samples)
            metas.append(m)
        if built:
            log.warning(
                "DaliLoader: built .idx files for %d shard(s) (verify=%s); run `dissect-fast index` once to "
                "check images fully and skip this",
                built,
                verify,
            )
        live = [m for m in metas if m.samples > 0]
        if not live:
            raise ValueError(f"DaliLoader: no readable samples in {len(paths)} shard(s)")
        has_tok = all(m.has_tok for m in live) and not self._own_tokenizer
        caption = "tok" if has_tok else "txt" if all(m.has_txt for m in live) else None
        if caption is None and self._own_tokenizer:
            raise ValueError(
                "DaliLoader: the model's tokenizer is not CLIP BPE, so captions are read from `txt`, "
                "which some shards lack: re-write them with captions, or use a CLIP BPE model"
            )
        if caption is None:
            raise ValueError(
                "DaliLoader: some shards have only `tok`, others only `txt` captions: re-index or "
                "re-write them consistently, or use --data-backend torch"
            )
        id_field = all(m.has_id_field for m in live)
        shards = [self._shard(p, m, id_field) for p, m in zip(paths, metas)]
        if self._ids_seen:  # duplicate ids across shards would share history entries: refused before training
            ids = np.concatenate(self._ids_seen)
            uniq = np.unique(ids)
            if uniq.size != ids.size:
                raise ValueError(
                    f"DaliLoader: {ids.size - uniq.size} sample ids appear in more than one place in the shards: "
                    f"re-run `dissect-fast index` on them (ids must be unique)"
                )
        self._ids_seen = None
        return shards, caption, id_field

    def _shard(self, path: str, m: ShardMeta, id_field: bool) -> _Shard:
        sh = _Shard(
            os.path.abspath(path), m.idx_path, m.samples, Counter(m.skipped), verify=m.verify, first_id=m.first_id
        )
        if m.samples and (not id_field or self._subset_mask is not None or self._num_ids is not None):
            self._filter(sh, m, self._subset_mask, self._num_ids, keep_map=not id_field)
        return sh

    def _filter(self, sh: _Shard, m: ShardMeta, subset_mask, num_ids, keep_map: bool) -> None:
        """Ids of the shard's samples (stored or assigned); drops the ones this loader must not see into a
        private .idx copy, and keeps an offset -> id map when DALI cannot read the ids itself."""
        with open(m.idx_path) as f:
            header, *lines = f.read().splitlines()
        comps = [ln.split() for ln in lines]
        for n, c in enumerate(comps):  # the members of one sample share its key (a cheap pairing check)
            keys = {_key(c[j + 3]) for j in range(0, len(c), 4)}
            if len(keys) != 1:
                raise ValueError(
                    f"{m.idx_path}: sample {n} mixes members of different samples: re-run `dissect-fast index`"
                )
        img_off = np.asarray([int(c[1]) for c in comps], dtype=np.int64)  # "img" is always the first component
        if m.has_id_field:
            ids = np.empty(len(comps), dtype=np.int64)
            with open(sh.path, "rb") as f:
                for i, c in enumerate(comps):
                    j = c.index("id")
                    f.seek(int(c[j + 1]))
                    ids[i] = int.from_bytes(f.read(8), "little", signed=True)
        else:
            assert m.first_id is not None  # recorded in the sidecar of every shard without an id field
            ids = int(m.first_id) + np.asarray(m.positions, dtype=np.int64)
        if self.train and self._ids_seen is not None:
            self._ids_seen.append(ids)
        keep = np.ones(len(comps), dtype=bool)
        if num_ids is not None:
            bad = (ids < 0) | (ids >= num_ids)
            if bad.any():
                sh.skipped["id_out_of_range"] += int(bad.sum())
                sh.skipped["bad_samples"] += int(bad.sum())
                sh.skipped[f"shard:{os.path.basename(sh.path)}"] += int(bad.sum())
            keep &= ~bad
        if subset_mask is not None:
            inside = np.zeros(len(comps), dtype=bool)
            ok = keep.copy()
            inside[ok] = subset_mask[ids[ok]]
            sh.skipped["not_in_subset"] += int((ok & ~inside).sum())
            keep &= inside
        if not keep.all():
            sh.idx = os.path.join(self._tmp, f"{len(os.listdir(self._tmp)):06d}.idx")
            with open(sh.idx, "w") as f:
                f.write(f"{header.split()[0]} {int(keep.sum())}\n")
                for row in np.flatnonzero(keep):
                    f.write(lines[row] + "\n")
            sh.count = int(keep.sum())
        if keep_map:
            order = np.argsort(img_off[keep], kind="stable")
            sh.offsets, sh.offset_ids = img_off[keep][order], ids[keep][order]

    # ------------------------------------------------------------------ the epoch
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[_Shard]:
        order = list(self.shards)
        if self.train:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def _owned_stats(self, order: list[_Shard]) -> Counter:
        """Static skip counts of the shards whose first sample falls in this rank's range (each shard's
        counts are reported by exactly one rank per epoch); DALI's split: [N*r//W, N*(r+1)//W)."""
        n = sum(s.count for s in order)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        out: Counter = Counter()
        cum = 0
        for s in order:
            owner = lo <= cum < hi or (cum >= n and self.rank == self.world_size - 1)
            if owner:
                out.update(s.skipped)
            cum += s.count
        return out

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy  # optional dependency

        self.stats = Counter()
        order = [s for s in self._order() if s.count > 0]
        self.stats.update(self._owned_stats(self._order()))
        source = not self.id_field
        gpu = self.device.type == "cuda"
        seed = (self.seed * 1_000_003 + self.epoch * 7919 + self.rank * 104_729) % (2**31 - 1)
        pipe = build_pipeline(
            [s.path for s in order],
            [s.idx for s in order],
            batch_size=self.batch_size,
            preprocess=self.preprocess,
            train=self.train,
            caption=self.caption,
            id_field=self.id_field,
            source_info=source,
            device_id=self.device.index if gpu else None,
            num_threads=self.threads,
            seed=seed,
            shard_id=self.rank,
            num_shards=self.world_size,
            shuffle_buffer=self.shuffle_buffer,
            hw_decoder_load=self.hw_decoder_load,
            prefetch=self.prefetch,
        )
        names = ["images", "text"] + (["ids"] if self.id_field else []) + (["source"] if source else [])
        it = DALIGenericIterator(
            pipe,
            names,
            reader_name="reader",
            auto_reset=False,
            last_batch_padded=False,
            prepare_first_batch=False,
            last_batch_policy=LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL,
        )
        size = pipe.reader_meta("reader")["epoch_size"]
        n_rank = self._rank_size(size)
        offsets = SourceIds(order) if source else None
        pool = ThreadPoolExecutor(1) if self.caption == "txt" else None
        yielded = 0
        try:
            for batch in self._batches(it, pool, offsets, order):
                yielded += batch[2].shape[0]
                yield batch
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            del it, pipe
        self.stats["ok"] += n_rank - self.stats.get("dali_error_lost", 0)
        if self.drop_last:
            self.stats["dropped_tail"] += max(0, n_rank - yielded - self.stats.get("dali_error_lost", 0))

    def _batches(self, it, pool, offsets, order):
        """Device batches from DALI's output dicts; txt captions are tokenised one batch ahead in ``pool``."""
        pending = None
        n = 0
        while True:
            try:
                out = next(it)[0]
            except StopIteration:
                break
            except RuntimeError as e:  # DALI failed on a sample the index let through: end the epoch, counted
                if not any(op in str(e) for op in _DATA_OPS):
                    raise  # not the data's fault
                self._dali_error(e, order, n)
                break
            n += out["images"].shape[0]
            ids = self._ids(out, offsets)
            if pool is None:
                tokens = fit_tokens_batch(out["text"].to(self.device, non_blocking=True).long(), self.context_length)
                yield out["images"], tokens, ids
                continue
            fut = pool.submit(self._tokenize, out["text"])
            if pending is not None:
                yield self._with_tokens(*pending)
            pending = (out["images"], fut, ids)
        if pending is not None:
            yield self._with_tokens(*pending)

    def _with_tokens(self, images, fut, ids):
        """A batch whose captions were tokenised in the background; their cut count goes to ``stats`` here, on the
        loader's own thread."""
        tokens, n_cut = fut.result()
        if n_cut:
            self.stats["caption_too_long"] += n_cut
        return images, tokens.to(self.device, non_blocking=True), ids

    def _ids(self, out: dict, offsets: SourceIds | None) -> torch.Tensor:
        if offsets is None:
            return out["ids"].view(-1).to(self.device, non_blocking=True)
        return torch.from_numpy(offsets(out["source"].numpy())).to(self.device, non_blocking=True)

    def _tokenize(self, text: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(token ids, captions cut) of a batch of ``txt`` bytes (each read up to MAX_TXT_BYTES: the ``.idx`` says
        so), every caption cut to a bounded length first (:func:`samples.cut_caption`)."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.context_length)
        caps = [row.tobytes().rstrip(b"\0").decode("utf-8", "replace").strip() for row in text.cpu().numpy()]
        caps, n_cut = samples.cut_captions(caps, self.context_length)
        return self._tokenizer(caps, context_length=self.context_length).long(), n_cut

    def _dali_error(self, e: Exception, order: list[_Shard], yielded: int) -> None:
        """DALI failed on a sample the .idx let through (its messages do not say which): the rest of this
        rank's epoch is lost, counted; this rank's shards not yet checked with ``verify="decode"`` are
        re-checked now and their failing samples left out from the next epoch on."""
        msg = str(e)
        what = msg.split("encountered:")[-1].strip().splitlines()[0] if "encountered:" in msg else msg[:200]
        n_rank = self._rank_size(sum(s.count for s in order))
        lost = max(0, n_rank - yielded)
        self.stats["dali_error"] += 1
        self.stats["dali_error_lost"] += lost
        self.stats["bad_samples"] += lost
        mine = self._rank_shards(order)
        todo = [s for s in mine if s.verify != "decode"]
        log.error(
            "rank %d epoch %d: DALI failed after %d samples (%s); the rest of this rank's epoch (%d samples) "
            "is skipped. Re-checking %d of its %d shard(s) by decoding; run `dissect-fast index --verify decode` "
            "on the data to avoid this",
            self.rank,
            self.epoch + 1,
            yielded,
            what,
            lost,
            len(todo),
            len(mine),
        )
        if not todo:
            return
        with ThreadPoolExecutor(self.threads) as pool:  # PIL decodes without the GIL
            scans = list(
                pool.map(lambda sh: scan_shard(sh.path, "decode", self.max_image_pixels, self.max_member_bytes), todo)
            )
        for sh, scan in zip(todo, scans):
            if scan.ids is None:  # (sh.idx may be a filtered copy, its sidecar elsewhere: the first_id kept)
                scan.first_id = sh.first_id
            out = os.path.join(self._tmp, f"v{len(os.listdir(self._tmp)):06d}")
            write_idx(scan, out)
            meta = load_shard_meta(sh.path, [out])
            assert meta is not None  # just written
            new = self._shard(sh.path, meta, self.id_field)
            if new.count != sh.count:
                log.warning(
                    "rank %d: %s: %d sample(s) fail to decode, left out from now on",
                    self.rank,
                    os.path.basename(sh.path),
                    sh.count - new.count,
                )
            sh.__dict__.update(new.__dict__)
        self.num_samples = sum(s.count for s in self.shards)

    def _rank_size(self, n: int) -> int:
        return n * (self.rank + 1) // self.world_size - n * self.rank // self.world_size

    def _rank_shards(self, order: list[_Shard]) -> list[_Shard]:
        """Shards with samples in this rank's range [N*r//W, N*(r+1)//W) of the concatenated order."""
        n = sum(s.count for s in order)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        out, cum = [], 0
        for s in order:
            if s.count and cum < hi and cum + s.count > lo:
                out.append(s)
            cum += s.count
        return out

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)


__all__ = [
    "DaliLoader",
    "Preprocess",
    "SourceIds",
    "build_pipeline",
    "dali_unavailable_reason",
    "fit_tokens_batch",
    "idx_paths",
]
