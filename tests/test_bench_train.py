"""The training benchmark's --tiny CPU mode runs end to end (untimed: rows are checked for
completeness and consistency, not for speed), and the cheap scoring options behave."""

import math
import shlex

import pytest
import torch

from benchmarks import bench_train as bench


def test_tiny_benchmark_rows_complete(tmp_path, capsys):
    from dissect_fast.training.timing import PHASES

    argv = shlex.split(
        "--device cpu --tiny --model micro-vit --no-save --num-train 640 --batch-size 32 --steps 2 --rounds 2 "
        "--warmup-steps 1 --overlap-steps 3 --overlap-pool 2 --workers 0"
    ) + ["--data-cache", str(tmp_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    res = bench.main.last_result
    names = [r["config"] for r in res["rows"]]
    assert names == [
        "full",
        "dissect-r0.2",
        "dissect-r0.3",
        "dissect-r0.5",
        "random-r0.2",
        "dissect-r0.2-torch-select",
        "dissect-r0.2-res16",
        "dissect-r0.2-pd0.5",
        "open_clip",
    ]
    for key in ("device", "versions", "commit", "date", "command"):
        assert res[key], key
    for r in res["rows"][:-1]:
        assert r["steps"] == 4 and r["median_step_ms"] > 0 and r["samples_per_s"] > 0, r
        assert set(r["phases_ms_per_step"]) == set(PHASES)
        # the phases partition the timed span: their sum is the measured wall-clock up to timer overhead
        assert math.isclose(r["phases_sum_s"], r["wall_s"], rel_tol=0.15, abs_tol=0.01), r
        assert r["ratio_to_full"] > 0 and r["epoch_s"] > 0 and 0 <= r["data_share"] <= 1
        assert r["final_loss"] is not None
        expect_k = 32 if r["config"] == "full" else int(float(r["config"].split("-r")[1][:3]) * 32)
        assert r["k"] == expect_k, r
    by = {r["config"]: r for r in res["rows"]}
    assert by["full"]["ratio_to_full"] == 1.0
    assert by["full"]["phases_ms_per_step"]["score"] < by["dissect-r0.2"]["phases_ms_per_step"]["score"]
    for name in ("dissect-r0.2-res16", "dissect-r0.2-pd0.5"):
        ov = by[name]["topk_overlap"]
        assert 0.0 <= ov["score_key"] <= 1.0 and "score_speedup" in by[name]
    peer = by["open_clip"]
    assert "samples_per_s" in peer or peer["skipped"], peer  # ran, or says why not
    assert "ratio dissect-r0.3 / full:" in out and "CPU target" in out


def test_scoring_options_validated():
    from dissect_fast.model import check_scoring_options

    check_scoring_options("ViT-B-32", 160, 0.5)
    with pytest.raises(ValueError, match="multiple of"):
        check_scoring_options("ViT-B-32", 150, 0.0)
    with pytest.raises(ValueError, match="larger than"):
        check_scoring_options("ViT-B-32", 256, 0.0)
    with pytest.raises(ValueError, match="--score-patch-dropout needs a ViT"):
        check_scoring_options("RN50", None, 0.5)
    with pytest.raises(ValueError, match="--score-resolution needs a ViT"):
        check_scoring_options("RN50", 112, 0.0)


def test_config_flags_validated():
    from dissect_fast.config import ConfigError, ModelConfig, SelectConfig

    with pytest.raises(ConfigError, match="--score-patch-dropout"):
        ModelConfig(score_patch_dropout=1.0)
    with pytest.raises(ConfigError, match="--score-resolution"):
        ModelConfig(score_resolution=0)
    with pytest.raises(ConfigError, match="--select-backend"):
        SelectConfig(backend="cuda")


def test_cheap_scorer_semantics():
    """Full settings reproduce model(); lower resolution and patch dropout stay close, run under
    inference mode, leave the model's training forward untouched, and feed the selection op."""
    from dissect_fast.kernels.fused_select import fused_select
    from dissect_fast.model import ScoringPass, create_model

    torch.manual_seed(0)
    dev = torch.device("cpu")
    model = create_model("micro-vit", dev)[0]
    x, tok = torch.randn(8, 3, 32, 32), torch.randint(1, 400, (8, 24))
    with torch.no_grad():
        ref = model(x, tok)
    f0, g0 = ScoringPass(model, "fp32", dev)(x, tok)
    f1, g1 = ScoringPass(model, "fp32", dev, resolution=32)(x, tok)  # the custom ViT path, same size
    torch.testing.assert_close(f0, ref["image_features"])
    torch.testing.assert_close(f1, ref["image_features"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, ref["text_features"])
    assert f0.is_inference()
    for kw in ({"resolution": 16}, {"patch_dropout": 0.5}, {"resolution": 24, "patch_dropout": 0.25}):
        f, g = ScoringPass(model, "fp32", dev, **kw)(x, tok)
        assert f.shape == f0.shape and torch.isfinite(f).all()
        assert torch.allclose(f.norm(dim=-1), torch.ones(8), atol=1e-5)
        assert (f * f0).sum(-1).min() > 0.8  # a perturbation of the same features, not noise
        torch.testing.assert_close(g, g0)  # text is never degraded
    with torch.no_grad():
        torch.testing.assert_close(model(x, tok)["image_features"], ref["image_features"])  # model untouched
    # inference tensors feed the selection op and the history update outside inference mode
    hist = torch.full((16,), float("nan"))
    idx, _score, _ = fused_select(f0, g0, torch.arange(8), hist, 3, momentum=0.9, backend="torch")
    assert idx.shape == (3,) and not hist.is_inference() and (~torch.isnan(hist)).sum() == 8


def test_trainer_runs_with_cheap_scoring_flags(tiny_data, tmp_path):
    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    argv = ["--train-data", str(tiny_data / "train"), "--logs", str(tmp_path)] + shlex.split(
        "--model micro-vit --batch-size 40 --epochs 1 --workers 0 --name cheap --no-progress --no-tensorboard "
        "--no-plots --device cpu --select-strategy dissect-momentum --select-rate 0.3 --score-resolution 16 "
        "--score-patch-dropout 0.25 --select-backend torch"
    )
    t = Trainer(config_from_args(argv))
    assert t.forwards.scoring.module.grid == (2, 2)
    m = t.fit()
    assert m[-1]["select/trained_samples"] == t.steps_per_epoch * 12
    assert (~torch.isnan(t.strategy.history.values)).sum().item() == t.steps_per_epoch * 40
    with pytest.raises(SystemExit):  # argparse error naming the flag
        config_from_args([*argv[:-6], "--score-patch-dropout", "1.5"])
