"""The composition root: ``build_run(cfg)`` builds every component of a training run and returns them as one
:class:`Run`; the loop (``loop.Trainer``) only runs steps and epochs over it.

Each builder below returns what it builds and takes what it needs as arguments, so the order is visible in
``build_run``: the runtime first (device, ranks, seeds, the run folder's path), then everything a user can get
wrong is checked before any model, loader or GPU work (``preflight``, model options, data plan, the resume
checkpoint), then
the model (its LR schedule needs the data plan's step count), the strategy, the loaders, and the run folder last:
a run that fails to set up leaves no folder behind.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dissect_fast.config import TrainConfig
from dissect_fast.data.pipeline import TrainData
from dissect_fast.evaluation import zeroshot
from dissect_fast.model import (
    Forwards,
    create_model,
    lock_towers,
    make_optimizer,
    model_cfg_of,
    resolve_device,
    resolve_precision,
    resolve_pretrained,
    set_grad_checkpointing,
    text_tokenizer,
    uses_grad_scaler,
)
from dissect_fast.preflight import preflight
from dissect_fast.selection.strategies import Strategy, make_strategy
from dissect_fast.training import reliability
from dissect_fast.training.checkpoint import Checkpointer
from dissect_fast.training.diagnostics import EpochDiagnostics
from dissect_fast.training.distributed import (
    DistInfo,
    all_gather_cat,
    cuda_device_index,
    elastic_restart_count,
    init_distributed,
)
from dissect_fast.training.profiling import StepProfiler
from dissect_fast.training.resume import ResumePoint, find_resume
from dissect_fast.training.run_folder import make_run_dir, run_dir_for, setup_logging
from dissect_fast.training.schedule import make_scheduler, set_cuda_defaults

log = logging.getLogger("dissect_fast")


@dataclass
class Runtime:
    """Where the run executes: device, ranks, precision and the run folder's path (made last)."""

    device: torch.device
    dist: DistInfo
    precision: str
    run_dir: str


@dataclass
class ModelChoice:
    """The model a run builds, checked before it is built: name, pretrained weights, its own tokenizer (None: CLIP
    BPE, the shards' stored ``tok``)."""

    name: str
    pretrained: str | None
    tokenizer: Any
    model_cfg: dict  #: open_clip's config of the model (checkpoints carry it: they rebuild the model anywhere)


@dataclass
class ModelParts:
    """The built model with its two forwards, the (train, val) image transforms and the text context length."""

    model: torch.nn.Module
    forwards: Forwards
    transforms: tuple[Any, Any]
    context_length: int


@dataclass
class Optimization:
    """Optimizer, LR schedule (``scheduler(global step)`` sets the optimizer's lr and returns it), grad scaler, loss."""

    optimizer: torch.optim.Optimizer
    scheduler: Callable[[int], float]
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module


@dataclass
class Run:
    """Every component of one training run. The loop reads these; none of them reads the loop."""

    cfg: TrainConfig
    runtime: Runtime
    model_choice: ModelChoice
    data: TrainData
    total_steps: int
    parts: ModelParts
    optim: Optimization
    strategy: Strategy
    generator: torch.Generator  #: the selection's random generator (this rank's stream)
    checkpointer: Checkpointer
    resume: ResumePoint  #: the checkpoint this run continues (checked against it at build), or none
    diag: EpochDiagnostics
    guard: reliability.NonFiniteGuard
    zeroshot_sets: list
    profiler: StepProfiler | None  #: --profile-steps; None: the loop runs no profiling code

    # the names the loop, the callbacks and the users' code read most, without the path to their owner
    device = property(lambda self: self.runtime.device)
    dist = property(lambda self: self.runtime.dist)
    precision = property(lambda self: self.runtime.precision)
    run_dir = property(lambda self: self.runtime.run_dir)
    model_name = property(lambda self: self.model_choice.name)
    tokenizer = property(lambda self: self.model_choice.tokenizer)
    model = property(lambda self: self.parts.model)
    forwards = property(lambda self: self.parts.forwards)
    context_length = property(lambda self: self.parts.context_length)
    optimizer = property(lambda self: self.optim.optimizer)
    scheduler = property(lambda self: self.optim.scheduler)
    scaler = property(lambda self: self.optim.scaler)
    loss_fn = property(lambda self: self.optim.loss_fn)
    steps_per_epoch = property(lambda self: self.data.steps_per_epoch)
    num_ids = property(lambda self: self.data.num_ids)
    num_samples = property(lambda self: self.data.num_samples)
    data_backend = property(lambda self: self.data.backend)
    train_loader = property(lambda self: self.data.train_loader)
    val_loader = property(lambda self: self.data.val_loader)
    accum = property(lambda self: self.cfg.optim.accum_freq)  #: --accum-freq: batches per optimizer step
    k = property(lambda self: self.cfg.select.k(self.cfg.data.batch_size))  #: samples trained per batch and rank


