"""Time and memory of CLIPCov subset selection at N = 1e5 .. 1e7 (random, class-structured embeddings).

    python benchmarks/bench_subset.py --device cpu --sizes 1e5,1e6
    python benchmarks/bench_subset.py --device cuda --sizes 1e5,1e6,1e7 --approx exact,factorized

Data: C class directions t_c (the stand-in for class-name text embeddings, used as
``class_names_emb``); sample i of class c has f_i = t_c + noise and g_i = f_i + noise, with 20%
of captions swapped to another class (noisy pairs). The embeddings are generated in chunks
(torch, on the benchmark device) straight into float16 ``.npy`` memmaps in a temporary
directory (``--tmp``; N = 1e7 at D = 512 needs 2 x 10 GB of disk), so generation never holds
N x D in memory, and selection reads them exactly as it reads a real embeddings directory.

Each (size, approx) runs in its own subprocess so peak-memory numbers are clean:
``peak_anon_bytes`` is the peak anonymous RSS (sampled every 20 ms from /proc; memmapped file
pages excluded) minus the process's footprint before selection started; on CUDA also
``cuda_peak_bytes`` (torch.cuda.max_memory_allocated). Rows report bytes/sample for both.
Timing is one cold run per size (selection at these sizes is seconds to minutes, so warm-up
and medians do not apply); the phases are the ones ``select_subset`` reports.
"""

from __future__ import annotations

import argparse
import datetime
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # benchmarks/ is not a package
    sys.path.insert(0, str(ROOT / "benchmarks"))
import benchkit  # noqa: E402

from dissect_fast.offline import ClipCovConfig, Embeddings, select_subset


