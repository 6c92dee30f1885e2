"""The epoch loop over a built run: the loop keeps its position (step, epoch, counters) and nothing else.

Components come from ``build.build_run`` (a :class:`~dissect_fast.training.build.Run`); one step is
``step.StepRunner``; what happens at the loop's points (evaluation, logs, metrics, TensorBoard, wandb, plots,
progress, profiling) are ``callbacks``, which get a ``callbacks.Context``; checkpoints hold the state of a list of
stateful components (``checkpoint.Part``). No host synchronisation inside a step: losses and counters stay on the
device and are read every ``--log-every-n-steps`` steps.
"""

from __future__ import annotations

import json
import logging
import signal
import time

import torch

from dissect_fast.config import TrainConfig
from dissect_fast.training import checkpoint as ckpt_io
from dissect_fast.training import reliability
from dissect_fast.training.build import Run, build_run, seed_everything
from dissect_fast.training.callbacks import HOOKS, Callback, Context, log_run_start, overrides, run_callbacks
from dissect_fast.training.checkpoint import TOP, GeneratorState, ModelWeights, Part, RngStreams, RunIdentity
from dissect_fast.training.diagnostics import epoch_accounting
from dissect_fast.training.distributed import barrier, elastic_restart_count
from dissect_fast.training.logs import StepWindow, truncate_steps
from dissect_fast.training.position import Progress
from dissect_fast.training.resume import ResumePoint
from dissect_fast.training.run_folder import RunLock, rewrite_metrics, write_run_start
from dissect_fast.training.step import StepRunner

log = logging.getLogger("dissect_fast")


