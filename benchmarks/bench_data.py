"""Data loader throughput: DALI (GPU decoding) vs the torch loader (CPU decoding on every core).

Generates shards of realistic JPEGs (~400x300, quality 90, 30-60 KB: smooth gradients, shapes and
sensor-like noise) into a temporary directory, then times the training pipeline of each loader
(random-resized-crop to ``--image-size``, normalise, tokens and ids on the device) after a warm-up,
with the device synchronised around the timed region. Rows go to
``benchmarks/results/data-<device>-<date>.json`` with device, versions, commit and the command.

    python benchmarks/bench_data.py                      # CUDA: DALI mixed decode vs torch, batch 256
    python benchmarks/bench_data.py --device cpu --quick # under a minute: DALI CPU vs torch

Target on an H100/H200 with 16 CPU cores: DALI >= 8,000 images/s and >= 3x the torch loader.
"""

from __future__ import annotations

import argparse
import datetime
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


def make_shards(out: str, unique: int, samples: int, per_shard: int, workers: int) -> dict:
    """``samples`` samples in shards; ``unique`` distinct JPEGs cycled (decoding cost is per sample)."""
    from dissect_fast.data.shards import tokenize, tokenizer_for
    from dissect_fast.data.writer import ShardWriter

    t0 = time.time()
    with Pool(workers) as pool:
        jpegs = pool.map(realistic_jpeg, range(unique), chunksize=16)
    caps = [
        f"a photo of object {i} with {['red', 'green', 'blue'][i % 3]} shapes on a textured background"
        for i in range(unique)
    ]
    toks = tokenize(tokenizer_for(77), caps, 77)
    w = ShardWriter(out, per_shard, prefix="bench")
    for i in range(samples):
        j = i % unique
        w.write(i, jpegs[j], caps[j], toks[j], None)
    w.finish(77)
    sizes = np.array([len(j) for j in jpegs])
    return {
        "unique_images": unique,
        "samples": samples,
        "shards": len(w.shards),
        "jpeg_kb_mean": round(sizes.mean() / 1024, 1),
        "jpeg_kb_min": round(sizes.min() / 1024, 1),
        "jpeg_kb_max": round(sizes.max() / 1024, 1),
        "image_size": "400x300",
        "quality": 90,
        "gen_s": round(time.time() - t0, 1),
    }


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(make, device, warmup: int, batches: int) -> dict:
    """images/s over ``batches`` batches after ``warmup`` ones (epochs restart as needed)."""
    loader = make()
    epoch, n, seen, t0 = 0, 0, 0, None
    t_start = time.time()
    while n < warmup + batches:
        loader.set_epoch(epoch)
        for images, tokens, ids in loader:  # noqa: B007 -- the last batch is checked after the loop
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
    assert images.device.type == device.type and images.dtype.is_floating_point and ids.dtype.is_signed
    return {
        "images_per_s": round(seen / dt, 1),
        "timed_batches": batches,
        "timed_s": round(dt, 3),
        "warmup_batches": warmup,
        "first_batch_s": None,
        "startup_plus_warmup_s": round(t0 - t_start, 2),
        "image_shape": list(images.shape),
        "tokens_shape": list(tokens.shape),
    }


