"""Self-describing checkpoints: the open_clip model config travels in the checkpoint, so `eval`, `embed`, the
`load_openclip` helper and plain open_clip (docs/checkpoints.md, run as written) rebuild any model from the file
alone; `eval` also runs zero-shot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_ecosystem import make_photo
from tiny_run import tiny_fit

import dissect_fast
from dissect_fast.cli import main as cli_main
from dissect_fast.model import create_model, model_from_checkpoint, model_name_for
from dissect_fast.training.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "checkpoints.md"
CUSTOM = {  # micro-rn with other widths: a model open_clip does not know
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """Two one-epoch runs under ROOT/runs: `my-run` (micro-rn) and `custom` (--model-config my-rn.json, the JSON
    deleted afterwards); returns (ROOT, the micro-rn run's Trainer)."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / "cfg").mkdir()
    cfg = root / "cfg" / "my-rn.json"
    cfg.write_text(json.dumps(CUSTOM))
    t, _ = tiny_fit(root / "runs", "my-run", data=tiny_data, model="micro-rn", epochs=1)
    tiny_fit(root / "runs", "custom", "--model-config", str(cfg), data=tiny_data, model="micro-rn", epochs=1)
    (root / "keep").mkdir()
    os.replace(cfg, root / "keep" / "my-rn.json")  # the run's JSON is gone; the checkpoint must describe the model
    return root, t


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 32, 32, generator=g), torch.randint(1, 49407, (4, 24), generator=g)


