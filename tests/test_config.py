"""The config in two stages: the flags alone (pure, no disk), then preflight against this machine."""

import json
import math

import numpy as np
import pytest

from dissect_fast.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SelectConfig,
    TrainConfig,
    build_parser,
    config_from_args,
)
from dissect_fast.preflight import preflight


def args(tiny_data, *extra):
    return ["--train-data", str(tiny_data / "train"), "--model", "micro-vit", "--epochs", "3", *extra]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--select-rate", "0"], "--select-rate must be in"),
        (["--select-rate", "1.5"], "--select-rate must be in"),
        (["--select-strategy", "nope"], "--select-strategy must be one of full, random"),
        (["--select-strategy", "dissect-warmup", "--warmup-point", "3"], "--warmup-point 3 >= --epochs 3"),
        (["--select-strategy", "clipscore", "--select-rate", "0.01", "--batch-size", "16"], "k = 0"),
        (["--precision", "fp64"], "--precision must be one of auto, fp32"),
        (["--momentum", "1.0"], "--momentum"),
        (["--device", "gpu"], "--device must be one of auto, cpu, cuda or cuda:N"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--resume-override"], "--resume-override applies to a resumed run"),
        (["--precision", "pure_bf16", "--score-precision", "fp32"], "--score-precision fp32 needs float32 weights"),
    ],
)
def test_invalid_flags_exit_with_message(tiny_data, extra, match, capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(args(tiny_data, *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


def test_select_switch_and_strategy_resolution(tiny_data, capsys):
    assert config_from_args(args(tiny_data)).select.strategy == "full"  # neither flag: no selection
    assert config_from_args(args(tiny_data, "--select", "--warmup-point", "1")).select.strategy == "dissect-warmup"
    assert config_from_args(args(tiny_data, "--select-strategy", "clipscore")).select.strategy == "clipscore"
    assert config_from_args(args(tiny_data, "--select-strategy", "full")).select.strategy == "full"
    for full in ("full", "none"):
        with pytest.raises(SystemExit) as e:
            config_from_args(args(tiny_data, "--select", "--select-strategy", full))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--select with --select-strategy" in err and "drop --select" in err


def test_reference_switch_takes_the_reference_defaults(tiny_data):
    """--select (the reference's switch): the reference code's defaults for the flags not typed (rate 0.5,
    warm-up point 5); the project's --select-strategy alone keeps the project's (0.2, 10); a typed flag wins."""
    run = ["--epochs", "12"]
    ref = config_from_args([*args(tiny_data), *run, "--select"]).select
    assert (ref.strategy, ref.rate, ref.warmup_point) == ("dissect-warmup", 0.5, 5)
    ref = config_from_args([*args(tiny_data), *run, "--select", "--select-strategy", "warmup_base_sampling"]).select
    assert (ref.strategy, ref.rate, ref.warmup_point) == ("dissect-warmup", 0.5, 5)
    ours = config_from_args([*args(tiny_data), *run, "--select-strategy", "dissect-warmup"]).select
    assert (ours.strategy, ours.rate, ours.warmup_point) == ("dissect-warmup", 0.2, 10)
    typed = config_from_args([*args(tiny_data), *run, "--select", "--select-rate", "0.2"]).select
    assert (typed.rate, typed.warmup_point) == (0.2, 5)
    typed = config_from_args([*args(tiny_data), *run, "--select", "--warmup-point", "10"]).select
    assert (typed.rate, typed.warmup_point) == (0.5, 10)
    # visible where the run's settings are read: the resolved config (config.json) and --help
    assert config_from_args([*args(tiny_data), *run, "--select"]).to_dict()["select"]["rate"] == 0.5
    helps = {a.dest: " ".join(a.help.split()) for a in build_parser()._actions}
    assert "0.5 when the reference's --select is given" in helps["select_rate"]
    assert "5 when the reference's --select is given" in helps["warmup_point"]


def test_dataset_type_and_resampled_flags(tiny_data, capsys):
    cfg = config_from_args(args(tiny_data))
    assert cfg.data.dataset_type == "webdataset" and cfg.data.dataset_resampled is False and cfg.run.record is False
    cfg = config_from_args(args(tiny_data, "--dataset-type", "auto", "--dataset-resampled", "--record"))
    assert cfg.data.dataset_type == "auto" and cfg.data.dataset_resampled is True and cfg.run.record is True
    for kind, fix in (
        ("csv", "dissect-fast shards --csv FILE --images DIR --out DIR"),
        ("synthetic", "use --data-backend synthetic"),
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


def test_help_shows_defaults_and_choices(capsys):
    p = build_parser()
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text: its default would not show in --help"
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--logs-dir" in out and "torchrun rejects --logs" in out and "(default: 0.2)" in out
    assert "--lr-scheduler {cosine,const,const-cooldown}" in out


def test_dataclass_validation_direct():
    with pytest.raises(ConfigError, match="--batch-size"):
        DataConfig(train_data="x", batch_size=0)
    with pytest.raises(ConfigError, match="--epochs"):
        OptimConfig(epochs=0)
    with pytest.raises(ConfigError, match="--warmup-train must be random or full, got 'sometimes'"):
        SelectConfig(warmup_train="sometimes")
    with pytest.raises(ConfigError, match="--select-rate must be a finite number"):
        SelectConfig(rate=math.inf)
    with pytest.raises(ConfigError, match="--zeroshot-classnames .* needs --zeroshot-data"):
        DataConfig(train_data="x", zeroshot_classnames="names.txt")
    TrainConfig(data=DataConfig(train_data="x"))  # defaults are valid


def test_choices_take_aliases_and_numbered_devices():
    assert ModelConfig(precision="amp_bfloat16").precision == "amp_bf16"  # open_clip's other spelling
    assert [ModelConfig(device=d).device for d in ("cuda", "cuda:0", "cuda:12")] == ["cuda", "cuda:0", "cuda:12"]
    for bad in ("cuda:", "cuda:x", "cuda:1:2", "cpu:0"):
        with pytest.raises(ConfigError, match="--device must be one of"):
            ModelConfig(device=bad)
    assert RunConfig(report_to="all").report_to == "wandb,tensorboard"
    assert RunConfig(report_to="wandb", tensorboard=False).tensorboard is False
    with pytest.raises(ConfigError, match="--report-to takes"):
        RunConfig(report_to="mlflow")


def paths_elsewhere(tmp_path) -> TrainConfig:
    """A config whose every path names nothing on this machine (e.g. rebuilt from another machine's config.json)."""
    gone = tmp_path / "elsewhere"
    return TrainConfig(
        data=DataConfig(
            train_data=str(gone / "train"),
            subset=str(gone / "subset.npy"),
            data_index=str(gone / "index"),
            imagenet_val=str(gone / "imagenet"),
            zeroshot_data=str(gone / "folder"),
            zeroshot_classnames=str(gone / "names.txt"),
        ),
        model=ModelConfig(model="micro-vit", pretrained=str(gone / "w.pt"), model_config=str(gone / "m.json")),
        run=RunConfig(resume=str(gone / "ck.pt"), report_to="none"),
    )


def test_config_is_built_without_its_paths_and_preflight_names_each(tmp_path):
    cfg = paths_elsewhere(tmp_path)  # stage 1: no disk access
    for flag in (
        "--imagenet-val",
        "--zeroshot-data",
        "--zeroshot-classnames",
        "--data-index",
        "--subset",
        "--pretrained",
        "--model-config",
        "--resume",
    ):
        with pytest.raises(ConfigError) as e:
            preflight(cfg)
        msg = str(e.value)
        assert msg.startswith(flag + " ") and str(tmp_path) in msg and "\n" not in msg, msg
        section, name = {
            "--imagenet-val": ("data", "imagenet_val"),
            "--zeroshot-data": ("data", "zeroshot_data"),
            "--zeroshot-classnames": ("data", "zeroshot_classnames"),
            "--data-index": ("data", "data_index"),
            "--subset": ("data", "subset"),
            "--pretrained": ("model", "pretrained"),
            "--model-config": ("model", "model_config"),
            "--resume": ("run", "resume"),
        }[flag]
        setattr(getattr(cfg, section), name, None)  # fixed: the next check speaks
    with pytest.raises(ConfigError, match=r"--train-data: 1 shard\(s\) do not exist"):
        preflight(cfg)


def test_preflight_checks_model_data_and_geometry(tiny_data, tmp_path):
    def cfg_of(*extra):
        return config_from_args(args(tiny_data, "--batch-size", "16", *extra))

    ok = preflight(cfg_of())
    assert ok.model_name == "micro-vit" and ok.steps_per_epoch == 240 // 16 and ok.total_steps == 3 * (240 // 16)
    assert preflight(cfg_of(), world_size=2).steps_per_epoch == 240 // 32
    with pytest.raises(ConfigError, match="'NoSuchModel' is not an open_clip model name"):
        preflight(cfg_of("--model", "NoSuchModel"))
    with pytest.raises(ConfigError, match="--score-resolution 33 is larger than micro-vit's image size"):
        preflight(cfg_of("--score-resolution", "33"))
    with pytest.raises(ConfigError, match="--train-data .*no shards found"):
        preflight(config_from_args(["--train-data", str(tmp_path / "nothing-*.tar"), "--model", "micro-vit"]))
    with pytest.raises(ConfigError, match="240 training samples make no full batch of --batch-size 160 x 2"):
        preflight(config_from_args(args(tiny_data, "--batch-size", "160")), world_size=2)
    with pytest.raises(ConfigError, match="--profile-steps 45:50: the run has only 45 steps"):
        preflight(cfg_of("--profile-steps", "45:50"))
    for ids, why in (([[1, 2]], "1-D integer array"), ([], "empty"), ([1, 1], "duplicate ids"), ([9999], "outside")):
        path = tmp_path / f"subset-{why.replace(' ', '_')}.npy"
        np.save(path, np.asarray(ids, dtype=np.int64))
        with pytest.raises(ConfigError, match=f"--subset {path}: .*{why}"):
            preflight(cfg_of("--subset", str(path)))
    np.save(tmp_path / "good.npy", np.arange(0, 240, 2))
    assert preflight(cfg_of("--subset", str(tmp_path / "good.npy"))).steps_per_epoch == 120 // 16


def test_resume_keeps_the_run_s_values_over_the_reference_defaults(tiny_data, tmp_path):
    """--resume: a flag not given takes the resumed run's value, also where --select would pick the reference's
    default (RUN/config.json stands in for a checkpoint of a run that has none yet)."""
    first = config_from_args([*args(tiny_data), "--epochs", "12", "--select-strategy", "dissect-warmup"])
    first.select.rate, first.select.warmup_point = 0.3, 7
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(first.to_dict()))
    again = config_from_args(["--resume", "latest", "--logs", str(tmp_path), "--name", "r", "--select"])
    assert (again.select.strategy, again.select.rate, again.select.warmup_point) == ("dissect-warmup", 0.3, 7)
    assert again.data.train_data == first.data.train_data and again.optim.epochs == 12
    typed = config_from_args(["--resume", "latest", "--logs", str(tmp_path), "--name", "r", "--select-rate", "0.25"])
    assert typed.select.rate == 0.25 and typed.select.warmup_point == 7
