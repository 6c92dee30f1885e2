"""benchmarks/gpu_check.py, the two prepared calls of a GPU session, checked on CPU: the phase table covers what each
call measures within its budget and the 8 files that come back; a phase's outcome comes from its exit code, its time
from the budget, and a phase cut by its timeout leaves no process behind; wheels install only where a module does not
import, and a module that still does not import stops the check (exit 3); the dry run of both calls writes every
phase's result and a summary with provenance. On CUDA: a training step runs without a host sync."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from benchmarks import gpu_check as gc
from benchmarks import gpu_env

ROOT = Path(__file__).resolve().parents[1]
#: what the GPU machine lacks (it has torch, triton, torchvision, numpy, pandas, pytest, timm, ...); regex: open_clip's
#: tokenizer imports it; PyYAML: webdataset's
GPU_MISSING = {"open_clip_torch", "ftfy", "wcwidth", "webdataset", "braceexpand", "regex", "pyyaml"}
CALL_1 = ["pytest-gpu", "select", "train-eager", "photos-torch", "train-photos-torch"]
CALL_2 = ["train-compiled", "profile", "photos-gpu", "train-photos-gpu", "subset"]
FIELDS = {"benchmark", "call", "dry_run", "commit", "date", "device", "versions", "command", "setup", "budget_s"}
FIELDS |= {"elapsed_s", "phases", "targets"}


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for k in ("OUT", "DISSECT_SELECT_THRESHOLDS"):
        env.pop(k, None)
    return env


def _check(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", *args]


def _paths(tmp_path: Path) -> dict:
    paths = {"py": sys.executable, **{k: str(tmp_path / k) for k in ("out", "scratch", "state")}}
    for k in ("out", "scratch", "state"):
        Path(paths[k]).mkdir()
    return paths


@pytest.mark.parametrize("sizes", [gc.GPU, gc.DRY], ids=["cuda", "cpu"])
def test_phase_table(sizes):
    """Each call runs its phases in the order of value, within its budget (the wheel install kept aside), every
    command a module that exists here with placeholders that are filled in, at most 8 files back per call."""
    table = gc.phases(sizes)
    assert [p.name for p in table if p.call == "1"] == CALL_1
    assert [p.name for p in table if p.call == "2"] == CALL_2
    assert set(gc.TARGETS.values()) <= {p.name for p in table}
    for call in "12":
        mine = [p for p in table if p.call == call]
        assert sum(p.budget_s for p in mine) + gc.SETUP_S <= gc.CALL_BUDGET_S, call
        files = {"summary.json", "gpu_check.log"}
        for p in mine:
            argv = shlex.split(p.command)
            assert argv[:2] == ["{py}", "-m"] and importlib.util.find_spec(argv[2]) is not None, p.name
            assert set(re.findall(r"\{(\w+)\}", p.command)) <= {"py", "out", "scratch", "state"}, p.name
            assert {d for f, d in zip(argv, argv[1:]) if f == "--device"} <= {sizes.device}, p.name
            files |= set(re.findall(r"\{out\}/([\w.-]+)", p.command))
            files |= {Path(c).name for c in p.collect}
        assert len(files) <= 8, (call, sorted(files))
    assert "select_thresholds.json" in {f for p in table for f in re.findall(r"\{out\}/([\w.-]+)", p.command)}


def _phase(tmp_path, code: str, **kw) -> gc.Phase:
    script = tmp_path / f"phase{len(list(tmp_path.glob('phase*.py')))}.py"
    script.write_text(code)
    return gc.Phase(kw.pop("name", "x"), "1", kw.pop("budget_s", 30), f"{{py}} {script} {{out}} {{scratch}}", **kw)


def test_phase_outcome_from_its_exit_code(tmp_path):
    """ok / failed (with the log's tail) / skipped for a CUDA-only phase in the dry run; what it writes to the output
    folder or, named in its table row, under scratch is listed; the measured thresholds reach the next phase."""
    paths, env = _paths(tmp_path), gpu_env.phase_env()
    out = Path(paths["out"])
    write = "import sys, os, pathlib; o, s = map(pathlib.Path, sys.argv[1:]); (s / 'd').mkdir()\n"
    write += "(s / 'd' / 'r.txt').write_text('ops'); (o / 'select_thresholds.json').write_text('{}')\n"
    ph = _phase(tmp_path, write, collect=("d/r.txt", "d/absent.json"))
    ok = gc.run_phase(ph, paths, gpu_env.Budget(60), 1.0, env, False)
    assert ok["status"] == "ok" and ok["exit_code"] == 0 and ok["files"] == ["select_thresholds.json", "r.txt"]
    assert (out / "r.txt").read_text() == "ops"
    env_check = "import os, sys; print('thresholds', os.environ.get('DISSECT_SELECT_THRESHOLDS')); sys.exit(3)"
    bad = gc.run_phase(_phase(tmp_path, env_check), paths, gpu_env.Budget(60), 1.0, env, False)
    assert bad["status"] == "failed" and bad["exit_code"] == 3
    assert f"thresholds {out / 'select_thresholds.json'}" in bad["log_tail"]
    cuda = "raise SystemExit('bench_select needs a CUDA device')"
    for dry, status in ((True, "skipped"), (False, "failed")):
        rec = gc.run_phase(_phase(tmp_path, cuda, cuda_only=True), paths, gpu_env.Budget(60), 1.0, env, dry)
        assert rec["status"] == status, rec
    crash = _phase(tmp_path, "raise SystemExit(1)", cuda_only=True)
    other = gc.run_phase(crash, paths, gpu_env.Budget(60), 1.0, env, True)
    assert other["status"] == "failed"  # a CUDA-only phase failing for another reason fails the dry run
    marks = gc.target_marks({"select": bad, "train-eager": ok}, "other call")
    assert {marks[n]["status"] for n, p in gc.TARGETS.items() if p == "select"} == {"failed"}
    assert {marks[n]["status"] for n, p in gc.TARGETS.items() if p == "train-eager"} == {"measured"}
    assert marks["data wait < 5% (--data-backend gpu, photo JPEGs)"]["status"] == "not measured"


def test_budget_cuts_and_skips(tmp_path, monkeypatch):
    """A phase runs for at most its cap (scaled) and what is left of the call's budget; cut, its whole process group
    is stopped (a grandchild too); with too little left it does not start."""
    paths, env = _paths(tmp_path), gpu_env.phase_env()
    monkeypatch.setattr(gc, "MIN_START_S", 0.5)
    sleeper = (
        "import subprocess, sys, time\np = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    )
    sleeper += "open(sys.argv[2] + '/pid', 'w').write(str(p.pid)); p.wait()"
    t0 = time.monotonic()
    cut = gc.run_phase(_phase(tmp_path, sleeper, budget_s=2), paths, gpu_env.Budget(60), 1.0, env, False)
    assert cut["status"] == "timeout" and cut["exit_code"] is None and time.monotonic() - t0 < 20
    stat = Path(f"/proc/{(Path(paths['scratch']) / 'pid').read_text()}/stat")
    for _ in range(50):  # gone, or a zombie nobody reaps (its parent was stopped too)
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the phase's grandchild still runs")
    late = gc.run_phase(_phase(tmp_path, "pass", budget_s=30), paths, gpu_env.Budget(0.2), 1.0, env, False)
    assert late["status"] == "skipped" and late["reason"].startswith("budget")
    scaled = gc.run_phase(_phase(tmp_path, sleeper, budget_s=0.5), paths, gpu_env.Budget(60), 3.0, env, False)
    assert scaled["status"] == "timeout" and 1.0 <= scaled["seconds"] < 10  # the dry run's scale: 1.5 s


def _fake_wheel(folder: Path, name: str = "gcfake") -> Path:
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(whl, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{name}-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files))
    return whl


def test_install_missing(tmp_path):
    """Only the wheels whose module does not import are installed (from the folder, no index); one with no wheel is
    named in ``missing_after``."""
    _fake_wheel(tmp_path)
    rec = gpu_env.install_missing(f"gcfake==1.0 numpy=={version('numpy')}", tmp_path, tmp_path / "site")
    assert rec["missing_before"] == ["gcfake"] and rec["installed"] == ["gcfake==1.0"] and rec["missing_after"] == {}
    p = subprocess.run(
        [sys.executable, "-c", "import gcfake; print(gcfake.VALUE)"],
        env=gpu_env.phase_env(tmp_path / "site"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.stdout.strip() == "42", p.stderr
    rec = gpu_env.install_missing("gcfake_absent==1.0", tmp_path, tmp_path / "site2")
    assert list(rec["missing_after"]) == ["gcfake_absent"] and "pip_error" in rec


def test_a_module_that_does_not_import_stops_the_check(tmp_path):
    """Exit 3 before any phase, one line naming the module and ``make gpu-wheels``, and a summary marking every target
    not measured."""
    wheels = "open_clip_torch==3.3.0 gcfake_missing_module==1.0"
    out = tmp_path / "out"
    p = subprocess.run(
        _check("--wheel-list", wheels, "--wheels", str(tmp_path), "--out", str(out)),
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
        check=False,
    )
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "gcfake_missing_module does not import" in p.stderr and "make gpu-wheels" in p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["setup"]["missing_after"]) == ["gcfake_missing_module"]
    assert {t["status"] for t in summary["targets"].values()} == {"not measured"}
    assert sorted(f.name for f in out.iterdir()) == ["summary.json"]


def test_wheel_list_covers_the_gpu_machine():
    """The Makefile's GPU_WHEELS name what the GPU machine lacks, pinned to this environment's versions, each with
    the module it provides; the make targets pass the list and the call to the module."""
    listed = gpu_env.makefile_wheels()
    pins = dict(w.split("==") for w in listed.split())
    assert GPU_MISSING <= {gpu_env.norm_dist(n) for n in pins}
    modules = gpu_env.wheel_modules(listed)
    assert modules["open_clip_torch==3.3.0"] == "open_clip" and modules[f"PyYAML=={pins['PyYAML']}"] == "yaml"
    for req, module in modules.items():
        assert importlib.util.find_spec(module) is not None, req
        name, pinned = req.split("==")
        assert version(name) == pinned, name
    make = (ROOT / "Makefile").read_text()
    for target in ("gpu-check:", "gpu-check-dry:"):
        body = make[make.index(target) :].split("\n\n")[0]
        assert "-m benchmarks.gpu_check" in body and '--wheel-list "$(GPU_WHEELS)"' in body, target
        assert "--call $(CALL)" in body, target
    assert "/.whl/" in (ROOT / ".gitignore").read_text().split()


def test_kernels_import_from_a_plain_working_tree(tmp_path):
    """No site (-S), torch's site-packages added by hand, the checkout on the path as the phases have it:
    ``dissect_fast.kernels`` finds ``kernels/`` by itself."""
    purelib = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}]; sys.path.append({purelib!r}); "
        "import dissect_fast.kernels.fused_select; print(sys.modules['dissect_fast.kernels.fused_select'].__file__)"
    )
    p = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Path(p.stdout.strip()) == ROOT / "kernels" / "fused_select.py"
    assert gpu_env.phase_env()["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


@pytest.mark.slow
def test_dry_run_of_both_calls(tmp_path):
    """``--dry-run --call all``: every phase of both calls runs its command on CPU and ends well (bench_select, CUDA
    only, is skipped after its imports); each call's summary.json holds provenance, each phase and each target."""
    p = subprocess.run(
        _check("--call", "all", "--out", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=1800,
        env=_env(),
        cwd=ROOT,
        check=False,
    )
    for call, names in (("1", CALL_1), ("2", CALL_2)):
        out = tmp_path / f"call-{call}"
        summary = json.loads((out / "summary.json").read_text())
        assert FIELDS <= set(summary) and summary["call"] == call and summary["dry_run"] is True
        assert summary["versions"]["torch"] and summary["versions"]["open_clip"] and summary["device"].startswith("cpu")
        assert list(summary["phases"]) == names
        statuses = {n: r["status"] for n, r in summary["phases"].items()}
        why = {n: r.get("log_tail") or r.get("reason") for n, r in summary["phases"].items() if r["status"] != "ok"}
        assert statuses == {n: "skipped" if n == "select" else "ok" for n in names}, why
        assert set(summary["targets"]) == set(gc.TARGETS)
        assert len(list(out.iterdir())) <= 8
        for rec in summary["phases"].values():
            assert all((out / f).is_file() for f in rec["files"])
    assert p.returncode == 0, p.stdout[-3000:]
    assert (tmp_path / "call-2" / "top_ops.txt").is_file()


@pytest.mark.gpu
def test_training_step_does_not_sync(tmp_path):
    """A warm-up epoch (whole batch trained) and a selection epoch at B = 1024, every step but each epoch's first
    under ``torch.cuda.set_sync_debug_mode("error")``: a host sync inside a step raises, naming its place."""
    import torch
    from tiny_run import tiny_argv

    from dissect_fast.config import config_from_args
    from dissect_fast.training.callbacks import Callback
    from dissect_fast.training.loop import Trainer

    class Watch(Callback):
        watched, first = 0, True

        def on_epoch_start(self, ctx, epoch: int) -> None:
            self.first = True

        def on_batch(self, ctx) -> None:  # the batch is here: the step begins
            if not self.first:
                torch.cuda.set_sync_debug_mode("error")
                self.watched += 1
            self.first = False

        def on_step_end(self, ctx, epoch: int, n_steps: int) -> None:
            torch.cuda.set_sync_debug_mode("default")

    flags = ["--train-num-samples", "4096", "--select-strategy", "dissect-warmup", "--warmup-point", "1"]
    flags += ["--select-rate", "0.2", "--warmup-train", "full", "--log-every-n-steps", "1000", "--device", "cuda"]
    argv = tiny_argv(tmp_path, "sync", *flags, synthetic=True, batch=1024, workers=None)
    watch = Watch()
    try:
        Trainer(config_from_args(argv), callbacks=[watch]).fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.watched == 6  # 4 steps per epoch, 2 epochs, each epoch's first unwatched
