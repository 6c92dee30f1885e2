"""Data loader throughput side by side on the same photo-sized (360-480 px) JPEG shards: the torch loader (float32
and uint8), the ``gpu`` backend, open_clip's webdataset pipeline and DALI; medians over alternating runs after a
warm-up. Target on an H100/H200 with 16 CPU cores: DALI >= 8,000 images/s and >= 3x the torch loader.

    python -m benchmarks.bench_data --quick              # 2 CPU cores: about 2-3 minutes
    python -m benchmarks.bench_data                      # CUDA: batch 256, every provider
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from multiprocessing import Pool
from typing import Any

import numpy as np

from benchmarks import harness

FLICKR = harness.ROOT.parent / "shared" / "data" / "flickr8k-dev" / "images"
PROVIDERS = ("torch-float", "torch-uint8", "gpu-decode", "open_clip-wds", "dali")
TARGET_DALI_IMAGES_S, TARGET_SPEEDUP = 8000, 3.0
SIZES = {"batch-size": (256, 32), "batches": (100, 16), "warmup": (10, 3), "unique": (4000, 200)}
SIZES |= {"samples": (32768, 1600), "shuffle-buffer": (256, 32)}  # flag: (default, --quick default)


def photo_jpeg(item: tuple[int, str | None]) -> bytes:
    """A photo-sized JPEG: the flickr photo ``path`` upscaled to 480 px on its longer side (two in three cropped to
    4:3 or 3:4), or (``path`` None) a smooth random colour field; then sensor-like noise (an upscaled JPEG alone is
    too smooth: ~15 KB instead of ~60 KB)."""
    from PIL import Image

    i, path = item
    rng = np.random.default_rng(i)
    if path is None:
        y, x = np.mgrid[0:360, 0:480] / 60.0
        arr = np.stack([128 + 60 * np.sin(x * rng.uniform(0.3, 2) + y * rng.uniform(0.3, 2) + c) for c in range(3)], -1)
        im = Image.fromarray(arr.astype(np.uint8))
    else:
        im = Image.open(path).convert("RGB")
        k = 480 / max(im.size)
        im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BICUBIC)
        if i % 3 == 1 and im.height > 360:
            im = im.crop((0, (im.height - 360) // 2, im.width, (im.height - 360) // 2 + 360))
        elif i % 3 == 2 and im.width > 360:
            im = im.crop(((im.width - 360) // 2, 0, (im.width - 360) // 2 + 360, im.height))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 5.0, (im.height, im.width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(out: str, unique: int, samples: int, per_shard: int, workers: int, source: str) -> dict:
    """``samples`` samples in shards, cycling ``unique`` distinct JPEGs (decoding costs per sample)."""
    from PIL import Image

    from dissect_fast.data.shards import tokenize, tokenizer_for
    from dissect_fast.tools.writer import ShardWriter

    t0, files = time.time(), sorted(str(f) for f in FLICKR.glob("*.jpg"))[:unique]
    source = ("flickr8k-dev" if len(files) >= unique else "generated") if source == "auto" else source
    with Pool(workers) as pool:
        jpegs = pool.map(photo_jpeg, [(i, files[i] if source != "generated" else None) for i in range(unique)], 16)
    caps = [f"a photo number {i} with {['red', 'green', 'blue'][i % 3]} things in it" for i in range(unique)]
    toks = tokenize(tokenizer_for(77), caps, 77)
    w = ShardWriter(out, per_shard, prefix="bench")
    for i in range(samples):
        w.write(i, jpegs[i % unique], caps[i % unique], toks[i % unique], None)
    w.finish(77)
    sides, kb = np.array([Image.open(io.BytesIO(j)).size for j in jpegs]), np.array([len(j) / 1024 for j in jpegs])
    return {
        "source": source + " (480 px on the longer side, + noise sigma 5)",
        **{"unique_images": unique, "samples": samples, "shards": len(w.shards), "quality": 90},
        **{"jpeg_kb_mean": round(kb.mean(), 1), "jpeg_kb_min": round(kb.min(), 1), "jpeg_kb_max": round(kb.max(), 1)},
        "long_side_px": [int(sides.max(1).min()), int(sides.max(1).max())],
        "short_side_px": [int(sides.min(1).min()), int(sides.min(1).max())],
        "gen_s": round(time.time() - t0, 1),
    }


def time_loader(loader, device, warmup: int, batches: int) -> dict:
    """images/s over ``batches`` batches after ``warmup`` ones (epochs restart as needed)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    epoch, n, seen, t0, t_start, images = 0, 0, 0, 0.0, time.time(), None
    while n < warmup + batches:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for images, *_ in loader:  # noqa: B007 -- the last batch is checked after the loop
            n += 1
            if n == warmup:
                sync()
                t0 = time.time()
            seen += images.shape[0] if n > warmup else 0
            if n >= warmup + batches:
                break
        epoch += 1
    sync()
    dt = time.time() - t0
    if hasattr(loader, "close"):
        loader.close()
    assert images is not None and images.device.type == device.type and images.dtype.is_floating_point
    return {"images_per_s": round(seen / dt, 1), "timed_batches": batches, "timed_s": round(dt, 3),
            "warmup_batches": warmup, "startup_plus_warmup_s": round(t0 - t_start, 2), "image_shape": list(images.shape)}  # fmt: skip


