"""The torch data loader: a webdataset pipeline in DataLoader workers, images decoded on the CPU.

Per worker, one ``webdataset.DataPipeline``:

1. **shard list**: the shards in a per-epoch shuffled order (seed, epoch), split by rank, then by
   worker (``webdataset.split_by_worker``); or, with ``resampled`` (``--dataset-resampled``),
   ``webdataset.ResampledShards``: shards drawn with replacement, seeded by (seed, epoch, rank, worker);
2. **open**: ``webdataset``'s ``url_opener`` (local paths, ``pipe:`` commands, ``http(s)://``, ...);
3. **tar to samples**: :func:`dissect_fast.data.samples.iter_shard` (webdataset's grouping rules, plus
   the sample's position in its tar, which assigned ids need, and counted truncation);
4. **decode**: the shared sample rules (:mod:`dissect_fast.data.samples`): bad samples are skipped and
   counted by reason and shard, ids assigned from the dataset index's ``first_id`` where the shard has none;
5. ``webdataset.shuffle`` (training) and ``webdataset.batched``.

**uint8 batches.** An open_clip transform (PIL steps, then ``ToTensor`` + ``Normalize``) is split by
:func:`split_uint8`: workers run the PIL steps and ship uint8 [B, 3, H, W] (150,528 bytes a 224 px sample instead of
602,112 as float32, through ``/dev/shm``, pinned memory and the host-to-device copy); the training process
normalises on the device (:func:`normalize_uint8`, the same float ops as ``ToTensor`` + ``Normalize``, so the
batch is bit-identical on the CPU). A transform with tensor steps after ``ToTensor`` (e.g. timm's RandomErasing),
or any callable that is not such a ``Compose``, keeps the float path: workers ship its float32 output.
The ``gpu`` data backend (:mod:`dissect_fast.data.device_decode`) subclasses both classes here: its workers ship
the encoded bytes and the training process decodes.

Each worker yields full batches and one remainder, which the main process merges so that an epoch
drops fewer than B samples per rank. Skip counts travel in-band with every batch and are summed in
``TorchLoader.stats``, so an epoch cut short (``--train-num-samples`` below the data size, or a resampled
stream) still reports what it read.
"""

from __future__ import annotations

import functools
import logging
import random
import signal
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import url_opener

from dissect_fast.data import samples
from dissect_fast.data.samples import BadSample, fit_tokens
from dissect_fast.data.shards import shard_stem, tokenizer_for

log = logging.getLogger("dissect_fast")


def _worker_seed(rank: int) -> int:
    info = get_worker_info()
    return rank * 1_000_003 + (info.id if info else 0)


class _Counting:
    """webdataset handler: an exception while opening a shard is counted against it, and the pipeline goes on."""

    def __init__(self, stats: Counter) -> None:
        self.stats = stats

    def __call__(self, exn: Exception) -> bool:
        url = next((a for a in reversed(exn.args) if isinstance(a, str)), "?")
        samples.count_bad(self.stats, "not_a_tar", url)
        log.warning("cannot read shard %s: %s", url, exn)
        return True


class _ToUint8:
    """PIL image -> uint8 [3, H, W] tensor (``ToTensor`` without the division: the device divides and normalises)."""

    def __call__(self, pic) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        return pic if isinstance(pic, torch.Tensor) else pil_to_tensor(pic)


