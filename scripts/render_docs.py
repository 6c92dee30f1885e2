"""Tables of measured numbers in README.md and docs/*.md, generated from the result files they quote.

A generated block in a page::

    <!-- results: benchmarks/results/FILE.json rows=KEY cols=COL[:FMT][=LABEL],... [where=COL:VALUE,...]
         [group=COL,...] -->
    (the table: written by this script)
    <!-- end results -->

``archived=yes``: a GPU result of an earlier revision, kept because this machine has no GPU to re-make it: the
freshness check is skipped (not for CPU results: those are re-made) and the source line says that the current
code is not measured on a GPU yet. ``rows``: the key of the list of row dicts in the file (dots for nesting: ``caption``, ``rows``); a dict of dicts
is read as rows with the key in ``name``. ``cols``: the columns, each a row key (dots for nesting) with an
optional format (``.2f``, ``,d``) and an optional header label (spaces as ``_``). ``where``: keep rows whose
column equals the value. ``group``: one row per group; each numeric column becomes ``mean ± SD (n)`` over the
group's rows, SD the sample standard deviation (n - 1). Under each table a source line names the file, its
commit, date and device. A paragraph that starts with ``<!-- computed: HOW -->`` holds arithmetic (sizes worked
out from a formula), not measurements, and is not checked for numbers.

    python scripts/render_docs.py            # rewrite the blocks in place
    python scripts/render_docs.py --check    # exit 1 when a block differs from its file, a quoted result is
                                             # older than the code it measures, or a number stands outside
    python scripts/render_docs.py --list     # every generated block and its source file

A quoted result must come from a clean tree (its commit has no ``+dirty``/``+uncommitted`` tail) at or after the
last commit that changed the code it measures (``MEASURES``, by the file's ``benchmark`` field).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  #: the repository (--root: another tree, for the tests)
BLOCK = re.compile(r"<!-- results: (?P<spec>.*?) -->\n(?P<body>(?:(?!<!-- results:).)*?)<!-- end results -->\n", re.S)
#: the code a result measures, by the result file's ``benchmark`` field: a quoted result must be at or after the
#: last commit that changed any of these paths
MEASURES = {
    "train": ["dissect_fast/training", "dissect_fast/selection", "dissect_fast/model.py", "kernels"],
    "quality": ["dissect_fast/selection/strategies.py", "dissect_fast/selection/history.py", "kernels"],
    "real": ["dissect_fast/selection/strategies.py", "dissect_fast/selection/history.py", "kernels"],
    "demo": ["dissect_fast/selection/strategies.py", "dissect_fast/selection/history.py", "kernels"],
    "data": ["dissect_fast/data"],
    "data_loader_throughput": ["dissect_fast/data"],
    "bad_input": ["dissect_fast/data"],
    "subset": ["dissect_fast/offline"],
    "subset_quality": ["dissect_fast/offline"],
    "select": ["kernels"],
}
PROVENANCE = ("benchmark", "commit", "date", "device", "command", "versions")
#: a measured-looking number in prose: a decimal, or a whole number with a unit of time, rate, size or ratio
NUMBER = re.compile(r"(?<![\w.\-/])\d[\d,]*(\.\d+)?\s?(ms|s|x|×|%|MB|GB|GiB|MiB|img/s|samples/s|steps/s)(?![\w/])")


def set_root(root: Path) -> None:
    global ROOT
    ROOT = root.resolve()


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """A marker's file and options; a malformed marker stops with one line naming it."""
    parts = spec.split()
    bad = [p for p in parts[1:] if "=" not in p]
    opts = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    if not parts or bad or "cols" not in opts or not (ROOT / parts[0]).is_file():
        why = (
            "no such result file" if parts and not bad and "cols" in opts else "expected FILE cols=... [key=value ...]"
        )
        raise SystemExit(f"render_docs: marker `<!-- results: {spec} -->`: {why}")
    return parts[0], opts


def get(row: dict, key: str):
    for k in key.split("."):
        row = row.get(k) if isinstance(row, dict) else None
    return row


def load_rows(doc: dict, key: str) -> list[dict]:
    rows = get(doc, key)
    if isinstance(rows, dict):
        rows = [{"name": k, **v} for k, v in rows.items() if isinstance(v, dict)]
    if not isinstance(rows, list):
        raise SystemExit(f"render_docs: no list of rows at {key!r}")
    return rows


def fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return format(v, spec) if spec else f"{v:g}"


def spread(vals: list, spec: str) -> str:
    nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) != len(vals) or not nums:
        return ", ".join(sorted({str(v) for v in vals}))
    if len(nums) == 1:
        return f"{fmt(nums[0], spec)} (n = 1)"
    return f"{fmt(statistics.mean(nums), spec)} ± {fmt(statistics.stdev(nums), spec)} (n = {len(nums)})"


