"""The ``gpu`` data backend: workers ship encoded image bytes, the training process decodes them on its device.

Loader workers run the torch loader's webdataset pipeline (:class:`dissect_fast.data.loader.ShardDataset`: the same
shard order, shuffle, sample rules and skip counts) up to the image: they read the image's header with PIL (no
pixel decoded) for ``tiny_image`` / ``image_too_large`` / unidentifiable bytes, tokenise the caption, and ship the
encoded bytes (one uint8 tensor per batch, with each sample's length and flags), tokens and ids. The training
process then, per batch (:class:`DeviceDecodeLoader`):

1. **decodes**: baseline JPEGs in one batched ``torchvision.io.decode_jpeg(list, device=dev)`` (nvjpeg on CUDA,
   libjpeg-turbo with ``device="cpu"``); PNG/WebP/CMYK JPEGs and JPEGs without an end marker (possibly cut) through
   ``torchvision.io.decode_image`` on the CPU, then moved; whatever torchvision refuses is judged by PIL
   (:func:`dissect_fast.data.samples.decode_image`), so a sample is bad, with the same reason, exactly when the
   torch loader finds it bad (``corrupt_image`` counted here, in the training process);
2. **drops** bad samples and repeated ids (``duplicate_id``: the first copy that decodes is kept, as on the torch
   path) and refills the batch from the next one, so every step still gets exactly B samples;
3. **transforms** on the device (:class:`DeviceTransform`), in uint8, per image, then normalises in float32:
   open_clip's train transform (RandomResizedCrop, per-sample parameters from a seeded generator, bicubic with
   antialias; a horizontal flip when the transform has one) or its eval transform (shorter side to S, centre crop).

**Streams** (pytorch/vision#9606): torchvision's CUDA decoder allocates its outputs on the caller's current stream
but writes them from a stream of its own that does not wait for the caller's, so it can overwrite a freed block
that kernels queued on the training stream still read. Here the decoder runs with a side stream current, which
owns every block it is handed (never one the training stream freed); the training stream waits for the side stream
and each output is ``record_stream``-ed on it, so a block goes back to the decoder only once the training stream
is done with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from dissect_fast.data import samples
from dissect_fast.data.loader import ShardDataset, TorchLoader, normalize_uint8
from dissect_fast.data.samples import BadSample

log = logging.getLogger("dissect_fast")

#: per-sample flags a worker sends with the bytes
FAST = 1  #: a baseline RGB/grayscale JPEG with its end marker: batched decode_jpeg on the device
NOT_JPEG = 2  #: counted ``image_not_jpeg`` once decoded
CONVERTED = 4  #: counted ``image_converted`` once decoded
REPEAT = 8  #: an id this worker already sent: the training process checks it (duplicate, header) itself


def header_flags(data: bytes, max_pixels: int) -> int:
    """The flags of an image from its header alone (PIL reads no pixel); BadSample as
    :func:`dissect_fast.data.samples.decode_image` would raise before decoding (``tiny_image``,
    ``image_too_large``, ``corrupt_image`` for bytes PIL cannot identify)."""
    try:
        with samples._open_image(data) as im:
            samples._check_size(im, max_pixels)
            fmt, mode = im.format, im.mode
    except BadSample:
        raise
    except Exception:  # noqa: BLE001 -- PIL raises many types on unidentifiable data
        raise BadSample("corrupt_image") from None
    flags = (NOT_JPEG if fmt != "JPEG" else 0) | (CONVERTED if mode != "RGB" else 0)
    if fmt == "JPEG" and mode in ("RGB", "L") and b"\xff\xd9" in data[-64:]:
        flags |= FAST  # a cut JPEG (no end marker) goes to libjpeg, which refuses it as PIL does
    return flags


class EncodedShardDataset(ShardDataset):
    """:class:`ShardDataset` whose samples keep their encoded image: (bytes, flags, shard), tokens, id. A batch
    travels as (the bytes of all its images as one uint8 tensor, [n, 4] int64 of length / flags / worker / shard
    (its position in ``shards``), tokens, ids)."""

    defer_repeats = True

    def decode(self, s: dict, stats: Counter, seen=None):
        out = super().decode(s, stats, seen)
        if out is None:
            return None
        (data, flags), tok, sid = out
        if not hasattr(self, "_shard_pos"):
            self._shard_pos = {u: i for i, u in enumerate(self.shards)}
        return (data, flags, self._shard_pos.get(s["__url__"], -1)), tok, sid

    def image(self, data: bytes, stats: Counter, repeat: bool):
        if repeat:  # maybe a duplicate, maybe a good copy of an id whose first copy fails to decode: decided later
            return data, REPEAT
        return data, header_flags(data, self.max_image_pixels)

    def collate(self, batch):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid = info.id if info is not None else 0
        imgs, toks, ids = zip(*batch)
        blob = np.frombuffer(b"".join(d for d, _, _ in imgs), dtype=np.uint8)
        meta = torch.tensor([(len(d), f, wid, k) for d, f, k in imgs], dtype=torch.int64)
        return (
            torch.from_numpy(blob.copy()),
            meta,
            torch.stack(toks),
            torch.tensor(ids, dtype=torch.int64),
        )


# ----------------------------------------------------------------------------- decoding
@contextlib.contextmanager
def _quiet():
    """torchvision 0.29 warns on every decode call that its decoders are deprecated (in favour of TorchCodec)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class Decoder:
    """Encoded images -> uint8 [3, H, W] tensors on ``device`` (see the module docstring for the routes)."""

    def __init__(self, device: torch.device, max_pixels: int = samples.MAX_IMAGE_PIXELS) -> None:
        self.device, self.max_pixels = device, max_pixels
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, datas: list[torch.Tensor], flags: list[int]) -> tuple[list, list[int]]:
        """(per sample: a tensor or the BadSample reason, per sample: flags, REPEAT samples' read from their header
        here). ``datas``: 1-D uint8 CPU tensors."""
        out: list = [None] * len(datas)
        flags = list(flags)
        fast = [i for i, f in enumerate(flags) if f & FAST and not f & REPEAT]
        for i, img in zip(fast, self._jpegs([datas[i] for i in fast])):
            out[i] = img
        for i in range(len(datas)):
            if out[i] is None:
                out[i], flags[i] = self._one(datas[i], flags[i])
        return out, flags

    def _jpegs(self, datas: list[torch.Tensor]) -> list:
        """Batched decode_jpeg; when the batch fails, each image alone (None for those that fail)."""
        if not datas:
            return []
        try:
            return self._decode_jpeg(datas)
        except RuntimeError:
            got: list = []
            for d in datas:
                try:
                    got += self._decode_jpeg([d])
                except RuntimeError:
                    got.append(None)
            return got

    def _decode_jpeg(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        with _quiet():
            if self._side is None:
                return decode_jpeg(datas, device=self.device, mode=ImageReadMode.RGB)
            main = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._side):  # the decoder's blocks come from the side stream's pool
                imgs = decode_jpeg(datas, device=self.device, mode=ImageReadMode.RGB)
        main.wait_stream(self._side)
        for t in imgs:
            t.record_stream(main)  # not reused by the decoder before the training stream is done with it
        return imgs

    def _one(self, data: torch.Tensor, flags: int):
        """One image off the fast path: header check for a REPEAT sample, decode_image on the CPU, else PIL."""
        from torchvision.io import ImageReadMode, decode_image

        raw = None
        if flags & REPEAT:
            raw = data.numpy().tobytes()
            try:
                flags = header_flags(raw, self.max_pixels) | REPEAT
            except BadSample as e:
                return e.reason, flags
        img = None
        if flags & FAST == 0 or flags & REPEAT:
            try:
                with _quiet():
                    img = decode_image(data, mode=ImageReadMode.RGB)
            except RuntimeError:
                img = None
            if img is not None and (img.ndim != 3 or img.shape[0] != 3 or img.dtype != torch.uint8):
                img = None  # animated, 16-bit, ...: PIL's reading is the reference
        if img is None:
            try:
                pil = samples.decode_image(raw if raw is not None else data.numpy().tobytes(), None, self.max_pixels)
            except BadSample as e:
                return e.reason, flags
            from torchvision.transforms.functional import pil_to_tensor

            img = pil_to_tensor(pil)
        nb = self.device.type == "cuda"
        return img.to(self.device, non_blocking=nb), flags


