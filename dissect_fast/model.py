"""open_clip model creation, precision, compilation and the two forwards (scoring and training)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import torch

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_registered = False


def register_model_configs() -> None:
    """Make dissect_fast's small model configs (tiny-vit, micro-vit) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bf16 (or fp16 for `amp`) autocast on CUDA; nothing on fp32."""
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def model_name_for(model: str, model_config: str | None) -> str:
    """The open_clip name to build: a --model-config JSON is registered under its file stem."""
    import open_clip

    register_model_configs()
    if model_config:
        with open(model_config) as f:
            cfg = json.load(f)
        if "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise ValueError(f"--model-config {model_config}: needs vision_cfg and text_cfg (open_clip format)")
        d = tempfile.mkdtemp(prefix="dissect_cfg_")
        name = os.path.splitext(os.path.basename(model_config))[0]
        shutil.copy(model_config, os.path.join(d, name + ".json"))
        open_clip.add_model_config(d)
        return name
    if model not in open_clip.list_models():
        raise ValueError(
            f"--model {model!r} is not an open_clip model name; see open_clip.list_models() "
            f"or pass --model-config FILE.json"
        )
    return model


def create_model(name: str, device: torch.device, pretrained: str | None = None):
    """(model, train transform, eval transform, tokenizer context length) from random init or a checkpoint."""
    import open_clip

    register_model_configs()
    model, pre_train, pre_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, output_dict=True
    )
    ctx = getattr(model, "context_length", None) or open_clip.get_model_config(name)["text_cfg"].get(
        "context_length", 77
    )
    return model, pre_train, pre_val, int(ctx)


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings' scales and logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """torch's fused AdamW (apex's FusedAdam when apex happens to be installed on CUDA)."""
    groups = param_groups(model, cfg.wd)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except ImportError:
            pass
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


class Forwards:
    """The training forward (with grad) and the scoring forward (no grad, whole batch).

    Both may be torch.compile'd; the scoring pass is compiled separately because it runs at the
    fixed full-batch shape under no_grad, the training pass at the selected sub-batch shape.
    """

    def __init__(
        self, model: torch.nn.Module, precision: str, device: torch.device, compile: bool, ddp: bool = False
    ) -> None:
        self.model, self.precision, self.device = model, precision, device
        train_module = model
        if ddp:  # gradients all-reduced over ranks; the scoring pass needs no wrapper
            from torch.nn.parallel import DistributedDataParallel

            train_module = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        self._train = torch.compile(train_module) if compile else train_module
        self._score = torch.compile(model) if compile else model

    def train(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        with autocast(self.precision, self.device):
            return self._train(images, tokens)

    @torch.no_grad()
    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.precision, self.device):
            out = self._score(images, tokens)
        return out["image_features"], out["text_features"]
