"""Proxy classes for CLIPCov: zero-shot labels, spherical k-means, and splitting of huge classes.

Everything streams over the (memory-mapped) embeddings in row chunks, so memory is O(chunk * K)
and never O(N * K * D). Embeddings are L2-normalised on the fly; the work runs on ``device``.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

log = logging.getLogger(__name__)


def normalized(x: np.ndarray, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of ``x`` (numpy, any float) as an L2-normalised torch tensor on ``device``."""
    x = np.asarray(x)
    with warnings.catch_warnings():  # read-only memmap slices: never written (copied below)
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(x)
    t = src.to(device).to(dtype)  # fp16 crosses to the GPU before it is widened
    if t.data_ptr() == src.data_ptr():  # no conversion happened: never normalise the caller's array
        t = t.clone()
    return t.div_(t.norm(dim=-1, keepdim=True).clamp_min_(1e-12))


def _chunk_rows(dim: int, k: int, budget_floats: int = 1 << 25) -> int:
    """Rows per chunk so that a [rows, k] similarity block plus the [rows, dim] input stay ~128 MiB."""
    return max(256, budget_floats // max(1, k + dim))


def assign_nearest(
    x: np.ndarray, centers: torch.Tensor, *, device: torch.device | str = "cpu", chunk: int | None = None
) -> np.ndarray:
    """``argmax_c cos(x_i, centers_c)`` for every row (chunked): int64 [N]. Ties: the lower class."""
    centers = centers.to(device=device, dtype=torch.float32)
    centers = centers / centers.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = len(x)
    chunk = chunk or _chunk_rows(x.shape[1], len(centers))
    out = np.empty(n, dtype=np.int64)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        out[a:b] = (normalized(x[a:b], device) @ centers.T).argmax(dim=1).cpu().numpy()
    return out


def zero_shot_labels(
    image: np.ndarray, class_text_emb: np.ndarray, *, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Zero-shot class of every image: argmax over class-name text embeddings [C, D]."""
    return assign_nearest(image, torch.from_numpy(np.asarray(class_text_emb, dtype=np.float32)), device=device)


def default_num_clusters(n: int) -> int:
    """K for k-means proxy classes when no class names are given: one per 1,000 samples, 1..1000."""
    return int(min(1000, max(1, n // 1000)))


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    iters: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    fit_samples_per_center: int = 256,
) -> tuple[np.ndarray, torch.Tensor]:
    """Spherical k-means (cosine) of the rows of ``x``: returns labels int64 [N] and centers [k, D].

    Lloyd's iterations run on a seeded random sample of at most ``fit_samples_per_center * k``
    rows (the faiss default: more points per center barely moves them), then every row is
    assigned once, in chunks: O(iters * 256 k^2 D + N k D) work, O(chunk * k) memory. Empty
    clusters are re-seeded with the sample point worst served by its center.
    """
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={n}")
    rng = np.random.default_rng(seed)
    m = min(n, fit_samples_per_center * k)
    sample_idx = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
    xs = normalized(x[sample_idx], device)
    centers = xs[torch.from_numpy(rng.choice(m, size=k, replace=False)).to(xs.device)].clone()
    chunk = _chunk_rows(x.shape[1], k)
    for _ in range(iters):
        sums = torch.zeros_like(centers)
        counts = torch.zeros(k, device=xs.device, dtype=torch.float32)
        best_sim = torch.empty(m, device=xs.device)
        for a in range(0, m, chunk):
            sim, lab = (xs[a : a + chunk] @ centers.T).max(dim=1)
            best_sim[a : a + chunk] = sim
            sums.index_add_(0, lab, xs[a : a + chunk])
            counts.index_add_(0, lab, torch.ones_like(sim))
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # re-seed with the worst-served points (deterministic)
            worst = best_sim.argsort()[: len(empty)]
            sums[empty] = xs[worst]
        centers = sums / sums.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return assign_nearest(x, centers, device=device), centers


def split_large_classes(
    labels: np.ndarray, text: np.ndarray, max_size: int, *, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, int]:
    """Split every class larger than ``max_size`` into pieces of at most ``max_size`` members.

    A huge class is bisected recursively at the median of its projection on the principal axis
    of its (normalised) text embeddings, so the pieces are balanced (between max_size / 2 and
    max_size members) and semantically coherent (the split follows the direction of largest
    variance). Returns new labels (the original classes keep their numbers, new pieces are
    numbered after them) and the number of classes split. This changes the CLIPCov objective
    for those classes: the pairwise penalty then only acts inside a piece.
    """
    if max_size < 2:
        raise ValueError(f"max class size must be >= 2, got {max_size}")
    labels = labels.copy()
    counts = np.bincount(labels)
    next_label = len(counts)
    big = np.flatnonzero(counts > max_size)
    if len(big):
        order, starts = class_members(labels)  # one O(N log N) sort, not one O(N) scan per big class
    for c in big:
        stack = [order[starts[c] : starts[c + 1]]]
        first = True
        while stack:
            idx = stack.pop()
            if len(idx) <= max_size:
                if not first:
                    labels[idx] = next_label
                    next_label += 1
                first = False
                continue
            t = normalized(text[idx], device)
            t = t - t.mean(dim=0, keepdim=True)
            v = torch.randn(t.shape[1], generator=torch.Generator().manual_seed(int(c)), dtype=t.dtype).to(t.device)
            for _ in range(8):  # power iteration on t^T t: the principal axis
                v = t.T @ (t @ v)
                v = v / v.norm().clamp_min(1e-12)
            by_axis = torch.argsort(t @ v, stable=True).cpu().numpy()
            half = len(idx) // 2
            stack += [np.sort(idx[by_axis[half:]]), np.sort(idx[by_axis[:half]])]
        log.info("split class %d (%d samples) into pieces of <= %d", c, counts[c], max_size)
    return labels, len(big)


def class_members(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions grouped by class: ``order`` (positions sorted by class, ascending inside a class)
    and ``starts`` [C + 1], so class c is ``order[starts[c]:starts[c + 1]]``."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return order, starts
