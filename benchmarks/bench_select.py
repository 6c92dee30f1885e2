"""Fused selection op vs the unfused torch reference (eager and torch.compile'd), on CUDA.

    python -m benchmarks.bench_select                  # B in {1024, 4096, 16384, 65536} x D in {512, 768, 1024}
    python -m benchmarks.bench_select --quick --out /tmp/select.json

One step of DISSect selection: bf16 features [B, D], key = delta, momentum 0.9 history update, k = 0.2 B (the
paper's rate). Times are ``triton.testing.do_bench`` medians (warm-up, L2 flushed between runs; ``*_graph_ms``:
replayed from a CUDA graph, device time alone). Achieved bandwidth counts the bytes the op must move (both feature
matrices, ids, the history gather and scatter, score, delta, index) against a measured device-to-device copy;
``fused_k0_ms`` is the launch with k = 0, which isolates the top-k. The op's share of a training step uses an
open_clip ViT-B-32 bf16 step at batch 1024. Sizes run largest B first (the rows a short GPU session needs most).
``--thresholds PATH`` also times, per B, the top-k inside the launch against the score-only kernel + torch's stable
sort and writes the largest B up to which the fused top-k wins (``fused_topk_max_b``) for this device into PATH,
which ``fused_select``'s ``auto`` routing reads (``$DISSECT_SELECT_THRESHOLDS`` or kernels/select_thresholds.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

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


def bench_graph(fn) -> float | None:
    """Replayed from a CUDA graph: no host overhead and no L2 flush (small inputs stay in L2 for every provider)."""
    try:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as e:  # noqa: BLE001 (a provider that cannot be captured gets no number)
        print(f"cuda graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


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
    ms.update({f"{n}_graph_ms": bench_graph(fn) for n, fn in providers.items()})
    nbytes = 2 * B * D * f.element_size() + 8 * B + 8 * B + 8 * B + 8 * k

    def share(t_ms: float) -> float:
        return round(nbytes / t_ms / 1e6 / copy_gbps, 3)

    row = {"B": B, "D": D, "k": k, "dtype": "bfloat16", **{n: v and round(v, 5) for n, v in ms.items()}}
    row.update(speedup_eager=round(ms["eager_ms"] / ms["fused_ms"], 2), bytes=nbytes,
               speedup_compiled=round(ms["compiled_ms"] / ms["fused_ms"], 2),
               fused_gbps=round(nbytes / ms["fused_ms"] / 1e6, 1), copy_fraction=share(ms["fused_ms"]),
               scoring_copy_fraction=share(ms["fused_k0_ms"]))  # fmt: skip
    if ms["fused_graph_ms"]:
        row["graph_copy_fraction"] = share(ms["fused_graph_ms"])
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


def train_step_ms(batch: int = 1024) -> tuple[float | None, str]:
    """Median CUDA-event time of one open_clip ViT-B-32 training step (bf16, AdamW), or None and the reason."""
    try:
        import open_clip

        model = open_clip.create_model("ViT-B-32", pretrained=None).cuda()
        opt, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-4), open_clip.ClipLoss()
        images = torch.randn(batch, 3, 224, 224, device="cuda")
        texts = torch.randint(0, 49408, (batch, 77), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(images, texts)
                loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = []
        for i in range(13):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times += [a.elapsed_time(b)] if i >= 3 else []
        return sorted(times)[len(times) // 2], "open_clip ViT-B-32, bf16 autocast, AdamW, random init and data"
    except (ImportError, RuntimeError) as e:  # not installed, out of memory, a failed step
        return None, f"no training step: {type(e).__name__}: {str(e)[:200]}"
    finally:
        torch.cuda.empty_cache()


def targets(rows: list[dict], share: float | None) -> dict:
    row, big = next((r for r in rows if (r["B"], r["D"]) == (4096, 512)), None), [r for r in rows if r["B"] == 65536]
    out = {
        "speedup_eager_B4096_D512": (row and row["speedup_eager"], ">= 3", row and row["speedup_eager"] >= 3.0),
        "speedup_compiled_B4096_D512": (row and row["speedup_compiled"], ">= 1.5", row and row["speedup_compiled"] >= 1.5),
        "train_step_share_B1024": (share, "< 0.01", None if share is None else share < 0.01),
        "copy_fraction_B65536": ({r["D"]: r["copy_fraction"] for r in big}, ">= 0.6",
                                 bool(big) and all(r["copy_fraction"] >= 0.6 for r in big)),
    }  # fmt: skip
    for n, (value, target, ok) in out.items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[None if ok is None else bool(ok)]
        print(f"{verdict:4s} {n}: {value} (target {target})")
    return {n: {"value": v, "target": t, "pass": None if ok is None else bool(ok)} for n, (v, t, ok) in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_select", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes: D = 512 at every B, plus B = 65536, D = 1024")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/select-DEVICE-DATE.json)")
    p.add_argument("--sizes", default=None, help="comma-separated BxD list overriding the default sizes, e.g. 4096x512")
    p.add_argument("--no-train-step", action="store_true", help="skip the ViT-B-32 training step")
    p.add_argument("--thresholds", type=Path, default=None, help="measure the fused top-k vs score-then-sort "
                   "crossover and write it to this JSON (e.g. kernels/select_thresholds.json)")  # fmt: skip
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_select needs a CUDA device", file=sys.stderr)
        return 1
    if args.sizes:
        sizes = [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    elif args.quick:
        sizes = [(B, 512) for B in (1024, 4096, 16384, 65536)] + [(65536, 1024)]
    else:
        sizes = [(B, D) for B in (1024, 4096, 16384, 65536) for D in (512, 768, 1024)]
    name = torch.cuda.get_device_name()
    out = harness.result_path("select", name, args.out)
    result = {
        **harness.header("fused_select", "bench_select", "cuda", argv, modules=("triton",)),
        "select_rate": SELECT_RATE,
        "timing": "triton.testing.do_bench median (L2 flushed); *_graph_ms: do_bench_cudagraph median",
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
    step_ms, note = (None, "skipped (--no-train-step)") if args.no_train_step else train_step_ms()
    f, t, ids, history = make_inputs(1024, 512)
    op_ms = bench(lambda: fused_select(f, t, ids, history, 204, momentum=0.9))
    share = None if step_ms is None else op_ms / step_ms
    result["train_step"] = {"batch": 1024, "step_ms": step_ms, "op_ms": round(op_ms, 5), "share": share, "note": note}
    result["targets"] = targets(rows, share)
    print(f"wrote {harness.write_json(out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
