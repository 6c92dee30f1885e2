"""Invalid flags fail with a clear message before any work."""

import subprocess
import sys

import pytest

from dissect_fast.config import ConfigError, DataConfig, OptimConfig, SelectConfig, TrainConfig, config_from_args


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
    cfg = config_from_args(
        args(
            tiny_data,
            "--select",
            "--select-strategy",
            "warmup_base_sampling",
            "--warmup-point",
            "1",
            "--select-rate",
            "0.25",
        )
    )
    assert cfg.select.strategy == "dissect-warmup" and cfg.select.rate == 0.25


@pytest.mark.parametrize(
    "name,expected",
    [
        ("random", "random"),
        ("clipscore", "clipscore"),
        ("small_loss", "small_loss"),
        ("big_loss", "big_loss"),
        ("historical_base_sampling", "dissect-momentum"),
        ("warmup_base_sampling", "dissect-warmup"),
        ("ours", "dissect-warmup"),
    ],
)
def test_every_reference_strategy_name_resolves(tiny_data, name, expected):
    for extra in (["--select", "--select-strategy", name], ["--select-strategy", name]):  # a strategy implies --select
        cfg = config_from_args(args(tiny_data, *extra, "--warmup-point", "1"))
        assert cfg.select.strategy == expected


def test_select_switch_and_strategy_resolution(tiny_data, capsys):
    assert config_from_args(args(tiny_data)).select.strategy == "full"  # neither flag: no selection
    assert config_from_args(args(tiny_data, "--select", "--warmup-point", "1")).select.strategy == "dissect-warmup"
    assert config_from_args(args(tiny_data, "--select-strategy", "full")).select.strategy == "full"
    for full in ("full", "none"):
        with pytest.raises(SystemExit) as e:
            config_from_args(args(tiny_data, "--select", "--select-strategy", full))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--select with --select-strategy" in err and "drop --select" in err


def test_dataset_type_and_resampled_flags(tiny_data, capsys):
    cfg = config_from_args(args(tiny_data))
    assert cfg.data.dataset_type == "webdataset" and cfg.data.dataset_resampled is False and cfg.run.record is False
    cfg = config_from_args(args(tiny_data, "--dataset-type", "auto", "--dataset-resampled", "--record"))
    assert cfg.data.dataset_type == "auto" and cfg.data.dataset_resampled is True and cfg.run.record is True
    for kind, fix in (
        ("csv", "dissect-fast shards --csv FILE --images DIR --out DIR"),
        ("synthetic", "not supported"),
        ("parquet", "must be webdataset or auto"),
    ):
        with pytest.raises(SystemExit):
            config_from_args(args(tiny_data, "--dataset-type", kind))
        err = capsys.readouterr().err
        assert "--dataset-type" in err and kind in err and fix in err, err


def test_train_cc3m_sh_command_line(tiny_data):
    """The DISSect reference's train_cc3m.sh flags, verbatim except the data paths."""
    argv = [
        "--train-data", str(tiny_data / "train"), "--train-num-samples", "2905954", "--dataset-type", "webdataset",
        "--batch-size", "1280", "--precision", "amp", "--workers", "8", "--val-data", str(tiny_data / "val"),
        "--lr", "2e-3", "--warmup", "10000", "--warmup-point", "10", "--select-strategy", "warmup_base_sampling",
        "--select-rate", "0.2", "--epochs", "40", "--name", "ablation/sample_02_lr2e-3", "--select", "--record",
    ]  # fmt: skip
    cfg = config_from_args(argv)
    assert (cfg.select.strategy, cfg.select.rate, cfg.select.warmup_point) == ("dissect-warmup", 0.2, 10)
    assert cfg.optim.epochs == 40 and cfg.optim.lr == 2e-3 and cfg.data.batch_size == 1280
    assert cfg.data.train_num_samples == 2905954 and cfg.model.precision == "amp"
    assert cfg.run.record and cfg.run.name == "ablation/sample_02_lr2e-3"


def test_help_shows_defaults(capsys):
    from dissect_fast.config import build_parser

    p = build_parser()
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text: its default would not show in --help"
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--logs-dir" in out and "torchrun rejects --logs" in out and "(default: 0.2)" in out


def test_unknown_model_and_missing_data_fail_before_training(tiny_data, tmp_path):
    env_cmd = [sys.executable, "-m", "dissect_fast.train", "--logs", str(tmp_path)]
    r = subprocess.run(
        env_cmd + args(tiny_data)[:2] + ["--model", "NoSuchModel", "--batch-size", "16"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "is not an open_clip model name" in r.stderr
    r = subprocess.run(
        env_cmd + ["--train-data", str(tmp_path / "nothing-*.tar"), "--model", "micro-vit"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "no shards found" in r.stderr


def test_dataclass_validation_direct():
    with pytest.raises(ConfigError, match="--batch-size"):
        DataConfig(train_data="x", batch_size=0)
    with pytest.raises(ConfigError, match="--epochs"):
        OptimConfig(epochs=0)
    with pytest.raises(ConfigError, match="--warmup-train"):
        SelectConfig(warmup_train="sometimes")
    TrainConfig(data=DataConfig(train_data="x"))  # defaults are valid
