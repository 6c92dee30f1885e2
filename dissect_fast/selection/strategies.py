"""The online selection strategies of METHOD.md, keyed by name and by the reference code's alias.

A strategy answers two questions per step: does this step need a scoring pass over the whole
batch, and which k batch positions are trained on. Everything runs on the training device with
no host synchronisation and no Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dissect_fast.kernels.fused_select import fused_select
from dissect_fast.selection.history import HISTORY_DTYPES, HistoryBuffer, float32_window


def topk_positions(key: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest keys, descending by key; ties go to the smaller position.

    A stable descending sort keeps equal keys in position order, which is the tie rule.
    """
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=key.device)
    order = torch.sort(key, descending=True, stable=True).indices
    return order[:k]


def scaled_cosines(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """scale * cos(f_i, g_i) in float32, not clamped: clipscore's ranking key (METHOD.md)."""
    f = F.normalize(image_features.float(), dim=-1)
    g = F.normalize(text_features.float(), dim=-1)
    return scale * (f * g).sum(-1)


def clip_scores(image_features: torch.Tensor, text_features: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """CLIPScore s_i = max(0, scale * cos(f_i, g_i)) in float32."""
    return scaled_cosines(image_features, text_features, scale).clamp_min(0.0)


def per_sample_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE loss of every pair inside the local batch, with the learned logit scale."""
    f = F.normalize(image_features.float(), dim=-1)
    g = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float() * f @ g.t()
    labels = torch.arange(f.shape[0], device=f.device)
    li = F.cross_entropy(logits, labels, reduction="none")
    lt = F.cross_entropy(logits.t(), labels, reduction="none")
    return 0.5 * (li + lt)


def per_sample_sigmoid_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's loss of every image inside the local batch: its row of the sigmoid loss,
    ``l_i = -sum_j log sigmoid(z_ij * (t * cos(f_i, g_j) + b))`` with z_ii = 1, z_ij = -1 (j != i), t the learned
    logit scale (exp'd) and b the learned bias. The rows sum to open_clip's SigLipLoss times the batch size."""
    f = F.normalize(image_features.float(), dim=-1)
    g = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float() * f @ g.t() + logit_bias.float()
    z = 2.0 * torch.eye(f.shape[0], device=f.device) - 1.0
    return -F.logsigmoid(z * logits).sum(dim=1)


@dataclass
class Selection:
    """What a step trains on, and what it measured (for diagnostics)."""

    index: torch.Tensor | None  #: batch positions to train on; None = the whole batch
    score: torch.Tensor | None = None  #: CLIPScore of every sample of ``scored_ids``
    delta: torch.Tensor | None = None  #: the DISSect differential of every batch sample, when the strategy has one
    #: the ids ``score`` belongs to: the whole batch after a scoring pass, the trained ids when the training
    #: forward scored them (``Strategy.update``); None while nothing was scored
    scored_ids: torch.Tensor | None = None


def score_and_select(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ids: torch.Tensor,
    history: torch.Tensor | None,
    k: int,
    *,
    momentum: float | None,
    key: str,
    scale: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score, differential, in-place history update and top-k: the op the fused kernel implements.

    Delegates to ``dissect_fast.kernels.fused_select`` (Triton on CUDA, torch reference elsewhere).
    """
    if history is not None and history.dtype != torch.float32:  # --history-dtype bf16: the op works in float32
        win = float32_window(history, ids)
        out = fused_select(
            image_features,
            text_features,
            win.positions,
            win.values,
            k,
            momentum=momentum,
            scale=scale,
            key=key,
            backend=backend,
        )
        if momentum is not None:
            win.write_back()
        return out
    return fused_select(
        image_features, text_features, ids, history, k, momentum=momentum, scale=scale, key=key, backend=backend
    )


Gather = Callable[[torch.Tensor], torch.Tensor]


class Strategy:
    """Per-step selection policy and the owner of its history buffer. Subclasses set the class attributes and
    implement ``select``.

    One batch: ``select`` (scoring pass features -> what to train), then ``update`` once the trained sub-batch's
    features are known: it fills in the scores when no scoring pass ran and brings the history up to date.
    Single process (no ``gather``): the fused selection op updates the buffer in place during ``select``.
    Several ranks (``gather`` = all-gather-and-concatenate over the ranks): ``select`` only reads the buffer and
    ``update`` applies every rank's (id, score) pairs, so all replicas stay identical.
    """

    name = "full"
    history_momentum: float | None = None

    def __init__(
        self, k: int, batch_size: int, num_ids: int, device: torch.device, cfg, gather: Gather | None = None
    ) -> None:
        self.k, self.batch_size, self.cfg = k, batch_size, cfg
        dtype = HISTORY_DTYPES[getattr(cfg, "history_dtype", "fp32")]
        self.history = HistoryBuffer(num_ids, device, dtype) if self.uses_history else None
        self.gather = gather

    uses_history = False

    @property
    def local_updates(self) -> bool:
        """Whether the selection op updates the history in place (single process)."""
        return self.gather is None

    def _inplace_momentum(self, epoch: int) -> float | None:
        """The momentum the selection op applies in place: this epoch's update in a single process, else None."""
        return self.history_updates(epoch) if self.local_updates else None

    def _score_select(self, *args, momentum: float | None, **kw):
        """`score_and_select` (image_features, text_features, ids, history, k, ...) with this run's selection backend
        (--select-backend). When the op writes the history in place (``momentum`` given), the entries it overwrites
        are staged first: a step that is then skipped leaves them as they were (``commit_step``)."""
        if momentum is not None and self.history is not None:
            self.history.stage(args[2])
        return score_and_select(*args, momentum=momentum, backend=getattr(self.cfg, "backend", "auto"), **kw)

    def begin_step(self) -> None:
        """Before a step's selection: from here its history writes are staged (see ``commit_step``)."""
        if self.history is not None:
            self.history.begin()

    def commit_step(self, applied: torch.Tensor) -> None:
        """After the optimizer step: the step's history writes stay only where the device flag ``applied`` is
        true (the step was not skipped as non-finite), else every entry it wrote is put back bit for bit. Score,
        then commit: a skipped step leaves the history as it found it, on every rank (``applied`` is agreed
        across ranks, and every rank staged the same all-gathered ids). No host synchronisation."""
        if self.history is not None:
            self.history.commit(applied)

    def needs_scoring(self, epoch: int) -> bool:
        """Whether this step needs the no-grad scoring forward over the whole batch."""
        return False

    def trains_full_batch(self, epoch: int) -> bool:
        return False

    def select(self, epoch, ids, feats, logit_scale, scale, generator) -> Selection:
        raise NotImplementedError

    def history_updates(self, epoch: int) -> float | None:
        """Momentum of the history update this epoch (None: no update)."""
        return None

    def observe(self, epoch: int, ids: torch.Tensor, feats: tuple[torch.Tensor, torch.Tensor], scale) -> torch.Tensor:
        """The CLIPScores of the trained ``ids`` from the training forward's detached features (no scoring pass
        ran); strategies that record from training features update the history here in a single process."""
        return clip_scores(*feats, scale)

    def update(self, epoch: int, sel: Selection, trained_ids: torch.Tensor, train_feats, scale) -> Selection:
        """After the training forward: ``sel`` with ``score``/``scored_ids`` set (from ``train_feats`` when no
        scoring pass ran) and the history brought up to date on every rank. No host synchronisation."""
        if sel.score is None:
            sel.score, sel.scored_ids = self.observe(epoch, trained_ids, train_feats, scale), trained_ids
        m = self.history_updates(epoch)
        if self.gather is not None and m is not None and self.history is not None:
            assert sel.scored_ids is not None  # set with sel.score
            self.history.update(self.gather(sel.scored_ids), self.gather(sel.score.float()), m)
        return sel

    def epoch_metrics(self, epoch: int, num_samples: int) -> dict:
        """Strategy-specific metrics at the end of an epoch (one host read at most; most epochs: none)."""
        return {}

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict()} if self.history is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.history is not None:
            self.history.load_state_dict(state["history"])


class Full(Strategy):
    name = "full"

    def trains_full_batch(self, epoch: int) -> bool:
        return True

    def select(self, epoch, ids, feats, logit_scale, scale, generator) -> Selection:
        return Selection(index=None)


class Random(Strategy):
    name = "random"

    def select(self, epoch, ids, feats, logit_scale, scale, generator) -> Selection:
        perm = torch.randperm(ids.shape[0], device=ids.device, generator=generator)
        return Selection(index=perm[: self.k])


class ClipScore(Strategy):
    name = "clipscore"

    def needs_scoring(self, epoch: int) -> bool:
        return True

    def select(self, epoch, ids, feats, logit_scale, scale, generator) -> Selection:
        index, score, _ = self._score_select(*feats, ids, None, self.k, momentum=None, key="score", scale=scale)
        return Selection(index=index, score=score, scored_ids=ids)


class _LossBased(Strategy):
    sign = 1.0
    #: --siglip: the model's logit bias (a detached view of the parameter, so it follows the optimizer's in-place
    #: updates), set by the trainer; the per-sample loss is then the sigmoid one. None: symmetric InfoNCE.
    sigmoid_bias: torch.Tensor | None = None

    def needs_scoring(self, epoch: int) -> bool:
        return True

    def per_sample_loss(self, feats: tuple[torch.Tensor, torch.Tensor], logit_scale: torch.Tensor) -> torch.Tensor:
        """The loss the ranking uses: it follows the training loss (InfoNCE, or sigmoid under --siglip)."""
        if self.sigmoid_bias is not None:
            return per_sample_sigmoid_loss(*feats, logit_scale, self.sigmoid_bias)
        return per_sample_clip_loss(*feats, logit_scale)

    def select(self, epoch, ids, feats: tuple[torch.Tensor, torch.Tensor], logit_scale, scale, generator) -> Selection:
        loss = self.per_sample_loss(feats, logit_scale)
        return Selection(
            index=topk_positions(self.sign * loss, self.k), score=clip_scores(*feats, scale), scored_ids=ids
        )


class SmallLoss(_LossBased):
    name = "small_loss"
    sign = -1.0


class BigLoss(_LossBased):
    name = "big_loss"
    sign = 1.0


class DissectMomentum(Strategy):
    """Keep the largest delta = h[id] - s; then h <- beta * h + (1 - beta) * s (h <- s when unseen)."""

    name = "dissect-momentum"
    uses_history = True
    history: HistoryBuffer  # always set: uses_history

    def needs_scoring(self, epoch: int) -> bool:
        return True

    def history_updates(self, epoch: int) -> float | None:
        return self.cfg.momentum

    def select(self, epoch, ids, feats, logit_scale, scale, generator) -> Selection:
        index, score, delta = self._score_select(
            *feats, ids, self.history.values, self.k, momentum=self._inplace_momentum(epoch), key="delta", scale=scale
        )
        return Selection(index=index, score=score, delta=delta, scored_ids=ids)


class DissectWarmup(Strategy):
    """Warm-up epochs (< W): train on a random k-subset (or the full batch) and record w[id] <- s.
    Then keep the largest delta = w[id] - s with w frozen."""

    name = "dissect-warmup"
    uses_history = True
    history: HistoryBuffer  # always set: uses_history
    #: record w in every warm-up epoch, not only the last: set by the trainer when an epoch is less than one
    #: pass over the data (--train-num-samples below the data size, --dataset-resampled), where epoch W-1 does
    #: not score every sample and the reference's rule (the last warm-up score of each sample) needs them all
    record_every_warmup_epoch = False

    _frozen = False

    def freeze_snapshot(self) -> None:
        """After the warm-up: never-scored entries of w (NaN) become 0, the reference's starting value. Once per
        process (O(N), idempotent: a resumed run repeats it harmlessly); identical on every rank."""
        if not self._frozen:
            v = self.history.values
            v.masked_fill_(v.isnan(), 0.0)
            self._frozen = True

    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.cfg.warmup_point

    def _records(self, epoch: int) -> bool:
        every = self.record_every_warmup_epoch or getattr(self.cfg, "warmup_record", "last") == "every"
        return self.in_warmup(epoch) and (every or epoch == self.cfg.warmup_point - 1)

    def epoch_metrics(self, epoch: int, num_samples: int) -> dict:
        """At the warm-up point (end of epoch W-1): the share of the training samples that have no warm-up score
        w (they get w = 0 after the warm-up). With --warmup-record last (the default) these are the samples epoch
        W-1 did not score (dropped batch tails); the reference scores every warm-up epoch, so it would give most
        of them an older warm-up score instead: this share bounds the difference (METHOD.md)."""
        if epoch != self.cfg.warmup_point - 1 or self.history is None:
            return {}
        scored = int((~torch.isnan(self.history.values)).sum())
        return {"select/warmup_unscored_fraction": round(max(0, num_samples - scored) / max(1, num_samples), 6)}

    def needs_scoring(self, epoch: int) -> bool:
        # With whole-pass epochs only the last warm-up epoch's scores survive, so earlier random-subset
        # warm-up epochs skip scoring. With --warmup-train full the training forward itself yields every score.
        if self.in_warmup(epoch):
            return self.cfg.warmup_train == "random" and self._records(epoch)
        return True

    def trains_full_batch(self, epoch: int) -> bool:
        return self.in_warmup(epoch) and self.cfg.warmup_train == "full"

    def history_updates(self, epoch: int) -> float | None:
        # momentum 0.0 records the score: w[id] <- s. With whole-pass epochs only epoch W-1's record
        # survives, so that is the only warm-up epoch that needs to write.
        return 0.0 if self._records(epoch) else None

    def observe(self, epoch: int, ids: torch.Tensor, feats: tuple[torch.Tensor, torch.Tensor], scale) -> torch.Tensor:
        m = self._inplace_momentum(epoch)
        if m is None:
            return clip_scores(*feats, scale)
        _, score, _ = self._score_select(*feats, ids, self.history.values, 0, momentum=m, key="delta", scale=scale)
        return score

    def select(self, epoch, ids, feats, logit_scale, scale, generator) -> Selection:
        if self.in_warmup(epoch):
            score = delta = scored = None
            if feats is not None:
                _, score, delta = self._score_select(
                    *feats,
                    ids,
                    self.history.values,
                    0,
                    momentum=self._inplace_momentum(epoch),
                    key="delta",
                    scale=scale,
                )
                scored = ids
            if self.trains_full_batch(epoch):
                return Selection(index=None, score=score, delta=delta, scored_ids=scored)
            perm = torch.randperm(ids.shape[0], device=ids.device, generator=generator)
            return Selection(index=perm[: self.k], score=score, delta=delta, scored_ids=scored)
        return self.select_after_warmup(ids, feats, scale)

    def select_after_warmup(self, ids, feats, scale) -> Selection:
        """The published rule: the k largest delta = w[id] - s, w frozen. Variants override only this.

        A sample with no warm-up score counts as w = 0 (key -s), as in the reference, whose warm-up dict starts
        at 0 for every sample: such a sample is practically never selected."""
        self.freeze_snapshot()
        index, score, delta = self._score_select(
            *feats, ids, self.history.values, self.k, momentum=None, key="delta", scale=scale
        )
        return Selection(index=index, score=score, delta=delta, scored_ids=ids)


class DissectGain(DissectWarmup):
    """NOT the published rule: the same warm-up and frozen snapshot w as ``dissect-warmup``, then
    keep the largest *gain* s - w[id] (= -delta), i.e. the pairs whose score rose most since the
    warm-up point.

    Rationale (benchmarks/README.md, "Selection quality"): while the model is still learning the
    clean pairs, their scores keep rising after the warm-up while mismatched pairs' scores stay
    flat, so the published rule (largest w - s) picks noisy pairs in that regime; the sign flip
    picks clean ones. In a memorisation regime (noisy scores rising late) the flip would pick the
    memorised noisy pairs instead; the quality benchmark measures both regimes.
    Unseen samples (w = NaN) get gain 0, like delta 0 in the published rule.
    """

    name = "dissect-gain"

    def select_after_warmup(self, ids, feats, scale) -> Selection:
        # k = 0: the kernel only scores and computes delta (w frozen, no history write); the top-k
        # of -delta runs in torch (on CUDA too, one extra sort of B keys per step).
        _, score, delta = self._score_select(
            *feats, ids, self.history.values, 0, momentum=None, key="delta", scale=scale
        )
        return Selection(index=topk_positions(-delta, self.k), score=score, delta=delta, scored_ids=ids)


class WarmupClipScore(DissectWarmup):
    """NOT the published rule: the same warm-up as ``dissect-warmup`` (random k-subsets or full
    batches for W epochs, snapshot w at the warm-up point), then keep the largest *current* score s
    (``clipscore``'s key) instead of the largest w - s.

    Rationale (benchmarks/README.md, "When does selection help?"): a model trained on all the data
    for a while fits the clean pairs first, so at the warm-up point the score *level* already ranks
    clean above noisy pairs (demo, full data, epoch 10: mean 59.5 vs 40.2), while the score *change*
    after the warm-up is dominated by clean pairs that are still being learned, so the published
    rule's largest w - s picks noisy pairs. ``clipscore`` alone ranks with an untrained model from
    step 0 and locks onto whatever it scores high first. The snapshot w is kept so delta is still
    logged for diagnostics; it does not affect the choice.
    """

    name = "warmup-clipscore"

    def select_after_warmup(self, ids, feats, scale) -> Selection:
        index, score, delta = self._score_select(
            *feats, ids, self.history.values, self.k, momentum=None, key="score", scale=scale
        )
        return Selection(index=index, score=score, delta=delta, scored_ids=ids)


class WarmupSnapshot(DissectWarmup):
    """NOT the published rule: the same warm-up as ``dissect-warmup``, then keep the k pairs of each batch with
    the largest *warm-up* score w[id] (frozen), with no scoring pass at all after the warm-up.

    Rationale (benchmarks/README.md, "Selection on real photos"): on real photos a model trained on all pairs
    memorises the mismatched ones, so their current score catches up with the clean pairs' and neither the
    current score (``warmup-clipscore``) nor its change (``dissect-warmup``) keeps separating them; the score a
    pair had at an early warm-up point, before the memorisation, still does. The model is the run's own early
    self, used as a fixed reference (JEST's reference-model idea without a second model). Every step after the
    warm-up then costs only the trained sub-batch's forward and backward. Never-scored samples rank last.
    """

    name = "warmup-snapshot"

    def needs_scoring(self, epoch: int) -> bool:
        return super().needs_scoring(epoch) if self.in_warmup(epoch) else False

    def select_after_warmup(self, ids, feats, scale) -> Selection:
        w = self.history.values[ids].float()
        key = torch.where(torch.isnan(w), torch.full_like(w, float("-inf")), w)
        return Selection(index=topk_positions(key, self.k))


_CLASSES: dict[str, type[Strategy]] = {
    c.name: c
    for c in (
        Full,
        Random,
        ClipScore,
        SmallLoss,
        BigLoss,
        DissectMomentum,
        DissectWarmup,
        DissectGain,
        WarmupClipScore,
        WarmupSnapshot,
    )
}
#: strategies that index a per-sample history buffer by sample id
HISTORY_STRATEGIES = tuple(n for n, c in _CLASSES.items() if c.uses_history)


def make_strategy(cfg, batch_size: int, num_ids: int, device: torch.device, gather: Gather | None = None) -> Strategy:
    """Build the strategy named by a SelectConfig; ``gather``: the ranks' all-gather (several ranks), see Strategy."""
    return _CLASSES[cfg.strategy](cfg.k(batch_size), batch_size, num_ids, device, cfg, gather)
