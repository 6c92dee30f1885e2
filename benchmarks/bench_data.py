"""Data loader throughput, side by side on the same photo-sized JPEG shards: the torch loader shipping float32
(the path before uint8 batches) and uint8, the ``gpu`` backend (encoded bytes, decoded on ``--device``: the CPU
here, nvjpeg on CUDA), open_clip's own webdataset pipeline (``open_clip_train.data.get_wds_dataset``) and DALI
(when it imports).

The shards hold 400-500 px photo-like JPEGs (quality 90, 40-100 KB): made from ``shared/data/flickr8k-dev`` photos
when that folder is there (they ship at 160 px: upscaled to 480 px on the longer side, with sensor-like noise so the
entropy and file size are a photo's), else generated (smooth colour fields, shapes, texture and noise). Each
provider is timed after a warm-up, the device synchronised around the timed window, and each row records the
bytes a sample costs between the loader workers and the training process. Rows go to
``benchmarks/results/data-<device>-<date>.json`` through ``benchkit`` (device, versions, commit, command).

    python benchmarks/bench_data.py --quick              # 2 CPU cores: about 2-3 minutes
    python benchmarks/bench_data.py                      # CUDA: batch 256, every provider

Target on an H100/H200 with 16 CPU cores: DALI >= 8,000 images/s and >= 3x the torch loader.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # benchmarks/ is not a package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchkit  # noqa: E402

FLICKR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
FLICKR = os.path.join(FLICKR, "flickr8k-dev")
PROVIDERS = ("torch-float", "torch-uint8", "gpu-decode", "open_clip-wds", "dali")

#: versions recorded beside python, torch, open_clip and numpy
MODULES = ("PIL", "nvidia.dali")

TARGET_DALI_IMAGES_S = 8000
TARGET_SPEEDUP = 3.0


def realistic_jpeg(seed: int, size=(400, 300), quality: int = 90) -> bytes:
    """A photo-like JPEG: low-frequency colour field, a few soft shapes, texture and noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] += np.sin(x * fx * 6.3 + y * fy * 6.3 + ph) * rng.uniform(20, 50)
        img[..., c] += rng.uniform(60, 190)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=col)
    pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    arr = np.asarray(pil).astype(np.float32)
    arr += rng.normal(0, 1, (h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w] * 6  # texture
    arr += rng.normal(0, 5.5, arr.shape)  # sensor noise
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def flickr_jpeg(item: tuple[int, str], long_side: int = 480, noise: float = 5.0, quality: int = 90) -> bytes:
    """The ``i``-th flickr8k-dev photo (160 x 160) as a photo-sized JPEG: bicubic upscale to ``long_side``, cropped
    to 4:3 landscape or 3:4 portrait for two in three photos (crop paths see several aspect ratios), then per-pixel
    sensor-like noise seeded by the file name (an upscaled JPEG alone is too smooth: ~15 KB instead of ~60 KB)."""
    from PIL import Image

    i, path = item
    im = Image.open(path).convert("RGB")
    w, h = im.size
    k = long_side / max(w, h)
    im = im.resize((round(w * k), round(h * k)), Image.BICUBIC)
    short = long_side * 3 // 4
    if i % 3 == 1 and im.height > short:
        im = im.crop((0, (im.height - short) // 2, im.width, (im.height - short) // 2 + short))
    elif i % 3 == 2 and im.width > short:
        im = im.crop(((im.width - short) // 2, 0, (im.width - short) // 2 + short, im.height))
    rng = np.random.default_rng(abs(hash(os.path.basename(path))) % (1 << 32))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, noise, (im.height, im.width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _generated(seed: int) -> bytes:
    return realistic_jpeg(seed, size=(480, 360))


def make_shards(out: str, unique: int, samples: int, per_shard: int, workers: int, source: str = "auto") -> dict:
    """``samples`` samples in shards; ``unique`` distinct JPEGs cycled (decoding cost is per sample). ``source``:
    flickr8k-dev photos (``auto`` when the folder is there) or generated ones."""
    from dissect_fast.data.shards import tokenize, tokenizer_for
    from dissect_fast.tools.writer import ShardWriter

    t0 = time.time()
    files = sorted(glob.glob(os.path.join(FLICKR, "images", "*.jpg")))[:unique]
    if source == "auto":
        source = "flickr8k-dev" if len(files) >= unique else "generated"
    with Pool(workers) as pool:
        if source == "flickr8k-dev":
            jpegs = pool.map(flickr_jpeg, list(enumerate(files)), chunksize=16)
        else:
            jpegs = pool.map(_generated, range(unique), chunksize=16)
    caps = [f"a photo number {i} with {['red', 'green', 'blue'][i % 3]} things in it" for i in range(unique)]
    toks = tokenize(tokenizer_for(77), caps, 77)
    w = ShardWriter(out, per_shard, prefix="bench")
    for i in range(samples):
        j = i % unique
        w.write(i, jpegs[j], caps[j], toks[j], None)
    w.finish(77)
    from PIL import Image

    sides = np.array([Image.open(io.BytesIO(j)).size for j in jpegs])
    sizes = np.array([len(j) for j in jpegs])
    return {
        "source": source
        + (
            " (160 px photos upscaled to 480 px, 2 in 3 cropped to 4:3 or 3:4, + noise sigma 5)"
            if source == "flickr8k-dev"
            else " (480x360)"
        ),
        "unique_images": unique,
        "samples": samples,
        "shards": len(w.shards),
        "jpeg_kb_mean": round(sizes.mean() / 1024, 1),
        "jpeg_kb_min": round(sizes.min() / 1024, 1),
        "jpeg_kb_max": round(sizes.max() / 1024, 1),
        "long_side_px": [int(sides.max(1).min()), int(sides.max(1).max())],
        "short_side_px": [int(sides.min(1).min()), int(sides.min(1).max())],
        "quality": 90,
        "gen_s": round(time.time() - t0, 1),
    }


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(loader, device, warmup: int, batches: int) -> dict:
    """images/s over ``batches`` batches after ``warmup`` ones (epochs restart as needed)."""
    epoch, n, seen, t0 = 0, 0, 0, None
    t_start = time.time()
    while n < warmup + batches:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for images, tokens, *_ in loader:  # noqa: B007 -- the last batch is checked after the loop
            n += 1
            if n == warmup:
                _sync(device)
                t0 = time.time()
            elif n > warmup:
                seen += images.shape[0]
            if n >= warmup + batches:
                break
        epoch += 1
    _sync(device)
    dt = time.time() - t0
    if hasattr(loader, "close"):
        loader.close()
    assert images.device.type == device.type and images.dtype.is_floating_point
    return {
        "images_per_s": round(seen / dt, 1),
        "timed_batches": batches,
        "timed_s": round(dt, 3),
        "warmup_batches": warmup,
        "startup_plus_warmup_s": round(t0 - t_start, 2),
        "image_shape": list(images.shape),
        "tokens_shape": list(tokens.shape),
    }


def worker_bytes_per_sample(dataset) -> float:
    """Bytes of one sample's image in what a loader worker ships (its first batch, read here in-process)."""
    first = next(iter(dataset))
    if isinstance(first, tuple) and isinstance(first[0], str):  # ShardDataset: (kind, images or bytes, ..., counts)
        batch = first[1:-1]
        return batch[0].nbytes / batch[-1].shape[0]
    images = first[0]  # open_clip: (images, texts)
    return images.nbytes / images.shape[0]


def short_tag(device_name: str) -> str:
    """A device's part of a result file name here: ``cpu``, or the GPU model's first word (``h100``)."""
    return "cpu" if device_name.startswith("cpu") else device_name.replace("NVIDIA ", "").split()[0].lower()


class _FloatPath:
    """open_clip's transform behind a plain callable: the torch loader cannot split it, so its workers run all of it
    and ship float32 (the loader's path before uint8 batches, kept for transforms with tensor steps)."""

    def __init__(self, tf) -> None:
        self.tf = tf

    def __call__(self, im):
        return self.tf(im)


class _OpenClipLoader:
    """open_clip's own train pipeline (``get_wds_dataset``: webdataset, PIL decode, its transform in the workers,
    float32 batches), batches moved to ``device`` as its trainer does."""

    def __init__(self, shards: list[str], tf, bs: int, workers: int, samples: int, device) -> None:
        import functools
        from types import SimpleNamespace

        import open_clip
        import open_clip_train.data as oc_data
        import webdataset
        from webdataset import tariterators

        # as benchmarks/open_clip_peer.py: webdataset >= 1.0's expander without its end-of-file sample, and only the
        # fields open_clip reads (its default decoders would parse our binary `id` field as text)
        kw = {"eof_value": None} if int(webdataset.__version__.split(".")[0]) >= 1 else {}
        fields = {"jpg", "jpeg", "png", "webp", "txt"}
        oc_data.tar_file_expander = functools.partial(
            tariterators.tar_file_expander, select_files=lambda f: f.rsplit(".", 1)[-1].lower() in fields, **kw
        )
        args = SimpleNamespace(
            train_data="::".join(shards),
            train_num_samples=samples,
            dataset_resampled=False,
            train_data_upsampling_factors=None,
            seed=0,
            batch_size=bs,
            workers=workers,
            world_size=1,
        )
        self.info = oc_data.get_wds_dataset(args, tf, True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
        self.device = device
        self.bytes_per_sample: float | None = None  #: of its images as its workers ship them (first batch)

    def set_epoch(self, epoch: int) -> None:
        self.info.set_epoch(epoch)

    def __iter__(self):
        nb = self.device.type == "cuda"
        for images, texts in self.info.dataloader:
            if self.bytes_per_sample is None:
                self.bytes_per_sample = images.nbytes / images.shape[0]
            yield images.to(self.device, non_blocking=nb), texts.to(self.device, non_blocking=nb)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: about 2-3 minutes on 2 CPU cores")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 (32 with --quick)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 100; 16 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="default 10 (3 with --quick)")
    p.add_argument("--unique", type=int, default=None, help="distinct JPEGs (default 4000; 200 with --quick)")
    p.add_argument("--samples", type=int, default=None, help="samples in the shards (default 32768; 1600 quick)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers and DALI threads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per provider, alternating (median kept)")
    p.add_argument("--source", default="auto", choices=("auto", "flickr8k-dev", "generated"))
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=None,
        help="default 256 (32 quick): our loaders' sample shuffle buffer (per torch worker; per rank for "
        "DALI). Keep it well below samples/workers: a torch worker reads its whole buffer (raw bytes) "
        "before its first batch, so a buffer holding most of the data would let the warm-up pre-read "
        "the timed region",
    )
    p.add_argument("--hw-decoder-load", type=float, default=0.65, help="DALI: share of the hardware JPEG decoder")
    p.add_argument("--data", default=None, help="keep the generated shards here (reused when present)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    a = p.parse_args(argv)
    q = a.quick
    bs = a.batch_size or (32 if q else 256)
    batches, warmup = a.batches or (16 if q else 100), a.warmup or (3 if q else 10)
    unique, samples = a.unique or (200 if q else 4000), a.samples or (1600 if q else 32768)
    a.shuffle_buffer = a.shuffle_buffer or (32 if q else 256)
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    workers = max(1, a.workers)
    for name in a.providers.split(","):
        if name not in PROVIDERS:
            p.error(f"--providers: unknown {name!r}; choose from {', '.join(PROVIDERS)}")

    data = a.data or tempfile.mkdtemp(prefix="bench_data_")
    per_epoch = samples // bs
    if warmup + batches > per_epoch:
        print(
            f"note: {warmup + batches} batches cross epoch boundaries ({per_epoch} per epoch): the timing includes "
            f"the DALI pipeline rebuild and the torch workers' restart + buffer refill"
        )
    if not os.path.isfile(os.path.join(data, "index.json")):
        per_shard = max(64, samples // (4 * workers))
        dataset = make_shards(data, unique, samples, per_shard, workers=workers, source=a.source)
        with open(os.path.join(data, "dataset.json"), "w") as f:
            json.dump(dataset, f)
    with open(os.path.join(data, "dataset.json")) as f:
        dataset = json.load(f)
    print(f"data: {dataset}")

    import open_clip

    from dissect_fast.data.dali_loader import DaliLoader, Preprocess, dali_unavailable_reason
    from dissect_fast.data.device_decode import DeviceDecodeLoader, DeviceTransform, EncodedShardDataset
    from dissect_fast.data.loader import ShardDataset, TorchLoader
    from dissect_fast.data.shards import DatasetIndex

    index = DatasetIndex.load(data)
    shards = index.shard_paths()
    tf = open_clip.image_transform(a.image_size, is_train=True)
    rows: list[dict] = []
    makers = []
    for name in a.providers.split(","):
        row: dict = {
            "provider": name,
            "batch_size": bs,
            "image_size": a.image_size,
            "workers": workers,
            "decode_device": "cpu (workers)",
        }
        ds = None
        if name == "dali":
            reason = dali_unavailable_reason()
            if reason:
                print(f"dali: skipped ({reason})")
                rows.append({**row, "skipped": reason})
                continue
            row.update(
                decode_device=device.type + (" (nvjpeg, mixed)" if device.type == "cuda" else " (DALI CPU)"),
                shuffle_buffer=a.shuffle_buffer,
                hw_decoder_load=a.hw_decoder_load,
            )

            def make():
                return DaliLoader(
                    shards,
                    bs,
                    77,
                    Preprocess.from_transform(tf),
                    train=True,
                    device=device,
                    workers=workers,
                    index=index,
                    shuffle_buffer=a.shuffle_buffer,
                    hw_decoder_load=a.hw_decoder_load,
                )

        elif name == "open_clip-wds":
            try:
                import open_clip_train.data  # noqa: F401
            except Exception as e:  # noqa: BLE001 -- not installed, or a missing dependency (pandas, ...)
                reason = f"open_clip_train.data does not import: {type(e).__name__}: {e}"
                print(f"open_clip-wds: skipped ({reason})")
                rows.append({**row, "skipped": reason})
                continue
            row["shuffle_buffer"] = "open_clip's (5000, initial 1000)"

            def make():
                return _OpenClipLoader(shards, tf, bs, workers, samples, device)

        elif name == "gpu-decode":
            row.update(decode_device=f"{device.type} (training process)", shuffle_buffer=a.shuffle_buffer)

            def make():
                eds = EncodedShardDataset(shards, bs, None, 77, train=True, shuffle_buffer=a.shuffle_buffer)
                return DeviceDecodeLoader(eds, DeviceTransform.from_transform(tf), workers, device, drop_last=True)

            ds = EncodedShardDataset(shards, bs, None, 77, train=True, shuffle_buffer=a.shuffle_buffer)
        else:
            wtf = _FloatPath(tf) if name == "torch-float" else tf
            row["shuffle_buffer"] = a.shuffle_buffer

            def make(wtf=wtf):
                sds = ShardDataset(shards, bs, wtf, 77, train=True, shuffle_buffer=a.shuffle_buffer)
                return TorchLoader(sds, workers, device, drop_last=True)

            ds = ShardDataset(shards, bs, wtf, 77, train=True, shuffle_buffer=a.shuffle_buffer)
        if ds is not None:
            row["worker_bytes_per_sample"] = round(worker_bytes_per_sample(ds))
        rows.append(row)
        makers.append((row, make))
    for rep in range(a.repeats):  # providers alternate, so a change in the machine's load hits each of them
        for row, make in makers:
            loader = make()
            r = time_loader(loader, device, warmup, batches)
            if getattr(loader, "bytes_per_sample", None):
                row["worker_bytes_per_sample"] = round(loader.bytes_per_sample)
            runs = row.setdefault("images_per_s_runs", [])
            runs.append(r.pop("images_per_s"))
            row.update(r, images_per_s=float(np.median(runs)))
            print(
                f"{row['provider']:14s} {runs[-1]:>9.1f} images/s  {row.get('worker_bytes_per_sample', '?'):>9} "
                f"B/sample (run {rep + 1}/{a.repeats}, batch {bs}, {a.image_size} px, {workers} workers)"
            )

    by = {r["provider"]: r["images_per_s"] for r in rows if "images_per_s" in r}
    verdict: dict = {}
    fb = {r["provider"]: r.get("worker_bytes_per_sample") for r in rows}
    if fb.get("torch-float") and fb.get("torch-uint8"):
        verdict["uint8_bytes_ratio"] = round(fb["torch-uint8"] / fb["torch-float"], 4)
        verdict["uint8_bytes_target"] = "<= 1/3.5 of the float path's bytes per sample"
        verdict["uint8_bytes_passed"] = verdict["uint8_bytes_ratio"] <= 1 / 3.5
    for other in ("torch-uint8", "gpu-decode", "open_clip-wds"):
        if "torch-float" in by and other in by:
            verdict[f"speedup_{other}_over_torch_float"] = round(by[other] / by["torch-float"], 2)
    if "dali" in by and "torch-uint8" in by:
        speedup = by["dali"] / by["torch-uint8"]
        verdict["speedup_dali_over_torch"] = round(speedup, 2)
        if device.type == "cuda":
            ok = by["dali"] >= TARGET_DALI_IMAGES_S and speedup >= TARGET_SPEEDUP
            verdict.update(target=f"dali >= {TARGET_DALI_IMAGES_S} images/s and >= {TARGET_SPEEDUP}x torch", passed=ok)
    print(f"verdict: {verdict}")

    result = {
        **benchkit.header("data_loader_throughput", "bench_data.py", device, argv, MODULES, a.commit),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "quick": q,
        "timed_batches_cross_epochs": warmup + batches > per_epoch,
        "dataset": dataset,
        "note": "worker_bytes_per_sample: one sample's image as a loader worker ships it to the training process "
        "(float32 3x224x224 = 602,112; uint8 = 150,528; gpu-decode: the encoded JPEG). On a CPU device the "
        "gpu-decode row decodes and transforms in the training process on the same cores as the workers.",
        "rows": rows,
        "verdict": verdict,
    }
    path = os.path.join(a.out, f"data-{short_tag(result['device'])}-{datetime.date.today().isoformat()}.json")
    benchkit.write_json(path, result)
    print(f"wrote {path}")
    if not a.data:
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
