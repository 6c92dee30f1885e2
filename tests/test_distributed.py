"""torchrun on CPU (gloo): one logical history buffer (identical on every rank, verified by checksum),
written once, resumable on another world size; drift is caught; a killed worker is restarted by
torchelastic and resumes from the last checkpoint; the bf16 history path."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_run import tiny_argv, tiny_fit

from dissect_fast.selection import history as history_mod
from dissect_fast.selection.history import HistoryBuffer, buffer_checksum
from dissect_fast.selection.strategies import score_and_select
from dissect_fast.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # end to end: trains, or runs commands in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "dissect_fast", "train.py")
FAULT_TRAIN = os.path.join(ROOT, "tests", "fault_train.py")  #: train.py with the fault injection of its env vars


@pytest.fixture(scope="module")
def even_data(tmp_path_factory):
    """4 shards of 60: two per rank, so both ranks see 120 samples an epoch (6 steps of 20)."""
    from dissect_fast.tools.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("dist")
    make_synthetic(str(root), 240, 40, 0.4, 32, seed=9, samples_per_shard=60, progress=False)
    return root


def torchrun(data, logs, name, *extra, nproc=2, launcher=(), env=None, ok=True, script=TRAIN):
    """``script`` (dissect_fast/train.py, or FAULT_TRAIN) under torchrun on ``nproc`` CPU ranks, a tiny run."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *launcher,
        "--",
        script,
        *tiny_argv(logs, name, "--select-rate", "0.5", *extra, data=data, val=True, batch=20, workers=1),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics_of(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(x) for x in f]


def check_one_logical_buffer(run_dir, world_size=2):
    """Per epoch: every rank's buffer checksum (gathered at the epoch end) is the same, and equals the
    checksum of the buffer rank 0 wrote into that epoch's checkpoint: all replicas were identical."""
    lines = metrics_of(run_dir)
    for m in lines:
        sums = m["dist/history_checksums"]
        ck = load_checkpoint(str(run_dir / "checkpoints" / f"epoch_{m['epoch']}.pt"))
        expected = buffer_checksum(ck["strategy"]["history"]["values"]).tolist()
        assert sums == [expected] * world_size, (m["epoch"], sums, expected)
    return lines


