"""The bad-input benchmark (benchmarks/bench_bad_input.py) at toy size, through `dissect-fast bench`: its result file
carries provenance, the PNG over the pixel limit is refused from its header, and the long caption is counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_bad_input_small(tmp_path):
    out = tmp_path / "bad.json"
    cmd = [sys.executable, "-m", "dissect_fast.cli", "bench", "bad_input", "--repeats", "1"]
    cmd += ["--caption-chars", "5000", "--png-side", "7000", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bad_input" and doc["commit"] and doc["device"].startswith("cpu")
    assert doc["png"]["outcome"] == "image_too_large"  # 49 Mpx > the default 40 Mpx
    assert doc["png"]["added_peak_mb"] < 100  # 7000^2 x 3 bytes = 147 MB decoded
    cap = doc["caption"]
    assert cap["data_counts"]["long"]["data/caption_too_long"] == 1
    assert "data/caption_too_long" not in cap["data_counts"]["plain"]
    assert len(cap["epoch_s"]["plain"]) == len(cap["epoch_s"]["long"]) == 1
