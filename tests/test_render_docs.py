"""scripts/render_docs.py: the tables of measured numbers in the docs are generated from their result files, a
quoted result made before the last change to the code it measures is refused, and no measured number stands
outside a generated block. The last test runs the check on this repository."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "render_docs.py"


def render(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True, timeout=60
    )


def git(root: Path, *args: str) -> str:
    env = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    return subprocess.run(["git", *env, *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def result(commit: str, rows: list[dict], benchmark: str = "subset") -> dict:
    return {
        "benchmark": benchmark,
        "commit": commit,
        "date": "2026-12-08T00:00:00",
        "device": "cpu",
        "command": "python -m benchmarks.bench_subset",
        "versions": {"torch": "2.9"},
        "rows": rows,
    }


BLOCK = (
    "<!-- results: benchmarks/results/r.json rows=rows cols=method,seconds:.2f=time_(s) group=method -->\n"
    "old\n<!-- end results -->\n"
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A git repository with offline code at one commit and a page quoting a result made at that commit."""
    (tmp_path / "dissect_fast" / "offline").mkdir(parents=True)
    (tmp_path / "dissect_fast" / "offline" / "a.py").write_text("x = 1\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "code")
    head = git(tmp_path, "rev-parse", "HEAD")
    rows = [{"method": "a", "seconds": s} for s in (1.0, 2.0, 3.0)] + [{"method": "b", "seconds": 5.0}]
    (tmp_path / "benchmarks" / "results" / "r.json").write_text(json.dumps(result(head, rows)))
    (tmp_path / "README.md").write_text("Timings:\n\n" + BLOCK)
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "result")
    return tmp_path


def test_table_is_generated_with_sample_sd_and_source(tree: Path):
    assert render(tree, "--check").returncode == 1  # the block still says "old"
    assert render(tree).returncode == 0
    page = (tree / "README.md").read_text()
    # seconds 1, 2, 3: mean 2, sample SD 1 (the population SD would be 0.82); one run: n = 1
    assert "| a | 2.00 ± 1.00 (n = 3) |" in page
    assert "| b | 5.00 (n = 1) |" in page
    assert "| method | time (s) |" in page
    assert "sample standard deviation" in page
    assert "Source: `benchmarks/results/r.json` (commit " in page
    check = render(tree, "--check")
    assert check.returncode == 0, check.stderr


def test_result_older_than_the_code_it_measures_is_refused(tree: Path):
    assert render(tree).returncode == 0
    (tree / "dissect_fast" / "offline" / "a.py").write_text("x = 2\n")
    git(tree, "commit", "-qam", "change the measured code")
    check = render(tree, "--check")
    assert check.returncode == 1 and "re-make it" in check.stderr, check.stderr


def test_change_elsewhere_keeps_the_result(tree: Path):
    assert render(tree).returncode == 0
    (tree / "other.py").write_text("y = 1\n")
    git(tree, "add", "-A")
    git(tree, "commit", "-qm", "unrelated")
    check = render(tree, "--check")
    assert check.returncode == 0, check.stderr


def test_dirty_tree_result_and_missing_provenance_are_refused(tree: Path):
    doc = json.loads((tree / "benchmarks/results/r.json").read_text())
    doc["commit"] = doc["commit"] + "+dirty"
    (tree / "benchmarks/results/r.json").write_text(json.dumps(doc))
    (tree / "benchmarks/results/old.json").write_text(json.dumps({"rows": []}))
    assert render(tree).returncode == 0
    check = render(tree, "--check")
    assert "made from a tree with changes" in check.stderr
    assert "old.json: no benchmark, commit" in check.stderr
    assert check.returncode == 1


def test_number_outside_a_block_is_found_but_code_and_formulas_are_not(tree: Path):
    assert render(tree).returncode == 0
    readme = tree / "README.md"
    base = readme.read_text()
    readme.write_text(base + "\nRun `bench --steps 12.5s` and\n\n```\nsleep 3.5s\n```\n")
    assert render(tree, "--check").returncode == 0
    readme.write_text(base + "\n<!-- computed: 4 bytes x N -->\nThe buffer holds 11.6 MB.\n")
    assert render(tree, "--check").returncode == 0
    readme.write_text(base + "\nA step takes 1.45 s on two cores.\n")
    check = render(tree, "--check")
    assert check.returncode == 1 and "1.45 s" in check.stderr, check.stderr


def test_this_repository_docs_match_their_results():
    """Every table of measured numbers in README.md and docs/ is what its result file says, each quoted result
    was made from a clean tree at or after the last change to the code it measures, every result file carries
    its provenance and no measured number stands outside a generated block."""
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr


def test_only_a_gpu_result_may_be_archived(tree: Path):
    """An old GPU result stays quotable with archived=yes (no GPU here to re-make it), labelled as such; an old
    CPU result does not: it is re-made."""
    doc = json.loads((tree / "benchmarks/results/r.json").read_text())
    doc["commit"] = doc["commit"] + "+dirty"
    (tree / "benchmarks/results/r.json").write_text(json.dumps(doc))
    readme = tree / "README.md"
    readme.write_text(readme.read_text().replace("group=method -->", "group=method archived=yes -->"))
    assert render(tree).returncode == 0
    check = render(tree, "--check")
    assert check.returncode == 1 and "only a GPU result may be archived" in check.stderr, check.stderr
    doc["device"] = "NVIDIA H100 80GB HBM3"
    (tree / "benchmarks/results/r.json").write_text(json.dumps(doc))
    assert render(tree).returncode == 0
    assert "the current code is not measured on a GPU yet" in readme.read_text()
    check = render(tree, "--check")
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    "spec",
    ["benchmarks/results/r.json rows=rows", "benchmarks/results/missing.json cols=a", "benchmarks/results/r.json x"],
)
def test_malformed_marker_stops_with_one_line(tree: Path, spec: str):
    (tree / "README.md").write_text(f"<!-- results: {spec} -->\n<!-- end results -->\n")
    out = render(tree, "--check")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0 and f"marker `<!-- results: {spec} -->`" in out.stderr