class Trainer:
    """One training run's loop. ``Trainer(cfg)`` builds the run (``build.build_run``); ``Trainer.from_run`` takes a
    built one. ``fit`` runs the epochs. Components are ``trainer.run.<name>`` (also readable as ``trainer.<name>``)."""

    def __init__(self, cfg: TrainConfig, callbacks: list[Callback] | None = None) -> None:
        self._setup(build_run(cfg), callbacks)

    @classmethod
    def from_run(cls, run: Run, callbacks: list[Callback] | None = None) -> Trainer:
        t = cls.__new__(cls)
        t._setup(run, callbacks)
        return t

    def _setup(self, run: Run, callbacks: list[Callback] | None) -> None:
        self.run, self.cfg = run, run.cfg
        self.ctx = Context(run, last_trained=run.cfg.data.batch_size)
        self.stepper = StepRunner(run, self.ctx)
        self.progress = Progress(self.ctx, run.cfg.data.batch_size * run.dist.world_size * run.accum)
        #: callbacks called after the run's own (tests, benchmarks, the CLI's)
        self.callbacks: list[Callback] = list(callbacks or [])
        self.stop = reliability.StopSignal()  # SIGTERM/SIGINT -> checkpoint after the current step, exit
        self.max_steps: int | None = None  #: set by fit(max_steps=...): a stop inside an epoch writes no checkpoint
        self._epoch_resume: dict | None = None  # data position inside an epoch, from an interrupted run
        self._hooks: dict[str, list] = {h: [] for h in HOOKS}
        self._run_hooks: list[Callback] = []

    def __getattr__(self, name: str):
        """A run component by its name (``trainer.model`` is ``trainer.run.model``): read-only shortcuts."""
        run = self.__dict__.get("run")
        if run is None:
            raise AttributeError(name)
        return getattr(run, name)

    step = property(lambda self: self.ctx.step)
    metrics = property(lambda self: self.ctx.metrics)

    # ------------------------------------------------------------------ state
    def checkpoint_parts(self) -> list[Part]:
        """The stateful components a checkpoint holds, in load order (open_clip reads ``state_dict``, ``epoch``)."""
        run = self.run
        return [
            Part(TOP, RunIdentity(run.model_name, run.model_choice.model_cfg, self.cfg.to_dict())),
            Part("state_dict", ModelWeights(run.model)),
            Part("optimizer", run.optimizer),
            Part("scaler", run.scaler),
            Part("strategy", run.strategy),
            Part(TOP, self.progress),
            Part("rng", RngStreams()),
            Part("generator", GeneratorState(run.generator)),
            Part("nonfinite", run.guard, optional=True),
        ]

    def state_dict(self, epoch_done: int) -> dict:
        self.progress.epoch_done = epoch_done
        return ckpt_io.gather_state(self.checkpoint_parts())

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint's state (its model was checked by ``resume.find_resume``). The checkpoint holds rank
        0's RNG streams: every other rank derives its own from the step."""
        ckpt_io.restore_state(self.checkpoint_parts(), state)
        self._epoch_resume = ckpt_io.Checkpointer.epoch_position(state)
        rank = self.run.dist.rank
        if rank > 0:
            seed = self.cfg.run.seed + 1_000_003 * self.ctx.step + rank
            seed_everything(seed)
            self.run.generator.manual_seed(seed * 7919 + rank)

    def _resume(self) -> None:
        """Load the checkpoint found at build; drop lines of epochs and steps it does not hold (a crash after
        writing them). A resume of a run that has no checkpoint yet starts over: its logs are emptied."""
        run, point = self.run, self.run.resume
        run.resume = ResumePoint(record=point.record)  # loaded once: a second fit continues from memory
        resumed = self.cfg.run.resume is not None or elastic_restart_count() > 0
        if point.state is None:
            if self.cfg.run.resume == "latest":
                log.info("--resume latest: no checkpoint in %s yet, starting fresh", run.run_dir)
            if run.dist.is_main and resumed:
                rewrite_metrics(run.run_dir, [])  # the lines of an attempt killed before its first checkpoint
                truncate_steps(run.run_dir, 0)
            return
        self.load_state_dict(point.state)
        log.info("resumed from %s: epoch %d is next (step %d)", point.path, self.ctx.start_epoch + 1, self.ctx.step)
        if elastic_restart_count() > 0:
            log.warning("torchelastic restart %d: resumed from %s", elastic_restart_count(), point.path)
        if run.dist.is_main:
            rewrite_metrics(run.run_dir, self.ctx.metrics)
            truncate_steps(run.run_dir, self.ctx.step)

    # ------------------------------------------------------------------ callbacks
    def _refresh_hooks(self) -> None:
        """The hooks each point calls: only overridden ones, so a point no callback uses costs nothing."""
        cbs = self._run_hooks + self.callbacks
        self._hooks = {h: [getattr(c, h) for c in cbs if overrides(c, h)] for h in HOOKS}

    def _emit(self, hook: str, *args) -> None:
        for fn in self._hooks[hook]:
            fn(self.ctx, *args)

    # ------------------------------------------------------------------ the loop
    def fit(self, max_steps: int | None = None, start_epoch: int | None = None) -> list[dict]:
        """Train all epochs, or until ``max_steps`` global steps (None: ``self.max_steps``); ``start_epoch`` (0-based) starts there instead of
        where a resumed checkpoint ends (benchmarks: the steady state after a warm-up). Returns the epochs' metrics.
        SIGTERM/SIGINT: the current step finishes, a checkpoint is written and reliability.Interrupted is raised
        (the CLI turns it into a message and exit code 128 + signal)."""
        self.max_steps = max_steps if max_steps is not None else self.max_steps
        self.stop.install()
        try:
            self._start_fit(start_epoch)
            t_start = time.time()
            for epoch in range(self.ctx.start_epoch, self.cfg.optim.epochs):
                metrics = self.train_epoch(epoch, t_start)
                if self.ctx.epoch_step < self.run.steps_per_epoch:  # max_steps inside the epoch: no epoch end
                    self.ctx.metrics.append(metrics)
                    break
                self._end_epoch(epoch, metrics)
                if self._max_steps_done():
                    break
            self._emit("on_fit_end")
            return self.ctx.metrics
        except Exception as e:  # a full disk anywhere (logs, metrics, TensorBoard, plots): exit 3, as for a checkpoint
            stop = ckpt_io.disk_full_stop(e, self.run.run_dir, self.run.checkpointer.latest())
            if stop is None:
                raise
            raise stop from e
        finally:
            self._end_fit()

    def _start_fit(self, start_epoch: int | None) -> None:
        """The run folder's lock, config and provenance (or a resume's record), resume, then on_fit_start."""
        run = self.run
        self.progress.t0 = time.time()
        if run.dist.is_main:
            RunLock.acquire(run.run_dir)  # held since set-up; taken again by a second fit of this Trainer
            write_run_start(run.run_dir, self.cfg, run.device, run.resume.record)
        run.checkpointer.remove_stale()  # under the lock: no other run writes here
        self._resume()
        if start_epoch is not None:
            self.ctx.start_epoch = start_epoch
        log_run_start(self.ctx)  # the short summary (and a --warmup longer than the run); the rest is in the folder
        self._run_hooks = run_callbacks(self.ctx)
        self._refresh_hooks()
        self._emit("on_fit_start")

    def _end_fit(self) -> None:
        """Always, last: signal handlers back, on_fit_exit, no loader worker left behind, the lock released."""
        self.stop.restore()
        self._emit("on_fit_exit")
        self.run.data.close()
        if self.run.dist.is_main:
            RunLock.release(self.run.run_dir)

    def train_step(self, epoch: int, images, tokens, ids) -> torch.Tensor:
        """One optimizer step (``step.StepRunner.step``); returns the loss, on the device."""
        return self.stepper.step(epoch, images, tokens, ids)

    def train_epoch(self, epoch: int, t_start: float) -> dict:
        """One epoch (the rest of an interrupted one after a resume); returns its training metrics. The epoch's
        end (evaluation, logs, checkpoint) is ``_end_epoch``."""
        c, run = self.ctx, self.run
        batches, loss_sum, epoch_rng = self._start_epoch(epoch)
        window, t0 = StepWindow(run.diag), time.time()  # host wall clock and counts since the last log step
        for images, tokens, ids in batches:
            window.got_batch()
            lr = run.scheduler(c.step)  # sets the optimizer's lr for this step
            loss = self.train_step(epoch, images, tokens, ids)
            loss_sum += run.guard.masked(loss)
            c.epoch_step += 1
            c.step += 1
            window.step_done()
            self._emit("on_step_end", epoch, c.epoch_step)
            if c.epoch_step % self.cfg.run.log_every_n_steps == 0 or c.epoch_step == run.steps_per_epoch:
                self._log_step(epoch, lr, loss, window)
            if c.epoch_step < run.steps_per_epoch and self._should_stop(c.epoch_step):
                self._save_interrupted(epoch, loss_sum, epoch_rng)
            if self._max_steps_done():
                break
            window.fetch_next()
        self._emit("on_epoch_steps_end", epoch)
        return self._epoch_metrics(epoch, loss_sum, time.time() - t0, t_start)

    def _start_epoch(self, epoch: int):
        """The epoch's batches (past the steps an interrupted run already trained), its loss sum and the RNG state
        its data order starts from."""
        run, c = self.run, self.ctx
        run.model.train()
        run.diag.reset()
        run.guard.start_epoch()
        self._refresh_hooks()
        resume = self._epoch_resume if self._epoch_resume and self._epoch_resume["epoch"] == epoch else None
        self._epoch_resume = None
        if resume is not None and run.dist.rank == 0:
            ckpt_io.set_rng_state(resume["epoch_rng"])
        epoch_rng = ckpt_io.rng_state()  # what an interrupted epoch restarts its data order from
        run.train_loader.set_epoch(epoch)
        c.epoch, c.epoch_step, loss_sum = epoch, 0, torch.zeros((), device=run.device)
        batches = run.data.epoch_batches()
        if resume is not None:
            loss_sum = self._skip_to_position(epoch, batches, resume)
        if self._hooks["on_step_start"] or self._hooks["on_batch"]:
            batches = self._with_step_hooks(batches, run.steps_per_epoch - c.epoch_step)
        self._emit("on_epoch_start", epoch)
        return batches, loss_sum, epoch_rng

    def _with_step_hooks(self, batches, steps: int):
        """``batches`` (``steps`` of them) with on_step_start before each wait for a batch and on_batch after it."""
        for _ in range(steps):
            self._emit("on_step_start")
            batch = next(batches)
            self._emit("on_batch")
            yield batch
        yield from batches  # nothing left: lets the epoch's batches close their loader

    def _log_step(self, epoch: int, lr: float, loss: torch.Tensor, window: StepWindow) -> None:
        """Every --log-every-n-steps steps: the one host sync (loss, counters), the non-finite guard, the learned
        score scale, then the callbacks' on_log_step (steps.jsonl, progress bar)."""
        read = window.read(loss, self.run.model.logit_scale)
        self.run.guard.check(self.ctx.step, self.run.checkpointer.latest())  # too many non-finite: NonFiniteError
        self.stepper.refresh_scale()
        self._emit("on_log_step", epoch, self.ctx.epoch_step, lr, read)

    def _max_steps_done(self) -> bool:
        return self.max_steps is not None and self.ctx.step >= self.max_steps

    def _epoch_metrics(self, epoch: int, loss_sum: torch.Tensor, wall: float, t_start: float) -> dict:
        """The epoch's training metrics; the bad-data policy stops the run here (TooManyBadSamples)."""
        run, n, stats = self.run, self.ctx.epoch_step, dict(self.run.train_loader.stats)
        skipped = int(run.guard.epoch)
        metrics = {
            "epoch": epoch + 1,
            "step": self.ctx.step,
            "samples_seen": self.progress.samples_seen(),
            "wall_s": self.progress.wall_s(since=t_start),  # the earlier starts' time included
            "epoch_wall_s": round(wall, 3),
            "train_loss": float(loss_sum) / (n - skipped) if n > skipped else float("nan"),
            "nonfinite_steps": skipped,
            "lr": run.optimizer.param_groups[0]["lr"],  # the last step's (--lr-scheduler)
            "data/bad_samples": int(stats.get("bad_samples", 0)),
        }
        metrics.update(run.diag.summary())
        batches, b = n * run.accum, self.cfg.data.batch_size
        metrics.update(epoch_accounting(run.diag, run.strategy, epoch, batches, b, run.accum, run.dist))
        metrics.update(run.strategy.epoch_metrics(epoch, run.data.pool_size))
        if "select/warmup_unscored_fraction" in metrics:
            log.info(
                "warm-up point: %.2f%% of the training samples have no warm-up score (w = 0 from now on; "
                "--warmup-record every scores every warm-up epoch, as the reference does)",
                100 * metrics["select/warmup_unscored_fraction"],
            )
        skip = ("ok", "bad_samples")
        metrics.update(
            {f"data/{k}": int(v) for k, v in sorted(stats.items()) if not k.startswith("shard:") and k not in skip}
        )
        msg = reliability.bad_samples_stop(stats, epoch, self.cfg.data.max_bad_fraction)
        if msg is not None:
            self._emit("on_stopped", {**metrics, "stopped": msg})
            raise reliability.TooManyBadSamples(msg)
        return metrics

    def _end_epoch(self, epoch: int, metrics: dict) -> None:
        """The epoch's end: callbacks (evaluation, record, logs, plots), the checkpoint, a stop signal."""
        self.ctx.metrics.append(metrics)
        self._emit("on_epoch_end", epoch, metrics)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
        log.info("epoch %d: %s", epoch + 1, json.dumps(shown))
        self.run.checkpointer.save_epoch(lambda: self.state_dict(epoch + 1), epoch + 1)
        barrier(self.run.dist)
        if epoch + 1 < self.cfg.optim.epochs and self._should_stop(None):
            raise self._interrupted(f"after epoch {epoch + 1}", self.run.checkpointer.latest())

    # ------------------------------------------------------------------ stopping
    def _should_stop(self, n_steps: int | None) -> bool:
        """A stop signal, agreed by all ranks. Single process: checked after every step (a Python flag,
        no sync). Several ranks: at log steps and epoch ends only, where an all-reduce is affordable."""
        if not self.run.dist.enabled:
            return self.stop.requested
        if n_steps is not None and n_steps % self.cfg.run.log_every_n_steps:
            return False
        return reliability.agree_on_stop(self.stop.requested, self.run.dist)

    def _interrupted(self, where: str, path: str | None) -> reliability.Interrupted:
        signum = self.stop.signum or signal.SIGTERM
        r = self.cfg.run
        return reliability.Interrupted(
            f"stopped by {signal.Signals(signum).name} {where} (step {self.ctx.step}); checkpoint: {path}. "
            f"To continue, run the same command with --resume latest --logs {r.logs} --name {r.name}",
            signum,
        )

    def _save_interrupted(self, epoch: int, loss_sum: torch.Tensor, epoch_rng: dict) -> None:
        """Checkpoint the state after step ``epoch_step`` of ``epoch`` with its data position, then raise
        Interrupted. Resuming re-reads the epoch's first epoch_step batches without training on them."""
        n, run = self.ctx.epoch_step, self.run
        position = {"epoch": epoch, "epoch_step": n, "epoch_rng": epoch_rng}
        position |= {"step_rng": ckpt_io.rng_state(), "loss_sum": loss_sum.detach().cpu()}
        position |= {"nonfinite_epoch": run.guard.epoch.cpu(), "diag": run.diag.state_dict()}
        # the epoch in progress: resume re-enters it
        path = run.checkpointer.save_position(lambda: self.state_dict(epoch) | {"epoch_resume": position})
        barrier(run.dist)
        raise self._interrupted(f"in epoch {epoch + 1} after {n}/{run.steps_per_epoch} steps", path)

    def _skip_to_position(self, epoch: int, batches, resume: dict) -> torch.Tensor:
        """Consume the batches an interrupted run already trained on and restore the epoch's partial sums (returns
        the loss sum); RNG streams are put back so the rest of the epoch is what it would have been."""
        run, n = self.run, int(resume["epoch_step"])
        self.ctx.epoch_step = n
        msg = "resuming epoch %d at step %d of %d: re-reading %d batches without training"
        log.info(msg, epoch + 1, n, run.steps_per_epoch, n)
        for _ in range(n):
            next(batches)
        if run.dist.rank == 0:
            ckpt_io.set_rng_state(resume["step_rng"])
        run.diag.load_state_dict(resume["diag"])
        run.guard.epoch.copy_(resume["nonfinite_epoch"])
        return resume["loss_sum"].to(self.run.device)
