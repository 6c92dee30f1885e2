"""Every GPU claim of the project in one prepared command, for a short GPU session (`make gpu-check`).

    python3 benchmarks/gpu_check.py                    # GPU: results to $OUT, else benchmarks/results/gpu-check-DATE/
    python3 benchmarks/gpu_check.py --budget-s 300 --phases a,c
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc   # the same phases on CPU, tiny model, seconds each

The GPU machine is bare (torch, triton, numpy, pandas, pytest, timm, ... but no open_clip_torch, ftfy,
wcwidth, webdataset, braceexpand) and offline: `make gpu-wheels` downloads those wheels into `.whl/`
on a development machine; this script installs the ones that do not import into a temporary folder
(`pip install --no-index --no-deps --target`, or unzipped when pip is missing) and puts it on the
PYTHONPATH of every phase. The repository runs as a plain working tree (no `pip install -e .`):
``dissect_fast/kernels/__init__.py`` finds the top-level ``kernels/`` folder itself.

Phases, in priority order; each runs in its own subprocess (own process group, own timeout) and writes
its JSON (device, versions, commit, command, date, results) to the output folder as soon as it ends:

  a  ``pytest -m gpu tests`` (``-v``: a cut run still names what passed): counts and the failures' names
  b  ``bench_select.py``: fused Triton selection op vs eager torch vs torch.compile, B = 1,024 .. 65,536
  c  end to end through ``Trainer.train_epoch`` (``--data-backend synthetic``: no loader cost), a
     ``PhaseTimer`` attached: full data, ``dissect-warmup`` r = 0.2 / 0.3 timed in the epoch after its
     warm-up point, cheap scoring (resolution, patch dropout) with its top-k overlap against
     full-resolution scoring (``bench_train.measure_overlap``), open_clip's own trainer, eager then
     compiled; the targets as booleans with the measured values
  d  the same model from JPEG shards on local disk through the torch loader: the data-wait share
  e  a 10-step ``--profile-steps`` window: ``top_ops.txt`` and ``phases.json``
  f  ``bench_subset.py`` (offline CLIPCov selection) at 1e6 and 1e7 samples, as time allows

A global budget (``--budget-s``) caps the run: a phase gets at most its own cap and what is left after
the minimum runs of the later phases, a phase that cannot start in time is recorded as skipped, and a
phase cut by its timeout keeps what its subprocess had saved. Output: one JSON per phase, ``summary.json``
and ``top_ops.txt`` (8 files, one folder), so everything fits what comes back from the GPU machine.
``--dry-run`` runs every phase on CPU with micro-vit and a handful of steps, so a wrong flag, a missing
wheel or a typo fails here and not in the GPU session; what truly needs CUDA is recorded as skipped
with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # benchmarks/ is not a package
    sys.path.insert(0, str(ROOT / "benchmarks"))
import benchkit  # noqa: E402 (no torch: the parent process starts without it)
from benchkit import write_json  # noqa: E402

from dissect_fast.provenance import utc_now  # noqa: E402 (benchkit puts a plain checkout on the path)

WHEEL_DIR = ROOT / ".whl"
#: wheel (distribution) name, normalised -> the module it provides; a wheel is installed when its module is missing
WHEEL_MODULES = {
    "open_clip_torch": "open_clip",
    "ftfy": "ftfy",
    "wcwidth": "wcwidth",
    "webdataset": "webdataset",
    "braceexpand": "braceexpand",
    "pyyaml": "yaml",
}
PHASES = {
    "a": ("pytest-gpu", "pytest -m gpu"),
    "b": ("select", "selection op micro-benchmark"),
    "c": ("train", "end to end, synthetic data"),
    "d": ("loader", "end to end, JPEG shards"),
    "e": ("profile", "10-step profile"),
    "f": ("subset", "offline CLIPCov selection"),
}
TARGETS = {
    "dissect_r0.2": 0.58,
    "cheap_scoring": 0.45,
    "cheap_overlap": 0.9,
    "vs_open_clip": 1.3,
    "select_share": 0.01,
    "data_share": 0.05,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of every phase: the GPU run, or the CPU dry run."""

    device: str
    model: str
    batch: int
    precision: str
    steps: int  #: steps per epoch in c (epoch 0 is the warm-up, epoch 1 is timed)
    skip: int  #: first timed steps left out of the statistics (compilation of the scoring pass, loader start)
    score_resolution: int
    patch_dropout: float
    overlap_steps: int
    overlap_pool: int
    peer_warmup: int
    peer_steps: int
    peer_workers: int
    loader_workers: int  #: d: torch loader workers; its epoch is two batches per worker, the first wave untimed
    loader_image_size: int
    compiled_cheap: bool  #: c: also the cheap-scoring rows compiled
    profile_steps_per_epoch: int
    profile_window: str
    select_flags: tuple[str, ...]
    subset_sizes: tuple[str, ...]
    subset_flags: tuple[str, ...]
    timeouts: dict  #: cap per phase, seconds
    reserve: dict  #: seconds a phase keeps from the phases before it (its minimum useful run)
    min_run_s: dict  #: c: seconds that must be left to start a run of this kind
    min_phase_s: float


def _cpus() -> int:
    return os.cpu_count() or 1


GPU = Plan(
    device="cuda",
    model="ViT-B-32",
    batch=1024,
    precision="amp_bf16",
    steps=12,
    skip=2,
    score_resolution=160,
    patch_dropout=0.5,
    overlap_steps=24,
    overlap_pool=4,
    peer_warmup=3,
    peer_steps=10,
    peer_workers=max(1, min(12, _cpus() - 2)),
    loader_workers=max(1, min(12, _cpus() - 2)),
    loader_image_size=224,
    compiled_cheap=True,
    profile_steps_per_epoch=12,
    profile_window="14:24",
    select_flags=("--sizes", "1024x512,4096x512,16384x512,65536x512"),
    subset_sizes=("1e6", "1e7"),
    subset_flags=("--device", "cuda", "--approx", "exact"),
    timeouts={"a": 90, "b": 90, "c": 240, "d": 75, "e": 75, "f": 600},
    reserve={"a": 30, "b": 45, "c": 100, "d": 40, "e": 40, "f": 0},
    min_run_s={"eager": 12, "overlap": 12, "peer": 30, "compiled": 60},
    min_phase_s=20,
)
DRY = Plan(
    device="cpu",
    model="micro-vit",
    batch=32,
    precision="auto",
    steps=3,
    skip=1,
    score_resolution=16,
    patch_dropout=0.5,
    overlap_steps=3,
    overlap_pool=2,
    peer_warmup=1,
    peer_steps=2,
    peer_workers=1,
    loader_workers=2,
    loader_image_size=32,
    compiled_cheap=False,
    profile_steps_per_epoch=3,
    profile_window="4:6",
    select_flags=("--sizes", "1024x512,4096x512,16384x512,65536x512"),
    subset_sizes=("1e4",),
    subset_flags=("--device", "cpu", "--approx", "exact", "--classes", "20", "--dim", "64"),
    timeouts={"a": 90, "b": 60, "c": 180, "d": 90, "e": 90, "f": 90},
    reserve={"a": 5, "b": 5, "c": 5, "d": 5, "e": 5, "f": 0},
    min_run_s={"eager": 1, "overlap": 1, "peer": 1, "compiled": 1},
    min_phase_s=3,
)


