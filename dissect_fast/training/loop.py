"""The training step and the epoch loop; everything else is a component the loop calls.

One step: data -> score (a no-grad forward of the whole batch, when the strategy needs one) -> select k ->
train (forward + backward of the selected sub-batch, AdamW) -> sync (the strategy's history update, across
ranks). No host synchronisation inside a step: losses and counters stay on the device and are read every
``--log-every-n-steps`` steps. Checkpoints: ``checkpoint.Checkpointer``; run folder: ``run_folder``; metrics,
TensorBoard, wandb, plots, progress, evaluation, profiling: ``callbacks``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import types

import numpy as np
import torch

from dissect_fast.config import TrainConfig
from dissect_fast.data.pipeline import TrainData
from dissect_fast.data.shards import tokenizer_for
from dissect_fast.evaluation import zeroshot
from dissect_fast.model import (
    Forwards,
    check_scoring_options,
    create_model,
    lock_towers,
    make_optimizer,
    model_cfg_of,
    model_name_for,
    resolve_device,
    resolve_precision,
    resolve_pretrained,
    scoring_precision,
    set_grad_checkpointing,
    text_tokenizer,
    uses_grad_scaler,
)
from dissect_fast.selection.strategies import make_strategy
from dissect_fast.training import checkpoint as ckpt_io
from dissect_fast.training import reliability
from dissect_fast.training.callbacks import (
    HOOKS,
    Callback,
    EpochEndFunction,
    Evaluation,
    FaultInjection,
    HistorySync,
    MetricsLog,
    PhaseTiming,
    Plots,
    ProgressBar,
    Record,
    TensorBoard,
    Wandb,
    log_run_start,
    overrides,
)
from dissect_fast.training.diagnostics import EpochDiagnostics
from dissect_fast.training.distributed import (
    DistInfo,
    all_gather_cat,
    barrier,
    cuda_device_index,
    elastic_restart_count,
    init_distributed,
)
from dissect_fast.training.logs import StepWindow, check_wandb_installed, truncate_steps
from dissect_fast.training.profiling import PhaseMarker, StepProfiler
from dissect_fast.training.resume import resume_changes, resume_source
from dissect_fast.training.run_folder import (
    RunLock,
    make_run_dir,
    rewrite_metrics,
    run_dir_for,
    setup_logging,
    write_run_start,
)
from dissect_fast.training.schedule import make_scheduler, set_cuda_defaults

log = logging.getLogger("dissect_fast")


def _grad_share(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` unchanged in value, with 1/n of the gradient: a parameter that enters each of n accumulated losses."""
    return x.detach() + (x - x.detach()) / n


def cosine_lr(step: int, base: float, warmup: int, total: int) -> float:
    """open_clip's cosine schedule (``open_clip_train.scheduler.cosine_lr``) at ``step``, without an optimizer:
    linear warm-up to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total`` (0 after it)."""
    from open_clip_train.scheduler import cosine_lr as openclip_cosine

    if step >= warmup and step >= total:
        return 0.0
    return openclip_cosine(types.SimpleNamespace(param_groups=[]), base, warmup, max(total, warmup + 1))(step)


