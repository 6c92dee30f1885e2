"""`dissect-fast demo` end to end at toy size: five runs, the table, the JSON, the plots."""

import json
import math
import os

import pytest

from dissect_fast import demo

pytestmark = pytest.mark.slow  # end to end: trains, or runs commands in subprocesses


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "--out",
        str(out),
        "--num-train",
        "160",
        "--num-val",
        "40",
        "--epochs",
        "2",
        "--warmup-point",
        "1",
        "--batch-size",
        "40",
        "--workers",
        "1",
    ]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.load(open(out / "demo_results.json"))
    s = res["_settings"]
    assert s["model"] == demo.DEFAULTS["model"] and s["data_backend"] in ("dali", "torch")
    names = ["full", "dissect-warmup", "clipscore", "random", "warmup-clipscore"]
    assert [r["strategy"] for r in res["summary"]] == names
    assert res["benchmark"] == "demo" and {"commit", "date", "device", "command", "versions"} <= set(res)
    for name in names:
        ms = res[name]["metrics"]
        assert [m["epoch"] for m in ms] == [1, 2]
        last = ms[-1]
        for key in ("val/image_to_text_R@1", "val/text_to_image_R@1", "select/clean_fraction", "train_loss"):
            assert math.isfinite(last[key]), (name, key)
        # 160 pairs, batch 40: 4 steps/epoch; full trains all, the r = 0.3 strategies 12 of 40 per step
        # (the warm-up strategies train the full batch in their warm-up epoch 1, then 12 per step)
        want = {
            "full": [160, 160],
            "dissect-warmup": [160, 48],
            "clipscore": [48, 48],
            "random": [48, 48],
            "warmup-clipscore": [160, 48],
        }[name]
        assert [m["select/trained_samples"] for m in ms] == want, name
    table = open(out / "demo_table.md").read()
    assert table.strip() in printed
    for name in names:
        assert f"| {name} |" in table
    for png in ("score_clean_vs_noisy_full.png", "r1_and_clean_fraction.png"):
        assert os.path.getsize(out / png) > 1000
    assert os.path.isfile(out / "runs" / "full" / "plots" / "epoch_002_score_delta.png")
