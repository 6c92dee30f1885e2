"""The data layer on webdataset: one set of sample rules for the torch loader and the index tool, shards
written by webdataset's own TarWriter, URLs and ``::`` lists, shorter and resampled epochs."""

import io
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dissect_fast.data import samples
from dissect_fast.data.index import index_shards, scan_shard
from dissect_fast.data.loader import ShardDataset, TorchLoader
from dissect_fast.data.shards import check_ids_known, resolve_data, shard_stem


def _jpeg(size=(24, 20), seed=0, mode="RGB", fmt="JPEG"):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _transform():
    from open_clip import image_transform

    return image_transform(16, is_train=False)


def _write(path, rows):
    """A shard written by webdataset's TarWriter (what pixparse / img2dataset-style tools produce)."""
    with wds.TarWriter(str(path)) as w:
        for row in rows:
            w.write(row)


def _pixparse(d, n_shards=3, per_shard=20, start=0, prefix="cc3m-train"):
    paths, k = [], start
    for s in range(n_shards):
        rows = []
        for _ in range(per_shard):
            rows.append({"__key__": f"{k:09d}", "jpg": _jpeg(seed=k), "txt": f"photo {k}"})
            k += 1
        paths.append(d / f"{prefix}-{s:04d}.tar")
        _write(paths[-1], rows)
    return [str(p) for p in paths]


def _loader(shards, B, train, index=None, workers=0, **kw):
    ds = ShardDataset(
        shards,
        B,
        _transform(),
        77,
        train=train,
        seed=3,
        first_ids=index.first_ids() if index is not None else None,
        **kw,
    )
    return TorchLoader(ds, workers, torch.device("cpu"), drop_last=train)


def test_awkward_shard_same_verdicts_in_loader_and_index(tmp_path):
    """Every kind of sample the ecosystem produces gets the same verdict and id from both readers."""
    rows = [
        {"__key__": "a0", "jpg": _jpeg(), "txt": "ok"},
        {"__key__": "a1", "jpg": _jpeg(fmt="PNG"), "txt": "png under jpg"},  # converted, not bad
        {"__key__": "a2", "jpg": _jpeg(mode="CMYK"), "txt": "cmyk"},  # converted, not bad
        {"__key__": "a3", "jpg": _jpeg(size=(1, 1)), "txt": "tiny"},  # tiny_image
        {"__key__": "a4", "jpg": _jpeg(), "json": b"{}"},  # no caption: missing_field
        {"__key__": "a5", "jpg": b"\xff\xd8\xff garbage" * 9, "txt": "corrupt"},  # corrupt_image
        {"__key__": "a6", "txt": "no image"},  # missing_field
        {"__key__": "a7", "jpg": _jpeg(), "txt": "   "},  # bad_caption
        {"__key__": "dir/a8", "jpg": _jpeg(), "txt": "in a folder"},
    ]
    shard = tmp_path / "000.tar"
    _write(shard, rows)
    with tarfile.open(shard, "a") as tf:  # members webdataset skips, and a repeated field
        for name, data in (("__meta__", b"x"), ("README", b"no extension"), ("dir/a8.txt", b"again")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    idx = index_shards([str(shard)], str(tmp_path), verify="decode", workers=1, progress=False)
    assert idx.shards[0].first_id == 0 and idx.num_samples == 4
    loader = _loader([str(shard)], 3, train=False, index=idx)
    ids = sorted(int(i) for b in loader for i in b[2])
    assert ids == [0, 1, 2, 8]  # first_id + position
    st = loader.stats
    want = {"tiny_image": 1, "missing_field": 2, "corrupt_image": 1, "bad_caption": 1}
    assert {k: st[k] for k in want} == want and st["bad_samples"] == 5
    assert {k: idx.skipped[k] for k in want} == want and idx.skipped["bad_samples"] == 5
    assert st["image_not_jpeg"] == 1 and st["image_converted"] == 1 and st["duplicate_member"] == 1


def test_truncated_and_empty_shards_same_reason_everywhere(tmp_path):
    shards = _pixparse(tmp_path, n_shards=2, per_shard=10)
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: int(len(data) * 0.6)])
    empty = tmp_path / "cc3m-train-0002.tar"
    empty.write_bytes(b"")
    paths = shards + [str(empty)]
    scans = [scan_shard(p, "decode") for p in paths]
    st = Counter()
    for p in paths:
        list(samples.iter_shard_file(p, st))
    assert scans[1].skipped["truncated_tar"] == st["truncated_tar"] == 1
    assert scans[2].skipped["not_a_tar"] == st["not_a_tar"] == 1
    assert 0 < scans[1].count < 10


