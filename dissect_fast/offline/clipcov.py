"""CLIPCov subset selection (Joshi et al., AISTATS 2024), exact and factorised, at scale.

Objective (METHOD.md). Proxy classes c with members V_c (n_c of them); unit-norm embeddings
f_i (image), g_i (text); ``A_ij = <f_i, g_j>`` inside a class, ``A+ = max(A, 0)`` and the
symmetric ``P_ij = A+_ij + A+_ji``::

    e_i = A_ii                              (easiness; not clamped)
    r_i = (1/n_c) sum_{j in V_c} P_ij       (j = i included: the i-th row of the class's P)
    u_i = r_i + 2 e_i
    F(S) = sum_{i in S} u_i - sum_c (1/(2 n_c)) sum_{i != j in S_c} P_ij

Marginal gain. For k not in S, of class c, the ordered pairs that appear in F(S + k) but not in
F(S) are (k, j) and (j, k) for j in S_c, each contributing P_kj (P is symmetric)::

    F(S + k) - F(S) = u_k - (1/(2 n_c)) * 2 * sum_{j in S_c} P_kj = u_k - (1/n_c) sum_{j in S_c} P_kj.

P >= 0, so the gain of every k only shrinks as S grows: F is submodular, and a gain computed
for a smaller S is an upper bound (lazy greedy). Gains can turn negative (F is not monotone);
selection still takes exactly the budget m, as the paper does. When every e_i >= 0 the gains
are >= 2 e_i (1 + 1/n_c) >= 0 (the j = k term of r_k is never subtracted) and F is monotone.

Separability, and why the per-class merge is the global greedy. The gain of a class-c sample
depends only on S_c. So the global greedy (argmax over all classes each round) never changes
what a class would do next: each class walks through its own greedy sequence, and the global
greedy only decides which class moves: it is the k-way merge of the per-class sequences that
always advances the class whose next gain is largest. With the clamp (exact) a class's
sequence of pick-time gains is non-increasing (every remaining gain shrinks after a pick, and
the max over fewer elements cannot grow), so the first m picks of the merge are simply the m
largest gains over all classes. Without the clamp (factorized) P can be negative, F is not
submodular and a class's sequence can rise again; the greedy merge then equals sorting by the
*running minimum* of each class's sequence (y_t = min_{s<=t} x_s, non-increasing). Proof
sketch: suppose the merge takes x_t of class A while class B's head has key y_B > y_A(t).
Then y_A(t) = x_s for some pick s <= t of A, and x_s < y_B <= every value of B up to its
head; when x_s was taken, B's head then was one of those larger values, which contradicts
the greedy rule. (Checked against a literal greedy merge in tests/test_offline.py.) Both
cases therefore merge by the running minimum (``merge_sequences``), which equals the gains
when they are monotone.

How far to run each class is not known in advance: ``clipcov_merge`` runs class c for
k_c = min(n_c, ceil(slack * fraction * n_c) + extra_picks) picks, merges, and if a class had
*all* of its k_c computed picks accepted (an uncomputed later pick might still beat the
threshold) reruns it from scratch with k_c doubled (greedy is deterministic, so the prefix is
the same; the doubling bounds the wasted work by 2x); a class whose last computed pick was
rejected is done (its later keys are <= that rejected key <= the m-th largest). Ties are broken by key, then pick position, then class number; the global
references break ties by sample position.

Cost. Per class, each pick adds one row P[p, :] to the class's penalty accumulators. The row
comes either from a dense P block ("dense": P computed once with tiled batched GEMMs, 2 n_c^2 D
flops and n_c^2 * 4 bytes, then O(n_c) per pick) or is recomputed from the embeddings ("rows":
two [n_c, D] mat-vecs per pick, O(n_c D), memory O(n_c D)). Classes are processed in groups
(padded batches, one argmax over a [G, n] tile per step, no host syncs) whose blocks fit in
``block_bytes``; a class whose block does not fit uses "rows". Classes larger than
``max_class_size`` are first split into balanced pieces (``proxy.split_large_classes``).
Totals with dense blocks (the default whenever a class's block fits): O(sum_c n_c^2 D) flops
of GEMM for the blocks + O(sum_c k_c n_c) for the picks, for both objectives. With "rows":
exact needs the same O(n_c^2 D) streamed tiles for r, factorised (``approx="factorized"``, no
clamp) gets r_i = (1/n_c)(<f_i, G_c> + <F_c, g_i>) from the class sums F_c, G_c in O(n_c D);
the picks cost O(k_c n_c D) in both (each pick updates every class member's gain with two dot
products; without the clamp, <f_i, G_S> + <F_S, g_i> with running sums is the same work).
So "factorized" changes the objective and saves the O(n_c^2 D) gains only on the "rows"
path; it is not a speed-up where blocks fit (the GEMM there is the fast part). Memory is
O(N) for labels and greedy sequences plus one group (<= ``block_bytes``, plus the gathered
embeddings of that group while they are normalised).

Option: the reference notebook's score (``score="notebook"``, ``clipcov_notebook``;
docs/clipcov-notebook.md): ``r_i + 2 e_i + ls_i / 2 - (tic_i + itc_i)``, re-scored per class in
rounds of 200 picks. The paper's F above stays the default.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dissect_fast.offline.proxy import class_members, normalized

log = logging.getLogger(__name__)

APPROX = ("exact", "factorized")
ALGORITHMS = ("merge", "lazy", "plain")
SCORES = ("paper", "notebook")


@dataclass
class ClipCovConfig:
    """How CLIPCov runs; the objective depends on ``score``, ``approx`` (and the class split cap)."""

    score: str = "paper"  #: paper (F above, the default) | notebook (clip_core.ipynb's score; see clipcov_notebook)
    notebook_round: int = 200  #: notebook score: a class is re-scored when (its picks + 1) % notebook_round == 0
    approx: str = "exact"  #: exact (clamped A+) | factorized (no clamp: sums factorise; see module doc)
    device: str = "cpu"  #: cpu | cuda | cuda:N; where the blocks and the greedy run
    algorithm: str = "merge"  #: merge (batched per-class greedy, scalable) | lazy | plain (global references)
    max_class_size: int = 32768  #: classes larger than this are split into balanced pieces first
    block_bytes: int | None = None  #: memory for one group of classes; default 512 MiB (CPU), 30% free (GPU)
    tile: int = 2048  #: tile edge of the batched GEMMs that build class blocks
    slack: float = 1.25  #: first run of class c stops after ceil(slack * fraction * n_c) + extra_picks picks
    extra_picks: int = 16  #: see slack; classes that need more are rerun with twice as many picks
    dtype: str = "float32"  #: compute dtype (float64 for bit-exact comparisons in tests)

    def __post_init__(self) -> None:
        if self.approx not in APPROX:
            raise ValueError(f"approx must be one of {APPROX}, got {self.approx!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.max_class_size < 2:
            raise ValueError(f"max_class_size must be >= 2, got {self.max_class_size}")
        if self.block_bytes is not None and self.block_bytes < 1 << 16:
            raise ValueError(f"block_bytes must be >= 64 KiB, got {self.block_bytes}")
        if self.tile < 16 or self.slack < 1.0 or self.extra_picks < 0:
            raise ValueError(
                f"need tile >= 16, slack >= 1, extra_picks >= 0, got {self.tile}, {self.slack}, {self.extra_picks}"
            )
        if self.score not in SCORES:
            raise ValueError(f"score (--clipcov-score) must be one of {SCORES}, got {self.score!r}")
        if isinstance(self.notebook_round, bool) or not isinstance(self.notebook_round, int) or self.notebook_round < 1:
            raise ValueError(f"notebook_round (--notebook-round) must be an integer >= 1, got {self.notebook_round!r}")
        if self.score == "notebook" and self.approx != "exact":
            raise ValueError(
                "--clipcov-score notebook uses the clamped similarities A+ (the notebook's THRESHOLD = 0): "
                "drop --approx factorized, or use --clipcov-score paper"
            )
        if self.score == "notebook" and self.algorithm != "merge":
            raise ValueError(
                f"--greedy {self.algorithm} is a reference greedy of the paper objective; --clipcov-score notebook "
                "runs the notebook's own round-based greedy: drop --greedy (or use --clipcov-score paper)"
            )
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available; use --device cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def resolved_block_bytes(self) -> int:
        if self.block_bytes is not None:
            return self.block_bytes
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            return int(0.3 * free)
        return 512 << 20


@dataclass
class ClipCovResult:
    """Positions (rows of the embeddings) chosen by CLIPCov and how the run went."""

    positions: np.ndarray  #: int64 [m], in pick order (paper: non-increasing gain)
    gains: np.ndarray  #: float64 [m], marginal gain of each pick when it was picked (notebook: its score then)
    objective: float  #: F(S) = sum of the gains (F(empty) = 0); notebook: the sum of the pick-time scores
    stats: dict = field(default_factory=dict)  #: rounds, classes rerun, modes, seconds


# ---------------------------------------------------------------------------------------------
# Per-group tensors: padded class blocks
# ---------------------------------------------------------------------------------------------
@dataclass
class _Group:
    members: list[np.ndarray]  # positions of each class's members (ascending)
    f: torch.Tensor  # [G, n, D] unit-norm image embeddings, zero padded
    g: torch.Tensor  # [G, n, D] unit-norm text embeddings, zero padded
    sizes: torch.Tensor  # [G] n_c
    valid: torch.Tensor  # [G, n] bool, False on padding


def _load_group(image: np.ndarray, text: np.ndarray, members: list[np.ndarray], device, dtype) -> _Group:
    """One gather from the memmaps for the whole group, normalised, scattered into padded [G, n, D]."""
    sizes = np.array([len(m) for m in members])
    n, d, G = int(sizes.max()), image.shape[1], len(members)
    rows = np.concatenate(members)
    order = np.argsort(rows, kind="stable")  # read the memmap in file order
    slot = np.repeat(np.arange(G) * n, sizes) + (np.arange(len(rows)) - np.repeat(np.cumsum(sizes) - sizes, sizes))
    dest = torch.from_numpy(slot[order]).to(device)
    f = torch.zeros(G * n, d, device=device, dtype=dtype)
    g = torch.zeros_like(f)
    f[dest] = normalized(image[rows[order]], device, dtype)
    g[dest] = normalized(text[rows[order]], device, dtype)
    valid = torch.zeros(G * n, device=device, dtype=torch.bool)
    valid[dest] = True
    sizes_t = torch.from_numpy(sizes).to(device=device, dtype=dtype)
    return _Group(members, f.view(G, n, d), g.view(G, n, d), sizes_t, valid.view(G, n))


def _dense_block(f: torch.Tensor, g: torch.Tensor, tile: int, clamp: bool = True) -> torch.Tensor:
    """P = A+ + A+^T for a group, [G, n, n], built tile by tile over the upper triangle
    (``clamp=False``: A + A^T, the factorised objective's P).

    Tile (I, J): ``relu(F_I G_J^T)`` is A+[I, J]; ``relu(G_I F_J^T)[a, b] = A+[J_b, I_a]`` is
    A+^T[I, J]. Their sum is P[I, J], mirrored into P[J, I]: no [G, n, n] temporary besides P,
    and n^2 D multiply-adds in all (each ordered pair once).
    """
    G, n, _ = f.shape
    P = torch.empty(G, n, n, device=f.device, dtype=f.dtype)
    for i0 in range(0, n, tile):
        fi, gi = f[:, i0 : i0 + tile], g[:, i0 : i0 + tile]
        for j0 in range(i0, n, tile):
            fj, gj = f[:, j0 : j0 + tile], g[:, j0 : j0 + tile]
            t = torch.bmm(fi, gj.transpose(1, 2))
            if clamp:
                t.clamp_min_(0)
            if j0 == i0:  # diagonal tile: A+[J, I] is the transpose of this one, no second GEMM
                P[:, i0 : i0 + tile, j0 : j0 + tile] = t + t.transpose(1, 2)
                continue
            t2 = torch.bmm(gi, fj.transpose(1, 2))
            t += t2.clamp_min_(0) if clamp else t2
            P[:, i0 : i0 + tile, j0 : j0 + tile] = t
            P[:, j0 : j0 + tile, i0 : i0 + tile] = t.transpose(1, 2)
    return P


def _streamed_r_sum(f: torch.Tensor, g: torch.Tensor, tile: int) -> torch.Tensor:
    """sum_j P_ij for every i without storing P: row sums plus column sums of A+ tiles. [G, n]."""
    G, n, _ = f.shape
    s = torch.zeros(G, n, device=f.device, dtype=f.dtype)
    for i0 in range(0, n, tile):
        for j0 in range(0, n, tile):
            t = torch.bmm(f[:, i0 : i0 + tile], g[:, j0 : j0 + tile].transpose(1, 2)).clamp_min_(0)
            s[:, i0 : i0 + tile] += t.sum(2)
            s[:, j0 : j0 + tile] += t.sum(1)
    return s


def _group_u_and_rows(grp: _Group, approx: str, mode: str, tile: int):
    """Gains u [G, n] (-inf on padding) and a function p [G] -> P[p, :] / n_c  [G, n]."""
    r, e, row = _group_r_e_rows(grp, approx, mode, tile)
    u = (r + 2 * e).masked_fill(~grp.valid, -math.inf)
    return u, row


def _group_r_e_rows(grp: _Group, approx: str, mode: str, tile: int):
    """r [G, n], e [G, n] (garbage on padding) and a function p [G] -> P[p, :] / n_c  [G, n]."""
    f, g, inv_n = grp.f, grp.g, (1.0 / grp.sizes)[:, None]
    e = (f * g).sum(-1)
    if mode == "dense":
        P = _dense_block(f, g, tile, clamp=approx == "exact")
        P *= inv_n[:, :, None]  # pre-scale: the greedy then adds rows without dividing
        r = P.sum(2)
        ar = torch.arange(len(P), device=P.device)

        def row(p: torch.Tensor) -> torch.Tensor:
            return P[ar, p]

    else:
        if approx == "exact":
            r = _streamed_r_sum(f, g, tile) * inv_n
        else:  # sum_j (<f_i, g_j> + <f_j, g_i>) = <f_i, G_c> + <F_c, g_i>
            r = (torch.bmm(f, g.sum(1)[:, :, None]) + torch.bmm(g, f.sum(1)[:, :, None])).squeeze(-1) * inv_n
        ar = torch.arange(len(f), device=f.device)

        def row(p: torch.Tensor) -> torch.Tensor:
            a_ip = torch.bmm(f, g[ar, p][:, :, None]).squeeze(-1)  # A[i, p] = <f_i, g_p>
            a_pi = torch.bmm(g, f[ar, p][:, :, None]).squeeze(-1)  # A[p, i] = <f_p, g_i>
            if approx == "exact":
                a_ip.clamp_min_(0), a_pi.clamp_min_(0)
            return (a_ip + a_pi) * inv_n

    return r, e, row


def _greedy_group(u: torch.Tensor, row, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k greedy steps in every class of a group at once: picked index [G, k] and gain [G, k].

    gain_i = u_i - (1/n_c) sum_{j in S_c} P_ij, kept as ``u - pen`` with ``pen`` accumulating the
    (pre-scaled) rows of the picks. No host sync inside the loop. Steps past a class's size pick
    padding (gain -inf); the caller truncates each class to its own k_c <= n_c.
    """
    G, _n = u.shape
    ar = torch.arange(G, device=u.device)
    avail = torch.isfinite(u)
    pen = torch.zeros_like(u)
    picks = torch.empty(G, k, device=u.device, dtype=torch.long)
    gains = torch.empty(G, k, device=u.device, dtype=u.dtype)
    neg_inf = torch.tensor(-math.inf, device=u.device, dtype=u.dtype)
    for t in range(k):
        gain = torch.where(avail, u - pen, neg_inf)
        p = gain.argmax(dim=1)  # first maximal index: ties go to the lower position
        picks[:, t] = p
        gains[:, t] = gain[ar, p]
        avail[ar, p] = False
        pen += row(p)
    return picks, gains


def _bytes_per_class(n: int, d: int, mode: str, tile: int, itemsize: int) -> int:
    emb = 3 * n * d * itemsize  # f, g and one temporary of their size (f * g, normalisation)
    vec = 8 * n * itemsize  # u, pen, e, r, gains and temporaries
    tiles = 2 * min(n, tile) ** 2 * itemsize  # the two GEMM tiles in flight
    if mode == "dense":
        return emb + vec + tiles + n * n * itemsize
    return emb + vec + tiles


def _plan_groups(sizes: np.ndarray, classes: np.ndarray, d: int, cfg: ClipCovConfig, budget: int):
    """Split classes (largest first) into groups [(mode, [class ids])] that fit ``budget`` bytes."""
    itemsize = 8 if cfg.dtype == "float64" else 4
    order = classes[np.argsort(-sizes[classes], kind="stable")]
    groups: list[tuple[str, list[int]]] = []
    for c in order:
        n = int(sizes[c])
        mode = "dense"
        if _bytes_per_class(n, d, "dense", cfg.tile, itemsize) > budget:
            mode = "rows"
        if groups and groups[-1][0] == mode:
            n0 = int(sizes[groups[-1][1][0]])  # the group's padded size (its first, largest class)
            if (len(groups[-1][1]) + 1) * _bytes_per_class(n0, d, mode, cfg.tile, itemsize) <= budget:
                groups[-1][1].append(int(c))
                continue
        groups.append((mode, [int(c)]))
    return groups


def merge_sequences(seqs: list[np.ndarray], m: int) -> tuple[np.ndarray, np.ndarray]:
    """First m steps of the greedy merge of sequences (always advance the largest head).

    Equals the m largest running minima, ties by position in the sequence, then sequence index
    (module docstring). Returns indices into ``np.concatenate(seqs)`` in merge order, and the
    sequence index of each.
    """
    if sum(len(x) for x in seqs) < m:
        raise AssertionError("the sequences hold fewer elements than the budget")  # k_c sums to >= m
    which = np.concatenate([np.full(len(x), i) for i, x in enumerate(seqs)])
    step = np.concatenate([np.arange(len(x)) for x in seqs])
    key = np.concatenate([np.minimum.accumulate(x) for x in seqs])
    top = np.lexsort((which, step, -key))[:m]
    return top, which[top]


# ---------------------------------------------------------------------------------------------
# Scalable selection: per-class greedy sequences, merged by gain
# ---------------------------------------------------------------------------------------------
def _lap(phases: dict, name: str, t: float, device: torch.device) -> float:
    """Add the time since t to phases[name] (synchronising CUDA once per group, not per step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    phases[name] += now - t
    return now


def clipcov_merge(image: np.ndarray, text: np.ndarray, labels: np.ndarray, m: int, cfg: ClipCovConfig) -> ClipCovResult:
    """Global greedy of F with budget m, computed as per-class greedy runs merged by gain."""
    t0 = time.perf_counter()
    n_total, d = image.shape
    order, starts = class_members(labels)
    sizes = np.diff(starts)
    classes = np.flatnonzero(sizes)
    frac = m / n_total
    k = np.minimum(sizes, np.maximum(1, np.ceil(cfg.slack * frac * sizes).astype(np.int64) + cfg.extra_picks))
    seq_pos: dict[int | np.integer, np.ndarray] = {}  # by class id (Python or numpy int)
    seq_gain: dict[int | np.integer, np.ndarray] = {}
    budget, device = cfg.resolved_block_bytes(), torch.device(cfg.device)
    todo, rounds, reruns, modes = classes, 0, 0, {"dense": 0, "rows": 0}
    phases = {"load": 0.0, "gains_and_blocks": 0.0, "greedy": 0.0}
    while True:
        rounds += 1
        for mode, group in _plan_groups(sizes, todo, d, cfg, budget):
            members = [order[starts[c] : starts[c + 1]] for c in group]
            t = time.perf_counter()
            grp = _load_group(image, text, members, device, cfg.torch_dtype)
            t = _lap(phases, "load", t, device)
            u, row = _group_u_and_rows(grp, cfg.approx, mode, cfg.tile)
            t = _lap(phases, "gains_and_blocks", t, device)
            kc = k[group]
            picks_t, gains_t = _greedy_group(u, row, int(kc.max()))
            picks, gains = picks_t.cpu().numpy(), gains_t.double().cpu().numpy()
            _lap(phases, "greedy", t, device)
            for j, c in enumerate(group):
                seq_pos[c] = members[j][picks[j, : kc[j]]]
                seq_gain[c] = gains[j, : kc[j]]
            modes[mode] += len(group)
            del grp, u, row, picks_t, gains_t
        gain = np.concatenate([seq_gain[c] for c in classes])
        pos = np.concatenate([seq_pos[c] for c in classes])
        top, which = merge_sequences([seq_gain[c] for c in classes], m)
        taken = np.bincount(classes[which], minlength=len(sizes))
        unsafe = classes[(taken[classes] == k[classes]) & (k[classes] < sizes[classes])]
        if len(unsafe) == 0:
            break
        reruns += len(unsafe)
        k[unsafe] = np.minimum(sizes[unsafe], 2 * k[unsafe])
        todo = unsafe
        log.info("clipcov: %d classes need longer greedy runs, round %d", len(unsafe), rounds + 1)
    stats = {
        "rounds": rounds,
        "classes": len(classes),
        "classes_rerun": reruns,
        "largest_class": int(sizes.max()),
        "computed_picks": int(sum(len(v) for v in seq_gain.values())),
        "classes_dense": modes["dense"],
        "classes_rows": modes["rows"],
        "seconds": time.perf_counter() - t0,
        "seconds_phases": phases,
    }
    return ClipCovResult(pos[top].astype(np.int64), gain[top], float(gain[top].sum()), stats)


# ---------------------------------------------------------------------------------------------
# Global references: plain greedy (argmax every round) and lazy greedy (heap of stale gains)
# ---------------------------------------------------------------------------------------------
def _reference_setup(image, text, labels, approx):
    f = np.asarray(image, dtype=np.float64)
    g = np.asarray(text, dtype=np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True).clip(1e-12)
    g = g / np.linalg.norm(g, axis=1, keepdims=True).clip(1e-12)
    order, starts = class_members(labels)
    n_c = np.diff(starts)[labels].astype(np.float64)
    u = np.empty(len(f))
    for c in range(len(starts) - 1):
        idx = order[starts[c] : starts[c + 1]]
        if len(idx) == 0:
            continue
        A = f[idx] @ g[idx].T
        Ap = np.maximum(A, 0) if approx == "exact" else A
        u[idx] = (Ap.sum(1) + Ap.sum(0)) / len(idx) + 2 * np.diag(A)
    clamp = approx == "exact"

    def row(p: int) -> tuple[np.ndarray, np.ndarray]:
        """Class members of p and P[p, members] / n_c (one [n_c] row: two mat-vecs)."""
        c = labels[p]
        idx = order[starts[c] : starts[c + 1]]
        a_ip, a_pi = f[idx] @ g[p], g[idx] @ f[p]
        if clamp:
            a_ip, a_pi = np.maximum(a_ip, 0), np.maximum(a_pi, 0)
        return idx, (a_ip + a_pi) / len(idx)

    return u, n_c, row


def clipcov_reference(
    image: np.ndarray, text: np.ndarray, labels: np.ndarray, m: int, approx: str = "exact", lazy: bool = True
) -> ClipCovResult:
    """Global greedy over all samples in float64 numpy (small N only: holds everything in memory).

    Running penalty accumulators ``pen_i = (1/n_c) sum_{j in S_c} P_ij`` are updated with one row
    per pick, so the exact gain of any sample is ``u_i - pen_i`` in O(1). ``lazy=False``: argmax
    over all remaining samples every round. ``lazy=True``: a max-heap of stale gains (upper
    bounds, F being submodular); pop the top, refresh its gain, take it if it still beats the
    next stale gain, else push it back. Lazy needs submodularity, so it is exact-only: without
    the clamp a stale gain is no upper bound.
    """
    if lazy and approx != "exact":
        raise ValueError("lazy greedy needs a submodular F: use approx='exact', or the plain/merge greedy")
    t0 = time.perf_counter()
    u, _, row = _reference_setup(image, text, labels, approx)
    n = len(u)
    if not 1 <= m <= n:
        raise ValueError(f"budget must be in [1, {n}], got {m}")
    pen = np.zeros(n)
    picked: list[int] = []
    gains: list[float] = []
    evals = 0
    if not lazy:
        avail = np.ones(n, dtype=bool)
        for _ in range(m):
            gain = np.where(avail, u - pen, -np.inf)
            p = int(np.argmax(gain))
            picked.append(p)
            gains.append(gain[p])
            avail[p] = False
            idx, r = row(p)
            pen[idx] += r
            evals += n
    else:
        heap = [(-u[i], i) for i in range(n)]  # (negated stale gain, position): ties -> lower position
        heapq.heapify(heap)
        while len(picked) < m:
            _, i = heapq.heappop(heap)
            cur = u[i] - pen[i]
            evals += 1
            if not heap or (-cur, i) <= heap[0]:
                picked.append(i)
                gains.append(cur)
                idx, r = row(i)
                pen[idx] += r
            else:
                heapq.heappush(heap, (-cur, i))
    gain_arr = np.asarray(gains)
    stats = {"evaluations": evals, "seconds": time.perf_counter() - t0}
    return ClipCovResult(np.asarray(picked, dtype=np.int64), gain_arr, float(gain_arr.sum()), stats)


# ---------------------------------------------------------------------------------------------
# The reference notebook's score (clip_core.ipynb), an option: docs/clipcov-notebook.md
# ---------------------------------------------------------------------------------------------
def label_similarity(
    text: np.ndarray,
    class_text_emb: np.ndarray,
    labels: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk: int = 1 << 14,
) -> np.ndarray:
    """ls_i = cos(g_i, t_{labels_i}): each caption against its own class name's embedding. float64 [N].

    Streamed over the rows of ``text`` (a memmap is fine); ``class_text_emb`` [C, D] holds the
    class-name text embeddings that ``labels`` index (the zero-shot classes).
    """
    t = normalized(np.asarray(class_text_emb), device, dtype)
    n = len(labels)
    out = np.empty(n, dtype=np.float64)
    for a in range(0, n, chunk):
        g = normalized(text[a : a + chunk], device, dtype)
        lab = torch.from_numpy(np.asarray(labels[a : a + chunk], dtype=np.int64)).to(g.device)
        out[a : a + chunk] = (g * t[lab]).sum(-1).double().cpu().numpy()
    return out


def _notebook_static_scores(image, text, labels, label_sim, cfg: ClipCovConfig):
    """r_i and the notebook's initial score r_i + 2 e_i + ls_i / 2 - (tic_i + itc_i), float64 [N] each.

    Classes are processed in the same padded groups as the paper objective (same r and e).
    itc_i = cos(f_i, sum of the class's g), tic_i = cos(g_i, sum of the class's f): the class
    centres, renormalised (zero padding adds nothing to the sums).
    """
    n_total, d = image.shape
    order, starts = class_members(labels)
    sizes = np.diff(starts)
    classes = np.flatnonzero(sizes)
    r_all = np.empty(n_total)
    score = np.empty(n_total)
    device = torch.device(cfg.device)
    for mode, group in _plan_groups(sizes, classes, d, cfg, cfg.resolved_block_bytes()):
        members = [order[starts[c] : starts[c + 1]] for c in group]
        grp = _load_group(image, text, members, device, cfg.torch_dtype)
        r, e, row = _group_r_e_rows(grp, "exact", mode, cfg.tile)
        del row  # holds the dense block, if any: free it before the next group's
        f_ctr, g_ctr = grp.f.sum(1), grp.g.sum(1)  # [G, D]
        f_ctr = f_ctr / f_ctr.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        g_ctr = g_ctr / g_ctr.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        itc = torch.bmm(grp.f, g_ctr[:, :, None]).squeeze(-1)  # image to the text centre
        tic = torch.bmm(grp.g, f_ctr[:, :, None]).squeeze(-1)  # text to the image centre
        r_np, e_np, itc_np, tic_np = (x.double().cpu().numpy() for x in (r, e, itc, tic))
        del r, e, itc, tic  # the device copies
        for j, idx in enumerate(members):
            k = len(idx)
            r_all[idx] = r_np[j, :k]
            score[idx] = (r_np[j, :k] + 2 * e_np[j, :k] + label_sim[idx] / 2) - (tic_np[j, :k] + itc_np[j, :k])
        del grp
    return r_all, score


def _cross_to_new(image, text, members: np.ndarray, new_local: np.ndarray, cfg: ClipCovConfig) -> np.ndarray:
    """(1/n_c) sum_{j in new} (A+_ij + A+_ji) for every member i of one class: float64 [n_c].

    Gathers the class's embeddings (O(n_c D)) and takes two [n_c, |new|] products; nothing n_c x n_c.
    """
    device = torch.device(cfg.device)
    f = normalized(image[members], device, cfg.torch_dtype)
    g = normalized(text[members], device, cfg.torch_dtype)
    j = torch.from_numpy(new_local).to(device)
    a = (f @ g[j].T).clamp_min_(0).sum(1) + (g @ f[j].T).clamp_min_(0).sum(1)
    return (a / len(members)).double().cpu().numpy()


def clipcov_notebook(
    image: np.ndarray, text: np.ndarray, labels: np.ndarray, label_sim: np.ndarray, m: int, cfg: ClipCovConfig
) -> ClipCovResult:
    """The reference notebook's (clip_core.ipynb) scoring and round-based greedy; m picks.

    Per class c (n_c members), with A+, e_i and r_i as for the paper objective::

        s_i = r_i + 2 e_i + ls_i / 2 - (tic_i + itc_i)

    (``label_sim`` = ls_i, see ``label_similarity``; tic/itc: ``_notebook_static_scores``). Take
    the unpicked sample of largest s (ties: the higher position, as a stable ascending sort read
    from its end). When the class c of the pick reaches (picks of c + 1) % R == 0 (R =
    ``notebook_round``: after R - 1 picks, then every R), every member i of c loses, in this order,

        (1/n_c) sum_{j in N_c} (A+_ij + A+_ji)   (N_c: c's picks since its last re-scoring)
        (1/n_c) sum_{j in S_c} r_j                (S_c: all of c's picks so far; again each round)
        (1/(2 n_c)) sum_{j in N_c} ls_j

    and N_c is emptied. Scores change only there, so "largest current score" is what the
    notebook's re-sorted list gives. Each class keeps its unpicked members sorted (re-sorted at
    its re-scorings); a heap of the classes' heads gives the global order. Work: the paper's
    O(n_c^2 D) per class for r, O(n_c (R + log n_c) + n_c D) per re-scoring, O(log C) per pick.
    """
    t0 = time.perf_counter()
    n_total = len(labels)
    label_sim = np.asarray(label_sim, dtype=np.float64)
    if label_sim.shape != (n_total,):
        raise ValueError(f"label_sim must be [N={n_total}] (one ls_i per sample), got {list(label_sim.shape)}")
    r, score = _notebook_static_scores(image, text, labels, label_sim, cfg)
    t_static = time.perf_counter() - t0
    order, starts = class_members(labels)
    classes = np.flatnonzero(np.diff(starts))
    R = cfg.notebook_round
    picked = np.zeros(n_total, dtype=bool)
    queue: dict[int, np.ndarray] = {}
    head: dict[int, int] = {}
    count: dict[int, int] = {}
    selected: dict[int, list[int]] = {}
    new: dict[int, list[int]] = {}
    heap = []
    for c in classes.tolist():
        mem = order[starts[c] : starts[c + 1]]
        queue[c] = mem[np.lexsort((-mem, -score[mem]))]
        head[c], count[c], selected[c], new[c] = 0, 0, [], []
        heap.append((-score[queue[c][0]], -int(queue[c][0]), c))
    heapq.heapify(heap)
    positions: list[int] = []
    gains: list[float] = []
    rescorings = 0
    while len(positions) < m:
        _, neg_p, c = heapq.heappop(heap)
        p = -neg_p
        positions.append(p)
        gains.append(score[p])
        picked[p] = True
        count[c] += 1
        selected[c].append(p)
        new[c].append(p)
        head[c] += 1
        if (count[c] + 1) % R == 0:
            mem = order[starts[c] : starts[c + 1]]  # ascending positions
            n_c = len(mem)
            score[mem] -= _cross_to_new(image, text, mem, np.searchsorted(mem, new[c]), cfg)
            score[mem] -= np.sum(r[selected[c]]) / n_c
            score[mem] -= (np.sum(label_sim[new[c]]) / 2) / n_c
            new[c] = []
            rest = mem[~picked[mem]]
            queue[c], head[c] = rest[np.lexsort((-rest, -score[rest]))], 0
            rescorings += 1
        if head[c] < len(queue[c]):
            q = int(queue[c][head[c]])
            heapq.heappush(heap, (-score[q], -q, c))
    gain_arr = np.asarray(gains, dtype=np.float64)
    stats = {
        "score": "notebook",
        "notebook_round": R,
        "rescorings": rescorings,
        "classes": len(classes),
        "largest_class": int(np.diff(starts).max()),
        "seconds": time.perf_counter() - t0,
        "seconds_phases": {"static_scores": t_static, "greedy": time.perf_counter() - t0 - t_static},
    }
    return ClipCovResult(np.asarray(positions, dtype=np.int64), gain_arr, float(gain_arr.sum()), stats)


def clipcov_select(
    image: np.ndarray,
    text: np.ndarray,
    labels: np.ndarray,
    m: int,
    cfg: ClipCovConfig | None = None,
    label_sim: np.ndarray | None = None,
) -> ClipCovResult:
    """Pick m rows maximising F greedily; ``labels`` int64 [N] are the proxy classes (0..C-1).

    ``cfg.score == "notebook"``: the notebook's score instead (``clipcov_notebook``); it needs
    ``label_sim`` [N], each caption's similarity to its class name (``label_similarity``).
    """
    cfg = cfg or ClipCovConfig()
    n = len(labels)
    if image.shape != text.shape or image.shape[0] != n:
        raise ValueError(f"image {image.shape}, text {text.shape} and labels [{n}] disagree")
    if not 1 <= m <= n:
        raise ValueError(f"budget must be in [1, {n}], got {m}")
    if cfg.score == "notebook":
        if label_sim is None:
            raise ValueError(
                "--clipcov-score notebook needs each caption's similarity to its class name (label_sim): "
                "give --class-names"
            )
        return clipcov_notebook(image, text, labels, label_sim, m, cfg)
    if label_sim is not None:
        raise ValueError("label_sim is only used by the notebook score (--clipcov-score notebook)")
    if cfg.algorithm == "merge":
        return clipcov_merge(image, text, labels, m, cfg)
    return clipcov_reference(image, text, labels, m, cfg.approx, lazy=cfg.algorithm == "lazy")
