"""The training loop stays a loop: loop.py holds at most 350 lines, and no function or method in the loop or the
composition root (build.py) runs over 40 lines (issue 24's limits)."""

import ast
import os

import pytest

TRAINING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dissect_fast", "training")
MAX_LOOP_LINES, MAX_FUNCTION_LINES = 350, 40


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` longer than ``limit`` lines (decorators and
    docstring included)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - first + 1
            if n > limit:
                out.append((node.name, n))
    return out


def test_long_functions_are_found():
    """The check itself: a 41-line function is reported, a 40-line one and a short method are not."""
    body = "    x = 1\n"
    src = (
        "def long():\n"
        + body * 40
        + "\n\ndef fits():\n"
        + body * 39
        + "\n\nclass C:\n    def m(self):\n        y = 2\n"
    )
    assert long_functions(src, 40) == [("long", 41)]


def test_loop_module_is_short():
    with open(os.path.join(TRAINING, "loop.py")) as f:
        n = len(f.read().splitlines())
    assert n <= MAX_LOOP_LINES, f"loop.py has {n} lines (limit {MAX_LOOP_LINES}): move what is not the loop out"


@pytest.mark.parametrize("module", ["loop.py", "build.py"])
def test_no_long_functions(module):
    with open(os.path.join(TRAINING, module)) as f:
        found = long_functions(f.read(), MAX_FUNCTION_LINES)
    assert found == [], f"{module}: functions over {MAX_FUNCTION_LINES} lines: {found}"
