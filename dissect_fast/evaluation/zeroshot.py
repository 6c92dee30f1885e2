"""Zero-shot classification over an image folder, as open_clip's ``--imagenet-val`` / ``--imagenet-v2``.

The class embeddings are the mean of each class name's prompt embeddings (open_clip's
``build_zero_shot_classifier``); an image is classified by its nearest class embedding. Metric
names follow open_clip's trainer: ``imagenet-zeroshot-val-top1``, ``imagenetv2-zeroshot-val-top5``,
... (values here are percentages, 0..100, like the retrieval R@K).

Wiring: ``ds, names, templates = load_zeroshot_set(folder, imagenet=True)``; set ``ds.transform`` to
the model's eval transform; ``w = zeroshot_classifier(model, tokenizer, names, templates, device,
precision)``; then ``evaluate_zeroshot(model, loader, w, device, precision, "imagenet-zeroshot-val")``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from dissect_fast.model import autocast, input_dtype

#: prompt templates for folders other than ImageNet (a class name fills the braces)
GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "an image of a {}.",
)

#: the metric-name prefixes open_clip's trainer uses; other folders get ``zeroshot-val``
PREFIX_IMAGENET = "imagenet-zeroshot-val"
PREFIX_IMAGENET_V2 = "imagenetv2-zeroshot-val"
PREFIX_FOLDER = "zeroshot-val"

IMAGENET_NUM_CLASSES = 1000


def _image_folder_class():
    """torchvision's ImageFolder with one change: class folders that are all integers (ImageNetV2's
    ``0`` .. ``999``) are ordered numerically, so that label i is class i rather than ``sorted(str)`` order."""
    from torchvision.datasets import ImageFolder

    class _Folder(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes, _ = super().find_classes(directory)
            if classes and all(c.isdigit() for c in classes):
                classes = sorted(classes, key=int)
            return classes, {c: i for i, c in enumerate(classes)}

    return _Folder


def _read_classnames(path: str, n: int, flag: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: class-name file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != n:
        raise ValueError(
            f"{flag}: {path} has {len(names)} class names but the folder has {n} class sub-folders: write one "
            f"name a line, in the sub-folders' sorted order"
        )
    return names


def load_zeroshot_set(
    folder: str,
    classnames_file: str | None = None,
    imagenet: bool = False,
    *,
    simple_templates: bool = False,
    flag: str | None = None,
):
    """(dataset, class names, templates) of an ImageFolder-style zero-shot set (one sub-folder a class).

    The dataset's ``transform`` is unset: give it the model's eval transform before loading. Classes
    are the sub-folders in sorted order (numeric order when every name is an integer, as in ImageNetV2).
    ``imagenet``: the folder must have ImageNet's 1000 classes (ILSVRC val in synset folders, or
    ImageNetV2's 0..999); the names and the 80 prompt templates are open_clip's own
    (``simple_templates``: its 7 short ones). Otherwise the names come from ``classnames_file`` (one a
    line, in class order) or from the folder names (underscores as spaces), with GENERIC_TEMPLATES.
    ``flag`` names the option in error messages.
    """
    flag = flag or ("--imagenet-val" if imagenet else "zero-shot folder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {folder}: no such folder (expected one sub-folder of images per class)")
    try:
        ds = _image_folder_class()(folder)
    except FileNotFoundError as e:  # torchvision: no class folders, or a class without images
        raise FileNotFoundError(f"{flag} {folder}: {e}") from None
    n = len(ds.classes)
    if imagenet:
        from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        if n != IMAGENET_NUM_CLASSES:
            raise ValueError(
                f"{flag} {folder}: has {n} class sub-folders, ImageNet has {IMAGENET_NUM_CLASSES} (val images in "
                f"synset folders n01440764/... or ImageNetV2's 0/ .. 999/); for another image folder use the "
                f"generic zero-shot folder option instead"
            )
        if classnames_file:
            raise ValueError(f"{flag}: ImageNet uses open_clip's class names; a class-name file is not read")
        templates = SIMPLE_IMAGENET_TEMPLATES if simple_templates else OPENAI_IMAGENET_TEMPLATES
        return ds, list(IMAGENET_CLASSNAMES), list(templates)
    if n < 2:
        raise ValueError(f"{flag} {folder}: found {n} class sub-folder(s); zero-shot classification needs at least 2")
    if classnames_file:
        names = _read_classnames(classnames_file, n, flag)
    else:
        names = [c.replace("_", " ") for c in ds.classes]
    return ds, names, list(GENERIC_TEMPLATES)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain open_clip model under DDP and torch.compile wrappers."""
    for _ in range(3):
        model = getattr(model, "_orig_mod", model)
        model = getattr(model, "module", model)
    return model


