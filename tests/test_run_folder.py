"""Run folder hygiene: nested --name, --record files, refusing an existing run, no folder left by a failed
set-up, the R@1 plot with --val-every > 1, and one-line errors of `dissect-fast eval`."""

import json

import numpy as np
import pytest

from dissect_fast.cli import main as cli_main
from dissect_fast.train import main as train_main

FAST = ["--model", "micro-rn", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--lr", "1e-3",
        "--warmup", "2", "--no-plots", "--no-tensorboard", "--no-progress"]  # fmt: skip


def argv(tiny_data, logs, name, *extra):
    return ["--train-data", str(tiny_data / "train"), *FAST, "--logs", str(logs), "--name", name, *extra]


@pytest.fixture(scope="module")
def recorded(tiny_data, tmp_path_factory):
    """One two-epoch dissect-warmup run with --record under a nested --name."""
    logs = tmp_path_factory.mktemp("logs")
    train_main(
        argv(
            tiny_data,
            logs,
            "ablation/sample_05",
            "--epochs",
            "2",
            "--select",
            "--warmup-point",
            "1",
            "--select-rate",
            "0.5",
            "--record",
            "--val-data",
            str(tiny_data / "val"),
        )
    )
    return logs, logs / "ablation" / "sample_05"


def test_nested_name_makes_nested_folders(recorded):
    _, run = recorded
    assert (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "checkpoints" / "epoch_2.pt").is_file() and (run / "out.log").is_file()


def test_record_files(recorded):
    _, run = recorded
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (run / "select_record").iterdir()) == ["record_1.npz", "record_2.npz"]
    for m in lines:
        r = np.load(run / "select_record" / f"record_{m['epoch']}.npz")
        assert int(r["epoch"]) == m["epoch"] and str(r["strategy"]) == "dissect-warmup"
        ids = r["id"]
        assert np.unique(ids).size == ids.size and ids.max() < int(r["num_ids"])
        for key in ("selected", "score", "delta", "history", "clean"):
            assert r[key].shape == ids.shape, key
        assert int(r["selected"].sum()) == m["select/trained_samples"]  # k = 8 of every batch of 16
        assert (r["selected"] > 0).any() and (r["selected"] == 0).any()
        assert not np.isnan(r["history"]).any()  # every recorded id was scored into the history
    r2 = np.load(run / "select_record" / "record_2.npz")  # after the warm-up every batch is scored: all rows
    assert not np.isnan(r2["score"]).any() and not np.isnan(r2["delta"]).any()
    assert r2["id"].size == lines[-1]["step"] // 2 * 16


def test_existing_run_is_refused_unless_resumed(tiny_data, recorded, capsys):
    logs, run = recorded
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(SystemExit) as e:
        train_main(argv(tiny_data, logs, "ablation/sample_05", "--epochs", "2"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Experiment already exists" in err and "--name" in err and "--resume latest" in err
    assert sorted(p.name for p in run.iterdir()) == before
    metrics = train_main(argv(tiny_data, logs, "ablation/sample_05", "--epochs", "2", "--resume", "latest"))
    assert [m["epoch"] for m in metrics] == [1, 2]  # nothing left to train: the checkpoint's metrics


def test_failed_setup_leaves_no_run_folder(tiny_data, tmp_path, capsys):
    bad_subset = tmp_path / "bad.npy"
    np.save(bad_subset, np.array([0, 10**9]))
    cases = [
        (["--train-data", str(tmp_path / "missing-*.tar")], "no shards found"),
        (["--subset", str(bad_subset)], "--subset"),
        (["--val-data", str(tmp_path / "nowhere")], "--val-data"),
    ]
    for i, (extra, msg) in enumerate(cases):
        with pytest.raises(SystemExit) as e:
            train_main(argv(tiny_data, tmp_path / "logs", f"run{i}", "--epochs", "1", *extra))
        assert e.value.code == 2 and msg in capsys.readouterr().err
        assert not (tmp_path / "logs" / f"run{i}").exists(), extra
    # a folder the user made beforehand, holding no run, is used and kept
    (tmp_path / "logs" / "mine").mkdir(parents=True)
    train_main(argv(tiny_data, tmp_path / "logs", "mine", "--epochs", "1"))
    assert (tmp_path / "logs" / "mine" / "metrics.jsonl").is_file()


def test_retrieval_plot_with_val_every(tmp_path, monkeypatch):
    import matplotlib.axes

    from dissect_fast.training.diagnostics import plot_history

    drawn = []
    orig = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append((a, k)) or orig(ax, *a, **k))
    metrics = [
        {"epoch": e, **({"val/image_to_text_R@1": 10.0 * e, "val/text_to_image_R@1": 5.0 * e} if e % 2 == 0 else {})}
        for e in range(1, 5)
    ]  # --val-every 2
    plot_history(metrics, str(tmp_path))
    assert (tmp_path / "retrieval_r1.png").is_file()
    assert [(list(a[0]), list(a[1])) for a, _ in drawn] == [([2, 4], [20.0, 40.0]), ([2, 4], [10.0, 20.0])]


def test_eval_errors_are_one_line(tiny_data, recorded, tmp_path, capsys):
    _, run = recorded
    for args, msg in (
        (["--checkpoint", str(tmp_path / "missing.pt"), "--val-data", str(tiny_data / "val")], "no such file"),
        (
            ["--checkpoint", str(run / "checkpoints" / "latest.pt"), "--val-data", str(tmp_path / "nowhere")],
            "--val-data",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            cli_main(["eval", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("dissect-fast eval: error:")


def test_dataset_resampled_needs_a_known_epoch_size(tiny_data, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"  # shards without a dataset index: the epoch size is unknown
    bare.mkdir()
    for p in (tiny_data / "train").glob("*.tar"):
        shutil.copy(p, bare / p.name)
    extra = ["--train-data", str(bare / "*.tar"), "--epochs", "1", "--dataset-resampled"]
    with pytest.raises(SystemExit) as e:
        train_main(argv(tiny_data, tmp_path / "logs", "r", *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--dataset-resampled needs a known epoch size" in err and "--train-num-samples" in err
    assert not (tmp_path / "logs" / "r").exists()