class Trainer:
    """One training run. ``__init__`` calls the set-up builders below in order: a configuration the user got wrong
    fails before any model, loader or GPU work, and the run folder is made last. ``fit`` runs the epoch loop."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self._setup_runtime()
        # Everything the user can get wrong fails in these three, before any model, loader or GPU work.
        self._resolve_model_options()
        self._plan_data()
        self._prepare_checkpoints()
        pre_train, pre_val = self._build_model()
        self._build_strategy()
        self._build_loaders(pre_train, pre_val)
        self._init_loop_state()
        fresh = self.cfg.run.resume is None and elastic_restart_count() == 0
        make_run_dir(self.run_dir, self.dist, fresh)  # last: a run that fails to set up leaves no folder behind

    # ------------------------------------------------------------------ set-up, in the order __init__ runs it
    def _setup_runtime(self) -> None:
        """Device, ranks, precision, this rank's seeds, the run folder's path (not made yet), buffered logging."""
        cfg = self.cfg
        self.device = resolve_device(cfg.model.device)
        self.dist: DistInfo = init_distributed(self.device.type, cfg.dist.dist_timeout)
        if self.device.type == "cuda":
            if cfg.model.device == "auto" or cfg.model.device == "cuda":
                self.device = torch.device("cuda", cuda_device_index(self.dist))
            torch.cuda.set_device(self.device)
        set_cuda_defaults(self.device)  # open_clip's: cuDNN benchmark, TF32 matmuls and convolutions
        self.precision = resolve_precision(cfg.model.precision, self.device)
        self._set_seed(cfg.run.seed + self.dist.rank)
        setup_logging(None, self.dist.is_main, buffer=True)  # first: run_dir_for may warn (a stale lock taken over)
        self.run_dir = run_dir_for(cfg.run, cfg.select.strategy, self.dist)  # made once set-up has succeeded

    def _resolve_model_options(self) -> None:
        """wandb installed, model name, scoring options, pretrained weights, tokenizer: checked, no model built."""
        cfg = self.cfg
        if "wandb" in cfg.run.report_to.split(","):
            check_wandb_installed()
        self.model_name = model_name_for(cfg.model.model, cfg.model.model_config, checkpoint=self._model_source())
        check_scoring_options(self.model_name, cfg.model.score_resolution, cfg.model.score_patch_dropout)
        scoring_precision(cfg.model.score_precision, self.precision)  # ValueError naming the flags
        self.pretrained = resolve_pretrained(cfg.model.pretrained, self.model_name) if cfg.model.pretrained else None
        #: the model's own tokenizer when it is not CLIP BPE (SigLIP, HF text towers); None: CLIP BPE (stored `tok`)
        self.tokenizer = text_tokenizer(self.model_name)

    def _model_source(self) -> str | None:
        """The checkpoint file whose recorded model config builds the model (any model, built-in or custom, with
        no JSON file): --pretrained's, else the one --resume continues; None: the model is built by name."""
        cfg = self.cfg
        if cfg.model.pretrained and os.path.isfile(cfg.model.pretrained):
            return cfg.model.pretrained
        found = resume_source(cfg.run.resume, cfg.run.logs, cfg.run.name)
        return found[0] if found is not None and found[0].endswith(".pt") else None

    def _plan_data(self) -> None:
        """The training data (checked, no loader yet), its counts, the run's length in steps, the profiler."""
        cfg = self.cfg
        self.accum = cfg.optim.accum_freq  #: --accum-freq: batches per optimizer step
        self.data = TrainData(cfg, self.dist, self.device, self.tokenizer, self.model_name)
        self.num_ids, self.num_samples = self.data.num_ids, self.data.num_samples
        self.steps_per_epoch, self.partial_epochs = self.data.steps_per_epoch, self.data.partial_epochs
        self.index, self.data_backend = self.data.index, self.data.backend
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.profiler = self._profiler()  #: --profile-steps; None: the loop runs no profiling code

    def _prepare_checkpoints(self) -> None:
        """The checkpointer, and the checkpoint to resume from, loaded and checked against this run."""
        cfg = self.cfg
        self.checkpointer = ckpt_io.Checkpointer(
            self.run_dir,
            cfg.optim.epochs,
            cfg.run.save_frequency,
            cfg.run.delete_previous_checkpoint,
            self.dist.is_main,
        )
        self.resume_state = self._load_resume()  # loaded and checked against this run before the model is built

    def _build_model(self) -> tuple:
        """Model, forwards, optimizer, lr scheduler, grad scaler, loss; returns the (train, val) image transforms."""
        cfg = self.cfg
        self.model, pre_train, pre_val, self.context_length = create_model(
            self.model_name, self.device, self.pretrained, self.precision, cfg.model.siglip
        )
        lock_towers(self.model, cfg.model)  # --lock-image / --lock-text: before the optimizer collects parameters
        if cfg.model.grad_checkpointing:
            set_grad_checkpointing(self.model)
        self.forwards = Forwards(
            self.model,
            self.precision,
            self.device,
            cfg.model.compile,
            self.dist.enabled,
            score_resolution=cfg.model.score_resolution,
            score_patch_dropout=cfg.model.score_patch_dropout,
            score_cudagraphs=cfg.model.score_cudagraphs,
            score_precision=cfg.model.score_precision,
        )
        self.optimizer = make_optimizer(self.model, cfg.optim, self.device)
        #: open_clip's --lr-scheduler: scheduler(global step) sets the optimizer's lr and returns it
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=uses_grad_scaler(self.precision))
        self.loss_fn = self._loss()
        return pre_train, pre_val

    def _build_strategy(self) -> None:
        """The selection strategy, k (samples trained per batch) and the selection's random generator."""
        cfg = self.cfg
        gather = (lambda t: all_gather_cat(t, self.dist)) if self.dist.enabled else None
        self.strategy = make_strategy(cfg.select, cfg.data.batch_size, self.num_ids, self.device, gather)
        if cfg.model.siglip and hasattr(self.strategy, "sigmoid_bias"):  # small_loss/big_loss rank by the sigmoid loss
            self.strategy.sigmoid_bias = self.model.logit_bias.detach()
        if self.partial_epochs and hasattr(self.strategy, "record_every_warmup_epoch"):
            self.strategy.record_every_warmup_epoch = True  # epoch W-1 alone does not score every sample
        self.k = cfg.select.k(cfg.data.batch_size)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.run.seed * 7919 + self.dist.rank)

    def _build_loaders(self, pre_train, pre_val) -> None:
        """Train and val loaders, the zero-shot sets, the per-epoch diagnostics."""
        self.data.build_loaders(self.model, pre_train, pre_val, self.context_length)
        self.train_loader, self.val_loader = self.data.train_loader, self.data.val_loader
        self.zeroshot_sets = self._zeroshot_sets(pre_val)
        self.diag = EpochDiagnostics(self.num_ids, self.device, self.data.clean_flags(), per_id=self.cfg.run.record)

    def _init_loop_state(self) -> None:
        """Position (epoch, step), metrics, outputs, callbacks and hooks, phase timer, stop signal, non-finite guard."""
        self.start_epoch, self.step = 0, 0
        self.epoch_step = 0  #: steps done in the current epoch
        #: stop after this many global steps (benchmarks); a stop inside an epoch writes no epoch checkpoint
        self.max_steps: int | None = None
        self.metrics: list[dict] = []
        self.score_scale = 100.0
        self.tb = None  #: the TensorBoard writer (--tensorboard, main rank; callbacks.TensorBoard)
        self.wandb = None  #: the wandb run (--report-to wandb, main rank; callbacks.Wandb)
        self.last_trained = self.cfg.data.batch_size  #: samples the last step trained on (a shape: no sync)
        self.on_epoch_end = None  #: optional function(metrics) on the main rank, e.g. the demo's progress line
        #: callbacks added to the run's own (``_callbacks``), called after them: tests, benchmarks
        self.callbacks: list[Callback] = []
        faults = FaultInjection.from_env(self.dist.rank)  # test-only: the torchrun-launched tests' env vars
        if faults is not None:
            self.callbacks.append(faults)
        self._fit_callbacks: list[Callback] = []
        self._hooks: dict[str, list] = {h: [] for h in HOOKS}
        #: a dissect_fast.training.profiling.PhaseMarker told each phase's end: a timing.PhaseTimer (benchmarks), or the
        #: profiler's during its window; None (default) = the step runs no timing or profiling code at all
        self.timer: PhaseMarker | None = None
        self.stop = reliability.StopSignal()  # SIGTERM/SIGINT -> checkpoint after the current step, exit
        self.guard = reliability.NonFiniteGuard(
            self.optimizer,
            self.device,
            self.cfg.run.max_nonfinite_steps,
            self.scaler.is_enabled(),
            agree=reliability.agree_on_all_ranks if self.dist.enabled else None,  # every rank skips the same steps
        )
        self._epoch_resume: dict | None = None  # data position inside an epoch, from an interrupted run

    # ------------------------------------------------------------------ set-up helpers
    def _set_seed(self, seed: int) -> None:
        """Python's, NumPy's and torch's global RNGs from ``seed``."""
        import random

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _loss(self):
        """open_clip's contrastive loss for this run: SigLipLoss with --siglip, else ClipLoss."""
        from open_clip.loss import ClipLoss, SigLipLoss

        d = self.cfg.dist
        if self.cfg.model.siglip:  # neighbour exchange of text features across ranks (open_clip's default, bidir)
            return SigLipLoss(rank=self.dist.rank, world_size=self.dist.world_size)
        return ClipLoss(
            local_loss=d.local_loss,
            gather_with_grad=d.gather_with_grad,
            cache_labels=True,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def _profiler(self) -> StepProfiler | None:
        """--profile-steps A:B, checked against the run's length: B past the end profiles to the end."""
        window = self.cfg.run.profile_window()
        if window is None:
            return None
        start, stop = window
        if start >= self.total_steps:
            raise ValueError(
                f"--profile-steps {start}:{stop}: the run has only {self.total_steps} steps "
                f"({self.steps_per_epoch} per epoch x {self.cfg.optim.epochs} epochs, numbered from 0): "
                f"start the window below {self.total_steps}"
            )
        if stop > self.total_steps:
            log.warning(
                "--profile-steps %d:%d: the run has %d steps; profiling steps %d..%d",
                start,
                stop,
                self.total_steps,
                start,
                self.total_steps - 1,
            )
            stop = self.total_steps
        return StepProfiler(
            start,
            stop,
            os.path.join(self.run_dir, "profile"),
            self.device,
            rank=self.dist.rank,
            summary=self.dist.is_main,
        )

    def _zeroshot_sets(self, transform) -> list[tuple[str, object, list[str], list[str]]]:
        """(metric prefix, ImageFolder, class names, templates) for --imagenet-val, --imagenet-v2, --zeroshot-data."""
        d = self.cfg.data
        return zeroshot.zeroshot_sets(
            transform,
            imagenet_val=d.imagenet_val,
            imagenet_v2=d.imagenet_v2,
            zeroshot_data=d.zeroshot_data,
            zeroshot_classnames=d.zeroshot_classnames,
        )

    def zeroshot_eval(self) -> dict:
        """Zero-shot top-1/top-5 on each set, with a classifier built from the current text tower (open_clip's way)."""
        tok = self.tokenizer or tokenizer_for(self.context_length)  # the model's own unless it is CLIP BPE
        d = self.cfg.data
        return zeroshot.run_zeroshot(
            self.model, self.zeroshot_sets, tok, self.device, self.precision, d.batch_size, d.workers
        )

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch_done: int) -> dict:
        return {
            "state_dict": ckpt_io.strip_prefixes(self.model.state_dict()),
            "model_name": self.model_name,
            "model_cfg": model_cfg_of(self.model_name, self.cfg.model.siglip),  # rebuilds the model anywhere
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "epoch": epoch_done,
            "step": self.step,
            "rng": ckpt_io.rng_state(),
            "generator": self.generator.get_state(),
            "config": self.cfg.to_dict(),
            "metrics": self.metrics,
            "nonfinite": self.guard.state_dict(),
            "samples_seen": self._samples_seen(),  # across every start of the run: continues on resume
            "wall_s": self._wall_s(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("model_name") != self.model_name:
            raise ValueError(
                f"--resume: checkpoint was trained with model {state.get('model_name')!r}, this run builds "
                f"{self.model_name!r}: pass the same --model"
            )
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        self.metrics = list(state.get("metrics", []))
        last = self.metrics[-1] if self.metrics else {}
        self._count_base = (
            self.step,
            int(state.get("samples_seen", self.step * self._samples_per_step())),  # older checkpoints: from the step
            float(state.get("wall_s", last.get("wall_s", 0.0))),
        )
        ckpt_io.set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.guard.load_state_dict(state.get("nonfinite", {}))
        self._epoch_resume = ckpt_io.Checkpointer.epoch_position(state)
        if self.dist.rank > 0:  # the checkpoint holds rank 0's RNG streams: derive this rank's own
            seed = self.cfg.run.seed + 1_000_003 * self.step + self.dist.rank
            self._set_seed(seed)
            self.generator.manual_seed(seed * 7919 + self.dist.rank)

    def _load_resume(self) -> tuple[str, dict] | None:
        """The checkpoint this run resumes from (Checkpointer.load_resume), checked against this run: the same model,
        id range and config (``resume.resume_changes``: flags that change the training are refused unless
        --resume-override). A resume with no checkpoint yet is checked against RUN/config.json."""
        restarted = elastic_restart_count() > 0
        self._count_base = (0, 0, 0.0)  #: (step, samples_seen, wall_s) this start continues from
        found = self.checkpointer.load_resume(self.cfg.run.resume, restarted)
        self._resumed: dict | None = None  #: what this start resumed and changed: a record in RUN/resumes.jsonl
        if found is None:
            config_json = os.path.join(self.run_dir, "config.json")
            if (self.cfg.run.resume is not None or restarted) and os.path.isfile(config_json):
                with open(config_json) as f:
                    changes = resume_changes(json.load(f), self.cfg, config_json)
                self._resumed = {"resumed_from": None, **self._changes_record(changes)}
            return None
        path, state = found
        if state.get("model_name") != self.model_name:
            raise ValueError(
                f"--resume {path}: checkpoint was trained with model {state.get('model_name')!r}, this run builds "
                f"{self.model_name!r}: pass the same --model"
            )
        h = (state.get("strategy") or {}).get("history")
        if h is not None and h["values"].numel() != self.num_ids:
            raise ValueError(
                f"--resume {path}: its history buffer has {h['values'].numel()} entries but --train-data has an id "
                f"range of {self.num_ids}: resume with the training data the checkpoint was trained on"
            )
        if isinstance(state.get("config"), dict):
            changes = resume_changes(state["config"], self.cfg, path)
            self._resumed = {"resumed_from": path, **self._changes_record(changes)}
        else:  # an open_clip checkpoint, say: nothing to compare with
            self._resumed = {"resumed_from": path, "note": "the checkpoint holds no config: the flags given apply"}
        self._resumed.update(epoch=state.get("epoch"), step=state.get("step"))
        return found

    @staticmethod
    def _changes_record(changes) -> dict:
        return {"allowed": changes.allowed, "overrides": changes.overrides}

    def _resume(self) -> None:
        """Load the checkpoint found at set-up; drop lines of epochs and steps it does not hold (a crash after
        writing them). A resume of a run that has no checkpoint yet starts over: its logs are emptied."""
        path, state = self.resume_state if self.resume_state is not None else (None, None)
        self.resume_state = None
        if path is None:
            if self.cfg.run.resume == "latest":
                log.info("--resume latest: no checkpoint in %s yet, starting fresh", self.run_dir)
            if self.dist.is_main and (self.cfg.run.resume is not None or elastic_restart_count() > 0):
                rewrite_metrics(self.run_dir, [])  # the lines of an attempt killed before its first checkpoint
                truncate_steps(self.run_dir, 0)
            return
        assert state is not None  # found with its path
        self.load_state_dict(state)
        log.info("resumed from %s: epoch %d is next (step %d)", path, self.start_epoch + 1, self.step)
        if elastic_restart_count() > 0:
            log.warning("torchelastic restart %d: resumed from %s", elastic_restart_count(), path)
        if self.dist.is_main:
            rewrite_metrics(self.run_dir, self.metrics)
            truncate_steps(self.run_dir, self.step)

    # ------------------------------------------------------------------ callbacks
    def _callbacks(self) -> list[Callback]:
        """The run's callbacks in call order (an epoch's evaluation before its metrics are written), then
        ``self.callbacks``."""
        cfg = self.cfg
        out: list[Callback] = []
        if self.profiler is not None or self.timer is not None:
            out.append(PhaseTiming())
        out.append(Evaluation())
        if cfg.run.record:
            out.append(Record())
        if self.dist.enabled and self.strategy.history is not None:
            out.append(HistorySync())
        if self.dist.is_main:
            if self.on_epoch_end is not None:
                out.append(EpochEndFunction(self.on_epoch_end))
            if cfg.run.tensorboard:
                out.append(TensorBoard())
            if "wandb" in cfg.run.report_to.split(","):
                out.append(Wandb())
            out.append(MetricsLog())
            if cfg.run.plots:
                out.append(Plots())
            if cfg.run.progress:
                out.append(ProgressBar())
        return out

    def _refresh_hooks(self) -> None:
        """The hooks each point calls: only overridden ones, so a point no callback uses costs nothing. A phase
        timer set from outside (benchmarks: ``trainer.timer = PhaseTimer(...)``) gets its PhaseTiming."""
        cbs = self._fit_callbacks + self.callbacks
        if self.timer is not None and not any(isinstance(c, PhaseTiming) for c in cbs):
            cbs = [PhaseTiming()] + cbs
        self._hooks = {h: [getattr(c, h) for c in cbs if overrides(c, h)] for h in HOOKS}

    def _emit(self, hook: str, *args) -> None:
        for fn in self._hooks[hook]:
            fn(self, *args)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict]:
        """Train all epochs (or ``max_steps`` steps). SIGTERM/SIGINT: the current step finishes, a checkpoint is
        written and reliability.Interrupted is raised (the CLI turns it into a message and exit code 128 + signal)."""
        self.stop.install()
        try:
            self._start_fit()
            t_start = time.time()
            for epoch in range(self.start_epoch, self.cfg.optim.epochs):
                metrics = self.train_epoch(epoch, t_start)
                if self.epoch_step < self.steps_per_epoch:  # max_steps inside the epoch: no epoch end
                    self.metrics.append(metrics)
                    break
                self._end_epoch(epoch, metrics)
                if self._max_steps_done():
                    break
            self._emit("on_fit_end")
            return self.metrics
        except Exception as e:  # a full disk anywhere (logs, metrics, TensorBoard, plots): exit 3, as for a checkpoint
            stop = ckpt_io.disk_full_stop(e, self.run_dir, self.checkpointer.latest())
            if stop is None:
                raise
            raise stop from e
        finally:
            self.stop.restore()
            self._emit("on_fit_exit")
            self.data.close()  # no worker left behind by an exception
            if self.dist.is_main:
                RunLock.release(self.run_dir)

    def _start_fit(self) -> None:
        """The run folder's lock, config and provenance (or a resume's record), resume, then the callbacks'
        on_fit_start."""
        cfg = self.cfg
        self._fit_t0 = time.time()  #: wall_s counts from here (plus the earlier starts' time, from the checkpoint)
        if self.dist.is_main:
            RunLock.acquire(self.run_dir)  # held since set-up; taken again by a second fit of this Trainer
            write_run_start(self.run_dir, cfg, self.device, self._resumed)
        self.checkpointer.remove_stale()  # under the lock: no other run writes here
        self._resume()
        log_run_start(self)  # the short summary (and a --warmup longer than the run); the rest is in the folder
        self._fit_callbacks = self._callbacks()
        self._refresh_hooks()
        self._emit("on_fit_start")

    def train_epoch(self, epoch: int, t_start: float) -> dict:
        """One epoch (the rest of an interrupted one after a resume): data, score, select, train, sync per step.
        Returns the epoch's training metrics; the epoch's end (evaluation, logs, checkpoint) is ``_end_epoch``."""
        batches, loss_sum, epoch_rng = self._start_epoch(epoch)
        window, t0 = StepWindow(self.diag), time.time()  # host wall clock and counts since the last log step
        for images, tokens, ids in batches:
            window.got_batch()
            lr = self.scheduler(self.step)  # sets the optimizer's lr for this step
            loss = self.train_step(epoch, images, tokens, ids)
            loss_sum += self.guard.masked(loss)
            self.epoch_step += 1
            self.step += 1
            window.step_done()
            self._emit("on_step_end", epoch, self.epoch_step)
            if self.epoch_step % self.cfg.run.log_every_n_steps == 0 or self.epoch_step == self.steps_per_epoch:
                self._log_step(epoch, lr, loss, window)
            if self.epoch_step < self.steps_per_epoch and self._should_stop(self.epoch_step):
                self._save_interrupted(epoch, loss_sum, epoch_rng)
            if self._max_steps_done():
                break
            window.fetch_next()
        self._emit("on_epoch_steps_end", epoch)
        return self._epoch_metrics(epoch, loss_sum, time.time() - t0, t_start)

    def _start_epoch(self, epoch: int):
        """The epoch's batches (past the steps an interrupted run already trained), its loss sum and the RNG state
        its data order starts from."""
        self.model.train()
        self.diag.reset()
        self.guard.start_epoch()
        self._refresh_hooks()
        resume = self._epoch_resume if self._epoch_resume and self._epoch_resume["epoch"] == epoch else None
        self._epoch_resume = None
        if resume is not None and self.dist.rank == 0:
            ckpt_io.set_rng_state(resume["epoch_rng"])
        epoch_rng = ckpt_io.rng_state()  # what an interrupted epoch restarts its data order from
        self.train_loader.set_epoch(epoch)
        self.epoch_step, loss_sum = 0, torch.zeros((), device=self.device)
        batches = self.data.epoch_batches()
        if resume is not None:
            loss_sum = self._skip_to_position(epoch, batches, resume)
        if self._hooks["on_step_start"] or self._hooks["on_batch"]:
            batches = self._with_step_hooks(batches, self.steps_per_epoch - self.epoch_step)
        self._emit("on_epoch_start", epoch)
        return batches, loss_sum, epoch_rng

    def _with_step_hooks(self, batches, steps: int):
        """``batches`` (``steps`` of them) with on_step_start before each wait for a batch and on_batch after it."""
        for _ in range(steps):
            self._emit("on_step_start")
            batch = next(batches)
            self._emit("on_batch")
            yield batch
        yield from batches  # nothing left: lets the epoch's batches close their loader

    def _log_step(self, epoch: int, lr: float, loss: torch.Tensor, window: StepWindow) -> None:
        """Every --log-every-n-steps steps: the one host sync (loss, counters), the non-finite guard, the learned
        score scale, then the callbacks' on_log_step (steps.jsonl, progress bar)."""
        read = window.read(loss, self.model.logit_scale)
        self.guard.check(self.step, self.checkpointer.latest())  # too many non-finite steps: NonFiniteError
        self._refresh_scale()
        self._emit("on_log_step", epoch, self.epoch_step, lr, read)

    def _samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.dist.world_size * self.accum

    def _samples_seen(self) -> int:
        """Samples read since the run's first start: the resumed checkpoint's count plus this start's steps (so it
        never goes backwards, whatever the batch size or world size of each start)."""
        step0, seen0, _ = self._count_base
        return seen0 + (self.step - step0) * self._samples_per_step()

    def _wall_s(self) -> float:
        """Training wall-clock seconds since the run's first start, the earlier starts' included."""
        return round(self._count_base[2] + time.time() - getattr(self, "_fit_t0", time.time()), 3)

    def _max_steps_done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def _epoch_metrics(self, epoch: int, loss_sum: torch.Tensor, wall: float, t_start: float) -> dict:
        """The epoch's training metrics; the bad-data policy stops the run here (TooManyBadSamples)."""
        cfg, n, stats = self.cfg, self.epoch_step, dict(self.train_loader.stats)
        skipped = int(self.guard.epoch)
        metrics = {
            "epoch": epoch + 1,
            "step": self.step,
            "samples_seen": self._samples_seen(),
            "wall_s": round(self._count_base[2] + time.time() - t_start, 3),  # the earlier starts' time included
            "epoch_wall_s": round(wall, 3),
            "train_loss": float(loss_sum) / (n - skipped) if n > skipped else float("nan"),
            "nonfinite_steps": skipped,
            "lr": self.optimizer.param_groups[0]["lr"],  # the last step's (--lr-scheduler)
            "data/bad_samples": int(stats.get("bad_samples", 0)),
        }
        metrics.update(self.diag.summary())
        metrics.update(self.strategy.epoch_metrics(epoch, self.data.pool_size))
        if "select/warmup_unscored_fraction" in metrics:
            log.info(
                "warm-up point: %.2f%% of the training samples have no warm-up score (w = 0 from now on; "
                "--warmup-record every scores every warm-up epoch, as the reference does)",
                100 * metrics["select/warmup_unscored_fraction"],
            )
        metrics.update(
            {
                f"data/{k}": int(v)
                for k, v in sorted(stats.items())
                if not k.startswith("shard:") and k not in ("ok", "bad_samples")
            }
        )
        msg = reliability.bad_samples_stop(stats, epoch, cfg.data.max_bad_fraction)
        if msg is not None:
            self._emit("on_stopped", {**metrics, "stopped": msg})
            raise reliability.TooManyBadSamples(msg)
        return metrics

    def _end_epoch(self, epoch: int, metrics: dict) -> None:
        """The epoch's end: callbacks (evaluation, record, logs, plots), the checkpoint, a stop signal."""
        self.metrics.append(metrics)
        self._emit("on_epoch_end", epoch, metrics)
        log.info(
            "epoch %d: %s",
            epoch + 1,
            json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}),
        )
        self.checkpointer.save_epoch(lambda: self.state_dict(epoch + 1), epoch + 1)
        barrier(self.dist)
        if epoch + 1 < self.cfg.optim.epochs and self._should_stop(None):
            raise self._interrupted(f"after epoch {epoch + 1}", self.checkpointer.latest())

    # ------------------------------------------------------------------ stopping
    def _should_stop(self, n_steps: int | None) -> bool:
        """A stop signal, agreed by all ranks. Single process: checked after every step (a Python flag,
        no sync). Several ranks: at log steps and epoch ends only, where an all-reduce is affordable."""
        if not self.dist.enabled:
            return self.stop.requested
        if n_steps is not None and n_steps % self.cfg.run.log_every_n_steps:
            return False
        return reliability.agree_on_stop(self.stop.requested, self.dist)

    def _interrupted(self, where: str, path: str | None) -> reliability.Interrupted:
        import signal

        signum = self.stop.signum or signal.SIGTERM
        r = self.cfg.run
        return reliability.Interrupted(
            f"stopped by {signal.Signals(signum).name} {where} (step {self.step}); checkpoint: {path}. "
            f"To continue, run the same command with --resume latest --logs {r.logs} --name {r.name}",
            signum,
        )

    def _save_interrupted(self, epoch: int, loss_sum: torch.Tensor, epoch_rng: dict) -> None:
        """Checkpoint the state after step ``epoch_step`` of ``epoch`` with its data position, then raise
        Interrupted. Resuming re-reads the epoch's first epoch_step batches without training on them."""
        n = self.epoch_step

        def state() -> dict:
            st = self.state_dict(epoch)  # the epoch in progress: resume re-enters it
            st["epoch_resume"] = {
                "epoch": epoch,
                "epoch_step": n,
                "epoch_rng": epoch_rng,
                "step_rng": ckpt_io.rng_state(),
                "loss_sum": loss_sum.detach().cpu(),
                "nonfinite_epoch": self.guard.epoch.cpu(),
                "diag": self.diag.state_dict(),
            }
            return st

        path = self.checkpointer.save_position(state)
        barrier(self.dist)
        raise self._interrupted(f"in epoch {epoch + 1} after {n}/{self.steps_per_epoch} steps", path)

    def _skip_to_position(self, epoch: int, batches, resume: dict) -> torch.Tensor:
        """Consume the batches an interrupted run already trained on and restore the epoch's partial sums (returns
        the loss sum); RNG streams are put back so the rest of the epoch is what it would have been."""
        n = self.epoch_step = int(resume["epoch_step"])
        log.info(
            "resuming epoch %d at step %d of %d: re-reading %d batches without training",
            epoch + 1,
            n,
            self.steps_per_epoch,
            n,
        )
        for _ in range(n):
            next(batches)
        if self.dist.rank == 0:
            ckpt_io.set_rng_state(resume["step_rng"])
        self.diag.load_state_dict(resume["diag"])
        self.guard.epoch.copy_(resume["nonfinite_epoch"])
        return resume["loss_sum"].to(self.device)

    # ------------------------------------------------------------------ the step
    def _scale(self) -> float:
        return self.score_scale

    def _refresh_scale(self) -> None:
        # --score-scale learned reads logit_scale.exp() on the host only at log steps (a sync there
        # anyway), so the step itself stays sync-free; the scale drifts slowly, so this is exact
        # enough and documented.
        if self.cfg.model.score_scale == "learned":
            self.score_scale = float(self.model.logit_scale.detach().exp())

    def _select(self, epoch: int, images, tokens, ids):
        """The scoring pass (when the strategy needs one) and the selection of one batch: (Selection, trained
        images, tokens, ids)."""
        strategy, t = self.strategy, self.timer
        feats = self.forwards.score(images, tokens) if strategy.needs_scoring(epoch) else None
        if t is not None:
            t.mark("score")
        logit_scale = self.model.logit_scale.detach().exp()
        sel = strategy.select(epoch, ids, feats, logit_scale, self._scale(), self.generator)
        if t is not None:
            t.mark("select")
        if sel.index is None:
            return sel, images, tokens, ids
        return sel, images[sel.index], tokens[sel.index], ids[sel.index]

    def _contrastive_loss(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        """ClipLoss, or SigLipLoss (with the logit bias) under --siglip."""
        if self.cfg.model.siglip:
            return self.loss_fn(image_features, text_features, logit_scale, logit_bias)
        return self.loss_fn(image_features, text_features, logit_scale)

    def train_step(self, epoch: int, images, tokens, ids) -> torch.Tensor:
        """One optimizer step on one batch; with --accum-freq N > 1, ``images``, ``tokens`` and ``ids`` are
        sequences of N batches (``_accum_step``). Returns the loss, on the device."""
        if self.accum > 1:
            return self._accum_step(epoch, images, tokens, ids)
        t = self.timer
        self.strategy.begin_step()  # the history writes of this step are kept only if its update is applied
        sel, t_images, t_tokens, t_ids = self._select(epoch, images, tokens, ids)
        self.last_trained = t_ids.shape[0]  # a shape: known on the host, no sync

        out = self.forwards.train(t_images, t_tokens)
        loss = self._contrastive_loss(
            out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if t is not None:
            t.mark("train")
        self._optimizer_step(loss)
        self._after_batch(epoch, ids, sel, t_ids, (out["image_features"].detach(), out["text_features"].detach()))
        self.strategy.commit_step(self.guard.applied)  # a skipped step leaves the history untouched
        return loss.detach()

    def _accum_step(self, epoch: int, images, tokens, ids) -> torch.Tensor:
        """--accum-freq N: one optimizer step over N batches, selection composed with open_clip's accumulation.

        Each batch is scored and selected as a step without accumulation would select it (k of B, history
        updated per batch), and the training forward computes its selected sub-batch's features without grad.
        Then each sub-batch is re-run with grad; its fresh features replace its cached ones in the contrastive
        loss over all N sub-batches (the cached ones are the negatives), and the gradients add up: the step's
        gradient is that of one loss over the N*k selected pairs. The logit scale (and bias) enters every
        re-run, so each contributes 1/N of its gradient (open_clip's accumulation counts it N times).
        """
        t, n = self.timer, len(images)
        subs, cached_f, cached_g = [], [], []
        self.strategy.begin_step()  # the N batches' history writes are kept only if the step is applied
        for j in range(n):
            sel, t_images, t_tokens, t_ids = self._select(epoch, images[j], tokens[j], ids[j])
            out = self.forwards.train_no_grad(t_images, t_tokens)  # its own graph: no grad-mode recompile
            cached_f.append(out["image_features"])
            cached_g.append(out["text_features"])
            subs.append((t_images, t_tokens))
            if t is not None:
                t.mark("train")
            self._after_batch(epoch, ids[j], sel, t_ids, (out["image_features"], out["text_features"]))
        self.last_trained = sum(x[0].shape[0] for x in subs)  # shapes: known on the host, no sync
        self.optimizer.zero_grad(set_to_none=True)
        for j, (t_images, t_tokens) in enumerate(subs):
            with self.forwards.no_sync() if j < n - 1 else contextlib.nullcontext():  # DDP: all-reduce once
                out = self.forwards.train(t_images, t_tokens)
                f = torch.cat(cached_f[:j] + [out["image_features"]] + cached_f[j + 1 :])
                g = torch.cat(cached_g[:j] + [out["text_features"]] + cached_g[j + 1 :])
                bias = out.get("logit_bias")
                loss = self._contrastive_loss(
                    f, g, _grad_share(out["logit_scale"], n), None if bias is None else _grad_share(bias, n)
                )
                self.scaler.scale(loss).backward()
        if t is not None:
            t.mark("train")
        self._optimizer_step(loss)
        self.strategy.commit_step(self.guard.applied)
        return loss.detach()

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """Gradient clipping, the non-finite guard, the (scaled) optimizer step, open_clip's logit-scale clamp."""
        t = self.timer
        grad_norm = None
        if self.cfg.optim.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm)
        self.guard.before_step(loss, grad_norm)  # a non-finite loss/gradient skips the update, decided on the device
        self.scaler.step(self.optimizer)
        self.guard.after_step(self.scaler)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        if t is not None:
            t.mark("optim")

    def _after_batch(self, epoch: int, ids, sel, t_ids, tf) -> None:
        """What a selected batch leaves behind: scores for the history (across ranks) and the diagnostics. ``tf``:
        the detached training features of the trained sub-batch (the model before the step)."""
        t = self.timer
        sel = self.strategy.update(epoch, sel, t_ids, tf, self._scale())  # history across ranks
        if t is not None:
            t.mark("sync")  # includes scoring the trained sub-batch for diagnostics when no scoring pass ran
        self.diag.record(ids, sel, t_ids)
        if t is not None:
            t.mark("other")
