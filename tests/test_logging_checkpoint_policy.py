"""open_clip's logging, checkpoint-policy, LR-schedule and CUDA-default flags: RUN/steps.jsonl and train/ scalars,
--report-to (wandb optional), --save-frequency / --save-most-recent / --delete-previous-checkpoint with resume,
--lr-scheduler against open_clip's own functions, and open_clip's cuDNN/TF32 settings."""

import importlib.machinery
import json
import os
import re
import signal
import sys
import types

import pytest
import torch
from tiny_run import tiny_argv, tiny_fit

from dissect_fast.config import OptimConfig, RunConfig, config_from_args, parse_report_to
from dissect_fast.training import checkpoint as ckpt_io
from dissect_fast.training.callbacks import EpochEndFunction
from dissect_fast.training.logs import truncate_steps
from dissect_fast.training.loop import Trainer
from dissect_fast.training.reliability import Interrupted
from dissect_fast.training.schedule import make_scheduler, set_cuda_defaults

STEPS_PER_EPOCH = 15  # 240 samples / batch 16
STEP_FIELDS = {
    "step",
    "epoch",
    "loss",
    "lr",
    "logit_scale",
    "samples_per_s",
    "data_time_s",
    "batch_time_s",
    "selected_share",
    "clean_share",
}


RUN = {"model": "micro-rn", "batch": 16, "warmup": 3}  # a 2-epoch micro-rn run at batch 16 (``tiny_run``)


def argv(tiny_data, logs, name, *extra):
    return tiny_argv(logs, name, *extra, data=tiny_data, **RUN)


def run(tiny_data, logs, name, *extra):
    return tiny_fit(logs, name, *extra, data=tiny_data, **RUN)


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def ckpt_files(run_dir):
    return sorted(f for f in os.listdir(run_dir / "checkpoints") if f.endswith(".pt"))


# ------------------------------------------------------------------ per-step metrics
def test_steps_jsonl_tensorboard_and_log_lines(tiny_data, tmp_path):
    """Every --log-every-n-steps steps (and at each epoch's last step): one steps.jsonl line, train/ scalars in
    TensorBoard and, under --no-progress, open_clip's log line."""
    t, _ = run(
        tiny_data,
        tmp_path,
        "s",
        "--log-every-n-steps",
        "4",
        "--select-strategy",
        "random",
        "--select-rate",
        "0.5",
        "--report-to",
        "tensorboard",
        "--lr-scheduler",
        "const",
    )
    # --no-tensorboard (in argv) drops tensorboard from an explicit --report-to too
    assert t.cfg.run.report_to == "none" and t.ctx.tb is None
    lines = read_jsonl(tmp_path / "s" / "steps.jsonl")
    # 15 steps/epoch: logged after steps 4, 8, 12 and 15 of each of the 2 epochs
    assert [r["step"] for r in lines] == [4, 8, 12, 15, 19, 23, 27, 30]
    assert [r["epoch"] for r in lines] == [1] * 4 + [2] * 4
    for r in lines:
        assert STEP_FIELDS <= set(r), STEP_FIELDS - set(r)
        assert r["selected_share"] == 0.5 and 0.0 <= r["clean_share"] <= 1.0
        assert r["lr"] == pytest.approx(1e-3)  # const after the 3 warm-up steps
        assert r["samples_per_s"] > 0 and r["batch_time_s"] > 0 and 0 <= r["data_time_s"] <= r["batch_time_s"]
        assert r["samples_per_s"] == pytest.approx(16 / r["batch_time_s"])
        assert r["loss"] == r["loss"] and 1.0 < r["logit_scale"] <= 100.0  # exp of the learned scale
    log = (tmp_path / "s" / "out.log").read_text()
    assert log.count("Train Epoch: ") == 8
    assert "Train Epoch: 1 [ 64/240 (27%)] Data (t): " in log and " Logit Scale: " in log and " Loss: " in log