# ----------------------------------------------------------------------------------------- environment
def norm_dist(name: str) -> str:
    """Normalised distribution name: ``PyYAML`` -> ``pyyaml``, ``open-clip-torch`` -> ``open_clip_torch``."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_dist(path: Path) -> str:
    return norm_dist(path.name.split("-")[0])


def state_dir() -> Path:
    """Target folder of the installed wheels, per checkout."""
    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"dissect_gpu_check-{tag}" / "site"


def subprocess_env(site: Path | None = None) -> dict:
    """The environment of every phase: the installed wheels (when some were needed) and the repository on
    PYTHONPATH."""
    env = dict(os.environ)
    parts = [*([str(site)] if site else []), str(ROOT)]
    parts += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


PROBE = r"""
import importlib, json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "cpu_count": os.cpu_count(), "modules": {}}
try:
    import torch
    from dissect_fast.provenance import device_name, versions
    v = versions()
    info["torch"], info["cuda"], info["device"] = v["torch"], v["cuda"], device_name()
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info["device_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["device_count"] = torch.cuda.device_count()
except Exception as e:
    info["torch"] = None
    info["torch_error"] = f"{type(e).__name__}: {e}"
for m in MODULES:
    try:
        mod = importlib.import_module(m)
        info["modules"][m] = getattr(mod, "__version__", "?")
    except Exception as e:
        info["modules"][m] = None
        info.setdefault("import_errors", {})[m] = f"{type(e).__name__}: {e}"[:300]
info["triton"] = info["modules"].get("triton")
info["open_clip"] = info["modules"].get("open_clip")
print("PROBE " + json.dumps(info))
"""


def probe(env: dict) -> dict:
    """Versions, device and which modules import, as the phases will see them."""
    mods = ["triton", *WHEEL_MODULES.values(), "open_clip_train.main", "dissect_fast.kernels.fused_select"]
    code = PROBE.replace("MODULES", repr(mods))
    try:
        p = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        return {"probe_error": "timeout", "modules": {}}
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if line is None:
        return {"probe_error": (p.stdout + p.stderr)[-2000:], "modules": {}}
    return json.loads(line[6:])


def install_wheels(wheels: list[Path], target: Path) -> dict:
    """Install ``wheels`` into ``target``: pip (no index, no dependencies), else unzip them (pip missing or
    failing; enough for wheels without scripts or headers). Returns what was done."""
    target.mkdir(parents=True, exist_ok=True)
    rec: dict = {"wheels": [w.name for w in wheels], "target": str(target)}
    if not wheels:
        return {**rec, "method": None}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--upgrade",
        "--disable-pip-version-check",
        "--target",
        str(target),
        *map(str, wheels),
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if p.returncode == 0:
            return {**rec, "method": "pip", "command": shlex.join(cmd)}
        rec["pip_error"] = (p.stdout + p.stderr)[-1500:]
    except (OSError, subprocess.TimeoutExpired) as e:
        rec["pip_error"] = f"{type(e).__name__}: {e}"
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for info in z.infolist():
                name = info.filename
                parts = name.split("/")
                if parts[0].endswith(".data"):  # NAME.data/purelib|platlib/... -> the target itself
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    name = "/".join(parts[2:])
                dest = target / name
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return {**rec, "method": "unzip"}


def prepare_python(site: Path, wheel_dir: Path) -> tuple[dict, dict, dict]:
    """Probe; install the wheels of ``wheel_dir`` whose module does not import into ``site``, put it on the
    path and probe again. Returns (probe, setup record, environment of the phases)."""
    env = subprocess_env()
    info = probe(env)
    missing = sorted(d for d, m in WHEEL_MODULES.items() if info.get("modules", {}).get(m) is None)
    setup: dict = {"missing_before": missing, "wheel_dir": str(wheel_dir)}
    if not missing:
        return info, setup, env
    env = subprocess_env(site)
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    pick = [w for w in wheels if wheel_dist(w) in missing]
    absent = sorted(set(missing) - {wheel_dist(w) for w in pick})
    if absent:
        setup["no_wheel_for"] = absent
        print(
            f"[gpu_check] no wheel in {wheel_dir} for {absent}: run `make gpu-wheels` on a machine with network "
            f"and carry .whl",
            flush=True,
        )
    setup["install"] = install_wheels(pick, site)
    print(f"[gpu_check] installed {[w.name for w in pick]} into {site} ({setup['install']['method']})", flush=True)
    info = probe(env)
    setup["missing_after"] = sorted(d for d, m in WHEEL_MODULES.items() if info.get("modules", {}).get(m) is None)
    return info, setup, env


def git_commit() -> str:
    """HEAD (+dirty), else $GPU_CHECK_COMMIT (a working tree copied without .git), else unknown."""
    from dissect_fast.provenance import git_commit as head

    commit = head()
    return os.environ.get("GPU_CHECK_COMMIT", "unknown") if commit.startswith("unknown") else commit


def tree_digest() -> str:
    """sha256 over the code that runs (package, kernels, benchmarks, tests, setup.py): identifies a working tree
    without git."""
    h = hashlib.sha256()
    files = [ROOT / "setup.py"]
    for sub in ("dissect_fast", "kernels", "benchmarks", "tests"):
        files += [p for p in (ROOT / sub).rglob("*") if p.suffix in (".py", ".json") and "results" not in p.parts]
    for p in sorted(f for f in files if f.is_file()):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- subprocesses
_RUNNING: list[subprocess.Popen] = []  # the phase subprocess in flight, stopped with us on SIGTERM


def _stop_on_sigterm(signum: int, frame) -> None:
    """SIGTERM (e.g. the session's own timeout): stop the phase in flight, then unwind so summary.json is written."""
    for p in _RUNNING:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def run_cmd(cmd: list[str], timeout: float, log: Path, env: dict, cwd: Path = ROOT) -> tuple[int | None, bool, float]:
    """Run ``cmd`` in its own process group, output to ``log``; on timeout the whole group is stopped
    (SIGTERM, then SIGKILL). Returns (exit code or None, timed out, seconds)."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        _RUNNING.append(p)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
            return rc, False, time.monotonic() - t0
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return None, True, time.monotonic() - t0
        finally:
            _RUNNING.remove(p)


def tail(path: Path, n: int) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode(errors="replace")


def phase_result(
    status: str,
    reason: str | None,
    command: str,
    secs: float,
    results,
    key: str,
    log,
    *,
    spec=None,
    ok=("ok",),
    tail_chars=(3000, 12000),
) -> dict:
    """The JSON body every phase writes: its log's tail is longer when the phase did not end well."""
    out = {
        "status": status,
        "reason": reason,
        "command": command,
        "seconds": secs,
        "results": results,
        "key": key,
        "log_tail": tail(log, tail_chars[0] if status in ok else tail_chars[1]),
    }
    if spec is not None:
        out["spec"] = spec
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------- phases
class Check:
    """One gpu_check run: plan, folders, environment, budget."""

    def __init__(self, a: argparse.Namespace, plan: Plan, out: Path, scratch: Path, env: dict, info: dict) -> None:
        self.a, self.plan, self.out, self.scratch, self.env, self.info = a, plan, out, scratch, env, info
        self.dry = a.dry_run
        self.t0 = time.monotonic()
        self.deadline = self.t0 + a.budget_s
        self.commit, self.tree = git_commit(), tree_digest()
        self.date = utc_now()
        self.py = sys.executable

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def header(self, letter: str) -> dict:
        i = self.info
        return {
            "phase": letter,
            "name": PHASES[letter][0],
            "title": PHASES[letter][1],
            "device": i.get("device"),
            "torch": i.get("torch"),
            "triton": i.get("triton"),
            "open_clip": i.get("open_clip"),
            "cuda": i.get("cuda"),
            "python": i.get("python"),
            "commit": self.commit,
            "tree_sha256": self.tree,
            "date": utc_now(),
            "dry_run": self.dry,
        }

    def run(
        self, letter: str, cmd: list[str], timeout: float, cwd: Path = ROOT
    ) -> tuple[int | None, bool, float, Path]:
        log = self.scratch / f"{letter}.log"
        rc, timed_out, secs = run_cmd(cmd, timeout, log, self.env, cwd)
        return rc, timed_out, secs, log

    # ------------------------------------------------------------------ a: pytest -m gpu
    def phase_a(self, timeout: float) -> dict:
        junit = self.scratch / "junit.xml"
        # -v, not -q: one line per test, so a run cut by its timeout still says which tests passed
        flags = "-m gpu -v -p no:cacheprovider --continue-on-collection-errors -rfE"
        cmd = [self.py, "-m", "pytest", *flags.split(), f"--junitxml={junit}", str(ROOT / "tests")]
        rc, timed_out, secs, log = self.run("a", cmd, timeout)
        res = pytest_counts(tail(log, 200_000), junit)
        res["exit_code"] = rc
        if timed_out:
            status, reason = "timeout", f"pytest did not finish in {timeout:.0f} s"
        elif rc in (0, 5):
            status, reason = "ok", None
            if res.get("passed", 0) == 0:
                reason = f"none of the gpu tests ran ({res.get('skipped', 0)} skipped: {res.get('skip_reasons')})"
        else:
            status, reason = "failed", f"pytest exit code {rc}"
        key = (
            f"{res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('errors', 0)} errors, "
            f"{res.get('skipped', 0)} skipped"
        )
        return phase_result(status, reason, shlex.join(cmd), secs, res, key, log)

    # ------------------------------------------------------------------ b: bench_select
    def phase_b(self, timeout: float) -> dict:
        out = self.scratch / "select.json"
        cmd = [self.py, str(ROOT / "benchmarks" / "bench_select.py"), *self.plan.select_flags, "--out", str(out)]
        rc, timed_out, secs, log = self.run("b", cmd, timeout)
        res = read_json(out)
        text = tail(log, 12000)
        if rc == 1 and "needs a CUDA device" in text and res is None:
            status = "skipped"
            reason = (
                "needs CUDA: bench_select times with CUDA events (triton.testing.do_bench) and has no "
                "TRITON_INTERPRET mode; this run checked its imports and flags"
            )
        elif timed_out:
            status, reason = ("partial" if res else "timeout"), f"cut after {timeout:.0f} s"
        elif rc == 0 and res:
            status, reason = "ok", None
        else:
            status, reason = "failed", f"exit code {rc}"
        key = ""
        if res:
            parts = [
                f"B={r['B']}: {r['speedup_eager']}x eager, {r['speedup_compiled']}x compiled"
                for r in res.get("rows", [])
                if r.get("D") == 512
            ]
            share = (res.get("train_step") or {}).get("share")
            if share is not None:
                parts.append(f"op/step {100 * share:.2f}%")
            key = "; ".join(parts)
        return phase_result(status, reason, shlex.join(cmd), secs, res, key, log, ok=("ok", "skipped"))

    # ------------------------------------------------------------------ c, d: the training loop
    def e2e_spec(self, letter: str, timeout: float) -> dict:
        p = self.plan
        spec = {
            "out": str(self.scratch / f"{letter}-result.json"),
            "logs": str(self.scratch / f"{letter}-logs"),
            "deadline": time.time() + timeout - 8,
            "device": p.device,
            "model": p.model,
            "batch": p.batch,
            "precision": p.precision,
            "skip": p.skip,
            "min_run_s": p.min_run_s,
            "dry_run": self.dry,
        }
        dissect = ["--select-strategy", "dissect-warmup", "--warmup-point", "1", "--select-rate"]
        if letter == "d":
            # Every worker reads whole shards into whole batches: 2 batches each, all workers start together, so
            # the first wave (one batch per worker, and the first CUDA calls) is left out; the data share is the
            # second wave's total wait over its total step time. No warm-up epoch: eager, and the loader is timed.
            w = p.loader_workers
            return {
                **spec,
                "steps": 2 * w,
                "skip": w,
                "warmup_epoch": False,
                "data": {
                    "backend": "torch",
                    "shards": str(self.scratch / "shards"),
                    "workers": w,
                    "num_samples": 2 * w * p.batch,
                    "per_shard": p.batch // 2 if p.batch % 2 == 0 else p.batch,
                    "image_size": p.loader_image_size,
                },
                "runs": [
                    {"kind": "config", "name": "full", "flags": ["--select-strategy", "full"], "compile": False},
                    {"kind": "config", "name": "dissect-r0.2", "flags": [*dissect, "0.2"], "compile": False},
                ],
            }
        cheap = [
            (f"dissect-r0.2-res{p.score_resolution}", ["--score-resolution", str(p.score_resolution)]),
            (f"dissect-r0.2-pd{p.patch_dropout}", ["--score-patch-dropout", str(p.patch_dropout)]),
        ]
        configs = [
            ("full", ["--select-strategy", "full"]),
            ("dissect-r0.2", [*dissect, "0.2"]),
            ("dissect-r0.3", [*dissect, "0.3"]),
        ] + [(n, [*dissect, "0.2", *f]) for n, f in cheap]
        runs = [{"kind": "config", "name": n, "flags": f, "compile": False} for n, f in configs]
        runs.append(
            {
                "kind": "overlap",
                "name": "overlap",
                "resolutions": [p.score_resolution],
                "patch_dropouts": [p.patch_dropout],
                "steps": p.overlap_steps,
                "pool": p.overlap_pool,
            }
        )
        runs.append(
            {
                "kind": "peer",
                "name": "open_clip",
                "warmup": p.peer_warmup,
                "steps": p.peer_steps,
                "workers": p.peer_workers,
            }
        )
        keep = {"full", "dissect-r0.2"} | ({n for n, _ in cheap} if p.compiled_cheap else set())
        runs += [{"kind": "config", "name": n, "flags": f, "compile": True} for n, f in configs if n in keep]
        return {**spec, "steps": p.steps, "data": {"backend": "synthetic"}, "runs": runs}

    def phase_e2e(self, letter: str, timeout: float) -> dict:
        spec = self.e2e_spec(letter, timeout)
        spec_path = self.scratch / f"{letter}-spec.json"
        write_json(spec_path, spec)
        cmd = [self.py, str(Path(__file__).resolve()), "--worker", str(spec_path)]
        env = self.env
        if self.dry:  # inductor on 2 CPU cores takes minutes: the dry run checks the --compile path, not the compiler
            self.env = {**env, "TORCH_COMPILE_DISABLE": "1"}
        try:
            rc, timed_out, secs, log = self.run(letter, cmd, timeout)
        finally:
            self.env = env
        res = read_json(Path(spec["out"])) or {}
        runs_done = len(res.get("rows", [])) + (res.get("overlap") is not None) + (res.get("peer") is not None)
        if timed_out:
            status, reason = ("partial" if runs_done else "timeout"), f"cut after {timeout:.0f} s"
        elif rc != 0:
            status, reason = ("partial" if runs_done else "failed"), f"worker exit code {rc}"
        elif res.get("errors"):
            status, reason = (
                "partial",
                f"{len(res['errors'])} run(s) failed: "
                + "; ".join(f"{e['run']}: {e['error'][:160]}" for e in res["errors"]),
            )
        else:
            status, reason = "ok", None
        if self.dry and letter == "c":
            res["compile_note"] = "dry run: TORCH_COMPILE_DISABLE=1, the compiled rows ran eagerly"
        if letter == "c":
            res["targets"] = e2e_targets(res)
            key = e2e_key(res)
        else:
            res["targets"] = loader_targets(res)
            key = ", ".join(
                f"{r['config']} data wait {100 * r['data_share_mean']:.1f}% of the step "
                f"({r['median_step_ms']:.0f} ms median)"
                for r in res.get("rows", [])
                if "data_share" in r
            )
        return phase_result(status, reason, shlex.join(cmd), secs, res, key, log, spec=spec, tail_chars=(4000, 16000))

    # ------------------------------------------------------------------ e: --profile-steps
    def profile_cmd(self, logs: Path) -> list[str]:
        """``python -m dissect_fast.train`` with a ``--profile-steps`` window in the epoch after the warm-up point."""
        p = self.plan
        flags = (
            f"--data-backend synthetic --train-num-samples {p.batch * p.profile_steps_per_epoch} --model {p.model} "
            f"--batch-size {p.batch} --precision {p.precision} --device {p.device} --epochs 2 --select-strategy "
            "dissect-warmup --warmup-point 1 --select-rate 0.2 --lr 1e-4 --warmup 10 --name run --no-progress "
            f"--no-tensorboard --no-plots --log-every-n-steps 1000 --profile-steps {p.profile_window}"
        )
        return [self.py, "-m", "dissect_fast.train", *flags.split(), "--logs", str(logs)]

    def phase_e(self, timeout: float) -> dict:
        p = self.plan
        logs = self.scratch / "e-logs"
        cmd = self.profile_cmd(logs)
        rc, timed_out, secs, log = self.run("e", cmd, timeout)
        prof = logs / "run" / "profile"
        files = sorted(f for f in prof.rglob("*") if f.is_file()) if prof.is_dir() else []
        top = next((f for f in files if f.name == "top_ops.txt"), None)
        phases = next((f for f in files if f.name == "phases.json"), None)
        res: dict = {"window": p.profile_window, "files": {str(f.relative_to(prof)): f.stat().st_size for f in files}}
        if phases is not None:
            res["phases"] = read_json(phases)
        if top is not None:
            res["top_ops"] = top.read_text()
            shutil.copyfile(top, self.out / "top_ops.txt")
        if timed_out:
            status, reason = ("partial" if top else "timeout"), f"cut after {timeout:.0f} s"
        elif rc == 0 and top is not None and phases is not None:
            status, reason = "ok", None
        else:
            status, reason = "failed", f"exit code {rc}; profile files: {list(res['files'])}"
        key = ""
        ph = (res.get("phases") or {}).get("phases") or {}
        if ph:
            unit = "device_ms_per_step" if any("device_ms_per_step" in v for v in ph.values()) else "cpu_ms_per_step"
            key = f"{unit}: " + ", ".join(f"{k} {v.get(unit, 0):.1f}" for k, v in ph.items() if v.get(unit))
        return phase_result(status, reason, shlex.join(cmd), secs, res, key, log)

    # ------------------------------------------------------------------ f: bench_subset
    def phase_f(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        rows, cmds, status, reason, secs = [], [], "ok", None, 0.0
        log = self.scratch / "f.log"
        for size in self.plan.subset_sizes:
            left = end - time.monotonic()
            if left < self.plan.min_phase_s:
                rows.append({"n": int(float(size)), "skipped": f"budget: {left:.0f} s left"})
                status, reason = "partial", "budget ran out before every size"
                continue
            out = self.scratch / f"subset-{size}.json"
            cmd = [self.py, str(ROOT / "benchmarks" / "bench_subset.py"), "--sizes", size, *self.plan.subset_flags]
            cmd += ["--timeout", str(int(max(5, left - 15))), "--tmp", str(self.scratch), "--out", str(out)]
            cmds.append(shlex.join(cmd))
            rc, timed_out, s, log = self.run("f", cmd, left)
            secs += s
            got = read_json(out)
            if got:
                for r in got.get("rows", []):
                    rows.append({**r, "provenance": {k: v for k, v in got.items() if k != "rows"}})
            else:
                rows.append({"n": int(float(size)), "error": "timeout" if timed_out else f"exit code {rc}"})
            if timed_out or rc != 0 or not got:
                status, reason = "partial", f"N={size}: " + ("timeout" if timed_out else f"exit code {rc}")
        if not any("seconds_total" in r for r in rows):
            status = "skipped" if all("skipped" in r for r in rows) else "failed"
        key = "; ".join(
            f"N={r['n']:.0e}: {r['seconds_total']:.1f} s"
            if "seconds_total" in r
            else f"N={r['n']:.0e}: {r.get('error') or r.get('skipped')}"
            for r in rows
        )
        return phase_result(status, reason, " && ".join(cmds), secs, {"rows": rows}, key, log)


def pytest_counts(text: str, junit: Path) -> dict:
    """Counts from pytest's summary line (deselected included), else (a run cut short) from its ``-v`` lines;
    the failures' names from the junit XML, else from the ``-v`` lines."""
    res: dict = {}
    tests = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?: \((.*?)\))?", text, re.MULTILINE)
    line = next(
        (
            ln
            for ln in reversed(text.splitlines())
            if re.match(r"^=*\s*\d+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b", ln)
        ),
        "",
    )
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line):
        res["errors" if what.startswith("error") else what] = int(n)
    if not line:  # no summary: the run was cut; count the tests that reported
        for _, st, _ in tests:
            k = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors"}.get(st, st.lower())
            res[k] = res.get(k, 0) + 1
    res["summary_line"] = line.strip(" =") or f"no summary line (cut short?): {len(tests)} test(s) reported"
    res["skip_reasons"] = sorted({r for _, st, r in tests if st == "SKIPPED" and r})[:5]
    failures, skips = [], {}
    try:
        for case in ET.parse(junit).getroot().iter("testcase"):
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                msg = (bad.get("message") or "").splitlines()
                failures.append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:200] if msg else ''}")
            skip = case.find("skipped")
            if skip is not None:
                why = (skip.get("message") or "?")[:200]
                skips[why] = skips.get(why, 0) + 1
    except (OSError, ET.ParseError):
        failures = [f"{name}: {st}" for name, st, _ in tests if st in ("FAILED", "ERROR")]
    res["failures"] = failures
    if skips:
        res["skip_reasons"] = [f"{n} x {why}" for why, n in sorted(skips.items(), key=lambda kv: -kv[1])][:5]
    return res


