"""Cost of crafted bad input against the same input without it: ``caption``, one epoch with and without an 81st
pair whose caption is one ``--caption-chars`` random-letter word (target < 2x); ``png``, peak memory added by
``samples.decode_image`` on a ``--png-side`` square PNG in a fresh process (target < 100 MB).

    python -m benchmarks.bench_bad_input [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import zlib

from benchmarks import harness


def huge_png(side: int) -> bytes:
    """A solid black RGB PNG of ``side`` x ``side`` pixels, written chunk by chunk (small on disk, huge decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z, row = zlib.compressobj(9), b"\0" * (1 + 3 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _png_child(side: int) -> None:
    """In a fresh process: peak RSS (MB) added by the loader's decode; prints JSON."""
    import resource

    from PIL import Image

    from dissect_fast.data import samples

    png = huge_png(side)
    small = io.BytesIO()
    Image.new("RGB", (32, 32)).save(small, "PNG")
    samples.decode_image(small.getvalue())  # imports and first-call allocations outside the measured window

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    before = peak_mb()
    try:
        samples.decode_image(png)
        outcome = "decoded"
    except samples.BadSample as e:
        outcome = e.reason
    print(json.dumps({"png_bytes": len(png), "outcome": outcome, "added_peak_mb": peak_mb() - before}))


def _shards(folder: str, chars: int | None) -> str:
    """80 good pairs in 2 indexed shards (+ one whose caption is a ``chars``-character word); returns the folder."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from dissect_fast.data.index import index_shards

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(2):
        path = os.path.join(folder, f"cc3m-train-{s:04d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(40):
                key = f"{s * 40 + i:09d}"
                img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": f"a photo number {s * 40 + i}"})
                if chars and s == 0 and i == 20:
                    word = "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, chars))  # BPE's worst case
                    w.write({"__key__": f"{key}x", "jpg": buf.getvalue(), "txt": word})
        paths.append(path)
    index_shards(paths, folder, verify="header", workers=1, progress=False)
    return folder


def _epoch_s(data: str, logs: str, name: str) -> tuple[float, dict]:
    """Wall seconds of one training epoch (micro-vit, CPU, batch 40) on ``data``, and its data/* counts."""
    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    argv = ["--train-data", data, "--model", "micro-vit", "--batch-size", "40", "--epochs", "1", "--warmup", "1"]
    argv += ["--workers", "0", "--logs", logs, "--name", name, "--no-progress", "--no-tensorboard", "--no-plots"]
    m = Trainer(config_from_args([*argv, "--device", "cpu"])).fit()[-1]
    return m["epoch_wall_s"], {k: v for k, v in m.items() if k.startswith("data/")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_bad_input", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="epochs timed per input (alternating)")
    p.add_argument("--caption-chars", type=int, default=200_000, help="length of the one-word caption")
    p.add_argument("--png-side", type=int, default=13_000, help="side of the square PNG, pixels")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/bad-input-cpu-DATE.json)")
    p.add_argument("--png-child", action="store_true", help=argparse.SUPPRESS)  # the fresh process's entry
    a = p.parse_args(argv)
    if a.png_child:
        _png_child(a.png_side)
        return 0
    doc = harness.header("bad_input", "bench_bad_input", device="cpu", argv=argv)
    cmd = [sys.executable, "-m", "benchmarks.bench_bad_input", "--png-child", "--png-side", str(a.png_side)]
    child = subprocess.run(cmd, capture_output=True, text=True, check=True, env=harness.ENV)
    doc["png"] = {"side": a.png_side, **json.loads(child.stdout.strip().splitlines()[-1]), "target_mb": 100}
    print("png:", doc["png"], flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_bad_input_") as tmp:
        plain = _shards(os.path.join(tmp, "plain"), None)
        long = _shards(os.path.join(tmp, "long"), a.caption_chars)
        times: dict[str, list[float]] = {"plain": [], "long": []}
        counts = {}
        for r in range(a.repeats):
            for name, data in (("plain", plain), ("long", long)):
                s, counts[name] = _epoch_s(data, os.path.join(tmp, "logs"), f"{name}-{r}")
                times[name].append(s)
                print(f"{name} epoch {r + 1}: {s:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    doc["caption"] = {"chars": a.caption_chars, "epoch_s": times, "median_epoch_s": med, "target_ratio": 2.0}
    doc["caption"].update(ratio_long_over_plain=med["long"] / med["plain"], data_counts=counts)
    out = harness.write_json(harness.result_path("bad-input", "cpu", a.out), doc)
    print(f"caption ratio {doc['caption']['ratio_long_over_plain']:.2f}x; png +{doc['png']['added_peak_mb']:.1f} MB")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
