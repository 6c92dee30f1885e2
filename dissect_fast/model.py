"""open_clip model creation, precision, compilation and the two forwards (scoring and training)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_registered = False


def register_model_configs() -> None:
    """Make dissect_fast's small model configs (tiny-vit, micro-vit, micro-rn) known to open_clip by name."""
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


def _vision_kind(vision_cfg: dict) -> str:
    """open_clip's image tower for a model config: vit | resnet | timm."""
    if vision_cfg.get("timm_model_name"):
        return "timm"
    return "resnet" if isinstance(vision_cfg.get("layers"), (list, tuple)) else "vit"


def check_scoring_options(model_name: str, resolution: int | None, patch_dropout: float) -> None:
    """Model-dependent checks of --score-resolution / --score-patch-dropout, before any model is built.

    Both are implemented for open_clip ViT image towers only: a lower resolution interpolates the
    (trained) positional embeddings to the smaller patch grid on every scoring call; patch dropout
    keeps a random subset of patch tokens. ResNet towers have a fixed-size attention-pool embedding
    that this project does not interpolate, and timm towers are opaque, so both options error there.
    """
    if resolution is None and patch_dropout == 0.0:
        return
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"--model {model_name!r}: no open_clip model config to check the scoring options against")
    vision = cfg["vision_cfg"]
    kind = _vision_kind(vision)
    if kind != "vit":
        flag = "--score-patch-dropout" if patch_dropout > 0 else "--score-resolution"
        raise ValueError(
            f"{flag} needs a ViT image tower (open_clip VisionTransformer); model {model_name!r} has a {kind} "
            f"tower: leave {flag} out for this model"
        )
    if resolution is not None:
        size = vision.get("image_size", 224)
        size = size if isinstance(size, int) else max(size)
        patch = vision.get("patch_size", 16)
        if resolution > size:
            raise ValueError(
                f"--score-resolution {resolution} is larger than {model_name}'s image size {size}: "
                f"use a resolution <= {size} (scoring is meant to be cheaper than training)"
            )
        if resolution % patch:
            raise ValueError(
                f"--score-resolution {resolution} is not a multiple of {model_name}'s patch size {patch}: "
                f"use e.g. {max(patch, resolution // patch * patch)}"
            )


class ScoringModule(torch.nn.Module):
    """The scoring forward: unit-norm (image, text) features of the whole batch, no loss.

    With ``resolution`` (below the model's image size) the images are resized on the device
    (bilinear, antialiased) and the ViT's positional embeddings are interpolated (bicubic) to the
    smaller patch grid -- recomputed every call, since they are trained. With ``patch_dropout`` p,
    every image keeps a random ``max(1, int(n * (1 - p)))`` of its n patch tokens plus the class
    token (open_clip's PatchDropout semantics), without touching the model's own configuration or
    its training forward. With neither, this is exactly ``model(images, tokens)``'s features.
    """

    def __init__(self, model: torch.nn.Module, resolution: int | None = None, patch_dropout: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.patch_dropout = float(patch_dropout)
        self.resolution = resolution
        visual = getattr(model, "visual", None)
        custom = resolution is not None or self.patch_dropout > 0
        if custom:
            from open_clip.transformer import VisionTransformer

            if not isinstance(visual, VisionTransformer):
                raise ValueError(
                    f"--score-resolution / --score-patch-dropout need an open_clip ViT image tower, got "
                    f"{type(visual).__name__}: leave both out for this model"
                )
        self.custom = custom
        self.grid = None
        if resolution is not None:
            patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
            if resolution % patch or resolution > visual.image_size[0]:
                raise ValueError(
                    f"--score-resolution {resolution}: must be <= {visual.image_size[0]} and a multiple of {patch}"
                )
            if resolution != visual.image_size[0] or visual.image_size[0] != visual.image_size[1]:
                self.grid = (resolution // patch, resolution // patch)

    def _pos_embed(self) -> torch.Tensor:
        v = self.model.visual
        pos = v.positional_embedding
        if self.grid is None:
            return pos
        g0, g1 = v.grid_size
        img = pos[1:].reshape(1, g0, g1, -1).permute(0, 3, 1, 2)
        img = F.interpolate(img.float(), size=self.grid, mode="bicubic", antialias=True, align_corners=False)
        img = img.permute(0, 2, 3, 1).reshape(self.grid[0] * self.grid[1], -1).to(pos.dtype)
        return torch.cat([pos[:1], img], dim=0)

    def _image(self, images: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        if self.grid is not None:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   antialias=True, align_corners=False)
        x = v.conv1(images)  # [B, width, g, g]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, g*g, width]
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self._pos_embed().to(x.dtype)
        if self.patch_dropout > 0:
            n = x.shape[1] - 1
            keep = max(1, int(n * (1.0 - self.patch_dropout)))
            idx = torch.rand(x.shape[0], n, device=x.device).topk(keep, dim=1).indices + 1
            x = torch.cat([x[:, :1], x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))], dim=1)
        x = v.ln_pre(x)
        x = v.transformer(x)
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.custom:
            out = self.model(images, tokens)
            return out["image_features"], out["text_features"]
        return self._image(images), self.model.encode_text(tokens, normalize=True)


