"""Typed, validated configuration: one dataclass per component, built from open_clip-style flags.

Every check that can fail on user input runs here, before any data is read or any GPU work starts,
and its message names the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from dissect_fast.openclip_flags import check_unsupported
from dissect_fast.selection.strategies import STRATEGIES, WARMUP_STRATEGIES, resolve_strategy


class ConfigError(ValueError):
    """Invalid user configuration; the message names the flag and how to fix it."""


#: --precision: open_clip's values (amp_bfloat16 = amp_bf16) plus auto; dissect_fast.model.precision_spec gives
#: each one's weight dtype, input dtype, autocast and grad scaler
PRECISIONS = ("auto", "fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "pure_bf16", "fp16", "pure_fp16")


def _looks_like_path(value: str) -> bool:
    """A --pretrained value meant as a file (a folder in it, or a checkpoint suffix), not an open_clip tag."""
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))


@dataclass
class DataConfig:
    """Where the shards are and how they are loaded."""

    train_data: str = ""  #: shard directory (with index.json), brace pattern or glob of .tar files
    val_data: str | None = None  #: validation shards, evaluated after every epoch
    #: defaults to the dataset index's count; synthetic: DEFAULT_BATCHES (100) x batch size x ranks
    train_num_samples: int | None = None
    batch_size: int = 256  #: per-rank batch size B (before selection)
    workers: int = 2  #: data loader worker processes per rank
    #: torch | dali | auto (dali when CUDA and DALI are there) | synthetic (random device tensors, for timing)
    data_backend: str = "auto"
    dataset_type: str = "webdataset"  #: open_clip's --dataset-type: webdataset or auto (both read .tar shards)
    dataset_resampled: bool = False  #: open_clip's meaning: shards drawn with replacement; needs a known epoch size
    subset: str | None = None  #: .npy of sample ids to train on (offline subset selection)
    data_index: str | None = None  #: dataset index (index.json or its folder) for shards not beside it, e.g. URLs
    max_bad_fraction: float = 0.01  #: stop when more than this share of samples is unreadable
    imagenet_val: str | None = None  #: ImageNet val as an ImageFolder (1000 class folders): zero-shot top-1/top-5
    imagenet_v2: str | None = None  #: ImageNetV2 as an ImageFolder (folders 0..999): zero-shot top-1/top-5
    zeroshot_data: str | None = None  #: any ImageFolder for zero-shot classification (class names: folder names)
    zeroshot_classnames: str | None = None  #: text file, one class name per line in folder order, for --zeroshot-data

    def __post_init__(self) -> None:
        for flag, path in (("--imagenet-val", self.imagenet_val), ("--imagenet-v2", self.imagenet_v2),
                           ("--zeroshot-data", self.zeroshot_data)):
            if path is not None and not os.path.isdir(path):
                raise ConfigError(f"{flag} {path}: no such folder (an ImageFolder: one sub-folder of images per class)")
        if self.zeroshot_classnames is not None and (self.zeroshot_data is None or not os.path.isfile(
                self.zeroshot_classnames)):
            raise ConfigError(f"--zeroshot-classnames {self.zeroshot_classnames}: needs --zeroshot-data and an "
                              f"existing file (one class name per line, in the folders' order)")
        if self.data_backend == "synthetic":
            self._check_synthetic()
        elif not self.train_data:
            raise ConfigError("--train-data is required: a shard directory, a brace pattern or a glob of .tar files "
                              "(or --data-backend synthetic to time the training loop on random data)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.dataset_type == "csv":
            raise ConfigError("--dataset-type csv is not read directly: convert the CSV to shards with "
                              "`dissect-fast shards --csv FILE --images DIR --out DIR` and pass --train-data DIR/train")
        if self.dataset_type == "synthetic":
            raise ConfigError("--dataset-type synthetic is not supported: for random data made on the device (timing) "
                              "use --data-backend synthetic; for a learnable synthetic set write shards with "
                              "`dissect-fast synth --out DIR` and pass --train-data DIR/train")
        if self.dataset_type not in ("webdataset", "auto"):
            raise ConfigError(f"--dataset-type must be webdataset or auto, got {self.dataset_type!r}")
        if self.data_backend not in ("auto", "torch", "dali", "synthetic"):
            raise ConfigError(f"--data-backend must be auto, torch, dali or synthetic, got {self.data_backend!r}")
        if self.train_num_samples is not None and self.train_num_samples < 1:
            raise ConfigError("--train-num-samples must be >= 1 (or left out to use the dataset index)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.data_index is not None and not (os.path.isfile(self.data_index) or os.path.isfile(
                os.path.join(self.data_index, "index.json"))):
            raise ConfigError(f"--data-index {self.data_index}: no index.json there (write one with `dissect-fast index "
                              f"SHARDS --out DIR`)")
        if self.subset is not None and not os.path.isfile(self.subset):
            raise ConfigError(f"--subset {self.subset}: no such file (write one with `dissect-fast select-subset`)")

    def _check_synthetic(self) -> None:
        """--data-backend synthetic reads no shards: the flags that describe shards contradict it."""
        for flag, given in (("--subset", self.subset is not None), ("--data-index", self.data_index is not None),
                            ("--dataset-resampled", self.dataset_resampled)):
            if given:
                raise ConfigError(f"{flag} describes shards, which --data-backend synthetic does not read: drop "
                                  f"{flag}, or train on real shards with --data-backend torch/dali")


@dataclass
class ModelConfig:
    """Which CLIP to build and how to run it."""

    model: str = "RN50"  #: any open_clip model name, or the name of a dissect_fast tiny config
    model_config: str | None = None  #: path to an open_clip-style model JSON (overrides --model)
    precision: str = "auto"  #: auto | fp32 | amp_bf16 | amp (fp16 + grad scaler)
    device: str = "auto"  #: auto | cpu | cuda | cuda:N
    compile: bool = False  #: torch.compile the training and scoring forwards
    score_scale: str = "100"  #: 100 (reference) or learned (the model's logit_scale.exp())
    score_resolution: int | None = None  #: score at this image side (ViT: pos-embeddings interpolated)
    score_patch_dropout: float = 0.0  #: ViT: share of patch tokens dropped at random in the scoring pass
    score_cudagraphs: bool = False  #: with --compile on CUDA: replay the scoring pass as a CUDA graph
    pretrained: str | None = None  #: a checkpoint file, or an open_clip pretrained tag (offline: the local HF cache)
    lock_image: bool = False  #: LiT: freeze the image tower (open_clip's lock_image_tower)
    lock_image_unlocked_groups: int = 0  #: leave the last N image-tower layer groups trainable
    lock_image_freeze_bn_stats: bool = False  #: locked BatchNorm layers keep their running statistics fixed
    lock_text: bool = False  #: freeze the text tower (open_clip's lock_text_tower)
    lock_text_unlocked_layers: int = 0  #: leave the last N text-tower layers trainable
    lock_text_freeze_layer_norm: bool = False  #: the locked layers' LayerNorms are frozen too (else trainable)
    grad_checkpointing: bool = False  #: activation checkpointing (open_clip's set_grad_checkpointing)
    siglip: bool = False  #: SigLIP's sigmoid loss (open_clip's SigLipLoss) instead of ClipLoss

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "amp_bfloat16":  # open_clip's alias
            self.precision = "amp_bf16"
        for flag, n in (("--lock-image-unlocked-groups", self.lock_image_unlocked_groups),
                        ("--lock-text-unlocked-layers", self.lock_text_unlocked_layers)):
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
        if self.pretrained is not None and _looks_like_path(self.pretrained) and not os.path.isfile(self.pretrained):
            raise ConfigError(f"--pretrained {self.pretrained}: no such checkpoint file (give a .pt/.bin/.safetensors "
                              f"file, or an open_clip pretrained tag such as laion2b_s34b_b79k)")
        if self.score_scale not in ("100", "learned"):
            raise ConfigError(f"--score-scale must be 100 or learned, got {self.score_scale!r}")
        if self.score_resolution is not None and self.score_resolution < 1:
            raise ConfigError(f"--score-resolution must be >= 1 pixel (or left out), got {self.score_resolution}")
        if not 0.0 <= self.score_patch_dropout < 1.0:
            raise ConfigError(f"--score-patch-dropout must be in [0, 1), got {self.score_patch_dropout}")
        # the model-dependent checks (ViT only, <= image size, multiple of the patch size) run in
        # dissect_fast.model.check_scoring_options once the model name is resolved
        if self.model_config is not None and not os.path.isfile(self.model_config):
            raise ConfigError(f"--model-config {self.model_config}: no such file")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then cosine schedule (open_clip's defaults)."""

    epochs: int = 32
    lr: float = 5e-4
    wd: float = 0.2  #: weight decay, not applied to gains, biases and logit scale
    warmup: int = 10000  #: linear LR warm-up steps
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip_norm: float | None = None
    lr_scheduler: str = "cosine"  #: open_clip's schedules (open_clip_train.scheduler): cosine | const | const-cooldown
    epochs_cooldown: int | None = None  #: const-cooldown: the last N epochs decay the LR to lr_cooldown_end
    lr_cooldown_end: float = 0.0  #: const-cooldown: the LR at the end of the cooldown
    lr_cooldown_power: float = 1.0  #: const-cooldown: decay (1 - e / es) ** power; 1 = linear
    #: open_clip's gradient accumulation: one optimizer step per N batches (selection runs per batch)
    accum_freq: int = 1

    def __post_init__(self) -> None:
        if self.lr_scheduler not in ("cosine", "const", "const-cooldown"):
            raise ConfigError(f"--lr-scheduler must be cosine, const or const-cooldown, got {self.lr_scheduler!r}")
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