def table(doc: dict, opts: dict[str, str]) -> str:
    rows = load_rows(doc, opts.get("rows", "rows"))
    for cond in filter(None, opts.get("where", "").split(",")):
        col, val = cond.split(":", 1)
        rows = [r for r in rows if str(get(r, col)) == val]
    cols = []
    for c in opts["cols"].split(","):
        c, label = (c.split("=", 1) + [""])[:2] if "=" in c else (c, "")
        key, spec = (c.split(":", 1) + [""])[:2] if ":" in c else (c, "")
        cols.append((key, spec, (label or key).replace("_", " ")))
    group = [g for g in opts.get("group", "").split(",") if g]
    out = ["| " + " | ".join(label for _, _, label in cols) + " |", "|" + "---|" * len(cols)]
    if group:
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault(tuple(get(r, g) for g in group), []).append(r)
        for members in groups.values():
            cells = [
                fmt(get(members[0], k), s) if k in group else spread([get(r, k) for r in members], s)
                for k, s, _ in cols
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out.append("± is the sample standard deviation over the runs of a row; n is the number of runs.")
    else:
        out += ["| " + " | ".join(fmt(get(r, k), s) for k, s, _ in cols) + " |" for r in rows]
    return "\n".join(out)


def source_line(path: str, doc: dict, archived: bool = False) -> str:
    commit = str(doc.get("commit", "?"))
    short = commit[:10] if re.fullmatch(r"[0-9a-f]{7,40}", commit) else commit
    line = f"Source: `{path}` (commit {short}, {str(doc.get('date', '?'))[:10]}, {doc.get('device', '?')})."
    if archived:
        line += " A result of that earlier revision: the current code is not measured on a GPU yet."
    return line


def render(text: str) -> str:
    def one(m: re.Match) -> str:
        path, opts = parse_spec(m.group("spec"))
        doc = json.loads((ROOT / path).read_text())
        body = table(doc, opts) + "\n\n" + source_line(path, doc, opts.get("archived") == "yes") + "\n"
        return f"<!-- results: {m.group('spec')} -->\n{body}<!-- end results -->\n"

    return BLOCK.sub(one, text)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def stale(path: str, doc: dict) -> str | None:
    """Why a quoted result cannot stand (None: it can)."""
    missing = [k for k in PROVENANCE if k not in doc]
    if missing:
        return f"{path}: no {', '.join(missing)}"
    commit = str(doc["commit"])
    if not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        return f"{path}: made from a tree with changes ({commit}): re-make it from a clean commit"
    paths = MEASURES.get(str(doc["benchmark"]).replace("-", "_"))
    if paths is None:
        return f"{path}: benchmark {doc['benchmark']!r} has no entry in render_docs.MEASURES"
    if not git("rev-parse", "--is-inside-work-tree"):
        return None  # not a git checkout (an unpacked archive): the commit order cannot be checked
    last = git("log", "-1", "--format=%H", "--", *paths)
    ok = subprocess.run(["git", "merge-base", "--is-ancestor", last, commit], cwd=ROOT, capture_output=True)
    if ok.returncode != 0:
        return f"{path}: made at {commit[:10]}, before {last[:10]} changed {', '.join(paths)}: re-make it"
    return None


def outside_numbers(text: str) -> list[str]:
    """Measured-looking numbers outside generated blocks, code blocks and inline code."""
    text = BLOCK.sub("", text)
    text = re.sub(r"<!-- computed.*?-->.*?(\n\n|$)", "", text, flags=re.S)  # arithmetic, not a measurement
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return [m.group(0) for m in NUMBER.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a page or a quoted result is out of date")
    ap.add_argument("--list", action="store_true", help="print each generated block and its source file")
    ap.add_argument("--root", default=str(ROOT), help="the repository (default: this script's)")
    a = ap.parse_args(argv)
    set_root(Path(a.root))
    problems = []
    pages = [
        "README.md",
        "benchmarks/README.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    ]
    for page in pages:
        if not (ROOT / page).is_file():
            continue
        text = (ROOT / page).read_text()
        new = render(text)
        for m in BLOCK.finditer(text):
            path, opts = parse_spec(m.group("spec"))
            if a.list:
                print(f"{page}: {path}")
            doc = json.loads((ROOT / path).read_text())
            if opts.get("archived") == "yes":
                why = (
                    f"{path}: only a GPU result may be archived"
                    if str(doc.get("device", "cpu")).startswith("cpu")
                    else None
                )
            else:
                why = stale(path, doc)
            if why:
                problems.append(f"{page}: {why}")
        nums = outside_numbers(text)
        if nums:
            problems.append(f"{page}: measured-looking numbers outside a generated block: {', '.join(nums[:8])}")
        if new != text:
            if a.check:
                problems.append(f"{page}: a generated block differs from its file: run `make docs`")
            elif not a.list:
                (ROOT / page).write_text(new)
                print(f"rewrote {page}")
    for f in sorted(glob.glob(str(ROOT / "benchmarks/results/*.json"))):
        missing = [k for k in PROVENANCE if k not in json.loads(Path(f).read_text())]
        if missing:
            problems.append(f"{Path(f).relative_to(ROOT)}: no {', '.join(missing)}")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems and (a.check or a.list) else 0


if __name__ == "__main__":
    sys.exit(main())
