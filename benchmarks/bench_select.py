"""Fused selection op vs the unfused torch reference (eager and torch.compile'd).

    python benchmarks/bench_select.py                  # B in {1024, 4096, 16384, 65536} x D in {512, 768, 1024}
    python benchmarks/bench_select.py --quick --out /tmp/select.json

One step of DISSect selection: bf16 features [B, D], key = delta, momentum 0.9 history
update, k = 0.2 * B (the paper's select rate). Times are `triton.testing.do_bench` medians
(warm-up, L2 flushed between runs). Achieved bandwidth counts the bytes the op must move:
both feature matrices once, ids, the history gather and scatter, score, delta and index.
It is compared with a measured device-to-device copy (read + write bytes over time, timed
the same way). `fused_k0_ms` is the same launch with k = 0 (no top-k), which isolates the
cost of the selection tail. The op's share of a training step uses an open_clip ViT-B-32
bf16-autocast forward + backward + AdamW step at batch 1024 (random init and data) when
open_clip is importable. Results go to benchmarks/results/select-<device>-<date>.json.

Sizes run largest B first (the row a short GPU session most needs); the compiled reference is compiled once
per size before its timing starts. ``--thresholds PATH`` also times, at each B of a grid, the kernel with the
top-k inside the launch against the score-only kernel followed by torch's stable sort, and writes the largest
B up to which the fused top-k wins (``fused_topk_max_b``) for this device into PATH (merged with the other
devices there); ``fused_select``'s ``auto`` routing reads it from ``$DISSECT_SELECT_THRESHOLDS`` or
``kernels/select_thresholds.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

from dissect_fast.kernels.fused_select import (
    KernelConfig,
    _fused_select_triton,
    fused_select,
    fused_select_reference,
    save_thresholds,
)

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # benchmarks/ is not a package
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchkit  # noqa: E402

SELECT_RATE = 0.2
TARGETS = {"speedup_eager": 3.0, "speedup_compiled": 1.5, "step_share": 0.01, "copy_fraction": 0.6}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes: D = 512 at every B, plus B = 65536, D = 1024")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/select-<device>-<date>.json)"
    )
    p.add_argument("--sizes", default=None, help="comma-separated BxD list overriding the default sizes, e.g. 4096x512")
    p.add_argument("--sweep", action="store_true", help="also time kernel configs at B in {4096, 65536}, D = 512")
    p.add_argument("--no-train-step", action="store_true", help="skip the ViT-B-32 training step")
    p.add_argument(
        "--thresholds",
        type=Path,
        default=None,
        help="also measure the fused top-k vs score-then-sort crossover and write it to this JSON "
        "(e.g. kernels/select_thresholds.json)",
    )
    return p.parse_args(argv)


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float | None:
    """Device time alone: the calls replayed from a CUDA graph (no host overhead, and no
    L2 flush between calls, so small inputs stay in L2 for every provider)."""
    try:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as e:  # noqa: BLE001 (a provider that cannot be captured gets no number)
        print(f"cuda graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e6


def make_inputs(B: int, D: int, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(B + D)
    f = torch.randn(B, D, device="cuda", dtype=dtype, generator=g)
    t = (f + torch.randn(B, D, device="cuda", dtype=dtype, generator=g)).to(dtype)
    N = 4 * B
    ids = torch.randperm(N, device="cuda", generator=g)[:B]
    history = torch.rand(N, device="cuda", generator=g) * 60
    history[torch.rand(N, device="cuda", generator=g) < 0.3] = float("nan")
    return f, t, ids, history


def op_bytes(B: int, D: int, k: int, itemsize: int) -> int:
    # features + ids + history gather and scatter + score and delta + index
    return 2 * B * D * itemsize + 8 * B + 2 * 4 * B + 2 * 4 * B + 8 * k


def bench_size(B: int, D: int, copy_gbps: float) -> dict:
    f, t, ids, history = make_inputs(B, D)
    k = int(SELECT_RATE * B)
    ref = functools.partial(fused_select_reference, momentum=0.9)
    torch._dynamo.reset()
    compiled = torch.compile(ref, fullgraph=True, dynamic=False)
    compiled(f, t, ids, history, k)  # compiled here, outside the timed region
    fused_select(f, t, ids, history, k, momentum=0.9)  # the Triton kernel's compilation too
    torch.cuda.synchronize()
    providers = {
        "fused": lambda: fused_select(f, t, ids, history, k, momentum=0.9),
        "fused_k0": lambda: fused_select(f, t, ids, history, 0, momentum=0.9),
        "eager": lambda: ref(f, t, ids, history, k),
        "compiled": lambda: compiled(f, t, ids, history, k),
    }
    ms = {f"{n}_ms": bench(fn) for n, fn in providers.items()}
    ms.update({f"{n}_graph_ms": bench_graph(fn) for n, fn in providers.items()})
    nbytes = op_bytes(B, D, k, f.element_size())
    gbps = nbytes / ms["fused_ms"] / 1e6
    row = {"B": B, "D": D, "k": k, "dtype": "bfloat16", **{n: v and round(v, 5) for n, v in ms.items()}}
    row.update(
        speedup_eager=round(ms["eager_ms"] / ms["fused_ms"], 2),
        speedup_compiled=round(ms["compiled_ms"] / ms["fused_ms"], 2),
        bytes=nbytes,
        fused_gbps=round(gbps, 1),
        copy_fraction=round(gbps / copy_gbps, 3),
        scoring_copy_fraction=round(nbytes / ms["fused_k0_ms"] / 1e6 / copy_gbps, 3),
    )
    if ms["fused_graph_ms"]:
        row["graph_copy_fraction"] = round(nbytes / ms["fused_graph_ms"] / 1e6 / copy_gbps, 3)
    print(json.dumps(row), flush=True)
    return row


def sweep() -> list[dict]:
    """Top-k inside the launch vs score-only kernel + torch's stable sort, where both apply."""
    configs = {"in_kernel_topk": KernelConfig(), "torch_sort_topk": KernelConfig(fused_topk_max_b=0)}
    rows = []
    for B in (1024, 4096, 16384):
        f, t, ids, history = make_inputs(B, 512)
        k = min(int(SELECT_RATE * B), 1024)
        for name, cfg in configs.items():
            run = functools.partial(_fused_select_triton, f, t, ids, history, k, 0.9, 100.0, False, "delta", cfg)
            rows.append(
                {
                    "B": B,
                    "D": 512,
                    "k": k,
                    "config": name,
                    "fused_ms": round(bench(run), 5),
                    "graph_ms": bench_graph(run),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def routing_sweep(sizes=(1024, 2048, 4096, 8192, 16384, 32768, 65536), D: int = 512) -> dict:
    """At each B (k = 0.2 B, at most the in-launch sort's 1,024): the top-k inside the launch vs the score-only
    kernel + torch's stable sort. ``fused_topk_max_b``: the largest B up to which the fused top-k is never slower
    (0: the sort wins from the smallest B)."""
    fused_cfg, sort_cfg = KernelConfig(fused_topk_max_b=max(sizes)), KernelConfig(fused_topk_max_b=0)
    rows, best = [], 0
    winning = True
    for B in sizes:
        f, t, ids, history = make_inputs(B, D)
        k = min(int(SELECT_RATE * B), fused_cfg.max_sort)
        ms = {}
        for name, cfg in (("fused_topk", fused_cfg), ("score_then_sort", sort_cfg)):
            run = functools.partial(_fused_select_triton, f, t, ids, history, k, 0.9, 100.0, False, "delta", cfg)
            run()  # compiled outside the timed region
            ms[name] = bench(run)
        row = {"B": B, "D": D, "k": k, **{f"{n}_ms": round(v, 5) for n, v in ms.items()}}
        row["fused_wins"] = ms["fused_topk"] <= ms["score_then_sort"]
        winning = winning and row["fused_wins"]
        if winning:
            best = B
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"fused_topk_max_b": best, "k_rule": "k = min(0.2 B, 1024)", "rows": rows}


def train_step_ms(batch: int = 1024) -> tuple[float | None, str]:
    """Median time of one open_clip ViT-B-32 training step, or None and the reason."""
    try:
        import open_clip
    except ImportError as e:
        return None, f"open_clip not importable: {e}"
    try:
        model = open_clip.create_model("ViT-B-32", pretrained=None).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        loss_fn = open_clip.ClipLoss()
        images = torch.randn(batch, 3, 224, 224, device="cuda")
        texts = torch.randint(0, 49408, (batch, 77), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(images, texts)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2], "open_clip ViT-B-32, bf16 autocast, AdamW, random init and data"
    except torch.cuda.OutOfMemoryError:
        return None, f"out of memory at batch {batch}"
    except RuntimeError as e:
        return None, f"training step failed: {str(e)[:200]}"
    finally:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_select needs a CUDA device", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name()
    out = benchkit.result_path("select", name, args.out)
    if args.sizes:
        sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    elif args.quick:
        sizes = [(B, 512) for B in (1024, 4096, 16384, 65536)] + [(65536, 1024)]
    else:
        sizes = [(B, D) for B in (1024, 4096, 16384, 65536) for D in (512, 768, 1024)]
    result = {
        **benchkit.header("fused_select", "bench_select.py", "cuda", argv, modules=("triton",)),
        "select_rate": SELECT_RATE,
        "timing": "triton.testing.do_bench median (L2 flushed); *_graph_ms: do_bench_cudagraph median",
    }

    def save() -> None:
        benchkit.write_json(out, result)

    sizes.sort(key=lambda bd: -bd[0])  # largest B first: a session cut short keeps the rows it most needs
    copy_gbps = copy_bandwidth_gbps()
    result["copy_bandwidth_gbps"] = round(copy_gbps, 1)
    print(f"{name}: copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = result["rows"] = []
    for B, D in sizes:
        rows.append(bench_size(B, D, copy_gbps))
        save()
    if args.thresholds is not None:
        result["routing"] = routing_sweep()
        save_thresholds(args.thresholds, name, result["routing"]["fused_topk_max_b"], result["routing"]["rows"])
        result["routing"]["written_to"] = str(args.thresholds)
        save()
    result["sweep"] = sweep() if args.sweep else []
    save()

    step_ms, step_note = (None, "skipped (--no-train-step)") if args.no_train_step else train_step_ms()
    f, t, ids, history = make_inputs(1024, 512)
    op_ms = bench(lambda: fused_select(f, t, ids, history, 204, momentum=0.9))
    share = None if step_ms is None else op_ms / step_ms
    result["train_step"] = {
        "batch": 1024,
        "step_ms": step_ms,
        "op_ms": round(op_ms, 5),
        "share": share,
        "note": step_note,
    }

    at = {(r["B"], r["D"]): r for r in rows}
    main_row = at.get((4096, 512))
    big = [r for r in rows if r["B"] == 65536]
    targets = {
        "speedup_eager_B4096_D512": {"value": main_row and main_row["speedup_eager"], "target": ">= 3"},
        "speedup_compiled_B4096_D512": {"value": main_row and main_row["speedup_compiled"], "target": ">= 1.5"},
        "train_step_share_B1024": {"value": share, "target": "< 0.01"},
        "copy_fraction_B65536": {"value": {r["D"]: r["copy_fraction"] for r in big}, "target": ">= 0.6"},
    }
    targets["speedup_eager_B4096_D512"]["pass"] = bool(main_row) and main_row["speedup_eager"] >= 3.0
    targets["speedup_compiled_B4096_D512"]["pass"] = bool(main_row) and main_row["speedup_compiled"] >= 1.5
    targets["train_step_share_B1024"]["pass"] = None if share is None else share < TARGETS["step_share"]
    targets["copy_fraction_B65536"]["pass"] = bool(big) and all(r["copy_fraction"] >= 0.6 for r in big)
    for n, v in targets.items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[v["pass"]]
        print(f"{verdict:4s} {n}: {v['value']} (target {v['target']})")
    result["targets"] = targets
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
