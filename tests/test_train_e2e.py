"""Short end-to-end runs: every strategy trains, writes complete metrics and an open_clip-loadable
checkpoint; resume continues with identical buffers."""

import json
import os

import pytest
import torch
from tiny_run import tiny_fit

from dissect_fast.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # end to end: trains, or runs commands in subprocesses

METRIC_KEYS = {
    "epoch",
    "step",
    "samples_seen",
    "wall_s",
    "train_loss",
    "val/image_to_text_R@1",
    "val/image_to_text_R@5",
    "val/text_to_image_R@1",
    "val/text_to_image_R@5",
    "select/clean_fraction",
}


def run(tiny_data, logs, name, *extra):
    """A 2-epoch micro-vit run with validation and plots (``tiny_run``): (trainer, metrics)."""
    return tiny_fit(logs, name, *extra, data=tiny_data, val=True, plots=True)


STRATEGY_ARGS = {
    "full": [],
    "random": ["--select-rate", "0.3"],
    "clipscore": ["--select-rate", "0.3"],
    "small_loss": ["--select-rate", "0.3"],
    "big_loss": ["--select-rate", "0.3"],
    "dissect-momentum": ["--select-rate", "0.3"],
    "dissect-warmup": ["--select-rate", "0.3", "--warmup-point", "1"],
    "dissect-gain": ["--select-rate", "0.3", "--warmup-point", "1"],
    "warmup-clipscore": ["--select-rate", "0.3", "--warmup-point", "1", "--warmup-train", "full"],
}


@pytest.mark.parametrize("strategy", list(STRATEGY_ARGS))
def test_every_strategy_end_to_end(tiny_data, tmp_path, strategy):
    t, metrics = run(
        tiny_data,
        tmp_path,
        strategy,
        "--select-strategy",
        strategy,
        *STRATEGY_ARGS[strategy],
        *(["--no-plots"] if strategy != "dissect-warmup" else []),
    )
    lines = [json.loads(x) for x in open(tmp_path / strategy / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        assert m["train_loss"] == m["train_loss"]  # finite, not NaN
    k = 40 if strategy == "full" else 12
    assert lines[-1]["select/trained_samples"] == t.steps_per_epoch * k
    assert 0.0 <= lines[-1]["select/clean_fraction"] <= 1.0
    # the checkpoint loads into open_clip by name and path
    import open_clip

    from dissect_fast.model import register_model_configs

    register_model_configs()
    ck = tmp_path / strategy / "checkpoints" / "latest.pt"
    model, _, _ = open_clip.create_model_and_transforms("micro-vit", pretrained=str(ck))
    ref = load_checkpoint(str(ck))["state_dict"]
    for key, v in model.state_dict().items():
        assert torch.equal(v, ref[key]), key
    if strategy == "dissect-momentum":  # every trained-epoch batch was scored: the buffer covers the samples seen
        h = t.strategy.history.values
        assert (~torch.isnan(h)).sum().item() == t.steps_per_epoch * 40
    if strategy == "dissect-warmup":
        plots = os.listdir(tmp_path / strategy / "plots")
        assert "retrieval_r1.png" in plots and "epoch_002_score_delta.png" in plots


def test_resume_continues_with_identical_buffers(tiny_data, tmp_path):
    args = ["--select-strategy", "dissect-momentum", "--select-rate", "0.3", "--no-plots", "--seed", "4"]
    t_full, m_full = run(tiny_data, tmp_path, "straight", *args, "--epochs", "3")
    t1, _ = run(tiny_data, tmp_path, "resumed", *args, "--epochs", "3")  # writes epoch_1..3
    ck1 = load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "epoch_1.pt"))
    # resume from the epoch-1 checkpoint of a fresh copy of the run
    os.makedirs(tmp_path / "r2" / "checkpoints")
    torch.save(ck1, tmp_path / "r2" / "checkpoints" / "latest.pt")
    t2, m2 = run(tiny_data, tmp_path, "r2", *args, "--epochs", "3", "--resume", "latest")
    assert [m["epoch"] for m in m2] == [1, 2, 3]  # the epoch-1 metrics come from the checkpoint
    h_straight = torch.nan_to_num(t_full.strategy.history.values, -1.0)
    h_resumed = torch.nan_to_num(t2.strategy.history.values, -1.0)
    assert torch.allclose(h_straight, h_resumed, atol=1e-4)
    assert abs(m_full[-1]["train_loss"] - m2[-1]["train_loss"]) < 1e-4
    # the buffer stored in a checkpoint is exactly the one in memory when it was saved
    ck3 = load_checkpoint(str(tmp_path / "r2" / "checkpoints" / "epoch_3.pt"))
    assert torch.equal(torch.nan_to_num(ck3["strategy"]["history"]["values"], -1.0), h_resumed)


def test_resume_from_another_model_fails_clearly(tiny_data, tmp_path):
    t, _ = run(tiny_data, tmp_path, "a", "--epochs", "1", "--no-plots")
    ck = load_checkpoint(str(tmp_path / "a" / "checkpoints" / "latest.pt"))
    ck["model_name"] = "tiny-vit"
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="pass the same --model"):
        run(tiny_data, tmp_path, "b", "--epochs", "2", "--resume", str(tmp_path / "other.pt"))


def test_dali_backend_trains_on_cpu(tiny_data, tmp_path):
    """--data-backend dali runs the same DALI graph on the CPU (device_id=None): the trainer does not
    know which loader it has, and every training sample is seen once per epoch."""
    pytest.importorskip("nvidia.dali")
    t, metrics = run(
        tiny_data,
        tmp_path,
        "dali",
        "--data-backend",
        "dali",
        "--select-strategy",
        "dissect-momentum",
        "--select-rate",
        "0.5",
        "--no-plots",
        "--epochs",
        "1",
    )
    assert t.data_backend == "dali"
    assert metrics[-1]["select/trained_samples"] == t.steps_per_epoch * 20
    assert "val/image_to_text_R@1" in metrics[-1]
    h = t.strategy.history.values  # scored once each: 240 samples make 6 full batches of 40
    assert (~torch.isnan(h)).sum().item() == t.steps_per_epoch * 40


def test_auto_backend_is_torch_without_cuda(tiny_data, tmp_path):
    t, _ = run(tiny_data, tmp_path, "auto", "--epochs", "1", "--no-plots")
    assert t.data_backend == "torch"


def test_short_epochs_record_every_warmup_epoch(tiny_data, tmp_path):
    """With epochs shorter than the data, epoch W-1 does not score every sample: w then holds each sample's
    last warm-up score from whichever warm-up epoch read it (the reference scores every warm-up epoch)."""
    import numpy as np

    t, _ = run(
        tiny_data,
        tmp_path,
        "short",
        "--select-strategy",
        "dissect-warmup",
        "--select-rate",
        "0.5",
        "--warmup-point",
        "2",
        "--epochs",
        "3",
        "--train-num-samples",
        "80",
        "--record",
    )
    assert t.data.partial_epochs and t.strategy.record_every_warmup_epoch
    recs = [np.load(tmp_path / "short" / "select_record" / f"record_{e}.npz") for e in (1, 2)]
    scored = [set(r["id"][~np.isnan(r["score"])].tolist()) for r in recs]
    assert all(len(s) == 80 for s in scored) and scored[0] - scored[1]  # epoch 0 read samples epoch 1 did not
    w = t.strategy.history.values.cpu().numpy()
    recorded = set(np.flatnonzero(~np.isnan(w)).tolist())
    assert scored[0] | scored[1] <= recorded  # every sample scored in any warm-up epoch has its w
