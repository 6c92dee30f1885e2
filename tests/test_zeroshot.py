"""Zero-shot classification over an image folder (open_clip's --imagenet-val over any ImageFolder)."""

import math

import pytest
import torch
from PIL import Image

from dissect_fast.data.shards import tokenizer_for
from dissect_fast.evaluation.zeroshot import (
    GENERIC_TEMPLATES,
    evaluate_zeroshot,
    load_zeroshot_set,
    zeroshot_classifier,
    zeroshot_loader,
)
from dissect_fast.model import create_model

COLOURS = {"red_apple": (220, 30, 30), "green_leaf": (30, 200, 40), "blue_sky": (40, 60, 230)}


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """3 classes x 4 images of 32 px, one distinct colour per class (slightly varied)."""
    root = tmp_path_factory.mktemp("zs")
    for name, (r, g, b) in COLOURS.items():
        (root / name).mkdir()
        for i in range(4):
            Image.new("RGB", (32, 32), (r, g + 5 * i, b)).save(root / name / f"{i}.png")
    return root


def test_folder_set_names_and_metrics(colour_folder):
    torch.manual_seed(0)
    ds, names, templates = load_zeroshot_set(str(colour_folder))
    assert names == ["blue sky", "green leaf", "red apple"]  # sorted folder order, underscores as spaces
    assert templates == list(GENERIC_TEMPLATES) and len(ds) == 12
    device = torch.device("cpu")
    model, _, pre_val, ctx = create_model("micro-rn", device)
    ds.transform = pre_val
    w = zeroshot_classifier(model, tokenizer_for(ctx), names, templates, device, "fp32")
    assert w.shape == (32, 3) and torch.allclose(w.norm(dim=0), torch.ones(3), atol=1e-4)
    assert model.training  # the mode is restored
    m = evaluate_zeroshot(model, zeroshot_loader(ds, 5, 0, device), w, device, "fp32", "zeroshot-val")
    assert set(m) == {"zeroshot-val-top1", "zeroshot-val-top5"}
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in m.values())
    assert m["zeroshot-val-top5"] == 100.0  # k clamped to the 3 classes


def test_classnames_file_order(colour_folder, tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("sky\nleaf\n\napple\n")
    _, names, _ = load_zeroshot_set(str(colour_folder), classnames_file=str(f))
    assert names == ["sky", "leaf", "apple"]
    f.write_text("sky\nleaf\n")
    with pytest.raises(ValueError, match="has 2 class names but the folder has 3"):
        load_zeroshot_set(str(colour_folder), classnames_file=str(f))


def test_imagenet_needs_1000_classes(colour_folder):
    with pytest.raises(ValueError, match=r"--imagenet-val .* has 3 class sub-folders, ImageNet has 1000"):
        load_zeroshot_set(str(colour_folder), imagenet=True)
    with pytest.raises(FileNotFoundError, match="--imagenet-val .*no such folder"):
        load_zeroshot_set(str(colour_folder / "missing"), imagenet=True)


def test_imagenet_metadata_and_numeric_order(tmp_path):
    """open_clip's ImageNet names and templates; ImageNetV2's 0..999 folders are ordered numerically."""
    import open_clip

    for i in range(1000):
        (tmp_path / str(i)).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / str(i) / "a.png")
    ds, names, templates = load_zeroshot_set(str(tmp_path), imagenet=True, flag="--imagenet-v2")
    assert names == list(open_clip.IMAGENET_CLASSNAMES)
    assert len(templates) == len(open_clip.OPENAI_IMAGENET_TEMPLATES)
    assert ds.classes[:3] == ["0", "1", "2"] and ds.class_to_idx["10"] == 10


def test_zeroshot_metrics_during_training(tiny_data, tmp_path):
    """--zeroshot-data DIR --zeroshot-frequency 1: top-1/top-5 in every epoch's metrics (open_clip's names)."""
    import json

    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    folder = tmp_path / "zs"
    for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (folder / f"class_{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), colour).save(folder / f"class_{c}" / f"{i}.jpg")
    cfg = config_from_args(
        [
            "--train-data",
            str(tiny_data / "train"),
            "--model",
            "micro-rn",
            "--batch-size",
            "40",
            "--epochs",
            "2",
            "--workers",
            "0",
            "--logs",
            str(tmp_path),
            "--name",
            "zs",
            "--no-progress",
            "--no-tensorboard",
            "--no-plots",
            "--zeroshot-data",
            str(folder),
            "--zeroshot-frequency",
            "1",
            "--precision",
            "bf16",
        ]
    )
    Trainer(cfg).fit()
    lines = [json.loads(x) for x in open(tmp_path / "zs" / "metrics.jsonl")]
    assert len(lines) == 2 and all(0 <= m["zeroshot-val-top1"] <= 100 for m in lines)
    assert all(m["zeroshot-val-top5"] == 100.0 for m in lines)  # 3 classes: top-5 holds every class
