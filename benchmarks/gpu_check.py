"""Every GPU claim of the project in two prepared calls, each <= 5 minutes on a bare GPU machine (`make gpu-check`).

    make gpu-wheels                                      # once, with network: the wheels the GPU machine lacks
    make gpu-check CALL=1                                # GPU: results to $OUT, else benchmarks/results/gpu-check-DATE/
    make gpu-check CALL=2
    python benchmarks/gpu_check.py --dry-run --call 1    # the same phases on CPU, tiny model, seconds each

The GPU machine is bare (torch, triton, torchvision, numpy, pytest, ... but no open_clip_torch, ftfy, wcwidth,
webdataset, braceexpand, maybe no regex) and offline: `make gpu-wheels` downloads the wheels of the Makefile's
GPU_WHEELS into `.whl/`; this script installs the ones whose module does not import into a temporary folder
(`pip install --no-index --no-deps --target`, or unzipped when pip is missing), puts it on the PYTHONPATH of
every phase, and stops with exit code 3 when a module still does not import (open_clip above all). The
repository runs as a plain working tree (``dissect_fast/kernels/__init__.py`` finds ``kernels/`` itself).

Phases, in the order of value; each runs in its own subprocess (own process group, own timeout) and writes its
JSON (device, versions, commit, command, date, results) to the output folder as soon as it ends:

  call 1
  a  ``pytest -m gpu tests`` (``-v``: a cut run still names what passed): counts and the failures' names
  b  ``bench_select.py``: fused Triton selection op vs eager and compiled torch, largest B first, and the
     measured routing thresholds (``select_thresholds.json``; phases c..h use them)
  c  end to end through ``Trainer.train_epoch`` on ``--data-backend synthetic``, eager: full data,
     ``dissect-warmup`` r = 0.2 / 0.3 timed in the epoch after its warm-up point, cheap scoring with its top-k
     overlap against full-resolution scoring, open_clip's own trainer
  d  the torch loader on photo-sized JPEG shards (400-500 px, ~50-60 KB, written once): the data-wait share
     over a steady-state window (the batches after the loader's first wave)
  call 2
  e  the rows of c compiled (full and r = 0.2 first)
  f  a ``--profile-steps`` window (NVTX ranges on CUDA): ``top_ops.txt`` and ``phases.json``
  g  training steps (warm-up and selection) under ``torch.cuda.set_sync_debug_mode("error")``: no host sync
  h  ``--data-backend gpu`` (decode on the device) vs the torch loader on the photo shards: data-wait shares
  i  ``bench_subset.py`` (offline CLIPCov selection), as time allows

Each call has its own budget (``--budget-s``, default 290 s from the start, wheel install included): a phase gets
at most its own cap and what is left after the minimum runs of the later phases, a phase that cannot start in
time is recorded as skipped, and a phase cut by its timeout keeps what its subprocess had saved. Nothing writes a
checkpoint. Output per call: one JSON per phase, ``summary.json`` (every target marked measured / not measured /
failed) and ``top_ops.txt`` or ``select_thresholds.json``: at most 8 files in one folder, what comes back from the
GPU machine. ``--dry-run`` runs the phases on CPU with micro-vit and a handful of steps, so a wrong flag, a missing
wheel or a typo fails here and not in the GPU session; what truly needs CUDA is recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
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
#: wheel (distribution) name, normalised -> the module it provides, where the two differ
MODULE_OF = {"open_clip_torch": "open_clip", "pyyaml": "yaml"}
#: phase letter -> (file name, title, call)
PHASES = {
    "a": ("pytest-gpu", "pytest -m gpu", "1"),
    "b": ("select", "selection op micro-benchmark and routing thresholds", "1"),
    "c": ("train", "end to end, synthetic data, eager", "1"),
    "d": ("data", "torch loader on photo-sized JPEG shards", "1"),
    "e": ("compiled", "end to end, synthetic data, compiled", "2"),
    "f": ("profile", "--profile-steps window (NVTX)", "2"),
    "g": ("syncdebug", "training steps under set_sync_debug_mode('error')", "2"),
    "h": ("gpudata", "--data-backend gpu vs the torch loader", "2"),
    "i": ("subset", "offline CLIPCov selection", "2"),
}
CALLS = {c: "".join(k for k, v in PHASES.items() if v[2] == c) for c in ("1", "2")}
THRESHOLDS_FILE = "select_thresholds.json"
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
    steps: int  #: steps per epoch in c and e (epoch 0 is the warm-up, epoch 1 is timed)
    skip: int  #: first timed steps left out of the statistics (compilation of the scoring pass, loader start)
    score_resolution: int
    patch_dropout: float
    overlap_steps: int
    overlap_pool: int
    peer_warmup: int
    peer_steps: int
    peer_workers: int
    loader_workers: int  #: d, h: torch loader workers
    loader_waves: int  #: d, h: batches per worker in the epoch; the first wave (one batch per worker) is untimed
    photo_size: tuple  #: d, h: (smallest, largest) side of the JPEGs, pixels
    photo_unique: int  #: d, h: distinct JPEGs, cycled through the shards (decoding costs per sample)
    compiled_cheap: bool  #: e: also the cheap-scoring rows compiled
    profile_steps_per_epoch: int
    profile_window: str
    sync_steps: int  #: g: steps per epoch (warm-up epoch, then selection epoch); the first of each unwatched
    select_flags: tuple[str, ...]
    subset_sizes: tuple[str, ...]
    subset_flags: tuple[str, ...]
    timeouts: dict  #: cap per phase, seconds
    reserve: dict  #: seconds a phase keeps from the phases before it (its minimum useful run)
    min_run_s: dict  #: c, d, e, h: seconds that must be left to start a run of this kind
    min_phase_s: float


def _cpus() -> int:
    return os.cpu_count() or 1


GPU = Plan(
    device="cuda",
    model="ViT-B-32",
    batch=1024,
    precision="amp_bf16",
    steps=10,
    skip=2,
    score_resolution=160,
    patch_dropout=0.5,
    overlap_steps=16,
    overlap_pool=4,
    peer_warmup=3,
    peer_steps=8,
    peer_workers=max(1, min(12, _cpus() - 2)),
    loader_workers=max(1, min(14, _cpus() - 2)),
    loader_waves=3,
    photo_size=(400, 500),
    photo_unique=1024,
    compiled_cheap=True,
    profile_steps_per_epoch=8,
    profile_window="10:16",
    sync_steps=4,
    select_flags=("--sizes", "65536x512,16384x512,4096x512,1024x512"),
    subset_sizes=("1e6", "1e7"),
    subset_flags=("--device", "cuda", "--approx", "exact"),
    timeouts={"a": 60, "b": 75, "c": 150, "d": 80, "e": 170, "f": 45, "g": 40, "h": 80, "i": 120},
    reserve={"a": 20, "b": 30, "c": 60, "d": 45, "e": 80, "f": 30, "g": 25, "h": 40, "i": 0},
    min_run_s={"eager": 10, "overlap": 10, "peer": 25, "compiled": 55, "loader": 25},
    min_phase_s=15,
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
    overlap_steps=2,
    overlap_pool=2,
    peer_warmup=1,
    peer_steps=2,
    peer_workers=1,
    loader_workers=2,
    loader_waves=2,
    photo_size=(64, 80),
    photo_unique=16,
    compiled_cheap=False,
    profile_steps_per_epoch=3,
    profile_window="4:6",
    sync_steps=2,
    select_flags=("--sizes", "65536x512,16384x512,4096x512,1024x512"),
    subset_sizes=("1e4",),
    subset_flags=("--device", "cpu", "--approx", "exact", "--classes", "20", "--dim", "64"),
    timeouts={k: 120 for k in PHASES},
    reserve={k: 3 for k in PHASES},
    min_run_s={"eager": 1, "overlap": 1, "peer": 1, "compiled": 1, "loader": 1},
    min_phase_s=3,
)


# ----------------------------------------------------------------------------------------- environment
def norm_dist(name: str) -> str:
    """Normalised distribution name: ``PyYAML`` -> ``pyyaml``, ``open-clip-torch`` -> ``open_clip_torch``."""
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_dist(path: Path) -> str:
    return norm_dist(path.name.split("-")[0])


def module_of(dist: str) -> str:
    """The module a distribution provides: ``open_clip_torch`` -> ``open_clip``, else its normalised name."""
    return MODULE_OF.get(norm_dist(dist), norm_dist(dist))


def makefile_wheels() -> str:
    """The Makefile's ``GPU_WHEELS`` (``name==version`` words), the default of ``--wheel-list``."""
    try:
        m = re.search(r"^GPU_WHEELS\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    except OSError:
        return ""
    return m.group(1).strip() if m else ""


def wheel_modules(wheel_list: str) -> dict:
    """``name==version ...`` -> {normalised distribution: module}."""
    return {norm_dist(w.split("==")[0]): module_of(w.split("==")[0]) for w in wheel_list.split() if w}


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


def probe(env: dict, wheels: dict) -> dict:
    """Versions, device and which modules import, as the phases will see them."""
    mods = ["triton", *wheels.values(), "open_clip", "open_clip_train.main", "dissect_fast.kernels.fused_select"]
    mods = list(dict.fromkeys(mods))
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


def prepare_python(site: Path, wheel_dir: Path, wheels: dict) -> tuple[dict, dict, dict]:
    """Probe; install the wheels of ``wheel_dir`` whose module does not import into ``site``, put it on the
    path and probe again. ``wheels``: {distribution: module}. Returns (probe, setup record, environment of the
    phases); the record's ``missing_after`` names the modules that still do not import."""
    env = subprocess_env()
    info = probe(env, wheels)
    missing = sorted(d for d, m in wheels.items() if info.get("modules", {}).get(m) is None)
    setup: dict = {"wheels": wheels, "missing_before": missing, "wheel_dir": str(wheel_dir), "missing_after": []}
    if not missing:
        return info, setup, env
    env = subprocess_env(site)
    found = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    pick = [w for w in found if wheel_dist(w) in missing]
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
    info = probe(env, wheels)
    setup["missing_after"] = sorted(d for d, m in wheels.items() if info.get("modules", {}).get(m) is None)
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
        thresholds = self.out / THRESHOLDS_FILE
        cmd = [self.py, str(ROOT / "benchmarks" / "bench_select.py"), *self.plan.select_flags, "--out", str(out)]
        cmd += ["--thresholds", str(thresholds)]
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
        if thresholds.is_file():  # the later phases route the kernel by what was measured here
            self.env = {**self.env, "DISSECT_SELECT_THRESHOLDS": str(thresholds)}
        key = ""
        if res:
            parts = [
                f"B={r['B']}: {r['speedup_eager']}x eager, {r['speedup_compiled']}x compiled"
                for r in res.get("rows", [])
                if r.get("D") == 512
            ]
            routing = res.get("routing") or {}
            if routing.get("fused_topk_max_b") is not None:
                parts.append(f"fused top-k up to B={routing['fused_topk_max_b']}")
            share = (res.get("train_step") or {}).get("share")
            if share is not None:
                parts.append(f"op/step {100 * share:.2f}%")
            key = "; ".join(parts)
        return phase_result(status, reason, shlex.join(cmd), secs, res, key, log, ok=("ok", "skipped"))

    # ------------------------------------------------------------------ c, d, e, f, g, h: the training loop
    def photo_data(self) -> dict:
        """d, h: photo-sized JPEG shards, written once per size into the state folder (a second call on the same
        machine reuses them): ``loader_waves`` batches per worker, each shard half a batch."""
        p = self.plan
        w = p.loader_workers
        n = p.loader_waves * w * p.batch
        tag = f"photos-{n}-{p.batch}-{p.photo_size[0]}-{p.photo_size[1]}-{p.photo_unique}"
        return {
            "backend": "torch",
            "shards": str(state_dir().parent / tag),
            "workers": w,
            "num_samples": n,
            "per_shard": p.batch // 2 if p.batch % 2 == 0 else p.batch,
            "photo_size": list(p.photo_size),
            "unique": p.photo_unique,
        }

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
            "steps": p.steps,
            "data": {"backend": "synthetic"},
        }
        dissect = ["--select-strategy", "dissect-warmup", "--warmup-point", "1", "--select-rate"]
        r02 = [*dissect, "0.2"]
        if letter in "dh":
            # Steady state: every worker reads whole shards into ``loader_waves`` whole batches and all start
            # together; the first wave (one batch per worker, and the first CUDA calls) is left out, the data
            # share is the later waves' total wait over their total step time. No warm-up epoch (each epoch starts
            # its workers afresh): eager, and the loader is timed. DISSect r = 0.2 first (it needs the most images
            # per second).
            w = p.loader_workers
            loader = {"kind": "config", "compile": False, "min": "loader"}
            if letter == "d":
                runs = [
                    {**loader, "name": "dissect-r0.2", "flags": r02},
                    {**loader, "name": "full", "flags": ["--select-strategy", "full"]},
                ]
            else:
                gpu = {**loader, "backend": "gpu"}
                runs = [
                    {**gpu, "name": "dissect-r0.2-gpu", "flags": r02},
                    {**loader, "name": "dissect-r0.2-torch", "flags": r02},
                    {**gpu, "name": "full-gpu", "flags": ["--select-strategy", "full"]},
                ]
            steps = p.loader_waves * w
            return {**spec, "steps": steps, "skip": w, "warmup_epoch": False, "data": self.photo_data(), "runs": runs}
        if letter == "f":
            return {**spec, "runs": [{"kind": "profile", "name": "profile", "flags": self.profile_flags()}]}
        if letter == "g":
            flags = [*r02, "--warmup-train", "full"]
            return {**spec, "steps": p.sync_steps, "runs": [{"kind": "syncdebug", "name": "syncdebug", "flags": flags}]}
        cheap = [
            (f"dissect-r0.2-res{p.score_resolution}", ["--score-resolution", str(p.score_resolution)]),
            (f"dissect-r0.2-pd{p.patch_dropout}", ["--score-patch-dropout", str(p.patch_dropout)]),
        ]
        configs = [
            ("full", ["--select-strategy", "full"]),
            ("dissect-r0.2", r02),
            ("dissect-r0.3", [*dissect, "0.3"]),
        ] + [(n, [*r02, *f]) for n, f in cheap]
        if letter == "e":  # compiled: the ratio's two rows first, the cheap ones as time allows
            keep = {"full", "dissect-r0.2"} | ({n for n, _ in cheap} if p.compiled_cheap else set())
            return {
                **spec,
                "runs": [{"kind": "config", "name": n, "flags": f, "compile": True} for n, f in configs if n in keep],
            }
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
        return {**spec, "runs": runs}

    def phase_e2e(self, letter: str, timeout: float) -> dict:
        spec = self.e2e_spec(letter, timeout)
        spec_path = self.scratch / f"{letter}-spec.json"
        write_json(spec_path, spec)
        cmd = [self.py, str(Path(__file__).resolve()), "--worker", str(spec_path)]
        env = self.env
        if self.dry:  # inductor on 2 CPU cores takes minutes: the dry run checks the --compile path, not the compiler
            env = {**env, "TORCH_COMPILE_DISABLE": "1"}
        rc, timed_out, secs = run_cmd(cmd, timeout, self.scratch / f"{letter}.log", env)
        log = self.scratch / f"{letter}.log"
        res = read_json(Path(spec["out"])) or {}
        runs_done = len(res.get("rows", [])) + sum(
            res.get(k) is not None for k in ("overlap", "peer", "profile", "sync")
        )
        if res.get("not_measured"):
            status, reason = "not measured", res["not_measured"]
        elif timed_out:
            status, reason = ("partial" if runs_done else "timeout"), f"cut after {timeout:.0f} s"
        elif rc != 0:
            status, reason = ("partial" if runs_done else "failed"), f"worker exit code {rc}"
        elif res.get("errors"):
            status, reason = (
                "partial" if runs_done else "failed",
                f"{len(res['errors'])} run(s) failed: "
                + "; ".join(f"{e['run']}: {e['error'][:160]}" for e in res["errors"]),
            )
        else:
            status, reason = "ok", None
        if self.dry and letter == "e":
            res["compile_note"] = "dry run: TORCH_COMPILE_DISABLE=1, the compiled rows ran eagerly"
        res["targets"] = phase_targets(letter, res)
        key = phase_key(letter, res)
        if letter == "f" and res.get("profile", {}).get("top_ops"):
            (self.out / "top_ops.txt").write_text(res["profile"]["top_ops"])
        return phase_result(status, reason, shlex.join(cmd), secs, res, key, log, spec=spec, tail_chars=(4000, 16000))

    def profile_flags(self) -> list[str]:
        """The trainer flags of phase f: a ``--profile-steps`` window in the epoch after the warm-up point."""
        p = self.plan
        return (
            f"--data-backend synthetic --train-num-samples {p.batch * p.profile_steps_per_epoch} --model {p.model} "
            f"--batch-size {p.batch} --precision {p.precision} --device {p.device} --epochs 2 --select-strategy "
            "dissect-warmup --warmup-point 1 --select-rate 0.2 --lr 1e-4 --warmup 10 --name profile --no-progress "
            f"--no-tensorboard --no-plots --log-every-n-steps 1000 --profile-steps {p.profile_window}"
        ).split()

    # ------------------------------------------------------------------ i: bench_subset
    def phase_i(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        rows, cmds, status, reason, secs = [], [], "ok", None, 0.0
        log = self.scratch / "i.log"
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
            rc, timed_out, s, log = self.run("i", cmd, left)
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


def loader_targets(res: dict, backend: str = "torch") -> dict:
    """d, h: the worst data-wait share over the rows of ``backend``."""
    rows = [r for r in res.get("rows", []) if "data_share_mean" in r and r.get("data_backend") == backend]
    worst = max(rows, key=lambda r: r["data_share_mean"]) if rows else None
    return {
        "data_wait_share": target(
            worst and worst["data_share_mean"],
            "<",
            TARGETS["data_share"],
            config=worst and worst["config"],
            per_config={r["config"]: r["data_share_mean"] for r in rows},
            note=f"--data-backend {backend}, the worst configuration: total data wait / total step time after the "
            "loader's first wave; photo-sized JPEG shards on local disk, eager steps",
        )
    }


def sync_targets(res: dict) -> dict:
    """g: the host syncs seen in the watched steps (``set_sync_debug_mode("error")`` raises at the first)."""
    sync = res.get("sync") or {}
    watched = sync.get("watched_steps", 0) if sync.get("mode") == "error" else 0
    return {
        "host_syncs_in_step": target(
            len(sync.get("syncs", [])) if watched else None,
            "<=",
            0,
            watched_steps=watched,
            note=sync.get("note")
            or "steps under torch.cuda.set_sync_debug_mode('error'), the first of each kind unwatched",
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


def phase_targets(letter: str, res: dict) -> dict:
    if letter in "ce":
        return e2e_targets(res)
    if letter == "d":
        return loader_targets(res, "torch")
    if letter == "h":
        return {**loader_targets(res, "gpu"), "torch": loader_targets(res, "torch")["data_wait_share"]}
    if letter == "g":
        return sync_targets(res)
    return {}


def phase_key(letter: str, res: dict) -> str:
    if letter in "ce":
        return e2e_key(res)
    if letter in "dh":
        return ", ".join(
            f"{r['config']} data wait {100 * r['data_share_mean']:.1f}% of the step ({r['median_step_ms']:.0f} ms "
            f"median, {r['samples_per_s']:.0f}/s)"
            for r in res.get("rows", [])
            if "data_share_mean" in r
        )
    if letter == "f":
        ph = ((res.get("profile") or {}).get("phases") or {}).get("phases") or {}
        unit = "device_ms_per_step" if any("device_ms_per_step" in v for v in ph.values()) else "cpu_ms_per_step"
        return f"{unit}: " + ", ".join(f"{k} {v.get(unit, 0):.1f}" for k, v in ph.items() if v.get(unit)) if ph else ""
    if letter == "g":
        sync = res.get("sync") or {}
        return (
            f"{sync.get('watched_steps', 0)} steps watched ({sync.get('mode')}), {len(sync.get('syncs', []))} sync(s)"
        )
    return ""


# ----------------------------------------------------------------------------------------- worker (c, d)
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_argv(spec: dict, name: str, flags: list[str], compile: bool, backend: str | None = None) -> list[str]:
    """The trainer's flags of one run: the spec's data (``backend`` overrides its loader), model and precision."""
    d = spec["data"]
    if d["backend"] == "synthetic":
        data = ["--data-backend", "synthetic", "--train-num-samples", str(spec["batch"] * spec["steps"])]
    else:
        data = ["--train-data", d["shards"], "--data-backend", backend or d["backend"], "--workers", str(d["workers"])]
    common = (
        f"--model {spec['model']} --batch-size {spec['batch']} --epochs 2 --lr 1e-4 --warmup 10 --precision "
        f"{spec['precision']} --device {spec['device']} --no-progress --no-tensorboard --no-plots "
        "--log-every-n-steps 1000 --seed 0"
    )
    compiled = ["--compile"] if compile else []
    return [*data, *common.split(), "--logs", spec["logs"], "--name", name, *compiled, *flags]


def make_trainer(spec: dict, name: str, flags: list[str], compile: bool, backend: str | None = None):
    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    return Trainer(config_from_args(trainer_argv(spec, name, flags, compile, backend)))


def backend_missing(backend: str) -> str | None:
    """Why ``--data-backend backend`` cannot run in this checkout (its parser refuses the value), else None."""
    from dissect_fast.config import build_parser

    for action in build_parser()._actions:
        if "--data-backend" in action.option_strings:
            if action.choices is not None and backend not in action.choices:
                return f"not measured: backend missing (--data-backend {backend} is not among {list(action.choices)})"
    return None


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

    from dissect_fast.training.timing import PhaseTimer

    mode = "compiled" if run["compile"] else "eager"
    t = make_trainer(spec, f"{run['name']}-{mode}", run["flags"], run["compile"], run.get("backend"))
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
    and precision as ours, one step per log line, run in ``logs`` (``--logs none``: no checkpoint written)."""
    n = run["warmup"] + run["steps"]
    cuda = spec["device"] == "cuda"
    precision = spec["precision"] if spec["precision"] != "auto" else ("amp_bf16" if cuda else "fp32")
    flags = (
        f"--dataset-type synthetic --train-num-samples {n * spec['batch']} --batch-size {spec['batch']} "
        f"--model {spec['model']} --precision {precision} --workers {run['workers']} --epochs 1 --lr 1e-4 --warmup 10 "
        f"--log-every-n-steps 1 --save-frequency 0 --name peer --device {'cuda' if cuda else 'cpu'} --seed 0"
    )
    cmd = [sys.executable, str(ROOT / "benchmarks" / "open_clip_peer.py"), *flags.split(), "--report-to", ""]
    return cmd + ["--logs", "none"]  # open_clip's "no logs": no checkpoint either (its out.log lands in the cwd)


def run_peer(spec: dict, run: dict, timeout: float) -> dict:
    """open_clip's own trainer (``peer_cmd``); step times from its per-step ``Data (t)`` / ``Batch (t)`` log
    lines after ``run["warmup"]`` steps."""
    logs = Path(spec["logs"]) / "open_clip"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = peer_cmd(spec, run, logs)
    precision = cmd[cmd.index("--precision") + 1]
    log = logs / "peer.log"
    rc, timed_out, secs = run_cmd(cmd, timeout, log, dict(os.environ), cwd=logs)
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


def photo_jpeg(seed: int, side: tuple = (400, 500), quality: int = 90) -> bytes:
    """A JPEG with a photo's entropy: smooth colour noise over four octaves, fine texture and sensor noise, each
    side drawn from ``side`` (pixels); at 400-500 px and quality 90 about 50-60 KB, as web photos."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(side[0], side[1] + 1, 2))
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((3, 60.0), (8, 30.0), (24, 16.0), (80, 12.0), (200, 8.0)):
        grid = rng.normal(0, 1, (cells + 1, max(2, cells * w // h) + 1, 3)).astype(np.float32)
        img += amp * np.stack(
            [np.asarray(Image.fromarray(grid[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)], -1
        )
    img += rng.uniform(70, 180, 3).astype(np.float32) + rng.normal(0, 5.0, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_photo_shards(data: dict) -> dict:
    """``data["num_samples"]`` samples of ``photo_jpeg`` images (``data["unique"]`` distinct ones, made in parallel and
    cycled: decoding costs per sample) in shards of ``per_shard``, once: a folder with its index.json is reused."""
    import multiprocessing

    import numpy as np

    from dissect_fast.data.shards import tokenize, tokenizer_for
    from dissect_fast.tools.writer import ShardWriter

    root = Path(data["shards"])
    info_path = root / "photos.json"
    if (root / "index.json").is_file() and info_path.is_file():
        return {**json.loads(info_path.read_text()), "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    make = functools.partial(photo_jpeg, side=tuple(data["photo_size"]))
    with multiprocessing.get_context("spawn").Pool(max(1, min(_cpus(), data["unique"]))) as pool:
        jpegs = pool.map(make, range(data["unique"]), chunksize=8)
    caps = [f"a photo of scene {i}, {['red', 'green', 'blue'][i % 3]} tones" for i in range(len(jpegs))]
    toks = tokenize(tokenizer_for(77), caps, 77)
    w = ShardWriter(str(root), data["per_shard"], prefix="photo")
    for i in range(data["num_samples"]):
        j = i % len(jpegs)
        w.write(i, jpegs[j], caps[j], toks[j], None)
    w.finish(77)
    sizes = np.array([len(j) for j in jpegs]) / 1024
    info = {
        "samples": data["num_samples"],
        "unique_images": len(jpegs),
        "shards": len(w.shards),
        "side_px": data["photo_size"],
        "quality": 90,
        "jpeg_kb_mean": round(float(sizes.mean()), 1),
        "jpeg_kb_min": round(float(sizes.min()), 1),
        "jpeg_kb_max": round(float(sizes.max()), 1),
        "write_s": round(time.perf_counter() - t0, 2),
    }
    info_path.write_text(json.dumps(info))
    return {**info, "reused": False}


def no_checkpoints(trainer) -> None:
    """The check writes no checkpoint (a ViT-B-32 one is ~1.8 GB): the epoch ends of ``trainer.fit()`` skip it."""
    trainer.checkpointer.save_epoch = lambda state_fn, epoch_done: None


def run_profile(spec: dict, run: dict) -> dict:
    """f: ``Trainer.fit()`` with ``--profile-steps`` (NVTX ranges on CUDA), no checkpoint; top_ops and phases."""
    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    argv = [*run["flags"], "--logs", spec["logs"]]
    t = Trainer(config_from_args(argv))
    no_checkpoints(t)
    t.fit()
    prof = Path(spec["logs"]) / "profile" / "profile"
    files = sorted(f for f in prof.rglob("*") if f.is_file()) if prof.is_dir() else []
    res: dict = {
        "window": t.cfg.run.profile_steps,
        "command": "python -m dissect_fast.train " + shlex.join(argv),
        "nvtx": spec["device"] == "cuda",
        "files": {str(f.relative_to(prof)): f.stat().st_size for f in files},
    }
    for f in files:
        if f.name == "phases.json":
            res["phases"] = read_json(f)
        elif f.name == "top_ops.txt":
            res["top_ops"] = f.read_text()
    if "phases" not in res or "top_ops" not in res:
        raise RuntimeError(f"--profile-steps wrote no phases.json/top_ops.txt: {list(res['files'])}")
    return res


def run_sync_check(spec: dict, run: dict) -> dict:
    """g: a warm-up epoch (whole batch trained) and a selection epoch, every step but the first of each epoch under
    ``torch.cuda.set_sync_debug_mode("error")`` (CUDA: a host sync in the step raises, and its place is recorded;
    CPU: the same steps run unwatched)."""
    import traceback

    import torch

    from dissect_fast.training.callbacks import Callback

    t = make_trainer(spec, run["name"], run["flags"], False)
    cuda = t.device.type == "cuda"
    res: dict = {"mode": "error" if cuda else None, "watched_steps": 0, "steps": 0, "syncs": []}
    if not cuda:
        res["note"] = "no CUDA: set_sync_debug_mode watches CUDA syncs only; the steps ran unwatched"

    class Watch(Callback):
        def on_batch(self, tr) -> None:  # the batch is here: the step begins
            if cuda and tr.epoch_step > 0:
                torch.cuda.set_sync_debug_mode("error")
                res["watched_steps"] += 1

        def on_step_end(self, tr, epoch: int, n_steps: int) -> None:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            res["steps"] += 1

    t.callbacks.append(Watch())
    try:
        for epoch in (0, 1):  # warm-up point 1: epoch 0 trains the whole batch, epoch 1 selects
            try:
                t.train_epoch(epoch, time.time())
            except RuntimeError as e:
                if not cuda or "synchroniz" not in str(e):
                    raise
                frames = [ln for ln in traceback.format_exc().splitlines() if "dissect_fast" in ln or "kernels" in ln]
                res["syncs"].append({"epoch": epoch, "error": str(e)[:300], "where": frames[-6:]})
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
    finally:
        t.data.close()
    return res


def worker(spec_path: str) -> int:
    """Phases c..h: the runs of the spec in order, the result file rewritten after each."""
    import logging
    import traceback

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = json.loads(Path(spec_path).read_text())
    logging.getLogger("dissect_fast").setLevel(logging.WARNING)
    out = Path(spec["out"])
    res: dict = {"data": spec["data"], "rows": [], "overlap": None, "peer": None, "errors": [], "skipped": []}
    write_json(out, res)
    backends = {r.get("backend") for r in spec["runs"]} - {None}
    missing = [why for b in sorted(backends) if (why := backend_missing(b))]
    if missing:  # the comparison needs every backend: none of its rows runs
        res["not_measured"] = "; ".join(missing)
        write_json(out, res)
        return 0
    if spec["data"]["backend"] != "synthetic":
        res["data"]["photos"] = write_photo_shards(spec["data"])
        write_json(out, res)
    for run in spec["runs"]:
        kind = "compiled" if run.get("compile") else run.get("min", "eager" if run["kind"] == "config" else run["kind"])
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
            elif run["kind"] == "profile":
                res["profile"] = run_profile(spec, run)
            elif run["kind"] == "syncdebug":
                res["sync"] = run_sync_check(spec, run)
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
        "a temporary folder); --call all writes call-1/ and call-2/ inside it",
    )
    p.add_argument(
        "--call",
        default="all",
        choices=("1", "2", "all"),
        help="1: pytest -m gpu, bench_select, eager rows, torch loader; 2: compiled rows, profile, sync check, "
        "gpu decode; all: both, one after the other (default)",
    )
    p.add_argument("--budget-s", type=float, default=None, help="seconds per call (default 290; dry run 600)")
    p.add_argument("--phases", default=None, help="run these phases (one run, any call's), e.g. ac or i")
    p.add_argument("--dry-run", action="store_true", help="CPU, micro-vit, seconds per phase: checks the command")
    p.add_argument("--wheels", default=str(WHEEL_DIR), help="folder of the wheels to install when missing")
    p.add_argument(
        "--wheel-list",
        default=None,
        help="the wheels the phases need, 'name==version ...' (default: the Makefile's GPU_WHEELS)",
    )
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder (phase logs and run folders)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.phases is not None:
        a.phases = "".join(c for c in a.phases.replace(",", "") if c in PHASES)
    if a.budget_s is None:
        a.budget_s = 600.0 if a.dry_run else 290.0
    if a.wheel_list is None:
        a.wheel_list = makefile_wheels()
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


#: the targets of summary.json: name -> (phase, where in the phase's results["targets"], mode)
TARGET_SOURCES = {
    "gpu_tests_failed == 0": ("a", None, None),
    "select_op_vs_eager_torch_B4096 >= 3": ("b", "speedup_eager_B4096_D512", None),
    "select_op_vs_compiled_torch_B4096 >= 1.5": ("b", "speedup_compiled_B4096_D512", None),
    "dissect_r0.2_full_res_vs_full <= 0.58 (eager)": ("c", ("eager", "dissect_r0.2_vs_full"), "eager"),
    "cheapest_scoring_overlap>=0.9_vs_full <= 0.45 (eager)": (
        "c",
        ("eager", "cheapest_scoring_overlap_0.9_vs_full"),
        "eager",
    ),
    "full_samples_per_s_vs_open_clip >= 1.3": ("c", ("eager", "full_vs_open_clip_samples_per_s"), "eager"),
    "selection_share_of_step < 0.01 (eager)": ("c", ("eager", "select_share_of_step"), "eager"),
    "data_wait_share < 0.05 (torch loader, photo JPEGs)": ("d", ("data_wait_share",), "eager"),
    "dissect_r0.2_full_res_vs_full <= 0.58 (compiled)": ("e", ("compiled", "dissect_r0.2_vs_full"), "compiled"),
    "selection_share_of_step < 0.01 (compiled)": ("e", ("compiled", "select_share_of_step"), "compiled"),
    "host_syncs_in_step == 0": ("g", ("host_syncs_in_step",), "eager"),
    "data_wait_share < 0.05 (--data-backend gpu, photo JPEGs)": ("h", ("data_wait_share",), "eager"),
}
_FAILED = ("failed", "timeout", "interrupted")


def headline_targets(phases: dict) -> dict:
    """Every target with its value, pass/fail and a mark: ``measured``, ``failed`` (its phase or run failed) or
    ``not measured`` (its phase is in the other call, was skipped, ran out of budget or lacks a backend)."""
    out = {}
    for name, (letter, path, mode) in TARGET_SOURCES.items():
        rec = phases.get(letter)
        res = (rec or {}).get("results") or {}
        if letter == "a":
            t = target(None if rec is None or rec["status"] in _FAILED else res.get("failed", 0), "<=", 0)
            if rec is not None and not res.get("passed"):
                t = target(None, "<=", 0)
        elif letter == "b":
            got = (res.get("targets") or {}).get(path) or {}
            t = {"value": got.get("value"), "target": got.get("target"), "pass": got.get("pass")}
        else:
            t = res.get("targets") or {}
            for k in path:
                t = (t or {}).get(k) or {}
            t = {**target(None, "", 0), **t} if t else target(None, "", 0)
        t = {**t, "phase": letter, "call": PHASES[letter][2], **({"mode": mode} if mode else {})}
        if rec is None:
            mark, why = "not measured", f"phase {letter} runs in call {PHASES[letter][2]}"
        elif t.get("value") is not None:
            mark, why = "measured", None
        elif rec["status"] in _FAILED or (rec["status"] == "partial" and res.get("errors")):
            mark, why = "failed", rec.get("reason") or rec["status"]
        else:
            mark, why = "not measured", rec.get("reason") or f"phase {letter} {rec['status']}: {t.get('note') or ''}"
        out[name] = {**t, "status": mark, **({"reason": why} if why else {})}
    return out


def print_summary(summary: dict) -> None:
    env = summary["env"]
    print(
        f"\ngpu_check call {summary['call']} summary: {env.get('device')}, torch {env.get('torch')}, triton "
        f"{env.get('triton')}, open_clip {env.get('open_clip')}; {summary['elapsed_s']:.0f} of "
        f"{summary['budget_s']:.0f} s -> {summary['out']}"
    )
    print(f"{'phase':<22} {'status':<12} {'seconds':>8}  key numbers")
    for letter, ph in summary["phases"].items():
        name = f"{letter} {PHASES[letter][0]}"
        key = ph.get("key") or ph.get("reason") or ""
        print(f"{name:<22} {ph['status']:<12} {ph.get('seconds', 0):>8.1f}  {key[:240]}")
        if ph.get("key") and ph.get("reason"):
            print(f"{'':<45}{ph['reason'][:240]}")
    print("targets:")
    for name, t in summary["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t.get("pass")]
        extra = f" ({t['status']}: {t['reason'][:120]})" if t["status"] != "measured" else ""
        print(f"  {verdict} {name}: {t.get('value')}{extra}")


def system_lines(info: dict) -> list[str]:
    """What each call prints first: the device, and /dev/shm (the torch loader's workers pass batches through it)."""
    lines = [f"[gpu_check] device: {info.get('device')} (torch {info.get('torch')}, cuda {info.get('cuda')})"]
    try:
        df = subprocess.run(["df", "-h", "/dev/shm"], capture_output=True, text=True, timeout=10, check=False)
        lines += (df.stdout or df.stderr).strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"df -h /dev/shm: {type(e).__name__}: {e}")
    return lines


def run_call(a: argparse.Namespace, call: str, out: Path, info: dict, setup: dict, env: dict, t_start: float) -> dict:
    """One call's phases within ``a.budget_s`` from ``t_start``: a JSON per phase and summary.json in ``out``."""
    plan = DRY if a.dry_run else GPU
    phases = a.phases if a.phases is not None else CALLS[call]
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    check = Check(a, plan, out, scratch, env, info)
    check.deadline = t_start + a.budget_s
    command = shlex.join([Path(sys.executable).name, "benchmarks/gpu_check.py", *a.argv])
    print(
        f"[gpu_check] call {call}: phases {phases}, budget {a.budget_s:.0f} s, out {out}, scratch {scratch}",
        flush=True,
    )
    if (out / THRESHOLDS_FILE).is_file() and "b" not in phases:  # measured by call 1 into the same folder
        check.env = {**check.env, "DISSECT_SELECT_THRESHOLDS": str(out / THRESHOLDS_FILE)}
    runners = {
        "a": check.phase_a,
        "b": check.phase_b,
        **{x: functools.partial(check.phase_e2e, x) for x in "cdefgh"},
        "i": check.phase_i,
    }
    done: dict = {}
    letter = None
    try:
        for i, letter in enumerate(phases):
            left = check.left()
            kept = sum(plan.reserve[x] for x in phases[i + 1 :])  # the later phases' minimum runs
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
            if partial:
                add_ratios(partial)
                partial["targets"] = phase_targets(letter, partial)
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
            "call": call,
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
    return summary


def setup_failed(a: argparse.Namespace, out: Path, info: dict, setup: dict, missing: list[str]) -> int:
    """A module the phases need does not import after the install: one line, a summary.json saying so, exit 3."""
    why = "; ".join(f"{m}: {info.get('import_errors', {}).get(m) or 'does not import'}" for m in missing)
    line = (
        f"gpu_check: {', '.join(missing)} does not import after the wheel install ({why[:400]}): run "
        f"`make gpu-wheels` on a machine with network and carry .whl (wheels looked for in {a.wheels})"
    )
    print(line, file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    targets = {
        n: {"value": None, "pass": None, "status": "not measured", "reason": "setup failed: " + line}
        for n in TARGET_SOURCES
    }
    summary = {"benchmark": "gpu_check", "call": a.call, "dry_run": a.dry_run, "setup_error": line}
    write_json(out / "summary.json", {**summary, "env": info, "setup": setup, "targets": targets})
    return 3


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])
    if a.worker:
        return worker(a.worker)
    out = output_dir(a)
    t_start = time.monotonic()
    wheels = wheel_modules(a.wheel_list)
    info, setup, env = prepare_python(state_dir(), Path(a.wheels), wheels)
    for line in system_lines(info):
        print(line, flush=True)
    missing = [wheels[d] for d in setup["missing_after"]]
    if info.get("modules", {}).get("open_clip") is None and "open_clip" not in missing:
        missing.append("open_clip")
    if missing:
        return setup_failed(a, out, info, setup, missing)
    if not a.dry_run and not info.get("cuda_available"):
        print(
            f"gpu_check: no CUDA device ({info.get('device') or info.get('torch_error')}): run with --dry-run on CPU",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    calls = ["custom"] if a.phases is not None else ["1", "2"] if a.call == "all" else [a.call]
    failed = False
    for call in calls:
        sub = out / f"call-{call}" if len(calls) > 1 else out
        summary = run_call(a, call, sub, info, setup, env, t_start if call == calls[0] else time.monotonic())
        failed |= any(ph["status"] in _FAILED for ph in summary["phases"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