def split_uint8(transform) -> tuple[object, tuple[float, ...], tuple[float, ...]] | None:
    """(worker transform to uint8, mean, std) of a ``Compose`` of PIL steps, then ``ToTensor``/``MaybeToTensor``,
    then ``Normalize`` (open_clip's train and eval transforms); None for anything else (the float path)."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or not isinstance(steps[-2], T.ToTensor):
        return None
    norm = steps[-1]
    mean = tuple(float(m) for m in torch.as_tensor(norm.mean).flatten())
    std = tuple(float(x) for x in torch.as_tensor(norm.std).flatten())
    if len(mean) != 3 or len(std) != 3:
        return None
    return T.Compose([*steps[:-2], _ToUint8()]), mean, std


def normalize_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised, on the images' device: ``ToTensor``'s ``/ 255`` then ``Normalize``'s
    ``(x - mean) / std``, the same float ops in the same order (bit-identical to the worker float path on a CPU)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32).div_(255).sub_(m).div_(s)


class ShardDataset(IterableDataset):
    """Decoded (image, tokens, id) batches from webdataset shards (paths or URLs).

    Args:
        shards: shard paths or webdataset URLs.
        batch_size, transform, context_length: what a batch holds (transform: the model's preprocess).
        train: shuffle shards and samples; else read in order.
        seed, rank, world_size: order and split (eval loaders use rank 0 of 1).
        shuffle_buffer: samples in webdataset's shuffle buffer.
        subset_mask: bool by id; samples outside are skipped (``not_in_subset``, not bad).
        num_ids: id range (ids outside are ``id_out_of_range``); None: only id >= 0 is checked.
        first_ids: {shard name: first id} from the dataset index for shards without an ``id`` field.
        need_ids: a sample without an id (no field, no first id) is bad (``missing_field``; shards that have no
            ids at all are refused before training by ``shards.check_ids_known``); False (evaluation): id -1.
        resampled: draw shards with replacement, endlessly (the caller decides where an epoch ends).
        tokenizer: the model's own tokenizer when it is not CLIP BPE (``model.text_tokenizer``): captions are then
            tokenised from ``txt`` and stored ``tok`` ids (CLIP BPE) are ignored; None: stored ``tok`` ids, else
            CLIP BPE on ``txt``.
        max_image_pixels, max_member_bytes: the bounded-cost limits (``image_too_large``, ``member_too_large``;
            see :mod:`dissect_fast.data.samples`).
    """

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
        first_ids: dict[str, int] | None = None,
        need_ids: bool = True,
        resampled: bool = False,
        tokenizer=None,
        max_image_pixels: int = samples.MAX_IMAGE_PIXELS,
        max_member_bytes: int = samples.MAX_MEMBER_BYTES,
    ) -> None:
        if len(set(shards)) != len(shards):
            raise ValueError("ShardDataset: shards listed more than once")
        self.shards, self.batch_size, self.transform = list(shards), batch_size, transform
        self.context_length, self.train, self.seed = context_length, train, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.subset_mask, self.num_ids = subset_mask, num_ids
        self.first_ids, self.need_ids, self.resampled = dict(first_ids or {}), need_ids, resampled
        self.epoch = 0
        self._tokenizer = tokenizer
        self.stored_tokens = tokenizer is None  #: stored ``tok`` ids are CLIP BPE: only a CLIP BPE model reads them
        self.max_image_pixels, self.max_member_bytes = max_image_pixels, max_member_bytes
        split = split_uint8(transform)
        #: (mean, std) the training process normalises uint8 batches with; None: workers ship the float transform's output
        self.normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._worker_transform = transform
        if split is not None:
            self._worker_transform, mean, std = split
            self.normalize = (mean, std)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ------------------------------------------------------------------ pipeline stages
    def _shard_order(self) -> list[dict]:
        order = list(self.shards)
        if self.train:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return [{"url": u} for u in order[self.rank :: self.world_size]]

    def _source(self):
        if self.resampled:
            return wds.ResampledShards(
                self.shards,
                seed=self.seed * 1_000_003 + self.epoch,
                deterministic=True,
                worker_seed=functools.partial(_worker_seed, self.rank),
            )
        return [self._shard_order, wds.split_by_worker]

    def _groups(self, stats: Counter):
        limit = max(10, 2 * len(self.shards))  # a resampled stream of unreadable shards would spin forever

        def stage(opened):
            empty = 0
            for src in opened:
                try:
                    n = 0
                    for s in samples.iter_shard(
                        src["stream"], src["url"], stats, max_member_bytes=self.max_member_bytes
                    ):
                        n += 1
                        yield s
                    empty = 0 if n else empty + 1
                    if empty >= limit:
                        raise RuntimeError(
                            f"no sample in the last {empty} shards read (e.g. {src['url']}): check --train-data"
                        )
                finally:
                    try:
                        src["stream"].close()
                    except Exception as e:  # noqa: BLE001 -- a pipe: command that failed reports it here
                        log.warning("shard %s: %s", src["url"], e)

        return stage

    def _decoded(self, stats: Counter):
        seen = None
        if not self.resampled:  # resampling repeats samples by design
            seen = set() if self.num_ids is None else bytearray((self.num_ids + 7) // 8)

        def stage(groups):
            for s in groups:
                try:
                    out = self.decode(s, stats, seen)
                except BadSample as e:
                    samples.count_bad(stats, e.reason, s["__url__"])
                    continue
                if out is not None:
                    stats["ok"] += 1
                    yield out

        return stage

    def decode(self, s: dict, stats: Counter, seen=None):
        """(image tensor, tokens int64, id), None when filtered by the subset; BadSample when unusable."""
        first = self.first_ids.get(shard_stem(s["__url__"]))
        sid = samples.check_fields(s, first, self.num_ids, need_id=self.need_ids)
        if sid is None:  # evaluation: the id is not needed
            sid = -1
        if self.subset_mask is not None and not self.subset_mask[sid]:
            stats["not_in_subset"] += 1
            return None
        if sid < 0:
            seen = None  # an evaluation sample without id: nothing to check
        repeat = seen is not None and _seen(sid, seen)
        if repeat and not self.defer_repeats:
            raise BadSample("duplicate_id")
        use_tok = "tok" in s and self.stored_tokens
        if not use_tok and "txt" not in s:  # a `tok`-only sample and a model whose tokenizer is not CLIP BPE
            raise BadSample("missing_field")
        img = self.image(s[samples.image_field(s)], stats, repeat)
        if use_tok:
            tok = fit_tokens(np.frombuffer(s["tok"], dtype="<i4"), self.context_length)
        else:
            if self._tokenizer is None:
                self._tokenizer = tokenizer_for(self.context_length)
            text = samples.bounded_caption(s, self.context_length, stats)  # bounded cost: cut, counted
            tok = self._tokenizer([text], context_length=self.context_length)[0].numpy()
        if seen is not None:  # only samples that decode are marked, so a bad first copy does not hide a good one
            _seen(sid, seen, mark=True)
        return img, torch.from_numpy(tok.astype(np.int64)), sid

    #: a repeated id is passed on (the ``gpu`` backend judges it after decoding) instead of counted ``duplicate_id``
    defer_repeats = False

    def image(self, data: bytes, stats: Counter, repeat: bool):
        """What a sample's image becomes in the worker: the transform's output (uint8 when split, see
        :func:`split_uint8`); BadSample when the bytes are unusable."""
        return self._worker_transform(samples.decode_image(data, stats, self.max_image_pixels))

    def collate(self, batch):
        """A list of decoded samples -> the tuple a batch travels as (ids last)."""
        return _collate(batch)

    def pipeline(self, stats: Counter) -> wds.DataPipeline:
        """This worker's pipeline; ``stats`` receives the skip counts. Samples are shuffled as raw bytes,
        before decoding (a buffer of decoded 224 px images would cost 0.6 MB each)."""
        source = self._source()
        stages = source if isinstance(source, list) else [source]
        stages += [functools.partial(url_opener, handler=_Counting(stats)), self._groups(stats)]
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(hash((self.seed, self.epoch, self.rank, _worker_seed(self.rank))))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        stages.append(self._decoded(stats))
        stages.append(wds.batched(self.batch_size, collation_fn=self.collate, partial=True))
        return wds.DataPipeline(*stages)

    def __iter__(self):
        stats: Counter[str] = Counter()
        sent: Counter[str] = Counter()
        for batch in self.pipeline(stats):
            delta = stats - sent  # the counts since the last batch travel with this one
            sent.update(delta)
            yield ("batch" if batch[-1].shape[0] == self.batch_size else "partial", *batch, dict(delta))
        yield ("stats", dict(stats - sent))  # whatever was counted after the last batch


def _collate(batch):
    imgs, toks, ids = zip(*batch)
    return torch.stack(imgs), torch.stack(toks), torch.tensor(ids, dtype=torch.int64)


def _seen(sid: int, seen, mark: bool = False) -> bool:
    """Whether ``sid`` was already yielded this epoch (a bitmap when the id range is known); ``mark`` records it."""
    if isinstance(seen, set):
        if mark:
            seen.add(sid)
        return sid in seen
    byte, bit = sid >> 3, 1 << (sid & 7)
    if mark:
        seen[byte] |= bit
    return bool(seen[byte] & bit)


def _first_copies(ids: np.ndarray, seen: np.ndarray) -> np.ndarray | None:
    """Marks ``ids`` in the bitmap ``seen``; None when all are new, else the mask of the first copies to keep."""
    ids = ids.astype(np.int64, copy=False)
    byte, bit = ids >> 3, (1 << (ids & 7)).astype(np.uint8)
    new = (seen[byte] & bit) == 0
    first = np.zeros(len(ids), dtype=bool)
    first[np.unique(ids, return_index=True)[1]] = True
    keep = new & first
    np.bitwise_or.at(seen, byte[keep], bit[keep])
    return None if keep.all() else keep


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process: a Ctrl-C or a scheduler's SIGTERM to the
    whole process group must not kill them mid-epoch while the trainer finishes its step and saves.
    They still end with the main process (DataLoader's own watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TorchLoader:
    """Iterable of (images, tokens, ids) on ``device``; ``stats`` sums the skip counts of every pass
    since the last ``set_epoch`` (an epoch that re-reads its shards keeps the first pass's counts)."""

    def __init__(self, dataset: ShardDataset, workers: int, device: torch.device, drop_last: bool) -> None:
        self.dataset, self.workers, self.device, self.drop_last = dataset, workers, device, drop_last
        self.stats: Counter = Counter()
        self._active: Iterator | None = None  # the DataLoader iterator of the pass in progress (its worker processes)

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
        """A merged batch on the device; uint8 images normalised there (``ShardDataset.normalize``)."""
        nb = self.device.type == "cuda"
        imgs = imgs.to(self.device, non_blocking=nb)
        if self.dataset.normalize is not None and imgs.dtype == torch.uint8:
            imgs = normalize_uint8(imgs, *self.dataset.normalize)
        return (imgs, toks.to(self.device, non_blocking=nb), ids.to(self.device, non_blocking=nb))

    def _prepare(self, batch: list, full: bool, seen) -> tuple[tuple, bool]:
        """A worker's batch as this loader merges it, and whether it is still a full batch: here the ids another
        worker already yielded are dropped (counted ``duplicate_id``)."""
        if seen is not None:
            keep = _first_copies(batch[2].numpy(), seen)
            if keep is not None:  # an id another worker already yielded: dropped, counted, the batch refilled
                n_dup = int((~keep).sum())
                self.stats["duplicate_id"] += n_dup
                self.stats["bad_samples"] += n_dup
                self.stats["ok"] -= n_dup  # the worker counted it good
                return tuple(x[torch.from_numpy(keep)] for x in batch), False
        return tuple(batch), full

    def _seen_ids(self, workers: int):
        """The ids yielded in this pass, kept on the main process (a bitmap by id): each worker drops the
        duplicates it sees itself, but two workers reading shards with overlapping ids cannot see each other's.
        None when no check is needed: one worker, a resampled stream (repeats by design), or evaluation."""
        ds = self.dataset
        if workers < 2 or ds.resampled or not ds.train or ds.num_ids is None:
            return None
        return np.zeros((ds.num_ids + 7) // 8, dtype=np.uint8)

    def _num_workers(self) -> int:
        ds = self.dataset
        if ds.resampled:
            return self.workers
        return min(self.workers, max(1, len(ds.shards) // max(1, ds.world_size)))

    def _dataloader(self, workers: int) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        )

    def __iter__(self):
        """Batches of exactly B (the last one smaller only without ``drop_last``): a worker's full batch goes
        through as it is, remainders and batches that lost samples are merged."""
        if not self.dataset.train:  # evaluation passes are not bracketed by set_epoch
            self.stats = Counter()
        workers = self._num_workers()
        B = self.dataset.batch_size
        pending: list[tuple] = []
        seen = self._seen_ids(workers)
        self._active = it = iter(self._dataloader(workers))
        for kind, *rest in it:
            self.stats.update(rest[-1])
            if kind == "stats":
                continue
            batch, full = self._prepare(rest[:-1], kind == "batch", seen)
            if full:
                yield self._to_device(*batch)
                continue
            pending.append(batch)
            n = sum(p[-1].shape[0] for p in pending)
            if n >= B:
                merged = [torch.cat(x) for x in zip(*pending)]
                yield self._to_device(*(m[:B] for m in merged))
                pending = [tuple(m[B:] for m in merged)] if n > B else []
        self._active = None
        if pending and not self.drop_last:
            merged = [torch.cat(x) for x in zip(*pending)]
            if merged[-1].numel():
                yield self._to_device(*merged)
        elif pending:
            self.stats["dropped_tail"] += sum(p[-1].shape[0] for p in pending)


def eval_loader(
    shards: list[str],
    index,
    batch_size: int,
    transform,
    context_length: int,
    workers: int,
    device: torch.device,
    need_ids: bool = False,
    tokenizer=None,
    max_image_pixels: int = samples.MAX_IMAGE_PIXELS,
    max_member_bytes: int = samples.MAX_MEMBER_BYTES,
) -> TorchLoader:
    """An in-order loader over every sample (evaluation, ``embed``): ids from the index where the shards have
    none; without one such samples get id -1 (retrieval metrics need no ids), or are bad with ``need_ids``.
    ``tokenizer``: as ShardDataset's (the model's own when it is not CLIP BPE)."""
    ds = ShardDataset(
        shards,
        batch_size,
        transform,
        context_length,
        train=False,
        first_ids=index.first_ids() if index is not None else None,
        need_ids=need_ids,
        tokenizer=tokenizer,
        max_image_pixels=max_image_pixels,
        max_member_bytes=max_member_bytes,
    )
    return TorchLoader(ds, workers, device, drop_last=False)