# ----------------------------------------------------------------------------- transforms
@dataclass
class DeviceTransform:
    """open_clip's image transform on uint8 tensors on a device, per image, then normalised as a batch.

    ``mode``: crop (RandomResizedCrop: the train transform) | shortest (Resize(S) + CenterCrop(S): eval) |
    squash (Resize((H, W))). :meth:`from_transform` reads it off open_clip's / torchvision's ``Compose``.
    """

    image_size: tuple[int, int] = (224, 224)  #: (H, W)
    mode: str = "shortest"
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    scale: tuple[float, float] = (0.9, 1.0)  #: RandomResizedCrop area range (open_clip's)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"  #: bicubic | bilinear
    flip_p: float = 0.0  #: RandomHorizontalFlip's probability (open_clip's default transforms have none)

    def __post_init__(self) -> None:
        if self.mode not in ("crop", "shortest", "squash"):
            raise ValueError(f"DeviceTransform.mode must be crop, shortest or squash, got {self.mode!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"DeviceTransform.interpolation must be bicubic or bilinear, got {self.interpolation!r}")

    @classmethod
    def from_transform(cls, transform) -> DeviceTransform:
        """The parameters of a ``Compose`` of RandomResizedCrop | Resize [+ CenterCrop], RandomHorizontalFlip,
        the RGB/tensor conversions and Normalize; ValueError naming the steps it cannot reproduce."""
        from torchvision import transforms as T

        kw: dict = {}
        unsupported = []
        for t in getattr(transform, "transforms", [transform]):
            name = type(t).__name__
            if isinstance(t, T.RandomResizedCrop):
                kw.update(image_size=tuple(t.size), mode="crop", scale=tuple(t.scale), ratio=tuple(t.ratio))
                kw["interpolation"] = _interp(t.interpolation)
            elif isinstance(t, T.Resize):
                size = [t.size] if isinstance(t.size, int) else list(t.size)
                if len(size) == 1 and t.max_size is None:
                    kw.update(image_size=(size[0], size[0]), mode="shortest")
                elif len(size) == 2:
                    kw.update(image_size=tuple(size), mode="squash")
                else:
                    unsupported.append(f"Resize({t.size}, max_size={t.max_size})")
                kw["interpolation"] = _interp(t.interpolation)
            elif isinstance(t, T.CenterCrop):
                crop = tuple(t.size) if not isinstance(t.size, int) else (t.size, t.size)
                if kw.get("mode") not in ("shortest", "squash") or crop != kw["image_size"]:
                    unsupported.append(f"CenterCrop{crop} after {kw.get('mode')} {kw.get('image_size')}")
            elif isinstance(t, T.RandomHorizontalFlip):
                kw["flip_p"] = float(t.p)
            elif isinstance(t, T.Normalize):
                kw.update(mean=tuple(float(m) for m in t.mean), std=tuple(float(s) for s in t.std))
            elif isinstance(t, T.ToTensor) or name in ("MaybeConvertMode", "_convert_to_rgb", "_ToUint8"):
                continue
            else:
                unsupported.append(name)
        if unsupported or "mode" not in kw:
            raise ValueError(
                f"--data-backend gpu cannot reproduce this image transform ({unsupported or 'no resize'}); it "
                f"supports RandomResizedCrop, Resize(+CenterCrop), RandomHorizontalFlip and Normalize: use "
                f"--data-backend torch"
            )
        return cls(**kw)

    def crop_params(self, sizes: list[tuple[int, int]], generator: torch.Generator) -> torch.Tensor:
        """[n, 4] int64 (top, left, height, width) per image of (H, W) ``sizes``: torchvision's
        ``RandomResizedCrop.get_params`` (10 tries, then the centre crop at the nearest allowed ratio), all images
        at once, from ``generator``."""
        n, tries = len(sizes), 10
        hw = torch.tensor(sizes, dtype=torch.float64).view(n, 1, 2)
        H, W = hw[..., 0], hw[..., 1]
        area = H * W
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        u = torch.rand(n, tries, 2, generator=generator, dtype=torch.float64)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        ar = torch.exp(lo + (hi - lo) * u[..., 1])
        w = torch.round(torch.sqrt(target * ar))
        h = torch.round(torch.sqrt(target / ar))
        ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
        first = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), -1)
        out = torch.empty(n, 4, dtype=torch.int64)
        pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        for i, (ih, iw) in enumerate(sizes):
            if first[i] >= 0:
                ch, cw = int(h[i, first[i]]), int(w[i, first[i]])
                top, left = int(pos[i, 0] * (ih - ch + 1)), int(pos[i, 1] * (iw - cw + 1))
            else:  # torchvision's fallback: the whole image cut to the nearest allowed ratio, centred
                in_ratio = iw / ih
                if in_ratio < self.ratio[0]:
                    cw, ch = iw, int(round(iw / self.ratio[0]))
                elif in_ratio > self.ratio[1]:
                    ch, cw = ih, int(round(ih * self.ratio[1]))
                else:
                    ch, cw = ih, iw
                top, left = (ih - ch) // 2, (iw - cw) // 2
            out[i] = torch.tensor([top, left, ch, cw])
        return out

    def __call__(self, images: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [3, h_i, w_i] images (one device) -> float32 [n, 3, H, W], normalised. ``generator`` (CPU): the
        crop and flip draws of the train transform."""
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import InterpolationMode

        interp = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        size = list(self.image_size)
        if self.mode == "crop":
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            params = self.crop_params([(int(x.shape[-2]), int(x.shape[-1])) for x in images], gen).tolist()
            outs = [
                F.resized_crop(x, *p, size=size, interpolation=interp, antialias=True) for x, p in zip(images, params)
            ]
        elif self.mode == "shortest":
            outs = [F.center_crop(F.resize(x, size[:1], interpolation=interp, antialias=True), size) for x in images]
        else:
            outs = [F.resize(x, size, interpolation=interp, antialias=True) for x in images]
        batch = torch.stack(outs)
        if self.flip_p > 0:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            flip = (torch.rand(len(outs), generator=gen) < self.flip_p).to(batch.device)
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        return normalize_uint8(batch, self.mean, self.std)


def _interp(mode) -> str:
    name = str(getattr(mode, "value", mode)).lower()
    if "bicubic" in name:
        return "bicubic"
    if "bilinear" in name:
        return "bilinear"
    raise ValueError(f"--data-backend gpu: interpolation {name} is not supported (bicubic, bilinear): use torch")


# ----------------------------------------------------------------------------- the loader
class DeviceDecodeLoader(TorchLoader):
    """:class:`TorchLoader` over :class:`EncodedShardDataset`: batches decoded and transformed on ``device``.
    The same iteration contract (exactly B per batch with ``drop_last``, ``stats`` with the same reasons)."""

    def __init__(
        self,
        dataset: EncodedShardDataset,
        transform: DeviceTransform,
        workers: int,
        device: torch.device,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, workers, device, drop_last)
        self.transform, self.seed, self.rank = transform, seed, rank
        self.decoder = Decoder(device, dataset.max_image_pixels)
        self._gen = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._gen.manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + self.rank)  # the crops and flips

    def _seen_ids(self, workers: int):
        """Every repeated id is judged here, after decoding (the first copy that decodes is kept): one bitmap for
        all workers where the torch loader checks across workers, else a set per worker, as its workers keep."""
        ds = self.dataset
        if ds.resampled:
            return None
        if ds.train and ds.num_ids is not None:
            return {"all": np.zeros((ds.num_ids + 7) // 8, dtype=np.uint8)}
        return {}

    def _prepare(self, batch: list, full: bool, seen) -> tuple[tuple, bool]:
        """A worker's encoded batch decoded and transformed on the device, in order: a repeated id is
        ``duplicate_id`` whatever its bytes, else a failed decode is bad for its reason, else the sample is kept."""
        blob, meta, toks, ids = batch
        lengths, flags, wids, shard = (meta[:, j].tolist() for j in range(4))
        ends = np.cumsum(lengths).tolist()
        datas = [blob[e - n : e] for e, n in zip(ends, lengths)]
        images, flags = self.decoder(datas, flags)
        keep: list[int] = []
        ids_list = ids.tolist()
        bad: list[tuple[str, int]] = []
        for i, sid in enumerate(ids_list):
            mark = None
            if seen is not None and sid >= 0:
                mark = seen["all"] if "all" in seen else seen.setdefault(wids[i], set())
                if _is_seen(mark, sid):
                    bad.append(("duplicate_id", shard[i]))
                    continue
            if isinstance(images[i], str):
                bad.append((images[i], shard[i]))
                continue
            if mark is not None:
                _mark(mark, sid)
            if flags[i] & NOT_JPEG:
                self.stats["image_not_jpeg"] += 1
            if flags[i] & CONVERTED:
                self.stats["image_converted"] += 1
            keep.append(i)
        shards = self.dataset.shards
        for reason, k in bad:  # the worker counted these good: each is bad for its reason, against its shard
            self.stats["ok"] -= 1
            samples.count_bad(self.stats, reason, shards[k] if k >= 0 else "?")
        imgs = self.transform([images[i] for i in keep], self._gen) if keep else None
        nb = self.device.type == "cuda"
        idx = torch.tensor(keep, dtype=torch.int64)
        toks, ids = toks[idx].to(self.device, non_blocking=nb), ids[idx].to(self.device, non_blocking=nb)
        if imgs is None:
            h, w = self.transform.image_size
            imgs = torch.empty(0, 3, h, w, device=self.device)
        return (imgs, toks, ids), full and len(keep) == len(ids_list)

    def _to_device(self, imgs, toks, ids):
        return imgs, toks, ids


def _is_seen(seen, sid: int) -> bool:
    if isinstance(seen, set):
        return sid in seen
    return bool(seen[sid >> 3] & (1 << (sid & 7)))


def _mark(seen, sid: int) -> None:
    if isinstance(seen, set):
        seen.add(sid)
    else:
        seen[sid >> 3] |= 1 << (sid & 7)


def device_transform_or_reason(transform) -> tuple[DeviceTransform | None, str | None]:
    """(the device transform, None), or (None, why the ``gpu`` backend cannot reproduce ``transform``)."""
    try:
        return DeviceTransform.from_transform(transform), None
    except ValueError as e:
        return None, str(e)
