"""The quality benchmark's quick grid (1 seed, 2 strategies, tiny data): every JSON row is complete."""

import json
import math

from benchmarks import bench_quality as b

ROW_KEYS = {
    "noise",
    "strategy",
    "seed",
    "rate",
    "sweep",
    "i2t_R@1",
    "i2t_R@5",
    "t2i_R@1",
    "t2i_R@5",
    "clean_fraction_per_epoch",
    "clean_fraction_after_warmup",
    "base_clean_fraction",
    "trajectories",
    "wall_s",
    "samples_forwarded",
    "samples_backpropagated",
    "compute_units",
    "load_start",
    "load_end",
}


def test_reduced_grid_plan_is_prioritised():
    g = b.GRIDS["reduced"]
    runs = b.plan_runs(g)
    first = runs[: len(g["strategies"])]  # 50% noise, every strategy of the grid, first seed, before anything else
    assert {r["strategy"] for r in first} == set(g["strategies"])
    assert all(r["noise"] == 0.5 and r["seed"] == 0 and r["sweep"] == "main" for r in first)
    assert all(r["rate"] == (1.0 if r["strategy"] == "full" else 0.3) for r in first)
    assert len({json.dumps(r, sort_keys=True) for r in runs}) == len(runs)  # no duplicate run


def test_quick_grid_rows_complete(tmp_path):
    out = tmp_path / "results"
    assert b.main(["--grid", "quick", "--out", str(out), "--work", str(tmp_path / "work"), "--tag", "t"]) == 0
    doc = json.load(open(out / "quality-t.json"))
    assert doc["grid_name"] == "quick" and doc["planned_runs"] == 2 and doc["completed_runs"] == 2
    g = b.GRIDS["quick"]
    steps = g["num_train"] // g["batch_size"]
    for row in doc["runs"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert len(row["clean_fraction_per_epoch"]) == g["epochs"]
        assert all(0.0 <= c <= 1.0 for c in row["clean_fraction_per_epoch"])
        assert row["base_clean_fraction"] == 0.5
        for key in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5"):
            assert 0.0 <= row[key] <= 100.0 and math.isfinite(row[key])
        k = int(0.3 * g["batch_size"])
        assert row["samples_backpropagated"] == g["epochs"] * steps * k
        # random never scores; dissect-gain scores the whole batch in epoch W-1 and every epoch >= W
        scored = 0 if row["strategy"] == "random" else g["epochs"] * steps * g["batch_size"]
        assert row["samples_forwarded"] == scored + g["epochs"] * steps * k
        t = row["trajectories"]
        assert sum(t[f"n_{c}_{s}"] for c in ("clean", "noisy") for s in ("trained", "not_trained")) == g["num_train"]
    # resuming skips finished runs; the table is written
    assert b.main(["--grid", "quick", "--out", str(out), "--work", str(tmp_path / "work"), "--tag", "t"]) == 0
    assert json.load(open(out / "quality-t.json"))["completed_runs"] == 2
    assert "| main | 50% | random |" in (out / "quality-t-table.md").read_text()
