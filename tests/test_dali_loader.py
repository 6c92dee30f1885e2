"""The DALI loader against the torch loader: same pixels, ids and tokens; exact epochs; bad data skipped.

The same pipeline definition runs on the CPU here (``device_id=None``) and with ``device="mixed"``
decoding in the ``gpu`` tests.
"""

import io
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from dissect_fast.data.dali_loader import dali_unavailable_reason

_reason = dali_unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

B = 16


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """200 samples of 32 px in 4 shards (ShardWriter writes the .idx files)."""
    from dissect_fast.tools.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("dali_synth")
    make_synthetic(
        str(root), num_train=200, num_val=0, noise=0.4, image_size=32, seed=5, samples_per_shard=50, progress=False
    )
    return root / "train"


def _shards(d):
    return sorted(str(p) for p in d.glob("*.tar"))


def _transform(size, train=False):
    import open_clip

    return open_clip.image_transform(size, is_train=train)


def _torch_batches(shards, size, ctx=77, train=False, rank=0, world=1, first_ids=None):
    from dissect_fast.data.loader import ShardDataset, TorchLoader

    ds = ShardDataset(
        shards, B, _transform(size, train), ctx, train=train, rank=rank, world_size=world, first_ids=first_ids
    )
    loader = TorchLoader(ds, 0, torch.device("cpu"), drop_last=train)
    return list(loader), loader.stats


def _dali(shards, size, train=False, ctx=77, **kw):
    from dissect_fast.data.dali_loader import DaliLoader, Preprocess

    kw.setdefault("workers", 2)
    kw.setdefault("device", "cpu")
    return DaliLoader(shards, B, ctx, Preprocess.from_transform(_transform(size, train)), train=train, **kw)


def _by_id(batches):
    out = {}
    for imgs, toks, ids in batches:
        for i, sid in enumerate(ids.tolist()):
            assert sid not in out, f"id {sid} twice"
            out[sid] = (imgs[i], toks[i])
    return out


def _pixel_diff(a, b, std):
    """|a - b| in 0..1 pixel units (undo the normalisation's division by std)."""
    s = torch.tensor(std).view(3, 1, 1)
    return ((a - b) * s).abs()


# ----------------------------------------------------------------------------- pixels, ids, tokens
def test_eval_matches_torch_loader_native_size(synth):
    """32 px images at image size 32: the resize is the identity, so this checks decode + normalise."""
    from open_clip.constants import OPENAI_DATASET_STD

    shards = _shards(synth)
    dali = _by_id(_dali(shards, 32))
    ref = _by_id(_torch_batches(shards, 32)[0])
    assert sorted(dali) == sorted(ref) == list(range(200))
    diffs = torch.stack([_pixel_diff(dali[i][0], ref[i][0], OPENAI_DATASET_STD) for i in ref])
    assert dali[0][0].dtype == torch.float32 and dali[0][0].shape == (3, 32, 32)
    assert diffs.max() <= 1 / 255 + 1e-5, f"max diff {diffs.max() * 255:.3f}/255"
    for i in ref:
        assert torch.equal(dali[i][1], ref[i][1]) and dali[i][1].dtype == torch.int64


