"""open_clip model creation, precision, compilation and the two forwards (scoring and training)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

from dissect_fast.training.checkpoint import CheckpointError, load_checkpoint, strip_prefixes

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_registered = False
log = logging.getLogger("dissect_fast")


def register_model_configs() -> None:
    """Make dissect_fast's small model configs (tiny-vit, micro-vit, micro-rn) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


#: model-config keys that only set initial values (open_clip's SigLIP configs carry them)
INIT_KEYS = ("init_logit_scale", "init_logit_bias")


def model_cfg_of(name: str, siglip: bool = False) -> dict:
    """The open_clip model config (the JSON dict) of a registered model name, as it goes into a checkpoint
    (``model_cfg``): built-in, dissect_fast's or a --model-config file's. ``siglip``: with open_clip's SigLIP init
    values, so that ``open_clip.create_model`` on this config gives the model its logit bias."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"--model {name!r}: open_clip does not know this model")
    if siglip:
        cfg.setdefault("init_logit_scale", math.log(10))
        cfg.setdefault("init_logit_bias", -10.0)
    return cfg


def register_model_cfg(name: str, cfg: dict, flag: str = "--checkpoint") -> str:
    """Make the model config ``cfg`` known to open_clip and return the name to build it by: ``name`` itself when
    open_clip does not know it yet or knows the same config (init values aside); else ``name@<hash of cfg>``,
    so a built-in model is never replaced. ValueError naming ``flag`` for a dict that is not an open_clip config."""
    import open_clip

    register_model_configs()
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{flag}: its model config needs embed_dim, vision_cfg and text_cfg (open_clip format)")

    def base(c: dict) -> dict:
        return {k: v for k, v in c.items() if k not in INIT_KEYS}

    known = open_clip.get_model_config(name)
    if known is not None and base(known) == base(cfg):
        return name
    if known is not None:
        digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name}@{digest}"
    with tempfile.TemporaryDirectory(prefix="dissect_cfg_") as d:  # open_clip reads configs from files
        path = os.path.join(d, name + ".json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(path)  # read now; the registry keeps it after the file is gone
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"{flag}: open_clip did not accept its model config {name!r}")
    return name


def base_model_name(name: str) -> str:
    """The model name a checkpoint records for a name ``register_model_cfg`` returned."""
    return name.split("@", 1)[0]


def checkpoint_model_name(ck: dict, flag: str = "--checkpoint") -> str | None:
    """The open_clip name that builds the model of a loaded checkpoint: its ``model_cfg`` registered (any model,
    built-in or custom), else (older checkpoints) its ``model_name`` as it is; None when it names no model."""
    name = ck.get("model_name") if isinstance(ck.get("model_name"), str) else None
    cfg = ck.get("model_cfg")
    if name and cfg is not None:
        return register_model_cfg(name, cfg, flag)
    return name


def read_model_cfg(path: str) -> tuple[str | None, dict | None]:
    """(model name, model config) recorded in a dissect_fast checkpoint file, without loading its tensors into
    memory (memory-mapped); (None, None) for other files."""
    if path.endswith(".safetensors"):
        return None, None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- not a zip checkpoint: the caller's own load reports it
        return None, None
    if not isinstance(ck, dict):
        return None, None
    name = ck.get("model_name") if isinstance(ck.get("model_name"), str) else None
    cfg = ck.get("model_cfg") if isinstance(ck.get("model_cfg"), dict) else None
    return name, cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision with ``auto`` resolved (amp_bf16 on CUDA, fp32 elsewhere) and open_clip's alias amp_bfloat16."""
    if precision == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return "amp_bf16" if precision == "amp_bfloat16" else precision


def weight_dtype(precision: str) -> torch.dtype | None:
    """The dtype open_clip stores the weights in for a --precision: bf16 / fp16 (LayerNorms and other norm
    weights stay float32, open_clip's ``convert_weights_to_lp``), pure_bf16 / pure_fp16 (every parameter);
    None: float32 (fp32 and the autocast modes amp, amp_bf16)."""
    return {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16, "pure_fp16": torch.float16}.get(
        precision
    )


def input_dtype(precision: str) -> torch.dtype | None:
    """The dtype images are cast to before the forward (open_clip's ``get_input_dtype``): the weight dtype of the
    low-precision-weight modes; None (float32) for fp32 and the autocast modes."""
    return weight_dtype(precision)