def test_train_scalars_reach_tensorboard(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_args(
        [
            a
            for a in argv(tiny_data, tmp_path, "tb", "--epochs", "1", "--log-every-n-steps", "5")
            if a != "--no-tensorboard"
        ]
    )
    assert cfg.run.report_to == "tensorboard" and cfg.run.tensorboard
    Trainer(cfg).fit()
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/scale",
        "train/samples_per_second",
        "train/data_time",
        "train/batch_time",
        "train/selected_share",
        "train/clean_share",
        "train_loss",
    ):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15]


def test_steps_jsonl_is_cut_back_to_the_resumed_checkpoint(tmp_path):
    p = tmp_path / "steps.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in (4, 8, 12)) + '{"step": 1')  # last line cut short
    truncate_steps(str(tmp_path), 8)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [4, 8]


# ------------------------------------------------------------------ --report-to
@pytest.mark.parametrize(
    "value,expected",
    [
        ("tensorboard", "tensorboard"),
        ("wandb", "wandb"),
        ("wandb,tensorboard", "wandb,tensorboard"),
        ("tensorboard,wandb", "wandb,tensorboard"),
        ("all", "wandb,tensorboard"),
        ("none", "none"),
        ("", "none"),
    ],
)
def test_report_to_values(value, expected):
    assert parse_report_to(value) == expected


def test_report_to_flags(tiny_data, tmp_path, capsys):
    base = [a for a in argv(tiny_data, tmp_path, "x") if a != "--no-tensorboard"]
    assert config_from_args(base).run.report_to == "tensorboard"  # open_clip's flag, our default
    cfg = config_from_args([*base, "--report-to", "wandb,tensorboard", "--no-tensorboard"])
    assert cfg.run.report_to == "wandb" and not cfg.run.tensorboard  # --no-tensorboard: an alias
    assert RunConfig(tensorboard=False).report_to == "none"
    with pytest.raises(SystemExit):
        config_from_args([*base, "--report-to", "mlflow"])
    assert "--report-to takes tensorboard, wandb" in capsys.readouterr().err


def test_report_to_wandb_without_wandb_fails_before_the_run_folder(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, even where it is
    cfg = config_from_args(argv(tiny_data, tmp_path, "w", "--report-to", "wandb"))
    with pytest.raises(ValueError, match=r"--report-to wandb: wandb is not installed: `pip install wandb`"):
        Trainer(cfg)
    assert not (tmp_path / "w").exists()


def fake_wandb(calls):
    """A stand-in wandb module recording init/log/finish (wandb itself is an optional dependency)."""
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, data, step=None):
            calls.append(("log", step, data))

        def finish(self, exit_code=None):
            calls.append(("finish", exit_code))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    mod.init = init
    return mod