def build_run(cfg: TrainConfig) -> Run:
    """Build a run's components in dependency order (module docstring); the run folder is made last."""
    rt = build_runtime(cfg)
    pre = preflight(cfg, rt.dist.world_size)  # the disk, the model registry, the geometry: ConfigError naming the flag
    choice = choose_model(cfg, pre.model_name)
    data = TrainData(cfg, rt.dist, rt.device, choice.tokenizer, choice.name)
    total_steps = data.steps_per_epoch * cfg.optim.epochs
    profiler = build_profiler(cfg, rt, data.steps_per_epoch, total_steps)
    checkpointer = Checkpointer(
        rt.run_dir, cfg.optim.epochs, cfg.run.save_frequency, cfg.run.delete_previous_checkpoint, rt.dist.is_main
    )
    resume = find_resume(cfg, checkpointer, rt.run_dir, choice.name, data.num_ids)  # before the model is built
    parts = build_model(cfg, rt, choice)
    optim = build_optimization(cfg, rt, parts.model, data.steps_per_epoch, total_steps)
    strategy = build_strategy(cfg, rt.dist, rt.device, parts.model, data)
    data.build_loaders(parts.model, *parts.transforms, parts.context_length)
    run = Run(
        cfg=cfg,
        runtime=rt,
        model_choice=choice,
        data=data,
        total_steps=total_steps,
        parts=parts,
        optim=optim,
        strategy=strategy,
        generator=selection_generator(cfg.run.seed, rt),
        checkpointer=checkpointer,
        resume=resume,
        diag=EpochDiagnostics(data.num_ids, rt.device, data.clean_flags(), per_id=cfg.run.record),
        guard=build_guard(cfg, rt, optim),
        zeroshot_sets=zeroshot_sets(cfg, parts.transforms[1]),
        profiler=profiler,
    )
    make_run_dir(rt.run_dir, rt.dist, cfg.run.resume is None and elastic_restart_count() == 0)
    return run


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global RNGs from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_runtime(cfg: TrainConfig) -> Runtime:
    """Device, ranks, precision, this rank's seeds, the run folder's path (not made yet), buffered logging."""
    device = resolve_device(cfg.model.device)
    dist = init_distributed(device.type, cfg.dist.dist_timeout)
    if device.type == "cuda":
        if cfg.model.device in ("auto", "cuda"):
            device = torch.device("cuda", cuda_device_index(dist))
        torch.cuda.set_device(device)
    set_cuda_defaults(device)  # open_clip's: cuDNN benchmark, TF32 matmuls and convolutions
    precision = resolve_precision(cfg.model.precision, device)
    seed_everything(cfg.run.seed + dist.rank)
    setup_logging(None, dist.is_main, buffer=True)  # first: run_dir_for may warn (a stale lock taken over)
    return Runtime(device, dist, precision, run_dir_for(cfg.run, cfg.select.strategy, dist))


def choose_model(cfg: TrainConfig, name: str) -> ModelChoice:
    """Pretrained weights and tokenizer of the model ``name`` (checked by preflight): no model built."""
    m = cfg.model
    pretrained = resolve_pretrained(m.pretrained, name) if m.pretrained else None
    return ModelChoice(name, pretrained, text_tokenizer(name), model_cfg_of(name, m.siglip))


def build_profiler(cfg: TrainConfig, rt: Runtime, steps_per_epoch: int, total_steps: int) -> StepProfiler | None:
    """--profile-steps A:B, checked against the run's length: B past the end profiles to the end."""
    window = cfg.run.profile_window()
    if window is None:
        return None
    start, stop = window  # start inside the run: checked by preflight
    if stop > total_steps:
        log.warning(
            "--profile-steps %d:%d: the run has %d steps; profiling steps %d..%d",
            *(start, stop, total_steps, start, total_steps - 1),
        )
        stop = total_steps
    out = os.path.join(rt.run_dir, "profile")
    return StepProfiler(start, stop, out, rt.device, rank=rt.dist.rank, summary=rt.dist.is_main)


