"""``dissect_fast.kernels`` (sources in the top-level ``kernels/`` folder) imports the same way from a checkout
that was never installed and from a wheel (the editable install: every other test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURELIB = sysconfig.get_paths()["purelib"]  # torch, numpy, ... (not the editable finder: its .pth is not run)
PROBE = (
    "import sys; sys.path[:0] = {front!r}; sys.path.append({lib!r}); "
    "import dissect_fast.kernels.fused_select, dissect_fast.selection.strategies; "
    "print(sys.modules['dissect_fast.kernels.fused_select'].__file__); "
    "print(sys.modules['dissect_fast.kernels'].__path__)"
)


def _import_kernels(front: list[str], cwd: Path) -> list[str]:
    """Import the kernels with ``python -S`` (no site: no .pth, no editable finder) and ``front`` on the path."""
    p = subprocess.run(
        [sys.executable, "-S", "-c", PROBE.format(front=front, lib=PURELIB)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()


def _copy_checkout(dst: Path) -> Path:
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "runs", "logs", ".whl")
    dst.mkdir(parents=True)
    for name in ("setup.py", "dissect_fast", "kernels"):
        src = ROOT / name
        shutil.copytree(src, dst / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dst / name)
    return dst


def test_checkout_without_install(tmp_path):
    """A copy of the working tree on sys.path, nothing installed: the op files load from its ``kernels/``."""
    repo = _copy_checkout(tmp_path / "repo")
    assert not (repo / "dissect_fast" / "kernels" / "fused_select.py").exists()
    out = _import_kernels([str(repo)], cwd=tmp_path)
    assert Path(out[0]) == repo / "kernels" / "fused_select.py"
    assert out[1] == str([str(repo / "dissect_fast" / "kernels"), str(repo / "kernels")])


def test_wheel(tmp_path):
    """``pip wheel .`` ships ``kernels/*.py`` inside ``dissect_fast/kernels/``; installed into a bare target, the
    kernels import from there, nothing reaches back into the checkout, and a foreign top-level ``kernels``
    package beside it (the PyPI name) is left alone."""
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run([*pip, "--version"], capture_output=True, check=False).returncode != 0:
        pytest.skip("pip is not available")
    repo = _copy_checkout(tmp_path / "repo")  # build from a copy: no build/ or egg-info in the checkout
    wh = tmp_path / "wh"
    build = [*pip, "wheel", str(repo), "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wh)]
    p = subprocess.run(build, capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = wh.glob("dissect_fast-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    ops = {f"dissect_fast/kernels/{f.name}" for f in (ROOT / "kernels").glob("*.py")}
    assert ops and ops | {"dissect_fast/kernels/__init__.py"} <= names
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "site"
    inst = [*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(whl)]
    p = subprocess.run(inst, capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    shutil.rmtree(repo)  # the installed wheel must not need the sources
    (target / "kernels").mkdir()
    (target / "kernels" / "__init__.py").write_text("raise ImportError('foreign kernels package')\n")
    out = _import_kernels([str(target)], cwd=tmp_path)
    assert Path(out[0]) == target / "dissect_fast" / "kernels" / "fused_select.py"
    assert out[1] == str([str(target / "dissect_fast" / "kernels")])
