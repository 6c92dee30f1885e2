"""Invalid flags fail with a clear message before any work."""

import subprocess
import sys

import pytest

from dissect_fast.config import ConfigError, DataConfig, SelectConfig, TrainConfig, OptimConfig, config_from_args


def args(tiny_data, *extra):
    return ["--train-data", str(tiny_data / "train"), "--model", "micro-vit", "--epochs", "3", *extra]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--select-rate", "0"], "--select-rate must be in"),
        (["--select-rate", "1.5"], "--select-rate must be in"),
        (["--select-strategy", "nope"], "unknown strategy"),
        (["--select-strategy", "dissect-warmup", "--warmup-point", "3"], "--warmup-point 3 >= --epochs 3"),
        (["--select-strategy", "clipscore", "--select-rate", "0.01", "--batch-size", "16"], "k = 0"),
        (["--precision", "fp64"], "--precision"),
        (["--momentum", "1.0"], "--momentum"),
    ],
)
def test_invalid_flags_exit_with_message(tiny_data, extra, match, capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(args(tiny_data, *extra))
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_reference_flag_names_and_aliases(tiny_data):
    cfg = config_from_args(args(tiny_data, "--select", "warmup_base_sampling", "--warmup-point", "1",
                                "--select-rate", "0.25"))
    assert cfg.select.strategy == "dissect-warmup" and cfg.select.rate == 0.25


def test_unknown_model_and_missing_data_fail_before_training(tiny_data, tmp_path):
    env_cmd = [sys.executable, "-m", "dissect_fast.train", "--logs", str(tmp_path)]
    r = subprocess.run(env_cmd + args(tiny_data)[:2] + ["--model", "NoSuchModel", "--batch-size", "16"], capture_output=True, text=True)
    assert r.returncode != 0 and "is not an open_clip model name" in r.stderr
    r = subprocess.run(env_cmd + ["--train-data", str(tmp_path / "nothing-*.tar"), "--model", "micro-vit"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no shards found" in r.stderr


def test_dataclass_validation_direct():
    with pytest.raises(ConfigError, match="--batch-size"):
        DataConfig(train_data="x", batch_size=0)
    with pytest.raises(ConfigError, match="--epochs"):
        OptimConfig(epochs=0)
    with pytest.raises(ConfigError, match="--warmup-train"):
        SelectConfig(warmup_train="sometimes")
    TrainConfig(data=DataConfig(train_data="x"))  # defaults are valid