def uses_grad_scaler(precision: str) -> bool:
    """open_clip scales fp16 gradients (GradScaler) for ``amp`` only; fp16/pure_fp16 weights train without one."""
    return precision == "amp"


def autocast(precision: str, device: torch.device):
    """open_clip's autocast: fp16 for ``amp``, bf16 for ``amp_bf16``; none for fp32 and for the modes that store
    the weights in bf16/fp16 (bf16, pure_bf16, fp16, pure_fp16), whose forwards run in the weights' dtype."""
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def scoring_precision(score_precision: str, precision: str) -> str:
    """The precision mode the scoring forward runs in (--score-precision): ``auto`` = the training's (--precision);
    ``fp32`` = no autocast, float32 (the reference scores outside autocast); ``bf16`` = bf16 autocast. Both need
    float32 weights: ModelConfig refuses them with a 16-bit --precision."""
    if score_precision == "auto":
        return precision
    return "fp32" if score_precision == "fp32" else "amp_bf16"


def model_name_for(model: str, model_config: str | None, checkpoint: str | None = None) -> str:
    """The open_clip name to build: a --model-config JSON is registered under its file stem; ``model`` as the model
    that the dissect_fast checkpoint file ``checkpoint`` (--pretrained, --resume) records, from the config it
    holds (so a custom model needs no JSON file); an unknown name is a ValueError that suggests the closest open_clip
    names."""
    import open_clip

    register_model_configs()
    if model_config:
        try:
            with open(model_config) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model-config {model_config}: cannot be read as JSON ({e})") from None
        if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise ValueError(f"--model-config {model_config}: needs vision_cfg and text_cfg (open_clip format)")
        name = os.path.splitext(os.path.basename(model_config))[0]
        with tempfile.TemporaryDirectory(prefix="dissect_cfg_") as d:  # open_clip reads configs from files
            with open(os.path.join(d, name + ".json"), "w") as f:
                json.dump(cfg, f)
            open_clip.add_model_config(os.path.join(d, name + ".json"))
        if open_clip.get_model_config(name) is None:
            raise ValueError(f"--model-config {model_config}: needs embed_dim, vision_cfg and text_cfg (open_clip)")
        return name
    if checkpoint is not None and os.path.isfile(checkpoint):
        ck_name, ck_cfg = read_model_cfg(checkpoint)
        if ck_cfg is not None and ck_name == model:
            return register_model_cfg(model, ck_cfg, f"--pretrained {checkpoint}")
    names = open_clip.list_models()
    if model not in names:
        close = suggest_names(model, names)
        hint = ""
        if close:
            hint = (
                f"did you mean {close[0]}? "
                if len(close) == 1
                else (f"did you mean {', '.join(close[:-1])} or {close[-1]}? ")
            )
        raise ValueError(
            f"--model {model!r} is not an open_clip model name (names are case-sensitive); {hint}"
            f"see open_clip.list_models() or pass --model-config FILE.json"
        )
    return model


