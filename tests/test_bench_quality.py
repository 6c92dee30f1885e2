"""The quality benchmark's quick grids end to end: synthetic pairs (every JSON row complete) and a tiny photo folder
in the CC3M/CyCLIP CSV layout (captions.csv + images/, several captions per image); its clean-vs-noisy AUC."""

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def photo_folder(root: Path, n_images: int) -> Path:
    """Images of varied size and colour, two captions each (named after the colour), like Flickr8k's layout."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i in range(n_images):
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            name = f"{1000 + i}_photo.jpg"
            Image.new("RGB", (rng.randrange(40, 90), rng.randrange(40, 90)), colour).save(root / "images" / name)
            w.writerow([name, f"a photo in colour {colour[0]} {colour[1]}"])
            w.writerow([name, f"something coloured {colour[2]}"])
    return root


def test_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 40).astype(float)  # many ties
    score[3] = np.nan  # unscored: left out
    clean = rng.random(40) < 0.6
    ok = ~np.isnan(score)
    pos, neg = score[ok & clean], score[ok & ~clean]
    expect = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert b.auc(score, clean) == pytest.approx(expect)
    assert b.auc(score, np.ones(40, bool)) is None


def test_photo_quick_grid_end_to_end_and_resume(tmp_path, capsys):
    data = photo_folder(tmp_path / "photos", 80)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--data", str(data), "--grid", "quick", "--out", str(out), "--work", str(work), "--tag", "t"]
    assert b.main(argv) == 0
    doc = json.loads((out / "real-t.json").read_text())
    assert doc["data_name"] == "photos" and doc["completed_runs"] == doc["planned_runs"] == 4
    for key in ("commit", "date", "device", "versions", "command"):
        assert doc[key], key
    g = b.PHOTO_GRIDS["quick"]
    assert [r["noise"] for r in doc["runs"]] == [0.4, 0.4, 0.0, 0.0]
    for row in doc["runs"]:
        n = g["epochs"]
        # 40% of 120 pairs moved; at noise 0 every pair is clean (flags written although shards writes none)
        assert row["base_clean_fraction"] == pytest.approx(1 - row["noise"], abs=0.01)
        for key in ("clean_fraction_per_epoch", "score_auc_per_epoch", "i2t_R@5_per_epoch", "train_wall_s_cum"):
            assert len(row[key]) == n, key
        assert all(0 <= x <= 100 for x in row["i2t_R@5_per_epoch"] + row["t2i_R@5_per_epoch"])
        assert all(v is None or 0 <= v <= 1 for v in row["score_auc_per_epoch"])
        assert row["train_wall_s_cum"] == sorted(row["train_wall_s_cum"]) and row["train_wall_s"] > 0
        assert row["samples_backpropagated_cum"][-1] > 0 and row["compute_units"] > 0
    full, snap = doc["runs"][:2]
    assert full["strategy"] == "full" and snap["strategy"] == "warmup-snapshot"
    assert snap["compute_units"] < full["compute_units"]  # trains on 30% with no scoring pass after W
    assert full["samples_backpropagated_cum"][-1] == 3 * 120  # every pair, every epoch (B divides 120)
    table = (out / "real-t-table.md").read_text()
    assert f"| main | 40% | warmup-snapshot | 0.3 | 1 | 0 | {snap['i2t_R@1']:.1f} |" in table
    # the held-out images are the last ones by name and never trained on
    names = sorted(p.name for p in (data / "images").iterdir())
    val_csv = next(work.glob("val-*.csv")).read_text()
    assert names[-1] in val_csv and names[0] not in val_csv
    capsys.readouterr()
    assert b.main(argv) == 0  # resume: nothing left to run
    assert "[real] 1/4" not in capsys.readouterr().out
    assert len(json.loads((out / "real-t.json").read_text())["runs"]) == 4


def test_grid_of_the_other_source_and_missing_data_folder_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        b.main(["--grid", "cpu", "--out", str(tmp_path)])  # a photo grid without --data
    assert "--grid cpu: not a grid for synthetic pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        b.main(["--data", str(tmp_path), "--grid", "reduced", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="--data .*captions.csv"):
        b.main(["--data", str(tmp_path), "--grid", "quick", "--out", str(tmp_path), "--work", str(tmp_path / "w")])
