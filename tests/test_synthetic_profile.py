"""--data-backend synthetic (random device batches, real ids) and --profile-steps A:B (torch.profiler window
with the step's phases as ranges): short CPU runs, the loader's id and token layout, the flag checks."""

import json
import os

import numpy as np
import pytest
import torch
from tiny_run import tiny_argv, tiny_trainer

from dissect_fast.config import config_from_args
from dissect_fast.data.synthetic_loader import EOT_TOKEN, SOT_TOKEN, SyntheticLoader, model_image_size
from dissect_fast.training.loop import Trainer
from dissect_fast.training.profiling import PHASES, RangeMarker, phase_totals

#: a micro-rn run on synthetic data at batch 16 (``tiny_run``; the trainer's default LR and workers)
SYNTH = {"synthetic": True, "model": "micro-rn", "batch": 16, "lr": None, "workers": None}


def synthetic_argv(logs, name, *extra):
    """2 epochs of 64 synthetic samples."""
    return tiny_argv(logs, name, "--train-num-samples", "64", *extra, **SYNTH)


def train(logs, name, *extra, spy=None):
    t = tiny_trainer(logs, name, "--train-num-samples", "64", *extra, **SYNTH)
    if spy is not None:  # record which phase marker each step ran with
        step = t.train_step

        def spied(*a, **kw):
            spy.append(t.ctx.timer)
            return step(*a, **kw)

        t.train_step = spied
    return t, t.fit()


@pytest.mark.parametrize("strategy", ["full", "dissect-warmup"])
def test_synthetic_epochs_train_or_score_every_id(tmp_path, tiny_data, strategy):
    extra = ["--select-strategy", strategy, "--record"] + (["--warmup-point", "1"] if strategy != "full" else [])
    if strategy == "full":  # real validation shards beside synthetic training data
        extra += ["--val-data", str(tiny_data / "val"), "--workers", "0"]
    t, _ = train(tmp_path, strategy, *extra)
    assert t.data_backend == "synthetic" and t.steps_per_epoch == 4 and t.num_ids == 64
    lines = [json.loads(x) for x in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"]) for m in lines] == [(1, 4), (2, 8)]
    assert ("val/image_to_text_R@1" in lines[-1]) == (strategy == "full")
    assert all(np.isfinite(m["train_loss"]) for m in lines)
    for epoch in (1, 2):
        rec = np.load(tmp_path / strategy / "select_record" / f"record_{epoch}.npz")
        assert sorted(rec["id"].tolist()) == list(range(64)), epoch
        if strategy == "full":  # every id trained exactly once per epoch
            assert (rec["selected"] == 1).all()
        else:  # every id scored (warm-up epoch W-1 and after); k = 3 of 16 trained per step
            assert np.isfinite(rec["score"]).all() and rec["selected"].sum() == 4 * 3
    assert not os.path.exists(tmp_path / strategy / "profile")  # no --profile-steps: no profile folder


def test_synthetic_loader_ids_tokens_and_determinism():
    kw = {"image_size": (12, 10), "context_length": 9, "device": torch.device("cpu"), "seed": 3, "world_size": 2}
    ranks = [SyntheticLoader(70, 8, rank=r, **kw) for r in range(2)]  # 70 // 16 = 4 steps, 6 ids left over
    assert [len(x) for x in ranks] == [4, 4]
    epochs = []
    for epoch in (0, 1):
        for x in ranks:
            x.set_epoch(epoch)
        batches = [list(x) for x in ranks]
        ids = torch.stack([torch.stack([b[2] for b in bs]) for bs in batches])  # [rank, step, B]
        assert ids.dtype == torch.int64 and ids.unique().numel() == 64 and 0 <= ids.min() and ids.max() < 70
        for step in range(4):  # unique within a step, across the ranks
            assert ids[:, step].unique().numel() == 16
        assert ranks[0].stats["ok"] == 32
        epochs.append(ids)
        images, tokens, _ = batches[0][0]
        assert images.shape == (8, 3, 12, 10) and images.dtype == torch.float32
        assert tokens.shape == (8, 9) and tokens.dtype == torch.int64
        assert (tokens[:, 0] == SOT_TOKEN).all() and ((tokens == EOT_TOKEN).sum(1) == 1).all()
        eot = (tokens == EOT_TOKEN).int().argmax(1)
        assert (tokens.argmax(1) == eot).all()  # open_clip pools at the largest id
        after = torch.arange(9) > eot[:, None]
        assert (tokens[after] == 0).all() and (tokens[~after] > 0).all()
    assert not torch.equal(epochs[0], epochs[1])  # a fresh permutation every epoch
    again = SyntheticLoader(70, 8, rank=1, **kw)
    again.set_epoch(1)
    assert torch.equal(torch.stack([b[2] for b in again]), epochs[1][1])  # deterministic from seed and epoch


def test_model_image_size():
    from dissect_fast.model import create_model

    for name, side in (("micro-rn", 32), ("micro-vit", 32)):
        model, pre, _, _ = create_model(name, torch.device("cpu"))
        assert model_image_size(model, pre) == (side, side)
        assert model_image_size(torch.nn.Module(), pre) == (side, side)  # from the preprocess


def test_synthetic_flag_checks(tmp_path, capsys):
    cfg = config_from_args(synthetic_argv(tmp_path, "x"))
    assert cfg.data.data_backend == "synthetic" and cfg.data.train_data == "" and cfg.run.profile_steps is None
    cfg = config_from_args(["--data-backend", "synthetic", "--model", "micro-rn"])
    assert cfg.data.train_num_samples is None  # the trainer uses 100 batches
    for flag, value in (("--subset", str(tmp_path / "s.npy")), ("--dataset-resampled", None)):
        np.save(tmp_path / "s.npy", np.arange(3))
        with pytest.raises(SystemExit):
            config_from_args(synthetic_argv(tmp_path, "x", flag, *([value] if value else [])))
        err = capsys.readouterr().err
        assert flag in err and "--data-backend synthetic" in err, err
    with pytest.raises(SystemExit):  # real data still needs --train-data
        config_from_args(["--model", "micro-rn"])
    assert "--train-data is required" in capsys.readouterr().err


def test_synthetic_default_epoch_is_100_batches(tmp_path):
    t = tiny_trainer(tmp_path, "d", **{**SYNTH, "batch": 2, "epochs": 1})
    assert t.num_samples == t.num_ids == 200 and t.steps_per_epoch == 100
    assert len(t.train_loader) == 100


def _trace_events(run_dir):
    traces = [f for f in os.listdir(run_dir / "profile") if f.endswith(".pt.trace.json")]
    assert traces == ["rank0.pt.trace.json"]
    with open(run_dir / "profile" / traces[0]) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("cat") == "user_annotation"]


