"""Every flag of open_clip's trainer (``open_clip_train.params``) and what dissect_fast does with it.

Statuses: ``taken`` (same name, same meaning; the note gives any difference in defaults or values),
``differs`` (same name, another meaning here), ``mapped`` (accepted as an alias of another dissect_fast flag) and
``refused`` (not supported; the note says what to use instead). ``check_unsupported`` turns an open_clip flag our
parser lacks into one line that says so, before argparse's bare "unrecognized arguments". This module is a table:
it does not import the config (which imports it); tests/test_openclip_parity.py checks it against our parser.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

TAKEN, DIFFERS, MAPPED, REFUSED = "taken", "differs", "mapped", "refused"
STATUSES = (TAKEN, DIFFERS, MAPPED, REFUSED)

#: open_clip flag -> the dissect_fast flag it is an alias of (our parser takes both names)
MAPPED_TO: dict[str, str] = {
    "--torchcompile": "--compile",
    "--val-frequency": "--val-every",
}

_COCA = "CoCa is not supported: dissect_fast trains CLIP"
_DISTILL = "distillation is not supported: dissect_fast trains CLIP with the contrastive loss alone"
_REMOTE = "not supported: copy the --logs folder yourself (e.g. `aws s3 sync`, `rclone`) from a side job"
_CSV = "the trainer reads shards: convert the CSV once with `dissect-fast shards --csv FILE --images DIR --out DIR`"
_FORCE = "write it into a --model-config JSON (open_clip's model config format) instead"
_PREPROCESS = "not supported: the model's own open_clip preprocessing (mean, std, resize) is used"

#: open_clip flag -> (status, note), in the order of open_clip's parser
OPENCLIP_FLAGS: dict[str, tuple[str, str]] = {
    "--train-data": (TAKEN, "also a shard directory with index.json; `::`-joined sources, brace patterns, URLs"),
    "--train-data-upsampling-factors": (
        REFUSED,
        "per-source upsampling is not supported: `::`-joined --train-data sources are read uniformly",
    ),
    "--val-data": (TAKEN, "shards; evaluated as retrieval R@K"),
    "--train-num-samples": (TAKEN, "default: the dataset index's count"),
    "--val-num-samples": (REFUSED, "validation reads all of --val-data: pass fewer shards to evaluate fewer"),
    "--dataset-type": (
        TAKEN,
        "webdataset | auto; csv: convert with `dissect-fast shards`; synthetic: use --data-backend synthetic",
    ),
    "--dataset-resampled": (TAKEN, "needs a known epoch size (--train-num-samples or a dataset index)"),
    "--csv-separator": (REFUSED, _CSV),
    "--csv-img-key": (REFUSED, _CSV),
    "--csv-caption-key": (REFUSED, _CSV),
    "--imagenet-val": (TAKEN, "zero-shot ImageNet top-1/top-5 (imagenet-zeroshot-val-top1/5)"),
    "--imagenet-v2": (TAKEN, "zero-shot ImageNetV2 top-1/top-5 (imagenetv2-zeroshot-val-top1/5)"),
    "--cache-dir": (
        REFUSED,
        ("not supported: set HF_HOME or HF_HUB_CACHE (open_clip downloads through the Hugging Face cache)"),
    ),
    "--logs": (TAKEN, "alias --logs-dir (under torchrun use --logs-dir: torchrun rejects --logs)"),
    "--log-local": (REFUSED, "not supported: rank 0 writes the run's logs; every rank's errors go to stderr"),
    "--name": (TAKEN, "an existing run is refused unless --resume is given"),
    "--workers": (TAKEN, "default 2"),
    "--batch-size": (TAKEN, "per rank, before selection; default 256"),
    "--epochs": (TAKEN, ""),
    "--epochs-cooldown": (TAKEN, "LR cooldown epochs (--lr-scheduler const-cooldown)"),
    "--lr": (TAKEN, "default 5e-4 for every model"),
    "--beta1": (TAKEN, ""),
    "--beta2": (TAKEN, "default 0.98 for every model (open_clip: 0.999 for non-ViT models)"),
    "--eps": (TAKEN, "default 1e-6 for every model (open_clip: 1e-8 for non-ViT models)"),
    "--wd": (TAKEN, "not on gains, biases, embeddings' scales, logit scale (open_clip's rule)"),
    "--momentum": (
        DIFFERS,
        (
            "here: the dissect-momentum history beta; open_clip's (timm optimizers) does not apply: "
            "dissect_fast always uses AdamW"
        ),
    ),
    "--warmup": (TAKEN, ""),
    "--opt": (REFUSED, "not supported: dissect_fast always uses AdamW (torch's fused one): drop --opt"),
    "--use-bn-sync": (REFUSED, "not supported: BatchNorm statistics stay per rank"),
    "--skip-scheduler": (REFUSED, "not supported: for a constant LR use --lr-scheduler const"),
    "--lr-scheduler": (TAKEN, "cosine | const | const-cooldown"),
    "--lr-cooldown-end": (TAKEN, "LR at the end of the cooldown"),
    "--lr-cooldown-power": (TAKEN, "power of the polynomial cooldown"),
    "--save-frequency": (TAKEN, "save a checkpoint every N epochs"),
    "--save-most-recent": (TAKEN, "always on: checkpoints/latest.pt (open_clip: epoch_latest.pt) after every epoch"),
    "--zeroshot-frequency": (TAKEN, "zero-shot evaluation every N epochs"),
    "--val-frequency": (MAPPED, "evaluate every N epochs (and after the last)"),
    "--resume": (TAKEN, "a checkpoint path or `latest`"),
    "--precision": (
        TAKEN,
        "every open_clip mode (amp, amp_bf16/amp_bfloat16, bf16, pure_bf16, fp16, pure_fp16, "
        "fp32) with its meaning, plus auto (default: amp_bf16 on CUDA, fp32 on CPU)",
    ),
    "--model": (TAKEN, "open_clip names plus dissect_fast's tiny configs; also --model-config FILE.json"),
    "--pretrained": (TAKEN, "start from an open_clip pretrained tag or checkpoint file"),
    "--pretrained-image": (REFUSED, "not supported: use --pretrained for a whole CLIP checkpoint"),
    "--lock-image": (TAKEN, "freeze the image tower"),
    "--lock-image-unlocked-groups": (TAKEN, "leave the last N image-tower layer groups trainable"),
    "--lock-image-freeze-bn-stats": (TAKEN, "freeze the BatchNorm statistics of the locked image layers"),
    "--image-mean": (REFUSED, _PREPROCESS),
    "--image-std": (REFUSED, _PREPROCESS),
    "--image-interpolation": (REFUSED, _PREPROCESS),
    "--image-resize-mode": (REFUSED, _PREPROCESS),
    "--aug-cfg": (REFUSED, "not supported: the model's own open_clip training transform is used"),
    "--grad-checkpointing": (TAKEN, "activation checkpointing in both towers"),
    "--local-loss": (TAKEN, ""),
    "--gather-with-grad": (TAKEN, "default on here (--no-gather-with-grad to turn it off)"),
    "--force-context-length": (REFUSED, _FORCE),
    "--force-image-size": (REFUSED, _FORCE),
    "--force-quick-gelu": (REFUSED, _FORCE + " (or pick a -quickgelu model name)"),
    "--force-patch-dropout": (REFUSED, _FORCE + " (vision_cfg.patch_dropout)"),
    "--force-custom-text": (REFUSED, _FORCE + " (custom_text: true)"),
    "--torchscript": (REFUSED, "not supported: use --compile"),
    "--torchcompile": (MAPPED, "torch.compile the training and scoring forwards"),
    "--trace": (REFUSED, "not supported: use --compile"),
    "--accum-freq": (
        TAKEN,
        "gradient accumulation over N batches, composed with selection (selection per batch; "
        "the logit scale's gradient counted once, open_clip counts it N times)",
    ),
    "--device": (TAKEN, "auto | cpu | cuda | cuda:N; default auto"),
    "--dist-url": (REFUSED, "not needed: torchrun sets the rendezvous; under srun export MASTER_ADDR and MASTER_PORT"),
    "--dist-backend": (REFUSED, "not needed: nccl on CUDA, gloo on CPU, chosen from --device"),
    "--report-to": (TAKEN, "tensorboard, wandb or both; default tensorboard (open_clip: none); wandb is optional"),
    "--wandb-notes": (TAKEN, "with --report-to wandb"),
    "--wandb-project-name": (TAKEN, "default open-clip, as open_clip"),
    "--debug": (REFUSED, "not supported: RUN/out.log holds the run's log"),
    "--copy-codebase": (
        REFUSED,
        ("not supported: RUN/config.json records every setting; run from an installed version or a fixed checkout"),
    ),
    "--horovod": (REFUSED, "not supported: use torchrun or srun"),
    "--ddp-static-graph": (REFUSED, "not supported: DDP runs with its default (dynamic) graph"),
    "--no-set-device-rank": (
        REFUSED,
        ("not supported: when each rank sees a single GPU (CUDA_VISIBLE_DEVICES per rank), pass --device cuda:0"),
    ),
    "--seed": (TAKEN, "rank r uses seed + r"),
    "--grad-clip-norm": (TAKEN, ""),
    "--lock-text": (TAKEN, "freeze the text tower"),
    "--lock-text-unlocked-layers": (TAKEN, "leave the last N text-tower layers trainable"),
    "--lock-text-freeze-layer-norm": (
        TAKEN,
        "freeze the locked text layers' LayerNorms too (without it they "
        "train, also on native text towers, where open_clip asserts)",
    ),
    "--log-every-n-steps": (TAKEN, "default 10"),
    "--coca-caption-loss-weight": (REFUSED, _COCA),
    "--coca-contrastive-loss-weight": (REFUSED, _COCA),
    "--remote-sync": (REFUSED, _REMOTE),
    "--remote-sync-frequency": (REFUSED, _REMOTE),
    "--remote-sync-protocol": (REFUSED, _REMOTE),
    "--delete-previous-checkpoint": (TAKEN, "keep only the newest epoch checkpoint"),
    "--distill-model": (REFUSED, _DISTILL),
    "--distill-pretrained": (REFUSED, _DISTILL),
    "--use-bnb-linear": (REFUSED, "not supported: bitsandbytes int8 layers"),
    "--siglip": (TAKEN, "SigLIP's sigmoid loss instead of the softmax contrastive loss"),
    "--loss-dist-impl": (REFUSED, "not supported: the loss's distributed implementation is fixed"),
}


def _reason(flag: str) -> str:
    status, note = OPENCLIP_FLAGS[flag]
    return f"use {MAPPED_TO[flag]} ({note})" if status == MAPPED else note


def check_unsupported(argv: Sequence[str], known_option_strings: Iterable[str]) -> str | None:
    """One line for the first open_clip flag in ``argv`` that our parser does not know, else None.

    ``known_option_strings``: our parser's, e.g. ``{s for a in parser._actions for s in a.option_strings}``.
    Call before ``parser.parse_args(argv)`` and pass the line to ``parser.error``.
    """
    known = set(known_option_strings)
    for arg in argv:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known and flag in OPENCLIP_FLAGS:
            return f"{flag} is an open_clip flag dissect_fast does not take: {_reason(flag)}"
    return None


def flag_table_markdown() -> str:
    """The table as Markdown, for docs/openclip-flags.md: open_clip flag | dissect_fast | note."""
    shown = {TAKEN: "same", DIFFERS: "**differs**", REFUSED: "no"}
    lines = ["| open_clip flag | dissect_fast | note |", "| --- | --- | --- |"]
    for flag, (status, note) in OPENCLIP_FLAGS.items():
        cell = f"`{MAPPED_TO[flag]}`" if status == MAPPED else shown[status]
        lines.append(f"| `{flag}` | {cell} | {note.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"