def suggest_names(name: str, names: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` that ``name`` probably misspells: those with the same letters and digits ignoring
    case and punctuation (``rn50`` -> RN50, ``ViT-B32`` -> ViT-B-32), else difflib's closest matches."""
    import difflib

    def key(s: str) -> str:
        return "".join(c for c in s.lower() if c.isalnum())

    by_key: dict[str, list[str]] = {}
    for m in names:
        by_key.setdefault(key(m), []).append(m)
    if key(name) in by_key:
        return by_key[key(name)][:n]
    close = difflib.get_close_matches(key(name), list(by_key), n=n, cutoff=0.75) if key(name) else []
    return [m for k in close for m in by_key[k]][:n]


def create_model(
    name: str, device: torch.device, pretrained: str | None = None, precision: str = "fp32", siglip: bool = False
):
    """(model, train transform, eval transform, tokenizer context length) from random init or ``pretrained``
    (a checkpoint file or an open_clip tag: ``load_pretrained``), its weights in ``precision``'s dtype
    (open_clip's rules: ``weight_dtype``). ``siglip``: logit scale and bias initialised as open_clip does for
    --siglip (log 10 and -10)."""
    import open_clip

    register_model_configs()
    kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10} if siglip else {}
    model, pre_train, pre_val = open_clip.create_model_and_transforms(
        name, pretrained=None, device=device, output_dict=True, precision=precision, **kwargs
    )
    if pretrained:
        load_pretrained(model, pretrained, name)
    ctx = getattr(model, "context_length", None) or open_clip.get_model_config(name)["text_cfg"].get(
        "context_length", 77
    )
    return model, pre_train, pre_val, int(ctx)


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained(spec: str, model_name: str) -> str:
    """The local file of --pretrained: ``spec`` itself when it is a file, else the weights of open_clip's pretrained
    tag ``spec`` for ``model_name``. With HF_HUB_OFFLINE set, a tag resolves from the local caches only (Hugging
    Face's, or open_clip's ~/.cache/clip for URL-only tags); ValueError naming the flag otherwise."""
    import open_clip

    if os.path.isfile(spec):
        return spec
    cfg = open_clip.get_pretrained_cfg(model_name, spec)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained tags for it"
        raise ValueError(
            f"--pretrained {spec}: neither a file nor an open_clip pretrained tag of model {model_name!r} "
            f"({known}); give a checkpoint file or one of the tags"
        )
    offline = _hf_offline()
    if cfg.get("file"):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    try:
        if hub:
            from huggingface_hub import hf_hub_download  # open_clip's dependency, needed for hub tags only

            repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if filename.endswith(".bin"):
                names.insert(0, filename[: -len(".bin")] + ".safetensors")
            last: Exception | None = None
            for name in names:
                try:
                    return hf_hub_download(repo_id=repo, filename=name, local_files_only=offline)
                except Exception as e:  # noqa: BLE001 -- not cached / not there: try the next file name
                    last = e
            raise last if last is not None else FileNotFoundError(hub)
        url = cfg.get("url", "")
        cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if offline:
            if os.path.isfile(cached):
                return cached
            raise FileNotFoundError(cached)
        return open_clip.download_pretrained_from_url(url)
    except Exception as e:  # noqa: BLE001 -- one message for every way a tag fails to resolve
        where = f"Hugging Face repo {hub}" if hub else cfg.get("url", "?")
        if offline:
            raise ValueError(
                f"--pretrained {spec}: the weights of open_clip tag {spec!r} for {model_name} ({where}) are not in the "
                f"local cache and HF_HUB_OFFLINE is set, so nothing is downloaded: download them once where there is "
                f"network (same HF_HOME), or pass the checkpoint file's path to --pretrained"
            ) from None
        raise ValueError(
            f"--pretrained {spec}: could not fetch open_clip tag {spec!r} for {model_name} from {where} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a local checkpoint "
            f"file instead"
        ) from None


def read_state_dict(path: str) -> tuple[dict, str | None]:
    """(model weights, model name when the file records one) of a checkpoint: dissect_fast's (``state_dict`` +
    ``model_name``), open_clip's (``state_dict``, ``module.`` prefixes), a bare state dict or a .safetensors file;
    torch.compile / DDP prefixes stripped."""
    ck: Any  # a .safetensors dict of tensors, or whatever torch.load finds (checked below)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # optional: .safetensors checkpoints only

        ck = load_file(path, device="cpu")
    else:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    name = ck.get("model_name") if isinstance(ck, dict) and isinstance(ck.get("model_name"), str) else None
    sd = ck["state_dict"] if isinstance(ck, dict) and "state_dict" in ck else ck
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--pretrained {path}: not a model checkpoint (no state_dict of tensors)")
    return strip_prefixes(sd), name


def load_pretrained(model: torch.nn.Module, spec: str, model_name: str) -> None:
    """Load --pretrained (a file or an open_clip tag, ``resolve_pretrained``) into ``model``, strictly. A checkpoint
    without ``logit_bias`` loaded into a model with one (a CLIP checkpoint for --siglip) gets a zero bias, as open_clip
    does. ValueError naming the flag for a file that does not fit the model."""
    path = resolve_pretrained(spec, model_name)
    try:
        sd, name = read_state_dict(path)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(f"--pretrained {path}: cannot be read ({type(e).__name__}: {e})") from None
    if name is not None and base_model_name(name) != base_model_name(model_name):
        raise ValueError(
            f"--pretrained {path} holds a {name!r} model, this run builds {base_model_name(model_name)!r}: pass "
            f"--model {name}, or a checkpoint of {base_model_name(model_name)}"
        )
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in sd and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(model.logit_bias)  # type: ignore[arg-type]  # Module attr: Tensor | Module
    for key in ("logit_scale", "logit_bias"):  # scalar vs 1-element parameter across open_clip versions
        p = getattr(model, key, None)
        if p is not None and key in sd and sd[key].shape != p.shape and sd[key].numel() == p.numel():
            sd[key] = sd[key].reshape(p.shape)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(
            f"--pretrained {path} does not fit model {model_name!r} (pass the --model it was trained "
            f"with): {detail[:300]}{'...' if len(detail) > 300 else ''}"
        ) from None
    log.info("--pretrained: loaded %s into %s", path, model_name)


def lock_towers(model: torch.nn.Module, cfg) -> None:
    """--lock-image / --lock-text (LiT) through open_clip's ``lock_image_tower`` / ``lock_text_tower``: locked
    parameters get ``requires_grad=False`` (the optimizer then leaves them out). ``cfg``: a ModelConfig.

    open_clip's native text towers always freeze the LayerNorms of the locked layers (only its HF towers honour
    ``freeze_layer_norm``); here, without --lock-text-freeze-layer-norm, the text tower's LayerNorms stay trainable
    on native towers too, which is the flag's meaning."""
    if cfg.lock_image:
        try:
            model.lock_image_tower(  # type: ignore[operator]  # open_clip method; Module attr: Tensor | Module
                unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=cfg.lock_image_freeze_bn_stats
            )
        except AssertionError:
            raise ValueError(
                f"--lock-image-unlocked-groups {cfg.lock_image_unlocked_groups}: open_clip locks a "
                f"{type(model.visual).__name__} image tower only whole (partial locking: ViT and timm towers); use 0"
            ) from None
    if cfg.lock_text:
        text = getattr(model, "text", None)
        if type(text).__name__ == "HFTextEncoder":
            model.lock_text_tower(  # type: ignore[operator]  # as above
                unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=cfg.lock_text_freeze_layer_norm
            )
            return
        model.lock_text_tower(  # type: ignore[operator]  # as above
            unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=True
        )
        if not cfg.lock_text_freeze_layer_norm:
            owner = text if text is not None else model
            for part in (getattr(owner, "transformer", None), getattr(owner, "ln_final", None)):
                for m in part.modules() if part is not None else ():
                    if isinstance(m, torch.nn.LayerNorm):
                        for p in m.parameters():
                            p.requires_grad = True


def set_grad_checkpointing(model: torch.nn.Module) -> None:
    """--grad-checkpointing: open_clip's ``set_grad_checkpointing`` (activations of the transformer blocks are
    recomputed in the backward). open_clip's ResNet image tower has none: only its text tower is checkpointed."""
    model.set_grad_checkpointing(True)  # type: ignore[operator]  # open_clip method; Module attr: Tensor | Module
    if type(getattr(model, "visual", None)).__name__ == "ModifiedResNet":
        log.warning(
            "--grad-checkpointing: open_clip's ResNet image tower has no activation checkpointing; only the "
            "text tower is checkpointed"
        )


def uses_clip_bpe(model_name: str) -> bool:
    """Whether open_clip tokenises ``model_name``'s captions with its default CLIP BPE tokenizer (ids < 49,408),
    the one the shards' stored ``tok`` ids were written with; False for HF / SigLIP tokenizers."""
    import open_clip

    register_model_configs()
    text = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    return not text.get("hf_tokenizer_name") and not text.get("tokenizer_kwargs") and "siglip" not in model_name.lower()


def text_tokenizer(model_name: str):
    """The model's own tokenizer when it is not CLIP BPE (``open_clip.get_tokenizer``), else None (the loaders'
    CLIP BPE default, which reads the shards' stored ``tok`` ids). ValueError naming HF_HUB_OFFLINE when it
    cannot be loaded (HF tokenizers come from the Hugging Face cache, SigLIP vocabularies from the network)."""
    if uses_clip_bpe(model_name):
        return None
    import open_clip

    text = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    source = text.get("hf_tokenizer_name") or "SigLIP sentencepiece vocabulary"
    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as e:  # noqa: BLE001 -- missing package, no network, not cached: one message
        offline = (
            "HF_HUB_OFFLINE is set: it must already be in the local Hugging Face cache"
            if _hf_offline()
            else ("set HF_HUB_OFFLINE=1 only once it is cached")
        )
        raise ValueError(
            f"--model {model_name}: its tokenizer ({source}) could not be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); {offline} (load it once where there is network, with "
            f"`transformers` installed)"
        ) from None


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings' scales and logit scale."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
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
        visual: Any = getattr(model, "visual", None)
        custom = resolution is not None or self.patch_dropout > 0
        if custom:
            from open_clip.transformer import VisionTransformer

            if not isinstance(visual, VisionTransformer):
                raise ValueError(
                    f"--score-resolution / --score-patch-dropout need an open_clip ViT image tower, got "
                    f"{type(visual).__name__}: leave both out for this model"
                )
        self.custom = custom
        self.grid: tuple[int, int] | None = None
        if resolution is not None:
            patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
            if resolution % patch or resolution > visual.image_size[0]:
                raise ValueError(
                    f"--score-resolution {resolution}: must be <= {visual.image_size[0]} and a multiple of {patch}"
                )
            if resolution != visual.image_size[0] or visual.image_size[0] != visual.image_size[1]:
                self.grid = (resolution // patch, resolution // patch)

    def _pos_embed(self) -> torch.Tensor:
        v: Any = self.model.visual  # open_clip's VisionTransformer (untyped)
        pos = v.positional_embedding
        if self.grid is None:
            return pos
        g0, g1 = v.grid_size
        img = pos[1:].reshape(1, g0, g1, -1).permute(0, 3, 1, 2)
        img = F.interpolate(img.float(), size=self.grid, mode="bicubic", antialias=True, align_corners=False)
        img = img.permute(0, 2, 3, 1).reshape(self.grid[0] * self.grid[1], -1).to(pos.dtype)
        return torch.cat([pos[:1], img], dim=0)

    def _image(self, images: torch.Tensor) -> torch.Tensor:
        v: Any = self.model.visual  # open_clip's VisionTransformer (untyped)
        if self.grid is not None:
            assert self.resolution is not None  # the grid is set from it
            images = F.interpolate(
                images.float(),
                size=(self.resolution, self.resolution),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).to(images.dtype)
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
        return self._image(images), self.model.encode_text(tokens, normalize=True)  # type: ignore[operator]


#: torch.compile's backend for the training and scoring forwards; tests put a recording backend (e.g. one that
#: wraps ``aot_eager``) here to check the graphs: how many, and that their shapes are static
COMPILE_BACKEND: Any = "inductor"


def compile_static(module: torch.nn.Module, mode: str | None = None) -> Any:
    """``torch.compile`` with static shapes (``dynamic=False``): each distinct input shape gets a graph of its own,
    specialised to it, instead of automatic dynamic turning the batch dimension symbolic once a second batch size is
    seen (e.g. B in the full-batch warm-up, then the selected k: two static graphs, never a dynamic one)."""
    if mode is not None:  # a mode (reduce-overhead: CUDA graphs) is inductor's option
        return torch.compile(module, dynamic=False, mode=mode)
    return torch.compile(module, dynamic=False, backend=COMPILE_BACKEND)


class NoGradForward(torch.nn.Module):
    """``module``'s forward without grad (--accum-freq's first pass, whose features are only cached), as a module
    of its own. Compiled, its forward is a frame apart from ``module``'s, with grad mode switched off inside the
    graph: the grad and no-grad forwards get one graph each, and neither invalidates the other's grad-mode guard
    (compiling ``module`` once and calling it under ``torch.no_grad`` recompiles it on every switch of grad mode)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.module(images, tokens)


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
        self.input_dtype = input_dtype(precision)  #: bf16/fp16 weights take images in their dtype
        self.cudagraphs = bool(cudagraphs and compile and device.type == "cuda")
        if compile:
            self._fn = compile_static(self.module, mode="reduce-overhead" if self.cudagraphs else None)
        else:
            self._fn = self.module

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        with torch.inference_mode(), autocast(self.precision, self.device):
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
                f, g = self._fn(images, tokens)
                # graph outputs live in the graph's memory pool and are overwritten on the next replay
                return f.clone(), g.clone()
            return self._fn(images, tokens)


class Forwards:
    """The training forward (with grad; ``train_no_grad``: without, for --accum-freq's cached features) and the
    scoring forward (no grad, whole batch).

    All may be torch.compile'd, each with static shapes (``compile_static``) and as a frame of its own: the
    scoring pass at the full-batch shape under inference mode, the training forward at the selected sub-batch
    shape k (and at B too with a full-batch warm-up: a second static graph), the no-grad training forward
    likewise. A step therefore never recompiles once each shape has been seen, and never runs a dynamic graph.
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
        score_precision: str = "auto",
    ) -> None:
        self.model, self.precision, self.device = model, precision, device
        self.input_dtype = input_dtype(precision)  #: bf16/fp16 weights take images in their dtype
        train_module = model
        if ddp:  # gradients all-reduced over ranks; the scoring pass needs no wrapper
            from torch.nn.parallel import DistributedDataParallel

            train_module = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        self._ddp = train_module if ddp else None
        self._train = compile_static(train_module) if compile else train_module
        #: no grad, no all-reduce: the bare model (DDP's forward would only broadcast buffers)
        no_grad = NoGradForward(model)
        self._train_no_grad = compile_static(no_grad) if compile else no_grad
        self.scoring = ScoringPass(
            model,
            scoring_precision(score_precision, precision),
            device,
            compile,
            score_resolution,
            score_patch_dropout,
            score_cudagraphs,
        )

    def train(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        with autocast(self.precision, self.device):
            return self._train(images, tokens)

    def train_no_grad(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        """The training forward without grad (training mode, same precision): --accum-freq's first pass, whose
        features are cached as the negatives. Call it with grad enabled: grad is switched off inside its own
        (compiled) frame, so the training forward's graph is never recompiled for a grad-mode change."""
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        with autocast(self.precision, self.device):
            return self._train_no_grad(images, tokens)

    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scoring(images, tokens)

    def no_sync(self):
        """Context for a backward whose gradients are accumulated, not yet all-reduced (DDP's ``no_sync``; nothing
        in a single process): --accum-freq all-reduces once per optimizer step."""
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()  # type: ignore[operator]


def model_from_checkpoint(path: str, name: str | None, device: torch.device, model_config: str | None = None):
    """(model, model name, eval preprocess, context length) of a saved dissect_fast or open_clip checkpoint, for
    the command-line tools; ValueError with a one-line message naming the flag for every user mistake.

    The model is built from the config the checkpoint carries (``model_cfg``: any open_clip model, built-in or
    custom); ``model_config`` (a JSON file) or ``name`` (an open_clip name other than the recorded one) override it,
    as they must for checkpoints written without a config (open_clip's, older dissect_fast ones)."""
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path}: no such file")
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        raise ValueError(f"--checkpoint: {e}") from None
    if model_config:
        build = model_name_for(name or "", model_config)
    elif name and name != ck.get("model_name"):
        build = model_name_for(name, None)
    else:
        recorded = checkpoint_model_name(ck, f"--checkpoint {path}")
        if not recorded:
            raise ValueError(
                f"--checkpoint {path} does not name its model: pass --model NAME (open_clip) or --model-config FILE.json"
            )
        build = recorded
        if ck.get("model_cfg") is None:
            build = model_name_for(build, None)
    siglip = any(k.endswith("logit_bias") for k in ck["state_dict"])  # a --siglip run: the model needs its bias
    model, _, pre_val, ctx = create_model(build, device, siglip=siglip)
    try:
        model.load_state_dict(strip_prefixes(ck["state_dict"]))
    except RuntimeError as e:
        raise ValueError(
            f"--checkpoint {path} does not fit model {build!r} (pass the --model or --model-config it was trained "
            f"with): {str(e).splitlines()[0]}"
        ) from None
    return model, build, pre_val, ctx


def load_openclip(path: str, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) of a dissect_fast checkpoint, as ``open_clip.create_model_and_transforms`` and
    ``open_clip.get_tokenizer`` give them: the model (any open_clip model, built-in or custom, rebuilt from the
    config the checkpoint carries) in eval mode on ``device``, its eval transform and its tokenizer."""
    import open_clip

    model, name, pre_val, ctx = model_from_checkpoint(path, None, torch.device(device))
    model.eval()
    return model, pre_val, open_clip.get_tokenizer(name, context_length=ctx)
