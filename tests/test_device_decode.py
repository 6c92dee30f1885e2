"""``--data-backend gpu`` (workers ship encoded bytes, the training device decodes and transforms) on ``device="cpu"``
through the same code, and the torch loader's uint8 batches (the device normalises).

Shards are written with webdataset's TarWriter (tests/fixtures_ecosystem.py), the planted faults are its Awkward
members, and the reference for every image is the torch loader with open_clip's own transform.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip import image_transform
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ecosystem import Awkward, encode, img2dataset_shards, make_photo, pixparse_shards  # noqa: E402
from tiny_run import tiny_fit  # noqa: E402

from dissect_fast.data.device_decode import (  # noqa: E402
    DeviceDecodeLoader,
    DeviceTransform,
    EncodedShardDataset,
)
from dissect_fast.data.loader import ShardDataset, TorchLoader  # noqa: E402
from dissect_fast.data.shards import DatasetIndex  # noqa: E402

CPU = torch.device("cpu")
FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-dev"
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def index(root: Path, pattern: str) -> DatasetIndex:
    subprocess.run(
        [sys.executable, "-m", "dissect_fast.cli", "index", pattern, "--out", str(root), "--no-progress"],
        check=True,
        capture_output=True,
    )
    return DatasetIndex.load(str(root))


def loaders(shards, transform, workers: int, train: bool, idx: DatasetIndex | None, batch: int = 16, **kw):
    """(torch loader, gpu-backend loader) over the same shards with the same settings."""
    common = {"train": train, "seed": 3, "shuffle_buffer": 8, **kw}
    if idx is not None:
        common.update(num_ids=idx.num_ids, first_ids=idx.first_ids())
    if not train:
        common["need_ids"] = False
    t = TorchLoader(ShardDataset(shards, batch, transform, 77, **common), workers, CPU, drop_last=train)
    g = DeviceDecodeLoader(
        EncodedShardDataset(shards, batch, None, 77, **common),
        DeviceTransform.from_transform(transform),
        workers,
        CPU,
        drop_last=train,
        seed=3,
    )
    return t, g


def run_pass(loader, epoch: int = 0):
    loader.set_epoch(epoch)
    batches = list(loader)
    return batches, {k: v for k, v in loader.stats.items() if v}


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    """img2dataset shards with every planted fault (PNG as jpg, CMYK, 1x1, no txt, random bytes, a cut tar)."""
    root = tmp_path_factory.mktemp("i2d")
    s = img2dataset_shards(root, 3, 40, image_size=64, seed=1, awkward=Awkward.every_kind())
    return s, index(root, str(root))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two pixparse-style shards of 400-500 px photo-like JPEGs (sizes and aspect ratios mixed)."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    sizes = [(480, 360), (400, 500), (450, 450), (500, 281)]
    paths = []
    for si in range(2):
        path = root / f"cc3m-train-{si:04d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(12):
                im, cap = make_photo(rng, sizes[i % len(sizes)])
                w.write({"__key__": f"{si * 12 + i:09d}", "jpg": encode(im), "txt": cap})
        paths.append(str(path))
    return paths, index(root, str(root / "cc3m-train-{0000..0001}.tar"))


# ----------------------------------------------------------------------------- transforms
def test_eval_transform_matches_the_torch_loader_within_resize_tolerance(photos):
    """The eval transform (shorter side to 224, centre crop, normalise) decoded by torchvision and resized on the
    tensor matches PIL's decode + open_clip's transform: after undoing the normalisation, mean |diff| < 0.05/255 and
    max |diff| <= 2/255 (measured here: 0.003/255 and 1/255, rounding in the bicubic resize)."""
    shards, idx = photos
    t, g = loaders(shards, image_transform(224, is_train=False), 0, False, idx, batch=8)
    (tb, _), (gb, _) = run_pass(t), run_pass(g)
    a, b = torch.cat([x[0] for x in tb]), torch.cat([x[0] for x in gb])
    assert torch.equal(torch.cat([x[2] for x in tb]), torch.cat([x[2] for x in gb]))
    assert a.shape == b.shape == (24, 3, 224, 224) and b.dtype == torch.float32
    diff = ((a - b) * STD).abs()  # in [0, 1] pixel units
    assert diff.mean().item() < 0.05 / 255, diff.mean().item()
    assert diff.max().item() <= 2 / 255 + 1e-6, diff.max().item()


def test_train_transform_shape_normalisation_and_seed():
    """Train transform: [n, 3, 224, 224] float32 whose un-normalised values lie in [0, 1]; the same seed gives the
    same crops, another seed others; crops keep open_clip's area (0.9-1.0) and aspect ratio (3/4-4/3) ranges."""
    rng = np.random.default_rng(0)
    imgs = []
    for size in [(480, 360), (400, 500), (450, 450), (500, 281), (64, 640)]:
        arr = rng.integers(0, 256, (3, size[1], size[0]), dtype=np.uint8)
        imgs.append(torch.from_numpy(arr))
    tf = DeviceTransform.from_transform(image_transform(224, is_train=True))
    assert (tf.mode, tf.scale, tf.flip_p) == ("crop", (0.9, 1.0), 0.0)
    out = tf(imgs, torch.Generator().manual_seed(1))
    assert out.shape == (5, 3, 224, 224) and out.dtype == torch.float32
    px = out * STD + MEAN
    assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5
    assert torch.equal(out, tf(imgs, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, tf(imgs, torch.Generator().manual_seed(2)))
    sizes = [(int(x.shape[1]), int(x.shape[2])) for x in imgs]
    p = tf.crop_params(sizes * 200, torch.Generator().manual_seed(3)).double()
    hw = torch.tensor(sizes * 200, dtype=torch.float64)
    assert (p[:, 0] >= 0).all() and (p[:, 1] >= 0).all()
    assert (p[:, 0] + p[:, 2] <= hw[:, 0]).all() and (p[:, 1] + p[:, 3] <= hw[:, 1]).all()
    # 500 x 281 and 64 x 640 hold no 90 % crop of ratio 3/4-4/3: torchvision's fallback, centred, nearest ratio
    normal = torch.arange(len(p)) % 5 < 3
    area = p[normal, 2] * p[normal, 3] / (hw[normal, 0] * hw[normal, 1])
    ratio = p[normal, 3] / p[normal, 2]
    assert area.min() > 0.88 and area.max() <= 1.0 and area.std() > 0.01
    assert ratio.min() > 0.74 and ratio.max() < 1.35
    assert p[3].tolist() == [0, (500 - 375) // 2, 281, 375] and p[4].tolist() == [(640 - 85) // 2, 0, 85, 64]


def test_flip_and_unsupported_steps_are_read_off_the_transform():
    from torchvision import transforms as T

    tf = image_transform(32, is_train=True)
    flipped = T.Compose([tf.transforms[0], T.RandomHorizontalFlip(1.0), *tf.transforms[1:]])
    d = DeviceTransform.from_transform(flipped)
    assert d.flip_p == 1.0
    img = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 32, 32)
    plain = DeviceTransform.from_transform(image_transform(32, is_train=False))
    flip_eval = DeviceTransform(image_size=(32, 32), mode="shortest", flip_p=1.0)
    assert torch.equal(flip_eval([img]), plain([img]).flip(-1))
    jitter = T.Compose([*tf.transforms[:1], T.ColorJitter(0.4), *tf.transforms[1:]])
    with pytest.raises(ValueError, match="--data-backend torch"):
        DeviceTransform.from_transform(jitter)


# ----------------------------------------------------------------------------- bad samples
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bad_sample_counts_equal_the_torch_loader(i2d, workers, train):
    """Every planted fault counted with the same reason and shard, the conversions counted alike, the same batch
    sizes (exactly B per training batch) and, in evaluation order, the same ids."""
    s, idx = i2d
    tf = image_transform(32, is_train=train)
    t, g = loaders([str(p) for p in s.shards], tf, workers, train, idx)
    (tb, ts), (gb, gs) = run_pass(t), run_pass(g)
    assert gs == ts
    assert {r: gs.get(r, 0) for r in s.bad} == dict(s.bad)
    assert gs["image_not_jpeg"] == gs["image_converted"] == 1 and gs["ok"] == s.good
    assert [b[0].shape[0] for b in gb] == [b[0].shape[0] for b in tb]
    if train:
        assert {b[0].shape[0] for b in gb} == {16}
    else:
        assert torch.equal(torch.cat([b[2] for b in gb]), torch.cat([b[2] for b in tb]))


def test_repeated_ids_are_judged_after_decoding(tmp_path):
    """A repeated id: the first copy that decodes is kept (a corrupt first copy does not hide a good second one),
    later copies are ``duplicate_id`` whatever their bytes, as on the torch loader."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    good = [encode(make_photo(rng, (48, 40))[0]) for _ in range(4)]
    tiny = encode(Image.new("RGB", (2, 2)))
    cut = good[0][: len(good[0]) // 2]
    rows = [
        (5, cut),
        (5, good[0]),
        (6, good[1]),
        (6, good[2]),
        (7, good[3]),
        (7, tiny),
        (8, b"\x00" * 99),
        (9, good[1]),
    ]
    path = tmp_path / "dups.tar"
    with wds.TarWriter(str(path)) as w:
        for i, (sid, img) in enumerate(rows):
            w.write({"__key__": f"{i:04d}", "jpg": img, "txt": "a photo", "id": int(sid).to_bytes(8, "little")})
    stats = []
    for loader in loaders(
        [str(path)], image_transform(32, is_train=True), 0, True, None, batch=2, num_ids=10, shuffle_buffer=1
    ):
        batches, st = run_pass(loader)
        stats.append(st)
        assert sorted(torch.cat([b[2] for b in batches]).tolist()) == [5, 6, 7, 9]
    assert stats[0] == stats[1]
    assert (stats[1]["duplicate_id"], stats[1]["corrupt_image"], stats[1]["ok"]) == (2, 2, 4)


# ----------------------------------------------------------------------------- uint8 torch loader
def test_torch_loader_ships_uint8_and_normalises_on_the_device(photos):
    """Workers ship uint8 (150,528 bytes a 224 px sample instead of float32's 602,112) and the batch the trainer
    gets is bit-identical to open_clip's float transform applied in the worker (the old path)."""
    shards, idx = photos
    tf = image_transform(224, is_train=False)
    ds = ShardDataset(shards, 8, tf, 77, train=False, need_ids=False, first_ids=idx.first_ids())
    kind, imgs, toks, ids, _ = next(iter(ds))
    assert imgs.dtype == torch.uint8 and imgs[0].nbytes == 3 * 224 * 224 == 150_528
    out = next(iter(TorchLoader(ds, 0, CPU, drop_last=False)))[0]
    ref = ShardDataset(shards, 8, lambda im: tf(im), 77, train=False, need_ids=False, first_ids=idx.first_ids())
    kind, ref_imgs, *_ = next(iter(ref))  # a plain callable is not split: the float path
    assert ref_imgs.dtype == torch.float32 and ref_imgs[0].nbytes == 602_112
    assert out.dtype == torch.float32 and torch.equal(out, ref_imgs)


# ----------------------------------------------------------------------------- backend choice and training
def test_auto_backend_choice_is_logged(tmp_path, monkeypatch, caplog):
    """auto: torch on a CPU device; on CUDA without DALI the gpu backend; each choice logged in one line."""
    from dissect_fast.config import config_from_args
    from dissect_fast.data import dali_loader
    from dissect_fast.data.pipeline import TrainData
    from dissect_fast.training.distributed import DistInfo

    s = pixparse_shards(tmp_path / "pix", 80, 40, image_size=32, seed=0)
    index(tmp_path / "pix", s.pattern)
    cfg = config_from_args(["--train-data", s.pattern, "--batch-size", "8", "--logs", str(tmp_path / "l")])
    monkeypatch.setattr(dali_loader, "dali_unavailable_reason", lambda: "no module named nvidia.dali")
    caplog.set_level(logging.INFO, logger="dissect_fast")
    got = {dev: TrainData(cfg, DistInfo(), torch.device(dev), None, "micro-vit").backend for dev in ("cpu", "cuda")}
    assert got == {"cpu": "torch", "cuda": "gpu"}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data backend:")]
    assert lines == [
        "data backend: torch (auto: cpu device)",
        "data backend: gpu (auto: CUDA device, DALI not usable (no module named nvidia.dali))",
    ]


def flickr_shards(root: Path, n: int = 80, per_shard: int = 40) -> str:
    """``n`` flickr8k-dev photos and their first captions as pixparse-style shards (jpg + txt)."""
    import csv

    import webdataset as wds

    caps: dict[str, str] = {}
    with open(FLICKR / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["image"], row["caption"])
    names = sorted(caps)[:n]
    root.mkdir(parents=True, exist_ok=True)
    for si in range(n // per_shard):
        with wds.TarWriter(str(root / f"cc3m-train-{si:04d}.tar")) as w:
            for i, name in enumerate(names[si * per_shard : (si + 1) * per_shard]):
                data = (FLICKR / "images" / name).read_bytes()
                w.write({"__key__": f"{si * per_shard + i:09d}", "jpg": data, "txt": caps[name]})
    return str(root / f"cc3m-train-{{0000..{n // per_shard - 1:04d}}}.tar")


@pytest.mark.parametrize("source", ["pixparse", "flickr8k-dev"])
def test_tiny_run_trains_with_the_gpu_backend_on_cpu(tmp_path, source):
    """``--data-backend gpu`` on a CPU device: DISSect-momentum scores and trains every step on B decoded here,
    and a validation pass reads the eval transform; nothing counted bad."""
    if source == "pixparse":
        pattern = pixparse_shards(tmp_path / "data", 120, 40, image_size=64, seed=0).pattern
    else:
        if not (FLICKR / "captions.csv").is_file():
            pytest.skip(f"{FLICKR} is not there")
        pattern = flickr_shards(tmp_path / "data")
    index(tmp_path / "data", pattern)
    t, metrics = tiny_fit(
        tmp_path / "logs",
        "gpu",
        "--train-data",
        pattern,
        "--val-data",
        pattern,
        "--data-backend",
        "gpu",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--select-strategy",
        "dissect-momentum",
        "--select-rate",
        "0.5",
    )
    m = metrics[-1]
    assert t.data_backend == "gpu"
    assert m["step"] == t.steps_per_epoch >= 2 and m["select/trained_samples"] == t.steps_per_epoch * 20
    assert m["data/bad_samples"] == 0 and np.isfinite(m["train_loss"])
    assert "val/image_to_text_R@1" in m
    assert json.loads((tmp_path / "logs" / "gpu" / "config.json").read_text())["data"]["data_backend"] == "gpu"


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_decode_matches_cpu_and_guards_the_stream():
    """nvjpeg's batch equals libjpeg's within +-3 (IDCT rounding); and the decoder never writes into a block the
    training stream still reads (pytorch/vision#9606's pattern: queue reads of tensors, free them, decode)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from dissect_fast.data.device_decode import FAST, Decoder

    dev = torch.device("cuda", 0)
    rng = np.random.default_rng(0)
    datas = [torch.frombuffer(bytearray(encode(make_photo(rng, (480, 360))[0])), dtype=torch.uint8) for _ in range(32)]
    cpu, _ = Decoder(CPU)(datas, [FAST] * len(datas))
    dec = Decoder(dev)
    gpu, _ = dec(datas, [FAST] * len(datas))
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and (a.int() - b.cpu().int()).abs().max() <= 3
    bad = 0
    for _ in range(20):
        xs = [torch.full((3, 360, 480), 7, dtype=torch.uint8, device=dev) for _ in range(32)]
        torch.cuda._sleep(20_000_000)  # keeps the reads below queued while the decode runs
        sums = [x.sum(dtype=torch.int64) for x in xs]
        del xs
        imgs, _ = dec(datas, [FAST] * len(datas))
        torch.cuda.synchronize()
        bad += sum(int(s) != 7 * 3 * 360 * 480 for s in sums)
        del imgs
    assert bad == 0