def short_tag(device_name: str) -> str:
    """A device's part of a result file name here: ``cpu``, or the GPU model's first word (``h100``)."""
    return "cpu" if device_name.startswith("cpu") else device_name.replace("NVIDIA ", "").split()[0].lower()


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: runs in under a minute on 2 CPU cores")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 (64 with --quick)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 100; 4 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="default 10 (2 with --quick)")
    p.add_argument("--unique", type=int, default=None, help="distinct JPEGs generated (default 4096; 128 quick)")
    p.add_argument("--samples", type=int, default=None, help="samples in the shards (default 32768; 1024 quick)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="torch workers and DALI threads")
    p.add_argument(
        "--shuffle-buffer",
        type=int,
        default=None,
        help="default 256 (64 quick): both loaders' sample shuffle buffer (per torch worker; per rank for "
        "DALI). Keep it well below samples/workers: a torch worker reads its whole buffer (raw bytes) "
        "before its first batch, so a buffer holding most of the data would let the warm-up pre-read "
        "the timed region",
    )
    p.add_argument("--hw-decoder-load", type=float, default=0.65, help="DALI: share of the hardware JPEG decoder")
    p.add_argument("--data", default=None, help="keep the generated shards here (reused when present)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--providers", default="dali,torch")
    a = p.parse_args(argv)
    q = a.quick
    bs = a.batch_size or (64 if q else 256)
    batches, warmup = a.batches or (4 if q else 100), a.warmup or (2 if q else 10)
    unique, samples = a.unique or (128 if q else 4096), a.samples or (1024 if q else 32768)
    a.shuffle_buffer = a.shuffle_buffer or (64 if q else 256)
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    workers = max(1, a.workers)

    data = a.data or tempfile.mkdtemp(prefix="bench_data_")
    per_epoch = samples // bs
    if warmup + batches > per_epoch:
        print(
            f"note: {warmup + batches} batches cross epoch boundaries ({per_epoch} per epoch): the timing includes "
            f"the DALI pipeline rebuild and the torch workers' restart + buffer refill"
        )
    if not os.path.isfile(os.path.join(data, "index.json")):
        dataset = make_shards(data, unique, samples, per_shard=max(64, samples // (2 * workers)), workers=workers)
        with open(os.path.join(data, "dataset.json"), "w") as f:
            json.dump(dataset, f)
    with open(os.path.join(data, "dataset.json")) as f:
        dataset = json.load(f)
    print(f"data: {dataset}")

    import open_clip

    from dissect_fast.data.dali_loader import DaliLoader, Preprocess, dali_unavailable_reason
    from dissect_fast.data.loader import ShardDataset, TorchLoader
    from dissect_fast.data.shards import DatasetIndex

    index = DatasetIndex.load(data)
    shards = index.shard_paths()
    tf = open_clip.image_transform(a.image_size, is_train=True)
    rows = []
    for provider in a.providers.split(","):
        if provider == "dali":
            reason = dali_unavailable_reason()
            if reason:
                print(f"dali: skipped ({reason})")
                continue

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

            name = "dali-" + ("gpu-decode" if device.type == "cuda" else "cpu-decode")
        else:

            def make():
                ds = ShardDataset(shards, bs, tf, 77, train=True, shuffle_buffer=a.shuffle_buffer)
                return TorchLoader(ds, workers, device, drop_last=True)

            name = "torch-cpu-decode"
        r = time_loader(make, device, warmup, batches)
        r.pop("first_batch_s")
        rows.append(
            {
                "provider": name,
                "batch_size": bs,
                "image_size": a.image_size,
                "workers": workers,
                "shuffle_buffer": a.shuffle_buffer,
                **r,
            }
        )
        if name.startswith("dali"):
            rows[-1]["hw_decoder_load"] = a.hw_decoder_load
        print(f"{name:18s} {r['images_per_s']:>10.1f} images/s  (batch {bs}, {a.image_size} px, {workers} workers)")

    by = {r["provider"].split("-")[0]: r["images_per_s"] for r in rows}
    verdict = None
    if "dali" in by and "torch" in by:
        speedup = by["dali"] / by["torch"]
        verdict = {"speedup_dali_over_torch": round(speedup, 2)}
        if device.type == "cuda":
            ok = by["dali"] >= TARGET_DALI_IMAGES_S and speedup >= TARGET_SPEEDUP
            verdict.update(target=f"dali >= {TARGET_DALI_IMAGES_S} images/s and >= {TARGET_SPEEDUP}x torch", passed=ok)
            print(f"speed-up {speedup:.2f}x; target ({verdict['target']}): {'PASS' if ok else 'FAIL'}")
        else:
            print(f"speed-up {speedup:.2f}x (CPU run: the GPU target does not apply)")

    result = {
        **benchkit.header("data_loader_throughput", "bench_data.py", device, argv, MODULES, a.commit),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "quick": q,
        "timed_batches_cross_epochs": warmup + batches > per_epoch,
        "dataset": dataset,
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
