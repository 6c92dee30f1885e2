"""Fused selection op vs the unfused torch reference (eager and torch.compile'd) on CUDA: bf16 features [B, D],
key = delta, momentum 0.9, k = 0.2 B; ``do_bench`` medians and bandwidth against a device copy. ``--thresholds PATH``
writes the largest B up to which the fused top-k wins (``fused_topk_max_b``), read by ``fused_select``'s routing.

    python -m benchmarks.bench_select --sizes 4096x512,65536x512 --out /tmp/select.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from benchmarks import harness
from dissect_fast.kernels.fused_select import (
    KernelConfig,
    _fused_select_triton,
    fused_select,
    fused_select_reference,
    save_thresholds,
)

SELECT_RATE = 0.2


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """A device-to-device copy's read + write bytes over its time."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    return 2 * nbytes / bench(lambda: y.copy_(x)) / 1e6


def make_inputs(B: int, D: int, dtype: torch.dtype = torch.bfloat16):
    """Features, correlated captions, B of 4B ids, and a history with 30% unseen (NaN) entries."""
    g = torch.Generator(device="cuda").manual_seed(B + D)
    f = torch.randn(B, D, device="cuda", dtype=dtype, generator=g)
    t = (f + torch.randn(B, D, device="cuda", dtype=dtype, generator=g)).to(dtype)
    ids = torch.randperm(4 * B, device="cuda", generator=g)[:B]
    history = torch.rand(4 * B, device="cuda", generator=g) * 60
    history[torch.rand(4 * B, device="cuda", generator=g) < 0.3] = float("nan")
    return f, t, ids, history


def bench_size(B: int, D: int, copy_gbps: float) -> dict:
    f, t, ids, history = make_inputs(B, D)
    k = int(SELECT_RATE * B)
    ref = functools.partial(fused_select_reference, momentum=0.9)
    torch._dynamo.reset()
    compiled = torch.compile(ref, fullgraph=True, dynamic=False)
    compiled(f, t, ids, history, k)  # compiled (and the Triton kernel below) outside the timed region
    fused_select(f, t, ids, history, k, momentum=0.9)
    torch.cuda.synchronize()
    providers = {
        "fused": lambda: fused_select(f, t, ids, history, k, momentum=0.9),
        "fused_k0": lambda: fused_select(f, t, ids, history, 0, momentum=0.9),
        "eager": lambda: ref(f, t, ids, history, k),
        "compiled": lambda: compiled(f, t, ids, history, k),
    }
    ms = {f"{n}_ms": bench(fn) for n, fn in providers.items()}
    nbytes = 2 * B * D * f.element_size() + 8 * B + 8 * B + 8 * B + 8 * k

    def share(t_ms: float) -> float:
        return round(nbytes / t_ms / 1e6 / copy_gbps, 3)

    row = {"B": B, "D": D, "k": k, "dtype": "bfloat16", "bytes": nbytes, **{n: round(v, 5) for n, v in ms.items()}}
    row["speedup_eager"] = round(ms["eager_ms"] / ms["fused_ms"], 2)
    row["speedup_compiled"] = round(ms["compiled_ms"] / ms["fused_ms"], 2)
    row["fused_gbps"] = round(nbytes / ms["fused_ms"] / 1e6, 1)
    row["copy_fraction"], row["scoring_copy_fraction"] = share(ms["fused_ms"]), share(ms["fused_k0_ms"])
    print(json.dumps(row), flush=True)
    return row


def routing_sweep(sizes=(1024, 2048, 4096, 8192, 16384, 32768, 65536), D: int = 512) -> dict:
    """Per B (k = min(0.2 B, the in-launch sort's limit)): the top-k inside the launch vs the score-only kernel +
    torch's stable sort. ``fused_topk_max_b``: the largest B up to which the fused top-k is never slower."""
    fused_cfg, sort_cfg = KernelConfig(fused_topk_max_b=max(sizes)), KernelConfig(fused_topk_max_b=0)
    rows, best, winning = [], 0, True
    for B in sizes:
        f, t, ids, history = make_inputs(B, D)
        k = min(int(SELECT_RATE * B), fused_cfg.max_sort)
        ms = {}
        for name, cfg in (("fused_topk", fused_cfg), ("score_then_sort", sort_cfg)):
            run = functools.partial(_fused_select_triton, f, t, ids, history, k, 0.9, 100.0, False, "delta", cfg)
            run()  # compiled outside the timed region
            ms[name] = bench(run)
        rows.append({"B": B, "D": D, "k": k, **{f"{n}_ms": round(v, 5) for n, v in ms.items()}})
        rows[-1]["fused_wins"] = ms["fused_topk"] <= ms["score_then_sort"]
        winning = winning and rows[-1]["fused_wins"]
        best = B if winning else best
        print(json.dumps(rows[-1]), flush=True)
    return {"fused_topk_max_b": best, "k_rule": "k = min(0.2 B, 1024)", "rows": rows}


def targets(rows: list[dict]) -> dict:
    row, big = next((r for r in rows if (r["B"], r["D"]) == (4096, 512)), None), [r for r in rows if r["B"] == 65536]
    eager, comp = (row[k] if row else None for k in ("speedup_eager", "speedup_compiled"))
    fracs = {r["D"]: r["copy_fraction"] for r in big}
    out = {
        "speedup_eager_B4096_D512": (eager, ">= 3", None if eager is None else eager >= 3.0),
        "speedup_compiled_B4096_D512": (comp, ">= 1.5", None if comp is None else comp >= 1.5),
        "copy_fraction_B65536": (fracs, ">= 0.6", bool(fracs) and min(fracs.values()) >= 0.6),
    }
    for n, (value, target, ok) in out.items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[None if ok is None else bool(ok)]
        print(f"{verdict:4s} {n}: {value} (target {target})")
    return {n: {"value": v, "target": t, "pass": None if ok is None else bool(ok)} for n, (v, t, ok) in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_select", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/select-DEVICE-DATE.json)")
    p.add_argument("--sizes", default=None, help="comma-separated BxD list overriding the default sizes, e.g. 4096x512")
    p.add_argument("--thresholds", type=Path, default=None, help="write the fused top-k crossover to this JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_select needs a CUDA device", file=sys.stderr)
        return 1
    if args.sizes:
        sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    else:
        sizes = [(B, D) for B in (1024, 4096, 16384, 65536) for D in (512, 768, 1024)]
    name = torch.cuda.get_device_name()
    out = harness.result_path("select", name, args.out)
    result = {
        **harness.header("fused_select", "bench_select", "cuda", argv, modules=("triton",)),
        "select_rate": SELECT_RATE,
        "timing": "triton.testing.do_bench median (L2 flushed)",
    }
    copy_gbps = copy_bandwidth_gbps()
    result["copy_bandwidth_gbps"] = round(copy_gbps, 1)
    print(f"{name}: copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = result["rows"] = []
    for B, D in sorted(sizes, key=lambda bd: -bd[0]):  # largest B first: a cut session keeps the rows it needs most
        rows.append(bench_size(B, D, copy_gbps))
        harness.write_json(out, result)
    if args.thresholds is not None:
        result["routing"] = routing_sweep()
        save_thresholds(args.thresholds, name, result["routing"]["fused_topk_max_b"], result["routing"]["rows"])
        result["routing"]["written_to"] = str(args.thresholds)
        harness.write_json(out, result)
    result["targets"] = targets(rows)
    print(f"wrote {harness.write_json(out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
