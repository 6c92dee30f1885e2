"""The package's import graph has no circle, and the training command's --help imports no torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dissect_fast"


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (the top-level kernels/ folder is imported as
    dissect_fast.kernels, see its __init__)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        out[f"{PACKAGE}.kernels.{path.stem}"] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` imports: itself, or the package it is an attribute of."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module ``module`` imports, at module level or inside a function: ``import a.b``,
    ``from a import b`` (b a submodule or a name of a), relative imports."""
    is_package = path.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(a.name, modules) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else _known(base, modules))
    return {m for m in found if m is not None and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (its modules in import order, the first repeated at the end), None without one."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_graph_builder_reads_every_form_of_import(tmp_path):
    """The checker itself: module-level, in-function, from-package-import-submodule and relative imports."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import p.b\n",
        "b.py": "def f():\n    from p.sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import a\nfrom ..b import f\n",
        "d.py": "import os\nfrom p.sub.c import name_in_c\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    modules = {("p." + n[:-3].replace("/", ".")).removesuffix(".__init__").removesuffix("."): pkg / n for n in files}
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.sub.c"} and graph["p.sub.c"] == {"p.a", "p.b"}
    assert graph["p.d"] == {"p.sub.c"}
    assert find_cycle(graph) in (["p.a", "p.b", "p.sub.c", "p.a"], ["p.b", "p.sub.c", "p.b"])
    del graph["p.sub.c"]
    assert find_cycle(graph) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 30 and "dissect_fast.config" in graph["dissect_fast.training.resume"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.slow
@pytest.mark.parametrize("command", [["-m", "dissect_fast.train"], ["dissect_fast/train.py"]])
def test_train_help_imports_no_torch(command):
    """`--help` (and every flag error) answers before torch is imported: seconds on a cold start."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--select-strategy" in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported  # the import-time report is there to be read
    assert "torch" not in imported, "--help imported torch"