# ----------------------------------------------------------------------------------------- targets
def target(value: float | None, op: str, bound: float, **extra) -> dict:
    ok = None if value is None else (value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound)
    return {"value": None if value is None else round(value, 4), "target": f"{op} {bound}", "pass": ok, **extra}


def e2e_targets(res: dict) -> dict:
    """The brief's targets per mode (eager / compiled), from the rows of phase c; never asserted."""
    rows = [r for r in res.get("rows", []) if "median_step_ms" in r]
    overlap = (res.get("overlap") or {}).get("overlap") or {}
    peer = res.get("peer") or {}
    out: dict = {}
    for mode in ("eager", "compiled"):
        by = {r["config"]: r for r in rows if r.get("mode") == mode}
        full, r02 = by.get("full"), by.get("dissect-r0.2")
        if not by:
            continue
        t: dict = {}
        t["dissect_r0.2_vs_full"] = target(
            r02 and full and r02["median_step_ms"] / full["median_step_ms"],
            "<=",
            TARGETS["dissect_r0.2"],
            note="full-resolution scoring, median step",
        )
        cheap = []
        for name, r in by.items():
            ov = (overlap.get(name) or {}).get("delta_key")
            if name.startswith("dissect-r0.2-") and full and ov is not None:
                cheap.append((r["median_step_ms"] / full["median_step_ms"], name, ov))
        good = [c for c in cheap if c[2] >= TARGETS["cheap_overlap"]]
        best = min(good) if good else None
        t["cheapest_scoring_overlap_0.9_vs_full"] = target(
            best and best[0],
            "<=",
            TARGETS["cheap_scoring"],
            config=best and best[1],
            overlap=best and best[2],
            candidates={n: {"ratio": round(x, 4), "delta_topk_overlap": o} for x, n, o in cheap},
            note="cheap-scoring rows whose delta-key top-k overlap with full resolution is >= 0.9; none: value null",
        )
        if r02:
            ph = r02["phases_ms_per_step"]
            t["select_share_of_step"] = target(
                ph["select"] / r02["median_step_ms"],
                "<",
                TARGETS["select_share"],
                note="dissect-r0.2: selection phase median / step median",
            )
        shares = [r["data_share"] for r in by.values() if "data_share" in r]
        t["data_wait_share_synthetic"] = target(
            max(shares) if shares else None,
            "<",
            TARGETS["data_share"],
            note="synthetic data on the device: the loop's own overhead only",
        )
        if mode == "eager" and full:
            sps = peer.get("samples_per_s")
            t["full_vs_open_clip_samples_per_s"] = target(
                sps and full["samples_per_s"] / sps,
                ">=",
                TARGETS["vs_open_clip"],
                open_clip_samples_per_s=sps,
                ours_samples_per_s=full["samples_per_s"],
                compute_only=peer.get("compute_samples_per_s")
                and round(full["samples_per_s"] / peer["compute_samples_per_s"], 4),
                note="both eager; open_clip's step includes its synthetic-data loader wait (not compute_only)",
            )
        out[mode] = t
    return out


