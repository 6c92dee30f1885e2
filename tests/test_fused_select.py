"""Tests of the fused selection op (dissect_fast.kernels.fused_select).

* reference semantics on hand-made inputs (exact expected index with ties and NaN);
* the Triton kernel itself on CPU under TRITON_INTERPRET=1, against the reference. The
  interpreter must be switched on before triton is imported, and other test modules may
  have imported it already, so those cases run in a subprocess: this file run as a script
  (`python tests/test_fused_select.py --interpret`) prints a JSON summary;
* the op inside torch.compile(fullgraph=True) and torch.library.opcheck;
* GPU tests (marker `gpu`): the same comparisons at full size, bf16 included.

Data: integer-valued features make every dot product and squared norm exact in any
summation order, and the kernel rounds sqrt and division like IEEE (as the reference), so
scores agree bitwise and the index must match the reference's exactly, ties included.
Continuous (Gaussian) features check values within per-dtype tolerances, and the index
against a stable sort of the op's own keys (a near-tie could legitimately flip between two
summation orders).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dissect_fast.kernels.fused_select import (
    HAS_TRITON,
    MAX_B,
    KernelConfig,
    _fused_select_triton,
    fused_select,
    fused_select_reference,
)

# Values are float32 on both sides, so the input dtype only changes which inputs exist;
# tolerances are still per dtype (scores are 100 * cos: 1e-3 absolute is 1e-5 in cos).
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-3},
    torch.float16: {"rtol": 1e-5, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-5, "atol": 1e-3},
}
# Forces the radix-select, compaction and segmented-sort paths at small B.
SMALL_CFG = {"chunk": 64, "max_sort": 16, "full_sort_max": 16, "min_sort": 16, "segmented": True}
# Forces the score-only kernel + stable torch sort path at small B.
SORT_CFG = {"fused_topk_max_b": 16}


# ----------------------------------------------------------------------------------------
# Shared helpers (also used by the interpreter subprocess).
# ----------------------------------------------------------------------------------------


def make_inputs(B, D, dtype, device, *, integer, seed, nonfinite=False, all_unseen=False):
    """Features with duplicated rows (exact score ties), history with NaN (unseen) entries
    and duplicated values (exact delta ties), unique ids."""
    gen = torch.Generator().manual_seed(seed)
    if integer:
        f = torch.randint(-3, 4, (B, D), generator=gen).float()
        g = torch.randint(-3, 4, (B, D), generator=gen).float()
    else:
        f = torch.randn(B, D, generator=gen)
        g = torch.randn(B, D, generator=gen)
    N = 3 * B + 5
    ids = torch.randperm(N, generator=gen)[:B]
    history = torch.randint(0, 400, (N,), generator=gen).float() / 4  # exact quarters
    history[torch.rand(N, generator=gen) < 0.3] = float("nan")
    if B >= 4:
        n_dup = B // 4
        src = torch.randint(0, B - n_dup, (n_dup,), generator=gen)
        f[B - n_dup :] = f[src]
        g[B - n_dup :] = g[src]
        history[ids[B - n_dup :]] = history[ids[src]]
        f[1] = 0.0  # zero row: the eps path, cos = 0
    if nonfinite and B >= 3:
        f[2, 0] = float("inf")  # NaN score and key, which rank first
    if all_unseen:
        history.fill_(float("nan"))  # first epoch: every delta is 0, all tied
    return f.to(dtype).to(device), g.to(dtype).to(device), ids.to(device), history.to(device)


def stable_topk(keys, k):
    keys = torch.where(keys == 0, torch.zeros_like(keys), keys)
    return torch.sort(keys, descending=True, stable=True).indices[:k]


def poison_allocator(device, nbytes):
    """Best effort: leave NaN-filled blocks in the allocator so unwritten outputs show up."""
    junk = torch.full((nbytes // 4 + 1,), float("nan"), device=device)
    del junk


def check_case(
    B,
    D,
    dtype,
    k,
    momentum,
    key,
    *,
    device,
    integer,
    seed,
    normalized=False,
    cfg=None,
    nonfinite=False,
    all_unseen=False,
):
    """Runs the Triton kernel and the reference on the same inputs; returns a list of
    failure messages (empty when they agree)."""
    f, g, ids, history = make_inputs(
        B, D, dtype, device, integer=integer, seed=seed, nonfinite=nonfinite, all_unseen=all_unseen
    )
    if normalized:
        f = torch.nn.functional.normalize(f.float(), dim=-1).to(dtype)
        g = torch.nn.functional.normalize(g.float(), dim=-1).to(dtype)
    use_history = key == "delta" or momentum is not None or seed % 2 == 0
    h_ref = history.clone() if use_history else None
    h_ker = history.clone() if use_history else None
    i_ref, s_ref, d_ref = fused_select_reference(
        f, g, ids, h_ref, k, momentum=momentum, scale=100.0, normalized=normalized, key=key
    )
    poison_allocator(device, 16 * B + 8 * k + 1024)
    i_ker, s_ker, d_ker = _fused_select_triton(f, g, ids, h_ker, k, momentum, 100.0, normalized, key, cfg)
    tol = TOL[dtype]
    where = f"B={B} D={D} {dtype} k={k} momentum={momentum} key={key} integer={integer} cfg={cfg}"
    errors = []
    if i_ker.dtype != torch.int64 or i_ker.shape != (k,):
        errors.append(f"{where}: index {i_ker.dtype} {tuple(i_ker.shape)}")
        return errors
    if not torch.allclose(s_ker, s_ref, equal_nan=True, **tol):
        errors.append(f"{where}: score max err {(s_ker - s_ref).abs().nan_to_num(1e9).max().item():.3g}")
    if not torch.allclose(d_ker, d_ref, equal_nan=True, **tol):
        errors.append(f"{where}: delta max err {(d_ker - d_ref).abs().nan_to_num(1e9).max().item():.3g}")
    if use_history and not torch.allclose(h_ker, h_ref, equal_nan=True, **tol):
        errors.append(f"{where}: history max err {(h_ker - h_ref).abs().nan_to_num(1e9).max().item():.3g}")
    own = stable_topk(s_ker if key == "score" else d_ker, k)
    # key "score" ranks the raw scale * cos: the op's own (clamped) scores fix the order only above 0
    n_own = k if key == "delta" else min(k, int(((s_ker > 0) | s_ker.isnan()).sum()))
    if not torch.equal(i_ker[:n_own], own[:n_own]):
        errors.append(f"{where}: index != stable top-k of the op's own keys: {i_ker[:8].tolist()} {own[:8].tolist()}")
    if integer and not torch.equal(i_ker, i_ref):
        errors.append(f"{where}: index != reference: {i_ker[:8].tolist()} {i_ref[:8].tolist()}")
    return errors


def interpreter_cases():
    """Every B, D, dtype and k value of the brief, cycling momentum, key, data kind and the
    kernel config so that each path (full sort, radix select, segmented sort) is hit."""
    cases = []
    moms = [None, 0.0, 0.9]
    keys = ["delta", "score"]
    n = 0
    for B in (1, 7, 64, 200):
        for D in (16, 48):
            for dtype in ("float32", "float16"):
                for k in sorted({0, 1, B // 3, B}):
                    for _ in range(2):
                        cfg = (None, SMALL_CFG, SORT_CFG)[n % 3]
                        cases.append(
                            {
                                "B": B,
                                "D": D,
                                "dtype": dtype,
                                "k": k,
                                "momentum": moms[n % 3],
                                "key": keys[(n // 3) % 2],
                                "integer": n % 4 != 3,
                                "seed": n,
                                "normalized": n % 7 == 5,
                                "cfg": cfg,
                            }
                        )
                        n += 1
    cases.append(
        {
            "B": 200,
            "D": 48,
            "dtype": "float32",
            "k": 66,
            "momentum": 0.9,
            "key": "delta",
            "integer": True,
            "seed": 1000,
            "normalized": False,
            "cfg": SMALL_CFG,
            "nonfinite": True,
        }
    )
    cases.append(
        {
            "B": 200,
            "D": 16,
            "dtype": "float32",
            "k": 200,
            "momentum": None,
            "key": "score",
            "integer": True,
            "seed": 1001,
            "normalized": False,
            "cfg": None,
            "nonfinite": True,
        }
    )
    # the default config's radix-select path (chunk 4096, sort block 1024, first digit
    # counted by every program), plus an all-ties batch (every delta 0: the position pass)
    cases.append(
        {
            "B": 4096,
            "D": 16,
            "dtype": "bfloat16",
            "k": 819,
            "momentum": 0.9,
            "key": "delta",
            "integer": True,
            "seed": 1002,
            "normalized": False,
            "cfg": None,
        }
    )
    cases.append(
        {
            "B": 4096,
            "D": 16,
            "dtype": "float32",
            "k": 1024,
            "momentum": None,
            "key": "delta",
            "integer": True,
            "seed": 1003,
            "normalized": False,
            "cfg": None,
            "all_unseen": True,
        }
    )
    return cases


def _run_interpreter_cases():
    t0 = time.time()
    failures = []
    cases = interpreter_cases()
    for c in cases:
        c = dict(c)
        cfg = KernelConfig(**c.pop("cfg")) if c["cfg"] else None
        dtype = getattr(torch, c.pop("dtype"))
        try:
            failures += check_case(
                c.pop("B"),
                c.pop("D"),
                dtype,
                c.pop("k"),
                c.pop("momentum"),
                c.pop("key"),
                device="cpu",
                cfg=cfg,
                **{kk: v for kk, v in c.items() if kk != "cfg"},
            )
        except Exception as e:  # noqa: BLE001 (report every case, keep going)
            failures.append(f"{c}: {type(e).__name__}: {e}")
    print(json.dumps({"cases": len(cases), "failures": failures, "seconds": round(time.time() - t0, 1)}))


# ----------------------------------------------------------------------------------------
# Reference semantics on hand-made inputs.
# ----------------------------------------------------------------------------------------


def _hand_inputs():
    # normalized=True, so score = max(0, 100 * <f, g>), exact for these values
    f = torch.tensor([[0.5, 0.0], [0.25, 0.0], [-0.5, 0.0], [0.5, 0.0], [0.75, 0.0], [0.25, 0.0]])
    g = torch.tensor([[1.0, 0.0]] * 6)
    ids = torch.tensor([3, 0, 5, 1, 4, 2])
    nan = float("nan")
    history = torch.tensor([60.0, nan, 20.0, 75.0, nan, 25.0])
    return f, g, ids, history


def test_reference_hand_computed_delta():
    f, g, ids, history = _hand_inputs()
    # scores [50, 25, 0, 50, 75, 25]; h[ids] = [75, 60, 25, nan, nan, 20]
    # delta = [25, 35, 25, 0 (unseen), 0 (unseen), -5]: ties 25/25 and 0/0 -> smaller position
    index, score, delta = fused_select(f, g, ids, history, 4, momentum=0.5, normalized=True, backend="torch")
    assert index.tolist() == [1, 0, 2, 3]
    assert score.tolist() == [50.0, 25.0, 0.0, 50.0, 75.0, 25.0]
    assert delta.tolist() == [25.0, 35.0, 25.0, 0.0, 0.0, -5.0]
    # seen: 0.5 * h + 0.5 * s; unseen: s
    assert history.tolist() == [42.5, 50.0, 22.5, 62.5, 75.0, 12.5]


def test_reference_hand_computed_score_key_and_no_update():
    f, g, ids, history = _hand_inputs()
    before = history.clone()
    index, _score, delta = fused_select(f, g, ids, history, 6, normalized=True, key="score", backend="torch")
    assert index.tolist() == [4, 0, 3, 1, 5, 2]
    assert torch.equal(history.isnan(), before.isnan()) and torch.equal(history.nan_to_num(), before.nan_to_num())
    assert delta.tolist() == [25.0, 35.0, 25.0, 0.0, 0.0, -5.0]  # computed, history untouched
    index, _, delta = fused_select(f, g, None, None, 2, normalized=True, key="score", backend="torch")
    assert index.tolist() == [4, 0] and delta.tolist() == [0.0] * 6


def test_score_key_ranks_negative_pairs_by_raw_cosine_not_position():
    """The clipscore key is the unclamped 100 * cos (METHOD.md): negative pairs keep their order instead of tying
    at the clamped score 0 (which would make the top-k "the first batch positions")."""
    f = torch.tensor([[-0.9, 0.0], [-0.1, 0.0], [-0.5, 0.0], [0.2, 0.0], [-0.3, 0.0]])
    g = torch.tensor([[1.0, 0.0]] * 5)
    index, score, _ = fused_select(f, g, None, None, 3, normalized=True, key="score", backend="torch")
    assert index.tolist() == [3, 1, 4]  # 20, -10, -30 (the clamped scores tie 1, 4 with 0 and 2)
    assert score.tolist() == [0.0, 0.0, 0.0, pytest.approx(20.0), 0.0]  # the reported score stays clamped


def test_reference_momentum_zero_records_score_and_k_zero():
    f, g, ids, history = _hand_inputs()
    index, score, _ = fused_select(f, g, ids, history, 0, momentum=0.0, normalized=True, backend="torch")
    assert index.shape == (0,) and index.dtype == torch.int64
    assert torch.equal(history[ids], score)


def test_reference_eps_and_nonfinite():
    f = torch.tensor([[0.0, 0.0], [1.0, 1.0], [float("inf"), 1.0], [3.0, 4.0]])
    g = torch.tensor([[1.0, 0.0], [-1.0, -1.0], [1.0, 0.0], [3.0, 4.0]])
    index, score, _ = fused_select(f, g, None, None, 4, key="score", backend="torch")
    assert score[0] == 0.0 and score[1] == 0.0 and score[2].isnan()
    assert score[3].item() == pytest.approx(100.0)
    assert index.tolist() == [2, 3, 0, 1]  # NaN first, then 100, then the 0/0 tie by position


def test_stable_descending_sort_keeps_position_order():
    keys = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, -0.0, 0.0])
    assert torch.sort(keys, descending=True, stable=True).indices.tolist() == [1, 2, 4, 0, 3, 5, 6]


def test_validation_errors():
    f, g, ids, history = _hand_inputs()
    bad = [
        ({"image_features": f[:, :1].clone()}, "features"),
        ({"image_features": f.double()}, "float32"),
        ({"image_features": f.t().contiguous().t()}, "contiguous"),
        ({"ids": ids.int()}, "ids"),
        ({"ids": ids[:5]}, "ids"),
        ({"history": history.double()}, "history"),
        ({"k": 7}, "k must"),
        ({"k": -1}, "k must"),
        ({"history": None}, "history"),
        ({"momentum": 1.5}, "momentum"),
        ({"key": "loss"}, "key"),
        ({"backend": "cuda"}, "backend"),
    ]
    for change, match in bad:
        args = {
            "image_features": f,
            "text_features": g,
            "ids": ids,
            "history": history,
            "k": 2,
            "momentum": 0.9,
            "key": "delta",
            "backend": "torch",
        }
        args.update(change)
        with pytest.raises(ValueError, match=match):
            fused_select(**args)
    with pytest.raises(ValueError, match="batch size"):
        fused_select(torch.zeros(MAX_B + 1, 1), torch.zeros(MAX_B + 1, 1), None, None, 1, key="score")
    with pytest.raises(ValueError, match="feature dim"):
        fused_select(torch.zeros(2, 2049), torch.zeros(2, 2049), None, None, 1, key="score")


@pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1", reason="needs triton, no interpreter")
def test_triton_backend_on_cpu_needs_interpreter():
    f, g, ids, history = _hand_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_select(f, g, ids, history, 2, backend="triton")


def test_opcheck():
    f, g, ids, history = make_inputs(33, 16, torch.float32, "cpu", integer=True, seed=3)
    args = (f, g, ids, history, 11, 0.9, 100.0, False, "delta", "torch")
    torch.library.opcheck(torch.ops.dissect_fast.fused_select.default, args)


def _compiled_matches_eager(device, backend):
    f, g, ids, history = make_inputs(200, 48, torch.float32, device, integer=True, seed=5)

    def step(f, g, ids, history):
        index, score, delta = fused_select(f, g, ids, history, 40, momentum=0.9)
        return index, score.mean() + delta.sum(), f[index].sum()

    h_eager, h_comp = history.clone(), history.clone()
    expected = step(f, g, ids, h_eager)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=backend)(f, g, ids, h_comp)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1:], expected[1:])
    torch.testing.assert_close(h_comp, h_eager, equal_nan=True)


def test_torch_compile_fullgraph_cpu():
    # aot_eager: the op goes through dynamo, functionalization and the fake impl without a
    # graph break; inductor's C++ codegen is skipped to keep the CPU test fast.
    _compiled_matches_eager("cpu", "aot_eager")


# ----------------------------------------------------------------------------------------
# The Triton kernel under the CPU interpreter (subprocess).
# ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_kernel_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--interpret"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cases"] >= 100
    assert not summary["failures"], "\n".join(summary["failures"][:20])


# ----------------------------------------------------------------------------------------
# GPU.
# ----------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")

GPU_CASES = [
    # B, D, dtype, k, momentum, key, normalized, cfg
    (1, 16, torch.float32, 1, 0.9, "delta", False, None),
    (7, 33, torch.float16, 3, None, "score", False, None),
    (1000, 512, torch.bfloat16, 200, 0.9, "delta", False, None),
    (1023, 500, torch.float32, 1023, 0.0, "delta", False, None),
    (4096, 512, torch.bfloat16, 819, 0.9, "delta", False, None),
    (4096, 768, torch.float16, 4096, None, "score", True, None),
    (16384, 1024, torch.bfloat16, 3276, 0.9, "delta", False, None),
    (65536, 512, torch.bfloat16, 13107, 0.9, "delta", False, None),
    (65536, 2048, torch.bfloat16, 65536, None, "delta", False, None),
    (65536, 2048, torch.float32, 1, 0.9, "score", False, None),
    (16384, 512, torch.bfloat16, 1024, 0.9, "delta", False, None),
    (5000, 64, torch.bfloat16, 2500, 0.9, "delta", False, {**SMALL_CFG, "chunk": 256, "max_sort": 256}),
    (5000, 64, torch.bfloat16, 500, None, "score", False, {"chunk": 256}),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("integer", [True, False], ids=["int", "gauss"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"B{c[0]}-D{c[1]}-{str(c[2])[6:]}-k{c[3]}-{c[5]}")
def test_gpu_kernel_matches_reference(case, integer):
    B, D, dtype, k, momentum, key, normalized, cfg = case
    cfg = KernelConfig(**cfg) if cfg else None
    errors = check_case(
        B, D, dtype, k, momentum, key, device="cuda", integer=integer, seed=B + D + k, normalized=normalized, cfg=cfg
    )
    assert not errors, "\n".join(errors)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("B", [4096, 65536])
def test_gpu_all_ties_first_epoch(B):
    # first epoch: every sample unseen, delta = 0 everywhere -> index = 0..k-1
    f, g, ids, history = make_inputs(B, 64, torch.bfloat16, "cuda", integer=False, seed=9)
    history.fill_(float("nan"))
    k = B // 5
    index, _, _ = fused_select(f, g, ids, history, k, momentum=0.9)
    assert torch.equal(index, torch.arange(k, device="cuda"))
    assert not history[ids].isnan().any()


@pytest.mark.gpu
@requires_cuda
def test_gpu_no_host_sync_and_repeatable():
    f, g, ids, history = make_inputs(4096, 512, torch.bfloat16, "cuda", integer=True, seed=11)
    fused_select(f, g, ids, history.clone(), 819, momentum=0.9)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [fused_select(f, g, ids, history.clone(), 819, momentum=0.9) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0])


@pytest.mark.gpu
@requires_cuda
def test_gpu_torch_compile_fullgraph():
    _compiled_matches_eager("cuda", "inductor")


if __name__ == "__main__":
    if "--interpret" in sys.argv:
        _run_interpreter_cases()