@dataclass
class SelectConfig:
    """Online batch selection (METHOD.md)."""

    strategy: str = "full"  #: a name of selection.strategies.STRATEGIES (or an alias)
    rate: float = 0.2  #: r: share of each batch trained on, k = floor(r * B)
    warmup_point: int = 10  #: dissect-warmup: epochs < W are the warm-up
    momentum: float = 0.9  #: dissect-momentum: beta of the history update
    warmup_train: str = "random"  #: dissect-warmup, epochs < W: random k-subset or full batch
    history_dtype: str = "fp32"  #: history buffer storage: fp32 (4 B/sample) or bf16 (2 B/sample)
    backend: str = "auto"  #: selection op: auto (fused Triton on CUDA) | triton | torch (unfused reference)

    def __post_init__(self) -> None:
        try:
            self.strategy = resolve_strategy(self.strategy)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        if not 0.0 < self.rate <= 1.0:
            raise ConfigError(f"--select-rate must be in (0, 1], got {self.rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.warmup_train not in ("random", "full"):
            raise ConfigError(f"--warmup-train must be random or full, got {self.warmup_train!r}")
        if self.history_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--history-dtype must be fp32 or bf16, got {self.history_dtype!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"--select-backend must be auto, triton or torch, got {self.backend!r}")
        if self.warmup_point < 1 and self.strategy in WARMUP_STRATEGIES:
            raise ConfigError(f"--warmup-point must be >= 1 epoch for {self.strategy}, got {self.warmup_point}")

    def k(self, batch_size: int) -> int:
        """Samples trained per rank and step."""
        return batch_size if self.strategy == "full" else int(self.rate * batch_size)


@dataclass
class DistConfig:
    """Multi-GPU / multi-node training under torchrun (ignored in a single process)."""

    local_loss: bool = False  #: ClipLoss: local features against the gathered ones (open_clip --local-loss)
    gather_with_grad: bool = True  #: ClipLoss: all-gather with gradient (exact full-batch gradient)
    check_sync_every: int = 0  #: compare history checksums across ranks every N steps (0: at epoch ends only)
    dist_timeout: float = 10.0  #: minutes a collective may wait for a peer before the rank fails

    def __post_init__(self) -> None:
        if self.check_sync_every < 0:
            raise ConfigError(f"--check-sync-every must be >= 0 steps (0: epoch ends only), got {self.check_sync_every}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout must be > 0 minutes, got {self.dist_timeout}")


@dataclass
class RunConfig:
    """Logging, checkpoints, seeds."""

    logs: str = "./logs"
    name: str | None = None  #: run folder name under --logs (default: strategy-date)
    resume: str | None = None  #: a checkpoint path, or `latest` (this run's latest.pt)
    seed: int = 0
    log_every_n_steps: int = 10
    val_every: int = 1  #: evaluate every n epochs (and always after the last)
    zeroshot_frequency: int = 2  #: zero-shot classification every n epochs (and after the last); 0: never
    plots: bool = True
    tensorboard: bool = True
    progress: bool = True
    max_nonfinite_steps: int = 10  #: stop after this many consecutive steps with a non-finite loss or gradient
    record: bool = False  #: write select_record/record_{epoch}.npz (what each epoch scored and selected) per epoch
    #: "A:B": torch.profiler trace (+ NVTX ranges on CUDA) of global steps A..B-1 into RUN/profile/
    profile_steps: str | None = None
    #: open_clip's --report-to: none | tensorboard | wandb | wandb,tensorboard (``tensorboard=False`` drops tensorboard)
    report_to: str = "tensorboard"
    wandb_project_name: str = "open-clip"  #: wandb project (open_clip's default)
    wandb_notes: str = ""  #: notes of the wandb run
    save_frequency: int = 1  #: checkpoints/epoch_N.pt every N epochs (0: the last epoch only); the last is always saved
    save_most_recent: bool = True  #: checkpoints/latest.pt after every epoch (always on: resume needs it)
    delete_previous_checkpoint: bool = False  #: keep only the newest epoch_N.pt (removed once the new one verifies)

    def __post_init__(self) -> None:
        from dissect_fast.logging_utils import parse_report_to

        try:
            self.report_to = parse_report_to(self.report_to)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.tensorboard:  # --no-tensorboard: an alias of leaving tensorboard out of --report-to
            self.report_to = ",".join(t for t in self.report_to.split(",") if t != "tensorboard") or "none"
        self.tensorboard = "tensorboard" in self.report_to.split(",")
        if self.save_frequency < 0:
            raise ConfigError(f"--save-frequency must be >= 0 epochs (0: last epoch only), got {self.save_frequency}")
        if not self.save_most_recent:
            raise ConfigError("save_most_recent=False is not supported: checkpoints/latest.pt is always kept (--resume "
                              "latest, torchelastic restarts and SIGTERM checkpoints use it)")
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
        if self.resume not in (None, "latest") and not os.path.isfile(self.resume):
            raise ConfigError(f"--resume {self.resume}: no such checkpoint file (give a .pt path, or `latest` "
                              f"with the run's --logs and --name)")

    def profile_window(self) -> tuple[int, int] | None:
        """(A, B) of --profile-steps: profile global steps A..B-1; None without the flag."""
        return parse_profile_steps(self.profile_steps) if self.profile_steps is not None else None


def parse_profile_steps(value: str) -> tuple[int, int]:
    """``"A:B"`` -> (A, B), integers with 0 <= A < B; ConfigError naming --profile-steps otherwise."""
    start, sep, stop = str(value).partition(":")
    try:
        a, b = int(start), int(stop)
    except ValueError:
        a = b = None
    if not sep or a is None or not 0 <= a < b:
        raise ConfigError(f"--profile-steps must be A:B, global step numbers with 0 <= A < B (e.g. 10:20 profiles "
                          f"steps 10..19), got {value!r}")
    return a, b


@dataclass
class TrainConfig:
    """Everything one training run needs."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        s, o = self.select, self.optim
        if s.strategy != "full" and s.k(self.data.batch_size) == 0:
            raise ConfigError(
                f"--select-rate {s.rate} x --batch-size {self.data.batch_size} leaves k = 0 samples to train on: "
                f"raise the rate or the batch size (k = floor(r * B) >= 1)"
            )
        if s.strategy in WARMUP_STRATEGIES and s.warmup_point >= o.epochs:
            raise ConfigError(
                f"--warmup-point {s.warmup_point} >= --epochs {o.epochs}: the warm-up would never end; "
                f"use a warm-up point below the number of epochs"
            )
        if s.strategy in ("small_loss", "big_loss") and self.data.batch_size < 2:
            raise ConfigError("small_loss / big_loss need --batch-size >= 2 (the loss is contrastive)")
        if self.model.siglip and self.dist.local_loss:
            raise ConfigError("--local-loss is a ClipLoss option; --siglip's SigLipLoss exchanges text features with "
                              "the neighbouring ranks instead: drop --local-loss")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(
            data=DataConfig(**d["data"]),
            model=ModelConfig(**d["model"]),
            optim=OptimConfig(**d["optim"]),
            select=SelectConfig(**d["select"]),
            run=RunConfig(**d["run"]),
            dist=DistConfig(**d.get("dist", {})),
        )


def build_parser() -> argparse.ArgumentParser:
    """The training flags: open_clip's names where open_clip has the flag, the DISSect reference's for selection."""
    p = argparse.ArgumentParser(
        prog="dissect_fast.train",
        description="Train a CLIP model with DISSect online sample selection (or a baseline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--train-data", default=None,
                   help="shard dir (with index.json), brace pattern or glob of .tar; required unless "
                        "--data-backend synthetic")
    d.add_argument("--val-data", default=None, help="validation shards, same forms as --train-data")
    d.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch; smaller than the data = a shorter epoch (open_clip's meaning); "
                        "default: the dataset index's count. --data-backend synthetic: the epoch size and id range, "
                        "default 100 batches (100 x batch size x ranks)")
    d.add_argument("--dataset-type", default="webdataset",
                   help="webdataset | auto (both read .tar shards); csv: convert first with `dissect-fast shards`")
    d.add_argument("--dataset-resampled", action="store_true",
                   help="draw shards with replacement (open_clip's meaning); needs a known epoch size "
                        "(--train-num-samples or a dataset index)")
    d.add_argument("--batch-size", type=int, default=256, help="per-rank batch size before selection")
    d.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")
    d.add_argument("--data-backend", default="auto", choices=["auto", "torch", "dali", "synthetic"],
                   help="loader: auto = DALI when CUDA and DALI are there, else torch; synthetic = random images "
                        "and tokens made once on the device, fresh ids every step (times the training loop "
                        "without loader cost; --train-data not read; never picked by auto)")
    d.add_argument("--subset", default=None, help=".npy of sample ids to train on (from select-subset)")
    d.add_argument("--data-index", default=None,
                   help="the dataset index (index.json or its folder) of --train-data when it is not beside the "
                        "shards, e.g. for pipe:/http URLs: ids and counts come from it")
    d.add_argument("--max-bad-fraction", type=float, default=0.01, help="stop when more samples are unreadable")
    z = p.add_argument_group("zero-shot classification (open_clip's flags)")
    z.add_argument("--imagenet-val", default=None,
                   help="ImageNet validation set as an ImageFolder: zero-shot top-1/top-5 with open_clip's class "
                        "names and templates")
    z.add_argument("--imagenet-v2", default=None, help="ImageNetV2 as an ImageFolder (class folders 0..999)")
    z.add_argument("--zeroshot-data", default=None,
                   help="any ImageFolder: zero-shot top-1/top-5 with the folder names as class names")
    z.add_argument("--zeroshot-classnames", default=None,
                   help="with --zeroshot-data: a text file of class names, one per line, in the folders' order")
    z.add_argument("--zeroshot-frequency", type=int, default=2,
                   help="zero-shot evaluation every N epochs (and after the last); 0: never")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="RN50", help="open_clip model name or a dissect_fast tiny config")
    m.add_argument("--model-config", default=None, help="open_clip-style model JSON (overrides --model)")
    m.add_argument("--precision", default="auto",
                   help="open_clip's: amp (fp16 autocast + grad scaler), amp_bf16 (= amp_bfloat16: bf16 autocast), "
                        "bf16 / fp16 (weights in bf16 / fp16, LayerNorms in fp32), pure_bf16 / pure_fp16 (every "
                        "weight in bf16 / fp16), fp32; auto = amp_bf16 on CUDA, fp32 on CPU")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    m.add_argument("--compile", action="store_true", help="torch.compile the forwards")
    m.add_argument("--score-scale", default="100", choices=["100", "learned"],
                   help="CLIPScore scale: 100 (reference) or the model's learned logit scale")
    m.add_argument("--score-resolution", type=int, default=None,
                   help="score at this image side in pixels (ViT: multiple of the patch size, <= image size)")
    m.add_argument("--score-patch-dropout", type=float, default=0.0,
                   help="ViT only: share of patch tokens dropped at random in the scoring pass")
    m.add_argument("--score-cudagraphs", action="store_true",
                   help="with --compile on CUDA: compile the scoring pass with CUDA graphs (reduce-overhead)")
    m.add_argument("--pretrained", default=None,
                   help="initial weights: a checkpoint file (open_clip or dissect_fast) or an open_clip pretrained tag "
                        "of --model (HF_HUB_OFFLINE=1: only from the local Hugging Face cache)")
    m.add_argument("--lock-image", action="store_true", help="LiT: freeze the image tower")
    m.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                   help="with --lock-image: leave the last N image-tower layer groups trainable")
    m.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                   help="with --lock-image: freeze the running statistics of the locked BatchNorm layers")
    m.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    m.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                   help="with --lock-text: leave the last N text-tower layers trainable")
    m.add_argument("--lock-text-freeze-layer-norm", action="store_true",
                   help="with --lock-text: freeze the LayerNorms of the locked layers too (else they train)")
    m.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing in both towers (less memory, one more forward per step)")
    m.add_argument("--siglip", action="store_true",
                   help="SigLIP's sigmoid loss instead of the softmax contrastive loss (logit scale/bias "
                        "initialised to log 10 / -10, as open_clip does)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=32, help="training epochs")
    o.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, cosine schedule)")
    o.add_argument("--wd", type=float, default=0.2, help="weight decay (not on gains, biases, logit scale)")
    o.add_argument("--warmup", type=int, default=10000, help="linear LR warm-up steps")
    o.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    o.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    o.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon")
    o.add_argument("--grad-clip-norm", type=float, default=None, help="clip the gradient norm to this (None: off)")
    o.add_argument("--accum-freq", type=int, default=1,
                   help="gradient accumulation: one optimizer step per N batches, the contrastive loss over all N "
                        "(selected) sub-batches; selection runs on each batch of --batch-size")
    o.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "const", "const-cooldown"],
                   help="open_clip's LR schedules, all after the linear --warmup: cosine (decay to 0), const, "
                        "const-cooldown (const, then a decay over the last --epochs-cooldown epochs)")
    o.add_argument("--epochs-cooldown", type=int, default=None,
                   help="const-cooldown: the cooldown runs over the last N epochs")
    o.add_argument("--lr-cooldown-end", type=float, default=0.0, help="const-cooldown: the LR at the end")
    o.add_argument("--lr-cooldown-power", type=float, default=1.0,
                   help="const-cooldown: polynomial decay power (1: linear)")
    s = p.add_argument_group("selection")
    s.add_argument("--select", action="store_true",
                   help="train on a selected share of every batch (reference switch); alone: dissect-warmup")
    s.add_argument("--select-strategy", default=None,
                   help="one of " + ", ".join(STRATEGIES) + " (reference names accepted, `ours` = dissect-warmup); "
                        "implies --select; None: full without --select, dissect-warmup with it")
    s.add_argument("--select-rate", type=float, default=0.2, help="r: share of each batch trained on")
    s.add_argument("--warmup-point", type=int, default=10, help="dissect-warmup: warm-up epochs")
    s.add_argument("--momentum", type=float, default=0.9, help="dissect-momentum: history momentum beta")
    s.add_argument("--warmup-train", default="random", choices=["random", "full"],
                   help="dissect-warmup: what the warm-up epochs train on (random k-subset or the full batch)")
    s.add_argument("--select-backend", default="auto", choices=["auto", "triton", "torch"],
                   help="selection op: auto = fused Triton kernel on CUDA; torch = the unfused reference")
    s.add_argument("--history-dtype", default="fp32", choices=["fp32", "bf16"], help="history buffer storage")
    g = p.add_argument_group("distributed (torchrun)")
    g.add_argument("--local-loss", action="store_true", help="ClipLoss over local vs gathered features")
    g.add_argument("--gather-with-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="all-gather features with gradient in ClipLoss")
    g.add_argument("--check-sync-every", type=int, default=0,
                   help="verify identical history buffers across ranks every N steps (0: at epoch ends only)")
    g.add_argument("--dist-timeout", type=float, default=10.0, help="minutes a collective waits for a dead peer")
    r = p.add_argument_group("run")
    r.add_argument("--logs", "--logs-dir", dest="logs", default="./logs",
                   help="folder of the run folders; under torchrun use --logs-dir: torchrun rejects --logs "
                        "(unless `--` precedes the script)")
    r.add_argument("--name", default=None,
                   help="run folder under --logs (may hold slashes); None: STRATEGY-DATE. An existing run is "
                        "refused unless --resume is given")
    r.add_argument("--resume", default=None, help="checkpoint path or `latest`")
    r.add_argument("--seed", type=int, default=0, help="random seed (rank r uses seed + r)")
    r.add_argument("--log-every-n-steps", type=int, default=10, help="read the loss on the host every N steps")
    r.add_argument("--val-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    r.add_argument("--record", action="store_true",
                   help="write select_record/record_EPOCH.npz per epoch: per sample id what was scored and selected")
    r.add_argument("--no-plots", action="store_true", help="write no plots")
    r.add_argument("--no-tensorboard", action="store_true",
                   help="write no tensorboard events (drops tensorboard from --report-to)")
    r.add_argument("--report-to", default="tensorboard",
                   help="tensorboard | wandb | 'wandb,tensorboard' | none: where epoch metrics and the train/ "
                        "scalars of every log step go (RUN/steps.jsonl is always written); wandb: `pip install wandb`")
    r.add_argument("--wandb-project-name", default="open-clip", help="wandb project (with --report-to wandb)")
    r.add_argument("--wandb-notes", default="", help="notes of the wandb run (with --report-to wandb)")
    r.add_argument("--save-frequency", type=int, default=1,
                   help="write checkpoints/epoch_N.pt every N epochs (0: only the last); the last epoch is always "
                        "saved and latest.pt always holds the newest state")
    r.add_argument("--save-most-recent", action="store_true", default=True,
                   help="keep checkpoints/latest.pt as the newest state after every epoch (always on; accepted "
                        "for open_clip command lines)")
    r.add_argument("--delete-previous-checkpoint", action="store_true",
                   help="after a new epoch_N.pt is written and verified, delete the older epoch checkpoints")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="stop after this many consecutive steps with a non-finite loss/gradient (each is skipped)")
    r.add_argument("--profile-steps", default=None, metavar="A:B",
                   help="profile global steps A..B-1 (0-based, e.g. 10:20): torch.profiler trace with the step's "
                        "phases as ranges into RUN/profile/ (plus top_ops.txt, phases.json); on CUDA also NVTX "
                        "ranges and cudaProfilerStart/Stop for `nsys profile --capture-range=cudaProfilerApi`")
    return p


def select_strategy_from_flags(select: bool, strategy: str | None) -> str:
    """The strategy the reference's two flags name: --select alone = dissect-warmup, a strategy alone implies
    selection, neither = full; --select with a no-selection strategy is a contradiction."""
    if strategy is None:
        return "dissect-warmup" if select else "full"
    try:
        name = resolve_strategy(strategy)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    if select and name == "full":
        raise ConfigError(f"--select with --select-strategy {strategy}: {strategy} trains on the whole batch; "
                          f"drop --select, or name a selection strategy")
    return name


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags into a validated TrainConfig; exits with a one-line message on invalid input."""
    parser = build_parser()
    known = {s for act in parser._actions for s in act.option_strings}
    msg = check_unsupported(sys.argv[1:] if argv is None else argv, known)
    if msg:  # an open_clip flag we do not take: say what to use instead, not "unrecognized arguments"
        parser.error(msg)
    a = parser.parse_args(argv)
    try:
        return TrainConfig(
            data=DataConfig(
                train_data=a.train_data or "",
                val_data=a.val_data,
                train_num_samples=a.train_num_samples,
                batch_size=a.batch_size,
                workers=a.workers,
                data_backend=a.data_backend,
                dataset_type=a.dataset_type,
                dataset_resampled=a.dataset_resampled,
                subset=a.subset,
                data_index=a.data_index,
                max_bad_fraction=a.max_bad_fraction,
                imagenet_val=a.imagenet_val,
                imagenet_v2=a.imagenet_v2,
                zeroshot_data=a.zeroshot_data,
                zeroshot_classnames=a.zeroshot_classnames,
            ),
            model=ModelConfig(
                model=a.model,
                model_config=a.model_config,
                precision=a.precision,
                device=a.device,
                compile=a.compile,
                score_scale=a.score_scale,
                score_resolution=a.score_resolution,
                score_patch_dropout=a.score_patch_dropout,
                score_cudagraphs=a.score_cudagraphs,
                pretrained=a.pretrained,
                lock_image=a.lock_image,
                lock_image_unlocked_groups=a.lock_image_unlocked_groups,
                lock_image_freeze_bn_stats=a.lock_image_freeze_bn_stats,
                lock_text=a.lock_text,
                lock_text_unlocked_layers=a.lock_text_unlocked_layers,
                lock_text_freeze_layer_norm=a.lock_text_freeze_layer_norm,
                grad_checkpointing=a.grad_checkpointing,
                siglip=a.siglip,
            ),
            optim=OptimConfig(
                epochs=a.epochs,
                lr=a.lr,
                wd=a.wd,
                warmup=a.warmup,
                beta1=a.beta1,
                beta2=a.beta2,
                eps=a.eps,
                grad_clip_norm=a.grad_clip_norm,
                lr_scheduler=a.lr_scheduler,
                epochs_cooldown=a.epochs_cooldown,
                lr_cooldown_end=a.lr_cooldown_end,
                lr_cooldown_power=a.lr_cooldown_power,
                accum_freq=a.accum_freq,
            ),
            select=SelectConfig(
                strategy=select_strategy_from_flags(a.select, a.select_strategy),
                rate=a.select_rate,
                warmup_point=a.warmup_point,
                momentum=a.momentum,
                warmup_train=a.warmup_train,
                history_dtype=a.history_dtype,
                backend=a.select_backend,
            ),
            run=RunConfig(
                logs=a.logs,
                name=a.name,
                resume=a.resume,
                seed=a.seed,
                log_every_n_steps=a.log_every_n_steps,
                val_every=a.val_every,
                zeroshot_frequency=a.zeroshot_frequency,
                plots=not a.no_plots,
                tensorboard=not a.no_tensorboard,
                progress=not a.no_progress,
                max_nonfinite_steps=a.max_nonfinite_steps,
                record=a.record,
                profile_steps=a.profile_steps,
                report_to=a.report_to,
                wandb_project_name=a.wandb_project_name,
                wandb_notes=a.wandb_notes,
                save_frequency=a.save_frequency,
                save_most_recent=a.save_most_recent,
                delete_previous_checkpoint=a.delete_previous_checkpoint,
            ),
            dist=DistConfig(
                local_loss=a.local_loss,
                gather_with_grad=a.gather_with_grad,
                check_sync_every=a.check_sync_every,
                dist_timeout=a.dist_timeout,
            ),
        )
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
