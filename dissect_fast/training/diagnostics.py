"""Per-epoch selection diagnostics: what was scored and trained, clean vs noisy, and the plots.

Everything accumulates in device tensors indexed by sample id, so the step pays a few scatters
and no host synchronisation; the numbers are read once at the end of the epoch.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dissect_fast.ioutil import atomic_write


class EpochDiagnostics:
    """Trained-sample counters (always: two device scalars) and, only when needed, per-id arrays: last score,
    last delta and times trained (12 bytes per id). ``per_id``: the shards have clean flags (clean/noisy
    means, plots) or --record writes them; without it a step pays one add and no scatter."""

    _PER_ID = ("score", "delta", "trained")

    def __init__(self, num_ids: int, device: torch.device, clean: np.ndarray | None, per_id: bool = False) -> None:
        self.device = device
        self.clean = None
        if clean is not None:
            c = np.zeros(num_ids, dtype=np.uint8)
            c[: min(num_ids, len(clean))] = clean[:num_ids]
            self.clean = torch.from_numpy(c).to(device).bool()
        self.num_ids = num_ids
        self.per_id = per_id or self.clean is not None
        self.reset()

    def reset(self) -> None:
        n, d = self.num_ids, self.device
        self.score = self.delta = self.trained = None
        if self.per_id:
            self.score = torch.full((n,), float("nan"), device=d)
            self.delta = torch.full((n,), float("nan"), device=d)
            self.trained = torch.zeros(n, dtype=torch.int32, device=d)
        self.n_trained = torch.zeros((), dtype=torch.int64, device=d)
        self.n_clean_trained = torch.zeros((), dtype=torch.int64, device=d)

    @torch.no_grad()
    def record(self, ids: torch.Tensor, sel, trained_ids: torch.Tensor) -> None:
        """One batch: ``ids`` its samples, ``sel`` its completed Selection (``Strategy.update``), ``trained_ids``
        the ids trained on."""
        self.n_trained += trained_ids.numel()
        if self.clean is not None:
            self.n_clean_trained += self.clean[trained_ids].sum()
        if not self.per_id:
            return
        assert self.score is not None and self.delta is not None and self.trained is not None  # per_id: set
        if sel.score is not None:
            self.score[sel.scored_ids] = sel.score.float()
        if sel.delta is not None:
            self.delta[ids] = sel.delta.float()
        self.trained.index_add_(0, trained_ids, torch.ones_like(trained_ids, dtype=torch.int32))

    def state_dict(self) -> dict:
        """The epoch so far (an interrupted epoch's checkpoint), on the host."""
        names = ("n_trained", "n_clean_trained") + (self._PER_ID if self.per_id else ())
        return {k: getattr(self, k).detach().cpu() for k in names}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if getattr(self, k, None) is not None:  # a run without per-id arrays skips a checkpoint's
                getattr(self, k).copy_(v.to(self.device))

    def summary(self) -> dict:
        out: dict[str, float] = {"select/trained_samples": int(self.n_trained)}
        if self.clean is None:
            return out
        out["select/clean_fraction"] = float(self.n_clean_trained) / max(1, int(self.n_trained))
        for name, v in (("score", self.score), ("delta", self.delta)):
            assert v is not None  # clean flags imply per_id
            for label, mask in (("clean", self.clean), ("noisy", ~self.clean)):
                vals = v[mask]
                vals = vals[~torch.isnan(vals)]
                if vals.numel():
                    out[f"diag/{name}_{label}_mean"] = float(vals.mean())
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        assert self.score is not None and self.delta is not None and self.trained is not None  # per_id only
        a = {
            "score": self.score.cpu().numpy(),
            "delta": self.delta.cpu().numpy(),
            "trained": self.trained.cpu().numpy(),
        }
        if self.clean is not None:
            a["clean"] = self.clean.cpu().numpy()
        return a


def selecting(strategy, epoch: int) -> bool:
    """Whether ``strategy`` selects in ``epoch``: it trains a chosen subset of each batch, past any warm-up (a
    warm-up epoch trains the full batch or a random subset) and not on the full data."""
    in_warmup = getattr(strategy, "in_warmup", None)  # the warm-up strategies' (selection.strategies.DissectWarmup)
    return not strategy.trains_full_batch(epoch) and not (in_warmup is not None and in_warmup(epoch))


def epoch_accounting(
    diag: EpochDiagnostics, strategy, epoch: int, batches: int, batch_size: int, accum: int, dist
) -> dict:
    """The epoch's compute accounting over all ranks, for metrics.jsonl: ``samples_forwarded`` (samples through a
    forward pass: the scoring pass over every batch when the strategy scores, plus the trained samples' training
    forward, twice under --accum-freq > 1, whose no-grad forward is re-run with grad), ``samples_trained`` (samples
    backpropagated), ``selecting`` (``selecting``) and, with clean flags, ``clean_share_trained`` (share of the
    trained samples that were clean). ``batches``: batches each rank read in the epoch. Every rank trains the same
    number of samples per batch (a shape), so the counts scale with the world size; the clean share is reduced
    over the ranks (one small all-reduce, at the epoch's end)."""
    world = dist.world_size
    counts = torch.stack([diag.n_trained, diag.n_clean_trained])
    if diag.clean is not None and dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(counts)
    else:
        counts = counts * world
    trained = int(counts[0])
    scored = batches * batch_size * world if strategy.needs_scoring(epoch) else 0
    out: dict = {
        "samples_forwarded": scored + trained * (2 if accum > 1 else 1),
        "samples_trained": trained,
        "selecting": selecting(strategy, epoch),
    }
    if diag.clean is not None:
        out["clean_share_trained"] = float(counts[1]) / max(1, trained)
    return out


def write_record(diag: EpochDiagnostics, dist, history, strategy: str, run_dir: str, epoch: int) -> str | None:
    """--record: ``RUN/select_record/record_{epoch + 1}.npz`` (1-based, like metrics.jsonl and the checkpoints)
    with one row per sample id scored or trained in the epoch: ``id``, ``selected`` (times trained; 0 = scored,
    not selected), ``score`` (last CLIPScore, NaN: not scored), ``delta`` (last DISSect differential, NaN: none),
    ``history`` (buffer value after the epoch, history strategies) and ``clean`` (when the index has clean
    flags). Several ranks: the per-rank diagnostics are merged first (a collective on every rank); the main rank
    writes. Returns the path on the main rank."""
    d = diag
    assert d.score is not None and d.delta is not None and d.trained is not None  # --record sets per_id
    score, delta, trained = d.score.clone(), d.delta.clone(), d.trained.clone()
    if dist.enabled:
        import torch.distributed as tdist

        for t in (score, delta):  # NaN where a rank did not see the id: merge by max over the ranks
            t.copy_(torch.where(torch.isnan(t), float("-inf"), t))
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            t[torch.isneginf(t)] = float("nan")
        tdist.all_reduce(trained, op=tdist.ReduceOp.SUM)
    if not dist.is_main:
        return None
    ids = torch.nonzero(~torch.isnan(score) | (trained > 0)).squeeze(1)
    rec = {
        "id": ids.cpu().numpy(),
        "selected": trained[ids].cpu().numpy(),
        "score": score[ids].cpu().numpy(),
        "delta": delta[ids].cpu().numpy(),
        "epoch": np.int64(epoch + 1),
        "num_ids": np.int64(d.num_ids),
        "strategy": np.array(strategy),
    }
    if history is not None:
        rec["history"] = history.values[ids].float().cpu().numpy()
    if d.clean is not None:
        rec["clean"] = d.clean[ids].cpu().numpy()
    out = os.path.join(run_dir, "select_record")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"record_{epoch + 1}.npz")
    with atomic_write(path, "wb", fsync=False) as f:
        np.savez(f, **rec)
    return path