def build_model(cfg: TrainConfig, rt: Runtime, choice: ModelChoice) -> ModelParts:
    """The model (towers locked, gradient checkpointing) and its scoring and training forwards."""
    m = cfg.model
    model, pre_train, pre_val, context_length = create_model(
        choice.name, rt.device, choice.pretrained, rt.precision, m.siglip
    )
    lock_towers(model, m)  # --lock-image / --lock-text: before the optimizer collects parameters
    if m.grad_checkpointing:
        set_grad_checkpointing(model)
    forwards = Forwards(
        model,
        rt.precision,
        rt.device,
        m.compile,
        rt.dist.enabled,
        score_resolution=m.score_resolution,
        score_patch_dropout=m.score_patch_dropout,
        score_cudagraphs=m.score_cudagraphs,
        score_precision=m.score_precision,
    )
    return ModelParts(model, forwards, (pre_train, pre_val), context_length)


def build_optimization(
    cfg: TrainConfig, rt: Runtime, model: torch.nn.Module, steps_per_epoch: int, total_steps: int
) -> Optimization:
    """AdamW over the trainable parameters, open_clip's --lr-scheduler, the grad scaler (fp16), the loss."""
    optimizer = make_optimizer(model, cfg.optim, rt.device)
    return Optimization(
        optimizer,
        make_scheduler(optimizer, cfg.optim, steps_per_epoch, total_steps),
        torch.amp.GradScaler(rt.device.type, enabled=uses_grad_scaler(rt.precision)),
        build_loss(cfg, rt.dist),
    )


def build_loss(cfg: TrainConfig, dist: DistInfo) -> torch.nn.Module:
    """open_clip's contrastive loss for this run: SigLipLoss with --siglip, else ClipLoss."""
    from open_clip.loss import ClipLoss, SigLipLoss

    if cfg.model.siglip:  # neighbour exchange of text features across ranks (open_clip's default, bidir)
        return SigLipLoss(rank=dist.rank, world_size=dist.world_size)
    d = cfg.dist
    return ClipLoss(
        local_loss=d.local_loss,
        gather_with_grad=d.gather_with_grad,
        cache_labels=True,
        rank=dist.rank,
        world_size=dist.world_size,
    )


def build_strategy(cfg: TrainConfig, dist: DistInfo, device: torch.device, model: Any, data: TrainData) -> Strategy:
    """The selection strategy with its history buffer (gathered across ranks when there are several)."""
    gather = (lambda t: all_gather_cat(t, dist)) if dist.enabled else None
    strategy = make_strategy(cfg.select, cfg.data.batch_size, data.num_ids, device, gather)
    if cfg.model.siglip and hasattr(strategy, "sigmoid_bias"):  # small_loss/big_loss rank by the sigmoid loss
        strategy.sigmoid_bias = model.logit_bias.detach()
    if data.partial_epochs and hasattr(strategy, "record_every_warmup_epoch"):
        strategy.record_every_warmup_epoch = True  # epoch W-1 alone does not score every sample
    return strategy


def selection_generator(seed: int, rt: Runtime) -> torch.Generator:
    """The selection's random generator: this rank's own stream of ``seed``."""
    generator = torch.Generator(device=rt.device)
    generator.manual_seed(seed * 7919 + rt.dist.rank)
    return generator


def build_guard(cfg: TrainConfig, rt: Runtime, optim: Optimization) -> reliability.NonFiniteGuard:
    """The non-finite guard: a non-finite loss or gradient skips the step, on every rank alike."""
    return reliability.NonFiniteGuard(
        optim.optimizer,
        rt.device,
        cfg.run.max_nonfinite_steps,
        optim.scaler.is_enabled(),
        agree=reliability.agree_on_all_ranks if rt.dist.enabled else None,
    )


def zeroshot_sets(cfg: TrainConfig, transform) -> list:
    """(metric prefix, ImageFolder, class names, templates) for --imagenet-val, --imagenet-v2, --zeroshot-data."""
    d = cfg.data
    return zeroshot.zeroshot_sets(
        transform,
        imagenet_val=d.imagenet_val,
        imagenet_v2=d.imagenet_v2,
        zeroshot_data=d.zeroshot_data,
        zeroshot_classnames=d.zeroshot_classnames,
    )
