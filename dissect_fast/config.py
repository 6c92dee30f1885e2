"""Typed, validated configuration: one dataclass per component, built from open_clip-style flags.

Each field is declared once, with :func:`opt`: its default, help text, flag names, choices and section of
``--help``; :func:`build_parser` generates the argparse parser from those fields and :func:`config_from_args`
reads the parsed values back into the dataclasses. Every message names the flag and the fix.

The checks run in two stages, each rule once. Stage 1 (this module) is pure and imports no torch: parsing and the
dataclasses' ``__post_init__`` (types, ranges, finite floats, ``choices`` with their aliases, cross-field rules),
so ``--help`` answers at once and a config can be rebuilt on a machine where its paths do not exist. Stage 2,
:func:`dissect_fast.preflight.preflight`, checks what needs the disk, the model registry or torch, before the run is
built. The one exception is ``--resume``: a flag not given takes the resumed run's value, so the checkpoint's
config is read while the flags are parsed (:func:`resume_source`; torch is imported only then).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

from dissect_fast.openclip_flags import check_unsupported
from dissect_fast.selection.names import STRATEGIES, STRATEGY_ALIASES, WARMUP_STRATEGIES


class ConfigError(ValueError):
    """Invalid user configuration; the message names the flag and how to fix it."""


#: --precision: open_clip's modes plus auto (dissect_fast.model gives each one's weight dtype, input dtype, autocast
#: and grad scaler), and open_clip's other spelling of amp_bf16
PRECISION_CHOICES = ("auto", "fp32", "amp", "amp_bf16", "bf16", "pure_bf16", "fp16", "pure_fp16")
PRECISION_ALIASES = {"amp_bfloat16": "amp_bf16"}
#: every value --precision accepts
PRECISIONS = PRECISION_CHOICES + tuple(PRECISION_ALIASES)
#: precisions that store the weights in 16 bits (fp32 scoring and bf16 autocast need float32 weights)
HALF_WEIGHT_PRECISIONS = ("bf16", "pure_bf16", "fp16", "pure_fp16")
#: --lr-scheduler: open_clip's schedules (open_clip_train.scheduler), all after the linear --warmup
LR_SCHEDULERS = ("cosine", "const", "const-cooldown")
#: --report-to's targets (``all`` = both, ``none`` = neither)
REPORT_TARGETS = ("tensorboard", "wandb")
#: the reference code's defaults, which apply when its switch --select is given and the flag is not
#: (the project's own --select-strategy keeps the project's defaults, the fields' own)
REFERENCE_DEFAULTS = {"select_rate": 0.5, "warmup_point": 5}

#: the sections of --help, in order; a field goes into its dataclass's section (TrainConfig's field name)
#: unless its opt() names another
SECTIONS = {
    "data": "data",
    "zeroshot": "zero-shot classification (open_clip's flags)",
    "model": "model",
    "optim": "optimisation",
    "select": "selection",
    "dist": "distributed (torchrun)",
    "run": "run",
}

_NO_FLAG_DEFAULT = object()


def opt(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    aliases: dict[str, str] | None = None,
    refused: dict[str, str] | None = None,
    section: str | None = None,
    action: type[argparse.Action] | None = None,
    metavar: str | None = None,
    negate: bool = False,
    flag_default: Any = _NO_FLAG_DEFAULT,
) -> Any:
    """A config field and its command-line option, declared together.

    ``flags``: the option strings (default ``--field-name``; the first names the argparse destination).
    ``choices``: the closed set of values, checked once, in ``__post_init__`` (:func:`_check_fields`); a choice
    ending in ``:N`` also takes that prefix with a number (``cuda:N``: ``cuda:0``, ``cuda:1``, ...).
    ``aliases``: other spellings, replaced by the value they stand for. ``refused``: values that are refused with
    their own message (what to do instead).
    ``negate``: a bool field set by a ``--no-...`` switch (the field is ``not`` the switch).
    ``flag_default``: the option's default when it differs from the field's (None: "not given").
    A bool field is a store_true switch unless ``action`` names another (e.g. BooleanOptionalAction).
    """
    meta = {
        "help": help,
        "flags": flags,
        "choices": choices,
        "aliases": aliases or {},
        "refused": refused or {},
        "section": section,
        "action": action,
        "metavar": metavar,
        "negate": negate,
        "flag_default": flag_default,
    }
    return field(default=default, metadata=meta)


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


def _dest(f: dataclasses.Field) -> str:
    """argparse's destination of a field's option (argparse's own rule: the first flag, dashes to underscores)."""
    return _flags(f)[0].lstrip("-").replace("-", "_")


def _one_of(choices: tuple[str, ...]) -> str:
    listed = ", ".join(choices[:-1]) + " or " + choices[-1]
    return "one of " + listed if len(choices) > 2 else listed


def _is_choice(value: Any, choices: tuple[str, ...]) -> bool:
    if value in choices:
        return True
    return isinstance(value, str) and any(
        c.endswith(":N") and re.fullmatch(re.escape(c[:-1]) + r"\d+", value) for c in choices
    )


def _check_fields(cfg: Any) -> None:
    """The checks every section's fields get from their declaration: a value in ``choices`` (an alias replaced
    by the value it stands for, a refused value with its own message) and a finite number in every float field.
    A NaN or Inf hyper-parameter passes every range check written as ``not a < x`` and poisons the first
    optimizer step (the weights, then every checkpoint after it)."""
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if "float" in str(f.type) and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flags(f)[0]} must be a finite number, got {value}")
        if not m.get("choices"):
            continue
        if value in m["refused"]:
            raise ConfigError(f"{_flags(f)[0]} {value}: {m['refused'][value]}")
        value = m["aliases"].get(value, value)
        if not _is_choice(value, m["choices"]):
            also = ", ".join(f"{a} = {v}" for a, v in m["aliases"].items())
            raise ConfigError(
                f"{_flags(f)[0]} must be {_one_of(m['choices'])}{f' (also: {also})' if also else ''}, got {value!r}"
            )
        setattr(cfg, f.name, value)


