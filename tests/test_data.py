"""Shard tools and the torch loader: format, determinism, skips that are counted, epochs that are exact."""

import csv
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dissect_fast.data.loader import ShardDataset, TorchLoader
from dissect_fast.data.samples import fit_tokens
from dissect_fast.data.shards import DatasetIndex, resolve_data
from dissect_fast.tools.csv_shards import csv_to_shards
from dissect_fast.tools.synthetic import make_synthetic, noisy_permutation
from dissect_fast.tools.writer import ShardWriter


def eval_transform(size=32):
    from open_clip import image_transform

    return image_transform(size, is_train=False)


def test_synthetic_index_and_clean_flags(tiny_data):
    idx = DatasetIndex.load(str(tiny_data / "train"))
    assert idx.num_samples == 240 and idx.id_min == 0 and idx.id_max == 239 and len(idx.shards) == 3
    clean = idx.clean_flags()
    assert clean.shape == (240,) and abs(clean.mean() - 0.6) < 0.01  # 40% noise
    val = DatasetIndex.load(str(tiny_data / "val"))
    assert val.clean_flags().all()  # the validation split is clean


def test_synthetic_is_deterministic(tmp_path):
    a, _ = make_synthetic(str(tmp_path / "a"), 20, 0, 0.5, 16, seed=5, progress=False)
    b, _ = make_synthetic(str(tmp_path / "b"), 20, 0, 0.5, 16, seed=5, progress=False)
    for pa, pb in zip(a.shard_paths(), b.shard_paths()):
        assert open(pa, "rb").read() == open(pb, "rb").read()


def test_noisy_permutation_never_keeps_own_caption():
    rng = np.random.default_rng(0)
    src, clean = noisy_permutation(1000, 0.3, rng)
    assert (~clean).sum() == 300 and (src[~clean] != np.arange(1000)[~clean]).all()
    assert sorted(src) == list(range(1000))


def test_fit_tokens_matches_open_clip_truncation():
    from open_clip.tokenizer import SimpleTokenizer

    t = SimpleTokenizer()
    text = "a very long caption " * 10
    long = t([text], context_length=77)[0].numpy().astype(np.int32)
    short = t([text], context_length=12)[0].numpy()
    assert (fit_tokens(long, 12) == short).all()
    padded = fit_tokens(t(["hi"], context_length=5)[0].numpy(), 9)
    assert (padded == t(["hi"], context_length=9)[0].numpy()).all()


def _loader(shards, B, train, rank=0, world=1, workers=0, epoch=0, **kw):
    ds = ShardDataset(shards, B, eval_transform(), 32, train=train, seed=1, rank=rank, world_size=world, **kw)
    ds.set_epoch(epoch)
    return TorchLoader(ds, workers, torch.device("cpu"), drop_last=train)


def test_eval_loader_yields_every_sample_once_in_order(tiny_data):
    shards, _ = resolve_data(str(tiny_data / "val"))
    ids = torch.cat([b[2] for b in _loader(shards, 10, train=False)])
    assert ids.tolist() == list(range(64))


def test_train_epoch_covers_every_sample_once_across_ranks_and_workers(tiny_data):
    shards, _ = resolve_data(str(tiny_data / "train"))
    seen = []
    for rank in range(2):
        loader = _loader(shards, 16, train=True, rank=rank, world=2, workers=2, epoch=1)
        batches = list(loader)
        assert all(b[0].shape == (16, 3, 32, 32) and b[1].shape == (16, 32) for b in batches)
        seen += torch.cat([b[2] for b in batches]).tolist()
        seen += [-1] * loader.stats.get("dropped_tail", 0)
    real = [s for s in seen if s >= 0]
    assert len(real) == len(set(real))  # no sample twice
    assert len(seen) == 240  # and every sample either trained or counted as the dropped tail


def test_subset_mask_filters_ids(tiny_data):
    shards, _ = resolve_data(str(tiny_data / "train"))
    mask = np.zeros(240, dtype=bool)
    mask[::3] = True
    loader = _loader(shards, 8, train=False, subset_mask=mask, num_ids=240)
    ids = torch.cat([b[2] for b in loader]).tolist()
    assert sorted(ids) == list(range(0, 240, 3))
    assert loader.stats["not_in_subset"] == 160 and loader.stats.get("bad_samples", 0) == 0


