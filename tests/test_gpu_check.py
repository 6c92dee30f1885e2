"""benchmarks/gpu_check.py, the one prepared command of a GPU session, checked on CPU: its dry run writes every
phase's JSON (or a recorded skip with the reason) in the shape the GPU run will; the wheel list covers what the
bare GPU machine lacks; the kernels import from a plain working tree (no shim); wheels install without pip."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what the GPU machine lacks (its Python has torch, triton, torchvision, numpy, pandas, pytest, timm, ...)
GPU_MISSING = {"open_clip_torch", "ftfy", "wcwidth", "webdataset", "braceexpand"}
HEADER = (
    "phase",
    "status",
    "device",
    "torch",
    "triton",
    "open_clip",
    "commit",
    "tree_sha256",
    "command",
    "date",
    "results",
    "seconds",
)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_dry")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def test_dry_run_writes_every_phase(dry_run):
    out, stdout = dry_run
    gc = load_gpu_check()
    files = sorted(f.name for f in out.iterdir())
    # what comes back from the GPU machine: at most 8 files, 16 MiB each, no deeper than 2 folders
    assert all((out / f).is_file() and (out / f).stat().st_size < 16 << 20 for f in files)
    assert len(files) <= 8, files
    expected = [f"{k}-{name}.json" for k, (name, _) in gc.PHASES.items()]
    assert set(expected) | {"summary.json", "top_ops.txt"} == set(files)
    recs = {f[0]: json.loads((out / f).read_text()) for f in expected}
    for letter, rec in recs.items():
        missing = [k for k in HEADER if k not in rec]
        assert not missing, (letter, missing)
        assert rec["dry_run"] is True and rec["device"] and rec["torch"] and rec["open_clip"]
        if rec["status"] == "skipped":
            assert rec["reason"], letter
        else:
            assert rec["status"] == "ok", (letter, rec["status"], rec.get("reason"), rec.get("log_tail", "")[-2000:])

    a = recs["a"]["results"]  # no CUDA here: every gpu test is skipped, none fails
    assert a["skipped"] > 0 and a.get("failed", 0) == 0 and a.get("errors", 0) == 0 and a["deselected"] > 0
    assert recs["b"]["status"] == "skipped" and "CUDA" in recs["b"]["reason"]  # its flags parsed, then no CUDA

    c = recs["c"]["results"]
    assert c["data"]["backend"] == "synthetic" and not c["errors"] and not c["skipped"]
    rows = {(r["config"], r["mode"]): r for r in c["rows"]}
    configs = ["full", "dissect-r0.2", "dissect-r0.3", "dissect-r0.2-res16", "dissect-r0.2-pd0.5"]
    assert set(rows) == {(n, "eager") for n in configs} | {(n, "compiled") for n in configs[:2]}
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["ratio_to_full"] > 0 and r["data_backend"] == "synthetic"
        assert set(r["phases_ms_per_step"]) == {"data", "score", "select", "train", "optim", "sync", "other"}
    assert rows[("dissect-r0.2", "eager")]["k"] == 6 and rows[("full", "eager")]["k"] == 32
    assert rows[("dissect-r0.2", "eager")]["phases_ms_per_step"]["score"] > 0  # timed after the warm-up point
    assert set(c["overlap"]["overlap"]) == {"dissect-r0.2-res16", "dissect-r0.2-pd0.5"}
    assert c["peer"]["samples_per_s"] > 0 and c["peer"]["steps"] == gc.DRY.peer_steps
    for mode in ("eager", "compiled"):
        t = c["targets"][mode]
        assert isinstance(t["dissect_r0.2_vs_full"]["pass"], bool)
        assert isinstance(t["select_share_of_step"]["pass"], bool)
    assert isinstance(c["targets"]["eager"]["full_vs_open_clip_samples_per_s"]["pass"], bool)

    d = recs["d"]["results"]
    assert d["data"]["backend"] == "torch" and [r["config"] for r in d["rows"]] == ["full", "dissect-r0.2"]
    assert all(r["data_backend"] == "torch" and 0 <= r["data_share_mean"] <= 1 for r in d["rows"])
    assert isinstance(d["targets"]["data_wait_share"]["pass"], bool)

    e = recs["e"]["results"]
    assert e["phases"]["steps"] == [4, 6] and "train" in e["phases"]["phases"]
    assert "top ops" in e["top_ops"] and (out / "top_ops.txt").read_text() == e["top_ops"]
    assert not any(name.endswith(".json") and "trace" in name for name in files)  # the big trace stays behind

    f = recs["f"]["results"]["rows"]
    assert [r["n"] for r in f] == [10_000] and f[0]["seconds_total"] > 0

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["phases"]) == set(gc.PHASES) and len(summary["targets"]) == 5
    assert all("pass" in t and "value" in t for t in summary["targets"].values())
    assert "gpu_check summary" in stdout and "targets:" in stdout


def test_budget_skips_are_recorded(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--budget-s",
            "0",
            "--phases",
            "af",
            "--out",
            str(tmp_path),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("a-pytest-gpu.json", "f-subset.json"):
        rec = json.loads((tmp_path / name).read_text())
        assert rec["status"] == "skipped" and rec["reason"].startswith("budget")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a-pytest-gpu.json", "f-subset.json", "summary.json"]


def test_wheel_list_covers_the_gpu_machine():
    gc = load_gpu_check()
    make = (ROOT / "Makefile").read_text()
    wheels = dict(w.split("==") for w in re.search(r"^GPU_WHEELS := (.+)$", make, re.MULTILINE).group(1).split())
    names = {gc.norm_dist(n) for n in wheels}
    assert GPU_MISSING <= names
    assert names <= set(gc.WHEEL_MODULES)  # gpu_check knows which module each wheel provides
    for name, pinned in wheels.items():  # pinned to what this checkout's environment runs
        assert version(name) == pinned, name
    recipe = make[make.index("gpu-wheels:") :].split("\n\n")[0]
    for flag in (
        "pip download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version 3.12",
        "--implementation cp",
        "--platform manylinux2014_x86_64",
        "-d .whl",
        "$(GPU_WHEELS)",
    ):
        assert flag in recipe, flag
    assert "/.whl/" in (ROOT / ".gitignore").read_text().split()


def test_kernels_import_from_a_plain_working_tree(tmp_path):
    """No site (-S): no editable install's finder; torch from site-packages added by hand. The phases put the
    repository on PYTHONPATH and nothing else: ``dissect_fast.kernels`` finds ``kernels/`` by itself."""
    gc = load_gpu_check()
    assert not hasattr(gc, "write_shim")
    purelib = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}]; sys.path.append({purelib!r}); "
        "import dissect_fast.kernels.fused_select; print(sys.modules['dissect_fast.kernels.fused_select'].__file__)"
    )
    bare = subprocess.run(
        [sys.executable, "-S", "-c", code], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert Path(bare.stdout.strip()) == ROOT / "kernels" / "fused_select.py"
    assert str(ROOT) in gc.subprocess_env()["PYTHONPATH"].split(os.pathsep)


def _fake_wheel(path: Path) -> Path:
    whl = path / "gcfake-1.0-py3-none-any.whl"
    files = {
        "gcfake/__init__.py": "VALUE = 42\n",
        "gcfake-1.0.data/purelib/gcfake_extra.py": "EXTRA = 1\n",
        "gcfake-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gcfake\nVersion: 1.0\n",
        "gcfake-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + "gcfake-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr("gcfake-1.0.dist-info/RECORD", record)
    return whl


@pytest.mark.parametrize("pip", [True, False], ids=["pip", "unzip"])
def test_install_wheels(tmp_path, monkeypatch, pip):
    gc = load_gpu_check()
    whl = _fake_wheel(tmp_path)
    if not pip:  # no pip on the machine: the wheels are unzipped

        def no_pip(*a, **kw):
            raise FileNotFoundError("pip")

        monkeypatch.setattr(gc.subprocess, "run", no_pip)
    rec = gc.install_wheels([whl], tmp_path / "site")
    monkeypatch.undo()
    assert rec["method"] == ("pip" if pip else "unzip")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    p = subprocess.run(
        [sys.executable, "-c", "import gcfake, gcfake_extra; print(gcfake.VALUE + gcfake_extra.EXTRA)"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.stdout.strip() == "43", p.stderr
    assert gc.wheel_dist(whl) == "gcfake"


def test_pytest_counts_of_a_run_cut_short(tmp_path):
    gc = load_gpu_check()
    text = (
        "tests/test_fused_select.py::test_gpu_a[int] PASSED  [ 10%]\n"
        "tests/test_fused_select.py::test_gpu_a[gauss] FAILED  [ 20%]\n"
        "tests/test_offline.py::test_gpu_b SKIPPED (needs a CUDA device)  [ 30%]\n"
    )
    res = gc.pytest_counts(text, tmp_path / "absent.xml")
    assert (res["passed"], res["failed"], res["skipped"]) == (1, 1, 1)
    assert res["failures"] == ["tests/test_fused_select.py::test_gpu_a[gauss]: FAILED"]
    done = gc.pytest_counts(
        text + "==== 1 failed, 1 passed, 1 skipped, 290 deselected in 3.1s ====\n", tmp_path / "absent.xml"
    )
    assert done["deselected"] == 290 and done["summary_line"].startswith("1 failed")


def test_targets_from_rows():
    gc = load_gpu_check()
    ph = {"data": 1.0, "score": 30.0, "select": 0.5, "train": 60.0, "optim": 5.0, "sync": 0.0, "other": 0.5}

    def row(name, ms, mode="eager"):
        return {
            "config": name,
            "mode": mode,
            "median_step_ms": ms,
            "samples_per_s": 1024 / ms * 1e3,
            "phases_ms_per_step": ph,
            "data_share": 0.01,
        }

    res = {
        "rows": [
            row("full", 200.0),
            row("dissect-r0.2", 110.0),
            row("dissect-r0.2-res160", 85.0),
            row("dissect-r0.2-pd0.5", 80.0),
        ],
        "overlap": {
            "overlap": {
                "dissect-r0.2-res160": {"score_key": 0.95, "delta_key": 0.93},
                "dissect-r0.2-pd0.5": {"score_key": 0.8, "delta_key": 0.85},
            }
        },
        "peer": {"samples_per_s": 4000.0, "compute_samples_per_s": 4500.0},
    }
    t = gc.e2e_targets(res)["eager"]
    assert t["dissect_r0.2_vs_full"]["value"] == 0.55 and t["dissect_r0.2_vs_full"]["pass"] is True
    cheap = t["cheapest_scoring_overlap_0.9_vs_full"]  # pd0.5 is cheaper but agrees too little
    assert cheap["config"] == "dissect-r0.2-res160" and cheap["value"] == 0.425 and cheap["pass"] is True
    assert t["select_share_of_step"]["pass"] is True  # 0.5 / 110 ms
    assert (
        t["full_vs_open_clip_samples_per_s"]["value"] == 1.28 and t["full_vs_open_clip_samples_per_s"]["pass"] is False
    )
    head = gc.headline_targets({"c": {"results": {**res, "targets": gc.e2e_targets(res)}}})
    assert head["data_wait_share < 0.05 (torch loader, JPEG shards)"]["pass"] is None  # phase d not run


def test_gpu_plan_flags_parse(tmp_path):
    """Every command line the GPU run builds (not only the dry run's) parses, and its scoring options fit its model:
    a wrong flag fails here, not in the GPU session."""
    from dissect_fast.config import config_from_args
    from dissect_fast.model import check_scoring_options

    gc = load_gpu_check()
    check = gc.Check(gc.parse_args(["--out", str(tmp_path)]), gc.GPU, tmp_path, tmp_path, dict(os.environ), {})
    for letter in "cd":
        spec = check.e2e_spec(letter, 100)
        for run in spec["runs"]:
            if run["kind"] == "config":
                cfg = config_from_args(gc.trainer_argv(spec, run["name"], run["flags"], run["compile"]))
                check_scoring_options(cfg.model.model, cfg.model.score_resolution, cfg.model.score_patch_dropout)
                assert cfg.data.batch_size == 1024 and cfg.model.precision == "amp_bf16"
            elif run["kind"] == "peer":
                from open_clip_train.params import parse_args

                peer = parse_args(gc.peer_cmd(spec, run, tmp_path)[2:])
                assert (peer.dataset_type, peer.model, peer.batch_size) == ("synthetic", "ViT-B-32", 1024)
    compiled = [r["name"] for r in check.e2e_spec("c", 100)["runs"] if r["kind"] == "config" and r["compile"]]
    assert compiled == ["full", "dissect-r0.2", "dissect-r0.2-res160", "dissect-r0.2-pd0.5"]  # the ratio first
    for plan in (gc.GPU, gc.DRY):  # the profile window lies in the epoch after the warm-up point
        check.plan = plan
        cfg = config_from_args(check.profile_cmd(tmp_path)[3:])
        start, stop = cfg.run.profile_window()
        per_epoch = cfg.data.train_num_samples // cfg.data.batch_size
        assert per_epoch <= start < stop <= 2 * per_epoch and cfg.select.warmup_point == 1