def test_profile_steps_writes_trace_top_ops_and_phases(tmp_path):
    markers = []
    t, _ = train(
        tmp_path,
        "prof",
        "--select-strategy",
        "clipscore",
        "--select-rate",
        "0.5",
        "--epochs",
        "1",
        "--profile-steps",
        "1:3",
        spy=markers,
    )
    # the window's steps ran with the range marker; the others with no marker at all
    assert [type(m).__name__ for m in markers] == ["NoneType", "RangeMarker", "RangeMarker", "NoneType"]
    assert t.ctx.timer is None
    names = [e["name"] for e in _trace_events(tmp_path / "prof")]
    for phase in ("data", "score", "select", "train", "optim", "sync"):
        assert names.count(phase) == 2, (phase, names)
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#1", "ProfilerStep#2"]
    top = (tmp_path / "prof" / "profile" / "top_ops.txt").read_text()
    assert "Self CPU" in top and "aten::" in top
    ph = json.loads((tmp_path / "prof" / "profile" / "phases.json").read_text())
    assert ph["steps"] == [1, 3] and ph["steps_profiled"] == 2 and list(ph["phases"]) == list(PHASES)
    assert all(v["ranges"] == 2 and v["cpu_ms"] >= 0 for v in ph["phases"].values())
    assert ph["phases"]["train"]["cpu_ms"] > 0
    log = (tmp_path / "prof" / "out.log").read_text()
    assert "ui.perfetto.dev" in log and "tensorboard --logdir" in log and "rank0.pt.trace.json" in log


def test_profile_window_past_the_end_profiles_to_the_end(tmp_path):
    """B beyond the run: a warning, and steps A..end traced across the epoch boundary (evaluation and
    checkpointing between epochs fall outside every step range)."""
    train(tmp_path, "late", "--select-strategy", "random", "--profile-steps", "3:99")
    names = [e["name"] for e in _trace_events(tmp_path / "late")]
    assert names.count("train") == 5 and names.count("data") == 5
    ph = json.loads((tmp_path / "late" / "profile" / "phases.json").read_text())
    assert ph["steps"] == [3, 8] and ph["steps_profiled"] == 5
    assert "the run has 8 steps; profiling steps 3..7" in (tmp_path / "late" / "out.log").read_text()


