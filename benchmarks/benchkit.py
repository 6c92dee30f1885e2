"""What the benchmarks share: the provenance header of a result file, the JSON write, and the numbers of a row
of timed training steps.

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is not a package
    import benchkit

A result file is ``header(...)`` (benchmark name, then commit, date, device, host, versions and command from
``dissect_fast.provenance.provenance``, the one place they are computed) plus the benchmark's own fields, written
by :func:`write_json`. Training steps are timed through ``Trainer.fit`` with a ``dissect_fast.training.timing.TimedSteps``
callback; :func:`step_stats` turns its per-step durations into a row's fields. Importing this module imports no
torch (gpu_check's parent process uses it before any phase starts).
"""

from __future__ import annotations

import datetime
import json
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # a plain working tree (the GPU machine): the checkout's package, when none is installed
    sys.path.append(str(ROOT))

from dissect_fast.ioutil import atomic_write  # noqa: E402 (after the path above)


def header(
    benchmark: str, script: str, device=None, argv: list[str] | None = None, modules=(), commit: str | None = None
) -> dict:
    """``{"benchmark": ..., commit, date, device, host, versions, command}``. ``script``: the file under
    benchmarks/; ``argv``: the flags its ``main`` got (None: this process's), so a run started through
    ``dissect-fast bench`` records the equivalent ``python benchmarks/SCRIPT ...`` command. ``device``: a
    torch.device or string (None: cuda when available); ``modules``: more versions to record (e.g. triton);
    ``commit``: a commit given on the command line, recorded instead of the checkout's."""
    from dissect_fast.provenance import provenance

    flags = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", f"benchmarks/{script}", *flags])
    out = {"benchmark": benchmark, **provenance(device, command=command, modules=tuple(modules))}
    if commit:
        out["commit"] = commit
    return out


def device_tag(device_name: str) -> str:
    """A device's part of a result file name: ``cpu``, or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``)."""
    if device_name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def result_path(kind: str, device_name: str, out: str | Path | None = None) -> Path:
    """``out``, else benchmarks/results/KIND-DEVICE-DATE.json."""
    if out:
        return Path(out)
    return RESULTS / f"{kind}-{device_tag(device_name)}-{datetime.date.today().isoformat()}.json"


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON (one trailing newline), written atomically (``dissect_fast.ioutil``); the folder is
    made when missing. Values JSON cannot hold are written as strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, fsync=False) as f:
        f.write(json.dumps(obj, indent=1, default=str) + "\n")
    return path


def step_stats(step_s: list[float], phases: list[dict], batch_size: int) -> dict:
    """A row's timing fields from per-step seconds and per-step phase seconds (``TimedSteps`` / ``PhaseTimer``):
    median, fastest and mean step, samples/s at the median step, per-phase medians and means, and the data wait's
    share of the per-phase medians."""
    med = statistics.median(step_s)
    names = list(phases[0])
    ph_med = {p: round(statistics.median(s[p] for s in phases) * 1e3, 4) for p in names}
    return {
        "steps": len(step_s),
        "median_step_ms": round(med * 1e3, 4),
        "min_step_ms": round(min(step_s) * 1e3, 4),
        "mean_step_ms": round(statistics.fmean(step_s) * 1e3, 4),
        "samples_per_s": round(batch_size / med, 2),
        "phases_ms_per_step": ph_med,
        "phases_mean_ms_per_step": {p: round(statistics.fmean(s[p] for s in phases) * 1e3, 4) for p in names},
        "data_share": round(ph_med["data"] / max(1e-12, sum(ph_med.values())), 4),
    }


def run_grid(
    path: str | Path,
    doc: dict,
    runs: list[dict],
    run_one: Callable[[dict], dict],
    describe: Callable[[dict, dict], str],
    *,
    max_minutes: float | None = None,
    max_runs: int | None = None,
    tag: str = "grid",
) -> None:
    """Run, in order, every planned run (a dict of its settings: its identity) that ``doc["runs"]`` does not hold
    yet; ``doc`` is rewritten to ``path`` after each run, so a cut run keeps what finished and a rerun resumes.
    ``run_one(run)`` returns the run's row (the settings plus results); ``describe(run, row)`` its progress line."""
    doc.setdefault("runs", [])
    keys = list(runs[0]) if runs else []
    done = {json.dumps({k: row[k] for k in keys}, sort_keys=True) for row in doc["runs"]}
    t_start, n_new = time.time(), 0
    for i, r in enumerate(runs):
        if json.dumps(r, sort_keys=True) in done:
            continue
        if max_minutes is not None and time.time() - t_start > 60 * max_minutes:
            print(f"[{tag}] --max-minutes {max_minutes} reached: {len(doc['runs'])}/{len(runs)} runs stored")
            break
        if max_runs is not None and n_new >= max_runs:
            break
        row = run_one(r)
        doc["runs"].append(row)
        doc["completed_runs"] = len(doc["runs"])
        write_json(path, doc)
        n_new += 1
        print(f"[{tag}] {i + 1}/{len(runs)} {describe(r, row)}", flush=True)


def load_json(path: str | Path) -> dict | None:
    """A result file's content, or None when there is none yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def grid_doc(path: str | Path, grid_name: str, fields: dict) -> dict:
    """The result document of a grid benchmark: the stored one (resumed, its runs kept) updated with ``fields``,
    or a new one. ValueError when the file holds another grid."""
    doc = load_json(path) or {}
    if doc.get("grid_name") not in (None, grid_name):
        raise ValueError(f"{path} holds grid {doc['grid_name']!r}, not {grid_name!r}: pass another --tag")
    doc.update(fields, grid_name=grid_name)
    doc.setdefault("runs", [])
    return doc


def write_grid_report(doc: dict, out: str | Path, prefix: str, format_table, make_plots) -> None:
    """``OUT/PREFIX-table.md`` and the plots of a grid's runs (when it has any), printed too."""
    if doc["runs"]:
        table = format_table(doc)
        (Path(out) / f"{prefix}-table.md").write_text(table + "\n")
        paths = make_plots(doc, str(out), prefix)
        print(table)
        print("plots:", ", ".join(paths))