@pytest.fixture(scope="module")
def momentum_run(even_data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("momentum")
    torchrun(even_data, logs, "m", "--select-strategy", "dissect-momentum", "--check-sync-every", "2")
    return logs / "m"


def _assert_shared_history(run_dir, strategy):
    ck1 = load_checkpoint(str(run_dir / "checkpoints" / "epoch_1.pt"))
    h = ck1["strategy"]["history"]["values"]
    assert torch.isfinite(h).all(), f"{torch.isnan(h).sum()} of 240 samples have no history after epoch 1"
    lines = check_one_logical_buffer(run_dir)
    assert [m["epoch"] for m in lines] == [1, 2]  # written once, by rank 0
    assert "val/image_to_text_R@1" in lines[-1]
    ck2 = load_checkpoint(str(run_dir / "checkpoints" / "epoch_2.pt"))
    if strategy == "dissect-warmup":  # frozen after the warm-up point
        assert torch.equal(ck2["strategy"]["history"]["values"], h)
    else:
        assert not torch.equal(ck2["strategy"]["history"]["values"], h)


def test_two_ranks_share_one_history_momentum(momentum_run):
    _assert_shared_history(momentum_run, "dissect-momentum")


def test_two_ranks_share_one_history_warmup_local_loss(even_data, tmp_path):
    torchrun(even_data, tmp_path, "w", "--select-strategy", "dissect-warmup", "--warmup-point", "1", "--local-loss")
    _assert_shared_history(tmp_path / "w", "dissect-warmup")
    with open(tmp_path / "w" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["dist"]["local_loss"] is True and cfg["dist"]["gather_with_grad"] is True


def test_resume_two_rank_checkpoint_on_one_rank(even_data, momentum_run, tmp_path):
    os.makedirs(tmp_path / "one" / "checkpoints")
    shutil.copy(momentum_run / "checkpoints" / "latest.pt", tmp_path / "one" / "checkpoints" / "latest.pt")
    torchrun(
        even_data,
        tmp_path,
        "one",
        "--select-strategy",
        "dissect-momentum",
        "--resume",
        "latest",
        "--epochs",
        "3",
        nproc=1,
    )
    ck = load_checkpoint(str(tmp_path / "one" / "checkpoints" / "latest.pt"))
    assert ck["epoch"] == 3 and torch.isfinite(ck["strategy"]["history"]["values"]).all()
    before = load_checkpoint(str(momentum_run / "checkpoints" / "latest.pt"))
    assert not torch.equal(ck["strategy"]["history"]["values"], before["strategy"]["history"]["values"])
    assert ck["step"] == before["step"] + 12  # one rank: 240 / 20 steps in epoch 3
    assert [m["epoch"] for m in metrics_of(tmp_path / "one")] == [1, 2, 3]  # the checkpoint's lines, then its own


def test_record_merges_ranks_and_logs_dir_passes_torchrun(even_data, tmp_path):
    """No `--` before the script: torchrun must pass --logs-dir (it rejects --logs); --record merges the
    ranks' per-id records into one file per epoch, under a nested --name."""
    import numpy as np

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "dissect_fast", "train.py"), "--train-data", str(even_data / "train"),
           "--model", "micro-vit", "--batch-size", "20", "--epochs", "1", "--lr", "1e-3", "--warmup", "2",
           "--workers", "0", "--logs-dir", str(tmp_path), "--name", "ablation/rec", "--no-progress", "--no-plots",
           "--no-tensorboard", "--device", "cpu", "--select-strategy", "dissect-momentum", "--select-rate", "0.5",
           "--record"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = np.load(tmp_path / "ablation" / "rec" / "select_record" / "record_1.npz")
    assert rec["id"].size == 240 and np.unique(rec["id"]).size == 240  # both ranks' samples, each scored once
    assert int(rec["selected"].sum()) == 2 * 6 * 10  # 2 ranks x 6 steps x k = 10
    assert not np.isnan(rec["score"]).any() and not np.isnan(rec["history"]).any()


def test_sync_check_fails_loudly_on_drift(even_data, tmp_path):
    r = torchrun(
        even_data,
        tmp_path,
        "drift",
        "--select-strategy",
        "dissect-momentum",
        "--epochs",
        "1",
        "--check-sync-every",
        "2",
        "--workers",
        "0",
        env={"DISSECT_FAST_TEST_DRIFT_AT_STEP": "1:3"},
        ok=False,
        script=FAULT_TRAIN,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "HistoryDesyncError" in out and "history buffer out of sync at step 4: rank(s) [1] differ" in out, out[
        -3000:
    ]
    assert not (tmp_path / "drift" / "checkpoints" / "epoch_1.pt").exists()


def test_elastic_restart_resumes_from_latest_checkpoint(even_data, tmp_path):
    """Rank 1 SIGKILLs itself at step 9 (epoch 2); torchrun restarts both workers, which find the run
    folder (no --name given) and resume from the epoch-1 checkpoint; the job ends with both epochs."""
    # --workers 0: a rank that raises mid-epoch with loader worker processes alive does not exit (a
    # loader issue outside this test's scope), which would leave torchrun waiting on it.
    r = torchrun(
        even_data,
        tmp_path,
        None,
        "--select-strategy",
        "dissect-momentum",
        "--workers",
        "0",
        launcher=("--max-restarts", "1"),
        env={"DISSECT_FAST_TEST_KILL_AT_STEP": "1:9"},
        script=FAULT_TRAIN,
    )
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    log = (run_dir / "out.log").read_text()
    assert "torchelastic restart 1: resumed from" in log and "epoch 2 is next (step 6)" in log, log[-3000:]
    assert "exitcode: -9" in r.stderr and "local_rank: 1" in r.stderr  # rank 1 really died of SIGKILL
    lines = check_one_logical_buffer(run_dir)
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["step"] == 12
    assert load_checkpoint(str(run_dir / "checkpoints" / "latest.pt"))["epoch"] == 2


# ---------------------------------------------------------------------- in-process: checksum and bf16 history
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checksum_is_exact_and_sensitive(monkeypatch, dtype):
    monkeypatch.setattr(history_mod, "_CHUNK", 7)  # several chunks, a ragged last one
    v = torch.full((50,), float("nan"), dtype=dtype)
    v[::3] = torch.rand(17).to(dtype) * 100
    c = buffer_checksum(v)
    assert c.dtype == torch.int64 and torch.equal(c, buffer_checksum(v.clone()))
    monkeypatch.setattr(history_mod, "_CHUNK", 1 << 24)
    assert torch.equal(c, buffer_checksum(v))  # chunking does not change it
    w = v.clone()
    w[49] = 1.0  # a NaN entry becomes a score
    assert not torch.equal(c, buffer_checksum(w))
    w = v.clone()
    w[0], w[3] = v[3], v[0]  # two entries swap places
    assert not torch.equal(c, buffer_checksum(w))


def test_bf16_history_selection_matches_float32_reference():
    g = torch.Generator().manual_seed(0)
    n, b, d, k = 40, 13, 9, 5
    hist = torch.full((n,), float("nan"))
    hist[torch.randperm(n, generator=g)[:25]] = torch.rand(25, generator=g) * 100
    h16 = hist.to(torch.bfloat16)
    h16_0 = h16.clone()
    ref = h16.float()  # the float32 values the bf16 buffer holds
    f, t = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    ids = torch.randperm(n, generator=g)[:b]
    got = score_and_select(f, t, ids, h16, k, momentum=0.9, key="delta", scale=100.0)
    want = score_and_select(f, t, ids, ref, k, momentum=0.9, key="delta", scale=100.0)
    for a, w in zip(got, want):
        assert torch.equal(a, w)
    assert h16.dtype == torch.bfloat16
    same = lambda a, b: torch.equal(torch.nan_to_num(a.float(), -1.0), torch.nan_to_num(b.float(), -1.0))
    assert same(h16, ref.to(torch.bfloat16))  # the same update, rounded once to bf16
    assert not same(h16, h16_0)  # and it did update
    seen = ~torch.isnan(hist)
    assert torch.isfinite(h16[ids]).all() and torch.equal(torch.isnan(h16[~seen]), torch.isnan(ref[~seen]))
    # read-only use (several ranks, momentum None) leaves the buffer untouched
    before = h16.clone()
    score_and_select(f, t, ids, h16, k, momentum=None, key="delta", scale=100.0)
    assert same(h16, before)


def test_bf16_history_update_and_state():
    h = HistoryBuffer(6, "cpu", torch.bfloat16)
    assert h.nbytes == 12
    h.update(torch.tensor([1, 4]), torch.tensor([50.0, 20.0]), 0.9)
    h.update(torch.tensor([1]), torch.tensor([60.0]), 0.9)
    assert h.values.dtype == torch.bfloat16 and torch.isnan(h.values[[0, 2, 3, 5]]).all()
    assert h.values[1].item() == torch.tensor(51.0).to(torch.bfloat16).item() and h.values[4].item() == 20.0
    h32 = HistoryBuffer(6, "cpu")
    h32.load_state_dict(h.state_dict())  # a bf16 checkpoint resumes into a float32 buffer and back
    assert h32.values.dtype == torch.float32
    assert torch.equal(torch.nan_to_num(h32.values, -1.0), torch.nan_to_num(h.values.float(), -1.0))


def test_bf16_history_end_to_end(tiny_data, tmp_path):
    select = ["--select-strategy", "dissect-momentum", "--select-rate", "0.3", "--history-dtype", "bf16"]
    tiny_fit(tmp_path, "bf16", *select, data=tiny_data, epochs=1)
    h = load_checkpoint(str(tmp_path / "bf16" / "checkpoints" / "latest.pt"))["strategy"]["history"]["values"]
    assert h.dtype == torch.bfloat16 and torch.isfinite(h).all()  # 240 samples, all scored in epoch 1