@torch.no_grad()
def _embed(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    was = model.training
    model.eval()
    f = model.encode_image(images, normalize=True).numpy()
    g = model.encode_text(tokens, normalize=True).numpy()
    model.train(was)
    return f, g


def test_checkpoint_carries_the_model_config(runs):
    root, _ = runs
    ck = load_checkpoint(str(root / "runs" / "custom" / "checkpoints" / "latest.pt"))
    assert ck["model_name"] == "my-rn" and ck["model_cfg"] == CUSTOM  # the user's JSON, as given
    ck = load_checkpoint(str(root / "runs" / "my-run" / "checkpoints" / "latest.pt"))
    assert ck["model_cfg"] == json.loads((ROOT / "dissect_fast" / "model_configs" / "micro-rn.json").read_text())


def test_eval_of_a_model_config_run_needs_no_flags(runs, tiny_data):
    """In a fresh process (nothing registered with open_clip), with the run's JSON deleted."""
    root, _ = runs
    ckpt = root / "runs" / "custom" / "checkpoints" / "latest.pt"
    r = subprocess.run(
        [sys.executable, "-m", "dissect_fast.cli", "eval", "--checkpoint", str(ckpt), "--val-data"]
        + [str(tiny_data / "val"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["val/num_samples"] == 64 and 0 <= m["val/image_to_text_R@1"] <= 100


def _doc_snippet() -> str:
    """The plain-open_clip block of docs/checkpoints.md, as written."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [b for b in blocks if "add_model_config" in b]
    assert len(found) == 1, "docs/checkpoints.md: expected one python block with open_clip.add_model_config"
    return found[0]


def test_doc_snippet_loads_a_micro_rn_checkpoint_in_plain_open_clip(runs):
    """The documented block, run as written in a fresh process that never imports dissect_fast (so micro-rn is
    unknown to open_clip), gives the trained model's embeddings."""
    root, trainer = runs
    images, tokens = _inputs()
    torch.save({"images": images, "tokens": tokens}, root / "inputs.pt")
    code = _doc_snippet() + (
        "\nimport sys\nassert 'dissect_fast' not in sys.modules\n"
        "x = torch.load('inputs.pt')\n"
        "with torch.no_grad():\n"
        "    f = model.encode_image(x['images'], normalize=True)\n"
        "    g = model.encode_text(x['tokens'], normalize=True)\n"
        "torch.save({'f': f, 'g': g, 'ctx': tokenizer(['a photo']).shape[1]}, 'out.pt')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = torch.load(root / "out.pt")
    f, g = _embed(trainer.model, images, tokens)
    np.testing.assert_allclose(out["f"].numpy(), f, atol=1e-5)
    np.testing.assert_allclose(out["g"].numpy(), g, atol=1e-5)
    assert out["ctx"] == 24  # micro-rn's context length: the tokenizer came from the checkpoint's config


def test_load_openclip_helper(runs):
    root, trainer = runs
    model, preprocess, tokenizer = dissect_fast.load_openclip(
        str(root / "runs" / "my-run" / "checkpoints" / "latest.pt")
    )
    images, tokens = _inputs(1)
    f, g = _embed(model, images, tokens)
    f0, g0 = _embed(trainer.model, images, tokens)
    np.testing.assert_allclose(f, f0, atol=1e-5)
    np.testing.assert_allclose(g, g0, atol=1e-5)
    assert not model.training and tokenizer(["a dog"]).shape == (1, 24)
    assert preprocess(make_photo(np.random.default_rng(0), (40, 30))[0]).shape == (3, 32, 32)


def test_checkpoints_without_a_config_load_as_before(runs, tmp_path):
    """Older checkpoints (no model_cfg): by model_name when open_clip knows it; a custom model then needs
    --model-config, and the message says so."""
    root, _ = runs
    for run in ("my-run", "custom"):
        ck = load_checkpoint(str(root / "runs" / run / "checkpoints" / "latest.pt"))
        del ck["model_cfg"]
        save_checkpoint(ck, str(tmp_path / f"{run}.pt"))
    model, name, _, ctx = model_from_checkpoint(str(tmp_path / "my-run.pt"), None, torch.device("cpu"))
    assert name == "micro-rn" and ctx == 24
    unknown = "never-registered-model"
    ck = load_checkpoint(str(tmp_path / "custom.pt"))
    ck["model_name"] = unknown  # a name no config in this process knows (my-rn was registered by training)
    save_checkpoint(ck, str(tmp_path / "custom.pt"))
    with pytest.raises(ValueError, match="pass --model-config FILE.json"):
        model_from_checkpoint(str(tmp_path / "custom.pt"), None, torch.device("cpu"))
    model, _, _, _ = model_from_checkpoint(
        str(tmp_path / "custom.pt"), None, torch.device("cpu"), str(root / "keep" / "my-rn.json")
    )
    assert model.text_projection.shape == (16, 24)


def test_pretrained_custom_model_from_the_checkpoint_config(runs, tmp_path):
    """--model NAME --pretrained FILE for a custom model that only the checkpoint describes."""
    root, _ = runs
    ck = load_checkpoint(str(root / "runs" / "custom" / "checkpoints" / "latest.pt"))
    ck["model_name"] = "only-in-the-checkpoint"
    torch.save(ck, tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="is not an open_clip model name"):
        model_name_for("only-in-the-checkpoint", None)
    name = model_name_for("only-in-the-checkpoint", None, checkpoint=str(tmp_path / "ck.pt"))
    model, _, _, _ = create_model(name, torch.device("cpu"), pretrained=str(tmp_path / "ck.pt"))
    torch.testing.assert_close(model.state_dict()["text_projection"], ck["state_dict"]["text_projection"])


def test_eval_zeroshot(runs, tmp_path, capsys, tiny_data):
    """`eval --zeroshot-data` (an ImageFolder) with and without --val-data; help shows defaults."""
    root, _ = runs
    rng = np.random.default_rng(0)
    for cls in ("red_thing", "blue_thing"):
        (tmp_path / "zs" / cls).mkdir(parents=True)
        for i in range(3):
            make_photo(rng, (32, 32))[0].save(tmp_path / "zs" / cls / f"{i}.jpg")
    ckpt = str(root / "runs" / "my-run" / "checkpoints" / "latest.pt")
    assert cli_main(["eval", "--checkpoint", ckpt, "--zeroshot-data", str(tmp_path / "zs"), "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert set(m) == {"zeroshot-val-top1", "zeroshot-val-top5"} and m["zeroshot-val-top5"] == 100.0
    argv = ["eval", "--checkpoint", ckpt, "--zeroshot-data", str(tmp_path / "zs"), "--val-data", str(tiny_data / "val")]
    assert cli_main([*argv, "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert "zeroshot-val-top1" in m and "val/image_to_text_R@1" in m
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    assert "(default: 256)" in capsys.readouterr().out
