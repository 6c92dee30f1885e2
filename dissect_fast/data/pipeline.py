"""A run's data: the training shards and their index, the id range, --subset, the epoch size, the loader
backend, the loaders, and the batches each step of an epoch reads. Everything the user can get wrong about the
data fails in the constructor, before any model work."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Any

import numpy as np
import torch

from dissect_fast.data.loader import ShardDataset, TorchLoader, eval_loader
from dissect_fast.data.shards import (
    DatasetIndex,
    count_mismatch,
    is_url,
    resolve_data,
    shard_stem,
)
from dissect_fast.data.synthetic_loader import (
    DEFAULT_BATCHES,
    SyntheticLoader,
    model_image_size,
)
from dissect_fast.training.distributed import DistInfo
from dissect_fast.training.reliability import RunStopped

log = logging.getLogger("dissect_fast")


class IndexMismatch(RunStopped):
    """What an epoch read contradicts the dataset index (index.json): the run stops with the command to fix it."""


class TrainData:
    """Shards, index and epoch geometry of a run (``build_loaders`` adds the loaders once the model exists)."""

    def __init__(self, cfg, dist: DistInfo, device: torch.device, tokenizer, model_name: str) -> None:
        self.cfg, self.dist, self.device, self.tokenizer = cfg, dist, device, tokenizer
        d, accum = cfg.data, cfg.optim.accum_freq
        self.synthetic = d.data_backend == "synthetic"
        self.train_shards: list[str]
        self.index: DatasetIndex | None
        if self.synthetic:
            self.train_shards, self.index = [], None
            if d.train_data:
                log.warning("--data-backend synthetic: --train-data %s is not read", d.train_data)
        else:
            self.train_shards, self.index = resolve_data(d.train_data, "--train-data", d.data_index)
            if tokenizer is not None and self.index is not None and self.index.has_tokens:
                log.warning(
                    "model %s does not use CLIP BPE: the shards' stored `tok` ids are ignored and captions "
                    "are tokenised from `txt` with its own tokenizer",
                    model_name,
                )
        self.val_shards: list[str] | None
        self.val_index: DatasetIndex | None
        self.val_shards, self.val_index = resolve_data(d.val_data, "--val-data") if d.val_data else (None, None)
        self.num_ids = self._num_ids()
        self.subset_mask, self.num_samples = self._subset_and_count()
        #: training samples an epoch may draw from: the subset, else the indexed data, else the epoch size
        self.pool_size = (
            int(self.subset_mask.sum())
            if self.subset_mask is not None
            else (self.index.num_samples if self.index is not None else self.num_samples)
        )
        available = self.index.num_samples if self.index is not None else None
        if self.subset_mask is not None:
            available = int(self.subset_mask.sum())
        #: an epoch is --train-num-samples samples, less than one pass over the data (or a resampled stream)
        self.partial_epochs = d.dataset_resampled or (
            d.train_num_samples is not None and available is not None and self.num_samples < available
        )
        #: optimizer steps per epoch (the LR schedule counts these); each reads --accum-freq batches
        self.accum = accum
        self.steps_per_epoch = self.num_samples // (d.batch_size * dist.world_size * accum)  # >= 1: preflight
        self.backend = self._backend()
        self._device_tf: dict = {}  #: the gpu backend's DeviceTransform per split (set by build_loaders)
        #: set by build_loaders: a TorchLoader, DaliLoader or SyntheticLoader (the val loader: None without --val-data)
        self.train_loader: Any = None
        self.val_loader: Any = None

    def clean_flags(self) -> np.ndarray | None:
        return self.index.clean_flags() if self.index is not None else None

    def _num_ids(self) -> int:
        d = self.cfg.data
        if self.synthetic:  # the ids are a permutation of [0, N) every epoch
            return d.train_num_samples or DEFAULT_BATCHES * d.batch_size * self.dist.world_size
        if self.index is not None:
            return self.index.num_ids
        return d.train_num_samples or 1  # no index: no history buffer and no --subset (preflight)

    def _subset_and_count(self) -> tuple[np.ndarray | None, int]:
        d = self.cfg.data
        if self.synthetic:
            return None, self.num_ids
        # an epoch size, a 1-D integer subset of unique ids in range: checked by preflight
        n = d.train_num_samples or (self.index.num_samples if self.index is not None else 0)
        if d.subset is None:
            return None, n
        ids = np.load(d.subset)
        mask = np.zeros(self.num_ids, dtype=bool)
        mask[ids] = True
        return mask, min(n, int(ids.size))

    def _backend(self) -> str:
        """The loader, logged in one line with the reason. ``auto``: DALI when the device is CUDA and DALI imports
        (and the shards are local files read once per epoch), else ``gpu`` (decode on the device) on CUDA, else the
        torch loader."""
        want = self.cfg.data.data_backend
        if want == "synthetic":
            return want
        cuda = self.device.type == "cuda"
        urls = any(is_url(s) for s in self.train_shards)
        if want in ("torch", "gpu"):
            choice, why = want, "--data-backend " + want
            if want == "gpu" and not cuda:
                why += f" on a {self.device.type} device: decoding there with the same code (for testing)"
        elif urls or self.cfg.data.dataset_resampled:
            choice = "gpu" if cuda else "torch"
            why = "auto: webdataset URLs or --dataset-resampled (DALI reads local files once per epoch)"
        else:
            from dissect_fast.data.dali_loader import dali_unavailable_reason

            reason = dali_unavailable_reason()
            if want == "dali":  # DALI imports: checked by preflight
                choice, why = "dali", "--data-backend dali"
            elif cuda and not reason:
                choice, why = "dali", "auto: CUDA device and DALI imports"
            elif cuda:
                choice, why = "gpu", f"auto: CUDA device, DALI not usable ({reason})"
            else:
                choice, why = "torch", f"auto: {self.device.type} device"
        log.info("data backend: %s (%s)", choice, why)
        return choice

    def _gpu_transforms(self, pre_train, pre_val) -> None:
        """The ``gpu`` backend's device transforms; ``auto`` falls back to the torch loader (logged) when the model's
        transform has a step the device cannot reproduce, ``--data-backend gpu`` stops with the reason."""
        from dissect_fast.data.device_decode import device_transform_or_reason

        for name, tf in (("train", pre_train), ("val", pre_val if self.val_shards else None)):
            if tf is None:
                continue
            dtf, reason = device_transform_or_reason(tf)
            if dtf is None:
                if self.cfg.data.data_backend == "gpu":
                    raise ValueError(reason)
                log.info("data backend: torch (auto: %s)", reason)
                self.backend = "torch"
                return
            self._device_tf[name] = dtf

    def build_loaders(self, model, pre_train, pre_val, context_length: int) -> None:
        """The training loader and, with --val-data, the validation loader (the model fixes image size,
        preprocessing and context length)."""
        self.context_length = context_length
        if self.backend == "gpu":
            self._gpu_transforms(pre_train, pre_val)
        self.train_loader = self._loader(self.train_shards, pre_train, True, model)
        self.val_loader = self._loader(self.val_shards, pre_val, False, model) if self.val_shards else None

    def _loader(self, shards, transform, train: bool, model):
        d, seed = self.cfg.data, self.cfg.run.seed
        if train and self.backend == "synthetic":
            return SyntheticLoader(
                self.num_samples,
                d.batch_size,
                model_image_size(model, transform),
                self.context_length,
                self.device,
                vocab_size=getattr(model, "vocab_size", 49408),
                seed=seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        if self.backend == "dali":
            from dissect_fast.data.dali_loader import DaliLoader, Preprocess

            return DaliLoader(
                shards,
                d.batch_size,
                self.context_length,
                Preprocess.from_transform(transform),
                train=train,
                device=self.device,
                seed=seed,
                rank=self.dist.rank if train else 0,
                world_size=self.dist.world_size if train else 1,
                workers=max(2, d.workers),
                index=self.index if train else self.val_index,
                subset_mask=self.subset_mask if train else None,
                num_ids=self.num_ids if train else None,
                tokenizer=self.tokenizer,
                max_image_pixels=d.max_image_pixels,
                max_member_bytes=d.max_member_bytes,
            )
        if self.backend == "gpu":
            return self._gpu_loader(shards, train)
        if not train:
            return eval_loader(
                shards,
                self.val_index,
                d.batch_size,
                transform,
                self.context_length,
                d.workers,
                self.device,
                tokenizer=self.tokenizer,
                max_image_pixels=d.max_image_pixels,
                max_member_bytes=d.max_member_bytes,
            )
        ds = ShardDataset(
            shards,
            d.batch_size,
            transform,
            self.context_length,
            train=True,
            seed=seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            subset_mask=self.subset_mask,
            num_ids=self.num_ids,
            first_ids=self.index.first_ids() if self.index is not None else None,
            resampled=d.dataset_resampled,
            tokenizer=self.tokenizer,
            max_image_pixels=d.max_image_pixels,
            max_member_bytes=d.max_member_bytes,
        )
        return TorchLoader(ds, d.workers, self.device, drop_last=True)

    def _gpu_loader(self, shards, train: bool):
        """The ``gpu`` backend: the torch loader's pipeline up to the encoded image, decoded on the device."""
        from dissect_fast.data.device_decode import DeviceDecodeLoader, EncodedShardDataset

        d, seed = self.cfg.data, self.cfg.run.seed
        index = self.index if train else self.val_index
        kw: dict = dict(train=False, need_ids=False)
        if train:
            kw = dict(
                train=True,
                seed=seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                subset_mask=self.subset_mask,
                num_ids=self.num_ids,
                resampled=d.dataset_resampled,
            )
        ds = EncodedShardDataset(
            shards,
            d.batch_size,
            None,
            self.context_length,
            first_ids=index.first_ids() if index is not None else None,
            tokenizer=self.tokenizer,
            max_image_pixels=d.max_image_pixels,
            max_member_bytes=d.max_member_bytes,
            **kw,
        )
        tf = self._device_tf["train" if train else "val"]
        return DeviceDecodeLoader(ds, tf, d.workers, self.device, drop_last=train, seed=seed, rank=self.dist.rank)

    def epoch_batches(self):
        """What each of the epoch's ``steps_per_epoch`` steps trains on: a batch, or with --accum-freq N the
        (images, tokens, ids) of N batches, each a tuple of N tensors."""
        batches = self._loader_batches()
        if self.accum == 1:
            yield from batches
            return
        while group := list(itertools.islice(batches, self.accum)):
            yield tuple(zip(*group))

    def _loader_batches(self):
        """Exactly ``steps_per_epoch`` x --accum-freq batches on every rank (DDP needs equal step counts): a rank
        whose shards run dry early (uneven shard counts) starts another pass over them, logged."""
        loader, n, wanted = self.train_loader, 0, self.steps_per_epoch * self.accum
        while n < wanted:
            got = 0
            before = Counter(loader.stats)  # the pass's own counts: an epoch that repeats its shards sums them
            it = iter(loader)
            for batch in it:
                yield batch
                got += 1
                n += 1
                if n >= wanted:
                    if self.partial_epochs:  # the rest of the pass is not read (nor decoded)
                        if hasattr(loader, "close"):
                            loader.close()
                        return
                    for _ in it:  # drain the tail (less than a batch per worker) so the last skip counts arrive
                        loader.stats["dropped_tail"] += self.cfg.data.batch_size
                    self._check_pass(loader, before)
                    return
            self._check_pass(loader, before)
            if got == 0:
                raise RuntimeError(
                    f"rank {self.dist.rank}: the training loader yielded no batch (too few shards "
                    f"for {self.dist.world_size} rank(s) x workers, or every sample unreadable)"
                )
            log.warning(
                "rank %d: shards ran out after %d of %d batches; repeating them (%d shards for %d rank(s) x %d "
                "worker(s): write >= 8 shards per rank and worker, e.g. `dissect-fast shards ... --world-size %d "
                "--workers %d`, or train with --dataset-resampled)",
                self.dist.rank,
                n,
                wanted,
                len(self.train_shards),
                self.dist.world_size,
                max(1, self.cfg.data.workers),
                self.dist.world_size,
                max(1, self.cfg.data.workers),
            )

    def _check_pass(self, loader, before: Counter) -> None:
        """After a complete pass of the torch loader over this rank's shards: what it read must match the shard
        counts of index.json (a wrong count would silently change the epoch's length). The DALI loader checks its
        ``.idx`` files against the index when it is built."""
        if self.index is None or self.partial_epochs or not isinstance(loader, TorchLoader):
            return
        counts = {shard_stem(s.path): s.count for s in self.index.shards}
        expected = sum(counts.get(shard_stem(s["url"]), 0) for s in loader.dataset._shard_order())
        msg = count_mismatch(expected, loader.stats - before)
        if msg is not None:
            raise IndexMismatch(f"--train-data: rank {self.dist.rank}: {msg}")

    def close(self) -> None:
        """Stop the loaders' workers."""
        for loader in (self.train_loader, self.val_loader):
            if hasattr(loader, "close"):
                loader.close()
