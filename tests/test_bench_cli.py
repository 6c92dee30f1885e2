"""`dissect-fast bench NAME` hands its flags to every benchmark's main(argv)."""

import glob
import os

import pytest

from dissect_fast.cli import main

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
NAMES = sorted(
    os.path.basename(p)[len("bench_") : -len(".py")] for p in glob.glob(os.path.join(BENCH_DIR, "bench_*.py"))
)


def test_benchmarks_found():
    assert {"train", "select", "subset", "subset_quality", "data", "quality"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_bench_help(name, capsys):
    if name == "select":
        pytest.importorskip("triton")  # bench_select imports triton at module level
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out