def test_report_to_wandb_logs_steps_and_epochs(tiny_data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    run(
        tiny_data,
        tmp_path,
        "w",
        "--epochs",
        "1",
        "--log-every-n-steps",
        "5",
        "--report-to",
        "wandb",
        "--wandb-project-name",
        "proj",
        "--wandb-notes",
        "a note",
    )
    init = calls[0][1]
    assert calls[0][0] == "init" and init["project"] == "proj" and init["notes"] == "a note"
    assert init["name"] == "w" and init["dir"] == str(tmp_path / "w") and init["config"]["run"]["report_to"] == "wandb"
    logs = [c for c in calls if c[0] == "log"]
    assert [s for _, s, d in logs if "train/loss" in d] == [5, 10, 15]
    assert all(
        {"train/lr", "train/scale", "train/batch_time", "train/data_time"} <= set(d)
        for _, _, d in logs
        if "train/loss" in d
    )
    epoch = [d for _, s, d in logs if "train_loss" in d]
    assert len(epoch) == 1 and epoch[0]["epoch"] == 1 and "select/clean_fraction" in epoch[0]
    assert calls[-1] == ("finish", None)


def test_wandb_offline_when_installed(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tiny_data, tmp_path, "w", "--epochs", "1", "--report-to", "wandb")
    assert (tmp_path / "w" / "wandb").is_dir()


# ------------------------------------------------------------------ checkpoint policy
def test_save_frequency_keeps_latest_every_epoch_and_the_last_epoch(tiny_data, tmp_path):
    seen = []
    ck = tmp_path / "f" / "checkpoints"
    # before epoch 2 is saved: epoch 1 was written to latest.pt alone
    look = EpochEndFunction(
        lambda m: seen.append(
            (m["epoch"], ckpt_files(tmp_path / "f"), (ckpt_io.read_sidecar(str(ck / "latest.pt")) or {}).get("epoch"))
        )
    )
    flags = argv(tiny_data, tmp_path, "f", "--epochs", "3", "--save-frequency", "2", "--save-most-recent")
    Trainer(config_from_args(flags), callbacks=[look]).fit()
    assert seen[1] == (2, ["latest.pt"], 1)
    assert ckpt_files(tmp_path / "f") == ["epoch_2.pt", "epoch_3.pt", "latest.pt"]
    assert os.path.samefile(ck / "latest.pt", ck / "epoch_3.pt")
    assert ckpt_io.load_checkpoint(str(ck / "epoch_2.pt"))["epoch"] == 2


def test_save_frequency_zero_saves_the_last_epoch_only(tiny_data, tmp_path):
    run(tiny_data, tmp_path, "z", "--save-frequency", "0")
    assert ckpt_files(tmp_path / "z") == ["epoch_2.pt", "latest.pt"]


def test_delete_previous_checkpoint_then_resume_latest(tiny_data, tmp_path):
    name = "d"
    _, m1 = run(tiny_data, tmp_path, name, "--delete-previous-checkpoint")
    ck = tmp_path / name / "checkpoints"
    assert sorted(os.listdir(ck)) == ["epoch_2.pt", "epoch_2.pt.sha256", "latest.pt", "latest.pt.sha256"]
    t, m2 = run(tiny_data, tmp_path, name, "--delete-previous-checkpoint", "--epochs", "3", "--resume", "latest")
    assert [m["epoch"] for m in m2] == [1, 2, 3] and t.step == 3 * STEPS_PER_EPOCH
    assert m2[1]["train_loss"] == m1[1]["train_loss"]  # epoch 2's metrics come from the checkpoint
    assert sorted(os.listdir(ck)) == ["epoch_3.pt", "epoch_3.pt.sha256", "latest.pt", "latest.pt.sha256"]
    steps = [r["step"] for r in read_jsonl(tmp_path / name / "steps.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 45


def test_sigterm_mid_epoch_resumes_under_a_save_policy(tiny_data, tmp_path):
    """A stop in epoch 2 of 3 with --save-frequency 2 --delete-previous-checkpoint: latest.pt holds the mid-epoch
    state, epoch_*.pt are not touched; --resume latest finishes the run."""
    extra = ["--epochs", "3", "--save-frequency", "2", "--delete-previous-checkpoint", "--log-every-n-steps", "5"]
    t = Trainer(config_from_args(argv(tiny_data, tmp_path, "sig", *extra)))
    step = t.train_step

    def stepping(*a):
        out = step(*a)
        if t.step == STEPS_PER_EPOCH + 6:  # during the 7th step of epoch 2 (t.step counts the steps done)
            t.stop.signum = signal.SIGTERM
        return out

    t.train_step = stepping
    with pytest.raises(Interrupted, match="--resume latest"):
        t.fit()
    ck = tmp_path / "sig" / "checkpoints"
    assert ckpt_files(tmp_path / "sig") == ["latest.pt"]
    assert ckpt_io.read_sidecar(str(ck / "latest.pt"))["epoch_step"] == 7
    t2, metrics = run(tiny_data, tmp_path, "sig", *extra, "--resume", "latest")
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and t2.step == 3 * STEPS_PER_EPOCH
    assert ckpt_files(tmp_path / "sig") == ["epoch_3.pt", "latest.pt"]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--save-frequency", "-1"], "--save-frequency must be >= 0"),
        (["--lr-scheduler", "const-cooldown"], "needs --epochs-cooldown"),
        (
            ["--lr-scheduler", "const-cooldown", "--epochs-cooldown", "5"],
            r"--epochs-cooldown must be in \[1, --epochs 2\]",
        ),
        (["--lr-cooldown-power", "0"], "--lr-cooldown-power must be > 0"),
    ],
)
def test_policy_and_schedule_flags_are_checked(tiny_data, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit):
        config_from_args(argv(tiny_data, tmp_path, "x", *extra))
    assert re.search(match, capsys.readouterr().err)


# ------------------------------------------------------------------ schedules
def openclip_lrs(name, steps_per_epoch, total, optim):
    from open_clip_train import scheduler as oc

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    if name == "cosine":
        f = oc.cosine_lr(opt, optim.lr, optim.warmup, total)
    elif name == "const":
        f = oc.const_lr(opt, optim.lr, optim.warmup, total)
    else:
        f = oc.const_lr_cooldown(
            opt,
            optim.lr,
            optim.warmup,
            total,
            steps_per_epoch * optim.epochs_cooldown,
            optim.lr_cooldown_power,
            optim.lr_cooldown_end,
        )
    return [f(s) for s in range(total)]


@pytest.mark.parametrize(
    "name,extra",
    [
        ("cosine", {}),
        ("const", {}),
        ("const-cooldown", {"epochs_cooldown": 2, "lr_cooldown_end": 1e-5, "lr_cooldown_power": 2.0}),
    ],
)
def test_schedules_are_open_clips(name, extra):
    optim = OptimConfig(epochs=5, lr=1e-3, warmup=7, lr_scheduler=name, **extra)
    spe, total = 10, 50
    ref = openclip_lrs(name, spe, total, optim)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = make_scheduler(opt, optim, spe, total)
    for s in (0, 3, 6, 7, 20, 29, 30, 31, 42, 49):
        assert sched(s) == ref[s] == opt.param_groups[0]["lr"]
    if name == "const-cooldown":
        assert ref[29] == 1e-3 and ref[30] == 1e-3 and ref[40] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5**2)


