"""Run set-up as open_clip's ``main.py`` does it: the LR schedule (``--lr-scheduler``) and the CUDA backend defaults.

The schedules are open_clip's own functions (``open_clip_train.scheduler``): each returns ``adjust(step)``,
which sets every parameter group's ``lr`` for global step ``step`` (0-based) and returns it. Stateless in the
step, so a resumed run picks the schedule up where it left off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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
    if name == "const-cooldown":  # --epochs-cooldown given: checked with the config
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
    raise AssertionError(name)  # --lr-scheduler's choices are checked with the config


def set_cuda_defaults(device: torch.device) -> None:
    """open_clip's CUDA defaults: cuDNN autotuning (benchmark on, deterministic off) and TF32 matmuls and
    convolutions. A no-op for any other device."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
