"""Wrong metadata cannot train silently (issue 22, item 6): index.json counts checked against what an epoch read,
duplicate ids caught whatever the worker count, DALI .idx files checked against their tar."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from fixtures_ecosystem import encode, make_photo, photo_sizes, pixparse_shards
from tiny_run import tiny_fit, tiny_trainer

from dissect_fast.data.index import check_idx_pairing, index_shards, load_shard_meta
from dissect_fast.data.loader import ShardDataset, TorchLoader
from dissect_fast.data.pipeline import IndexMismatch
from dissect_fast.data.shards import encode_id, shard_stem


@pytest.fixture
def indexed(tmp_path):
    """240 pixparse-style samples in 3 shards (no id field) and their index: ``tmp_path/data/train``."""
    train = tmp_path / "data" / "train"
    s = pixparse_shards(train, 240, 80, image_size=32, seed=5)
    index_shards([str(p) for p in s.shards], str(train), verify="header", workers=1, progress=False)
    return train


def _edit_index(train, change):
    path = train / "index.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def test_index_count_smaller_than_the_shards_stops_the_run(indexed, tmp_path):
    """count 40 instead of 80 per shard: an epoch used to train 3 steps of 240 samples and drop the rest quietly."""

    def shrink(d):
        for s in d["shards"]:
            s["count"] = 40
        d["num_samples"] = 120

    _edit_index(indexed, shrink)
    with pytest.raises(IndexMismatch, match="dissect-fast index"):
        tiny_fit(tmp_path, "run", data=tmp_path / "data", epochs=1)


def test_overlapping_first_ids_are_refused_at_set_up_with_workers(indexed, tmp_path):
    """Two shards given the same first_id (240 samples under 160 ids) are refused before training, whatever
    --workers (the per-worker duplicate check used to miss them with --workers 2)."""

    def overlap(d):
        d["shards"][1]["first_id"] = d["shards"][0]["first_id"]

    _edit_index(indexed, overlap)
    with pytest.raises(ValueError, match="overlapping ids.*dissect-fast index"):
        tiny_trainer(tmp_path, "run", data=tmp_path / "data", workers=2)


def test_duplicate_ids_across_workers_are_dropped_on_the_main_process(tmp_path):
    """Stored ids 0..39 and 20..59 in two shards read by two workers: each id is yielded once, 20 counted."""
    rng = np.random.default_rng(0)
    shards = []
    for s, start in enumerate((0, 20)):
        shards.append(str(tmp_path / f"dup-{s:04d}.tar"))
        with wds.TarWriter(shards[-1]) as w:
            for i in range(start, start + 40):
                im, cap = make_photo(rng, photo_sizes(32)[i % 4])
                w.write({"__key__": f"{s}-{i:06d}", "jpg": encode(im), "txt": cap, "id": encode_id(i)})
    from open_clip import image_transform

    ds = ShardDataset(shards, 8, image_transform(16, is_train=False), 77, train=True, num_ids=60, shuffle_buffer=1)
    loader = TorchLoader(ds, 2, torch.device("cpu"), drop_last=False)
    loader.set_epoch(0)
    ids = [i for _, _, b in loader for i in b.tolist()]
    assert sorted(ids) == list(range(60))
    assert loader.stats["duplicate_id"] == 20 and loader.stats["ok"] == 60


def test_idx_pointing_a_sample_at_its_neighbours_image_is_detected(indexed):
    shard = str(sorted(indexed.glob("*.tar"))[0])
    idx = indexed / f"{shard_stem(shard)}.idx"
    check_idx_pairing(shard, str(idx))  # the index tool's own output passes
    assert load_shard_meta(shard, [str(indexed)]) is not None
    header, *lines = idx.read_text().splitlines()
    rows = [ln.split() for ln in lines]
    good = list(lines)

    # 1. the image offset and size of the neighbour, the name left as it was
    rows[3][1:3] = rows[4][1:3]
    lines[3] = " ".join(rows[3])
    idx.write_text("\n".join([header, *lines]) + "\n")
    with pytest.raises(ValueError, match="sample 3 does not match"):
        check_idx_pairing(shard, str(idx))
    assert load_shard_meta(shard, [str(indexed)]) is None  # the sidecar's SHA-1: the edited .idx is not used

    # 2. the neighbour's whole image component (offset, size and name)
    lines = list(good)
    r3, r4 = lines[3].split(), lines[4].split()
    lines[3] = " ".join(r4[:4] + r3[4:])
    idx.write_text("\n".join([header, *lines]) + "\n")
    with pytest.raises(ValueError, match="sample 3 mixes members of different samples"):
        check_idx_pairing(shard, str(idx))
