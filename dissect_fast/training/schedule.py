"""Run set-up as open_clip's ``main.py`` does it: the LR schedule (``--lr-scheduler``) and the CUDA backend defaults.

The schedules are open_clip's own functions (``open_clip_train.scheduler``): each returns ``adjust(step)``,
which sets every parameter group's ``lr`` for global step ``step`` (0-based) and returns it. Stateless in the
step, so a resumed run picks the schedule up where it left off.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

LR_SCHEDULERS = ("cosine", "const", "const-cooldown")


def make_scheduler(optimizer, optim, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """open_clip's scheduler for ``optim.lr_scheduler`` (an ``OptimConfig``), over ``total_steps`` steps.

    cosine: linear warm-up to --lr over --warmup steps, then cosine decay to 0 at the last step. const: warm-up,
    then --lr. const-cooldown: warm-up, --lr, then over the last --epochs-cooldown epochs a decay
    ``(1 - e / es) ** --lr-cooldown-power`` from --lr to --lr-cooldown-end.
    """
    from open_clip_train import scheduler as oc

    name = optim.lr_scheduler
    if name == "cosine":
        return oc.cosine_lr(optimizer, optim.lr, optim.warmup, total_steps)
    if name == "const":
        return oc.const_lr(optimizer, optim.lr, optim.warmup, total_steps)
    if name == "const-cooldown":
        if optim.epochs_cooldown is None:
            raise ValueError("--lr-scheduler const-cooldown needs --epochs-cooldown N (the epochs of the cooldown)")
        cooldown_steps = steps_per_epoch * optim.epochs_cooldown
        return oc.const_lr_cooldown(
            optimizer,
            optim.lr,
            optim.warmup,
            total_steps,
            cooldown_steps,
            optim.lr_cooldown_power,
            optim.lr_cooldown_end,
        )
    raise ValueError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {name!r}")


def lr_at(step: int, optim, steps_per_epoch: int, total_steps: int) -> float:
    """The schedule's LR at global step ``step``, computed without touching an optimizer."""
    holder = types.SimpleNamespace(param_groups=[{}])
    return make_scheduler(holder, optim, steps_per_epoch, total_steps)(step)


def set_cuda_defaults(device: torch.device) -> None:
    """open_clip's CUDA defaults: cuDNN autotuning (benchmark on, deterministic off) and TF32 matmuls and
    convolutions. A no-op for any other device."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
