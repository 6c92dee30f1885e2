"""Every GPU claim of the project in two prepared calls of at most 290 s each on a bare GPU machine: each call runs
its table of phases (benchmarks, the trainer, ``pytest -m gpu``) within the call's budget and rewrites ``summary.json``
(provenance, each phase's outcome, each target's files) after every phase. ``make gpu-wheels`` once, then ``make
gpu-check CALL=1`` and ``CALL=2`` on the GPU; ``make gpu-check-dry`` runs both on CPU with a tiny model."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu_env import ROOT, Budget, install_missing, json_of, makefile_wheels, phase_env, run_logged

CALL_BUDGET_S = 290.0
SETUP_S = 20.0  #: of each call's budget, kept for the wheel install and the provenance probe
MIN_START_S = 8.0  #: a phase with less time left is recorded as skipped
THRESHOLDS = "select_thresholds.json"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of every phase: the GPU run, or the CPU dry run (a tiny model, seconds per phase)."""

    device: str
    model: str
    precision: str
    batch: int
    image_size: int
    warmup_steps: int  #: bench_train's untimed steps (compilation, autotuning, loader start)
    steps: int  #: bench_train's timed steps
    score_resolution: int  #: the cheap-scoring rows: this resolution and patch dropout 0.5
    overlap_steps: int
    overlap_pool: int
    workers: int  #: loader workers; on photo shards the first wave (one batch per worker) is left untimed
    photo_batch: int  #: bench_data's batch
    photo_batches: int  #: bench_data's timed batches
    photo_unique: int  #: distinct JPEGs in the photo shards
    select_sizes: str
    subset: str  #: bench_subset's flags besides --device, --out, --tmp and --timeout
    profile_window: str