def _write_tar(path, samples, truncate_to=None):
    """A webdataset tar from dicts of ext -> bytes (``__key__`` names the sample)."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)


def _jpeg(w, h, seed, quality=90):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (3 + c) + y / (5 - c) + seed) for c in range(3)], -1) * 90 + 128
    img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _samples(n, first_id, size=(40, 30), with_id=True, with_tok=True):
    from dissect_fast.data.shards import encode_id, tokenize, tokenizer_for

    caps = [f"a picture number {first_id + i} of smooth {'red' if i % 2 else 'blue'} waves" for i in range(n)]
    toks = tokenize(tokenizer_for(77), caps, 77)
    out = []
    for i in range(n):
        s = {"__key__": f"{first_id + i:09d}", "jpg": _jpeg(*size, seed=first_id + i), "txt": caps[i].encode()}
        if with_tok:
            s["tok"] = toks[i].astype("<i4").tobytes()
        if with_id:
            s["id"] = encode_id(first_id + i)
        out.append(s)
    return out


def test_eval_resize_from_40x30(tmp_path):
    """Resize(shortest side, bicubic) + CenterCrop: same sizes and crop offsets as torchvision; PIL's and
    DALI's antialiased bicubic filters differ slightly, so the bound is looser than the decode check."""
    from open_clip.constants import OPENAI_DATASET_STD

    from dissect_fast.data.index import index_shards

    _write_tar(tmp_path / "r-0.tar", _samples(24, 0, size=(40, 30)))
    _write_tar(tmp_path / "r-1.tar", _samples(24, 100, size=(30, 43)))  # portrait, odd crop offset
    shards = _shards(tmp_path)
    index_shards(shards, str(tmp_path), verify="decode", workers=1, progress=False)
    dali = _by_id(_dali(shards, 32))
    ref = _by_id(_torch_batches(shards, 32)[0])
    assert sorted(dali) == sorted(ref)
    d = torch.stack([_pixel_diff(dali[i][0], ref[i][0], OPENAI_DATASET_STD) for i in ref])
    print(f"resize 40x30 / 30x43 -> 32: max |diff| {d.max() * 255:.2f}/255, mean {d.mean() * 255:.3f}/255")
    assert d.mean() < 1 / 255 and d.max() < 24 / 255


@pytest.mark.parametrize("ctx", [16, 77, 100])
def test_tokens_fit_context_length(synth, ctx):
    from dissect_fast.data.dali_loader import fit_tokens_batch
    from dissect_fast.data.loader import fit_tokens

    shards = _shards(synth)[:1]
    dali = _by_id(_dali(shards, 32, ctx=ctx))
    ref = _by_id(_torch_batches(shards, 32, ctx=ctx)[0])
    assert all(torch.equal(dali[i][1], ref[i][1]) for i in ref)
    assert next(iter(dali.values()))[1].shape == (ctx,)
    rows = np.random.default_rng(0).integers(0, 5, (9, 12)).astype(np.int64)
    rows[:3, -3:] = 0
    for n in (5, 12, 20):
        got = fit_tokens_batch(torch.from_numpy(rows), n).numpy()
        assert np.array_equal(got, np.stack([fit_tokens(r, n) for r in rows]))