def loader_targets(res: dict) -> dict:
    rows = [r for r in res.get("rows", []) if "data_share_mean" in r]
    worst = max(rows, key=lambda r: r["data_share_mean"]) if rows else None
    return {
        "data_wait_share": target(
            worst and worst["data_share_mean"],
            "<",
            TARGETS["data_share"],
            config=worst and worst["config"],
            per_config={r["config"]: r["data_share_mean"] for r in rows},
            note="the worst configuration: total data wait / total step time after the loader's first wave; torch "
            "loader from JPEG shards on local disk, eager steps; the synthetic images (shapes, stored at the model's "
            "size) decode faster than resized web photos",
        )
    }


def e2e_key(res: dict) -> str:
    parts = []
    for r in res.get("rows", []):
        if "median_step_ms" not in r:
            continue
        parts.append(
            f"{r['config']}{'/c' if r['mode'] == 'compiled' else ''} {r['samples_per_s']:.0f}/s"
            + (f" {r['ratio_to_full']:.2f}x" if r.get("ratio_to_full") is not None else "")
        )
    peer = res.get("peer") or {}
    if "samples_per_s" in peer:
        parts.append(f"open_clip {peer['samples_per_s']:.0f}/s")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------- worker (c, d)
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_argv(spec: dict, name: str, flags: list[str], compile: bool) -> list[str]:
    d = spec["data"]
    if d["backend"] == "synthetic":
        data = ["--data-backend", "synthetic", "--train-num-samples", str(spec["batch"] * spec["steps"])]
    else:
        data = ["--train-data", d["shards"], "--data-backend", "torch", "--workers", str(d["workers"])]
    common = (
        f"--model {spec['model']} --batch-size {spec['batch']} --epochs 2 --lr 1e-4 --warmup 10 --precision "
        f"{spec['precision']} --device {spec['device']} --no-progress --no-tensorboard --no-plots "
        "--log-every-n-steps 1000 --seed 0"
    )
    compiled = ["--compile"] if compile else []
    return [*data, *common.split(), "--logs", spec["logs"], "--name", name, *compiled, *flags]


