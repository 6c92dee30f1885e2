"""The torch data loader: shards read with tarfile in DataLoader workers, decoded on the CPU.

Shards are split over (rank, worker) in a per-epoch shuffled order; each worker shuffles samples
in a buffer and yields full batches plus one remainder, which the main process merges so that an
epoch drops fewer than B samples per rank. Unreadable samples are skipped and counted by reason
and shard; the counts travel in-band with the batches and are summed in ``TorchLoader.stats``.

What counts as bad (skipped, ``bad_samples`` + a reason): an image that does not decode
(``corrupt_image``) or is smaller than ``MIN_IMAGE_SIDE`` pixels a side (``tiny_image``, e.g. the
1x1 placeholders of dead links), a missing field (``missing_field``), an id that is not 8 bytes
(``bad_id``), negative or >= the id range (``id_out_of_range``), an id seen before in this
worker's share of the epoch (``duplicate_id``, the first copy is kept), an empty or non-UTF-8
caption (``bad_caption``), a shard that is not a tar (``not_a_tar``) or ends early
(``truncated_tar``, the sample being read is lost). Mapped, not bad: grayscale, CMYK, palette or
alpha images are converted to RGB (``image_converted``), PNG/WebP/... data under any image key is
decoded by content (``image_not_jpeg``).
"""

from __future__ import annotations

import io
import logging
import os
import random
import signal
import tarfile
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dissect_fast.data.shards import TAR_ERRORS, decode_id, iter_tar_members, tokenizer_for

EOT_TOKEN = 49407  # open_clip's CLIP tokenizer end-of-text id
REQUIRED = ("jpg", "id")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MIN_IMAGE_SIDE = 8  #: smaller images are placeholders or tracking pixels, not training data
log = logging.getLogger("dissect_fast")


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


def iter_tar_samples(path: str, stats: Counter):
    """Yield dicts of raw fields grouped by key; a truncated or invalid tar ends early, counted."""
    current: dict | None = None
    members = 0
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for key, ext, _, data in iter_tar_members(tf):
                members += 1
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[ext] = data
    except TAR_ERRORS:
        reason = "truncated_tar" if members else "not_a_tar"
        stats[f"{reason}"] += 1
        stats[f"shard:{os.path.basename(path)}"] += 1
        current = None  # the sample being read when the tar broke is incomplete: dropped, counted
        stats["bad_samples"] += 1
    if current is not None:
        yield current


