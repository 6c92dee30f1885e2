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
    assert {"train", "select", "subset", "data", "quality", "bad_input"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_bench_help(name, capsys):
    if name == "select":
        pytest.importorskip("triton")  # bench_select imports triton at module level
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


@pytest.mark.slow
def test_bench_data_and_subset_smoke(tmp_path):
    """The loader and subset benchmarks at toy size through `dissect-fast bench`: provenance in the result, the
    uint8 path ships a quarter of the float path's bytes, and CLIPCov keeps the asked fraction."""
    import json

    flags = "--quick --unique 8 --samples 128 --batches 2 --warmup 1 --repeats 1 --source generated --workers 1"
    flags += " --providers torch-float,torch-uint8"
    assert main(["bench", "data", *flags.split(), "--out", str(tmp_path / "d.json")]) == 0
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["benchmark"] == "data_loader_throughput" and doc["commit"] and doc["command"].startswith("python -m")
    rows = {r["provider"]: r for r in doc["rows"]}
    assert rows["torch-float"]["worker_bytes_per_sample"] == 4 * rows["torch-uint8"]["worker_bytes_per_sample"]
    assert all(r["images_per_s"] > 0 for r in rows.values())
    sub = ["--device", "cpu", "--sizes", "2e3", "--classes", "20", "--dim", "64", "--out", str(tmp_path / "s.json")]
    main(["bench", "subset", *sub])
    (row,) = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert "error" not in row, row
    assert row["n"] == 2000 and row["chosen"] == 600 and row["peak_anon_bytes"] >= 0