def generate(out_dir: Path, n: int, dim: int, classes: int, seed: int, device: str) -> tuple[Embeddings, np.ndarray]:
    """Chunked generation into float16 memmaps; returns the embeddings and the class directions."""
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(classes, dim, device=device, generator=gen)
    t = t / t.norm(dim=1, keepdim=True)
    fmt = np.lib.format
    ids = fmt.open_memmap(out_dir / "ids.npy", mode="w+", dtype=np.int64, shape=(n,))
    image = fmt.open_memmap(out_dir / "image.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    text = fmt.open_memmap(out_dir / "text.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    chunk = 1 << 18
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        c = torch.randint(0, classes, (b - a,), device=device, generator=gen)
        f = t[c] + 1.5 / dim**0.5 * torch.randn(b - a, dim, device=device, generator=gen)
        g = f + 1.0 / dim**0.5 * torch.randn(b - a, dim, device=device, generator=gen)
        swap = torch.rand(b - a, device=device, generator=gen) < 0.2
        other = t[torch.randint(0, classes, (b - a,), device=device, generator=gen)]
        g[swap] = other[swap] + 1.5 / dim**0.5 * torch.randn(int(swap.sum()), dim, device=device, generator=gen)
        image[a:b] = f.half().cpu().numpy()
        text[a:b] = g.half().cpu().numpy()
        ids[a:b] = np.arange(a, b)
    for x in (ids, image, text):
        x.flush()
    emb = Embeddings(
        ids=np.load(out_dir / "ids.npy"),
        image=np.load(out_dir / "image.npy", mmap_mode="r"),
        text=np.load(out_dir / "text.npy", mmap_mode="r"),
        meta={"model": "synthetic"},
    )
    return emb, t.cpu().numpy()


class AnonPeak:
    """Peak of RssAnon (anonymous resident memory, KiB in /proc/self/status), sampled in a thread."""

    def __init__(self, period: float = 0.02) -> None:
        self.period, self.peak, self._stop = period, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.period)

    def __enter__(self) -> AnonPeak:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def worker(a: argparse.Namespace) -> dict:
    """One measurement: generate, then time select_subset(clipcov) with class-name proxy classes."""
    n = int(float(a.n))
    # the parent owns (and removes) a.tmp, also when it kills this process on timeout
    t0 = time.perf_counter()
    emb, class_emb = generate(Path(a.tmp), n, a.dim, a.classes, a.seed, a.device)
    gen_s = time.perf_counter() - t0
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base = AnonPeak.now()
    block = None if a.block_mib is None else a.block_mib << 20
    cfg = ClipCovConfig(approx=a.approx, device=a.device, block_bytes=block, max_class_size=a.max_class_size)
    with AnonPeak() as mem:
        t0 = time.perf_counter()
        res = select_subset(emb, "clipcov", a.fraction, class_names_emb=class_emb, device=a.device, config=cfg)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    row = {
        "n": n,
        "dim": a.dim,
        "classes": a.classes,
        "fraction": a.fraction,
        "approx": a.approx,
        "device": a.device,
        "block_bytes": cfg.resolved_block_bytes(),
        "max_class_size": cfg.max_class_size,
        "seconds_total": round(total, 3),
        "seconds": {k: round(v, 3) for k, v in res.seconds.items()},
        "seconds_generate": round(gen_s, 3),
        "samples_per_s": round(n / total),
        "peak_anon_bytes": mem.peak - base,
        "anon_bytes_per_sample": round((mem.peak - base) / n, 1),
        "chosen": len(res.ids),
        "mean_clipscore_subset": round(res.mean_clipscore_subset, 3),
        "mean_clipscore_all": round(res.mean_clipscore_all, 3),
        "objective": res.objective,
        "stats": res.stats,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated() - cuda_base
        row.update(cuda_peak_bytes=peak, cuda_bytes_per_sample=round(peak / n, 1))
    return row


def provenance(device: str, argv: list[str] | None = None, benchmark: str = "subset", script: str = "bench_subset.py"):
    """``benchkit.header`` plus what a timing on a possibly shared CPU needs: cores, torch threads, the load."""
    return {
        **benchkit.header(benchmark, script, device, argv),
        "device_type": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),  # the CPU may be shared: timings are only as quiet as this
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated N (1e5 notation ok)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--approx", default="exact", help="comma-separated: exact,factorized")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-mib", type=int, default=None, help="ClipCovConfig.block_bytes in MiB (default: its own)")
    p.add_argument(
        "--max-class-size",
        type=int,
        default=ClipCovConfig.max_class_size,
        help="ClipCovConfig.max_class_size: larger proxy classes are split (this changes the objective)",
    )
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
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--n",
                size,
                "--approx",
                approx,
                "--device",
                a.device,
                "--dim",
                str(a.dim),
                "--classes",
                str(a.classes),
                "--fraction",
                str(a.fraction),
                "--seed",
                str(a.seed),
                "--max-class-size",
                str(a.max_class_size),
            ] + ([] if a.block_mib is None else ["--block-mib", str(a.block_mib)])
            t0 = time.perf_counter()
            tmp = tempfile.mkdtemp(dir=a.tmp, prefix="bench_subset_")
            cmd += ["--tmp", tmp]
            try:
                out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=a.timeout)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
                if out.returncode or not lines:
                    row = {"n": int(float(size)), "approx": approx, "error": out.stderr[-2000:]}
                else:
                    row = json.loads(lines[-1][4:])
            except subprocess.TimeoutExpired:
                row = {"n": int(float(size)), "approx": approx, "error": f"timeout after {a.timeout:.0f}s"}
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            row["seconds_wall_incl_generation"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            if "error" in row:
                print(f"N={size} {approx}: FAILED {row['error'][-300:]}", flush=True)
            else:
                mem = f"{row['anon_bytes_per_sample']:.0f} B/sample host"
                if "cuda_bytes_per_sample" in row:
                    mem += f", {row['cuda_bytes_per_sample']:.0f} B/sample GPU"
                print(
                    f"N={row['n']:>10,} {approx:>10}: {row['seconds_total']:8.2f}s  {row['seconds']}  {mem}  "
                    f"CLIPScore subset {row['mean_clipscore_subset']:.2f} vs all {row['mean_clipscore_all']:.2f}",
                    flush=True,
                )
    dev = "cpu" if a.device == "cpu" else "gpu"
    out_path = Path(a.out or ROOT / "benchmarks" / "results" / f"subset-{dev}-{datetime.date.today()}.json")
    benchkit.write_json(out_path, dict(provenance(a.device, argv), rows=rows))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
