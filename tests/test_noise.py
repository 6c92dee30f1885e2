"""``dissect-fast noise``: caption noise for shards made elsewhere (img2dataset layout, written with webdataset's
TarWriter and indexed by ``dissect-fast index``), for pre-tokenised shards with clean flags, and for an open_clip
CSV; the trainer reads the output and its diagnostics see the clean flags."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fixtures_ecosystem import Awkward, img2dataset_shards, openclip_csv

from dissect_fast.cli import main as cli_main
from dissect_fast.data import samples
from dissect_fast.data.index import index_shards
from dissect_fast.data.shards import DatasetIndex, expand_shards
from dissect_fast.tools.noise import add_noise

NOISE = 0.4


def read_samples(root: Path) -> dict[int, dict]:
    """id -> sample (members + ``__key__``) of the good samples of indexed shards, by the project's sample rules."""
    idx = DatasetIndex.load(str(root))
    first = idx.first_ids()
    out = {}
    for shard in idx.shard_paths():
        fid = first.get(Path(shard).stem)
        for s in samples.iter_shard_file(shard, Counter()):
            try:
                sid = samples.check_fields(s, fid, idx.num_ids)
                samples.check_image(s[samples.image_field(s)], "decode")
            except samples.BadSample:
                continue
            out[sid] = s
    return out


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    """2 img2dataset shards of 20 samples (a corrupt, a tiny and a caption-less one planted), indexed."""
    s = img2dataset_shards(
        tmp_path_factory.mktemp("i2d"), 2, 20, image_size=32, seed=1, awkward=Awkward(corrupt=1, tiny=1, no_txt=1)
    )
    index_shards(expand_shards(str(s.root)), str(s.root), workers=1, progress=False)
    return s


