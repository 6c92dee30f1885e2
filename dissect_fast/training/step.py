"""One training step: score (a no-grad forward of the whole batch, when the strategy needs one) -> select k ->
train (forward + backward of the selected sub-batch, AdamW) -> sync (the strategy's history update, across ranks).

No host synchronisation inside a step: the loss stays on the device, the trained count is a shape. A phase marker
(``ctx.timer``: a benchmark's PhaseTimer or the --profile-steps window's) is told where each phase ends; None (the
default) runs no timing code at all.
"""

from __future__ import annotations

import contextlib
import math

import torch

from dissect_fast.training.build import Run


def _grad_share(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` unchanged in value, with 1/n of the gradient: a parameter that enters each of n accumulated losses."""
    return x.detach() + (x - x.detach()) / n


class StepRunner:
    """Runs optimizer steps on a :class:`Run`'s components. ``ctx``: the loop's callbacks.Context (the step reads its
    ``timer`` and sets ``last_trained``)."""

    def __init__(self, run: Run, ctx) -> None:
        self.run, self.ctx = run, ctx
        self.score_scale = 100.0  #: --score-scale (``learned``: the model's, read at log steps)

    def _mark(self, phase: str) -> None:
        if self.ctx.timer is not None:
            self.ctx.timer.mark(phase)

    def refresh_scale(self) -> None:
        """--score-scale learned: logit_scale.exp() read on the host at log steps only (a sync there anyway), so
        the step stays sync-free; the scale drifts slowly, so this is exact enough (documented)."""
        if self.run.cfg.model.score_scale == "learned":
            self.score_scale = float(self.run.model.logit_scale.detach().exp())

    def step(self, epoch: int, images, tokens, ids) -> torch.Tensor:
        """One optimizer step on one batch; with --accum-freq N > 1, ``images``, ``tokens`` and ``ids`` are
        sequences of N batches (``accum_step``). Returns the loss, on the device."""
        if self.run.accum > 1:
            return self.accum_step(epoch, images, tokens, ids)
        run = self.run
        run.strategy.begin_step()  # the history writes of this step are kept only if its update is applied
        sel, t_images, t_tokens, t_ids = self._select(epoch, images, tokens, ids)
        self.ctx.last_trained = t_ids.shape[0]  # a shape: known on the host, no sync
        out = run.forwards.train(t_images, t_tokens)
        loss = self._loss(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        self._mark("train")
        self._optimizer_step(loss)
        self._after_batch(epoch, ids, sel, t_ids, (out["image_features"].detach(), out["text_features"].detach()))
        run.strategy.commit_step(run.guard.applied)  # a skipped step leaves the history untouched
        return loss.detach()

    def accum_step(self, epoch: int, images, tokens, ids) -> torch.Tensor:
        """--accum-freq N: one optimizer step over N batches, selection composed with open_clip's accumulation.

        Each batch is scored and selected as a step without accumulation would select it (k of B, history
        updated per batch), and the training forward computes its selected sub-batch's features without grad.
        Then each sub-batch is re-run with grad (``_accum_backward``); the step's gradient is that of one loss
        over the N*k selected pairs.
        """
        run, n = self.run, len(images)
        subs, cached_f, cached_g = [], [], []
        run.strategy.begin_step()  # the N batches' history writes are kept only if the step is applied
        for j in range(n):
            sel, t_images, t_tokens, t_ids = self._select(epoch, images[j], tokens[j], ids[j])
            out = run.forwards.train_no_grad(t_images, t_tokens)  # its own graph: no grad-mode recompile
            cached_f.append(out["image_features"])
            cached_g.append(out["text_features"])
            subs.append((t_images, t_tokens))
            self._mark("train")
            self._after_batch(epoch, ids[j], sel, t_ids, (out["image_features"], out["text_features"]))
        self.ctx.last_trained = sum(x[0].shape[0] for x in subs)  # shapes: known on the host, no sync
        loss = self._accum_backward(subs, cached_f, cached_g)
        self._mark("train")
        self._optimizer_step(loss)
        run.strategy.commit_step(run.guard.applied)
        return loss.detach()

    def _accum_backward(self, subs, cached_f: list, cached_g: list) -> torch.Tensor:
        """Each sub-batch re-run with grad: its fresh features replace its cached ones in the contrastive loss over
        all N sub-batches (the cached ones are the negatives), and the gradients add up. The logit scale (and
        bias) enters every re-run, so each contributes 1/N of its gradient (open_clip's counts it N times)."""
        run, n = self.run, len(subs)
        run.optimizer.zero_grad(set_to_none=True)
        for j, (t_images, t_tokens) in enumerate(subs):
            with run.forwards.no_sync() if j < n - 1 else contextlib.nullcontext():  # DDP: all-reduce once
                out = run.forwards.train(t_images, t_tokens)
                f = torch.cat(cached_f[:j] + [out["image_features"]] + cached_f[j + 1 :])
                g = torch.cat(cached_g[:j] + [out["text_features"]] + cached_g[j + 1 :])
                bias = out.get("logit_bias")
                scale = _grad_share(out["logit_scale"], n)
                loss = self._loss(f, g, scale, None if bias is None else _grad_share(bias, n))
                run.scaler.scale(loss).backward()
        return loss

    def _select(self, epoch: int, images, tokens, ids):
        """The scoring pass (when the strategy needs one) and the selection of one batch: (Selection, trained
        images, tokens, ids)."""
        run = self.run
        feats = run.forwards.score(images, tokens) if run.strategy.needs_scoring(epoch) else None
        self._mark("score")
        logit_scale = run.model.logit_scale.detach().exp()
        sel = run.strategy.select(epoch, ids, feats, logit_scale, self.score_scale, run.generator)
        self._mark("select")
        if sel.index is None:
            return sel, images, tokens, ids
        return sel, images[sel.index], tokens[sel.index], ids[sel.index]

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        """ClipLoss, or SigLipLoss (with the logit bias) under --siglip."""
        if self.run.cfg.model.siglip:
            return self.run.loss_fn(image_features, text_features, logit_scale, logit_bias)
        return self.run.loss_fn(image_features, text_features, logit_scale)

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """Gradient clipping, the non-finite guard, the (scaled) optimizer step, open_clip's logit-scale clamp."""
        run, clip = self.run, self.run.cfg.optim.grad_clip_norm
        grad_norm = None
        if clip is not None:
            run.scaler.unscale_(run.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
        run.guard.before_step(loss, grad_norm)  # a non-finite loss/gradient skips the update, decided on the device
        run.scaler.step(run.optimizer)
        run.guard.after_step(run.scaler)
        run.scaler.update()
        with torch.no_grad():
            run.model.logit_scale.clamp_(0, math.log(100))
        self._mark("optim")

    def _after_batch(self, epoch: int, ids, sel, t_ids, tf) -> None:
        """What a selected batch leaves behind: scores for the history (across ranks) and the diagnostics. ``tf``:
        the detached training features of the trained sub-batch (the model before the step)."""
        sel = self.run.strategy.update(epoch, sel, t_ids, tf, self.score_scale)  # history across ranks
        self._mark("sync")  # includes scoring the trained sub-batch for diagnostics when no scoring pass ran
        self.run.diag.record(ids, sel, t_ids)
        self._mark("other")
