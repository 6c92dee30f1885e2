"""What keeps a long run alive and honest: graceful stops on SIGTERM/SIGINT, sync-free skipping of
non-finite steps, and the errors that end a run with a message instead of a traceback.

The trainer owns the loop; this module owns the policies, so that the step stays short.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable

import torch

log = logging.getLogger("dissect_fast")


class RunStopped(RuntimeError):
    """The run cannot go on; the message says why and what to do. ``exit_code`` for the CLI."""

    exit_code = 3


class TooManyBadSamples(RunStopped):
    """More than --max-bad-fraction of an epoch's samples were unreadable."""


class NonFiniteError(RunStopped, FloatingPointError):
    """--max-nonfinite-steps consecutive steps had a non-finite loss or gradient."""


class Interrupted(RunStopped):
    """SIGTERM/SIGINT: the current step finished, a checkpoint was written, the run exits."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by this signal"


class StopSignal:
    """Turns the first SIGTERM/SIGINT into a flag the loop checks after each step; a second SIGINT
    (Ctrl-C twice) raises KeyboardInterrupt at once. Handlers are installed by ``install`` (main
    thread only) and the previous ones put back by ``restore``."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: finishing the current step, then writing a checkpoint and exiting "
                "(Ctrl-C again to quit at once, without a checkpoint)",
                signal.Signals(signum).name,
            )

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def agree_on_all_ranks(flag: torch.Tensor) -> torch.Tensor:
    """A device flag true only where it is true on every rank (an all-reduce MIN; no host sync)."""
    import torch.distributed as tdist

    x = flag.to(torch.int32)  # NCCL reduces no bool
    tdist.all_reduce(x, op=tdist.ReduceOp.MIN)
    return x.bool()


def agree_on_stop(local: bool, dist_info) -> bool:
    """Whether any rank wants to stop (all ranks must stop at the same step); a collective, so called
    only where the loop syncs anyway."""
    if not dist_info.enabled:
        return local
    import torch.distributed as tdist

    flag = torch.tensor([1.0 if local else 0.0], device=torch.device("cuda") if torch.cuda.is_available() else "cpu")
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return bool(flag.item())


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients are not finite, without a host sync.

    Per step: a device flag ``finite`` = isfinite(loss) and isfinite(global grad norm). For torch's
    fused AdamW the flag goes in as the optimizer's ``found_inf`` (the GradScaler protocol), so the
    fused kernel leaves parameters, moments and the step count untouched: an exact skip. Other
    optimizers get their gradients zeroed instead (moments decay and weight decay still apply for
    that step: an approximate skip, logged once). Under fp16 GradScaler (``--precision amp``) the
    scaler already skips overflowing steps; the guard then only counts non-finite losses.

    Counters stay on the device and are read by ``check`` at log steps, which raises NonFiniteError
    when a run of ``max_consecutive`` skipped steps happened anywhere since the last read.

    Several ranks (``agree``: an all-reduce of the flag, MIN over the ranks): the gradients are all-reduced, so
    their norm is the same everywhere, but the loss is each rank's own; the agreed flag makes every rank skip the
    same steps (one scalar all-reduce per step, on the device). ``applied`` (after ``after_step``): whether the
    update happened (finite, and under the fp16 GradScaler not skipped for overflow): the history buffer keeps a
    step's writes only then (``Strategy.commit_step``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        max_consecutive: int,
        scaler_enabled: bool,
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.optimizer, self.max_consecutive, self.scaler_enabled = optimizer, max_consecutive, scaler_enabled
        self.agree = agree
        self.exact = bool(optimizer.defaults.get("fused")) and hasattr(optimizer, "_step_supports_amp_scaling")
        z = lambda dt: torch.zeros((), dtype=dt, device=device)
        self.total = z(torch.int64)  # skipped steps in the run
        self.epoch = z(torch.int64)  # skipped steps in the current epoch
        self.run = z(torch.int64)  # current streak of consecutive skipped steps
        self.run_max = z(torch.int64)  # longest streak since the last check
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.applied = self.finite  #: the last step's update happened (a device flag)
        self._seen_total = 0
        if not self.exact and not scaler_enabled:
            log.info(
                "non-finite steps: %s has no found_inf input; a skipped step zeroes the gradients instead",
                type(optimizer).__name__,
            )

    @torch.no_grad()
    def before_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        """Call after backward (and unscale/clip) and before ``optimizer.step``."""
        finite = torch.isfinite(loss.detach())
        if self.agree is not None:  # one rank's non-finite loss skips the step on every rank
            finite = self.agree(finite)
        if not self.scaler_enabled:
            if grad_norm is None:
                grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
            if grad_norm is not None:
                finite = finite & torch.isfinite(grad_norm)
            if self.exact:
                self.optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]  # read by torch's step()
            else:
                for g in self.optimizer.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.grad.copy_(torch.where(finite, p.grad, torch.zeros_like(p.grad)))
        self.finite = finite
        bad = (~finite).long()
        self.total += bad
        self.epoch += bad
        self.run.mul_(bad).add_(bad)
        torch.maximum(self.run_max, self.run, out=self.run_max)

    def after_step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Call after ``optimizer.step`` (``scaler.step``) and before ``scaler.update``: sets ``applied``."""
        if self.exact and not self.scaler_enabled and hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf
        self.applied = self.finite
        if self.scaler_enabled and scaler is not None and hasattr(scaler, "_found_inf_per_device"):
            # the scaler skipped the step when the unscaled gradients overflowed (its found_inf, per device,
            # all-reduced gradients: the same on every rank); read on the device, before scaler.update clears it
            found = [f.to(self.finite.device) for f in scaler._found_inf_per_device(self.optimizer).values()]
            if found:
                self.applied = self.finite & (torch.stack(found).sum() == 0)

    def masked(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss where finite, else 0 (for an epoch mean over finite steps)."""
        return torch.where(self.finite, loss, torch.zeros_like(loss))

    def start_epoch(self) -> None:
        self.epoch.zero_()

    def check(self, step: int, last_good: str | None) -> int:
        """Read the counters (a host sync: log steps only); returns the epoch's skipped steps."""
        total, epoch, run_max = (int(x) for x in torch.stack([self.total, self.epoch, self.run_max]).tolist())
        self.run_max.copy_(self.run)
        if total > self._seen_total:
            log.warning(
                "step %d: %d step(s) with a non-finite loss or gradient skipped so far (%d this epoch)",
                step,
                total,
                epoch,
            )
            self._seen_total = total
        if run_max >= self.max_consecutive:
            raise NonFiniteError(
                f"{run_max} consecutive steps had a non-finite loss or gradient (--max-nonfinite-steps "
                f"{self.max_consecutive}), last at step {step}: lower --lr, set --grad-clip-norm or use --precision "
                f"fp32. The last good checkpoint is kept: {last_good or 'none written yet'}"
            )
        return epoch

    def state_dict(self) -> dict:
        return {"total": self.total.cpu(), "epoch": self.epoch.cpu(), "run": self.run.cpu()}

    def load_state_dict(self, state: dict) -> None:
        for k in ("total", "epoch", "run"):
            if k in state:
                getattr(self, k).copy_(state[k])
        self.run_max.copy_(self.run)
        self._seen_total = int(self.total)


