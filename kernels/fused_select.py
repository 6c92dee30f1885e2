"""Fused DISSect selection: CLIPScore, delta, history update and top-k (in one launch for small B and k).

One training step of online selection needs, for a batch of B pairs with features f_i, g_i:

    score_i = max(0, scale * cos(f_i, g_i))                      (CLIPScore, float32)
    delta_i = h[id_i] - score_i, or 0 when h[id_i] is NaN         (NaN = never scored)
    h[id_i] <- score_i if NaN else momentum * h[id_i] + (1 - momentum) * score_i
    index   = batch positions of the k largest keys, in descending order of the key; ties go
              to the smaller position. key = delta, or score: then the raw scale * cos(f_i, g_i)
              before the clamp (the reference's clipscore ranking; same order where positive)

In plain torch that is ~15 kernels: two casts, three products and reductions (each a
[B, D] float32 temporary written to and read back from HBM), a gather, isnan/where, the
blend, a scatter and a sort, each paying its launch latency. The fused kernel reads each
feature row exactly once, keeps every per-row value in registers and touches history with
one gather and one scatter; nothing leaves the launch but the outputs, and nothing syncs.

Top-k. Keys are mapped to order-preserving int32 (`_order_key`: -0 == +0, NaN largest). Which path a
launch takes (defaults of `KernelConfig`; `auto` may lower or raise `fused_topk_max_b`, below):
  * B <= 1,024 (`full_sort_max`, and B <= `fused_topk_max_b`), any k >= 1: ONE launch. The last program to finish (an atomic ticket,
    acq_rel) sorts all B composite keys in registers (`tl.sort`, bitonic; key << 16 | 65535 - position:
    unique, ties resolve to the smaller position).
  * 1,024 < B <= 16,384 (`fused_topk_max_b`) and k <= 1,024 (`max_sort`): ONE launch. The last program runs
    an MSB-first radix select for the k-th key with 8-bit digit histograms (the first digit's histogram is
    built by all programs with atomics while scoring), a position pass resolves ties at the threshold, and
    the k survivors are compacted and sorted in registers.
  * Everything else: B > 16,384 (any k), or B > 1,024 with k > 1,024 (at the paper's r = 0.2 that is every
    B >= 5,125): the kernel only SCORES (leaner, higher occupancy), then torch's stable radix sort of all B
    order keys ranks them (`torch.sort`, multi-block CUB, a few launches): still no host sync, and the same
    tie rule. `KernelConfig(segmented=True)` keeps any k inside the launch instead (sorted in segments, each
    found by its own radix select: correct but slow).
  * k = 0: scoring only, no top-k.
Measured thresholds: `benchmarks/bench_select.py --thresholds PATH` times the fused top-k against
score-then-sort per B on a GPU and records the largest B where the fused top-k still wins, per device name.
`backend="auto"` (the default) reads that file, `$DISSECT_SELECT_THRESHOLDS` or else
`kernels/select_thresholds.json`, and uses its `fused_topk_max_b` for the device it runs on; with no file or
no entry for the device, the constants above apply. (An explicit `KernelConfig` is used as given.)

The plain-torch reference `fused_select_reference` (no Python loop over samples, no host
sync) defines the semantics; `fused_select` dispatches to the Triton kernel on CUDA and to
the reference otherwise, and is registered as the custom op `dissect_fast::fused_select`
so `torch.compile(fullgraph=True)` code calls it without a graph break.

Caller contract (not checked, checking would need a host sync): ids lie in [0, N) and are
unique within the batch (duplicate ids race on the history update). The Triton path keeps
a small per-device scratch (ticket counter and a 256-bin histogram) that every launch
leaves zeroed again, so launches on one device must not run concurrently on two streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch reference still works
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["MAX_B", "MAX_D", "auto_config", "fused_select", "fused_select_reference", "measured_thresholds"]

MAX_B = 65536  # positions are packed into 16 bits of the composite sort key
MAX_D = 2048
EPS = 1e-12  # as F.normalize: x / max(||x||, eps)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KEYS = ("delta", "score")
_BACKENDS = ("auto", "triton", "torch")
_NUM_BINS = 256  # radix digit: 8 bits


# ----------------------------------------------------------------------------------------
# Plain-torch reference (defines the semantics).
# ----------------------------------------------------------------------------------------


def _canonical_key(key: torch.Tensor) -> torch.Tensor:
    """-0.0 -> +0.0 and any NaN -> +NaN, so that equal keys compare equal and NaN sorts first."""
    key = torch.where(key == 0, torch.zeros_like(key), key)
    return torch.where(torch.isnan(key), torch.full_like(key, float("nan")), key)


def fused_select_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ids: torch.Tensor | None,
    history: torch.Tensor | None,
    k: int,
    *,
    momentum: float | None = None,
    scale: float = 100.0,
    normalized: bool = False,
    key: str = "delta",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unfused torch version of `fused_select` (same arguments and outputs, no validation)."""
    f = image_features.float()
    g = text_features.float()
    dot = (f * g).sum(-1)
    if normalized:
        cos = dot
    else:
        # sqrt through float64 is correctly rounded (torch's vectorised float32 CPU sqrt
        # is not always), so kernel and reference agree bitwise whenever the sums are exact
        nf = (f * f).sum(-1).double().sqrt().float().clamp_min(EPS)
        ng = (g * g).sum(-1).double().sqrt().float().clamp_min(EPS)
        cos = dot / (nf * ng)
    x = cos * scale
    score = torch.where(x < 0, torch.zeros_like(x), x)  # max(0, x), NaN propagates
    if history is not None:
        h = history[ids]  # read before the update
        seen = ~torch.isnan(h)
        delta = torch.where(seen, h - score, torch.zeros_like(score))
        if momentum is not None:
            assert ids is not None  # required with a history buffer (_validate)
            blend = h * momentum + score * (1.0 - momentum)
            history.index_copy_(0, ids, torch.where(seen, blend, score))
    else:
        delta = torch.zeros_like(score)
    # key "score" ranks the raw scaled cosine (the reference's clipscore ranking): the clamp would make every
    # negative pair tie at 0, and the tie rule would then pick the first batch positions
    keys = _canonical_key(x if key == "score" else delta)
    # A stable descending sort keeps equal keys in position order: ties -> smaller position.
    index = torch.sort(keys, descending=True, stable=True).indices[:k]
    return index, score, delta