@dataclass
class DataConfig:
    """Where the shards are and how they are loaded."""

    train_data: str = opt(
        "",
        "shard dir (with index.json), brace pattern or glob of .tar; required unless --data-backend synthetic",
        flag_default=None,
    )
    val_data: str | None = opt(
        None, "validation shards, same forms as --train-data; evaluated every --val-every epochs"
    )
    train_num_samples: int | None = opt(
        None,
        "samples per epoch; smaller than the data = a shorter epoch (open_clip's meaning); default: the "
        "dataset index's count. --data-backend synthetic: the epoch size and id range, default 100 batches "
        "(100 x batch size x ranks)",
    )
    dataset_type: str = opt(
        "webdataset",
        "webdataset | auto (both read .tar shards); csv: convert first with `dissect-fast shards`",
        choices=("webdataset", "auto"),
        refused={
            "csv": "is not read directly: convert the CSV to shards with `dissect-fast shards --csv FILE --images "
            "DIR --out DIR` and pass --train-data DIR/train",
            "synthetic": "is not supported: for random data made on the device (timing) use --data-backend "
            "synthetic; for a learnable synthetic set write shards with `dissect-fast synth --out DIR` and pass "
            "--train-data DIR/train",
        },
    )
    dataset_resampled: bool = opt(
        False,
        "draw shards with replacement (open_clip's meaning); needs a known epoch "
        "size (--train-num-samples or a dataset index)",
    )
    batch_size: int = opt(256, "per-rank batch size B before selection")
    workers: int = opt(2, "loader worker processes per rank")
    data_backend: str = opt(
        "auto",
        "loader: auto = DALI when CUDA and DALI are there, else gpu on CUDA, else torch; torch = CPU workers "
        "decode and transform, ship uint8; gpu = CPU workers ship the encoded bytes, the training device decodes "
        "(torchvision's nvjpeg) and transforms (on a CPU device too: for testing); synthetic = random images and "
        "tokens made once on the device, fresh ids every step (times the training loop without loader cost; "
        "--train-data not read; never picked by auto)",
        choices=("auto", "torch", "gpu", "dali", "synthetic"),
    )
    subset: str | None = opt(None, ".npy of sample ids to train on (from select-subset)")
    data_index: str | None = opt(
        None,
        "the dataset index (index.json or its folder) of --train-data when it is not beside the shards, e.g. "
        "for pipe:/http URLs: ids and counts come from it",
    )
    max_bad_fraction: float = opt(0.01, "stop when a larger share of samples is unreadable")
    max_image_pixels: int = opt(
        40_000_000,
        "images with more pixels are bad samples (image_too_large), judged from the header before decoding "
        "(decompression bombs; PIL's own limit is 179 Mpx)",
    )
    max_member_bytes: int = opt(
        64 << 20, "tar members larger than this many bytes are bad samples (member_too_large), skipped unread"
    )
    imagenet_val: str | None = opt(
        None,
        "ImageNet validation set as an ImageFolder (1000 class folders): zero-shot top-1/top-5 with "
        "open_clip's class names and templates",
        section="zeroshot",
    )
    imagenet_v2: str | None = opt(
        None, "ImageNetV2 as an ImageFolder (class folders 0..999): zero-shot top-1/top-5", section="zeroshot"
    )
    zeroshot_data: str | None = opt(
        None, "any ImageFolder: zero-shot top-1/top-5 with the folder names as class names", section="zeroshot"
    )
    zeroshot_classnames: str | None = opt(
        None,
        "with --zeroshot-data: a text file of class names, one per line, in the folders' order",
        section="zeroshot",
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.zeroshot_classnames is not None and self.zeroshot_data is None:
            raise ConfigError(
                f"--zeroshot-classnames {self.zeroshot_classnames}: needs --zeroshot-data (the ImageFolder whose "
                f"class names it lists, one per line, in the folders' order)"
            )
        if self.data_backend == "synthetic":
            self._check_synthetic()
        elif not self.train_data:
            raise ConfigError(
                "--train-data is required: a shard directory, a brace pattern or a glob of .tar files "
                "(or --data-backend synthetic to time the training loop on random data)"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.train_num_samples is not None and self.train_num_samples < 1:
            raise ConfigError("--train-num-samples must be >= 1 (or left out to use the dataset index)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_image_pixels < 64:
            raise ConfigError(f"--max-image-pixels must be >= 64 (an 8 x 8 image), got {self.max_image_pixels}")
        if self.max_member_bytes < 1024:
            raise ConfigError(f"--max-member-bytes must be >= 1024, got {self.max_member_bytes}")

    def _check_synthetic(self) -> None:
        """--data-backend synthetic reads no shards: the flags that describe shards contradict it."""
        for flag, given in (
            ("--subset", self.subset is not None),
            ("--data-index", self.data_index is not None),
            ("--dataset-resampled", self.dataset_resampled),
        ):
            if given:
                raise ConfigError(
                    f"{flag} describes shards, which --data-backend synthetic does not read: drop "
                    f"{flag}, or train on real shards with --data-backend torch/dali"
                )


@dataclass
class ModelConfig:
    """Which CLIP to build and how to run it."""

    model: str = opt("RN50", "open_clip model name or a dissect_fast tiny config")
    model_config: str | None = opt(None, "open_clip-style model JSON (overrides --model)")
    precision: str = opt(
        "auto",
        "open_clip's: amp (fp16 autocast + grad scaler), amp_bf16 (= amp_bfloat16: bf16 autocast), bf16 / "
        "fp16 (weights in bf16 / fp16, LayerNorms in fp32), pure_bf16 / pure_fp16 (every weight in bf16 / "
        "fp16), fp32; auto = amp_bf16 on CUDA, fp32 on CPU",
        choices=PRECISION_CHOICES,
        aliases=PRECISION_ALIASES,
    )
    device: str = opt("auto", "auto | cpu | cuda | cuda:N", choices=("auto", "cpu", "cuda", "cuda:N"))
    compile: bool = opt(False, "torch.compile the training and scoring forwards", flags=("--compile", "--torchcompile"))
    score_scale: str = opt(
        "100",
        "CLIPScore scale: 100 (reference) or the model's learned logit scale (logit_scale.exp())",
        choices=("100", "learned"),
    )
    score_resolution: int | None = opt(
        None,
        "score at this image side in pixels (ViT: position embeddings interpolated; a multiple of the patch "
        "size, <= image size)",
    )
    score_patch_dropout: float = opt(0.0, "ViT only: share of patch tokens dropped at random in the scoring pass")
    score_precision: str = opt(
        "auto",
        "the scoring forward's precision: auto = the training's --precision (bf16 autocast under amp_bf16); "
        "fp32 = no autocast, as the reference scores; bf16 = bf16 autocast (fp32 and bf16 need float32 weights)",
        choices=("auto", "fp32", "bf16"),
    )
    score_cudagraphs: bool = opt(
        False, "with --compile on CUDA: compile the scoring pass with CUDA graphs (reduce-overhead)"
    )
    pretrained: str | None = opt(
        None,
        "initial weights: a checkpoint file (open_clip or dissect_fast) or an open_clip pretrained tag of "
        "--model (HF_HUB_OFFLINE=1: only from the local Hugging Face cache)",
    )
    lock_image: bool = opt(False, "LiT: freeze the image tower (open_clip's lock_image_tower)")
    lock_image_unlocked_groups: int = opt(0, "with --lock-image: leave the last N image-tower layer groups trainable")
    lock_image_freeze_bn_stats: bool = opt(
        False, "with --lock-image: freeze the running statistics of the locked BatchNorm layers"
    )
    lock_text: bool = opt(False, "freeze the text tower (open_clip's lock_text_tower)")
    lock_text_unlocked_layers: int = opt(0, "with --lock-text: leave the last N text-tower layers trainable")
    lock_text_freeze_layer_norm: bool = opt(
        False, "with --lock-text: freeze the LayerNorms of the locked layers too (else they train)"
    )
    grad_checkpointing: bool = opt(
        False, "activation checkpointing in both towers (less memory, one more forward per step)"
    )
    siglip: bool = opt(
        False,
        "SigLIP's sigmoid loss (open_clip's SigLipLoss) instead of the softmax contrastive "
        "loss (logit scale/bias initialised to log 10 / -10, as open_clip does)",
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        for flag, n in (
            ("--lock-image-unlocked-groups", self.lock_image_unlocked_groups),
            ("--lock-text-unlocked-layers", self.lock_text_unlocked_layers),
        ):
            if n < 0:
                raise ConfigError(f"{flag} must be >= 0, got {n}")
        for flag, given, lock in (
            ("--lock-image-unlocked-groups", self.lock_image_unlocked_groups > 0, "--lock-image"),
            ("--lock-image-freeze-bn-stats", self.lock_image_freeze_bn_stats, "--lock-image"),
            ("--lock-text-unlocked-layers", self.lock_text_unlocked_layers > 0, "--lock-text"),
            ("--lock-text-freeze-layer-norm", self.lock_text_freeze_layer_norm, "--lock-text"),
        ):
            if given and not getattr(self, lock[2:].replace("-", "_")):
                raise ConfigError(f"{flag} applies to a locked tower: add {lock}, or drop {flag}")
        if self.score_resolution is not None and self.score_resolution < 1:
            raise ConfigError(f"--score-resolution must be >= 1 pixel (or left out), got {self.score_resolution}")
        if not 0.0 <= self.score_patch_dropout < 1.0:
            raise ConfigError(f"--score-patch-dropout must be in [0, 1), got {self.score_patch_dropout}")
        # the model-dependent checks (ViT only, <= image size, multiple of the patch size) run in
        # dissect_fast.preflight once the model name is resolved
        if self.score_precision != "auto" and self.precision in HALF_WEIGHT_PRECISIONS:
            raise ConfigError(
                f"--score-precision {self.score_precision} needs float32 weights, but --precision {self.precision} "
                f"stores them in 16 bits: use --precision amp_bf16, amp or fp32, or --score-precision auto"
            )


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then cosine schedule (open_clip's defaults)."""

    epochs: int = opt(32, "training epochs")
    lr: float = opt(5e-4, "peak learning rate (AdamW, cosine schedule)")
    wd: float = opt(0.2, "weight decay (not on gains, biases, logit scale)")
    warmup: int = opt(10000, "linear LR warm-up steps")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.98, "AdamW beta2")
    eps: float = opt(1e-6, "AdamW epsilon")
    grad_clip_norm: float | None = opt(None, "clip the gradient norm to this (None: off)")
    accum_freq: int = opt(
        1,
        "gradient accumulation: one optimizer step per N batches, the contrastive loss over all "
        "N (selected) sub-batches; selection runs on each batch of --batch-size",
    )
    lr_scheduler: str = opt(
        "cosine",
        "open_clip's LR schedules (open_clip_train.scheduler), all after the linear --warmup: cosine "
        "(decay to 0), const, const-cooldown (const, then a decay over the last --epochs-cooldown epochs)",
        choices=LR_SCHEDULERS,
    )
    epochs_cooldown: int | None = opt(None, "const-cooldown: the cooldown runs over the last N epochs")
    lr_cooldown_end: float = opt(0.0, "const-cooldown: the LR at the end")
    lr_cooldown_power: float = opt(1.0, "const-cooldown: polynomial decay (1 - e / es) ** power (1: linear)")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.lr_scheduler == "const-cooldown" and self.epochs_cooldown is None:
            raise ConfigError("--lr-scheduler const-cooldown needs --epochs-cooldown N: the last N epochs decay the LR")
        if self.epochs_cooldown is not None and not 1 <= self.epochs_cooldown <= self.epochs:
            raise ConfigError(f"--epochs-cooldown must be in [1, --epochs {self.epochs}], got {self.epochs_cooldown}")
        if self.lr_cooldown_end < 0:
            raise ConfigError(f"--lr-cooldown-end must be >= 0, got {self.lr_cooldown_end}")
        if self.lr_cooldown_power <= 0:
            raise ConfigError(f"--lr-cooldown-power must be > 0 (1 = linear decay), got {self.lr_cooldown_power}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.wd < 0:
            raise ConfigError(f"--wd must be >= 0, got {self.wd}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0 steps, got {self.warmup}")
        if self.accum_freq < 1:
            raise ConfigError(f"--accum-freq must be >= 1 batch per optimizer step, got {self.accum_freq}")
        for flag, beta in (("--beta1", self.beta1), ("--beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"{flag} must be in [0, 1) (AdamW's moment decay), got {beta}")
        if self.eps <= 0:
            raise ConfigError(f"--eps must be > 0 (AdamW's denominator guard), got {self.eps}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(f"--grad-clip-norm must be > 0 (or left out: no clipping), got {self.grad_clip_norm}")


@dataclass
class SelectConfig:
    """Online batch selection (METHOD.md); the parser adds the reference's --select switch
    (select_strategy_from_flags)."""

    strategy: str = opt(
        "full",
        "one of " + ", ".join(STRATEGIES) + " (reference names accepted, `ours` = dissect-warmup); implies "
        "--select; None: full without --select, dissect-warmup with it",
        flags=("--select-strategy",),
        flag_default=None,
        choices=tuple(STRATEGIES),
        aliases=STRATEGY_ALIASES,
    )
    rate: float = opt(
        0.2,
        f"r: share of each batch trained on, k = floor(r * B); {REFERENCE_DEFAULTS['select_rate']} when the "
        f"reference's --select is given without it (the reference's default)",
        flags=("--select-rate",),
    )
    warmup_point: int = opt(
        10,
        f"dissect-warmup: warm-up epochs (epochs < W); {REFERENCE_DEFAULTS['warmup_point']} when the reference's "
        f"--select is given without it (the reference's default)",
    )
    momentum: float = opt(0.9, "dissect-momentum: history momentum beta")
    warmup_train: str = opt(
        "random",
        "dissect-warmup: what the warm-up epochs train on (random k-subset or the full batch)",
        choices=("random", "full"),
    )
    warmup_record: str = opt(
        "last",
        "dissect-warmup: which warm-up epochs record w. last = only epoch W-1 is scored (no scoring pass "
        "before it); samples it does not score (dropped batch tails) get w = 0, and the run logs their share "
        "(select/warmup_unscored_fraction). every = score and record every warm-up epoch, as the reference "
        "does: a sample missed in epoch W-1 keeps its earlier warm-up score (costs a scoring pass per "
        "warm-up step with --warmup-train random). Shorter-than-data epochs always record every epoch",
        choices=("last", "every"),
    )
    backend: str = opt(
        "auto",
        "selection op: auto = fused Triton kernel on CUDA; triton; torch = the unfused reference",
        flags=("--select-backend",),
        choices=("auto", "triton", "torch"),
    )
    history_dtype: str = opt(
        "fp32", "history buffer storage: fp32 (4 B/sample) or bf16 (2 B/sample)", choices=("fp32", "bf16")
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        if not 0.0 < self.rate <= 1.0:
            raise ConfigError(f"--select-rate must be in (0, 1], got {self.rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.warmup_point < 1 and self.strategy in WARMUP_STRATEGIES:
            raise ConfigError(f"--warmup-point must be >= 1 epoch for {self.strategy}, got {self.warmup_point}")

    def k(self, batch_size: int) -> int:
        """Samples trained per rank and step."""
        return batch_size if self.strategy == "full" else int(self.rate * batch_size)


@dataclass
class DistConfig:
    """Multi-GPU / multi-node training under torchrun (ignored in a single process)."""

    local_loss: bool = opt(False, "ClipLoss over local vs gathered features (open_clip's --local-loss)")
    gather_with_grad: bool = opt(
        True,
        "all-gather features with gradient in ClipLoss (exact full-batch gradient)",
        action=argparse.BooleanOptionalAction,
    )
    check_sync_every: int = opt(
        0, "verify identical history buffers across ranks every N steps (0: at epoch ends only)"
    )
    dist_timeout: float = opt(10.0, "minutes a collective waits for a dead peer before the rank fails")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.check_sync_every < 0:
            raise ConfigError(
                f"--check-sync-every must be >= 0 steps (0: epoch ends only), got {self.check_sync_every}"
            )
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout must be > 0 minutes, got {self.dist_timeout}")


@dataclass
class RunConfig:
    """Logging, checkpoints, seeds."""

    logs: str = opt(
        "./logs",
        "folder of the run folders; under torchrun use --logs-dir: torchrun rejects --logs "
        "(unless `--` precedes the script)",
        flags=("--logs", "--logs-dir"),
    )
    name: str | None = opt(
        None,
        "run folder under --logs (may hold slashes); None: STRATEGY-DATE. An existing run "
        "is refused unless --resume is given",
    )
    resume: str | None = opt(
        None,
        "checkpoint path or `latest` (this run's newest intact checkpoint): continues the run with the config the "
        "checkpoint holds; flags given now that change the training are refused (see --resume-override)",
    )
    resume_override: bool = opt(
        False,
        "with --resume: apply flags that differ from the checkpoint's config and change the training (batch size, "
        "LR, strategy, ...) instead of refusing them; recorded in RUN/resumes.jsonl",
    )
    seed: int = opt(0, "random seed (rank r uses seed + r)")
    log_every_n_steps: int = opt(10, "read the loss on the host every N steps")
    val_every: int = opt(1, "evaluate every N epochs (and after the last)", flags=("--val-every", "--val-frequency"))
    zeroshot_frequency: int = opt(
        2, "zero-shot evaluation every N epochs (and after the last); 0: never", section="zeroshot"
    )
    record: bool = opt(
        False, "write select_record/record_EPOCH.npz per epoch: per sample id what was scored and selected"
    )
    plots: bool = opt(True, "write no plots", flags=("--no-plots",), negate=True)
    tensorboard: bool = opt(
        True,
        "write no tensorboard events (drops tensorboard from --report-to)",
        flags=("--no-tensorboard",),
        negate=True,
    )
    report_to: str = opt(
        "tensorboard",
        "tensorboard | wandb | 'wandb,tensorboard' | none: where epoch metrics and the train/ scalars "
        "of every log step go (RUN/steps.jsonl is always written); wandb: `pip install wandb`",
    )
    wandb_project_name: str = opt("open-clip", "wandb project (with --report-to wandb)")
    wandb_notes: str = opt("", "notes of the wandb run (with --report-to wandb)")
    save_frequency: int = opt(
        1,
        "write checkpoints/epoch_N.pt every N epochs (0: only the last); the last epoch is "
        "always saved and latest.pt always holds the newest state",
    )
    save_most_recent: bool = opt(
        True,
        "keep checkpoints/latest.pt as the newest state after every epoch (always on: "
        "resume needs it; accepted for open_clip command lines)",
    )
    delete_previous_checkpoint: bool = opt(
        False, "after a new epoch_N.pt is written and verified, delete the older epoch checkpoints"
    )
    progress: bool = opt(True, "no progress bar", flags=("--no-progress",), negate=True)
    max_nonfinite_steps: int = opt(
        10, "stop after this many consecutive steps with a non-finite loss/gradient (each is skipped)"
    )
    profile_steps: str | None = opt(
        None,
        "profile global steps A..B-1 (0-based, e.g. 10:20): torch.profiler trace with the step's phases as "
        "ranges into RUN/profile/ (plus top_ops.txt, phases.json); on CUDA also NVTX ranges and "
        "cudaProfilerStart/Stop for `nsys profile --capture-range=cudaProfilerApi`",
        metavar="A:B",
    )

    def __post_init__(self) -> None:
        _check_fields(self)
        self.report_to = parse_report_to(self.report_to)
        if not self.tensorboard:  # --no-tensorboard: an alias of leaving tensorboard out of --report-to
            self.report_to = ",".join(t for t in self.report_to.split(",") if t != "tensorboard") or "none"
        self.tensorboard = "tensorboard" in self.report_to.split(",")
        if self.save_frequency < 0:
            raise ConfigError(f"--save-frequency must be >= 0 epochs (0: last epoch only), got {self.save_frequency}")
        if not self.save_most_recent:
            raise ConfigError(
                "save_most_recent=False is not supported: checkpoints/latest.pt is always kept (--resume "
                "latest, torchelastic restarts and SIGTERM checkpoints use it)"
            )
        if self.profile_steps is not None:
            start, stop = parse_profile_steps(self.profile_steps)
            self.profile_steps = f"{start}:{stop}"
        if self.log_every_n_steps < 1:
            raise ConfigError(f"--log-every-n-steps must be >= 1, got {self.log_every_n_steps}")
        if self.val_every < 1:
            raise ConfigError(f"--val-every must be >= 1 epoch, got {self.val_every}")
        if self.zeroshot_frequency < 0:
            raise ConfigError(f"--zeroshot-frequency must be >= 0 epochs (0: never), got {self.zeroshot_frequency}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max-nonfinite-steps must be >= 1 step, got {self.max_nonfinite_steps}")
        if self.resume_override and self.resume is None:
            raise ConfigError("--resume-override applies to a resumed run: add --resume latest (or a checkpoint path)")

    def profile_window(self) -> tuple[int, int] | None:
        """(A, B) of --profile-steps: profile global steps A..B-1; None without the flag."""
        return parse_profile_steps(self.profile_steps) if self.profile_steps is not None else None


def parse_report_to(value: str) -> str:
    """--report-to as open_clip takes it (``tensorboard``, ``wandb``, ``wandb,tensorboard``; ``all`` = both;
    ``none`` or empty = neither), normalised to ``none``, ``tensorboard``, ``wandb`` or ``wandb,tensorboard``."""
    parts = {p.strip() for p in str(value).split(",") if p.strip()}
    if "all" in parts:
        parts = (parts - {"all"}) | set(REPORT_TARGETS)
    parts.discard("none")
    unknown = parts - set(REPORT_TARGETS)
    if unknown:
        raise ConfigError(
            f"--report-to takes tensorboard, wandb, 'wandb,tensorboard' or none, got {value!r} "
            f"(unknown: {', '.join(sorted(unknown))})"
        )
    return ",".join(t for t in ("wandb", "tensorboard") if t in parts) or "none"


def parse_profile_steps(value: str) -> tuple[int, int]:
    """``"A:B"`` -> (A, B), integers with 0 <= A < B; ConfigError naming --profile-steps otherwise."""
    start, sep, stop = str(value).partition(":")
    a: int | None
    b: int | None
    try:
        a, b = int(start), int(stop)
    except ValueError:
        a = b = None
    if not sep or a is None or b is None or not 0 <= a < b:
        raise ConfigError(
            f"--profile-steps must be A:B, global step numbers with 0 <= A < B (e.g. 10:20 profiles "
            f"steps 10..19), got {value!r}"
        )
    return a, b


@dataclass
class TrainConfig:
    """Everything one training run needs: one section per component (the keys of config.json)."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        s, o = self.select, self.optim
        k = s.k(self.data.batch_size)
        if k < 2:  # per rank and per batch (--accum-freq adds batches, not pairs to a batch's selection)
            rate = "" if s.strategy == "full" else f"--select-rate {s.rate} x "
            raise ConfigError(
                f"{rate}--batch-size {self.data.batch_size} leaves k = {k} pair(s) per batch to train on, and a "
                f"contrastive loss over fewer than 2 pairs is always 0: raise --select-rate or --batch-size "
                f"(k = floor(rate x batch size) >= 2)"
            )
        if s.strategy in WARMUP_STRATEGIES and s.warmup_point >= o.epochs:
            raise ConfigError(
                f"--warmup-point {s.warmup_point} >= --epochs {o.epochs}: the warm-up would never end; "
                f"use a warm-up point below the number of epochs"
            )
        if s.strategy in ("small_loss", "big_loss") and self.data.batch_size < 2:
            raise ConfigError("small_loss / big_loss need --batch-size >= 2 (the loss is contrastive)")
        if self.model.siglip and self.dist.local_loss:
            raise ConfigError(
                "--local-loss is a ClipLoss option; --siglip's SigLipLoss exchanges text features with "
                "the neighbouring ranks instead: drop --local-loss"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sections() -> dict[str, type]:
    """TrainConfig's sections: field name -> dataclass, in order."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    """The argparse option of one opt() field."""
    m = f.metadata
    kw: dict[str, Any] = {"help": m["help"], "dest": _dest(f)}
    base = str(f.type).replace(" | None", "")
    if m["negate"]:
        kw["action"] = "store_true"
    elif base == "bool":
        kw["action"], kw["default"] = m["action"] or "store_true", f.default
    else:
        kw["default"] = f.default if m["flag_default"] is _NO_FLAG_DEFAULT else m["flag_default"]
        if base in ("int", "float"):
            kw["type"] = {"int": int, "float": float}[base]
        if m["metavar"] or m["choices"]:  # choices are checked once, by the dataclass (aliases, refusals)
            kw["metavar"] = m["metavar"] or "{" + ",".join(m["choices"]) + "}"
    group.add_argument(*_flags(f), **kw)


def _is_main_process() -> bool:
    """Rank 0 (or a single process) by the launcher's environment: torchrun's RANK, srun's SLURM_PROCID."""
    if "RANK" in os.environ:
        return os.environ["RANK"] in ("", "0")
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return os.environ.get("SLURM_PROCID", "0") in ("", "0")
    return True


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line plus "see --help" (no usage dump), printed by rank 0 only:
    under torchrun every rank exits 2 and the user reads the message once."""

    def error(self, message: str) -> typing.NoReturn:
        if _is_main_process():
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        else:  # the same error on every rank: let rank 0 print before torchrun stops the group on our exit
            import time

            time.sleep(2.0)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The training flags, generated from the config fields: open_clip's names where open_clip has the flag, the
    DISSect reference's for selection."""
    p = OneLineErrorParser(
        prog="dissect-fast train" if os.path.basename(sys.argv[0]) == "dissect-fast" else "dissect_fast.train",
        description="Train a CLIP model with DISSect online sample selection (or a baseline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fields = [
        (f.metadata["section"] or name, f) for name, section in _sections().items() for f in dataclasses.fields(section)
    ]
    for key, title in SECTIONS.items():
        group = p.add_argument_group(title)
        if key == "select":  # the reference's switch: no field of its own (select_strategy_from_flags)
            group.add_argument(
                "--select",
                action="store_true",
                help="train on a selected share of every batch (reference switch); alone: dissect-warmup",
            )
        for f in (f for k, f in fields if k == key):
            _add_option(group, f)
    return p


def select_strategy_from_flags(select: bool, strategy: str | None) -> str:
    """The strategy the reference's two flags name: --select alone = dissect-warmup, a strategy alone implies
    selection, neither = full (SelectConfig resolves the name; :func:`config_from_values` refuses --select with a
    strategy that trains on the whole batch)."""
    if strategy is None:
        return "dissect-warmup" if select else "full"
    return strategy


def _section_kwargs(section: type, values: dict[str, Any]) -> dict[str, Any]:
    """One section's fields from the parsed options; an option left at a None flag_default keeps the field default."""
    kwargs = {}
    for f in dataclasses.fields(section):
        value = values[_dest(f)]
        if f.metadata["negate"]:
            value = not value
        elif value is None and f.default is not None:
            continue
        kwargs[f.name] = value
    return kwargs


#: what a CSV or TSV file given as training or validation data looks like (open_clip's --dataset-type csv input)
_CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
#: open_clip's CSV flags: refused by the trainer, taken by `dissect-fast shards` with the same meaning
_CSV_FLAGS = ("--csv-img-key", "--csv-caption-key", "--csv-separator")


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``; the last one wins), None if absent."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _images_dir_of(csv_path: str, img_key: str | None, sep: str | None) -> str | None:
    """The folder the first row's image path of an open_clip CSV is found under (the CSV's folder, its
    ``images`` sub-folder or the working directory); None when it is none of them or the file is unreadable."""
    import csv
    import gzip

    from dissect_fast.tools.csv_shards import IMG_KEYS

    opener = gzip.open if csv_path.lower().endswith(".gz") else open
    try:
        with opener(csv_path, "rt", newline="", encoding="utf-8") as f:
            header = f.readline()
            delim = sep or ("\t" if "\t" in header else ",")
            fields = next(csv.reader([header], delimiter=delim))
            row = next(csv.reader([f.readline()], delimiter=delim), [])
    except (OSError, UnicodeDecodeError, StopIteration):
        return None
    key = img_key or next((k for k in IMG_KEYS if k in fields), None)
    if key not in fields or fields.index(key) >= len(row):
        return None
    rel, here = row[fields.index(key)], os.path.dirname(csv_path) or "."
    if os.path.isabs(rel):
        return here  # absolute paths: any folder does
    for folder in (here, os.path.join(here, "images"), "."):
        if os.path.isfile(os.path.join(folder, rel)):
            return folder
    return None


def csv_data_message(argv: list[str]) -> str | None:
    """One line for a CSV/TSV file given as --train-data or --val-data: the `dissect-fast shards` command that turns
    it into shards (with any open_clip --csv-* flags of ``argv``), and the --train-data to pass then; else None."""
    import shlex

    for flag in ("--train-data", "--val-data"):
        value = _flag_value(argv, flag)
        if value is None or not value.lower().endswith(_CSV_SUFFIXES):
            continue
        base = value[: -len(".gz")] if value.lower().endswith(".gz") else value
        out = os.path.splitext(base)[0] + "-shards"
        images = _images_dir_of(value, _flag_value(argv, "--csv-img-key"), _flag_value(argv, "--csv-separator"))
        cmd = ["dissect-fast", "shards", "--csv", value, "--images", images or "IMAGE_FOLDER"]
        for csv_flag in _CSV_FLAGS:
            v = _flag_value(argv, csv_flag)
            if v is not None:
                cmd += [csv_flag, v]
        cmd += ["--out", out] + (["--val-fraction", "0.01"] if flag == "--train-data" else [])
        return (
            f"{flag} {value} is a CSV file; the trainer reads webdataset shards: convert it once with "
            f"`{shlex.join(cmd)}` (--images: the folder its image paths are relative to), then pass "
            f"{flag} {shlex.quote(out + '/train')}"
        )
    return None


def option_strings(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """Every option string of the training parser (``parser``: one already built)."""
    return {s for a in (parser or build_parser())._actions for s in a.option_strings}


def given_dests(argv: list[str]) -> set[str]:
    """The argparse destinations given on the command line ``argv`` (parsed again with every default
    suppressed, so a flag given with its default value counts as given)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    known, _ = parser.parse_known_args(argv)
    return set(vars(known))


#: options never taken from the resumed run: where the run is found (the command line's --logs/--name, even when the
#: run folder was moved), the resume itself, and --resume-override (an override holds for the start that gives it)
_NEVER_FILLED = frozenset({"run.logs", "run.name", "run.resume", "run.resume_override"})


def resume_source(resume: str | None, logs: str, name: str | None) -> tuple[str, dict] | None:
    """(where, resolved config dict) that ``--resume`` continues: the checkpoint's ``config`` (the one the Trainer
    will resume from: ``latest`` = the run's newest intact checkpoint, kept loaded for it), else, for ``latest`` in
    a run that has no checkpoint yet, its RUN/config.json. None: nothing to continue (no --resume, no --name to
    find the run by, a missing file (preflight names it), a checkpoint without a config such as open_clip's).
    Reads the disk and imports torch: called only with --resume."""
    if resume is None or (resume == "latest" and name is None):
        return None
    if resume != "latest" and not os.path.isfile(resume):
        return None
    from dissect_fast.training import checkpoint as ckpt_io

    try:
        if resume == "latest":
            run_dir = os.path.join(logs, name or "")
            found = ckpt_io.find_resumable(os.path.join(run_dir, "checkpoints"), keep=True, report=False)
            if found is None:
                path = os.path.join(run_dir, "config.json")
                return (path, _read_json(path)) if os.path.isfile(path) else None
            path, state = found
        else:
            path, state = resume, ckpt_io.load_checkpoint(resume, keep=True)
    except ckpt_io.CheckpointError as e:
        raise ConfigError(str(e)) from None
    cfg = state.get("config")
    return (path, cfg) if isinstance(cfg, dict) else None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume latest: {path} cannot be read ({e}): restore it, or start a new --name") from e


def fill_resume_values(values: dict[str, Any], given: set[str], old: dict | None) -> dict[str, Any]:
    """The parsed options ``values`` with every option not ``given`` on the command line set to the resumed run's
    value (``old``: its resolved config dict; None: nothing to resume, ``values`` unchanged). A flag given keeps its
    value (dissect_fast.training.resume then allows or refuses the change)."""
    if old is None:
        return values
    out = dict(values)
    for section_name, section in _sections().items():
        old_section = old.get(section_name) or {}
        for f in dataclasses.fields(section):
            dest = _dest(f)
            if dest in given or f.name not in old_section or f"{section_name}.{f.name}" in _NEVER_FILLED:
                continue
            value = old_section[f.name]
            out[dest] = (not value) if f.metadata["negate"] else value
    # the reference's --select switch and --select-strategy: the checkpoint's strategy unless either is given
    if "select" in given and "select_strategy" not in given:
        out["select_strategy"] = values["select_strategy"]  # --select alone: dissect-warmup, as on a first start
    # --no-tensorboard is derived from --report-to in the config: a --report-to given now decides alone
    if "report_to" in given and "no_tensorboard" not in given:
        out["no_tensorboard"] = values["no_tensorboard"]
    return out


def reference_defaults(values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """With the reference's switch --select, the reference's defaults (:data:`REFERENCE_DEFAULTS`) for the flags
    not given; without it (the project's --select-strategy alone), the project's defaults stay."""
    if not values.get("select"):
        return values
    return {**values, **{dest: v for dest, v in REFERENCE_DEFAULTS.items() if dest not in given}}


def config_from_values(values: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of parsed option values (the first invalid section's message wins); ConfigError."""
    sections = {}
    for name, section in _sections().items():
        kwargs = _section_kwargs(section, values)
        if name == "select":
            kwargs["strategy"] = select_strategy_from_flags(values["select"], values["select_strategy"])
        sections[name] = section(**kwargs)
    if values["select"] and sections["select"].strategy == "full":
        raise ConfigError(
            f"--select with --select-strategy {values['select_strategy']}: it trains on the whole batch; "
            f"drop --select, or name a selection strategy"
        )
    return TrainConfig(**sections)


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags into a validated TrainConfig (stage 1: nothing on disk is checked, see
    dissect_fast.preflight); exits with a one-line message on invalid input."""
    parser = build_parser()
    args = sys.argv[1:] if argv is None else list(argv)
    msg = csv_data_message(args)
    if msg:  # before the generic refusal of open_clip's --csv-* flags: the exact command to run instead
        parser.error(msg)
    msg = check_unsupported(args, option_strings(parser))
    if msg:  # an open_clip flag we do not take: say what to use instead, not "unrecognized arguments"
        parser.error(msg)
    values = vars(parser.parse_args(args))
    try:
        given = given_dests(args)
        values = reference_defaults(values, given)
        found = resume_source(values["resume"], values["logs"], values["name"])
        return config_from_values(fill_resume_values(values, given, found[1] if found else None))
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
