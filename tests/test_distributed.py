"""torchrun --nproc_per_node 2 on CPU (gloo): one logical history buffer, written once, resumable on 1 rank."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dissect_fast.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def even_data(tmp_path_factory):
    """4 shards of 60: two per rank, so both ranks see 120 samples an epoch."""
    from dissect_fast.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("dist")
    make_synthetic(str(root), 240, 40, 0.4, 32, seed=9, samples_per_shard=60, progress=False)
    return root


def torchrun(data, logs, name, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "--",
           os.path.join(ROOT, "dissect_fast", "train.py"),
           "--train-data", str(data / "train"), "--val-data", str(data / "val"), "--model", "micro-vit",
           "--batch-size", "20", "--epochs", "2", "--lr", "1e-3", "--warmup", "2", "--workers", "1",
           "--logs", str(logs), "--name", name, "--no-progress", "--no-plots", "--no-tensorboard",
           "--device", "cpu", "--select-rate", "0.5", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("strategy,extra", [("dissect-momentum", []), ("dissect-warmup", ["--warmup-point", "1"])])
def test_two_ranks_share_one_history(even_data, tmp_path, strategy, extra):
    torchrun(even_data, tmp_path, strategy, "--select-strategy", strategy, *extra)
    ck1 = load_checkpoint(str(tmp_path / strategy / "checkpoints" / "epoch_1.pt"))
    h = ck1["strategy"]["history"]["values"]
    assert torch.isfinite(h).all(), f"{torch.isnan(h).sum()} of 240 samples have no history after epoch 1"
    lines = [json.loads(x) for x in open(tmp_path / strategy / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2]  # written once, by rank 0
    assert "val/image_to_text_R@1" in lines[-1]
    ck2 = load_checkpoint(str(tmp_path / strategy / "checkpoints" / "epoch_2.pt"))
    if strategy == "dissect-warmup":  # frozen after the warm-up point
        assert torch.equal(ck2["strategy"]["history"]["values"], h)
    else:
        assert not torch.equal(ck2["strategy"]["history"]["values"], h)


def test_resume_two_rank_checkpoint_on_one_rank(even_data, tmp_path):
    torchrun(even_data, tmp_path, "two", "--select-strategy", "dissect-momentum", "--epochs", "1")
    os.makedirs(tmp_path / "one" / "checkpoints")
    shutil.copy(tmp_path / "two" / "checkpoints" / "latest.pt", tmp_path / "one" / "checkpoints" / "latest.pt")
    torchrun(even_data, tmp_path, "one", "--select-strategy", "dissect-momentum", "--resume", "latest", nproc=1)
    ck = load_checkpoint(str(tmp_path / "one" / "checkpoints" / "latest.pt"))
    assert ck["epoch"] == 2 and torch.isfinite(ck["strategy"]["history"]["values"]).all()
