"""benchmarks/gpu_check.py, the two prepared calls of a GPU session, checked on CPU: each call's dry run writes
every phase's JSON (or a recorded skip with the reason) in the shape the GPU run will, and a summary marking every
target; the wheel list covers what the bare GPU machine lacks and a module that still does not import stops the
check (exit 3); the kernels import from a plain working tree; wheels install without pip; the measured routing
thresholds reach the kernel's ``auto`` configuration."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what the GPU machine lacks (its Python has torch, triton, torchvision, numpy, pandas, pytest, timm, ...); regex:
#: open_clip's tokenizer imports it, and every open_clip phase failed without it
GPU_MISSING = {"open_clip_torch", "ftfy", "wcwidth", "webdataset", "braceexpand", "regex"}
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


def _check(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", *args]


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    env.pop("DISSECT_SELECT_THRESHOLDS", None)
    return env


@pytest.fixture(scope="module")
def dry_calls(tmp_path_factory):
    """Both calls' dry runs, started together (each mostly waits on its own subprocesses)."""
    outs = {c: tmp_path_factory.mktemp(f"gpu_check_dry{c}") for c in "12"}
    procs = {
        c: subprocess.Popen(
            _check("--call", c, "--out", str(outs[c])),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for c in "12"
    }
    got = {}
    for c, p in procs.items():
        stdout, _ = p.communicate(timeout=600)
        got[c] = (outs[c], stdout, p.returncode)
    return got


def _records(out: Path, letters: str) -> dict:
    gc = load_gpu_check()
    return {x: json.loads((out / f"{x}-{gc.PHASES[x][0]}.json").read_text()) for x in letters}


def _check_records(recs: dict) -> None:
    for letter, rec in recs.items():
        missing = [k for k in HEADER if k not in rec]
        assert not missing, (letter, missing)
        assert rec["dry_run"] is True and rec["device"] and rec["torch"] and rec["open_clip"]
        if rec["status"] == "skipped":
            assert rec["reason"], letter
        else:
            assert rec["status"] == "ok", (letter, rec["status"], rec.get("reason"), rec.get("log_tail", "")[-2000:])


def _files_come_back(out: Path) -> list[str]:
    files = sorted(f.name for f in out.iterdir())
    # what comes back from the GPU machine: at most 8 files, 16 MiB each, no deeper than 2 folders
    assert all((out / f).is_file() and (out / f).stat().st_size < 16 << 20 for f in files)
    assert len(files) <= 8, files
    return files


def test_dry_call_1(dry_calls):
    out, stdout, rc = dry_calls["1"]
    assert rc == 0, stdout[-4000:]
    gc = load_gpu_check()
    assert gc.CALLS["1"] == "abcd"
    files = _files_come_back(out)
    assert set(files) == {"a-pytest-gpu.json", "b-select.json", "c-train.json", "d-data.json", "summary.json"}
    lines = stdout.splitlines()  # the device and /dev/shm first
    assert lines[0].startswith("[gpu_check] device: cpu") and any("/dev/shm" in ln for ln in lines[1:4])
    recs = _records(out, "abcd")
    _check_records(recs)

    a = recs["a"]["results"]  # no CUDA here: every gpu test is skipped, none fails
    assert a["skipped"] > 0 and a.get("failed", 0) == 0 and a.get("errors", 0) == 0 and a["deselected"] > 0
    assert recs["b"]["status"] == "skipped" and "CUDA" in recs["b"]["reason"]  # its flags parsed, then no CUDA
    assert "--thresholds" in recs["b"]["command"]

    c = recs["c"]["results"]
    assert c["data"]["backend"] == "synthetic" and not c["errors"] and not c["skipped"]
    rows = {(r["config"], r["mode"]): r for r in c["rows"]}
    configs = ["full", "dissect-r0.2", "dissect-r0.3", "dissect-r0.2-res16", "dissect-r0.2-pd0.5"]
    assert set(rows) == {(n, "eager") for n in configs}
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["ratio_to_full"] > 0 and r["data_backend"] == "synthetic"
        assert set(r["phases_ms_per_step"]) == {"data", "score", "select", "train", "optim", "sync", "other"}
    assert rows[("dissect-r0.2", "eager")]["k"] == 6 and rows[("full", "eager")]["k"] == 32
    assert rows[("dissect-r0.2", "eager")]["phases_ms_per_step"]["score"] > 0  # timed after the warm-up point
    assert set(c["overlap"]["overlap"]) == {"dissect-r0.2-res16", "dissect-r0.2-pd0.5"}
    assert c["peer"]["samples_per_s"] > 0 and c["peer"]["steps"] == gc.DRY.peer_steps
    assert c["peer"]["command"].endswith("--logs none")  # open_clip's trainer writes no checkpoint
    t = c["targets"]["eager"]
    assert isinstance(t["dissect_r0.2_vs_full"]["pass"], bool) and isinstance(t["select_share_of_step"]["pass"], bool)
    assert isinstance(t["full_vs_open_clip_samples_per_s"]["pass"], bool)

    d = recs["d"]["results"]  # photo JPEG shards, the torch loader, the window after the first wave
    assert d["data"]["backend"] == "torch" and [r["config"] for r in d["rows"]] == ["dissect-r0.2", "full"]
    assert d["data"]["photos"]["samples"] == gc.DRY.loader_waves * gc.DRY.loader_workers * gc.DRY.batch
    assert all(r["data_backend"] == "torch" and 0 <= r["data_share_mean"] <= 1 for r in d["rows"])
    assert all(r["steps_per_epoch"] == gc.DRY.loader_waves * gc.DRY.loader_workers for r in d["rows"])
    assert isinstance(d["targets"]["data_wait_share"]["pass"], bool)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["call"] == "1" and set(summary["phases"]) == set("abcd")
    marks = {n: t["status"] for n, t in summary["targets"].items()}
    assert set(marks) == set(gc.TARGET_SOURCES)
    assert marks["dissect_r0.2_full_res_vs_full <= 0.58 (eager)"] == "measured"
    assert marks["data_wait_share < 0.05 (torch loader, photo JPEGs)"] == "measured"
    assert marks["select_op_vs_eager_torch_B4096 >= 3"] == "not measured"  # needs CUDA
    other = summary["targets"]["host_syncs_in_step == 0"]
    assert other["status"] == "not measured" and "call 2" in other["reason"]
    assert "gpu_check call 1 summary" in stdout and "targets:" in stdout


def test_dry_call_2(dry_calls):
    out, stdout, rc = dry_calls["2"]
    assert rc == 0, stdout[-4000:]
    gc = load_gpu_check()
    assert gc.CALLS["2"] == "efghi"
    files = _files_come_back(out)
    expected = {"e-compiled.json", "f-profile.json", "g-syncdebug.json", "h-gpudata.json", "i-subset.json"}
    assert set(files) == expected | {"summary.json", "top_ops.txt"}
    assert stdout.splitlines()[0].startswith("[gpu_check] device: cpu")
    recs = _records(out, "efghi")
    _check_records(recs)

    e = recs["e"]["results"]
    assert [(r["config"], r["mode"]) for r in e["rows"]] == [("full", "compiled"), ("dissect-r0.2", "compiled")]
    assert isinstance(e["targets"]["compiled"]["dissect_r0.2_vs_full"]["pass"], bool)

    f = recs["f"]["results"]["profile"]
    assert f["phases"]["steps"] == [4, 6] and "train" in f["phases"]["phases"]
    assert "top ops" in f["top_ops"] and (out / "top_ops.txt").read_text() == f["top_ops"]
    assert not any(name.endswith(".json") and "trace" in name for name in files)  # the big trace stays behind
    logs = Path(recs["f"]["spec"]["logs"])
    assert not logs.exists() or not list(logs.rglob("*.pt"))  # no checkpoint written (scratch removed anyway)

    g = recs["g"]["results"]["sync"]  # CPU: the steps of both kinds ran, unwatched, and the target says so
    assert g["steps"] == 2 * gc.DRY.sync_steps and g["mode"] is None and g["watched_steps"] == 0
    assert recs["g"]["results"]["targets"]["host_syncs_in_step"]["value"] is None

    h = recs["h"]["results"]
    if h.get("not_measured"):  # --data-backend gpu not in this checkout yet
        assert recs["h"]["status"] == "not measured" and "backend missing" in h["not_measured"]
    else:
        by = {r["config"]: r["data_backend"] for r in h["rows"]}
        assert by == {"dissect-r0.2-gpu": "gpu", "dissect-r0.2-torch": "torch", "full-gpu": "gpu"}
        assert isinstance(h["targets"]["data_wait_share"]["pass"], bool)

    i = recs["i"]["results"]["rows"]
    assert [r["n"] for r in i] == [10_000] and i[0]["seconds_total"] > 0

    summary = json.loads((out / "summary.json").read_text())
    marks = {n: t["status"] for n, t in summary["targets"].items()}
    assert marks["dissect_r0.2_full_res_vs_full <= 0.58 (compiled)"] == "measured"
    assert marks["host_syncs_in_step == 0"] == "not measured"  # CPU: nothing watched
    assert marks["data_wait_share < 0.05 (torch loader, photo JPEGs)"] == "not measured"  # call 1's


def test_budget_skips_are_recorded(tmp_path):
    p = subprocess.run(
        _check("--budget-s", "0", "--phases", "ai", "--out", str(tmp_path)),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("a-pytest-gpu.json", "i-subset.json"):
        rec = json.loads((tmp_path / name).read_text())
        assert rec["status"] == "skipped" and rec["reason"].startswith("budget")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a-pytest-gpu.json", "i-subset.json", "summary.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    t = summary["targets"]["gpu_tests_failed == 0"]
    assert t["status"] == "not measured" and t["reason"].startswith("budget")


def test_a_module_that_does_not_import_stops_the_check(tmp_path):
    """A wheel whose module does not import after the install (here: no wheel for it at all): exit 3 before any
    phase, one line naming the module, and a summary marking every target not measured; through make too."""
    wheels = "open_clip_torch==3.3.0 gcfake_missing_module==1.0"
    p = subprocess.run(
        _check("--wheel-list", wheels, "--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "out")),
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "gcfake_missing_module does not import" in p.stderr and "make gpu-wheels" in p.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["setup"]["missing_after"] == ["gcfake_missing_module"]
    assert {t["status"] for t in summary["targets"].values()} == {"not measured"}
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["summary.json"]  # no phase ran
    make = subprocess.run(
        ["make", "-s", "gpu-check-dry", "CALL=1", f"GPU_WHEELS={wheels}", f"OUT={tmp_path / 'make'}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )
    assert make.returncode != 0 and "gcfake_missing_module does not import" in make.stderr


def test_wheel_list_covers_the_gpu_machine():
    gc = load_gpu_check()
    make = (ROOT / "Makefile").read_text()
    listed = gc.makefile_wheels()
    wheels = dict(w.split("==") for w in listed.split())
    names = {gc.norm_dist(n) for n in wheels}
    assert GPU_MISSING <= names
    modules = gc.wheel_modules(listed)
    assert modules["open_clip_torch"] == "open_clip" and modules["pyyaml"] == "yaml" and modules["regex"] == "regex"
    for dist, module in modules.items():  # every wheel's module imports here (else the map is wrong)
        assert importlib.util.find_spec(module) is not None, (dist, module)
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
    for target in ("gpu-check:", "gpu-check-dry:"):  # both pass the list and the call
        body = make[make.index(target) :].split("\n\n")[0]
        assert '--wheel-list "$(GPU_WHEELS)"' in body and "--call $(CALL)" in body, target
    assert "/.whl/" in (ROOT / ".gitignore").read_text().split()


def test_photo_jpegs_are_photo_sized():
    """The data phases' images: 400-500 px a side and 40-100 KB at quality 90 (a photo's entropy, not the 10 KB
    of flat synthetic shapes that decode several times faster)."""
    import io

    from PIL import Image

    gc = load_gpu_check()
    data = [gc.photo_jpeg(seed) for seed in range(3)]
    for raw in data:
        img = Image.open(io.BytesIO(raw))
        assert img.format == "JPEG" and all(400 <= v <= 500 for v in img.size), img.size
        assert 40 << 10 <= len(raw) <= 100 << 10, len(raw)
    assert len(set(data)) == 3 and gc.photo_jpeg(1) == data[1]  # distinct, reproducible


def test_routing_thresholds_reach_auto(tmp_path, monkeypatch):
    """bench_select --thresholds writes the measured crossover per device; the kernel's auto configuration reads
    it (from $DISSECT_SELECT_THRESHOLDS) for that device only, the constants elsewhere."""
    import importlib

    fs = importlib.import_module("dissect_fast.kernels.fused_select")
    path = tmp_path / "thr.json"
    fs.save_thresholds(path, "NVIDIA H100 80GB HBM3", 4096, [{"B": 4096, "fused_wins": True}])
    fs.save_thresholds(path, "NVIDIA H200", 0)
    doc = json.loads(path.read_text())
    assert {n: d["fused_topk_max_b"] for n, d in doc["devices"].items()} == {
        "NVIDIA H100 80GB HBM3": 4096,
        "NVIDIA H200": 0,
    }
    monkeypatch.setenv(fs.THRESHOLDS_ENV, str(path))
    monkeypatch.setattr(fs, "_AUTO_CONFIG", {})
    assert fs.auto_config("NVIDIA H100 80GB HBM3").fused_topk_max_b == 4096
    assert fs.auto_config("NVIDIA H200").fused_topk_max_b == 0
    assert fs.auto_config("NVIDIA A100").fused_topk_max_b == fs.KernelConfig().fused_topk_max_b == 16384
    path.write_text("{not json")
    assert fs.measured_thresholds("NVIDIA H100 80GB HBM3") == {}  # a broken file: the constants


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
    c = {"status": "ok", "reason": None, "results": {**res, "targets": gc.e2e_targets(res)}}
    head = gc.headline_targets({"c": c, "d": {"status": "failed", "reason": "worker exit code 1", "results": {}}})
    assert head["dissect_r0.2_full_res_vs_full <= 0.58 (eager)"]["status"] == "measured"
    assert head["dissect_r0.2_full_res_vs_full <= 0.58 (eager)"]["pass"] is True
    assert head["full_samples_per_s_vs_open_clip >= 1.3"]["pass"] is False
    d = head["data_wait_share < 0.05 (torch loader, photo JPEGs)"]  # its phase failed
    assert d["status"] == "failed" and d["pass"] is None and d["reason"] == "worker exit code 1"
    e = head["dissect_r0.2_full_res_vs_full <= 0.58 (compiled)"]  # call 2's phase, not run here
    assert e["status"] == "not measured" and e["reason"] == "phase e runs in call 2" and e["call"] == "2"


def test_gpu_plan_flags_parse(tmp_path):
    """Every command line the GPU run builds (not only the dry run's) parses, and its scoring options fit its model:
    a wrong flag fails here, not in the GPU session."""
    from dissect_fast.config import config_from_args
    from dissect_fast.model import check_scoring_options

    gc = load_gpu_check()
    check = gc.Check(gc.parse_args(["--out", str(tmp_path)]), gc.GPU, tmp_path, tmp_path, dict(os.environ), {})
    for letter in "cdegh":
        spec = check.e2e_spec(letter, 100)
        for run in spec["runs"]:
            if run["kind"] in ("config", "syncdebug"):
                argv = gc.trainer_argv(spec, run["name"], run["flags"], run.get("compile", False), run.get("backend"))
                cfg = config_from_args(argv)
                check_scoring_options(cfg.model.model, cfg.model.score_resolution, cfg.model.score_patch_dropout)
                assert cfg.data.batch_size == 1024 and cfg.model.precision == "amp_bf16"
            elif run["kind"] == "peer":
                from open_clip_train.params import parse_args

                peer = parse_args(gc.peer_cmd(spec, run, tmp_path)[2:])
                assert (peer.dataset_type, peer.model, peer.batch_size) == ("synthetic", "ViT-B-32", 1024)
                assert peer.logs == "none"  # open_clip saves nothing then
    compiled = [r["name"] for r in check.e2e_spec("e", 100)["runs"]]
    assert compiled == ["full", "dissect-r0.2", "dissect-r0.2-res160", "dissect-r0.2-pd0.5"]  # the ratio first
    d = check.e2e_spec("d", 100)  # steady state: the first wave (one batch per worker) untimed
    assert d["skip"] == gc.GPU.loader_workers and d["steps"] == gc.GPU.loader_waves * gc.GPU.loader_workers
    assert d["data"]["num_samples"] == d["steps"] * 1024 and d["data"]["photo_size"] == [400, 500]
    assert [r.get("backend") for r in check.e2e_spec("h", 100)["runs"]] == ["gpu", None, "gpu"]
    for plan in (gc.GPU, gc.DRY):  # the profile window lies in the epoch after the warm-up point
        check.plan = plan
        cfg = config_from_args(check.profile_flags())
        start, stop = cfg.run.profile_window()
        per_epoch = cfg.data.train_num_samples // cfg.data.batch_size
        assert per_epoch <= start < stop <= 2 * per_epoch and cfg.select.warmup_point == 1
    sizes = gc.GPU.select_flags[gc.GPU.select_flags.index("--sizes") + 1].split(",")
    assert [int(x.split("x")[0]) for x in sizes] == [65536, 16384, 4096, 1024]  # largest B first