# ----------------------------------------------------------------------------- epochs and sharding
def test_every_sample_once_per_epoch_2_ranks_x_2_workers(synth):
    shards = _shards(synth)
    seen = Counter()
    for rank in range(2):
        for b in _dali(shards, 32, rank=rank, world_size=2, workers=2):
            seen.update(b[2].tolist())
    assert sorted(seen) == list(range(200)) and set(seen.values()) == {1}

    # training: shuffled, short last batch dropped (no duplicates to fill it), counted
    epochs = []
    for epoch in (0, 1, 0):
        ids_all, stats = [], Counter()
        for rank in range(2):
            ld = _dali(shards, 32, train=True, rank=rank, world_size=2, seed=1)
            ld.set_epoch(epoch)
            batches = list(ld)
            assert all(b[0].shape == (B, 3, 32, 32) for b in batches)
            assert len(batches) == 100 // B
            ids_all += [i for b in batches for i in b[2].tolist()]
            stats.update(ld.stats)
        assert len(ids_all) == len(set(ids_all)) == 2 * (100 // B) * B
        assert stats["ok"] == 200 and stats["dropped_tail"] == 200 - len(ids_all)
        epochs.append(ids_all)
    assert epochs[0] != epochs[1], "epochs must be shuffled differently"
    assert epochs[0] == epochs[2], "the epoch number alone must determine the order (resume)"


def test_subset_mask(synth):
    shards = _shards(synth)
    mask = np.zeros(200, dtype=bool)
    mask[::3] = True
    ld = _dali(shards, 32, subset_mask=mask, num_ids=200)
    ids = sorted(i for b in ld for i in b[2].tolist())
    assert ids == list(range(0, 200, 3))
    assert ld.stats["not_in_subset"] == 200 - len(ids) and ld.stats["bad_samples"] == 0


# ----------------------------------------------------------------------------- bad data
def test_corrupt_jpeg_truncated_tar_missing_field(tmp_path):
    from dissect_fast.data.index import main_index
    from dissect_fast.data.shards import DatasetIndex

    good = _samples(40, 0)
    bad = _samples(30, 1000)
    bad[3]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 20  # corrupt
    bad[7]["jpg"] = bad[7]["jpg"][: len(bad[7]["jpg"]) // 2]  # truncated JPEG
    del bad[11]["id"]  # missing field
    del bad[12]["jpg"]
    _write_tar(tmp_path / "s-0.tar", good)
    _write_tar(tmp_path / "s-1.tar", bad)
    _write_tar(tmp_path / "s-2.tar", _samples(30, 2000))
    size = os.path.getsize(tmp_path / "s-2.tar")
    with open(tmp_path / "s-2.tar", "r+b") as f:  # cut in the middle of the 21st sample's jpg
        f.truncate(int(size * 0.7))
    shards = _shards(tmp_path)
    assert main_index([*shards, "--out", str(tmp_path / "idx"), "--no-progress", "--workers", "1"]) == 0
    index = DatasetIndex.load(str(tmp_path / "idx"))

    ref_batches, ref_stats = _torch_batches(shards, 32)
    ref_ids = sorted(int(i) for b in ref_batches for i in b[2])
    ld = _dali(index.shard_paths(), 32, index=index)
    got = sorted(int(i) for b in ld for i in b[2])
    assert got == ref_ids and index.num_samples == len(got)
    assert {1003, 1007, 1011, 1012} & set(got) == set()
    assert ld.stats["bad_samples"] == ref_stats["bad_samples"] > 0
    for reason in ("corrupt_image", "missing_field"):  # the cut sample lost its id: missing_field in both
        assert ld.stats[reason] == ref_stats[reason] > 0, reason
    assert ld.stats["ok"] == ref_stats["ok"] == len(got)


def test_cut_inside_last_read_component(tmp_path):
    """A tar cut inside a field DALI reads (here tok, after id) must not reach DALI's reader."""
    from dissect_fast.data.index import index_shards

    samples = _samples(12, 0)
    for s in samples:  # move tok last
        s["tok"] = s.pop("tok")
    _write_tar(tmp_path / "t-0.tar", samples)
    with tarfile.open(tmp_path / "t-0.tar") as tf:
        last_tok = [m for m in tf.getmembers() if m.name.endswith(".tok")][-1]
    with open(tmp_path / "t-0.tar", "r+b") as f:
        f.truncate(last_tok.offset_data + 100)  # a multiple of 4: looks like a shorter token row
    idx = index_shards(_shards(tmp_path), str(tmp_path), verify="decode", workers=1, progress=False)
    ld = _dali(_shards(tmp_path), 32, index=idx)
    assert sorted(i for b in ld for i in b[2].tolist()) == list(range(11))
    assert ld.stats["truncated_tar"] == 1 and ld.stats["bad_samples"] == 1


def test_decode_failure_at_run_time_is_counted_not_fatal(tmp_path):
    """An .idx built without image checks lets a corrupt JPEG through: DALI fails mid-epoch; the loader
    ends the epoch (counted), re-checks the shards by decoding, and the next epoch runs clean."""
    from dissect_fast.data.index import build_shard_index

    samples = _samples(40, 0)
    samples[20]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 20
    _write_tar(tmp_path / "c-0.tar", samples)
    build_shard_index(str(tmp_path / "c-0.tar"), verify="none")
    ld = _dali(_shards(tmp_path), 32)
    first = [i for b in ld for i in b[2].tolist()]
    assert ld.stats["dali_error"] == 1 and len(first) < 40
    assert ld.stats["bad_samples"] == 40 - len(first) and ld.stats["ok"] == len(first)
    ld.set_epoch(1)
    second = sorted(i for b in ld for i in b[2].tolist())
    assert second == [i for i in range(40) if i != 20]
    assert ld.stats["corrupt_image"] == 1 and ld.stats["bad_samples"] == 1 and "dali_error" not in ld.stats


def test_decode_failure_recheck_of_a_filtered_shard_with_assigned_ids(tmp_path):
    """The re-check after a DALI failure of a shard without id field whose .idx is a filtered copy (here: an id
    out of range) and whose sidecar is in the index directory, not beside the tar: its first_id is kept."""
    from dissect_fast.data.index import index_shards

    (tmp_path / "data").mkdir()
    samples = _samples(40, 0, with_id=False)
    samples[20]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 20
    _write_tar(tmp_path / "data" / "c-0.tar", samples)
    shards = _shards(tmp_path / "data")
    idx = index_shards(shards, str(tmp_path / "idx"), verify="none", workers=1, progress=False)
    ld = _dali(shards, 32, index=idx, num_ids=39)
    first = [i for b in ld for i in b[2].tolist()]
    assert ld.stats["dali_error"] == 1 and len(first) < 39
    ld.set_epoch(1)
    assert sorted(i for b in ld for i in b[2].tolist()) == [i for i in range(39) if i != 20]
    assert ld.stats["corrupt_image"] == 1 and ld.stats["id_out_of_range"] == 1 and "dali_error" not in ld.stats


def test_assigned_ids_and_txt_captions(tmp_path):
    """Shards without id and tok fields: ids first_id + position, captions tokenised from txt."""
    from dissect_fast.data.index import index_shards

    a = _samples(20, 0, with_id=False, with_tok=False)
    b = _samples(25, 500, with_id=False, with_tok=False)
    del b[4]["jpg"]  # a bad sample still takes its position
    _write_tar(tmp_path / "x-0.tar", a)
    _write_tar(tmp_path / "x-1.tar", b)
    shards = _shards(tmp_path)
    idx = index_shards(shards, str(tmp_path), verify="header", workers=1, progress=False)
    assert idx.num_samples == 44 and (idx.id_min, idx.id_max) == (0, 44) and not idx.has_tokens
    first = idx.first_ids()
    assert first == {"x-0": 0, "x-1": 20}
    dali = _by_id(_dali(shards, 32, index=idx))
    ref = _by_id(_torch_batches(shards, 32, first_ids=first)[0])
    assert sorted(dali) == sorted(ref) == [i for i in range(45) if i != 24]
    assert all(torch.equal(dali[i][1], ref[i][1]) for i in ref)


def test_idx_agrees_with_wds2idx(synth, tmp_path):
    """Our .idx offsets are the ones DALI's own wds2idx tool writes (components renamed, fields subset)."""
    wds2idx = pytest.importorskip("wds2idx")
    from dissect_fast.data.index import idx_paths

    shard = _shards(synth)[0]
    ref = str(tmp_path / "ref.idx")
    with wds2idx.IndexCreator(shard, ref, verbose=False) as ic:
        ic.create_index()
    with open(idx_paths(shard)[0]) as f:
        ours = f.read().splitlines()
    with open(ref) as f:
        theirs = f.read().splitlines()
    assert ours[0] == theirs[0]
    for o, t in zip(ours[1:], theirs[1:]):
        t = t.split()
        tc = {t[i]: (t[i + 1], t[i + 2]) for i in range(0, len(t), 4)}
        o = o.split()
        oc = {o[i]: (o[i + 1], o[i + 2]) for i in range(0, len(o), 4)}
        assert oc["img"] == tc["jpg"] and oc["tok"] == tc["tok"] and oc["id"] == tc["id"]


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_decode_matches_cpu(synth):
    from open_clip.constants import OPENAI_DATASET_STD

    shards = _shards(synth)
    cpu = _by_id(_dali(shards, 32))
    gpu_batches = list(_dali(shards, 32, device="cuda"))
    assert gpu_batches[0][0].is_cuda and gpu_batches[0][1].is_cuda and gpu_batches[0][2].is_cuda
    gpu = _by_id([tuple(t.cpu() for t in b) for b in gpu_batches])
    assert sorted(gpu) == sorted(cpu)
    d = torch.stack([_pixel_diff(gpu[i][0], cpu[i][0], OPENAI_DATASET_STD) for i in cpu])
    print(f"GPU vs CPU decode: max |diff| {d.max() * 255:.2f}/255, mean {d.mean() * 255:.3f}/255")
    assert d.mean() < 1 / 255
    assert all(torch.equal(gpu[i][1], cpu[i][1]) for i in cpu)
    train = list(_dali(shards, 32, train=True, device="cuda"))
    assert len(train) == 200 // B and train[0][0].dtype == torch.float32 and train[0][0].is_cuda