def plot_epoch(arrays: dict, epoch: int, out_dir: str) -> str | None:
    """Histograms of score and delta, clean vs noisy (needs clean flags)."""
    if "clean" not in arrays:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    clean = arrays["clean"]
    for ax, key in zip(axes, ("score", "delta")):
        v = arrays[key]
        for label, m, c in (("clean", clean, "tab:green"), ("noisy", ~clean, "tab:red")):
            x = v[m & ~np.isnan(v)]
            if x.size:  # one step artist per series: far cheaper than 50 bar patches, drawn every epoch
                dens, edges = np.histogram(x, bins=50, density=True)
                ax.stairs(dens, edges, fill=True, alpha=0.55, color=c, label=f"{label} (n={x.size})")
        ax.set_title(f"epoch {epoch}: {key}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.9, wspace=0.2)
    path = os.path.join(out_dir, f"epoch_{epoch:03d}_score_delta.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_history(metrics: list[dict], out_dir: str) -> None:
    """R@1 over epochs, and the mean CLIPScore of clean vs noisy pairs over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("val/image_to_text_R@1", "val/text_to_image_R@1"):
        pts = [(m["epoch"], m[key]) for m in metrics if key in m]  # --val-every N: only every N-th epoch has it
        if pts:
            ax.plot(*zip(*pts), marker="o", label=key.split("/")[1])
    ax.set_xlabel("epoch")
    ax.set_ylabel("R@1 (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "retrieval_r1.png"), dpi=90)
    plt.close(fig)
    if any("diag/score_clean_mean" in m for m in metrics):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for label, c in (("clean", "tab:green"), ("noisy", "tab:red")):
            pts = [(m["epoch"], m[f"diag/score_{label}_mean"]) for m in metrics if f"diag/score_{label}_mean" in m]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=c, label=f"{label} pairs")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean CLIPScore")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "score_clean_vs_noisy.png"), dpi=90)
        plt.close(fig)
