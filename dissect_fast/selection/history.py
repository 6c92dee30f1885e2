"""The history buffer: one float32 score per sample id, on the training device, NaN = never scored."""

from __future__ import annotations

import torch


class HistoryBuffer:
    """Per-sample score history indexed by global sample id.

    ``local_updates`` is True in a single process: the fused selection op updates the buffer in
    place. With several ranks the op only reads it, and ``update`` applies the all-gathered
    (id, score) pairs of every rank so that all replicas stay identical.
    """

    def __init__(self, num_ids: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        if num_ids < 1:
            raise ValueError(f"history buffer needs >= 1 entry, got {num_ids}")
        self.values = torch.full((num_ids,), float("nan"), dtype=dtype, device=device)
        self.local_updates = True

    def __len__(self) -> int:
        return self.values.numel()

    @torch.no_grad()
    def update(self, ids: torch.Tensor, score: torch.Tensor, momentum: float) -> None:
        """h[id] <- s where unseen, else momentum * h[id] + (1 - momentum) * s (no host sync)."""
        old = self.values[ids]
        new = torch.where(torch.isnan(old), score, momentum * old + (1.0 - momentum) * score)
        self.values[ids] = new.to(self.values.dtype)

    def seen_fraction(self) -> torch.Tensor:
        return (~torch.isnan(self.values)).float().mean()

    def state_dict(self) -> dict:
        return {"values": self.values.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        v = state["values"]
        if v.numel() != self.values.numel():
            raise ValueError(
                f"checkpoint history buffer has {v.numel()} entries but this data set needs {self.values.numel()}: "
                f"resume with the same training data (id range)"
            )
        self.values.copy_(v.to(self.values.device, self.values.dtype))
