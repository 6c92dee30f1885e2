"""The history buffer: one score per sample id, on the training device, NaN = never scored.

float32 by default; ``--history-dtype bf16`` halves its memory (bf16 keeps NaN, rounds scores to
8 significant bits). The selection op computes in float32 either way (see ``float32_window``).
"""

from __future__ import annotations

import torch

#: --history-dtype value -> storage dtype
HISTORY_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

_P = 2**31 - 1  # checksum modulus (a Mersenne prime): every partial product stays below 2**63
_CHUNK = 1 << 24  # entries per checksum chunk: bounded temporaries even for 2e9-entry buffers


@torch.no_grad()
def buffer_checksum(values: torch.Tensor) -> torch.Tensor:
    """Exact integer fingerprint of a buffer's bit patterns: int64 [2] on the buffer's device.

    ``(sum u_i, sum w_i * u_i) mod (2**31 - 1)`` over the unsigned bit patterns ``u_i`` with
    position weights ``w_i = i mod 65521 + 1``. Integer arithmetic without overflow, so identical
    buffers give identical checksums on any device and in any reduction order (NaN included), and a
    changed or moved entry changes it. Chunked: the temporaries stay at a few hundred MB for any N.
    """
    v = values.detach().reshape(-1)
    if v.element_size() not in (2, 4):
        raise ValueError(f"history checksum supports 16- and 32-bit buffers, got {v.dtype}")
    bits = v.view(torch.int16 if v.element_size() == 2 else torch.int32)
    mask = (1 << (8 * v.element_size())) - 1
    out = torch.zeros(2, dtype=torch.int64, device=v.device)
    for start in range(0, bits.numel(), _CHUNK):
        u = (bits[start : start + _CHUNK].long() & mask) % _P
        w = torch.arange(start, start + u.numel(), device=v.device, dtype=torch.int64) % 65521 + 1
        out[0] = (out[0] + u.sum()) % _P
        out[1] = (out[1] + ((u * w) % _P).sum()) % _P
    return out


class float32_window:
    """A float32 copy of ``history[ids]`` for the selection op when the buffer is stored in another
    dtype; ``write_back`` stores the op's in-place update, rounded to the buffer's dtype.

    The op indexes its history by the batch positions ``0..B-1`` of this window, which is exact
    because ids are unique within a batch (the op's contract).
    """

    def __init__(self, history: torch.Tensor, ids: torch.Tensor) -> None:
        self.history, self.ids = history, ids
        self.values = history[ids].float()
        self.positions = torch.arange(ids.shape[0], device=ids.device, dtype=torch.int64)

    def write_back(self) -> None:
        self.history[self.ids] = self.values.to(self.history.dtype)


class HistoryBuffer:
    """Per-sample score history indexed by global sample id. Its owner, the strategy, decides who writes it:
    the fused selection op in place (single process) or ``update`` with every rank's (id, score) pairs."""

    def __init__(self, num_ids: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        if num_ids < 1:
            raise ValueError(f"history buffer needs >= 1 entry, got {num_ids}")
        if dtype not in HISTORY_DTYPES.values():
            raise ValueError(f"history buffer dtype must be float32 or bfloat16, got {dtype}")
        self.values = torch.full((num_ids,), float("nan"), dtype=dtype, device=device)
        #: the entries a step is about to overwrite, as (ids, old values), between ``begin`` and ``commit``;
        #: None outside a step (``stage`` then keeps nothing)
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def begin(self) -> None:
        """Open a step: the writes ``stage``d from now on are undone by ``commit`` if the step is not applied."""
        self._staged = []

    def stage(self, ids: torch.Tensor) -> None:
        """Keep ``values[ids]`` before a write to them (a gather of the batch's entries, no host sync)."""
        if self._staged is not None:
            self._staged.append((ids, self.values[ids]))

    @torch.no_grad()
    def commit(self, applied: torch.Tensor) -> None:
        """Close the step: keep its writes where the device flag ``applied`` is true, else put every staged entry
        back bit for bit (undone newest first, so an id written twice gets its value from before the step). The
        flag is read on the device: a skipped optimizer step costs no host sync here either."""
        staged, self._staged = self._staged or [], None
        for ids, old in reversed(staged):
            self.values[ids] = torch.where(applied, self.values[ids], old)

    def __len__(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    @torch.no_grad()
    def update(self, ids: torch.Tensor, score: torch.Tensor, momentum: float) -> None:
        """h[id] <- s where unseen, else momentum * h[id] + (1 - momentum) * s (no host sync).

        Computed in float32 and rounded once to the buffer's dtype, like the fused op's update.
        """
        self.stage(ids)
        old = self.values[ids].float()
        score = score.float()
        new = torch.where(torch.isnan(old), score, momentum * old + (1.0 - momentum) * score)
        self.values[ids] = new.to(self.values.dtype)

    def seen_fraction(self) -> torch.Tensor:
        return (~torch.isnan(self.values)).float().mean()

    def checksum(self) -> torch.Tensor:
        """See ``buffer_checksum``: equal on every rank while the replicas are identical."""
        return buffer_checksum(self.values)

    def state_dict(self) -> dict:
        # one host copy (no extra clone of a GPU buffer: at 2e9 entries every copy is GBs)
        return {"values": self.values.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: dict) -> None:
        v = state["values"]
        if v.numel() != self.values.numel():
            raise ValueError(
                f"checkpoint history buffer has {v.numel()} entries but this data set needs {self.values.numel()}: "
                f"resume with the same training data (id range)"
            )
        self.values.copy_(v)  # converts device and dtype in place: no second full-size buffer