def test_trainer_steps_follow_the_schedule(tiny_data, tmp_path):
    t, metrics = run(
        tiny_data,
        tmp_path,
        "cd",
        "--epochs",
        "3",
        "--log-every-n-steps",
        "1",
        "--lr-scheduler",
        "const-cooldown",
        "--epochs-cooldown",
        "1",
        "--lr-cooldown-end",
        "1e-4",
    )
    ref = openclip_lrs("const-cooldown", STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH, t.cfg.optim)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "cd" / "steps.jsonl")]
    assert lrs == ref  # one line per step, the step's lr
    assert metrics[-1]["lr"] == ref[-1] and metrics[0]["lr"] == 1e-3


# ------------------------------------------------------------------ CUDA defaults
FLAGS = (
    (torch.backends.cudnn, "benchmark"),
    (torch.backends.cudnn, "deterministic"),
    (torch.backends.cuda.matmul, "allow_tf32"),
    (torch.backends.cudnn, "allow_tf32"),
)


@pytest.fixture
def saved_backend_flags():
    saved = [getattr(o, a) for o, a in FLAGS]
    yield
    for (o, a), v in zip(FLAGS, saved):
        setattr(o, a, v)


def test_cuda_defaults_are_open_clips(saved_backend_flags):
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    set_cuda_defaults(torch.device("cpu"))
    assert [getattr(o, a) for o, a in FLAGS] == [False, True, False, False]  # a no-op on the CPU
    set_cuda_defaults(torch.device("cuda", 0))  # sets flags only: no CUDA device needed
    assert [getattr(o, a) for o, a in FLAGS] == [True, False, True, True]
