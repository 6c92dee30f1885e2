"""Offline subset selection: ``dissect-fast select-subset`` (random | clipscore | clipcov).

Reads an embeddings directory (``dissect-fast embed``), picks ``m = floor(fraction * N + 0.5)``
samples (nearest integer, halves rounded up; at least one; ``--clipcov-score notebook``: ``int(N * fraction)``,
the notebook's budget), and writes their ids, sorted, as an
int64 ``.npy`` that the trainer reads with ``--subset FILE``; a ``.json`` beside it records what
was chosen. See docs/method.md and docs/clipcov-notebook.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dissect_fast.offline.clipcov import ALGORITHMS, APPROX, SCORES, ClipCovConfig, clipcov_select, label_similarity
from dissect_fast.offline.embeddings_io import Embeddings, EmbeddingsError, check_finite_rows, load_embeddings
from dissect_fast.offline.proxy import default_num_clusters, kmeans, normalized, split_large_classes, zero_shot_labels

log = logging.getLogger(__name__)

METHODS = ("random", "clipscore", "clipcov")


@dataclass
class SubsetResult:
    """What ``select_subset`` chose, and the numbers that describe it."""

    ids: np.ndarray  #: int64 [m] sample ids, sorted ascending
    method: str  #: random | clipscore | clipcov
    fraction: float  #: the requested fraction
    n_total: int  #: N, samples in the embeddings
    mean_clipscore_subset: float  #: mean of max(0, 100 cos(f_i, g_i)) over the subset
    mean_clipscore_all: float  #: the same over all N samples
    class_sizes: np.ndarray | None = None  #: [C] members of each proxy class (None: no classes)
    class_counts: np.ndarray | None = None  #: [C] chosen members of each proxy class
    class_source: str | None = None  #: "class-names" | "kmeans-K" | None
    objective: float | None = None  #: CLIPCov F(S) of the subset (clipcov only; notebook: sum of pick-time scores)
    clipcov_score: str | None = None  #: paper | notebook (clipcov only)
    seconds: dict = field(default_factory=dict)  #: wall time of each phase
    stats: dict = field(default_factory=dict)  #: algorithm details (clipcov: rounds, modes, ...)

    @property
    def budget(self) -> int:
        return len(self.ids)

    def summary(self) -> str:
        """A few human-readable lines: what was chosen and how it compares to the full set."""
        lines = [
            f"{self.method}: chose {self.budget:,} of {self.n_total:,} samples (fraction {self.fraction:g})",
            (
                f"mean CLIPScore (max(0, 100 cos)): subset {self.mean_clipscore_subset:.3f} vs all "
                f"{self.mean_clipscore_all:.3f}"
            ),
        ]
        if self.class_counts is not None:
            sizes, counts = self.class_sizes, self.class_counts
            assert sizes is not None  # given with the counts
            nz = sizes > 0
            share = counts[nz] / sizes[nz]
            lines.append(
                f"proxy classes ({self.class_source}): {int(nz.sum())} non-empty; chosen per class "
                f"min {counts[nz].min()} / median {int(np.median(counts[nz]))} / max {counts[nz].max()}; "
                f"classes with none chosen: {int((counts[nz] == 0).sum())}; share chosen per class "
                f"min {share.min():.2f} / median {np.median(share):.2f} / max {share.max():.2f}"
            )
        if self.objective is not None and self.clipcov_score == "notebook":
            lines.append(f"CLIPCov notebook score (clip_core.ipynb): sum at pick time = {self.objective:.4f}")
        elif self.objective is not None:
            lines.append(f"CLIPCov objective F(S) = {self.objective:.4f}")
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def to_json(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in ("method", "fraction", "n_total", "budget", "mean_clipscore_subset", "mean_clipscore_all")
        }
        out.update(
            objective=self.objective,
            clipcov_score=self.clipcov_score,
            class_source=self.class_source,
            seconds=self.seconds,
            stats=self.stats,
        )
        if self.class_counts is not None:
            assert self.class_sizes is not None  # given with the counts
            out.update(class_sizes=self.class_sizes.tolist(), class_counts=self.class_counts.tolist())
        return out


def budget_for(fraction: float, n: int, truncate: bool = False) -> int:
    """m = floor(fraction * N + 0.5) (``truncate``: int(N * fraction), the reference notebook's rule), validated:
    0 < fraction <= 1 and m >= 1."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or math.isnan(fraction):
        raise ValueError(f"--fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1] (e.g. 0.3 keeps 30%), got {fraction}")
    if n < 1:
        raise ValueError("the embeddings directory holds no samples")
    m = min(n, int(n * fraction) if truncate else math.floor(fraction * n + 0.5))
    if m < 1:
        least = 1 / n if truncate else 0.5 / n
        raise ValueError(f"--fraction {fraction} of {n} samples selects none; use at least {least:.3g}")
    return m


def pair_cosines(emb: Embeddings, device: str = "cpu", chunk: int = 1 << 14) -> np.ndarray:
    """cos(f_i, g_i) for every sample, float32 [N], streamed over the memmaps."""
    out = np.empty(len(emb), dtype=np.float32)
    for a in range(0, len(emb), chunk):
        f, g = normalized(emb.image[a : a + chunk], device), normalized(emb.text[a : a + chunk], device)
        out[a : a + chunk] = (f * g).sum(-1).cpu().numpy()
    return out


def _proxy_labels(emb, class_names_emb, clusters, seed, device) -> tuple[np.ndarray, str]:
    if class_names_emb is not None:
        c = np.asarray(class_names_emb, dtype=np.float32)
        if c.ndim != 2 or c.shape[1] != emb.dim or len(c) < 1:
            raise ValueError(
                f"class-name embeddings must be [C, {emb.dim}] (same model as the embeddings), got {list(c.shape)}"
            )
        check_finite_rows(np.asarray(np.isfinite(c).all(axis=1)), np.arange(len(c)), "--class-names", "class indices")
        return zero_shot_labels(emb.image, c, device=device), "class-names"
    k = default_num_clusters(len(emb)) if clusters is None else int(clusters)
    if not 1 <= k <= len(emb):
        raise ValueError(f"--clusters must be in [1, N={len(emb)}], got {k}")
    labels, _ = kmeans(emb.text, k, seed=seed, device=device)
    return labels, f"kmeans-{k}"


def select_subset(
    emb: Embeddings,
    method: str,
    fraction: float,
    *,
    class_names_emb: np.ndarray | None = None,
    clusters: int | None = None,
    approx: str = "exact",
    clipcov_score: str = "paper",
    seed: int = 0,
    device: str = "cpu",
    config: ClipCovConfig | None = None,
) -> SubsetResult:
    """Choose ``floor(fraction * N + 0.5)`` samples by ``method``; see the module docstring.

    Proxy classes (clipcov; for the others only when class names or clusters are given, for the
    per-class report): the zero-shot class of each image among ``class_names_emb`` [C, D], else
    k-means with ``clusters`` (default ``min(1000, max(1, N // 1000))``) on the text embeddings.
    ``config`` overrides the CLIPCov settings (its approx, score and device win over the arguments).
    ``clipcov_score="notebook"``: the reference notebook's score (docs/clipcov-notebook.md); it needs
    ``class_names_emb`` (its label-similarity term compares each caption with its class name).
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    if approx not in APPROX:
        raise ValueError(f"--approx must be one of {APPROX}, got {approx!r}")
    if clipcov_score not in SCORES:
        raise ValueError(f"--clipcov-score must be one of {SCORES}, got {clipcov_score!r}")
    if class_names_emb is not None and clusters is not None:
        raise ValueError("give either class-name embeddings (--class-names) or --clusters, not both")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but CUDA is not available")
    cfg = config or ClipCovConfig(approx=approx, device=device, score=clipcov_score)
    if cfg.score == "notebook" and method != "clipcov":
        raise ValueError(f"--clipcov-score notebook only applies to --method clipcov, not --method {method}")
    if cfg.score == "notebook" and class_names_emb is None:
        raise ValueError(
            "--clipcov-score notebook needs --class-names: its label-similarity term compares each caption with "
            "its class name's embedding, and k-means proxy classes (--clusters, or no --class-names) have no "
            "names. Give --class-names EMB_DIR/class_names.npy (`dissect-fast embed --class-names names.txt`), "
            "or use --clipcov-score paper"
        )
    n = len(emb)
    m = budget_for(fraction, n, truncate=cfg.score == "notebook")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    cos = pair_cosines(emb, device)
    # a NaN or Inf anywhere in a row makes its norm, hence its cosine, non-finite: this pass checks every row
    check_finite_rows(np.isfinite(cos), emb.ids)
    seconds["clipscore"] = time.perf_counter() - t

    labels, source = None, None
    if method == "clipcov" or class_names_emb is not None or clusters is not None:
        t = time.perf_counter()
        labels, source = _proxy_labels(emb, class_names_emb, clusters, seed, device)
        seconds["proxy_classes"] = time.perf_counter() - t

    objective, stats = None, {}
    t = time.perf_counter()
    if m == n:
        pos = np.arange(n)
    elif method == "random":
        pos = np.random.default_rng(seed).choice(n, size=m, replace=False)
    elif method == "clipscore":
        pos = np.argsort(-cos, kind="stable")[:m]  # ties: the lower position wins
    else:
        assert labels is not None  # clipcov always has proxy classes
        ls = None
        if cfg.score == "notebook":  # before the split: a piece of a split class keeps its class name
            assert class_names_emb is not None  # checked above
            ls = label_similarity(emb.text, class_names_emb, labels, device=cfg.device, dtype=cfg.torch_dtype)
        split, n_split = split_large_classes(labels, emb.text, cfg.max_class_size, device=cfg.device)
        res = clipcov_select(emb.image, emb.text, split, m, cfg, label_sim=ls)
        pos, objective, stats = res.positions, res.objective, dict(res.stats, classes_split=n_split)
    seconds["select"] = time.perf_counter() - t

    score = np.maximum(cos, 0) * 100
    result = SubsetResult(
        ids=np.sort(emb.ids[pos]).astype(np.int64),
        method=method,
        fraction=float(fraction),
        n_total=n,
        mean_clipscore_subset=float(score[pos].mean()),
        mean_clipscore_all=float(score.mean()),
        class_source=source,
        objective=objective,
        clipcov_score=cfg.score if method == "clipcov" else None,
        seconds=seconds,
        stats=stats,
    )
    if labels is not None:
        result.class_sizes = np.bincount(labels)
        result.class_counts = np.bincount(labels[pos], minlength=len(result.class_sizes))
    return result


def load_class_names_emb(path: str) -> np.ndarray:
    """A ``.npy`` of class-name text embeddings [C, D] (``dissect-fast embed --class-names``)."""
    if not path.endswith(".npy"):
        raise ValueError(
            f"--class-names {path}: expected a .npy of class-name text embeddings [C, D]; embed a names file "
            "(one class per line) with the reference model: `dissect-fast embed --class-names names.txt ...`"
        )
    if not os.path.isfile(path):
        raise ValueError(f"--class-names {path}: no such file")
    return np.load(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dissect-fast select-subset",
        description="Pick a subset of the training set from reference-model embeddings (random, clipscore, clipcov).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--embeddings", required=True, help="embeddings directory written by `dissect-fast embed`")
    p.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="random; clipscore (the highest reference-model scores); clipcov (the CLIPCov greedy)",
    )
    p.add_argument("--fraction", required=True, type=float, help="share of the samples to keep, in (0, 1]")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--class-names",
        default=None,
        help="clipcov proxy classes: .npy of class-name text embeddings [C, D], e.g. EMB_DIR/class_names.npy "
        "written by `dissect-fast embed --class-names names.txt`; each image gets its zero-shot class",
    )
    g.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="clipcov proxy classes: k-means K on the text embeddings (default min(1000, max(1, N // 1000)))",
    )
    p.add_argument("--approx", choices=APPROX, default="exact", help="clipcov: exact (clamped) or factorized")
    p.add_argument(
        "--clipcov-score",
        choices=SCORES,
        default="paper",
        help="clipcov: paper (the paper's objective, default) or notebook (the reference notebook "
        "clip_core.ipynb's score r + 2e + ls/2 - (tic + itc), re-scored per class in rounds; needs --class-names; "
        "see docs/clipcov-notebook.md)",
    )
    p.add_argument(
        "--notebook-round",
        type=int,
        default=None,
        help=f"--clipcov-score notebook: a class is re-scored when (its picks + 1) %% N == 0 "
        f"(default {ClipCovConfig.notebook_round}, the notebook's)",
    )
    p.add_argument(
        "--max-class-size",
        type=int,
        default=ClipCovConfig.max_class_size,
        help="clipcov: larger proxy classes are split into balanced pieces",
    )
    p.add_argument(
        "--greedy",
        choices=ALGORITHMS,
        default="merge",
        help="clipcov: merge (per-class greedy runs on the device, merged by gain; scalable) or the global "
        "float64 references lazy / plain (small N only: they hold the embeddings in memory); same picks",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices")
    p.add_argument("--out", required=True, help="output .npy of the chosen sample ids (int64, sorted)")
    return p


def main_select_subset(argv: list[str] | None = None) -> int:
    """``dissect-fast select-subset ...``: write the ids, print the summary; bad input exits 2."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.out.endswith(".npy"):
        parser.error(f"--out must end in .npy, got {a.out}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if a.notebook_round is not None and a.clipcov_score != "notebook":
        parser.error("--notebook-round only applies to --clipcov-score notebook")
    try:
        cfg = ClipCovConfig(
            approx=a.approx,
            device=device,
            max_class_size=a.max_class_size,
            algorithm=a.greedy,
            score=a.clipcov_score,
            notebook_round=ClipCovConfig.notebook_round if a.notebook_round is None else a.notebook_round,
        )
        names = load_class_names_emb(a.class_names) if a.class_names else None
        emb = load_embeddings(a.embeddings)
        res = select_subset(
            emb,
            a.method,
            a.fraction,
            class_names_emb=names,
            clusters=a.clusters,
            approx=a.approx,
            clipcov_score=a.clipcov_score,
            seed=a.seed,
            device=device,
            config=cfg,
        )
    except (ValueError, EmbeddingsError) as e:
        parser.error(str(e))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, res.ids)
    info = dict(
        res.to_json(),
        embeddings=str(a.embeddings),
        device=device,
        seed=a.seed,
        approx=a.approx,
        greedy=a.greedy,
        clipcov_score=a.clipcov_score,
        notebook_round=cfg.notebook_round if a.clipcov_score == "notebook" else None,
        embeddings_meta={k: emb.meta.get(k) for k in ("model", "checkpoint", "count")},
    )
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(res.summary())
    print(f"wrote {out} ({res.budget:,} ids) and {out.with_suffix('.json')}")
    return 0