GPU = Sizes(
    "cuda", "ViT-B-32", "amp_bf16", 1024, 224, 3, 8, 160, 16, 4, 14, 256, 40, 1024,
    "65536x512,16384x512,4096x512,1024x512", "--sizes 1e6 --approx exact", "10:16",
)  # fmt: skip
DRY = Sizes(
    "cpu", "micro-vit", "auto", 32, 32, 1, 2, 16, 2, 2, 2, 32, 4, 16,
    "4096x512,1024x512", "--sizes 1e4 --approx exact --classes 20 --dim 64", "4:6",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Phase:
    """One subprocess: ``command`` (split like a shell line) with ``{py}``, ``{out}``, ``{scratch}`` and ``{state}``
    (kept between the calls on one machine: the data sets) filled in at run time."""

    name: str
    call: str
    budget_s: float  #: its cap on the GPU; the dry run scales it with the call's budget
    command: str
    collect: tuple[str, ...] = ()  #: files under {scratch} copied to {out} afterwards, by their name
    cuda_only: bool = False  #: exits non-zero without CUDA: the dry run checks its imports and flags only
    dry_env: tuple[tuple[str, str], ...] = ()  #: environment of the dry run only


def phases(s: Sizes) -> list[Phase]:
    """Both calls' phases, each call's in the order of value."""
    model = f"--device {s.device} --model {s.model} --precision {s.precision} --batch-size {s.batch}"
    train = f"{{py}} -m benchmarks.bench_train {model} --rounds 1"
    synthetic = (
        f"{train} --warmup-steps {s.warmup_steps} --steps {s.steps} --workers {s.workers} --image-size {s.image_size} "
        f"--num-train {(s.warmup_steps + s.steps + 2) * s.batch} --data-cache {{state}}/synthetic"
    )
    r02, res = "dissect-r0.2", s.score_resolution
    eager = (
        f"--configs {r02},dissect-r0.3,{r02}-res{res},{r02}-pd0.5,open_clip --score-resolutions {res} "
        f"--score-patch-dropouts 0.5 --overlap-steps {s.overlap_steps} --overlap-pool {s.overlap_pool}"
    )
    w = s.workers  # photo shards: the first wave of batches (one per worker, ready at once) untimed, one more timed
    photos = f"{train} --train-data {{state}}/photos --workers {w} --warmup-steps {w} --steps {w} --configs {r02}"
    photos += " --no-peer --no-overlap"
    data = (  # bench_data writes the photo-sized JPEG shards once, then times its loaders on them
        f"{{py}} -m benchmarks.bench_data --device {s.device} --data {{state}}/photos --samples {(2 * w + 2) * s.batch} "
        f"--unique {s.photo_unique} --batch-size {s.photo_batch} --batches {s.photo_batches} --warmup 3 --repeats 1 "
        f"--workers {w} --image-size {s.image_size} --out {{out}}/"
    )
    # two epochs (warm-up point 1), the window inside the second: the steady state of selection
    epoch = s.batch * (int(s.profile_window.split(":")[1]) // 2 + 1)
    profile = (
        f"{{py}} -m dissect_fast.train --data-backend synthetic --train-num-samples {epoch} {model} --epochs 2 "
        "--select-strategy dissect-warmup --warmup-point 1 --select-rate 0.2 --lr 1e-4 --warmup 10 --logs {scratch} "
        "--name profile --no-progress --no-tensorboard --no-plots --log-every-n-steps 1000 "
        f"--profile-steps {s.profile_window}"
    )
    select = f"{{py}} -m benchmarks.bench_select --sizes {s.select_sizes} --out {{out}}/select.json"
    subset = f"{{py}} -m benchmarks.bench_subset --device {s.device} {s.subset} --timeout 15 --tmp {{scratch}}"
    compiled = f"{synthetic} --compile --configs {r02} --no-peer --no-overlap --out {{out}}/train-compiled.json"
    pytest = "{py} -m pytest -q -m gpu -rfE -p no:cacheprovider --continue-on-collection-errors tests"
    return [
        Phase("pytest-gpu", "1", 50, pytest),
        Phase("select", "1", 60, select + " --thresholds {out}/" + THRESHOLDS, cuda_only=True),
        Phase("train-eager", "1", 95, f"{synthetic} {eager} --out {{out}}/train-eager.json"),
        Phase("photos-torch", "1", 25, data + "photos-torch.json --providers torch-uint8"),
        Phase("train-photos-torch", "1", 40, f"{photos} --data-backend torch --out {{out}}/train-photos-torch.json"),
        # the dry run: inductor on 2 CPU cores takes minutes, so the --compile path runs eagerly there
        Phase("train-compiled", "2", 130, compiled, dry_env=(("TORCH_COMPILE_DISABLE", "1"),)),
        Phase("profile", "2", 35, profile, ("profile/profile/phases.json", "profile/profile/top_ops.txt")),
        Phase("photos-gpu", "2", 40, data + "photos-gpu.json --providers gpu-decode,torch-uint8"),
        # auto: the gpu backend on CUDA without DALI (the GPU machine has none), the torch loader on CPU
        Phase("train-photos-gpu", "2", 45, f"{photos} --data-backend auto --out {{out}}/train-photos-gpu.json"),
        Phase("subset", "2", 20, subset + " --out {out}/subset.json"),
    ]


#: the targets (README, issue 23) -> the phase that measures them; its result file holds the numbers and verdict
TARGETS = {
    "gpu tests pass (the fused selection op's tests)": "pytest-gpu",
    "no host sync inside a training step": "pytest-gpu",
    "selection op >= 3 x eager and 1.5 x compiled torch": "select",
    "DISSect r = 0.2 <= 0.58 x full data (eager)": "train-eager",
    "cheapest scoring with top-k overlap >= 0.9 <= 0.45 x full data": "train-eager",
    "full data >= 1.3 x open_clip's samples/s": "train-eager",
    "selection < 1% of a step": "train-eager",
    "data wait < 5% (torch loader, photo JPEGs)": "train-photos-torch",
    "DISSect r = 0.2 <= 0.58 x full data (compiled)": "train-compiled",
    "data wait < 5% (--data-backend gpu, photo JPEGs)": "train-photos-gpu",
}


def target_marks(done: dict, why: str) -> dict:
    """Each target ``measured`` (its phase ended well: its files hold the numbers), ``failed`` or ``not measured``."""
    out = {}
    for name, phase in TARGETS.items():
        rec = done.get(phase) or {"status": "not run", "reason": why}
        mark = {"ok": "measured", "skipped": "not measured", "not run": "not measured"}.get(rec["status"], "failed")
        out[name] = {"phase": phase, "status": mark, "reason": rec.get("reason"), "files": rec.get("files", [])}
    return out


def collect(ph: Phase, scratch: Path, out: Path) -> list[str]:
    """Copy the files ``ph`` wrote under ``scratch`` and names in ``collect`` to ``out``."""
    got = [Path(src) for src in ph.collect if (scratch / src).is_file()]
    for src in got:
        shutil.copyfile(scratch / src, out / src.name)
    return [src.name for src in got]


def run_phase(ph: Phase, paths: dict, budget: Budget, scale: float, env: dict, dry: bool) -> dict:
    """Run one phase for at most its (scaled) budget; its outcome from the exit code."""
    out, scratch = Path(paths["out"]), Path(paths["scratch"])
    cmd = [a.format(**paths) for a in shlex.split(ph.command)]
    rec: dict = {"status": "skipped", "command": shlex.join(cmd), "seconds": 0.0, "files": []}
    timeout = budget.timeout(ph.budget_s * scale)
    if timeout < MIN_START_S:
        return {**rec, "reason": f"budget: {timeout:.0f} s of {budget.total_s:.0f} s left"}
    if (out / THRESHOLDS).is_file():  # measured by the select phase: the kernel's auto routing reads it
        env = {**env, "DISSECT_SELECT_THRESHOLDS": str(out / THRESHOLDS)}
    env = {**env, **dict(ph.dry_env)} if dry else env
    before = {p.name for p in out.iterdir()}
    print(f"[gpu_check] {ph.name} (at most {timeout:.0f} s): {rec['command']}", flush=True)
    t0, log = budget.elapsed(), out / "gpu_check.log"
    start = log.stat().st_size if log.is_file() else 0
    rc = run_logged(cmd, timeout, log, env)
    text = log.read_bytes()[start:].decode(errors="replace")
    rec.update(seconds=round(budget.elapsed() - t0, 1), exit_code=rc)
    written = sorted({p.name for p in out.iterdir()} - before - {"gpu_check.log"})
    rec["files"] = written + collect(ph, scratch, out)
    if rc == 0:
        rec["status"] = "ok"
    elif rc is None:
        rec.update(status="timeout", reason=f"stopped after {timeout:.0f} s")
    elif dry and ph.cuda_only and "CUDA" in text[-2000:]:
        rec.update(status="skipped", reason=f"needs CUDA (exit code {rc}): the dry run ran its imports and flags")
    else:
        rec.update(status="failed", reason=f"exit code {rc}", log_tail=text[-3000:])
    print(f"[gpu_check] {ph.name}: {rec['status']} in {rec['seconds']} s {rec.get('reason') or ''}", flush=True)
    return rec


def probe(env: dict) -> dict:
    """Provenance (``dissect_fast.provenance``: commit, date, device, versions) as the phases will see it."""
    code = (
        "import json, torch; from dissect_fast.provenance import provenance\n"
        "d = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "print(json.dumps({**provenance(d, modules=('triton', 'torchvision')), 'cuda_available': d == 'cuda'}))"
    )
    info = json_of(code, [], env)
    if isinstance(info, str):
        return {"probe_error": info, "cuda_available": False}
    if info["commit"].startswith("unknown") and env.get("GPU_CHECK_COMMIT"):  # a tree copied without .git
        info["commit"] = env["GPU_CHECK_COMMIT"]
    return info


def run_call(call: str, a: argparse.Namespace, out: Path, head: dict, env: dict, budget: Budget) -> dict:
    """One call's phases; ``summary.json`` rewritten after each."""
    sizes = DRY if a.dry_run else GPU
    state = Path(tempfile.gettempdir()) / f"dissect_gpu_check-{'dry' if a.dry_run else 'gpu'}"
    scratch = state / f"scratch-call-{call}"
    shutil.rmtree(scratch, ignore_errors=True)
    for folder in (out, scratch):
        folder.mkdir(parents=True, exist_ok=True)
    paths = {"py": sys.executable, "out": str(out), "scratch": str(scratch), "state": str(state)}
    scale = budget.total_s / CALL_BUDGET_S
    summary = {**head, "call": call, "budget_s": budget.total_s, "phases": {}, "not_run_reason": "other call"}
    try:
        for ph in (p for p in phases(sizes) if p.call == call):
            summary["phases"][ph.name] = run_phase(ph, paths, budget, scale, env, a.dry_run)
            write_summary(out, summary, budget)
    finally:  # also when stopped (SIGTERM, Ctrl-C) inside a phase
        write_summary(out, summary, budget)
        shutil.rmtree(scratch, ignore_errors=True)  # run folders (the profile run's checkpoints: 2 GB on ViT-B-32)
    for name, t in summary["targets"].items():
        print(f"[gpu_check] {t['status']:<12} {name} ({t['phase']})")
    return summary


def write_summary(out: Path, summary: dict, budget: Budget) -> None:
    summary.update(
        elapsed_s=round(budget.elapsed(), 1), targets=target_marks(summary["phases"], summary["not_run_reason"])
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--call", default="all", choices=("1", "2", "all"), help="all: both, into call-1/ and call-2/")
    p.add_argument("--out", default=None, help="default: benchmarks/results/gpu-check-DATE (dry run: a temp folder)")
    p.add_argument("--dry-run", action="store_true", help="on CPU with a tiny model: checks every phase's command")
    p.add_argument("--budget-s", type=float, default=None, help="seconds per call (default 290; dry run 870)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of the wheels installed where missing")
    p.add_argument("--wheel-list", default=None, help="'name==version ...' (default: the Makefile's GPU_WHEELS)")
    a = p.parse_args(argv)
    day = datetime.date.today().isoformat()
    default_out = Path(tempfile.gettempdir()) / f"gpu-check-dry-{day}" if a.dry_run else None
    out = Path(a.out) if a.out else default_out or ROOT / "benchmarks" / "results" / f"gpu-check-{day}"
    budget_s = a.budget_s or CALL_BUDGET_S * (3 if a.dry_run else 1)
    budget = Budget(budget_s)
    site = Path(tempfile.gettempdir()) / "dissect_gpu_check-site"
    setup = install_missing(makefile_wheels() if a.wheel_list is None else a.wheel_list, Path(a.wheels), site)
    env = phase_env(site)
    info = probe(env)
    print(f"[gpu_check] device: {info.get('device')}, versions: {info.get('versions')}", flush=True)
    subprocess.run(["df", "-h", "/dev/shm"], check=False)  # the torch loader's workers pass batches through it
    command = shlex.join(["python", "-m", "benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    head = {"benchmark": "gpu_check", "dry_run": a.dry_run, **info, "command": command, "setup": setup}
    if setup["missing_after"]:
        why = "; ".join(f"{m}: {e}" for m, e in setup["missing_after"].items())
        print(
            f"gpu_check: {', '.join(setup['missing_after'])} does not import after the wheel install ({why[:400]}): "
            f"run `make gpu-wheels` on a machine with network and carry .whl (looked in {a.wheels})",
            file=sys.stderr,
        )
        out.mkdir(parents=True, exist_ok=True)
        write_summary(out, {**head, "call": a.call, "phases": {}, "not_run_reason": "setup failed"}, budget)
        return 3
    if not a.dry_run and not info.get("cuda_available"):
        print(f"gpu_check: no CUDA device ({info.get('device')}): use --dry-run on CPU", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwinds: the summary is written
    calls = ["1", "2"] if a.call == "all" else [a.call]
    failed = False
    for i, call in enumerate(calls):
        sub = out / f"call-{call}" if len(calls) > 1 else out
        summary = run_call(call, a, sub, head, env, budget if i == 0 else Budget(budget_s))
        failed |= any(ph["status"] in ("failed", "timeout") for ph in summary["phases"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
