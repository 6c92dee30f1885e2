"""The epoch accounting the trainer writes into its metrics (metrics.jsonl, ``fit()``): samples forwarded and
trained, whether the strategy selected, and the clean share of what it trained (shards with clean flags)."""

import json

import numpy as np
import pytest
import torch
from tiny_run import tiny_fit

from dissect_fast.training.diagnostics import EpochDiagnostics, epoch_accounting
from dissect_fast.training.distributed import DistInfo

B, STEPS = 40, 6  #: tiny_data: 240 training samples, batch 40


def test_warmup_then_selection_is_counted_per_epoch(tiny_data, tmp_path):
    """dissect-warmup, warm-up point 1, rate 0.5, --warmup-train random: epoch 1 trains a random half of each
    batch and scores every batch (its scores are the warm-up record); epoch 2 scores every batch and trains the
    selected half."""
    flags = ["--select-strategy", "dissect-warmup", "--warmup-point", "1", "--select-rate", "0.5"]
    _, metrics = tiny_fit(tmp_path, "w", *flags, "--warmup-train", "random", data=tiny_data, batch=B)
    first, second = metrics
    assert (first["selecting"], second["selecting"]) == (False, True)
    k = B // 2
    for m in metrics:
        assert m["samples_trained"] == STEPS * k
        assert m["samples_forwarded"] == STEPS * B + STEPS * k  # scoring pass + training forward
        assert 0.0 <= m["clean_share_trained"] <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["samples_forwarded"], x["selecting"]) for x in lines] == [(360, False), (360, True)]


def test_full_data_forwards_each_sample_once(tiny_data, tmp_path):
    _, metrics = tiny_fit(tmp_path, "f", "--select-strategy", "full", "--epochs", "1", data=tiny_data, batch=B)
    (m,) = metrics
    assert m["samples_forwarded"] == m["samples_trained"] == STEPS * B and m["selecting"] is False


class _Strategy:
    """The two questions the accounting asks a strategy (a selecting one, scoring every batch)."""

    def needs_scoring(self, epoch: int) -> bool:
        return True

    def trains_full_batch(self, epoch: int) -> bool:
        return False


@pytest.mark.parametrize("accum", [1, 3])
def test_counts_scale_with_ranks_and_accumulation(accum):
    """Two (simulated) ranks, each reading 5 optimizer steps' batches of 8 and training 2 of each. Under
    --accum-freq the trained samples pass the training forward twice (no-grad, then again with grad)."""
    diag = EpochDiagnostics(8, torch.device("cpu"), None)
    batches = 5 * accum
    for _ in range(batches):
        diag.record(torch.arange(8), SEL, torch.tensor([0, 1]))
    out = epoch_accounting(diag, _Strategy(), 0, batches, 8, accum, DistInfo(rank=0, world_size=2))
    trained = 2 * batches * 2
    assert out["samples_trained"] == trained
    assert out["samples_forwarded"] == 2 * batches * 8 + trained * (2 if accum > 1 else 1)
    assert out["selecting"] is True and "clean_share_trained" not in out  # no clean flags


def test_clean_share_is_the_clean_trained_ids_share():
    clean = np.array([1, 0, 1, 1, 0, 0, 0, 0], dtype=np.uint8)
    diag = EpochDiagnostics(8, torch.device("cpu"), clean)
    diag.record(torch.arange(8), SEL, torch.tensor([0, 1, 4, 5]))  # 1 clean of 4
    diag.record(torch.arange(8), SEL, torch.tensor([2, 3, 6, 7]))  # 2 clean of 4
    out = epoch_accounting(diag, _Strategy(), 0, 2, 8, 1, DistInfo())
    assert out["clean_share_trained"] == pytest.approx(3 / 8) and out["samples_trained"] == 8


SEL = type("Sel", (), {"score": None, "delta": None})()  #: a completed Selection with no scores (none recorded)