def nonfinite_state(state: dict) -> list[str]:
    """The names of a checkpoint state's tensors that hold a NaN or Inf: model weights and buffers (``state_dict``),
    optimizer state (``optimizer``), the grad scaler's scale (``scaler``). The history buffer is not looked at (NaN
    there means "never scored").

    Cheap enough for every save: one fused L2 norm per device over all floating tensors (a NaN or Inf in a tensor
    makes its norm non-finite), one host read; only tensors whose norm is not finite (or that overflow the norm
    while finite, e.g. entries near 1e19) are then checked element-wise, so the answer is exact."""
    named: list[tuple[str, torch.Tensor]] = [(f"state_dict.{k}", v) for k, v in state.get("state_dict", {}).items()]
    for pid, pstate in state.get("optimizer", {}).get("state", {}).items():
        named += [(f"optimizer.state.{pid}.{k}", v) for k, v in pstate.items() if isinstance(v, torch.Tensor)]
    named = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    bad = [f"scaler.{k}" for k, v in state.get("scaler", {}).items() if isinstance(v, float) and not math.isfinite(v)]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for n, t in named:
        by_device.setdefault(t.device, []).append((n, t))
    for group in by_device.values():
        norms = torch.stack([x.float() for x in torch._foreach_norm([t.detach() for _, t in group])])
        suspects = (~torch.isfinite(norms)).nonzero().flatten().tolist()  # the one host read
        bad += [group[i][0] for i in suspects if not bool(torch.isfinite(group[i][1]).all())]
    return bad


def check_finite_state(state: dict, name: str, last_good: str | None) -> None:
    """Refuse to write checkpoint ``name`` when ``state`` holds a NaN or Inf (``nonfinite_state``): raise
    NonFiniteError naming the tensors and ``last_good``, the checkpoint that stays the newest, which every earlier
    save checked the same way."""
    bad = nonfinite_state(state)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NonFiniteError(
            f"checkpoint {name} not written: {len(bad)} tensor(s) hold NaN or Inf ({shown}); the weights diverged: "
            f"lower --lr, set --grad-clip-norm or use --precision fp32. The last good checkpoint is kept: "
            f"{last_good or 'none written yet'}"
        )


def bad_samples_stop(stats: dict, epoch: int, max_bad_fraction: float) -> str | None:
    """The bad-data policy at an epoch's end, from the loader's counters ``stats``: skipped samples are logged with
    the worst shards; returns the stop message when more than ``max_bad_fraction`` of the epoch's training
    samples were unreadable (the caller raises TooManyBadSamples), else None."""
    bad = stats.get("bad_samples", 0)
    if not bad:
        return None
    bad_frac = bad / max(1, stats.get("ok", 0) + bad)
    worst = sorted(((v, k[6:]) for k, v in stats.items() if k.startswith("shard:")), reverse=True)[:5]
    log.warning(
        "epoch %d: skipped %d bad samples (%s); worst shards: %s",
        epoch + 1,
        bad,
        {k: v for k, v in stats.items() if not k.startswith("shard:") and k != "ok"},
        worst,
    )
    if bad_frac <= max_bad_fraction:
        return None
    return (
        f"{100 * bad_frac:.2f}% of epoch {epoch + 1}'s training samples were unreadable (> --max-bad-fraction "
        f"{max_bad_fraction}); worst shards (bad samples, shard): {worst}. Repair or drop those shards, or raise "
        f"--max-bad-fraction"
    )