class _FloatPath:
    """open_clip's transform behind a plain callable: the torch loader cannot split it, so its workers run all of it
    and ship float32 (the loader's path before uint8 batches)."""

    def __init__(self, tf) -> None:
        self.tf = tf

    def __call__(self, im):
        return self.tf(im)


def open_clip_loader(shards: list[str], tf, bs: int, workers: int, samples: int, device):
    """open_clip's own train pipeline (webdataset, PIL decode, its transform in the workers, float32 batches),
    moved to ``device`` as its trainer does."""
    from types import SimpleNamespace

    import open_clip
    import open_clip_train.data as oc_data

    harness.patch_open_clip_data()
    args = SimpleNamespace(train_data="::".join(shards), train_num_samples=samples, dataset_resampled=False, seed=0,
                           train_data_upsampling_factors=None, batch_size=bs, workers=workers, world_size=1)  # fmt: skip
    info = oc_data.get_wds_dataset(args, tf, True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))

    class Loader:
        set_epoch = staticmethod(info.set_epoch)

        def __iter__(self):
            for images, texts in info.dataloader:
                self.bytes_per_sample = images.nbytes / images.shape[0]
                yield images.to(device, non_blocking=True), texts.to(device, non_blocking=True)

    return Loader()


def providers(a, names: list[str], shards: list[str], index, tf, device, bs: int, samples: int) -> list[tuple]:
    """``(row, make_loader)`` per provider that can run here; a skipped one's row says why."""
    from dissect_fast.data.dali_loader import DaliLoader, Preprocess, dali_unavailable_reason
    from dissect_fast.data.device_decode import DeviceDecodeLoader, DeviceTransform, EncodedShardDataset
    from dissect_fast.data.loader import ShardDataset, TorchLoader

    out: list[tuple[dict, Callable[[], Any] | None]] = []
    buf, w = a.shuffle_buffer, a.workers
    for name in names:
        ds: Any = None
        row: dict = {"provider": name, "batch_size": bs, "image_size": a.image_size, "workers": w,
                     "decode_device": "cpu (workers)", "shuffle_buffer": buf}  # fmt: skip
        if name == "dali":
            if reason := dali_unavailable_reason():
                out.append(({**row, "skipped": reason}, None))
                continue
            row.update(decode_device=device.type + (" (nvjpeg, mixed)" if device.type == "cuda" else " (DALI CPU)"))
            kw = {"device": device, "workers": w, "index": index, "shuffle_buffer": buf}
            make: Callable[[], Any] = partial(
                DaliLoader, shards, bs, 77, Preprocess.from_transform(tf), train=True, **kw
            )
        elif name == "open_clip-wds":
            try:
                import open_clip_train.data  # noqa: F401
            except Exception as e:  # noqa: BLE001 -- not installed, or a missing dependency (pandas, ...)
                out.append(({**row, "skipped": f"open_clip_train.data does not import: {type(e).__name__}: {e}"}, None))
                continue
            row["shuffle_buffer"] = "open_clip's (5000, initial 1000)"
            make = partial(open_clip_loader, shards, tf, bs, w, samples, device)
        elif name == "gpu-decode":
            row["decode_device"] = f"{device.type} (training process)"
            ds = EncodedShardDataset(shards, bs, None, 77, train=True, shuffle_buffer=buf)
            make = partial(DeviceDecodeLoader, ds, DeviceTransform.from_transform(tf), w, device, drop_last=True)
        else:
            ds = ShardDataset(
                shards, bs, _FloatPath(tf) if name == "torch-float" else tf, 77, train=True, shuffle_buffer=buf
            )
            make = partial(TorchLoader, ds, w, device, drop_last=True)
        if ds is not None:  # one sample's image as a loader worker ships it
            first = next(iter(ds))[1:-1]  # (kind, images or bytes, ..., counts)
            row["worker_bytes_per_sample"] = round(first[0].nbytes / first[-1].shape[0])
        out.append((row, make))
    return out