class ShardDataset(IterableDataset):
    """Decoded (image, tokens, id) batches from webdataset-style shards."""

    def __init__(
        self,
        shards: list[str],
        batch_size: int,
        transform,
        context_length: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 2000,
        subset_mask: np.ndarray | None = None,
        num_ids: int | None = None,
    ) -> None:
        unique = list(dict.fromkeys(shards))
        if len(unique) != len(shards):
            log.warning(
                "%d shard(s) are listed more than once (overlapping patterns?); each is read once",
                len(shards) - len(unique),
            )
        self.shards, self.batch_size, self.transform = unique, batch_size, transform
        self.context_length, self.train, self.seed = context_length, train, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.subset_mask, self.num_ids = subset_mask, num_ids
        self.epoch = 0
        self._tokenizer = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self, worker: int, num_workers: int) -> list[str]:
        order = list(self.shards)
        if self.train:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        return order[slot::slots]

    @staticmethod
    def _seen(sid: int, seen, mark: bool = False) -> bool:
        """Whether ``sid`` was already yielded this epoch (a bitmap when the id range is known); ``mark``
        records it. Only samples that decode are marked, so a bad first copy does not hide a good one."""
        if isinstance(seen, set):
            if mark:
                seen.add(sid)
            return sid in seen
        byte, bit = sid >> 3, 1 << (sid & 7)
        if mark:
            seen[byte] |= bit
        return bool(seen[byte] & bit)

    def decode(self, s: dict, stats: Counter, seen=None):
        """(image tensor, tokens int64, id) or None when the sample is unusable (counted)."""
        img_key = next((e for e in IMAGE_EXTS if e in s), None)
        if img_key is None or "id" not in s:
            stats["missing_field"] += 1
            return None
        try:
            sid = decode_id(s["id"])
        except ValueError:
            stats["bad_id"] += 1
            return None
        if sid < 0 or (self.num_ids is not None and sid >= self.num_ids):
            stats["id_out_of_range"] += 1
            return None
        if self.subset_mask is not None and not self.subset_mask[sid]:
            stats["not_in_subset"] += 1
            return None
        if seen is not None and self._seen(sid, seen):
            stats["duplicate_id"] += 1
            return None
        if "tok" in s:
            tok = fit_tokens(np.frombuffer(s["tok"], dtype="<i4"), self.context_length)
        else:
            try:
                text = s["txt"].decode("utf-8").strip()
            except (KeyError, UnicodeDecodeError):
                stats["bad_caption"] += 1
                return None
            if not text:
                stats["bad_caption"] += 1
                return None
            if self._tokenizer is None:
                self._tokenizer = tokenizer_for(self.context_length)
            tok = self._tokenizer([text], context_length=self.context_length)[0].numpy()
        try:
            with Image.open(io.BytesIO(s[img_key])) as im:
                im.load()
                if min(im.size) < MIN_IMAGE_SIDE:
                    stats["tiny_image"] += 1
                    return None
                if im.format != "JPEG":
                    stats["image_not_jpeg"] += 1
                if im.mode != "RGB":
                    stats["image_converted"] += 1
                img = self.transform(im.convert("RGB"))
        except Exception:  # noqa: BLE001 -- PIL raises many types on corrupt data
            stats["corrupt_image"] += 1
            return None
        if seen is not None:
            self._seen(sid, seen, mark=True)
        return img, torch.from_numpy(tok.astype(np.int64)), sid

    def _samples(self, shards: list[str], stats: Counter, rng: random.Random):
        buf = []
        seen = set() if self.num_ids is None else bytearray((self.num_ids + 7) // 8)
        for path in shards:
            for raw in iter_tar_samples(path, stats):
                filtered = stats["not_in_subset"]
                out = self.decode(raw, stats, seen)
                if out is None:
                    if stats["not_in_subset"] == filtered:  # unusable, not merely filtered out
                        stats["bad_samples"] += 1
                        stats[f"shard:{os.path.basename(path)}"] += 1
                    continue
                stats["ok"] += 1
                if not self.train or self.shuffle_buffer <= 1:
                    yield out
                    continue
                buf.append(out)
                if len(buf) >= self.shuffle_buffer:
                    j = rng.randrange(len(buf))
                    buf[j], buf[-1] = buf[-1], buf[j]
                    yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        stats: Counter = Counter()
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        batch: list = []
        for sample in self._samples(self.my_shards(worker, num_workers), stats, rng):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield ("batch", *_collate(batch))
                batch = []
        if batch:
            yield ("partial", *_collate(batch))
        yield ("stats", dict(stats))


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process: a Ctrl-C or a scheduler's SIGTERM to the
    whole process group must not kill them mid-epoch while the trainer finishes its step and saves.
    They still end with the main process (DataLoader's own watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _collate(samples):
    imgs, toks, ids = zip(*samples)
    return torch.stack(imgs), torch.stack(toks), torch.tensor(ids, dtype=torch.int64)


class TorchLoader:
    """Iterable of (images, tokens, ids) on ``device``; ``stats`` sums the skip counts of every pass
    since the last ``set_epoch`` (an epoch that re-reads its shards keeps the first pass's counts)."""

    def __init__(self, dataset: ShardDataset, workers: int, device: torch.device, drop_last: bool) -> None:
        self.dataset, self.workers, self.device, self.drop_last = dataset, workers, device, drop_last
        self.stats: Counter = Counter()
        self._active = None  # the DataLoader iterator of the pass in progress (its worker processes)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.stats = Counter()

    def close(self) -> None:
        """Stop the worker processes of an unfinished pass now (they ignore SIGTERM, see
        ``_ignore_stop_signals``, so they must be shut down through the DataLoader, not left to exit)."""
        it, self._active = self._active, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _to_device(self, imgs, toks, ids):
        nb = self.device.type == "cuda"
        return (
            imgs.to(self.device, non_blocking=nb),
            toks.to(self.device, non_blocking=nb),
            ids.to(self.device, non_blocking=nb),
        )

    def __iter__(self):
        if not self.dataset.train:  # evaluation passes are not bracketed by set_epoch
            self.stats = Counter()
        workers = min(self.workers, max(1, len(self.dataset.shards) // max(1, self.dataset.world_size)))
        dl = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        )
        B = self.dataset.batch_size
        pending: list[tuple] = []
        self._active = it = iter(dl)
        for kind, *rest in it:
            if kind == "stats":
                self.stats.update(rest[0])
            elif kind == "batch":
                yield self._to_device(*rest)
            else:
                pending.append(rest)
                n = sum(p[2].shape[0] for p in pending)
                if n >= B:
                    merged = [torch.cat(x) for x in zip(*pending)]
                    yield self._to_device(*(m[:B] for m in merged))
                    pending = [tuple(m[B:] for m in merged)] if n > B else []
        if pending and not self.drop_last:
            merged = [torch.cat(x) for x in zip(*pending)]
            if merged[2].numel():
                yield self._to_device(*merged)
        elif pending:
            self.stats["dropped_tail"] += sum(p[2].shape[0] for p in pending)