def make_trainer(spec: dict, name: str, flags: list[str], compile: bool):
    from dissect_fast.config import config_from_args
    from dissect_fast.trainer import Trainer

    return Trainer(config_from_args(trainer_argv(spec, name, flags, compile)))


def cleanup() -> None:
    """After a run: compiled graphs and the last trainer's memory go before the next one is built."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_config(spec: dict, run: dict) -> dict:
    """Epoch 0 untimed (warm-up point 1: compilation, autotuning, loader start; unless ``warmup_epoch`` is false),
    epoch 1 through ``Trainer.train_epoch`` with a PhaseTimer attached; statistics over its steps after ``skip``
    (and without the last, which carries the epoch's end)."""
    import torch

    from dissect_fast.timing import PhaseTimer

    mode = "compiled" if run["compile"] else "eager"
    t = make_trainer(spec, f"{run['name']}-{mode}", run["flags"], run["compile"])
    try:
        w0 = time.perf_counter()
        if spec.get("warmup_epoch", True):
            t.train_epoch(0, time.time())
            _sync(t.device)
        warm_s = time.perf_counter() - w0
        if t.strategy.history is not None:  # a filled history: the delta top-k sees realistic keys
            g = torch.Generator(device=t.device).manual_seed(0)
            t.strategy.history.values.copy_(torch.rand(t.num_ids, device=t.device, generator=g) * 40)
        timer = t.timer = PhaseTimer(t.device)
        w0 = time.perf_counter()
        metrics = t.train_epoch(1, time.time())
        timer.step()
        _sync(t.device)
        wall = time.perf_counter() - w0
        t.timer = None
        col = timer.collect()
        row = {
            "config": run["name"],
            "mode": mode,
            "flags": run["flags"],
            "k": t.k,
            "batch_size": spec["batch"],
            "data_backend": t.data_backend,
            "steps_per_epoch": t.steps_per_epoch,
        }
    finally:
        if hasattr(t.train_loader, "close"):
            t.train_loader.close()
        t = None  # the worker's cleanup() frees it
    n = len(col["step_s"])
    lo, hi = (spec["skip"], n - 1) if n - 1 - spec["skip"] >= 1 else (0, n)
    steps, phases = col["step_s"][lo:hi], col["per_step_phases_s"][lo:hi]
    stats = benchkit.step_stats(steps, phases, spec["batch"])
    med_ms = stats["median_step_ms"]
    row.update(
        **stats,
        epoch_samples=spec["batch"] * row["steps_per_epoch"],
        epoch_s=round(med_ms / 1e3 * row["steps_per_epoch"], 4),
        epoch_wall_s=round(wall, 4),
        warmup_epoch_s=round(warm_s, 3),
        data_share_mean=round(sum(s["data"] for s in phases) / max(1e-12, sum(steps)), 4),
        select_share=round(stats["phases_ms_per_step"]["select"] / max(1e-12, med_ms), 4),
        train_loss=metrics.get("train_loss"),
        timing="cuda events" if spec["device"] == "cuda" else "perf_counter",
    )
    return row


def measure_overlap(spec: dict, run: dict) -> dict:
    """bench_train.measure_overlap on this phase's data and model (its trainer built by ``make_trainer``)."""
    import bench_train

    a = argparse.Namespace(
        overlap_steps=run["steps"],
        overlap_pool=run["pool"],
        score_resolutions=run["resolutions"],
        score_patch_dropouts=run["patch_dropouts"],
    )
    t = make_trainer(spec, "overlap", ["--select-strategy", "dissect-momentum", "--select-rate", "0.2"], False)
    try:
        return bench_train.measure_overlap(t, a)
    finally:
        if hasattr(t.train_loader, "close"):
            t.train_loader.close()


def peer_cmd(spec: dict, run: dict, logs: Path) -> list[str]:
    """``open_clip_train.main`` (through open_clip_peer.py) on open_clip's synthetic dataset: same model, batch
    and precision as ours, one step per log line."""
    n = run["warmup"] + run["steps"]
    cuda = spec["device"] == "cuda"
    precision = spec["precision"] if spec["precision"] != "auto" else ("amp_bf16" if cuda else "fp32")
    flags = (
        f"--dataset-type synthetic --train-num-samples {n * spec['batch']} --batch-size {spec['batch']} "
        f"--model {spec['model']} --precision {precision} --workers {run['workers']} --epochs 1 --lr 1e-4 --warmup 10 "
        f"--log-every-n-steps 1 --save-frequency 0 --name peer --device {'cuda' if cuda else 'cpu'} --seed 0"
    )
    cmd = [sys.executable, str(ROOT / "benchmarks" / "open_clip_peer.py"), *flags.split(), "--report-to", ""]
    return cmd + ["--logs", str(logs)]


def run_peer(spec: dict, run: dict, timeout: float) -> dict:
    """open_clip's own trainer (``peer_cmd``); step times from its per-step ``Data (t)`` / ``Batch (t)`` log
    lines after ``run["warmup"]`` steps."""
    logs = Path(spec["logs"]) / "open_clip"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = peer_cmd(spec, run, logs)
    precision = cmd[cmd.index("--precision") + 1]
    log = logs / "peer.log"
    rc, timed_out, secs = run_cmd(cmd, timeout, log, dict(os.environ))
    text = tail(log, 2_000_000)
    found = [
        (float(m.group(1)), float(m.group(2)))
        for m in re.finditer(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),", text)
    ]
    row = {
        "config": "open_clip",
        "mode": "eager",
        "command": shlex.join(cmd),
        "workers": run["workers"],
        "precision": precision,
        "wall_s_incl_startup": round(secs, 2),
    }
    timed = found[run["warmup"] :]
    if timed_out or rc != 0 or not timed:
        why = "timeout" if timed_out else f"exit code {rc}"
        return {**row, "error": f"open_clip trainer: {why}, {len(found)} step lines: {text[-1500:]}"}
    step = statistics.median(b for _, b in timed)
    compute = statistics.median(max(1e-6, b - d) for d, b in timed)
    return {
        **row,
        "steps": len(timed),
        "median_step_ms": round(step * 1e3, 3),
        "samples_per_s": round(spec["batch"] / step, 2),
        "median_data_ms": round(statistics.median(d for d, _ in timed) * 1e3, 3),
        "compute_samples_per_s": round(spec["batch"] / compute, 2),
        "timing": "open_clip log, Batch (t) per step (host wall-clock, 3 decimals)",
    }


def write_shards(data: dict) -> None:
    """JPEG shards of synthetic samples (``dissect_fast.data.synthetic``), written in parallel parts with
    disjoint ids and merged under one dataset index; enough shards for every loader worker."""
    import bench_train

    root, n, per_shard = data["shards"], data["num_samples"], data["per_shard"]
    if os.path.isfile(os.path.join(root, "index.json")):
        return
    shards = n // per_shard  # whole shards only: every worker reads whole batches, no tail
    parts = max(1, min(_cpus(), shards, n // 1024))
    sizes = [per_shard * (shards // parts + (i < shards % parts)) for i in range(parts)]
    bench_train.write_parts(root, sizes, data["image_size"], per_shard)


def worker(spec_path: str) -> int:
    """Phases c and d: the runs of the spec in order, the result file rewritten after each."""
    import logging
    import traceback

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = json.loads(Path(spec_path).read_text())
    logging.getLogger("dissect_fast").setLevel(logging.WARNING)
    out = Path(spec["out"])
    res: dict = {"data": spec["data"], "rows": [], "overlap": None, "peer": None, "errors": [], "skipped": []}
    write_json(out, res)
    if spec["data"]["backend"] == "torch":
        t0 = time.perf_counter()
        write_shards(spec["data"])
        res["data"]["write_s"] = round(time.perf_counter() - t0, 2)
        write_json(out, res)
    for run in spec["runs"]:
        kind = "compiled" if run.get("compile") else "eager" if run["kind"] == "config" else run["kind"]
        left = spec["deadline"] - time.time()
        label = f"{run['name']}{' (compiled)' if run.get('compile') else ''}"
        if left < spec["min_run_s"].get(kind, 1):
            res["skipped"].append(
                {
                    "run": label,
                    "reason": f"budget: {left:.0f} s left, a {kind} run needs {spec['min_run_s'].get(kind, 1)} s",
                }
            )
            write_json(out, res)
            continue
        print(f"[gpu_check worker] {label} ({left:.0f} s left) ...", flush=True)
        t0 = time.perf_counter()
        try:
            if run["kind"] == "config":
                res["rows"].append(time_config(spec, run))
            elif run["kind"] == "overlap":
                res["overlap"] = measure_overlap(spec, run)
            else:
                res["peer"] = run_peer(spec, run, max(5.0, left - 3))
                if "error" in res["peer"]:
                    res["errors"].append({"run": label, "error": res["peer"]["error"][-600:]})
        except Exception as e:  # noqa: BLE001 (one failing run must not cost the others)
            res["errors"].append(
                {"run": label, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            )
            print(traceback.format_exc(), flush=True)
        cleanup()
        print(f"[gpu_check worker] {label}: {time.perf_counter() - t0:.1f} s", flush=True)
        add_ratios(res)
        write_json(out, res)
    return 0


def add_ratios(res: dict) -> None:
    """ratio_to_full (median step over the same mode's full-data median step) and the overlap of cheap rows."""
    full = {r["mode"]: r for r in res["rows"] if r["config"] == "full" and "median_step_ms" in r}
    ov = (res.get("overlap") or {}).get("overlap") or {}
    for r in res["rows"]:
        f = full.get(r["mode"])
        r["ratio_to_full"] = round(r["median_step_ms"] / f["median_step_ms"], 4) if f else None
        if r["config"] in ov:
            r["topk_overlap"] = ov[r["config"]]


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: $OUT when set, else benchmarks/results/gpu-check-DATE; dry run: "
        "a temporary folder)",
    )
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 360; dry run 600)")
    p.add_argument("--phases", default="abcdef", help="which phases to run, e.g. ac (default: all)")
    p.add_argument("--dry-run", action="store_true", help="CPU, micro-vit, seconds per phase: checks the command")
    p.add_argument("--wheels", default=str(WHEEL_DIR), help="folder of the wheels to install when missing")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (logs, shards, checkpoints)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.phases = "".join(c for c in a.phases.replace(",", "") if c in PHASES)
    if a.budget_s is None:
        a.budget_s = 600.0 if a.dry_run else 360.0
    return a


def output_dir(a: argparse.Namespace) -> Path:
    if a.out:
        return Path(a.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    day = datetime.date.today().isoformat()
    if a.dry_run:
        return Path(tempfile.gettempdir()) / f"gpu-check-dry-{day}"
    return ROOT / "benchmarks" / "results" / f"gpu-check-{day}"


def headline_targets(phases: dict) -> dict:
    """The brief's five targets, each a boolean with its measured value (compiled rows when measured)."""
    c = (phases.get("c") or {}).get("results") or {}
    d = (phases.get("d") or {}).get("results") or {}
    tc = c.get("targets") or {}
    mode = "compiled" if (tc.get("compiled") or {}).get("dissect_r0.2_vs_full", {}).get("value") else "eager"
    pick = tc.get(mode) or {}
    eager = tc.get("eager") or {}
    cheap_mode = mode if (pick.get("cheapest_scoring_overlap_0.9_vs_full") or {}).get("value") else "eager"

    def get(t: dict, name: str, m: str) -> dict:
        return {**(t.get(name) or target(None, "", 0)), "mode": m}

    return {
        "dissect_r0.2_full_res_vs_full <= 0.58": get(pick, "dissect_r0.2_vs_full", mode),
        "cheapest_scoring_overlap>=0.9_vs_full <= 0.45": get(
            tc.get(cheap_mode) or {}, "cheapest_scoring_overlap_0.9_vs_full", cheap_mode
        ),
        "full_samples_per_s_vs_open_clip >= 1.3": get(eager, "full_vs_open_clip_samples_per_s", "eager"),
        "selection_share_of_step < 0.01": get(pick, "select_share_of_step", mode),
        "data_wait_share < 0.05 (torch loader, JPEG shards)": get(d.get("targets") or {}, "data_wait_share", "eager"),
    }


def print_summary(summary: dict) -> None:
    env = summary["env"]
    print(
        f"\ngpu_check summary: {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
        f"open_clip {env.get('open_clip')}; {summary['elapsed_s']:.0f} of {summary['budget_s']:.0f} s -> "
        f"{summary['out']}"
    )
    print(f"{'phase':<22} {'status':<8} {'seconds':>8}  key numbers")
    for letter, ph in summary["phases"].items():
        name = f"{letter} {PHASES[letter][0]}"
        key = ph.get("key") or ph.get("reason") or ""
        print(f"{name:<22} {ph['status']:<8} {ph.get('seconds', 0):>8.1f}  {key[:240]}")
        if ph.get("key") and ph.get("reason"):
            print(f"{'':<41}{ph['reason'][:240]}")
    print("targets:")
    for name, t in summary["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t.get("pass")]
        print(f"  {verdict} {name}: {t.get('value')} [{t.get('mode')}]")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker(a.worker)
    plan = DRY if a.dry_run else GPU
    out = output_dir(a)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    info, setup, env = prepare_python(state_dir(), Path(a.wheels))
    for m, v in info.get("modules", {}).items():
        if v is None:
            print(f"[gpu_check] warning: {m} does not import: {info.get('import_errors', {}).get(m)}", flush=True)
    if not a.dry_run and not info.get("cuda_available"):
        print(
            f"[gpu_check] no CUDA device ({info.get('device') or info.get('torch_error')}): run with --dry-run on CPU",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    check = Check(a, plan, out, scratch, env, info)
    check.deadline = t_start + a.budget_s
    command = shlex.join(
        [Path(sys.executable).name, "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(
        f"[gpu_check] {info.get('device')}: phases {a.phases}, budget {a.budget_s:.0f} s, out {out}, scratch {scratch}",
        flush=True,
    )
    runners = {
        "a": check.phase_a,
        "b": check.phase_b,
        "c": lambda t: check.phase_e2e("c", t),
        "d": lambda t: check.phase_e2e("d", t),
        "e": check.phase_e,
        "f": check.phase_f,
    }
    done: dict = {}
    letter = None
    try:
        for i, letter in enumerate(a.phases):
            left = check.left()
            kept = sum(plan.reserve[x] for x in a.phases[i + 1 :])  # the later phases' minimum runs
            timeout = min(plan.timeouts[letter], left - kept)
            if timeout < plan.min_phase_s:
                timeout = min(plan.timeouts[letter], left)  # too little with the reserve: run on what is left
            if timeout < plan.min_phase_s:
                rec = {
                    "status": "skipped",
                    "reason": f"budget: {max(0, left):.0f} s of {a.budget_s:.0f} s left",
                    "seconds": 0.0,
                    "results": None,
                }
            else:
                print(f"[gpu_check] {letter} {PHASES[letter][1]} (timeout {timeout:.0f} s) ...", flush=True)
                try:
                    rec = runners[letter](timeout)
                except Exception as e:  # noqa: BLE001 (a bug in one phase must not cost the others)
                    import traceback

                    rec = {
                        "status": "failed",
                        "reason": f"gpu_check: {type(e).__name__}: {e}",
                        "seconds": 0.0,
                        "results": None,
                        "log_tail": traceback.format_exc()[-4000:],
                    }
            rec = {**check.header(letter), **rec}
            rec["seconds"] = round(rec.get("seconds") or 0.0, 2)
            done[letter] = rec
            write_json(out / f"{letter}-{PHASES[letter][0]}.json", rec)
            print(
                f"[gpu_check] {letter}: {rec['status']} in {rec['seconds']:.1f} s  {rec.get('key') or ''}"
                f"{'  (' + rec['reason'] + ')' if rec.get('reason') else ''}",
                flush=True,
            )
    finally:
        if letter is not None and letter not in done:  # stopped inside a phase: keep what its worker had saved
            partial = read_json(scratch / f"{letter}-result.json")
            if partial and letter in "cd":
                add_ratios(partial)
                partial["targets"] = e2e_targets(partial) if letter == "c" else loader_targets(partial)
            done[letter] = {
                **check.header(letter),
                "status": "interrupted",
                "reason": "gpu_check was stopped",
                "seconds": 0.0,
                "results": partial,
                "log_tail": tail(scratch / f"{letter}.log", 12000),
            }
            write_json(out / f"{letter}-{PHASES[letter][0]}.json", done[letter])
        summary = {
            "benchmark": "gpu_check",
            "command": command,
            "date": check.date,
            "commit": check.commit,
            "tree_sha256": check.tree,
            "dry_run": a.dry_run,
            "budget_s": a.budget_s,
            "elapsed_s": round(time.monotonic() - t_start, 2),
            "out": str(out),
            "env": info,
            "setup": setup,
            "plan": dataclasses.asdict(plan),
            "phases": {
                k: {
                    "status": v["status"],
                    "reason": v.get("reason"),
                    "seconds": v["seconds"],
                    "key": v.get("key"),
                    "file": f"{k}-{PHASES[k][0]}.json",
                }
                for k, v in done.items()
            },
            "targets": headline_targets(done),
        }
        write_json(out / "summary.json", summary)
        if not a.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
