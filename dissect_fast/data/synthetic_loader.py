"""``--data-backend synthetic``: random batches made once on the training device, fresh ids every step.

For timing the real training loop without any loader cost (open_clip's ``--dataset-type synthetic``
serves the same purpose, but draws PIL images through its CPU pipeline). A pool of a few batches is
drawn once and cycled: images standard normal (like normalised pixels) at the model's image size,
tokens laid out like open_clip's tokenizer output (SOT, random BPE ids, EOT at a random position,
zeros after). The ids are what the selection sees, so they are real: every epoch a fresh permutation
of [0, N) split over the ranks, so each id is trained or scored once per epoch on exactly one rank,
and the history buffer gets a real data set's access pattern. All of it runs on the device: a step
costs a slice, no host work and no synchronisation. Deterministic from the seed and the epoch.
"""

from __future__ import annotations

from collections import Counter

import torch

#: epoch size without --train-num-samples: this many steps (N = DEFAULT_BATCHES x batch size x ranks)
DEFAULT_BATCHES = 100
#: open_clip's start/end-of-text token ids (the text tower pools at the EOT: the largest id of a row)
SOT_TOKEN, EOT_TOKEN = 49406, 49407


def model_image_size(model: torch.nn.Module, transform=None) -> tuple[int, int]:
    """(height, width) the model's image tower takes: ``model.visual.image_size``, else the first sized step
    of ``transform`` (open_clip's preprocess)."""
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if size is None:
        size = next((t.size for t in getattr(transform, "transforms", []) if getattr(t, "size", None)), None)
    if size is None:
        raise ValueError(
            "--data-backend synthetic: cannot tell the model's image size (no model.visual.image_size "
            "and no sized step in its preprocess); use --data-backend torch with real shards"
        )
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def random_tokens(
    rows: int, context_length: int, vocab_size: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """[rows, context_length] int64 like open_clip's tokenizer: SOT, ids in [1, SOT), EOT, then zeros."""
    if context_length < 2:
        raise ValueError(f"synthetic tokens need a context length >= 2 (SOT and EOT), got {context_length}")
    eot = min(EOT_TOKEN, vocab_size - 1)  # a smaller vocabulary: its top two ids play SOT and EOT
    sot = eot - 1
    tok = torch.randint(1, sot, (rows, context_length), generator=generator, device=device)
    tok[:, 0] = sot
    end = torch.randint(1, context_length, (rows, 1), generator=generator, device=device)
    pos = torch.arange(context_length, device=device)
    tok = torch.where(pos < end, tok, torch.zeros((), dtype=tok.dtype, device=device))
    return tok.scatter_(1, end, eot)


class SyntheticLoader:
    """The loader interface the trainer uses (``set_epoch``, iteration, ``stats``, ``close``) over random data.

    Args:
        num_samples: N, the epoch size and the id range; an epoch is N // (batch_size x world_size) steps.
        batch_size: per-rank batch size B.
        image_size: (height, width) of the images (``model_image_size``).
        context_length, vocab_size: the tokens' shape and id range (the model's).
        device: where everything is made and stays.
        seed: the pool from (seed, rank), each epoch's id permutation from (seed, epoch): the same on every rank.
        rank, world_size: which share of each step's ids this rank takes.
        pool_batches: distinct batches drawn once and cycled (fewer when they would exceed ``max_pool_bytes``).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        image_size: tuple[int, int],
        context_length: int,
        device: torch.device,
        *,
        vocab_size: int = 49408,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pool_batches: int = 4,
        max_pool_bytes: int = 2 << 30,
    ) -> None:
        self.steps = num_samples // (batch_size * world_size)
        if self.steps < 1:
            raise ValueError(
                f"--train-num-samples {num_samples} makes no full batch of --batch-size {batch_size} "
                f"x {world_size} rank(s): raise it, or lower the batch size"
            )
        self.num_samples, self.batch_size, self.device = num_samples, batch_size, device
        self.seed, self.rank, self.world_size = seed, rank, world_size
        h, w = image_size
        batch_bytes = batch_size * 3 * h * w * 4
        self.pool = max(1, min(pool_batches, self.steps, max_pool_bytes // batch_bytes))
        g = torch.Generator(device=device)
        g.manual_seed(seed * 1_000_003 + rank)
        self.images = torch.randn((self.pool, batch_size, 3, h, w), generator=g, device=device)
        self.tokens = random_tokens(self.pool * batch_size, context_length, vocab_size, g, device).view(
            self.pool, batch_size, context_length
        )
        self.epoch = 0
        self.stats: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stats = Counter()

    def epoch_ids(self) -> torch.Tensor:
        """[steps, B] ids of this rank's steps in the current epoch: row i of step i's permutation slice."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g, device=self.device)
        used = perm[: self.steps * self.world_size * self.batch_size]
        return used.view(self.steps, self.world_size, self.batch_size)[:, self.rank].contiguous()

    def __iter__(self):
        ids = self.epoch_ids()
        for i in range(self.steps):
            j = i % self.pool
            self.stats["ok"] += self.batch_size
            yield self.images[j], self.tokens[j], ids[i]

    def __len__(self) -> int:
        return self.steps

    def close(self) -> None:
        """Nothing to stop: no workers, no files."""
