"""Per-step training metrics: RUN/steps.jsonl, TensorBoard ``train/`` scalars, wandb, and ``--report-to``.

Every ``--log-every-n-steps`` steps the trainer reads the step's loss on the host anyway; ``StepWindow.read``
fetches everything else a log line needs (logit scale, the window's clean/trained counts from the epoch
diagnostics) in that same single device-to-host transfer. Data and batch times are host wall clock averaged
over the window since the last log step (like open_clip's ``data_time`` / ``batch_time`` meters): the
read at the log step waits for the device, so the window's total is exact even though single steps are
dispatched asynchronously.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from dissect_fast.ioutil import atomic_write

log = logging.getLogger("dissect_fast")

STEPS_FILE = "steps.jsonl"


def init_wandb(run_cfg, config: dict, run_dir: str):
    """Start (or, with --resume latest, continue) the wandb run named after the run folder; returns the run."""
    import wandb

    return wandb.init(
        project=run_cfg.wandb_project_name,
        name=run_cfg.name,
        id=run_cfg.name.replace("/", "-"),
        notes=run_cfg.wandb_notes,
        tags=[],
        resume="auto" if run_cfg.resume == "latest" else None,
        config=config,
        dir=run_dir,
    )


def append_jsonl(path: str, rec: dict) -> None:
    """One JSON line appended to ``path``; an OSError (a full disk: ENOSPC) names the file, so that the run's stop
    message (``checkpoint.disk_full_stop``, exit 3) says which file could not be written."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, path) from e
        raise


def truncate_steps(run_dir: str, step: int) -> None:
    """Drop RUN/steps.jsonl lines past global step ``step`` (written after the checkpoint a run resumes from)."""
    path = os.path.join(run_dir, STEPS_FILE)
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a line cut short by a killed process
                pass
    with atomic_write(path, fsync=False) as f:
        f.writelines(keep)


class StepWindow:
    """Host timing and device counters of the steps since the last log step (one per epoch)."""

    def __init__(self, diag) -> None:
        self.diag = diag
        self.counts = self._counts()
        self.t0 = self.fetch_start = time.time()
        self.data_s, self.steps = 0.0, 0

    def _counts(self) -> torch.Tensor | None:
        d = self.diag
        return torch.stack([d.n_trained, d.n_clean_trained]) if d.clean is not None else None

    def got_batch(self) -> None:
        """The next batch arrived: its wait counts as data time."""
        self.data_s += time.time() - self.fetch_start

    def step_done(self) -> None:
        self.steps += 1

    def fetch_next(self) -> None:
        """The step's host work is done: from now on the loop waits for the next batch."""
        self.fetch_start = time.time()

    def read(self, loss: torch.Tensor, logit_scale: torch.Tensor) -> dict:
        """The log step's values, in one device-to-host transfer, and the window's averages; starts a new window."""
        vals = [loss.detach().float().reshape(()), logit_scale.detach().float().exp().reshape(())]
        counts = self._counts()
        if counts is not None:
            assert self.counts is not None  # the window's start, read the same way
            vals += list((counts - self.counts).float())
            self.counts = counts
        host = torch.stack(vals).tolist()  # the one host sync of a log step
        now = time.time()
        n = max(1, self.steps)
        out = {
            "loss": host[0],
            "logit_scale": host[1],
            "data_time_s": self.data_s / n,
            "batch_time_s": (now - self.t0) / n,
            "window_steps": self.steps,
        }
        if counts is not None and host[2] > 0:
            out["clean_share"] = host[3] / host[2]
        self.t0, self.data_s, self.steps = now, 0.0, 0
        return out


class StepLog:
    """Where a log step's record goes on the main rank: RUN/steps.jsonl, TensorBoard/wandb ``train/`` scalars and,
    without a progress bar, one log line in open_clip's format."""

    def __init__(self, run_dir: str, tb=None, wandb_run=None, line: bool = False) -> None:
        self.path = os.path.join(run_dir, STEPS_FILE)
        self.tb, self.wandb, self.line = tb, wandb_run, line

    def log(self, rec: dict, epoch_step: int, steps_per_epoch: int, batch_size: int, world_size: int) -> None:
        """``rec``: step, epoch (1-based), loss, lr, logit_scale, samples_per_s, data_time_s, batch_time_s,
        selected_share[, clean_share]; ``batch_size``: per rank, before selection."""
        append_jsonl(self.path, rec)
        scalars = {
            "train/loss": rec["loss"],
            "train/lr": rec["lr"],
            "train/scale": rec["logit_scale"],
            "train/samples_per_second": rec["samples_per_s"],
            "train/samples_per_second_per_gpu": rec["samples_per_s"] / world_size,
            "train/data_time": rec["data_time_s"],
            "train/batch_time": rec["batch_time_s"],
            "train/selected_share": rec["selected_share"],
        }
        if "clean_share" in rec:
            scalars["train/clean_share"] = rec["clean_share"]
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, rec["step"])
        if self.wandb is not None:
            self.wandb.log({**scalars, "step": rec["step"]}, step=rec["step"])
        if self.line:
            per_epoch = steps_per_epoch * batch_size * world_size
            done = epoch_step * batch_size * world_size
            log.info(
                f"Train Epoch: {rec['epoch']} [{done:>{len(str(per_epoch))}}/{per_epoch} "
                f"({100.0 * epoch_step / steps_per_epoch:.0f}%)] Data (t): {rec['data_time_s']:.3f} "
                f"Batch (t): {rec['batch_time_s']:.3f}, {rec['samples_per_s']:#g}/s, "
                f"{rec['samples_per_s'] / world_size:#g}/s/gpu LR: {rec['lr']:5f} "
                f"Logit Scale: {rec['logit_scale']:.3f} Loss: {rec['loss']:#.5g}"
            )
