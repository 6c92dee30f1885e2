"""--resume continues the run its checkpoint describes (issue 22, item 1 and the log parts of item 7): flags left out
take the checkpoint's values, flags that change the training are refused unless --resume-override, samples_seen and
wall_s continue, config.json is never rewritten, a resume without a checkpoint empties the logs it rewrites, and a
full disk while appending a log line exits 3."""

import errno
import json
import os
import shutil

import pytest
import torch
from tiny_run import tiny_argv, tiny_fit

from dissect_fast.config import config_from_args
from dissect_fast.train import main
from dissect_fast.training import callbacks
from dissect_fast.training import logs as logging_utils
from dissect_fast.training.checkpoint import load_checkpoint
from dissect_fast.training.loop import Trainer

STEPS_PER_EPOCH = 6  # 240 samples / batch 40
#: a dissect-warmup run with validation and an LR schedule of its own (none of these are the parser's defaults)
WARMUP_RUN = ["--select-strategy", "dissect-warmup", "--select-rate", "0.3", "--warmup-point", "1", "--seed", "3"]


def resume_argv(logs, name, *extra):
    """A resume command line as a user types it: where the run is, and only what changes."""
    return ["--resume", "latest", "--logs", str(logs), "--name", name, *extra]


def read_jsonl(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 2-epoch dissect-warmup run with --val-data, made once."""
    logs = tmp_path_factory.mktemp("finished")
    tiny_fit(logs, "w", *WARMUP_RUN, "--lr", "2e-3", "--warmup", "3", data=tiny_data, val=True)
    return logs / "w"


@pytest.fixture
def warmup_run(finished_run, tmp_path):
    """A copy of ``finished_run`` to resume (under another --logs: an allowed change): (logs, name, config.json)."""
    shutil.copytree(finished_run, tmp_path / "w")
    return tmp_path, "w", (tmp_path / "w" / "config.json").read_bytes()


def openclip_cosine_lr(base: float, warmup: int, total: int, step: int) -> float:
    """open_clip's cosine schedule (``open_clip_train.scheduler.cosine_lr``) at ``step``."""
    from open_clip_train.scheduler import cosine_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return cosine_lr(opt, base, warmup, total)(step)


def test_resume_without_flags_keeps_the_run(warmup_run, finished_run):
    """`--resume latest --epochs 3` alone: selection, rate, warm-up, validation, model, LR and its schedule position
    are the checkpoint's (the parser's defaults would train k = B, no validation, lr 5e-4 warming up for 10,000
    steps); config.json is untouched; the resume is recorded with its one allowed change."""
    logs, name, config_json = warmup_run
    train_data = json.loads(config_json)["data"]["train_data"]
    # --train-data spelt another way (a trailing slash) names the same folder: no change
    cfg = config_from_args(resume_argv(logs, name, "--epochs", "3", "--train-data", f"{train_data}/"))
    assert (cfg.select.strategy, cfg.select.rate, cfg.select.warmup_point) == ("dissect-warmup", 0.3, 1)
    assert cfg.data.val_data is not None and cfg.data.batch_size == 40 and cfg.model.model == "micro-vit"
    assert (cfg.optim.lr, cfg.optim.warmup, cfg.run.seed, cfg.model.device) == (2e-3, 3, 3, "cpu")
    t = Trainer(cfg)
    metrics = t.fit()
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    last = metrics[-1]
    assert last["select/trained_samples"] == STEPS_PER_EPOCH * 12  # k = 0.3 x 40 per step, not the full batch
    assert "val/image_to_text_R@1" in last
    total = 3 * STEPS_PER_EPOCH
    assert last["lr"] == pytest.approx(openclip_cosine_lr(2e-3, 3, total, total - 1))  # the schedule's last step
    assert (logs / name / "config.json").read_bytes() == config_json
    (rec,) = read_jsonl(logs / name / "resumes.jsonl")
    assert rec["allowed"] == {"--epochs": [2, 3], "--logs": [str(finished_run.parent), str(logs)]}
    assert rec["overrides"] == {}
    assert rec["resumed_from"].endswith("epoch_2.pt") and rec["config"]["optim"]["epochs"] == 3
    assert load_checkpoint(str(logs / name / "checkpoints" / "epoch_3.pt"))["config"]["select"]["rate"] == 0.3


def test_a_changed_training_flag_is_refused_naming_it(warmup_run, capsys):
    logs, name, config_json = warmup_run
    with pytest.raises(SystemExit) as e:
        main(resume_argv(logs, name, "--epochs", "3", "--select-rate", "0.5", "--lr", "2e-3"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert "--select-rate 0.3 -> 0.5" in err and "--resume-override" in err
    assert "--lr " not in err and "--epochs" not in err  # given with the checkpoint's value; allowed to change
    assert (logs / name / "config.json").read_bytes() == config_json
    assert not (logs / name / "resumes.jsonl").exists()
    assert not (logs / name / "checkpoints" / "epoch_3.pt").exists()


def test_resume_override_applies_and_records_the_change(warmup_run):
    """With --resume-override a new batch size and rate train on; samples_seen and wall_s keep growing (under the
    old per-start formulas samples_seen would repeat 480 and wall_s restart near 0)."""
    logs, name, config_json = warmup_run
    argv = resume_argv(logs, name, "--epochs", "3", "--batch-size", "20", "--select-rate", "0.5", "--resume-override")
    t = Trainer(config_from_args(argv))
    metrics = t.fit()
    assert metrics[-1]["select/trained_samples"] == 12 * 10  # 240 / 20 steps of k = 10
    (rec,) = read_jsonl(logs / name / "resumes.jsonl")
    assert rec["overrides"] == {"--batch-size": [40, 20], "--select-rate": [0.3, 0.5]}
    assert rec["allowed"]["--epochs"] == [2, 3]
    assert (logs / name / "config.json").read_bytes() == config_json
    lines = read_jsonl(logs / name / "metrics.jsonl")
    seen = [m["samples_seen"] for m in lines]
    assert seen == [240, 480, 720]
    wall = [m["wall_s"] for m in lines]
    assert wall[2] > wall[1] > wall[0] > 0
    ck = load_checkpoint(str(logs / name / "checkpoints" / "epoch_3.pt"))
    assert ck["samples_seen"] == 720 and ck["wall_s"] >= wall[2]
    assert ck["config"]["data"]["batch_size"] == 20
    # the next resume keeps the overridden values, and needs --resume-override again for a new change
    cfg = config_from_args(resume_argv(logs, name, "--epochs", "4"))
    assert (cfg.data.batch_size, cfg.select.rate, cfg.run.resume_override) == (20, 0.5, False)


def test_resume_without_a_checkpoint_empties_the_logs_it_rewrites(tiny_data, tmp_path):
    """A run stopped before its first checkpoint (here: an error at step 4 of epoch 1) left steps.jsonl lines;
    `--resume latest` starts over from RUN/config.json's settings and writes each step once."""

    class Crash(callbacks.Callback):
        def on_step_end(self, ctx, epoch, n_steps):
            if ctx.step == 4:
                raise RuntimeError("crash before the first checkpoint")

    selection = ["--select-strategy", "random", "--select-rate", "0.5"]
    argv = tiny_argv(tmp_path, "k", *selection, "--epochs", "1", "--log-every-n-steps", "1", data=tiny_data)
    t = Trainer(config_from_args(argv), callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="crash"):
        t.fit()
    run = tmp_path / "k"
    assert [r["step"] for r in read_jsonl(run / "steps.jsonl")] == [1, 2, 3]  # step 4 stopped before its line
    assert not list((run / "checkpoints").glob("*.pt"))
    t2 = Trainer(config_from_args(resume_argv(tmp_path, "k")))
    assert t2.cfg.select.strategy == "random" and t2.cfg.run.log_every_n_steps == 1  # from config.json
    t2.fit()
    steps = [r["step"] for r in read_jsonl(run / "steps.jsonl")]
    assert steps == list(range(1, STEPS_PER_EPOCH + 1))
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [1]
    (rec,) = read_jsonl(run / "resumes.jsonl")
    assert rec["resumed_from"] is None


class _FullDisk:
    """A file whose writes fail with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("module,target", [(logging_utils, "steps.jsonl"), (callbacks, "metrics.jsonl")])
def test_disk_full_while_appending_a_log_exits_3(tiny_data, tmp_path, monkeypatch, capsys, module, target):
    real_open = open

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return _FullDisk(f) if str(path).endswith(target) and "a" in mode else f

    monkeypatch.setattr(module, "open", fake_open, raising=False)
    with pytest.raises(SystemExit) as e:
        main(tiny_argv(tmp_path, "full", "--epochs", "1", data=tiny_data))
    err = capsys.readouterr().err
    assert e.value.code == 3, err
    assert "no space left on the device" in err and "Traceback" not in err
    if target == "steps.jsonl":
        assert "steps.jsonl" in err


def test_a_checkpoint_without_a_config_keeps_the_flags_given(tiny_data, tmp_path):
    """--resume PATH of a checkpoint that holds no config (open_clip's): nothing to fill or compare; the flags given
    apply, and the record says so."""
    _, _ = tiny_fit(tmp_path, "a", "--epochs", "1", data=tiny_data)
    ck = load_checkpoint(str(tmp_path / "a" / "checkpoints" / "latest.pt"))
    del ck["config"]
    torch.save(ck, tmp_path / "foreign.pt")
    argv = tiny_argv(
        tmp_path, "b", "--epochs", "1", "--resume", str(tmp_path / "foreign.pt"), "--lr", "3e-3", data=tiny_data
    )
    t = Trainer(config_from_args(argv))
    assert t.cfg.optim.lr == 3e-3
    t.fit()
    (rec,) = read_jsonl(tmp_path / "b" / "resumes.jsonl")
    assert rec["resumed_from"].endswith("foreign.pt") and "no config" in rec["note"]