def _build_classifier(model, tokenizer, classnames, templates, device, classes_per_batch) -> torch.Tensor:
    """Fallback for open_clip versions without ``build_zero_shot_classifier``: same computation."""
    cols = []
    for i in range(0, len(classnames), classes_per_batch):
        batch = classnames[i : i + classes_per_batch]
        texts = [t.format(c) if isinstance(t, str) else t(c) for c in batch for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True)
        emb = emb.reshape(len(batch), len(templates), -1).mean(dim=1)
        cols.append(F.normalize(emb, dim=-1).T)
    return torch.cat(cols, dim=1)


def zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: torch.device,
    precision: str,
    classes_per_batch: int = 10,
) -> torch.Tensor:
    """Unit-norm class embeddings [embed dim, classes] (float32): each class's prompt embeddings averaged.

    ``tokenizer``: texts -> token ids at the model's context length (e.g.
    ``dissect_fast.data.shards.tokenizer_for(ctx)``). Runs without grad in eval mode, in batches of
    ``classes_per_batch`` class names (open_clip's trainer uses 10).
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(precision, device):
            try:
                from open_clip import build_zero_shot_classifier
            except ImportError:
                w = _build_classifier(model, tokenizer, list(classnames), list(templates), device, classes_per_batch)
            else:
                w = build_zero_shot_classifier(
                    model,
                    tokenizer=tokenizer,
                    classnames=list(classnames),
                    templates=list(templates),
                    num_classes_per_batch=classes_per_batch,
                    device=device,
                )
    finally:
        model.train(was_training)
    return w.float()


def evaluate_zeroshot(
    model: torch.nn.Module,
    loader: Iterable,
    classifier: torch.Tensor,
    device: torch.device,
    precision: str,
    prefix: str = PREFIX_FOLDER,
) -> dict[str, float]:
    """``{prefix-top1, prefix-top5}``: percentage (0..100) of images whose class is among the k nearest
    class embeddings; k is clamped to the number of classes. ``loader`` yields (images, labels)."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    num_classes = classifier.shape[1]
    ks = (min(1, num_classes), min(5, num_classes))
    hits = torch.zeros(2, dtype=torch.float64)
    n = 0
    w = classifier.to(device=device, dtype=torch.float32)
    try:
        with torch.inference_mode():
            for images, labels in loader:
                images = images.to(device, dtype=input_dtype(precision), non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast(precision, device):
                    feats = model.encode_image(images, normalize=True)  # type: ignore[operator]  # open_clip's
                logits = F.normalize(feats.float(), dim=-1) @ w
                top = logits.topk(ks[1], dim=1).indices  # [B, k5]
                correct = top.eq(labels.view(-1, 1))
                hits[0] += correct[:, : ks[0]].any(dim=1).sum().item()
                hits[1] += correct.any(dim=1).sum().item()
                n += labels.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise RuntimeError(f"zero-shot evaluation ({prefix}): the loader yielded no images")
    top1, top5 = (100.0 * hits / n).tolist()
    return {f"{prefix}-top1": top1, f"{prefix}-top5": top5}


def zeroshot_loader(dataset, batch_size: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """An in-order loader over a zero-shot set (its ``transform`` must be set: the model's eval transform)."""
    if dataset.transform is None:
        raise ValueError("zero-shot set: set dataset.transform to the model's eval transform before loading")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def zeroshot_sets(
    transform,
    *,
    imagenet_val: str | None = None,
    imagenet_v2: str | None = None,
    zeroshot_data: str | None = None,
    zeroshot_classnames: str | None = None,
) -> list[tuple[str, object, list[str], list[str]]]:
    """(metric prefix, ImageFolder with ``transform``, class names, templates) for each folder given, with the flags'
    meaning in training and in ``dissect-fast eval``: --imagenet-val, --imagenet-v2, --zeroshot-data (+
    --zeroshot-classnames)."""
    out = []
    for prefix, folder, imagenet, names, flag in (
        (PREFIX_IMAGENET, imagenet_val, True, None, "--imagenet-val"),
        (PREFIX_IMAGENET_V2, imagenet_v2, True, None, "--imagenet-v2"),
        (PREFIX_FOLDER, zeroshot_data, False, zeroshot_classnames, "--zeroshot-data"),
    ):
        if folder is not None:
            ds, classnames, templates = load_zeroshot_set(folder, names, imagenet=imagenet, flag=flag)
            ds.transform = transform
            out.append((prefix, ds, classnames, templates))
    return out


def run_zeroshot(
    model: torch.nn.Module,
    sets: Iterable[tuple[str, object, list[str], list[str]]],
    tokenizer: Callable[[list[str]], torch.Tensor],
    device: torch.device,
    precision: str,
    batch_size: int,
    workers: int,
) -> dict[str, float]:
    """Top-1/top-5 on every set of :func:`zeroshot_sets`, each with a classifier built from the model's text tower."""
    out: dict[str, float] = {}
    for prefix, ds, classnames, templates in sets:
        w = zeroshot_classifier(model, tokenizer, classnames, templates, device, precision)
        loader = zeroshot_loader(ds, batch_size, workers, device)
        out.update(evaluate_zeroshot(model, loader, w, device, precision, prefix))
    return out