def _jpeg(color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_corrupt_and_truncated_shards_are_counted_not_fatal(tmp_path):
    w = ShardWriter(str(tmp_path / "s"), samples_per_shard=5)
    for i in range(10):
        jpg = b"\xff\xd8 not really a jpeg" if i == 2 else _jpeg()
        w.write(i, jpg, f"caption {i}", None, None)
    idx = w.finish(77, has_tokens=False)
    second = idx.shard_paths()[1]
    data = open(second, "rb").read()
    open(second, "wb").write(data[: len(data) // 2])  # truncate the second shard mid-way
    not_tar = tmp_path / "s" / "junk.tar"
    not_tar.write_bytes(b"this is not a tar file at all" * 10)
    loader = _loader(idx.shard_paths() + [str(not_tar)], 4, train=False)
    ids = torch.cat([b[2] for b in loader]).tolist()
    st = loader.stats
    assert 2 not in ids and st["corrupt_image"] == 1
    assert st["truncated_tar"] == 1 and st["not_a_tar"] == 1
    assert set(ids) <= set(range(10)) and len(ids) >= 5
    assert st["ok"] == len(ids)


def test_csv_shards_skip_missing_image_and_empty_caption(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(6):
        Image.new("RGB", (24, 24), (i * 40, 0, 0)).save(img_dir / f"{i}.jpg")
    Image.new("RGB", (24, 24), (0, 0, 9)).save(img_dir / "p.png")  # a PNG is re-encoded
    rows = [
        ("0.jpg", "red 0"),
        ("1.jpg", ""),
        ("missing.jpg", "x"),
        ("2.jpg", "red 2"),
        ("3.jpg", "red 3"),
        ("4.jpg", "   "),
        ("5.jpg", "red 5"),
        ("p.png", "blue png"),
    ]
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["file", "caption"])
        wr.writerows(rows)
    train, val, skipped = csv_to_shards(
        str(tmp_path / "caps.csv"), str(img_dir), str(tmp_path / "out"), val_fraction=0.2, progress=False
    )
    assert skipped == {"empty_caption": 2, "missing_image": 1}
    assert train.num_samples + val.num_samples == 5
    assert train.skipped == skipped
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dissect_fast.cli",
            "shards",
            "--csv",
            str(tmp_path / "caps.csv"),
            "--images",
            str(img_dir),
            "--out",
            str(tmp_path / "o2"),
            "--csv-caption-key",
            "text",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--csv-caption-key 'text': no such column" in r.stderr


def test_resolve_data_patterns(tiny_data, tmp_path):
    shards, idx = resolve_data(str(tiny_data / "train" / "shard-{000000..000002}.tar"))
    assert len(shards) == 3 and idx is not None and idx.num_samples == 240
    shards, idx = resolve_data(str(tiny_data / "train" / "shard-00000[01].tar"))
    assert len(shards) == 2 and idx.num_samples == 160 and idx.num_ids == 240  # the index restricted to them
    with pytest.raises(FileNotFoundError, match="no shards found"):
        resolve_data(str(tmp_path / "none-*.tar"))


def test_csv_open_clip_layout_needs_no_flags(tmp_path):
    """open_clip's CSV (tab-separated, columns filepath/title) with commas in captions: no key flags needed."""
    from dissect_fast.tools.csv_shards import _read_rows

    p = tmp_path / "train.csv"
    p.write_text("filepath\ttitle\na.jpg\ta dog, a ball, and a park\nb.jpg\tone, two, three, four\n")
    assert _read_rows(str(p), None, None, None) == [
        ("a.jpg", "a dog, a ball, and a park"),
        ("b.jpg", "one, two, three, four"),
    ]
    q = tmp_path / "cc3m.csv"  # the CC3M / CyCLIP convention: comma-separated file,caption
    q.write_text('file,caption\nx.jpg,"a cat, sitting"\n')
    assert _read_rows(str(q), None, None, None) == [("x.jpg", "a cat, sitting")]