@pytest.fixture(scope="module")
def noised(i2d, tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy")
    argv = ["noise", "--in", str(i2d.root), "--out", str(out), "--noise", str(NOISE), "--seed", "5"]
    assert cli_main(argv + ["--workers", "1", "--no-progress"]) == 0
    return out


def test_shards_noise_moves_exactly_the_share_and_keeps_the_rest(i2d, noised):
    before, after = read_samples(i2d.root), read_samples(noised)
    n = len(before)
    assert n == i2d.good == 37
    assert sorted(after) == sorted(before)  # ids unchanged, bad samples left out
    idx = DatasetIndex.load(str(noised))
    assert idx.num_samples == n and idx.id_max == max(before) and idx.clean_file == "clean.npy"
    assert idx.skipped["corrupt_image"] == idx.skipped["tiny_image"] == idx.skipped["missing_field"] == 1
    assert all(s.first_id is None for s in idx.shards)  # ids are stored members now
    source = np.load(noised / "caption_source.npy")
    flags = idx.clean_flags()
    captions = {i: s["txt"] for i, s in before.items()}
    unique = {c for c, k in Counter(captions.values()).items() if k == 1}
    moved = [i for i in before if source[i] != i]
    assert len(moved) == round(NOISE * n)
    assert sorted(source[moved]) == sorted(moved)  # the noisy subset is a permutation of itself
    for i, s in after.items():
        b = before[i]
        assert s["__key__"] == b["__key__"]
        assert s["jpg"] == b["jpg"] and s["json"] == b["json"]  # image and metadata byte for byte
        assert s["txt"] == captions[source[i]]
        assert s["clean"] == bytes([int(source[i] == i)]) and flags[i] == (source[i] == i)
        if source[i] != i and captions[i] in unique:
            assert s["txt"] != captions[i]  # no noisy pair keeps its own caption
        if source[i] == i:
            assert s["txt"] == captions[i]
    assert int(flags[list(before)].sum()) == n - len(moved)
    assert (source[[i for i in range(len(source)) if i not in before]] == -1).all()


def test_same_seed_same_noise_other_seed_other_noise(i2d, noised, tmp_path):
    a = add_noise(str(i2d.root), str(tmp_path / "a"), NOISE, 5, workers=1, progress=False)
    b = add_noise(str(i2d.root), str(tmp_path / "b"), NOISE, 6, workers=1, progress=False)
    assert np.array_equal(a.caption_source, np.load(noised / "caption_source.npy")[a.ids])
    assert a.moved == b.moved == round(NOISE * a.ids.size)
    assert not np.array_equal(a.caption_source, b.caption_source)
    z = add_noise(str(i2d.root), str(tmp_path / "z"), 0.0, workers=1, progress=False)
    assert z.moved == 0 and z.clean.all() and DatasetIndex.load(str(tmp_path / "z")).clean_flags()[z.ids].all()


def test_trainer_diagnostics_see_the_clean_flags(noised, tmp_path):
    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    flags = DatasetIndex.load(str(noised)).clean_flags()
    ids = np.load(noised / "caption_source.npy") >= 0
    argv = ["--train-data", str(noised), "--model", "micro-vit", "--batch-size", "37", "--epochs", "1"]
    argv += ["--workers", "0", "--logs", str(tmp_path), "--name", "n", "--no-progress", "--no-tensorboard"]
    argv += ["--device", "cpu", "--select-strategy", "full", "--record"]
    t = Trainer(config_from_args(argv))
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["select/clean_fraction"] == pytest.approx(flags[ids].mean())
    rec = np.load(tmp_path / "n" / "select_record" / "record_1.npz")
    assert sorted(rec["id"]) == sorted(np.flatnonzero(ids))
    assert np.array_equal(rec["clean"], flags[rec["id"]].astype(bool))


def test_pretokenised_shards_move_tokens_and_keep_existing_noise(tmp_path):
    from dissect_fast.tools.synthetic import write_split

    src_dir = tmp_path / "synth"
    write_split(str(src_dir), 24, 100, 0.25, 16, 0, 10, progress=False)  # ids 100.., 6 pairs already noisy
    before = read_samples(src_dir)
    clean_in = DatasetIndex.load(str(src_dir)).clean_flags()
    r = add_noise(str(src_dir), str(tmp_path / "out"), 0.5, 1, workers=1, progress=False)
    after = read_samples(tmp_path / "out")
    assert sorted(after) == sorted(before) == list(range(100, 124))
    assert r.moved == 12
    idx = DatasetIndex.load(str(tmp_path / "out"))
    assert idx.has_tokens and idx.context_length == 77
    flags = idx.clean_flags()
    for i, src in zip(r.ids, r.caption_source):
        assert after[i]["txt"] == before[src]["txt"] and after[i]["tok"] == before[src]["tok"]
        assert after[i]["jpg"] == before[i]["jpg"] and after[i]["id"] == before[i]["id"]
        assert flags[i] == (clean_in[i] and src == i)
    assert flags[r.ids].sum() < (r.caption_source == r.ids).sum()  # the input's noisy pairs stay noisy


def test_csv_noise_writes_shards_and_a_flagged_csv(tmp_path):
    cs = openclip_csv(tmp_path / "csv", 20, image_size=32, seed=2, missing_images=1)
    out = tmp_path / "out"
    argv = ["noise", "--in", str(cs.csv), "--out", str(out), "--noise", "0.5", "--images", str(cs.images)]
    assert cli_main(argv + ["--csv-img-key", "filepath", "--csv-caption-key", "title", "--no-progress"]) == 0
    with open(cs.csv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with open(out / "train.csv", newline="") as f:
        noisy = list(csv.DictReader(f, delimiter="\t"))
    assert list(noisy[0]) == ["filepath", "title", "id", "clean"]
    assert [int(r["id"]) for r in noisy] == list(range(20))  # ids are row numbers; the missing image's row is out
    idx = DatasetIndex.load(str(out))
    assert idx.num_samples == 20 and idx.skipped == {"missing_image": 1} and idx.has_tokens
    flags, source = idx.clean_flags(), np.load(out / "caption_source.npy")
    shards = read_samples(out)
    assert sum(source[i] != i for i in range(20)) == 10
    for r in noisy:
        i = int(r["id"])
        assert r["filepath"] == rows[i]["filepath"]
        assert r["title"] == rows[source[i]]["title"] == shards[i]["txt"].decode()
        assert int(r["clean"]) == flags[i] == (source[i] == i)
        assert shards[i]["jpg"] == (cs.images / r["filepath"]).read_bytes()


@pytest.mark.parametrize("noise", ["1.0", "-0.1", "1.5"])
def test_noise_outside_range_is_refused(i2d, tmp_path, capsys, noise):
    with pytest.raises(SystemExit):
        cli_main(["noise", "--in", str(i2d.root), "--out", str(tmp_path / "o"), "--noise", noise])
    assert "--noise must be in [0, 1)" in capsys.readouterr().err


def test_unindexed_idless_shards_name_the_index_command(tmp_path, capsys):
    raw = img2dataset_shards(tmp_path / "raw", 1, 4, image_size=32, seed=3)
    with pytest.raises(SystemExit):
        cli_main(["noise", "--in", str(raw.root), "--out", str(tmp_path / "o"), "--noise", "0.5"])
    err = capsys.readouterr().err
    assert "--in" in err and "dissect-fast index" in err
    assert not (tmp_path / "o" / "index.json").exists()


def test_missing_inputs_and_bad_outputs_name_the_flag(i2d, tmp_path, capsys):
    cases = [
        (["--in", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "--in"),
        (["--in", str(tmp_path / "nowhere.csv"), "--out", str(tmp_path / "o")], "--in"),
        (["--in", str(i2d.root), "--out", str(i2d.root)], "--out"),
        (["--in", str(i2d.root), "--out", str(tmp_path / "o"), "--csv-img-key", "x"], "--csv-img-key"),
    ]
    for args, flag in cases:
        with pytest.raises(SystemExit):
            cli_main(["noise", *args, "--noise", "0.3", "--no-progress"])
        err = capsys.readouterr().err
        assert flag in err, (args, err)
