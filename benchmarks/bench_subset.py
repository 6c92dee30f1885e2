"""Time and memory of CLIPCov subset selection at N = 1e5 .. 1e7 on class-structured float16 embeddings memmapped
under ``--tmp``; one cold run per (size, approx) in its own subprocess: peak anonymous RSS above the start (and
``cuda_peak_bytes`` on CUDA), and ``select_subset``'s phases.

    python -m benchmarks.bench_subset --device cpu --sizes 1e5,1e6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import harness
from dissect_fast.offline import ClipCovConfig, Embeddings, select_subset


def generate(out: Path, n: int, dim: int, classes: int, seed: int, device: str) -> tuple[Embeddings, np.ndarray]:
    """Chunked generation into float16 memmaps; the embeddings and the class directions."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(classes, dim, device=device, generator=gen), dim=1)
    mm = np.lib.format.open_memmap
    ids = mm(out / "ids.npy", mode="w+", dtype=np.int64, shape=(n,))
    image, text = (mm(out / f"{x}.npy", mode="w+", dtype=np.float16, shape=(n, dim)) for x in ("image", "text"))

    def noise(rows: int, sigma: float) -> torch.Tensor:
        return sigma / dim**0.5 * torch.randn(rows, dim, device=device, generator=gen)

    for a in range(0, n, 1 << 18):
        b = min(n, a + (1 << 18))
        f = t[torch.randint(0, classes, (b - a,), device=device, generator=gen)] + noise(b - a, 1.5)
        g = f + noise(b - a, 1.0)
        swap = torch.rand(b - a, device=device, generator=gen) < 0.2
        other = t[torch.randint(0, classes, (b - a,), device=device, generator=gen)]
        g[swap] = other[swap] + noise(int(swap.sum()), 1.5)
        image[a:b], text[a:b], ids[a:b] = f.half().cpu().numpy(), g.half().cpu().numpy(), np.arange(a, b)
    for x in (ids, image, text):
        x.flush()
    load = {x: np.load(out / f"{x}.npy", mmap_mode="r") for x in ("image", "text")}
    return Embeddings(ids=np.load(out / "ids.npy"), meta={"model": "synthetic"}, **load), t.cpu().numpy()


def rss_anon() -> int:
    """Anonymous resident memory of this process (bytes; /proc/self/status)."""
    with open("/proc/self/status") as fh:
        return next((int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:")), 0)


def worker(a: argparse.Namespace) -> dict:
    """One measurement: generate, then time select_subset(clipcov) with class-name proxy classes, sampling the
    anonymous RSS in a thread."""
    n, cuda = int(float(a.n)), a.device.startswith("cuda")
    t0 = time.perf_counter()
    emb, class_emb = generate(Path(a.tmp), n, a.dim, a.classes, 0, a.device)  # the parent removes a.tmp
    gen_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cuda_base, base, peak, stop = torch.cuda.memory_allocated() if cuda else 0, rss_anon(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_anon())

    cfg = ClipCovConfig(approx=a.approx, device=a.device)
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    res = select_subset(emb, "clipcov", a.fraction, class_names_emb=class_emb, device=a.device, config=cfg)
    if cuda:
        torch.cuda.synchronize()
    total, mem = time.perf_counter() - t0, max(peak[0], rss_anon()) - base
    stop.set()
    row = {
        **{"n": n, "dim": a.dim, "classes": a.classes, "fraction": a.fraction, "approx": a.approx, "device": a.device},
        **{"block_bytes": cfg.resolved_block_bytes(), "max_class_size": cfg.max_class_size},
        "seconds_total": round(total, 3),
        "seconds": {k: round(v, 3) for k, v in res.seconds.items()},
        "seconds_generate": round(gen_s, 3),
        "samples_per_s": round(n / total),
        **{"peak_anon_bytes": mem, "anon_bytes_per_sample": round(mem / n, 1), "chosen": len(res.ids)},
        "mean_clipscore_subset": round(res.mean_clipscore_subset, 3),
        "mean_clipscore_all": round(res.mean_clipscore_all, 3),
        **{"objective": res.objective, "stats": res.stats},
    }
    if cuda:
        cpeak = torch.cuda.max_memory_allocated() - cuda_base
        row.update(cuda_peak_bytes=cpeak, cuda_bytes_per_sample=round(cpeak / n, 1))
    return row


def measure(a: argparse.Namespace, size: str, approx: str) -> dict:
    """One (size, approx) in a subprocess (``--timeout`` seconds); its row, or the error."""
    cmd = [sys.executable, "-m", "benchmarks.bench_subset", "--worker", "--n", size, "--approx", approx]
    for flag in ("device", "dim", "classes", "fraction"):
        cmd += [f"--{flag}", str(getattr(a, flag))]
    t0, tmp = time.perf_counter(), tempfile.mkdtemp(dir=a.tmp, prefix="bench_subset_")
    try:
        p = subprocess.run([*cmd, "--tmp", tmp], capture_output=True, text=True, timeout=a.timeout, env=harness.ENV)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
        row = json.loads(lines[-1][4:]) if lines and not p.returncode else {"error": p.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        row = {"error": f"timeout after {a.timeout:.0f}s"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row["seconds_wall_incl_generation"] = round(time.perf_counter() - t0, 1)
    return {"n": int(float(size)), "approx": approx, **row}


def main(argv: list[str] | None = None) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_subset", description=__doc__, formatter_class=fmt)
    p.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated N (1e5 notation ok)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--approx", default="exact", help="comma-separated: exact,factorized")
    p.add_argument("--dim", type=int, default=512, help="embedding width")
    p.add_argument("--classes", type=int, default=1000, help="class directions of the generated embeddings")
    p.add_argument("--fraction", type=float, default=0.3, help="share of the samples selected")
    p.add_argument("--tmp", default=None, help="directory for the generated memmaps (default: system temp)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per size before it is recorded as timeout")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/subset-<device>-<date>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("ROW " + json.dumps(worker(a)), flush=True)
        return
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    rows = []
    for size in a.sizes.split(","):
        for approx in a.approx.split(","):
            rows.append(row := measure(a, size, approx))
            if "error" in row:
                print(f"N={size} {approx}: FAILED {row['error'][-300:]}", flush=True)
                continue
            mem = f"{row['anon_bytes_per_sample']:.0f} B/sample host"
            mem += f", {row['cuda_bytes_per_sample']:.0f} B/sample GPU" if "cuda_bytes_per_sample" in row else ""
            score = f"CLIPScore subset {row['mean_clipscore_subset']:.2f} vs all {row['mean_clipscore_all']:.2f}"
            print(f"N={row['n']:>10,} {approx:>10}: {row['seconds_total']:8.2f}s  {row['seconds']}  {mem}  {score}")
    head = harness.header("subset", "bench_subset", a.device, argv)
    doc = {**head, "device_type": a.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    out = harness.result_path("subset", "cpu" if a.device == "cpu" else "gpu", a.out)
    print(f"wrote {harness.write_json(out, dict(doc, rows=rows))}")


if __name__ == "__main__":
    main()