# ----------------------------------------------------------------------------------------
# Triton kernel.
# ----------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _order_key(kv):
        """float32 -> int32 whose signed order is the float order (-0 == +0, NaN largest)."""
        bits = kv.to(tl.int32, bitcast=True)
        bits = tl.where(kv == 0.0, 0, bits)
        bits = tl.where(kv != kv, 0x7FC00000, bits)  # noqa: PLR0124 (NaN test)
        # negative floats: flip the 31 magnitude bits so that larger magnitude -> smaller int
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _composite(k32, pos):
        """Unique int64 sort key: unsigned order key in bits 16..47, 65535 - position below."""
        return ((k32.to(tl.int64) + 2147483648) << 16) | (65535 - pos).to(tl.int64)

    @triton.jit
    def _pick_bin(hist, need, NUM_BINS: tl.constexpr):
        """Digit bin b holding the need-th largest candidate; its count; count above it."""
        bins = tl.arange(0, NUM_BINS)
        total = tl.sum(hist, 0)
        ge = total - tl.cumsum(hist, 0) + hist  # candidates with digit >= b
        b = tl.max(tl.where(ge >= need, bins, -1), 0)
        hb = tl.sum(tl.where(bins == b, hist, 0), 0)
        above = tl.sum(tl.where(bins == b, ge, 0), 0) - hb
        return b, hb, above

    @triton.jit
    def _select_threshold32(work32_ptr, hist0_ptr, B, k, CHUNK: tl.constexpr, NUM_BINS: tl.constexpr):
        """Radix select over the B order keys: returns (thr, pstar) such that the selected
        set {i : k32_i > thr or (k32_i == thr and i <= pstar)} has exactly k members."""
        bins = tl.arange(0, NUM_BINS)
        # digit 0 (bits 24..31 of the unsigned key): histogram built by all programs.
        hist = tl.load(hist0_ptr + bins, cache_modifier=".cg")
        tl.debug_barrier()
        tl.store(hist0_ptr + bins, tl.zeros([NUM_BINS], tl.int32))  # leave the scratch zeroed
        b, hb, above = _pick_bin(hist, k, NUM_BINS)
        need = k - above
        prefix = b << 24  # unsigned key prefix, as an int32 bit pattern
        done = (need == hb).to(tl.int32)
        for j in tl.static_range(1, 4):
            SHIFT = 24 - 8 * j
            if done == 0:
                hist = tl.zeros([NUM_BINS], tl.int32)
                for start in range(0, B, CHUNK):
                    offs = start + tl.arange(0, CHUNK)
                    m = offs < B
                    u = tl.load(work32_ptr + offs, mask=m, other=0, cache_modifier=".cg") ^ -2147483648
                    cand = m & ((u >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
                    digit = (u >> SHIFT) & (NUM_BINS - 1)
                    h = tl.histogram(tl.where(cand, digit, 0), NUM_BINS)
                    n_out = CHUNK - tl.sum(cand.to(tl.int32), 0)  # non-candidates landed in bin 0
                    hist += tl.where(bins == 0, h - n_out, h)
                b, hb, above = _pick_bin(hist, need, NUM_BINS)
                need = need - above
                prefix = prefix | (b << SHIFT)
                done = (need == hb).to(tl.int32)
        thr = prefix ^ -2147483648  # back to the signed order key
        pstar = B
        if done == 0:
            # thr is the exact k-th key and only `need` of its ties fit: take them in
            # position order (ties -> smaller position). pstar = position of the need-th tie.
            seen = need * 0
            for start in range(0, B, CHUNK):
                offs = start + tl.arange(0, CHUNK)
                m = offs < B
                k32 = tl.load(work32_ptr + offs, mask=m, other=0, cache_modifier=".cg")
                eq = m & (k32 == thr)
                rank = tl.cumsum(eq.to(tl.int32), 0) + seen
                pstar = tl.minimum(pstar, tl.min(tl.where(eq & (rank == need), offs, B), 0))
                seen += tl.sum(eq.to(tl.int32), 0)
        return thr, pstar

    @triton.jit
    def _select_threshold64(ptr, n, upper, need, CHUNK: tl.constexpr, NUM_BINS: tl.constexpr):
        """Radix select over n unique 48-bit composite keys: the largest T such that exactly
        `need` keys c satisfy T <= c < upper."""
        bins = tl.arange(0, NUM_BINS)
        prefix = upper * 0
        done = need * 0
        for j in tl.static_range(6):
            SHIFT = 40 - 8 * j
            if done == 0:
                hist = tl.zeros([NUM_BINS], tl.int32)
                for start in range(0, n, CHUNK):
                    offs = start + tl.arange(0, CHUNK)
                    m = offs < n
                    c = tl.load(ptr + offs, mask=m, other=0)
                    cand = m & (c < upper)
                    if j > 0:
                        cand = cand & ((c >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
                    digit = ((c >> SHIFT) & (NUM_BINS - 1)).to(tl.int32)
                    h = tl.histogram(tl.where(cand, digit, 0), NUM_BINS)
                    n_out = CHUNK - tl.sum(cand.to(tl.int32), 0)
                    hist += tl.where(bins == 0, h - n_out, h)
                b, hb, above = _pick_bin(hist, need, NUM_BINS)
                need = need - above
                prefix = prefix | (b.to(tl.int64) << SHIFT)
                done = (need == hb).to(tl.int32)
        return prefix

    @triton.jit
    def _sort_store(index_ptr, base, n, SORT_BLOCK: tl.constexpr):
        """index[base:base+n] holds composite keys: sort them descending, store positions."""
        tl.debug_barrier()  # the keys were stored by other threads of this program
        o = tl.arange(0, SORT_BLOCK)
        om = o < n
        c = tl.load(index_ptr + base + o, mask=om, other=-1)
        c = tl.sort(c, 0, descending=True)
        tl.debug_barrier()
        tl.store(index_ptr + base + o, 65535 - (c & 65535), mask=om)

    @triton.jit
    def _topk_last_program(
        work32_ptr,
        work64_ptr,
        index_ptr,
        hist0_ptr,
        B,
        k,
        CHUNK: tl.constexpr,
        SORT_BLOCK: tl.constexpr,
        FULL_SORT: tl.constexpr,
        NUM_BINS: tl.constexpr,
    ):
        if FULL_SORT:
            # B <= SORT_BLOCK: one bitonic sort of every composite key.
            o = tl.arange(0, SORT_BLOCK)
            m = o < B
            k32 = tl.load(work32_ptr + o, mask=m, other=0, cache_modifier=".cg")
            c = tl.where(m, _composite(k32, o), -1)
            c = tl.sort(c, 0, descending=True)
            tl.store(index_ptr + o, 65535 - (c & 65535), mask=o < k)
        else:
            thr, pstar = _select_threshold32(work32_ptr, hist0_ptr, B, k, CHUNK, NUM_BINS)
            # compact the k survivors' composite keys (in position order) straight into
            # index when one sort takes them all, else into work64 for the segments
            segmented = k > SORT_BLOCK
            if segmented:
                dest = work64_ptr
            else:
                dest = index_ptr
            cnt = k * 0
            for start in range(0, B, CHUNK):
                offs = start + tl.arange(0, CHUNK)
                m = offs < B
                k32 = tl.load(work32_ptr + offs, mask=m, other=0, cache_modifier=".cg")
                sel = m & ((k32 > thr) | ((k32 == thr) & (offs <= pstar)))
                slot = cnt + tl.cumsum(sel.to(tl.int32), 0) - 1
                tl.store(dest + slot, _composite(k32, offs), mask=sel)
                cnt += tl.sum(sel.to(tl.int32), 0)
            tl.debug_barrier()
            # segment s holds the keys ranked [s*SORT_BLOCK, (s+1)*SORT_BLOCK): a radix
            # select below `upper` (the previous segment's threshold) finds its members
            upper = tl.full([], 1 << 48, tl.int64)
            for seg0 in range(0, k, SORT_BLOCK):
                need = tl.minimum(k - seg0, SORT_BLOCK)
                if segmented:
                    t = _select_threshold64(work64_ptr, k, upper, need, CHUNK, NUM_BINS)
                    cnt = need * 0
                    for start in range(0, k, CHUNK):
                        offs = start + tl.arange(0, CHUNK)
                        m = offs < k
                        c = tl.load(work64_ptr + offs, mask=m, other=0)
                        sel = m & (c >= t) & (c < upper)
                        slot = seg0 + cnt + tl.cumsum(sel.to(tl.int32), 0) - 1
                        tl.store(index_ptr + slot, c, mask=sel)
                        cnt += tl.sum(sel.to(tl.int32), 0)
                    upper = t
                _sort_store(index_ptr, seg0, need, SORT_BLOCK)

    @triton.jit(do_not_specialize=["B", "k", "normalized", "has_history", "update", "key_is_score", "hist0"])
    def _fused_select_kernel(
        f_ptr,
        g_ptr,
        ids_ptr,
        hist_ptr,
        score_ptr,
        delta_ptr,
        index_ptr,
        work32_ptr,
        work64_ptr,
        scratch_ptr,
        B,
        D,
        k,
        scale,
        momentum,
        one_minus_momentum,
        normalized,
        has_history,
        update,
        key_is_score,
        hist0,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
        CHUNK: tl.constexpr,
        SORT_BLOCK: tl.constexpr,
        FULL_SORT: tl.constexpr,
        TOPK: tl.constexpr,
        NUM_BINS: tl.constexpr,
    ):
        # Mode flags are runtime scalars (uniform branches cost nothing next to the memory
        # traffic) so that only dtype and block sizes make new compiled variants.
        # ---- phase 1 (every program): score BLOCK_B rows, one pass over the features ----
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        row_off = rows.to(tl.int64) * D  # int64: B * D reaches 2**27 elements
        cols = tl.arange(0, BLOCK_D)
        dot = tl.zeros([BLOCK_B], tl.float32)
        ff = tl.zeros([BLOCK_B], tl.float32)
        gg = tl.zeros([BLOCK_B], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            m = rmask[:, None] & (c < D)[None, :]
            offs = row_off[:, None] + c[None, :]
            # features are read exactly once: stream them past L2
            f = tl.load(f_ptr + offs, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
            g = tl.load(g_ptr + offs, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
            dot += tl.sum(f * g, 1)
            ff += tl.sum(f * f, 1)
            gg += tl.sum(g * g, 1)
        # cos = <f, g> / (max(|f|, eps) * max(|g|, eps)), IEEE-rounded like torch
        nf = tl.maximum(tl.sqrt_rn(ff), 1e-12)
        ng = tl.maximum(tl.sqrt_rn(gg), 1e-12)
        cos = tl.where(normalized != 0, dot, tl.div_rn(dot, nf * ng))
        x = cos * scale
        score = tl.where(x < 0.0, 0.0, x)  # max(0, x); NaN propagates
        delta = tl.zeros([BLOCK_B], tl.float32)
        if has_history != 0:
            idx = tl.load(ids_ptr + rows, mask=rmask, other=0)
            h = tl.load(hist_ptr + idx, mask=rmask, other=0.0)
            seen = h == h  # noqa: PLR0124 (NaN = never scored)
            delta = tl.where(seen, h - score, 0.0)
            if update != 0:
                blend = h * momentum + score * one_minus_momentum
                tl.store(hist_ptr + idx, tl.where(seen, blend, score), mask=rmask)
        tl.store(score_ptr + rows, score, mask=rmask)
        tl.store(delta_ptr + rows, delta, mask=rmask)
        k32 = _order_key(tl.where(key_is_score != 0, x, delta))  # score key: raw scale * cos (see reference)
        tl.store(work32_ptr + rows, k32, mask=rmask)
        if TOPK:  # else the launcher ranks the order keys (large batches)
            if hist0 != 0:
                # first radix digit, counted here so the last program skips one pass over B
                bins = tl.arange(0, NUM_BINS)
                digit0 = ((k32 ^ -2147483648) >> 24) & (NUM_BINS - 1)
                onehot = (digit0[:, None] == bins[None, :]) & rmask[:, None]
                hcount = tl.sum(onehot.to(tl.int32), 0)
                tl.atomic_add(scratch_ptr + bins, hcount, mask=hcount > 0, sem="relaxed")

            # ---- phase 2 (the last program to finish): top-k over all B keys ----
            tl.debug_barrier()  # every thread's stores precede the release below
            ticket = tl.atomic_add(scratch_ptr + NUM_BINS, 1, sem="acq_rel", scope="gpu")
            if ticket == tl.num_programs(0) - 1:
                if k > 0:
                    _topk_last_program(
                        work32_ptr, work64_ptr, index_ptr, scratch_ptr, B, k, CHUNK, SORT_BLOCK, FULL_SORT, NUM_BINS
                    )
                tl.store(scratch_ptr + NUM_BINS, 0)  # reset the ticket for the next launch


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the Triton path (`None` fields are chosen from the shapes).

    block_b, block_d: rows and feature columns one program scores per iteration.
    num_warps: warps per program (the last program's sort also uses them).
    chunk: keys per iteration of the last program's passes over the batch.
    max_sort: largest in-register sort of the last program.
    full_sort_max: batches up to this size skip the radix select and sort all keys.
    fused_topk_max_b: largest batch whose top-k runs inside the launch (when
        B <= full_sort_max or k <= max_sort, or always with `segmented`); other batches
        are scored by the kernel and ranked by torch's stable radix sort of the order keys.
    segmented: allow k > max_sort inside the launch (sorted in segments of max_sort, each
        found by its own radix select: correct but slow, used by the tests).
    min_sort: smallest sort block (sort sizes are rounded up to powers of 4 from here,
        to keep the number of compiled variants small).
    maxnreg: register cap per thread on CUDA (None: the compiler's choice). The in-launch
        top-k code wants up to ~255 registers, which would leave one program per SM for the
        scoring phase; at 128 two fit, and only the single last program spills a little
        (the score-only variant needs ~75 at D >= 512, so the cap rarely binds there).
    """

    block_b: int | None = None
    block_d: int | None = None
    num_warps: int = 8
    chunk: int = 4096
    max_sort: int = 1024
    full_sort_max: int = 1024
    min_sort: int = 256
    fused_topk_max_b: int = 16384
    segmented: bool = False
    maxnreg: int | None = 128

    def __post_init__(self) -> None:
        for name in ("chunk", "max_sort", "full_sort_max", "min_sort"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v}")
        if self.max_sort > MAX_B or self.full_sort_max > self.max_sort:
            raise ValueError("KernelConfig needs full_sort_max <= max_sort <= 65536")


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(device: torch.device) -> torch.Tensor:
    """Per-device int32 [NUM_BINS + 1]: histogram of the first digit + ticket; kept zeroed."""
    buf = _SCRATCH.get(device)
    if buf is None:
        buf = torch.zeros(_NUM_BINS + 1, dtype=torch.int32, device=device)
        _SCRATCH[device] = buf
    return buf


THRESHOLDS_ENV = "DISSECT_SELECT_THRESHOLDS"
THRESHOLDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "select_thresholds.json")
_AUTO_CONFIG: dict[str, KernelConfig] = {}


def measured_thresholds(device_name: str, path: str | None = None) -> dict:
    """The routing thresholds bench_select measured on ``device_name`` ({"fused_topk_max_b": int}), from ``path``,
    else ``$DISSECT_SELECT_THRESHOLDS``, else ``kernels/select_thresholds.json``; {} when none applies."""
    import json

    path = path or os.environ.get(THRESHOLDS_ENV) or THRESHOLDS_FILE
    try:
        with open(path) as f:
            entry = json.load(f).get("devices", {}).get(device_name) or {}
    except (OSError, ValueError, AttributeError):
        return {}
    v = entry.get("fused_topk_max_b")
    return {"fused_topk_max_b": int(v)} if isinstance(v, int) and 0 <= v <= MAX_B else {}


def auto_config(device_name: str) -> KernelConfig:
    """The KernelConfig of ``backend="auto"`` on ``device_name``: the defaults with the measured thresholds (read
    once per device and process)."""
    cfg = _AUTO_CONFIG.get(device_name)
    if cfg is None:
        cfg = _AUTO_CONFIG[device_name] = KernelConfig(**measured_thresholds(device_name))
    return cfg


def save_thresholds(path, device_name: str, fused_topk_max_b: int, rows: list | None = None) -> None:
    """Record ``fused_topk_max_b`` measured on ``device_name`` in the JSON at ``path`` (other devices kept)."""
    import datetime
    import json

    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("devices", {})[device_name] = {
        "fused_topk_max_b": int(fused_topk_max_b),
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows or [],
    }
    doc["about"] = (
        "kernels/fused_select.py routing: the largest B where the top-k inside the launch beat score + torch.sort "
        "(benchmarks/bench_select.py --thresholds)"
    )
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _sort_block(n: int, cfg: KernelConfig) -> int:
    s = cfg.min_sort
    while s < n:
        s *= 4
    return min(s, cfg.max_sort)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _fused_select_triton(
    f: torch.Tensor,
    g: torch.Tensor,
    ids: torch.Tensor | None,
    history: torch.Tensor | None,
    k: int,
    momentum: float | None,
    scale: float,
    normalized: bool,
    key: str,
    cfg: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package")
    if not f.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    B, D = f.shape
    dev = f.device
    cfg = cfg or auto_config(torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type)
    block_d = cfg.block_d or min(_next_pow2(D), 512)
    block_b = cfg.block_b or max(1, min(64, 4096 // block_d))
    full_sort = B <= cfg.full_sort_max
    fused_topk = k > 0 and B <= cfg.fused_topk_max_b and (full_sort or k <= cfg.max_sort or cfg.segmented)
    sort_block = _sort_block(B if full_sort else k, cfg) if fused_topk else cfg.min_sort
    segmented = fused_topk and not full_sort and k > cfg.max_sort
    use_hist0 = fused_topk and not full_sort

    score = torch.empty(B, dtype=torch.float32, device=dev)
    delta = torch.empty(B, dtype=torch.float32, device=dev)
    index = torch.empty(max(k, 1) if fused_topk else 1, dtype=torch.int64, device=dev)
    work32 = torch.empty(B, dtype=torch.int32, device=dev)
    work64 = torch.empty(k if segmented else 1, dtype=torch.int64, device=dev)
    has_history = history is not None
    ids_arg = ids if has_history else work32  # dummies: never read without history
    hist_arg = history if has_history else score
    grid = (triton.cdiv(B, block_b),)
    _fused_select_kernel[grid](
        f,
        g,
        ids_arg,
        hist_arg,
        score,
        delta,
        index,
        work32,
        work64,
        _scratch(dev),
        B,
        D,
        k,
        float(scale),
        float(momentum or 0.0),
        1.0 - float(momentum or 0.0),
        int(normalized),
        int(has_history),
        int(has_history and momentum is not None),
        int(key == "score"),
        int(use_hist0),
        BLOCK_B=block_b,
        BLOCK_D=block_d,
        CHUNK=cfg.chunk,
        SORT_BLOCK=sort_block,
        FULL_SORT=full_sort,
        TOPK=fused_topk,
        NUM_BINS=_NUM_BINS,
        num_warps=cfg.num_warps,
        **({"maxnreg": cfg.maxnreg} if f.is_cuda and cfg.maxnreg else {}),
    )
    if not fused_topk and k > 0:
        # work32 holds order-preserving int32 keys (-0 == +0, NaN largest): a stable
        # descending sort keeps ties in position order, exactly the in-kernel rule
        index = torch.sort(work32, descending=True, stable=True).indices
    return index[:k], score, delta


# ----------------------------------------------------------------------------------------
# Validation, dispatch and the torch.library custom op.
# ----------------------------------------------------------------------------------------


def _validate(
    f: torch.Tensor,
    g: torch.Tensor,
    ids: torch.Tensor | None,
    history: torch.Tensor | None,
    k: int,
    momentum: float | None,
    key: str,
    backend: str,
) -> None:
    """Shape, dtype, device and contiguity checks (metadata only: no host sync)."""
    if key not in _KEYS:
        raise ValueError(f"key must be one of {_KEYS}, got {key!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if f.dim() != 2 or g.dim() != 2 or f.shape != g.shape:
        raise ValueError(f"features must both be [B, D], got {tuple(f.shape)} and {tuple(g.shape)}")
    if f.dtype not in _FLOAT_DTYPES or g.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"features must be float32, bfloat16 or float16, got {f.dtype} and {g.dtype}")
    B, D = f.shape
    if not 1 <= B <= MAX_B:
        raise ValueError(f"batch size must be in [1, {MAX_B}], got {B}")
    if not 1 <= D <= MAX_D:
        raise ValueError(f"feature dim must be in [1, {MAX_D}], got {D}")
    if not 0 <= k <= B:
        raise ValueError(f"k must be in [0, B={B}], got {k}")
    if not (f.is_contiguous() and g.is_contiguous()):
        raise ValueError("features must be contiguous")
    if g.device != f.device:
        raise ValueError(f"features on different devices: {f.device} and {g.device}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    if history is None:
        if key == "delta":
            raise ValueError("key='delta' needs a history buffer")
        if momentum is not None:
            raise ValueError("momentum given but no history buffer to update")
        return
    if ids is None:
        raise ValueError("ids are required with a history buffer")
    if ids.dim() != 1 or ids.shape[0] != B or ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 [B={B}], got {ids.dtype} {tuple(ids.shape)}")
    if history.dim() != 1 or history.dtype != torch.float32:
        raise ValueError(f"history must be float32 [N], got {history.dtype} {tuple(history.shape)}")
    if not (ids.is_contiguous() and history.is_contiguous()):
        raise ValueError("ids and history must be contiguous")
    if ids.device != f.device or history.device != f.device:
        raise ValueError(f"ids ({ids.device}) and history ({history.device}) must be on {f.device}")


def _fused_select_impl(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ids: torch.Tensor | None,
    history: torch.Tensor | None,
    k: int,
    momentum: float | None,
    scale: float,
    normalized: bool,
    key: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate(image_features, text_features, ids, history, k, momentum, key, backend)
    if backend == "auto":
        backend = "triton" if image_features.is_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        return _fused_select_triton(image_features, text_features, ids, history, k, momentum, scale, normalized, key)
    index, score, delta = fused_select_reference(
        image_features, text_features, ids, history, k, momentum=momentum, scale=scale, normalized=normalized, key=key
    )
    return index.contiguous(), score, delta  # fresh outputs: no aliasing of inputs


_fused_select_op = torch.library.custom_op("dissect_fast::fused_select", mutates_args=("history",))(_fused_select_impl)


@_fused_select_op.register_fake
def _(image_features, text_features, ids, history, k, momentum, scale, normalized, key, backend):
    B = image_features.shape[0]
    index = image_features.new_empty((k,), dtype=torch.int64)
    score = image_features.new_empty((B,), dtype=torch.float32)
    return index, score, score.new_empty((B,))


def fused_select(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ids: torch.Tensor | None,
    history: torch.Tensor | None,
    k: int,
    *,
    momentum: float | None = None,
    scale: float = 100.0,
    normalized: bool = False,
    key: str = "delta",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score a batch, update the history in place and select the top k; returns
    (index int64 [k], score float32 [B], delta float32 [B]).

    image_features, text_features: [B, D] float32/bfloat16/float16 on one device.
    ids: int64 [B] sample ids (in [0, N), unique: the caller's contract, never checked).
    history: float32 [N], NaN = never scored; updated in place when momentum is not None
        (momentum=0.0 records the score). May be None with key="score" (delta is then 0).
    k: 0 <= k <= B. scale: multiplies the cosine (100 = CLIPScore).
    normalized: rows are already unit-norm, skip the norms.
    key: "delta" (DISSect: h - s) or "score" (CLIPScore top-k, ranked by the unclamped
        scale * cos so negative pairs do not tie at 0; history then optional, and if given it is
        read and updated exactly as with key="delta").
    backend: "auto" (Triton on CUDA, torch otherwise), "triton", "torch".
    Ties go to the smaller batch position; NaN keys (non-finite features) rank first.
    """
    args = (image_features, text_features, ids, history, int(k), momentum, float(scale), bool(normalized), key, backend)
    if torch.compiler.is_compiling():
        _validate(image_features, text_features, ids, history, k, momentum, key, backend)
        return torch.ops.dissect_fast.fused_select(*args)
    # eager: same implementation, without the custom-op dispatch overhead (~10s of us)
    return _fused_select_impl(*args)