@pytest.mark.parametrize("value", ["3:1", "x", "-1:2", "1:1", "2", "1:b", ""])
def test_profile_steps_invalid_values_name_the_flag(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        config_from_args(synthetic_argv(tmp_path, "x", f"--profile-steps={value}"))
    assert "--profile-steps" in capsys.readouterr().err
    if value.startswith("-"):  # the spaced form: argparse takes -1:2 for a flag, and says so naming the flag
        with pytest.raises(SystemExit):
            config_from_args(synthetic_argv(tmp_path, "x", "--profile-steps", value))
        assert "--profile-steps" in capsys.readouterr().err


def test_profile_window_after_the_run_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match=r"--profile-steps 8:10: the run has only 8 steps"):
        Trainer(config_from_args(synthetic_argv(tmp_path, "after", "--profile-steps", "8:10")))
    assert not os.path.exists(tmp_path / "after")


def test_range_marker_forwards_to_an_inner_marker():
    class Calls:
        def __init__(self):
            self.calls = []

        def step(self):
            self.calls.append("step")

        def mark(self, phase):
            self.calls.append(phase)

    inner = Calls()
    m = RangeMarker(5, cuda=False, inner=inner)
    m.step()
    for p in PHASES[1:]:
        m.mark(p)
    m.close()
    assert inner.calls == ["step", *PHASES[1:]] and m.steps == 1 and m.next_step == 6


def test_phase_totals_attributes_device_work_by_launch():
    """CUDA traces: a kernel counts for the phase whose range was open when it was launched, from any
    thread (backward launches from autograd's thread while the main thread is in `train`)."""
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#0", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "score", "ts": 0, "dur": 10, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "train", "ts": 10, "dur": 50, "tid": 1},
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaLaunchKernel",
            "ts": 2,
            "dur": 1,
            "tid": 1,
            "args": {"correlation": 7},
        },
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaLaunchKernel",
            "ts": 40,
            "dur": 1,
            "tid": 2,
            "args": {"correlation": 8},
        },
        {
            "ph": "X",
            "cat": "cuda_driver",
            "name": "cuLaunchKernel",
            "ts": 70,
            "dur": 1,
            "tid": 1,
            "args": {"correlation": 9},
        },  # outside every phase range
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 30, "dur": 4000, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 80, "dur": 2000, "args": {"correlation": 8}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "m", "ts": 90, "dur": 500, "args": {"correlation": 8}},
        {"ph": "X", "cat": "kernel", "name": "k3", "ts": 95, "dur": 9000, "args": {"correlation": 9}},
    ]
    out = phase_totals(ev, steps=1, device_times=True)
    assert out["phases"]["score"]["device_ms"] == 4.0 and out["phases"]["train"]["device_ms"] == 2.5
    assert out["phases"]["train"]["cpu_ms"] == 0.05 and out["step_ms"] == 0.1
    assert sum(v["device_ms"] for v in out["phases"].values()) == 6.5
    assert "device_ms" not in phase_totals(ev, steps=1, device_times=False)["phases"]["train"]


class _CpuOnly(torch.profiler.profile):
    """torch.profiler.profile with the CUDA activity dropped (there is no device to trace here)."""

    def __init__(self, activities, **kw):
        super().__init__(activities=[torch.profiler.ProfilerActivity.CPU], **kw)


def test_cuda_window_brackets_nvtx_ranges_with_cuda_profiler_calls(tmp_path, monkeypatch):
    """The CUDA path without a GPU: the device calls are recorded instead of run. The window starts the CUDA
    profiler (nsys --capture-range=cudaProfilerApi) after a synchronize, pushes balanced NVTX ranges named like
    the trace's, and stops it after a synchronize; its summary adds the CUDA views."""
    from dissect_fast.training.profiling import StepProfiler

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(f"push {name}"))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append("pop"))
    monkeypatch.setattr(torch.profiler, "profile", _CpuOnly)
    prof = StepProfiler(1, 2, str(tmp_path / "profile"), torch.device("cuda"))
    timer = None
    for step in range(3):
        timer = prof.marker_for(step, timer)
        if timer is not None:
            timer.step()
            for p in PHASES:
                timer.mark(p)
    timer = prof.marker_for(3, timer, epoch_end=True)
    assert timer is None
    assert calls[:3] == ["sync", "start", "push ProfilerStep#1"] and calls[-3:] == ["pop", "sync", "stop"]
    pushes = [c[5:] for c in calls if c.startswith("push")]
    assert pushes == ["ProfilerStep#1", *PHASES] and calls.count("pop") == len(pushes)
    assert "self CUDA" in (tmp_path / "profile" / "top_ops.txt").read_text()
    ph = json.loads((tmp_path / "profile" / "phases.json").read_text())
    assert ph["steps"] == [1, 2] and all("device_ms" in v for v in ph["phases"].values())