class ScoringPass:
    """A callable scoring pass: bf16 autocast (on GPU), inference mode, optionally compiled at its fixed
    shape (``dynamic=False``) and, with ``cudagraphs`` on CUDA, replayed as a CUDA graph.

    Inference mode: the features only feed the selection (never a backward), so no autograd
    bookkeeping is recorded; the outputs are inference tensors, which the selection op and the
    history update read as inputs (allowed) but nothing saves for backward.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        precision: str,
        device: torch.device,
        compile: bool = False,
        resolution: int | None = None,
        patch_dropout: float = 0.0,
        cudagraphs: bool = False,
    ) -> None:
        self.module = ScoringModule(model, resolution, patch_dropout)
        self.precision, self.device = precision, device
        self.cudagraphs = bool(cudagraphs and compile and device.type == "cuda")
        if compile:
            mode = "reduce-overhead" if self.cudagraphs else None
            self._fn = torch.compile(self.module, dynamic=False, mode=mode)
        else:
            self._fn = self.module

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), autocast(self.precision, self.device):
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
                f, g = self._fn(images, tokens)
                # graph outputs live in the graph's memory pool and are overwritten on the next replay
                return f.clone(), g.clone()
            return self._fn(images, tokens)


class Forwards:
    """The training forward (with grad) and the scoring forward (no grad, whole batch).

    Both may be torch.compile'd; the scoring pass is compiled separately because it runs at the
    fixed full-batch shape under inference mode, the training pass at the selected sub-batch shape.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        precision: str,
        device: torch.device,
        compile: bool,
        ddp: bool = False,
        score_resolution: int | None = None,
        score_patch_dropout: float = 0.0,
        score_cudagraphs: bool = False,
    ) -> None:
        self.model, self.precision, self.device = model, precision, device
        train_module = model
        if ddp:  # gradients all-reduced over ranks; the scoring pass needs no wrapper
            from torch.nn.parallel import DistributedDataParallel

            train_module = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        self._train = torch.compile(train_module) if compile else train_module
        self.scoring = ScoringPass(
            model, precision, device, compile, score_resolution, score_patch_dropout, score_cudagraphs
        )

    def train(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        with autocast(self.precision, self.device):
            return self._train(images, tokens)

    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scoring(images, tokens)


def model_from_checkpoint(path: str, name: str | None, device: torch.device):
    """(model, model name, eval preprocess, context length) of a saved dissect_fast or open_clip checkpoint, for
    the command-line tools; ValueError with a one-line message naming the flag for every user mistake."""
    from dissect_fast.checkpoint import CheckpointError, load_checkpoint

    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path}: no such file")
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        raise ValueError(f"--checkpoint: {e}") from None
    name = name or ck.get("model_name")
    if not name:
        raise ValueError("--model is needed: the checkpoint does not name its model")
    model_name_for(name, None)
    model, _, pre_val, ctx = create_model(name, device)
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"--checkpoint {path} does not fit model {name!r} (pass the --model it was trained with): "
                         f"{str(e).splitlines()[0]}") from None
    return model, name, pre_val, ctx
