"""Around the GPU check's phases (imports no torch): the wheels carried in ``.whl/`` (``make gpu-wheels``) installed
offline where their module does not import, and subprocesses run within a call's time budget."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: distribution (normalised) -> the module it provides, where the two differ
MODULE_OF = {"open_clip_torch": "open_clip", "pyyaml": "yaml"}


def norm_dist(name: str) -> str:
    """Normalised distribution name: ``PyYAML`` -> ``pyyaml``, ``open-clip-torch`` -> ``open_clip_torch``."""
    return re.sub(r"[-_.]+", "_", name).lower()


def makefile_wheels() -> str:
    """The Makefile's ``GPU_WHEELS`` (``name==version`` words): the default wheel list."""
    m = re.search(r"^GPU_WHEELS\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    return m.group(1).strip() if m else ""


def wheel_modules(wheel_list: str) -> dict[str, str]:
    """``"name==version ..."`` -> {requirement: module it provides}."""
    dists = {req: norm_dist(req.split("==")[0]) for req in wheel_list.split()}
    return {req: MODULE_OF.get(d, d) for req, d in dists.items()}


def phase_env(site: Path | None = None) -> dict[str, str]:
    """The environment of every phase: the installed wheels (if any) and the checkout first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [*([str(site)] if site else []), str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def json_of(code: str, args: list[str], env: dict[str, str]) -> dict | str:
    """The JSON object that ``code`` prints last in a fresh interpreter with ``env``, else its output's tail."""
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return (p.stdout + p.stderr)[-2000:]


def not_importing(modules: list[str], env: dict[str, str]) -> dict[str, str]:
    """{module: error} for the ``modules`` that do not import in a fresh interpreter with ``env``."""
    code = (
        "import importlib, json, sys\nbad = {}\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
        "    except Exception as e:\n        bad[m] = f'{type(e).__name__}: {e}'[:300]\nprint(json.dumps(bad))"
    )
    bad = json_of(code, modules, env)
    return bad if isinstance(bad, dict) else dict.fromkeys(modules, bad[-300:] or "the import check failed")


def install_missing(wheel_list: str, wheel_dir: Path, site: Path) -> dict:
    """Install, from ``wheel_dir`` into ``site``, the requirements whose module does not import; returns what it
    did, ``missing_after`` naming the modules that still do not import (with their errors)."""
    wanted = wheel_modules(wheel_list)
    bad = not_importing(list(dict.fromkeys(wanted.values())), phase_env())
    reqs = [r for r, m in wanted.items() if m in bad]
    rec: dict = {"wheel_dir": str(wheel_dir), "missing_before": sorted(bad), "installed": reqs}
    if reqs:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheel_dir)]
        cmd += ["--no-deps", "--no-compile", "--disable-pip-version-check", "--upgrade", "--target", str(site), *reqs]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            rec["pip_error"] = (p.stdout + p.stderr)[-1500:]
        bad = not_importing(list(dict.fromkeys(wanted.values())), phase_env(site))
    rec["missing_after"] = bad
    return rec


class Budget:
    """A call's seconds, counted from its creation; each phase runs for at most its own cap and what is left."""

    def __init__(self, total_s: float) -> None:
        self.total_s, self.start = total_s, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def timeout(self, cap_s: float) -> float:
        return max(0.0, min(cap_s, self.total_s - self.elapsed()))


def run_logged(cmd: list[str], timeout_s: float, log: Path, env: dict[str, str]) -> int | None:
    """``cmd`` in its own process group, its output appended to ``log``; the group is stopped at the timeout and when
    this process unwinds (SIGTERM turned into SystemExit, Ctrl-C). Returns the exit code, None on a timeout."""
    with open(log, "ab") as f:
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            return p.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            return None
        finally:
            if p.poll() is None:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(p.pid, sig)
                        p.wait(timeout=5)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