def verdict(rows: list[dict], device) -> dict:
    by = {r["provider"]: r["images_per_s"] for r in rows if "images_per_s" in r}
    fb = {r["provider"]: r.get("worker_bytes_per_sample") for r in rows}
    out: dict = {}
    if fb.get("torch-float") and fb.get("torch-uint8"):
        out["uint8_bytes_ratio"] = round(fb["torch-uint8"] / fb["torch-float"], 4)
        out["uint8_bytes_target"] = "<= 1/3.5 of the float path's bytes per sample"
        out["uint8_bytes_passed"] = out["uint8_bytes_ratio"] <= 1 / 3.5
    for other in ("torch-uint8", "gpu-decode", "open_clip-wds"):
        if "torch-float" in by and other in by:
            out[f"speedup_{other}_over_torch_float"] = round(by[other] / by["torch-float"], 2)
    if "dali" in by and "torch-uint8" in by:
        out["speedup_dali_over_torch"] = round(by["dali"] / by["torch-uint8"], 2)
        if device.type == "cuda":
            out["target"] = f"dali >= {TARGET_DALI_IMAGES_S} images/s and >= {TARGET_SPEEDUP}x torch"
            out["passed"] = by["dali"] >= TARGET_DALI_IMAGES_S and out["speedup_dali_over_torch"] >= TARGET_SPEEDUP
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where batches land")
    p.add_argument("--quick", action="store_true", help="small sizes: about 2-3 minutes on 2 CPU cores")
    for flag, (full, quick) in SIZES.items():
        p.add_argument(f"--{flag}", type=int, default=None, help=f"default {full} ({quick} with --quick)")
    p.add_argument("--image-size", type=int, default=224, help="the transform's output side")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers and DALI threads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per provider, alternating (median kept)")
    p.add_argument("--source", default="auto", choices=("auto", "flickr8k-dev", "generated"), help="the JPEGs' source")
    p.add_argument("--data", default=None, help="keep the generated shards here (reused when present)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/data-DEVICE-DATE.json)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    a = p.parse_args(argv)
    for flag, (full, quick) in SIZES.items():
        key = flag.replace("-", "_")
        setattr(a, key, getattr(a, key) or (quick if a.quick else full))
    if bad := set(a.providers.split(",")) - set(PROVIDERS):
        p.error(f"--providers: unknown {sorted(bad)}; choose from {', '.join(PROVIDERS)}")
    a.workers, device = max(1, a.workers), torch.device(a.device)
    device = torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device
    data, crosses = a.data or tempfile.mkdtemp(prefix="bench_data_"), a.warmup + a.batches > a.samples // a.batch_size
    if not os.path.isfile(os.path.join(data, "index.json")):
        info = make_shards(data, a.unique, a.samples, max(64, a.samples // (4 * a.workers)), a.workers, a.source)
        harness.write_json(os.path.join(data, "dataset.json"), info)
    dataset = json.loads(open(os.path.join(data, "dataset.json")).read())
    print(f"data: {dataset}" + ("\nnote: the timed batches cross epochs (loader restarts included)" if crosses else ""))

    import open_clip

    from dissect_fast.data.shards import DatasetIndex

    index = DatasetIndex.load(data)
    tf = open_clip.image_transform(a.image_size, is_train=True)
    made = providers(a, a.providers.split(","), index.shard_paths(), index, tf, device, a.batch_size, a.samples)
    for rep in range(a.repeats):  # providers alternate, so a change in the machine's load hits each of them
        for row, make in (m for m in made if m[1] is not None):
            loader = make()
            r = time_loader(loader, device, a.warmup, a.batches)
            if getattr(loader, "bytes_per_sample", None):
                row["worker_bytes_per_sample"] = round(loader.bytes_per_sample)
            (runs := row.setdefault("images_per_s_runs", [])).append(r.pop("images_per_s"))
            row.update(r, images_per_s=float(np.median(runs)))
            print(f"{row['provider']:14s} {runs[-1]:>9.1f} images/s  {row.get('worker_bytes_per_sample', '?'):>9} "
                  f"B/sample (run {rep + 1}/{a.repeats})")  # fmt: skip
    rows = [row for row, _ in made]
    result = {
        **harness.header("data_loader_throughput", "bench_data", device, argv, ("PIL", "nvidia.dali")),
        **{"device_type": device.type, "quick": a.quick, "timed_batches_cross_epochs": crosses, "dataset": dataset},
        "note": "worker_bytes_per_sample: one sample's image as a loader worker ships it to the training process "
        "(float32 3x224x224 = 602,112; uint8 = 150,528; gpu-decode: the encoded JPEG). On a CPU device the "
        "gpu-decode row decodes in the training process on the same cores as the workers.",
        **{"rows": rows, "verdict": verdict(rows, device)},
    }
    out = harness.write_json(harness.result_path("data", result["device"], a.out), result)
    print(f"verdict: {result['verdict']}\nwrote {out}")
    if not a.data:
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