def test_pixparse_shards_need_the_index_for_ids(tmp_path):
    shards = _pixparse(tmp_path)
    with pytest.raises(samples.MissingIdsError, match="dissect-fast index"):
        check_ids_known(shards, None)
    index_shards(shards, str(tmp_path), verify="header", workers=1, progress=False)
    got, idx = resolve_data(str(tmp_path / "cc3m-train-{0000..0002}.tar"))
    assert (
        got == shards
        and idx.num_samples == 60
        and idx.first_ids() == {"cc3m-train-0000": 0, "cc3m-train-0001": 20, "cc3m-train-0002": 40}
    )
    loader = _loader(shards, 8, train=True, index=idx, num_ids=idx.num_ids)
    seen = [int(i) for b in loader for i in b[2]]
    assert len(seen) + loader.stats["dropped_tail"] == 60 and len(set(seen)) == len(seen)
    # two shards of three: the same index, restricted; ids keep their meaning
    part, sub = resolve_data(str(tmp_path / "cc3m-train-000[12].tar"))
    assert sub.num_samples == 40 and sub.num_ids == 60
    ids = sorted(int(i) for b in _loader(part, 8, train=False, index=sub) for i in b[2])
    assert ids == list(range(20, 60))


def test_pipe_urls_and_joined_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _pixparse(tmp_path / "a", n_shards=2, per_shard=5)
    b = _pixparse(tmp_path / "b", n_shards=1, per_shard=5, start=100, prefix="cc12m")
    idx = index_shards(a + b, str(tmp_path), verify="header", workers=1, progress=False)
    spec = f"pipe:cat {tmp_path}/a/cc3m-train-{{0000..0001}}.tar::{b[0]}"
    shards, found = resolve_data(spec, index=str(tmp_path))
    assert shards[0] == f"pipe:cat {tmp_path}/a/cc3m-train-0000.tar" and len(shards) == 3
    assert shard_stem(shards[1]) == "cc3m-train-0001" and found.num_samples == 15
    ids = sorted(int(i) for b_ in _loader(shards, 4, train=False, index=found) for i in b_[2])
    assert ids == sorted(int(i) for i in np.concatenate([np.arange(s.first_id, s.first_id + 5) for s in idx.shards]))
    assert len(ids) == 15 and len(set(ids)) == 15


def test_short_epoch_reads_only_part_of_the_data(tmp_path):
    shards = _pixparse(tmp_path, n_shards=3, per_shard=40)
    idx = index_shards(shards, str(tmp_path), verify="none", workers=1, progress=False)
    loader = _loader(shards, 8, train=True, index=idx, num_ids=idx.num_ids, shuffle_buffer=8)
    loader.set_epoch(0)
    it = iter(loader)
    got = [next(it) for _ in range(2)]
    loader.close()
    assert all(b[2].shape == (8,) for b in got)
    assert loader.stats["ok"] < 40  # decoded: what was consumed plus one batch of look-ahead, not the pass


def test_resampled_epochs_are_seeded_and_differ(tmp_path):
    shards = _pixparse(tmp_path, n_shards=3, per_shard=10)
    idx = index_shards(shards, str(tmp_path), verify="none", workers=1, progress=False)

    def epoch(e, n=5):
        ld = _loader(shards, 6, train=True, index=idx, num_ids=idx.num_ids, resampled=True, shuffle_buffer=4)
        ld.set_epoch(e)
        it = iter(ld)
        out = [next(it)[2].tolist() for _ in range(n)]
        ld.close()
        return out

    first = epoch(0)
    assert first == epoch(0) and first != epoch(1)  # deterministic per epoch, new draws every epoch
    flat = [i for b in first for i in b]
    assert len(flat) == 30 and set(flat) <= set(range(30))


def test_index_json_keeps_first_ids(tmp_path):
    shards = _pixparse(tmp_path, n_shards=2, per_shard=4)
    index_shards(shards, str(tmp_path), verify="none", workers=1, progress=False)
    from dissect_fast.data.shards import DatasetIndex

    again = DatasetIndex.load(str(tmp_path))
    assert [s.first_id for s in again.shards] == [0, 4]
    assert os.path.isfile(tmp_path / "cc3m-train-0000.idx")


def test_resampled_stream_of_unreadable_shards_stops(tmp_path):
    junk = [tmp_path / f"junk-{i}.tar" for i in range(2)]
    for j in junk:
        j.write_bytes(b"<html>404</html>" * 30)
    ld = _loader([str(j) for j in junk], 4, train=True, num_ids=10, resampled=True)
    with pytest.raises(RuntimeError, match="no sample in the last"):
        next(iter(ld))
