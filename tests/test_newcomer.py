"""The newcomer path: what a first-time user meets on the command line, and docs that stand on their own.

Each test names the failure it guards against (a CSV as --train-data, a failed start's folder blocking the
name, open_clip aliases, a config error under torchrun, --warmup longer than the run, epoch numbering, the
demo's Ctrl-C, subcommand --help, progress output on a non-TTY, the start-up summary, links out of the
repository). The README's activation step is checked by tests/test_readme.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_ecosystem import openclip_csv
from tiny_run import tiny_argv

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLI = str(BIN / "dissect-fast") if (BIN / "dissect-fast").is_file() else None


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The console script (or ``python -m dissect_fast.cli``) with stdout/stderr as pipes: not a terminal."""
    cmd = [CLI] if CLI else [sys.executable, "-m", "dissect_fast.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd or ROOT)


# ----------------------------------------------------------------------------- 2. a CSV as --train-data
def test_csv_train_data_answers_with_the_shards_command(tmp_path):
    """An open_clip CSV as --train-data: one line with the exact `dissect-fast shards` command, exit 2, no run
    folder; the command it gives runs as printed and makes the --train-data it names."""
    data = openclip_csv(tmp_path / "csv", 12)
    logs = tmp_path / "logs"
    r = _cli("train", "--train-data", str(data.csv), "--csv-img-key", "filepath", "--logs", str(logs))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not logs.exists(), "a CSV refused at the command line made a run folder"
    cmd = re.search(r"`(dissect-fast shards [^`]+)`", lines[0])
    assert cmd, lines[0]
    train = re.search(r"then pass --train-data (\S+)", lines[0])
    assert train, lines[0]
    argv = shlex.split(cmd.group(1))
    assert argv[argv.index("--images") + 1] == str(data.images)  # found from the CSV's first row
    done = _cli(*argv[1:])
    assert done.returncode == 0, done.stderr
    assert (Path(train.group(1)) / "index.json").is_file()


# ----------------------------------------------------------------------------- 3. no folder left by a failed start
def _run_main(argv: list[str]):
    from dissect_fast.train import main

    return main(argv)


def test_failure_before_the_first_step_leaves_no_run_folder(tmp_path, tiny_data, monkeypatch):
    """A new run that fails before its first step removes the folder it made, so the same --name starts next
    time; a run that already holds a checkpoint keeps its folder when a resume of it fails the same way."""
    from dissect_fast.training.loop import Trainer

    argv = tiny_argv(tmp_path, "first", data=tiny_data, epochs=1, model="micro-rn")

    def crash(self, *a, **k):
        raise RuntimeError("loader crashed")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", crash)
        with pytest.raises(RuntimeError, match="loader crashed"):
            _run_main(argv)
    assert not (tmp_path / "first").exists(), "the failed start left its run folder behind"
    metrics = _run_main(argv)  # the name is free again
    assert metrics[-1]["epoch"] == 1 and (tmp_path / "first" / "checkpoints" / "latest.pt").is_file()

    resume = tiny_argv(tmp_path, "first", "--resume", "latest", data=tiny_data, epochs=2, model="micro-rn")
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", crash)
        with pytest.raises(RuntimeError, match="loader crashed"):
            _run_main(resume)
    assert (tmp_path / "first" / "checkpoints" / "latest.pt").is_file(), "a failed resume removed an existing run"


# ----------------------------------------------------------------------------- 4. open_clip aliases
def test_val_frequency_and_torchcompile_are_aliases(tmp_path, tiny_data):
    from dissect_fast.config import config_from_args

    cfg = config_from_args(tiny_argv(tmp_path, "a", "--val-frequency", "3", "--torchcompile", data=tiny_data))
    assert cfg.run.val_every == 3 and cfg.model.compile is True
    cfg = config_from_args(tiny_argv(tmp_path, "a", "--val-every", "2", data=tiny_data))
    assert cfg.run.val_every == 2 and cfg.model.compile is False


# ----------------------------------------------------------------------------- 5. config errors: one line, rank 0
def test_config_error_is_one_line(tmp_path, tiny_data):
    r = _cli("train", "--train-data", str(tiny_data / "train"), "--epochs", "0", "--logs", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "dissect-fast train: error: --epochs must be >= 1, got 0 (see dissect-fast train --help)"
    ]
    assert "usage:" not in r.stdout + r.stderr


def test_config_error_under_torchrun_prints_once_and_exits_2(tmp_path, tiny_data):
    """Two ranks, one bad flag: the line once (rank 0), no usage dump, each rank's exit code 2."""
    torchrun = BIN / "torchrun"
    cmd = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    r = subprocess.run(
        [*cmd, "--standalone", "--nproc-per-node", "2", "dissect_fast/train.py"]
        + ["--train-data", str(tiny_data / "train"), "--select-rate", "2", "--logs-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=ROOT,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0
    ours = [ln for ln in out.splitlines() if "dissect_fast.train: error:" in ln]
    assert ours == [
        "dissect_fast.train: error: --select-rate must be in (0, 1], got 2.0 (see dissect_fast.train --help)"
    ]
    assert "usage:" not in out
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out)
    assert "2" in codes and not set(codes) - {"2", "-15"}, out  # rank exits 2 (a slower one may be stopped)


# ----------------------------------------------------------------------------- 6, 7, 10, 11: one run, as a SLURM log sees it
def test_non_tty_run_logs_lines_summary_and_warnings(tmp_path, tiny_data):
    """stdout/stderr are pipes (a SLURM log): no progress bar but open_clip's `Train Epoch:` lines every
    --log-every-n-steps, epochs numbered from 1 everywhere, a short start-up summary without the config dump,
    and a warning when --warmup is longer than the whole run."""
    argv = tiny_argv(tmp_path, "slurm", data=tiny_data, epochs=2, model="micro-rn", warmup=500)
    argv.remove("--no-progress")  # the default: a bar, but only on a terminal
    r = _cli("train", *argv, "--log-every-n-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "\r" not in r.stderr and "step/s" not in r.stderr and "it/s" not in r.stderr, r.stderr[-2000:]
    epochs = {int(e) for e in re.findall(r"Train Epoch: (\d+) \[", out)}
    assert epochs == {1, 2}, out
    assert re.search(r"Train Epoch: 1 \[\s*80/240 \(33%\)\]", out), out  # 240 samples, batch 40: 2 of 6 steps
    # the summary: model, data, strategy, schedule and the folder; the config stays in the folder
    run = tmp_path / "slurm"
    for piece in (f"run {run}", "model     micro-rn", "240 samples per epoch", "k = 40 of B = 40", "2 epochs x 6"):
        assert piece in out, (piece, out)
    assert "config: {" not in out and "provenance: {" not in out
    assert "config: {" in (run / "out.log").read_text()
    assert "--warmup 500 steps is longer than the whole run (12 steps" in out, out
    # one numbering: metrics, steps and checkpoint names from 1
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(ln) for ln in (run / "steps.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and {s["epoch"] for s in steps} == {1, 2}
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.pt")) == ["epoch_1.pt", "epoch_2.pt"]


def test_warmup_warning_only_past_the_run():
    """The warning's edge: a warm-up of exactly the run's steps is fine, one step more is not."""
    from types import SimpleNamespace

    from dissect_fast.training.callbacks import warmup_warning

    def context(warmup: int):
        optim = SimpleNamespace(warmup=warmup, epochs=2, lr=1e-3)
        run = SimpleNamespace(total_steps=12, steps_per_epoch=6)
        return SimpleNamespace(cfg=SimpleNamespace(optim=optim), run=run)

    assert warmup_warning(context(12)) is None and warmup_warning(context(0)) is None
    msg = warmup_warning(context(13))
    assert msg is not None and msg.startswith("--warmup 13 steps is longer than the whole run (12 steps")
    assert "92% of --lr" in msg and "--warmup 1)" in msg


class _Terminal:
    """A stderr that says it is a terminal (what tqdm draws on), collecting what is written."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None: ...

    def isatty(self) -> bool:
        return True


def test_progress_bar_counts_epochs_from_1(tmp_path, tiny_data, monkeypatch, capsys):
    """On a terminal the bar says `epoch 1/2` for the first epoch (it said `epoch 0`), and no log lines."""
    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    argv = tiny_argv(tmp_path, "bar", data=tiny_data, model="micro-rn", epochs=1)
    Trainer(config_from_args([a for a in argv if a != "--no-progress"])).fit()
    assert "epoch 1/1" in term.text and "epoch 0" not in term.text, term.text[-500:]
    assert "Train Epoch:" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- 8. Ctrl-C in the demo
def test_demo_ctrl_c_ends_with_one_line(tmp_path):
    cmd = [CLI] if CLI else [sys.executable, "-m", "dissect_fast.cli"]
    p = subprocess.Popen(
        [*cmd, "demo", "--out", str(tmp_path / "demo"), "--num-train", "200", "--num-val", "40", "--epochs", "20"]
        + ["--batch-size", "20", "--warmup-point", "2", "--workers", "0", "--data-backend", "torch"]
        + ["--device", "cpu", "--only", "full"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=tmp_path,
    )
    assert p.stdout is not None
    deadline = time.monotonic() + 120
    for line in p.stdout:  # wait until the first epoch is done: training is under way
        if "[demo] full epoch 1/" in line or time.monotonic() > deadline:
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, out[-2000:], err[-2000:])
    assert "Traceback" not in err and "--resume" not in out + err, err[-2000:]
    assert (
        out.strip().splitlines()[-1] == f"[demo] stopped; `dissect-fast demo --out {tmp_path / 'demo'}` starts it again"
    )


# ----------------------------------------------------------------------------- 9. every subcommand's --help
class _Parsed(Exception):
    pass


def _parser_of(monkeypatch, command: list[str]) -> argparse.ArgumentParser:
    """The argparse parser `dissect-fast COMMAND --help` would print, captured at its parse_args."""
    from dissect_fast import cli

    def capture(self, *a, **k):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as got:
        cli.main([*command, "--help"])
    return got.value.args[0]


@pytest.mark.parametrize(
    "command",
    [[c] for c in ("synth", "shards", "train", "index", "noise", "eval", "demo", "embed", "select-subset")]
    + [["bench", "train"]],
    ids=lambda c: " ".join(c),
)
def test_subcommand_help_has_help_and_defaults(command, monkeypatch):
    p = _parser_of(monkeypatch, command)
    bare = [a.option_strings or [a.dest] for a in p._actions if not a.help]
    assert not bare, f"dissect-fast {' '.join(command)} --help: options without a help string: {bare}"
    assert issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter), (
        f"dissect-fast {' '.join(command)} --help does not show the defaults"
    )


def test_bench_help_lists_the_benchmarks(capsys):
    from dissect_fast import cli

    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.stem[len("bench_") :] for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert names and all(re.search(rf"^  {n}\s+\S", out, re.M) for n in names), out
    assert cli.main(["bench", "no_such_bench"]) == 2
    assert "the benchmarks are " + ", ".join(names) in capsys.readouterr().err


# ----------------------------------------------------------------------------- 12. docs that stand alone
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_docs_links_stay_inside_the_repository_and_resolve():
    """Every relative link of README.md and docs/*.md resolves to a file or folder of the repository; none leaves
    it (no `../shared/...`, no absolute file path) and no document names a path outside it."""
    problems = []
    for doc in DOCS:
        text = doc.read_text()
        rel = doc.relative_to(ROOT)
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # URLs, mailto:, anchors
                continue
            path = target.split("#", 1)[0]
            resolved = (doc.parent / path).resolve()
            if path.startswith("/") or not resolved.is_relative_to(ROOT):
                problems.append(f"{rel}: link {target} points outside the repository")
            elif not resolved.exists():
                problems.append(f"{rel}: link {target} does not resolve")
        for m in re.finditer(r"\.\./shared/|(?<![\w.])/work/", text):
            problems.append(f"{rel}: names a path outside the repository: {text[m.start() : m.start() + 40]!r}")
    assert not problems, "\n".join(problems)


def test_method_doc_is_linked_and_docs_do_not_speak_of_development():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/method.md)" in readme
    method = (ROOT / "docs" / "method.md").read_text()
    for term in ("dissect-warmup", "dissect-momentum", "clipcov", "Ties", "Several GPUs", "warmup_base_sampling"):
        assert term in method, term
    for doc in DOCS:
        text = doc.read_text()
        hits = re.findall(r"(?i)\b(?:next|this|the GPU|a GPU|GPU) session\b|\bis owed\b|\bowed to\b", text)
        assert not hits, f"{doc.relative_to(ROOT)}: {hits}"
