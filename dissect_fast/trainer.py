"""The training step and the epoch loop.

One step: (scoring forward of the whole batch) -> select k -> forward + backward of the selected
sub-batch -> AdamW -> history update. No host synchronisation inside a step: losses and counters
stay on the device and are read every ``--log-every-n-steps`` steps.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import logging.handlers
import math
import os
import platform
import subprocess
import sys
import time
import types

import numpy as np
import torch

from dissect_fast import checkpoint as ckpt_io
from dissect_fast import reliability, zeroshot
from dissect_fast.config import TrainConfig, save_config
from dissect_fast.data.loader import ShardDataset, TorchLoader, eval_loader
from dissect_fast.data.shards import check_ids_known, is_url, resolve_data, tokenizer_for
from dissect_fast.data.synthetic_loader import DEFAULT_BATCHES, SyntheticLoader, model_image_size
from dissect_fast.diagnostics import EpochDiagnostics, plot_epoch, plot_history
from dissect_fast.distributed import (
    ELASTIC_ID_FILE,
    DistInfo,
    FaultHooks,
    all_gather_cat,
    barrier,
    broadcast_object,
    check_in_sync,
    cuda_device_index,
    elastic_restart_count,
    elastic_run_id,
    find_elastic_run,
    init_distributed,
)
from dissect_fast.evaluate import evaluate
from dissect_fast.logging_utils import StepLog, StepWindow, check_wandb_installed, init_wandb, truncate_steps
from dissect_fast.model import (
    Forwards,
    check_scoring_options,
    create_model,
    lock_towers,
    make_optimizer,
    model_name_for,
    resolve_device,
    resolve_precision,
    resolve_pretrained,
    set_grad_checkpointing,
    text_tokenizer,
    uses_grad_scaler,
)
from dissect_fast.profiling import PhaseMarker, StepProfiler
from dissect_fast.selection.strategies import HISTORY_STRATEGIES, make_strategy
from dissect_fast.train_setup import make_scheduler, set_cuda_defaults

log = logging.getLogger("dissect_fast")


def _grad_share(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` unchanged in value, with 1/n of the gradient: a parameter that enters each of n accumulated losses."""
    return x.detach() + (x - x.detach()) / n


def cosine_lr(step: int, base: float, warmup: int, total: int) -> float:
    """open_clip's cosine schedule (``open_clip_train.scheduler.cosine_lr``) at ``step``, without an optimizer:
    linear warm-up to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total`` (0 after it)."""
    from open_clip_train.scheduler import cosine_lr as openclip_cosine

    if step >= warmup and step >= total:
        return 0.0
    return openclip_cosine(types.SimpleNamespace(param_groups=[]), base, warmup, max(total, warmup + 1))(step)


def provenance(device: torch.device) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__), timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import open_clip

    info = {
        "commit": commit or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "host": platform.node(),
        "argv": sys.argv,
    }
    return info


_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(run_dir: str | None, is_main: bool, buffer: bool = False) -> None:
    """Log to stdout, and on the main rank to RUN/out.log; ``buffer``: no run folder yet, keep the records
    in memory until ``attach_run_log`` (the folder is made only once set-up has succeeded)."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.handlers.clear()
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(_LOG_FORMAT)
    log.addHandler(h)
    if run_dir and is_main:
        attach_run_log(run_dir)
    elif buffer and is_main:
        log.addHandler(logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))
    log.propagate = False


def attach_run_log(run_dir: str) -> None:
    """Log to RUN/out.log from now on, starting with what was buffered while the run was set up."""
    fh = logging.FileHandler(os.path.join(run_dir, "out.log"))
    fh.setFormatter(_LOG_FORMAT)
    for h in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        h.setTarget(fh)
        h.flush()
        log.removeHandler(h)
        h.close()
    log.addHandler(fh)


def run_exists(path: str) -> bool:
    """Whether ``path`` holds a run's results: its config, a checkpoint or metrics."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "metrics.jsonl")) or bool(
        glob.glob(os.path.join(path, "checkpoints", "*.pt")))


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.model.device)
        self.dist: DistInfo = init_distributed(self.device.type, cfg.dist.dist_timeout)
        if self.device.type == "cuda":
            if cfg.model.device == "auto" or cfg.model.device == "cuda":
                self.device = torch.device("cuda", cuda_device_index(self.dist))
            torch.cuda.set_device(self.device)
        set_cuda_defaults(self.device)  # open_clip's: cuDNN benchmark, TF32 matmuls and convolutions
        self.precision = resolve_precision(cfg.model.precision, self.device)
        self._set_seed(cfg.run.seed + self.dist.rank)
        self.run_dir = self._run_dir()  # named and checked, made only once set-up has succeeded (_make_run_dir)
        setup_logging(None, self.dist.is_main, buffer=True)

        # Everything the user can get wrong fails here, before any model, loader or GPU work.
        if "wandb" in cfg.run.report_to.split(","):
            check_wandb_installed()
        self.model_name = model_name_for(cfg.model.model, cfg.model.model_config)
        check_scoring_options(self.model_name, cfg.model.score_resolution, cfg.model.score_patch_dropout)
        self.pretrained = resolve_pretrained(cfg.model.pretrained, self.model_name) if cfg.model.pretrained else None
        #: the model's own tokenizer when it is not CLIP BPE (SigLIP, HF text towers); None: CLIP BPE (stored `tok`)
        self.tokenizer = text_tokenizer(self.model_name)
        self.accum = cfg.optim.accum_freq  #: --accum-freq: batches per optimizer step
        self.synthetic = cfg.data.data_backend == "synthetic"
        if self.synthetic:
            self.train_shards, self.index = [], None
            if cfg.data.train_data:
                log.warning("--data-backend synthetic: --train-data %s is not read", cfg.data.train_data)
        else:
            self.train_shards, self.index = resolve_data(cfg.data.train_data, "--train-data", cfg.data.data_index)
            if cfg.data.dataset_resampled and cfg.data.train_num_samples is None and self.index is None:
                raise ValueError("--dataset-resampled needs a known epoch size: give --train-num-samples, or shards "
                                 "with a dataset index (run `dissect-fast index` on them)")
            check_ids_known(self.train_shards, self.index, "--train-data")
            if self.tokenizer is not None and self.index is not None and self.index.has_tokens:
                log.warning("model %s does not use CLIP BPE: the shards' stored `tok` ids are ignored and captions "
                            "are tokenised from `txt` with its own tokenizer", self.model_name)
        self.val_shards, self.val_index = resolve_data(cfg.data.val_data, "--val-data") if cfg.data.val_data else (
            None, None)
        self.num_ids = self._num_ids()
        self.subset_mask, self.num_samples = self._subset_and_count()
        available = self.index.num_samples if self.index is not None else None
        if self.subset_mask is not None:
            available = int(self.subset_mask.sum())
        #: an epoch is --train-num-samples samples, less than one pass over the data (or a resampled stream)
        self.partial_epochs = cfg.data.dataset_resampled or (
            cfg.data.train_num_samples is not None and available is not None and self.num_samples < available)
        #: optimizer steps per epoch (the LR schedule counts these); each reads --accum-freq batches
        self.steps_per_epoch = self.num_samples // (cfg.data.batch_size * self.dist.world_size * self.accum)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.num_samples} training samples make no full batch of --batch-size {cfg.data.batch_size} "
                f"x {self.dist.world_size} rank(s) x --accum-freq {self.accum}: lower the batch size or --accum-freq"
            )
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.profiler = self._profiler()  #: --profile-steps; None: the loop runs no profiling code
        self._preloaded: tuple[str, dict] | None = None
        self.resume_state = self._load_resume()  # loaded and checked against this run before the model is built

        self.model, pre_train, pre_val, self.context_length = create_model(
            self.model_name, self.device, self.pretrained, self.precision, cfg.model.siglip)
        lock_towers(self.model, cfg.model)  # --lock-image / --lock-text: before the optimizer collects parameters
        if cfg.model.grad_checkpointing:
            set_grad_checkpointing(self.model)
        self.forwards = Forwards(
            self.model, self.precision, self.device, cfg.model.compile, self.dist.enabled,
            score_resolution=cfg.model.score_resolution, score_patch_dropout=cfg.model.score_patch_dropout,
            score_cudagraphs=cfg.model.score_cudagraphs,
        )
        self.optimizer = make_optimizer(self.model, cfg.optim, self.device)
        #: open_clip's --lr-scheduler: scheduler(global step) sets the optimizer's lr and returns it
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=uses_grad_scaler(self.precision))
        self.loss_fn = self._loss()
        self.strategy = make_strategy(cfg.select, cfg.data.batch_size, self.num_ids, self.device)
        if cfg.model.siglip and hasattr(self.strategy, "sigmoid_bias"):  # small_loss/big_loss rank by the sigmoid loss
            self.strategy.sigmoid_bias = self.model.logit_bias.detach()
        if self.partial_epochs and hasattr(self.strategy, "record_every_warmup_epoch"):
            self.strategy.record_every_warmup_epoch = True  # epoch W-1 alone does not score every sample
        if self.strategy.history is not None:
            self.strategy.history.local_updates = not self.dist.enabled
        self.hooks = FaultHooks(self.dist.rank)  # test-only fault injection; inactive unless its env vars are set
        self.k = cfg.select.k(cfg.data.batch_size)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.run.seed * 7919 + self.dist.rank)
        self.data_backend = self._data_backend()
        self.train_loader = self._loader(self.train_shards, pre_train, train=True)
        self.val_loader = self._loader(self.val_shards, pre_val, train=False) if self.val_shards else None
        self.zeroshot_sets = self._zeroshot_sets(pre_val)
        clean = self.index.clean_flags() if self.index is not None else None
        self.diag = EpochDiagnostics(self.num_ids, self.device, clean)
        self.start_epoch, self.step = 0, 0
        self.metrics: list[dict] = []
        self.score_scale = 100.0
        self.tb = None
        self.wandb = None  #: the wandb run (--report-to wandb, main rank)
        self.step_log: StepLog | None = None  #: main rank: where each log step's record goes (steps.jsonl, ...)
        self.last_trained = cfg.data.batch_size  #: samples the last step trained on (a shape: no sync)
        self.on_epoch_end = None  #: optional callback(metrics) on the main rank, e.g. the demo's progress line
        #: a dissect_fast.profiling.PhaseMarker told each phase's end: a timing.PhaseTimer (benchmarks), or the
        #: profiler's during its window; None (default) = the step runs no timing or profiling code at all
        self.timer: PhaseMarker | None = None
        self.stop = reliability.StopSignal()  # SIGTERM/SIGINT -> checkpoint after the current step, exit
        self.guard = reliability.NonFiniteGuard(self.optimizer, self.device, cfg.run.max_nonfinite_steps,
                                                self.scaler.is_enabled())
        self._epoch_resume: dict | None = None  # data position inside an epoch, from an interrupted run
        self._make_run_dir()  # last: a run that fails to set up leaves no folder behind

    # ------------------------------------------------------------------ set-up helpers
    def _set_seed(self, seed: int) -> None:
        import random

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _run_dir(self) -> str:
        """The run folder's path (not made yet). A folder that already holds a run is refused, like open_clip
        does, unless this run resumes (--resume, or a torchelastic restart)."""
        r = self.cfg.run
        if r.name is None:  # rank 0 names the run: the ranks' clocks may straddle a second
            r.name = broadcast_object(self._default_run_name() if self.dist.is_main else None, self.dist)
        path = os.path.join(r.logs, r.name)
        error = None
        if self.dist.is_main and r.resume is None and elastic_restart_count() == 0 and run_exists(path):
            error = (f"Error. Experiment already exists at {path}. Use --name NEW_NAME to specify a new experiment, "
                     f"or --resume latest to continue this one")
        error = broadcast_object(error, self.dist)  # every rank fails alike, none waits for the others
        if error is not None:
            raise ValueError(error)
        return path

    def _make_run_dir(self) -> None:
        """Make the run folder (nested for a --name with slashes) and start RUN/out.log."""
        if self.dist.is_main:
            os.makedirs(os.path.join(self.run_dir, "checkpoints"), exist_ok=True)
            if elastic_run_id() is not None:  # lets a restarted torchrun job without --name find this folder
                with open(os.path.join(self.run_dir, ELASTIC_ID_FILE), "w") as f:
                    f.write(elastic_run_id())
            attach_run_log(self.run_dir)
        barrier(self.dist)

    def _default_run_name(self) -> str:
        rid = elastic_run_id()
        if rid is not None and elastic_restart_count() > 0:
            found = find_elastic_run(self.cfg.run.logs, rid)
            if found is not None:
                return found
        return f"{self.cfg.select.strategy}-{time.strftime('%Y_%m_%d-%H_%M_%S')}"

    def _num_ids(self) -> int:
        if self.synthetic:  # the ids are a permutation of [0, N) every epoch
            return self.cfg.data.train_num_samples or DEFAULT_BATCHES * self.cfg.data.batch_size * self.dist.world_size
        if self.index is not None:
            return self.index.num_ids
        if self.strategy_needs_index():
            raise ValueError(
                f"--train-data {self.cfg.data.train_data}: no dataset index (index.json) beside the shards; "
                f"the history buffer needs the id range: run `dissect-fast index` on them"
            )
        return self.cfg.data.train_num_samples or 1

    def strategy_needs_index(self) -> bool:
        return self.cfg.select.strategy in HISTORY_STRATEGIES or self.cfg.data.subset is not None

    def _subset_and_count(self) -> tuple[np.ndarray | None, int]:
        d = self.cfg.data
        if self.synthetic:
            return None, self.num_ids
        n = d.train_num_samples or (self.index.num_samples if self.index is not None else None)
        if n is None:
            raise ValueError("--train-num-samples is needed: the shards have no dataset index (index.json)")
        if d.subset is None:
            return None, n
        ids = np.load(d.subset)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"--subset {d.subset}: expected a 1-D integer array of sample ids")
        if ids.size == 0:
            raise ValueError(f"--subset {d.subset}: the subset is empty")
        if ids.min() < 0 or ids.max() >= self.num_ids:
            raise ValueError(f"--subset {d.subset}: ids outside [0, {self.num_ids}) of the training data")
        mask = np.zeros(self.num_ids, dtype=bool)
        mask[ids] = True
        if mask.sum() != ids.size:
            raise ValueError(f"--subset {d.subset}: duplicate ids")
        return mask, min(n, int(ids.size))

    def _loss(self):
        from open_clip.loss import ClipLoss, SigLipLoss

        d = self.cfg.dist
        if self.cfg.model.siglip:  # neighbour exchange of text features across ranks (open_clip's default, bidir)
            return SigLipLoss(rank=self.dist.rank, world_size=self.dist.world_size)
        return ClipLoss(local_loss=d.local_loss, gather_with_grad=d.gather_with_grad, cache_labels=True,
                        rank=self.dist.rank, world_size=self.dist.world_size)

    def _data_backend(self) -> str:
        """``auto``: DALI when the device is CUDA and DALI imports (and the shards are local files read once per
        epoch); the torch loader otherwise."""
        want = self.cfg.data.data_backend
        if want == "synthetic":
            return want
        urls = any(is_url(s) for s in self.train_shards)
        if want == "dali" and (urls or self.cfg.data.dataset_resampled):
            raise ValueError("--data-backend dali reads local shard files in passes: use --data-backend torch for "
                             "webdataset URLs (pipe:, http://, ...) and --dataset-resampled")
        if want == "torch" or urls or self.cfg.data.dataset_resampled:
            return "torch"
        from dissect_fast.data.dali_loader import dali_unavailable_reason

        reason = dali_unavailable_reason()
        if want == "dali":
            if reason:
                raise ValueError(f"--data-backend dali: {reason}; install nvidia-dali-cuda130 or use --data-backend torch")
            return "dali"
        if self.device.type != "cuda" or reason:
            return "torch"
        return "dali"

    def _loader(self, shards, transform, train: bool):
        d = self.cfg.data
        if train and self.data_backend == "synthetic":
            return SyntheticLoader(
                self.num_samples, d.batch_size, model_image_size(self.model, transform), self.context_length,
                self.device, vocab_size=getattr(self.model, "vocab_size", 49408), seed=self.cfg.run.seed,
                rank=self.dist.rank, world_size=self.dist.world_size,
            )
        if self.data_backend == "dali":
            from dissect_fast.data.dali_loader import DaliLoader, Preprocess

            return DaliLoader(
                shards, d.batch_size, self.context_length, Preprocess.from_transform(transform), train=train,
                device=self.device, seed=self.cfg.run.seed, rank=self.dist.rank if train else 0,
                world_size=self.dist.world_size if train else 1, workers=max(2, d.workers),
                index=self.index if train else self.val_index, subset_mask=self.subset_mask if train else None,
                num_ids=self.num_ids if train else None, tokenizer=self.tokenizer,
            )
        if not train:
            return eval_loader(shards, self.val_index, d.batch_size, transform, self.context_length, d.workers,
                               self.device, tokenizer=self.tokenizer)
        ds = ShardDataset(
            shards, d.batch_size, transform, self.context_length, train=True, seed=self.cfg.run.seed,
            rank=self.dist.rank, world_size=self.dist.world_size, subset_mask=self.subset_mask, num_ids=self.num_ids,
            first_ids=self.index.first_ids() if self.index is not None else None, resampled=d.dataset_resampled,
            tokenizer=self.tokenizer,
        )
        return TorchLoader(ds, d.workers, self.device, drop_last=True)

    def _profiler(self) -> StepProfiler | None:
        """--profile-steps A:B, checked against the run's length: B past the end profiles to the end."""
        window = self.cfg.run.profile_window()
        if window is None:
            return None
        start, stop = window
        if start >= self.total_steps:
            raise ValueError(f"--profile-steps {start}:{stop}: the run has only {self.total_steps} steps "
                             f"({self.steps_per_epoch} per epoch x {self.cfg.optim.epochs} epochs, numbered from 0): "
                             f"start the window below {self.total_steps}")
        if stop > self.total_steps:
            log.warning("--profile-steps %d:%d: the run has %d steps; profiling steps %d..%d", start, stop,
                        self.total_steps, start, self.total_steps - 1)
            stop = self.total_steps
        return StepProfiler(start, stop, os.path.join(self.run_dir, "profile"), self.device, rank=self.dist.rank,
                            summary=self.dist.is_main)

    def _zeroshot_sets(self, transform) -> list[tuple[str, object, list[str], list[str]]]:
        """(metric prefix, ImageFolder, class names, templates) for --imagenet-val, --imagenet-v2, --zeroshot-data."""
        d, out = self.cfg.data, []
        for prefix, folder, imagenet, names in (
            (zeroshot.PREFIX_IMAGENET, d.imagenet_val, True, None),
            (zeroshot.PREFIX_IMAGENET_V2, d.imagenet_v2, True, None),
            (zeroshot.PREFIX_FOLDER, d.zeroshot_data, False, d.zeroshot_classnames),
        ):
            if folder is not None:
                ds, classnames, templates = zeroshot.load_zeroshot_set(folder, names, imagenet=imagenet)
                ds.transform = transform
                out.append((prefix, ds, classnames, templates))
        return out

    def _zeroshot_eval(self) -> dict:
        """Zero-shot top-1/top-5 on each set, with a classifier built from the current text tower (open_clip's way)."""
        out = {}
        for prefix, ds, classnames, templates in self.zeroshot_sets:
            tok = self.tokenizer or tokenizer_for(self.context_length)  # the model's own unless it is CLIP BPE
            w = zeroshot.zeroshot_classifier(self.model, tok, classnames, templates, self.device, self.precision)
            loader = zeroshot.zeroshot_loader(ds, self.cfg.data.batch_size, self.cfg.data.workers, self.device)
            out.update(zeroshot.evaluate_zeroshot(self.model, loader, w, self.device, self.precision, prefix))
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch_done: int) -> dict:
        return {
            "state_dict": ckpt_io.strip_prefixes(self.model.state_dict()),
            "model_name": self.model_name,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "epoch": epoch_done,
            "step": self.step,
            "rng": ckpt_io.rng_state(),
            "generator": self.generator.get_state(),
            "config": self.cfg.to_dict(),
            "metrics": self.metrics,
            "nonfinite": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("model_name") != self.model_name:
            raise ValueError(
                f"--resume: checkpoint was trained with model {state.get('model_name')!r}, this run builds "
                f"{self.model_name!r}: pass the same --model"
            )
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        self.metrics = list(state.get("metrics", []))
        ckpt_io.set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.guard.load_state_dict(state.get("nonfinite", {}))
        self._epoch_resume = state.get("epoch_resume")
        if self.dist.rank > 0:  # the checkpoint holds rank 0's RNG streams: derive this rank's own
            seed = self.cfg.run.seed + 1_000_003 * self.step + self.dist.rank
            self._set_seed(seed)
            self.generator.manual_seed(seed * 7919 + self.dist.rank)

    def resume_path(self) -> str | None:
        r = self.cfg.run.resume
        if elastic_restart_count() > 0:  # torchrun restarted the workers: go on from this run's last checkpoint
            p = self._latest_intact()
            if p is not None:
                return p
        if r is None:
            return None
        if r == "latest":
            return self._latest_intact()
        if not os.path.isfile(r):
            raise FileNotFoundError(f"--resume {r}: no such checkpoint")
        return r

    def _latest_intact(self) -> str | None:
        """This run's newest checkpoint that verifies and loads (damaged ones are logged and skipped)."""
        self._preloaded = ckpt_io.find_resumable(os.path.join(self.run_dir, "checkpoints"))
        return self._preloaded[0] if self._preloaded else None

    def _load_resume(self) -> tuple[str, dict] | None:
        path = self.resume_path()
        if path is None:
            return None
        pre, self._preloaded = self._preloaded, None
        state = pre[1] if pre is not None and pre[0] == path else ckpt_io.load_checkpoint(path)
        if state.get("model_name") != self.model_name:
            raise ValueError(
                f"--resume {path}: checkpoint was trained with model {state.get('model_name')!r}, this run builds "
                f"{self.model_name!r}: pass the same --model"
            )
        h = (state.get("strategy") or {}).get("history")
        if h is not None and h["values"].numel() != self.num_ids:
            raise ValueError(
                f"--resume {path}: its history buffer has {h['values'].numel()} entries but --train-data has an id "
                f"range of {self.num_ids}: resume with the training data the checkpoint was trained on"
            )
        return path, state

    def _last_checkpoint(self) -> str | None:
        p = os.path.join(self.run_dir, "checkpoints", "latest.pt")
        return p if os.path.isfile(p) else None

    def _write_checkpoint(self, state: dict, name: str) -> str:
        """Atomic, verified write of checkpoints/<name>; latest.pt then names the same file. A full disk
        stops the run (RunStopped) with the previous checkpoint intact."""
        d = os.path.join(self.run_dir, "checkpoints")
        path = os.path.join(d, name)
        try:
            ckpt_io.save_checkpoint(state, path)
            if name != "latest.pt":
                ckpt_io.link_checkpoint(path, os.path.join(d, "latest.pt"))
        except ckpt_io.DiskFullError as e:
            raise reliability.RunStopped(f"{e.strerror}; last good checkpoint: {self._last_checkpoint()}") from e
        return path

    def save(self, epoch_done: int) -> None:
        """The end-of-epoch checkpoint. Every --save-frequency epochs and after the last: checkpoints/epoch_N.pt,
        which latest.pt then names; other epochs write latest.pt alone (--save-most-recent: it always holds the
        newest state). --delete-previous-checkpoint: the older epoch_M.pt go once epoch_N.pt verifies."""
        if not self.dist.is_main:
            return
        r, state = self.cfg.run, self.state_dict(epoch_done)
        if epoch_done == self.cfg.optim.epochs or (r.save_frequency > 0 and epoch_done % r.save_frequency == 0):
            path = self._write_checkpoint(state, f"epoch_{epoch_done}.pt")
            if r.delete_previous_checkpoint:
                self._delete_previous_checkpoints(path, epoch_done)
        else:
            self._write_checkpoint(state, "latest.pt")

    def _delete_previous_checkpoints(self, path: str, epoch_done: int) -> None:
        """Remove epoch_M.pt (M < ``epoch_done``) and their sidecars, once ``path`` verifies against its sidecar."""
        try:
            if ckpt_io.read_sidecar(path) is None:
                raise ckpt_io.CheckpointError(f"checkpoint {path} has no sidecar")
            ckpt_io.verify_checkpoint(path)
        except (ckpt_io.CheckpointError, OSError) as e:
            log.error("--delete-previous-checkpoint: %s; the older epoch checkpoints are kept", e)
            return
        for epoch, old in sorted(ckpt_io.epoch_checkpoints(os.path.dirname(path)).items()):
            if epoch < epoch_done:
                ckpt_io.remove_checkpoint(old)
                log.info("--delete-previous-checkpoint: removed %s", old)

    def _should_stop(self, n_steps: int | None) -> bool:
        """A stop signal, agreed by all ranks. Single process: checked after every step (a Python flag,
        no sync). Several ranks: at log steps and epoch ends only, where an all-reduce is affordable."""
        if not self.dist.enabled:
            return self.stop.requested
        if n_steps is not None and n_steps % self.cfg.run.log_every_n_steps:
            return False
        return reliability.agree_on_stop(self.stop.requested, self.dist)

    def _interrupted(self, epoch: int, where: str, path: str | None) -> reliability.Interrupted:
        import signal

        signum = self.stop.signum or signal.SIGTERM
        r = self.cfg.run
        return reliability.Interrupted(
            f"stopped by {signal.Signals(signum).name} {where} (step {self.step}); checkpoint: {path}. "
            f"To continue, run the same command with --resume latest --logs {r.logs} --name {r.name}", signum)

    def _save_interrupted(self, epoch: int, n_steps: int, loss_sum: torch.Tensor, epoch_rng: dict) -> None:
        """Checkpoint the state after step ``n_steps`` of ``epoch`` with its data position, then raise
        Interrupted. Resuming re-reads the epoch's first n_steps batches without training on them."""
        path = None
        if self.dist.is_main:
            state = self.state_dict(epoch)  # the epoch in progress: resume re-enters it
            state["epoch_step"] = n_steps
            state["epoch_resume"] = {
                "epoch": epoch, "epoch_step": n_steps, "epoch_rng": epoch_rng, "step_rng": ckpt_io.rng_state(),
                "loss_sum": loss_sum.detach().cpu(), "nonfinite_epoch": self.guard.epoch.cpu(),
                "diag": {k: getattr(self.diag, k).detach().cpu()
                         for k in ("score", "delta", "trained", "n_trained", "n_clean_trained")},
            }
            path = self._write_checkpoint(state, "latest.pt")
        barrier(self.dist)
        raise self._interrupted(epoch, f"in epoch {epoch + 1} after {n_steps}/{self.steps_per_epoch} steps", path)

    def _skip_to_position(self, epoch: int, batches, resume: dict) -> tuple[int, torch.Tensor]:
        """Consume the batches an interrupted run already trained on and restore the epoch's partial
        sums; RNG streams are put back so the rest of the epoch is what it would have been."""
        n = int(resume["epoch_step"])
        log.info("resuming epoch %d at step %d of %d: re-reading %d batches without training", epoch + 1, n,
                 self.steps_per_epoch, n)
        for _ in range(n):
            next(batches)
        if self.dist.rank == 0:
            ckpt_io.set_rng_state(resume["step_rng"])
        for k, v in resume["diag"].items():
            getattr(self.diag, k).copy_(v.to(self.device))
        self.guard.epoch.copy_(resume["nonfinite_epoch"])
        return n, resume["loss_sum"].to(self.device)

    # ------------------------------------------------------------------ the step
    def _scale(self) -> float:
        return self.score_scale

    def _refresh_scale(self) -> None:
        # --score-scale learned reads logit_scale.exp() on the host only at log steps (a sync there
        # anyway), so the step itself stays sync-free; the scale drifts slowly, so this is exact
        # enough and documented.
        if self.cfg.model.score_scale == "learned":
            self.score_scale = float(self.model.logit_scale.detach().exp())

    def _select(self, epoch: int, images, tokens, ids):
        """The scoring pass (when the strategy needs one) and the selection of one batch: (Selection, trained
        images, tokens, ids)."""
        strategy, t = self.strategy, self.timer
        feats = self.forwards.score(images, tokens) if strategy.needs_scoring(epoch) else None
        if t is not None:
            t.mark("score")
        logit_scale = self.model.logit_scale.detach().exp()
        sel = strategy.select(epoch, ids, feats, logit_scale, self._scale(), self.generator)
        if t is not None:
            t.mark("select")
        if sel.index is None:
            return sel, images, tokens, ids
        return sel, images[sel.index], tokens[sel.index], ids[sel.index]

    def _contrastive_loss(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        """ClipLoss, or SigLipLoss (with the logit bias) under --siglip."""
        if self.cfg.model.siglip:
            return self.loss_fn(image_features, text_features, logit_scale, logit_bias)
        return self.loss_fn(image_features, text_features, logit_scale)

    def train_step(self, epoch: int, images, tokens, ids) -> torch.Tensor:
        """One optimizer step on one batch; with --accum-freq N > 1, ``images``, ``tokens`` and ``ids`` are
        sequences of N batches (``_accum_step``). Returns the loss, on the device."""
        if self.accum > 1:
            return self._accum_step(epoch, images, tokens, ids)
        t = self.timer
        sel, t_images, t_tokens, t_ids = self._select(epoch, images, tokens, ids)
        self.last_trained = t_ids.shape[0]  # a shape: known on the host, no sync

        out = self.forwards.train(t_images, t_tokens)
        loss = self._contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"],
                                      out.get("logit_bias"))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if t is not None:
            t.mark("train")
        self._optimizer_step(loss)
        self._after_batch(epoch, ids, sel, t_ids, (out["image_features"].detach(), out["text_features"].detach()))
        return loss.detach()

    def _accum_step(self, epoch: int, images, tokens, ids) -> torch.Tensor:
        """--accum-freq N: one optimizer step over N batches, selection composed with open_clip's accumulation.

        Each batch is scored and selected as a step without accumulation would select it (k of B, history
        updated per batch), and the training forward computes its selected sub-batch's features without grad.
        Then each sub-batch is re-run with grad; its fresh features replace its cached ones in the contrastive
        loss over all N sub-batches (the cached ones are the negatives), and the gradients add up: the step's
        gradient is that of one loss over the N*k selected pairs. The logit scale (and bias) enters every
        re-run, so each contributes 1/N of its gradient (open_clip's accumulation counts it N times).
        """
        t, n = self.timer, len(images)
        subs, cached_f, cached_g = [], [], []
        for j in range(n):
            sel, t_images, t_tokens, t_ids = self._select(epoch, images[j], tokens[j], ids[j])
            with torch.no_grad():
                out = self.forwards.train(t_images, t_tokens)
            cached_f.append(out["image_features"])
            cached_g.append(out["text_features"])
            subs.append((t_images, t_tokens))
            if t is not None:
                t.mark("train")
            self._after_batch(epoch, ids[j], sel, t_ids, (out["image_features"], out["text_features"]))
        self.last_trained = sum(x[0].shape[0] for x in subs)  # shapes: known on the host, no sync
        self.optimizer.zero_grad(set_to_none=True)
        for j, (t_images, t_tokens) in enumerate(subs):
            with self.forwards.no_sync() if j < n - 1 else contextlib.nullcontext():  # DDP: all-reduce once
                out = self.forwards.train(t_images, t_tokens)
                f = torch.cat(cached_f[:j] + [out["image_features"]] + cached_f[j + 1:])
                g = torch.cat(cached_g[:j] + [out["text_features"]] + cached_g[j + 1:])
                bias = out.get("logit_bias")
                loss = self._contrastive_loss(f, g, _grad_share(out["logit_scale"], n),
                                              None if bias is None else _grad_share(bias, n))
                self.scaler.scale(loss).backward()
        if t is not None:
            t.mark("train")
        self._optimizer_step(loss)
        return loss.detach()

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """Gradient clipping, the non-finite guard, the (scaled) optimizer step, open_clip's logit-scale clamp."""
        t = self.timer
        grad_norm = None
        if self.cfg.optim.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm)
        self.guard.before_step(loss, grad_norm)  # a non-finite loss/gradient skips the update, decided on the device
        self.scaler.step(self.optimizer)
        self.guard.after_step()
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        if t is not None:
            t.mark("optim")

    def _after_batch(self, epoch: int, ids, sel, t_ids, tf) -> None:
        """What a selected batch leaves behind: scores for the history (across ranks) and the diagnostics. ``tf``:
        the detached training features of the trained sub-batch (the model before the step)."""
        strategy, t = self.strategy, self.timer
        score, delta = sel.score, sel.delta
        if score is None:  # no scoring pass: the training forward's features score what was trained
            score = strategy.observe(epoch, t_ids, tf, self._scale())
        m = strategy.history_updates(epoch)
        if self.dist.enabled and m is not None and strategy.history is not None:
            scored_ids = ids if score.shape[0] == ids.shape[0] else t_ids
            strategy.history.update(all_gather_cat(scored_ids, self.dist), all_gather_cat(score.float(), self.dist), m)
        if t is not None:
            t.mark("sync")  # includes scoring the trained sub-batch for diagnostics when no scoring pass ran
        self.diag.record(ids, score, delta, t_ids)
        if t is not None:
            t.mark("other")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict]:
        """Train all epochs. SIGTERM/SIGINT: the current step finishes, a checkpoint is written and
        reliability.Interrupted is raised (the CLI turns it into a message and exit code 128 + signal)."""
        self.stop.install()
        try:
            return self._fit()
        finally:
            self.stop.restore()
            if self.profiler is not None:  # a run stopped inside the window still writes what it traced
                self.profiler.close()
            if self.wandb is not None:  # stopped early: wandb marks the run failed (--resume latest continues it)
                self.wandb.finish(exit_code=1)
                self.wandb = None
            for loader in (self.train_loader, self.val_loader):  # no worker left behind by an exception
                if hasattr(loader, "close"):
                    loader.close()

    def _fit(self) -> list[dict]:
        cfg = self.cfg
        if self.dist.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.json"))
            prov = provenance(self.device)
            with open(os.path.join(self.run_dir, "provenance.json"), "w") as f:
                json.dump(prov, f, indent=1)
            log.info("provenance: %s", json.dumps(prov))
            log.info("config: %s", json.dumps(cfg.to_dict()))
            for p in ckpt_io.remove_stale_temporaries(os.path.join(self.run_dir, "checkpoints")):
                log.warning("removed %s, a checkpoint write that did not finish (killed process)", p)
        path, state = self.resume_state if self.resume_state is not None else (None, None)
        self.resume_state = None
        if path is not None:
            self.load_state_dict(state)
            log.info("resumed from %s at epoch %d (step %d)", path, self.start_epoch, self.step)
            if elastic_restart_count() > 0:
                log.warning("torchelastic restart %d: resumed from %s", elastic_restart_count(), path)
            if self.dist.is_main:  # drop lines of epochs the checkpoint does not hold (a crash after writing them)
                self._rewrite_metrics()
                truncate_steps(self.run_dir, self.step)
        elif cfg.run.resume == "latest":
            log.info("--resume latest: no checkpoint in %s yet, starting fresh", self.run_dir)
        log.info(
            "model %s on %s (%s), data %s, %d samples, %d ids, batch %d x %d rank(s), k = %d (%s), %d steps/epoch",
            self.model_name, self.device, self.precision, self.data_backend, self.num_samples, self.num_ids, cfg.data.batch_size,
            self.dist.world_size, self.k, cfg.select.strategy, self.steps_per_epoch,
        )
        if cfg.run.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
        if self.dist.is_main:
            if "wandb" in cfg.run.report_to.split(","):
                self.wandb = init_wandb(cfg.run, cfg.to_dict(), self.run_dir)
            self.step_log = StepLog(self.run_dir, self.tb, self.wandb, line=not cfg.run.progress)
        t_start = time.time()
        for epoch in range(self.start_epoch, cfg.optim.epochs):
            metrics = self.train_epoch(epoch, t_start)
            if cfg.run.record:
                self._write_record(epoch)
            sums = self._check_history_sync()
            if sums is not None:
                metrics["dist/history_checksums"] = sums
            self.metrics.append(metrics)
            if self.on_epoch_end is not None and self.dist.is_main:
                self.on_epoch_end(metrics)
            if self.dist.is_main:
                with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if self.tb is not None:
                    for k, v in metrics.items():
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(k, v, self.step)
                if self.wandb is not None:
                    self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.step)
                if cfg.run.plots and (any(k.startswith("val/") for k in metrics) or epoch + 1 == cfg.optim.epochs):
                    plot_history(self.metrics, os.path.join(self.run_dir, "plots"))  # on eval epochs and the last
            self.save(epoch + 1)
            barrier(self.dist)
            if epoch + 1 < cfg.optim.epochs and self._should_stop(None):
                raise self._interrupted(epoch, f"after epoch {epoch + 1}", self._last_checkpoint())
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.profiler is not None:
            self.profiler.report()
        return self.metrics

    def _write_record(self, epoch: int) -> str | None:
        """--record: ``select_record/record_{epoch + 1}.npz`` (1-based, like metrics.jsonl and the checkpoints)
        with one row per sample id scored or trained in the epoch: ``id``, ``selected`` (times trained; 0 =
        scored, not selected), ``score`` (last CLIPScore, NaN: not scored), ``delta`` (last DISSect
        differential, NaN: none), ``history`` (buffer value after the epoch, history strategies) and ``clean``
        (when the index has clean flags). Several ranks: the per-rank diagnostics are merged first (a
        collective on every rank); the main rank writes. Returns the path on the main rank."""
        d = self.diag
        score, delta, trained = d.score.clone(), d.delta.clone(), d.trained.clone()
        if self.dist.enabled:
            import torch.distributed as tdist

            for t in (score, delta):  # NaN where a rank did not see the id: merge by max over the ranks
                t.copy_(torch.where(torch.isnan(t), float("-inf"), t))
                tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
                t[torch.isneginf(t)] = float("nan")
            tdist.all_reduce(trained, op=tdist.ReduceOp.SUM)
        if not self.dist.is_main:
            return None
        ids = torch.nonzero(~torch.isnan(score) | (trained > 0)).squeeze(1)
        rec = {
            "id": ids.cpu().numpy(),
            "selected": trained[ids].cpu().numpy(),
            "score": score[ids].cpu().numpy(),
            "delta": delta[ids].cpu().numpy(),
            "epoch": np.int64(epoch + 1),
            "num_ids": np.int64(self.num_ids),
            "strategy": np.array(self.cfg.select.strategy),
        }
        if self.strategy.history is not None:
            rec["history"] = self.strategy.history.values[ids].float().cpu().numpy()
        if d.clean is not None:
            rec["clean"] = d.clean[ids].cpu().numpy()
        out = os.path.join(self.run_dir, "select_record")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"record_{epoch + 1}.npz")
        tmp = f"{path}.tmp.{os.getpid()}.npz"
        np.savez(tmp, **rec)
        os.replace(tmp, path)
        return path

    def _check_history_sync(self) -> list[list[int]] | None:
        """Every rank's history checksum, after verifying they are equal (HistoryDesyncError if not);
        None without several ranks or without a history. A host sync: not for every step."""
        h = self.strategy.history
        if not self.dist.enabled or h is None:
            return None
        return check_in_sync(h.checksum(), self.dist, self.step)

    def _rewrite_metrics(self) -> None:
        path = os.path.join(self.run_dir, "metrics.jsonl")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in self.metrics)
        os.replace(tmp, path)

    def _epoch_batches(self):
        """What each of the epoch's ``steps_per_epoch`` steps trains on: a batch, or with --accum-freq N the
        (images, tokens, ids) of N batches, each a tuple of N tensors."""
        batches = self._loader_batches()
        if self.accum == 1:
            yield from batches
            return
        while group := list(itertools.islice(batches, self.accum)):
            yield tuple(zip(*group))

    def _loader_batches(self):
        """Exactly ``steps_per_epoch`` x --accum-freq batches on every rank (DDP needs equal step counts): a rank
        whose shards run dry early (uneven shard counts) starts another pass over them, logged."""
        n, passes, wanted = 0, 0, self.steps_per_epoch * self.accum
        while n < wanted:
            got = 0
            it = iter(self.train_loader)
            for batch in it:
                yield batch
                got += 1
                n += 1
                if n >= wanted:
                    if self.partial_epochs:  # the rest of the pass is not read (nor decoded)
                        if hasattr(self.train_loader, "close"):
                            self.train_loader.close()
                        return
                    for _ in it:  # drain the tail (less than a batch per worker) so the last skip counts arrive
                        self.train_loader.stats["dropped_tail"] += self.cfg.data.batch_size
                    return
            passes += 1
            if got == 0:
                raise RuntimeError(f"rank {self.dist.rank}: the training loader yielded no batch (too few shards "
                                   f"for {self.dist.world_size} rank(s) x workers, or every sample unreadable)")
            log.warning("rank %d: shards ran out after %d of %d batches; repeating them (give every rank the same "
                        "number of samples, e.g. shards divisible by ranks)", self.dist.rank, n, wanted)

    def _marked(self, batches, steps: int):
        """``batches`` (``steps`` of them) with the phase marker told where each step begins and its wait for the
        batch (the ``data`` phase) ends. The --profile-steps window opens and closes here, between steps."""
        for _ in range(steps):
            if self.profiler is not None:
                self.timer = self.profiler.marker_for(self.step, self.timer)
            t = self.timer
            if t is not None:
                t.step()
            batch = next(batches)
            if t is not None:
                t.mark("data")
            yield batch
        if self.profiler is not None:  # a window ending with the epoch closes now; the epoch's end is no step
            self.timer = self.profiler.marker_for(self.step, self.timer, epoch_end=True)
        yield from batches  # nothing left: lets the epoch's batches close their loader

    def _log_step(self, epoch: int, n_steps: int, lr: float, read: dict) -> None:
        """One line of RUN/steps.jsonl (plus train/ scalars and, without a progress bar, a log line); main rank."""
        b, world = self.cfg.data.batch_size, self.dist.world_size
        rec = {
            "step": self.step, "epoch": epoch + 1, "epoch_step": n_steps, "loss": read["loss"], "lr": lr,
            "logit_scale": read["logit_scale"],
            "samples_per_s": b * world * self.accum / max(1e-9, read["batch_time_s"]),
            "data_time_s": read["data_time_s"], "batch_time_s": read["batch_time_s"],
            "selected_share": self.last_trained / (b * self.accum),
        }
        if "clean_share" in read:  # the shards have clean flags: share of clean pairs trained in the window
            rec["clean_share"] = read["clean_share"]
        self.step_log.log(rec, n_steps, self.steps_per_epoch, b * self.accum, world)  # samples read per step

    def train_epoch(self, epoch: int, t_start: float) -> dict:
        cfg = self.cfg
        self.model.train()
        self.diag.reset()
        self.guard.start_epoch()
        resume = self._epoch_resume if self._epoch_resume and self._epoch_resume["epoch"] == epoch else None
        self._epoch_resume = None
        if resume is not None and self.dist.rank == 0:
            ckpt_io.set_rng_state(resume["epoch_rng"])
        epoch_rng = ckpt_io.rng_state()  # what an interrupted epoch restarts its data order from
        self.train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device)
        n_steps, t0, last_loss = 0, time.time(), float("nan")
        batches = self._epoch_batches()
        if resume is not None:
            n_steps, loss_sum = self._skip_to_position(epoch, batches, resume)
        if self.timer is not None or self.profiler is not None:
            batches = self._marked(batches, self.steps_per_epoch - n_steps)
        bar = None
        if cfg.run.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=n_steps, desc=f"epoch {epoch}", unit="step", leave=False)
        window = StepWindow(self.diag)  # host wall clock and trained/clean counts since the last log step
        for images, tokens, ids in batches:
            window.got_batch()
            lr = self.scheduler(self.step)  # sets the optimizer's lr for this step
            loss = self.train_step(epoch, images, tokens, ids)
            loss_sum += self.guard.masked(loss)
            n_steps += 1
            self.step += 1
            window.step_done()
            if self.hooks.active:
                self.hooks.after_step(self.step, self.strategy.history)
            if cfg.dist.check_sync_every and self.step % cfg.dist.check_sync_every == 0:
                self._check_history_sync()
            if n_steps % cfg.run.log_every_n_steps == 0 or n_steps == self.steps_per_epoch:
                read = window.read(loss, self.model.logit_scale)  # the one host sync, every n steps
                last_loss = read["loss"]
                self.guard.check(self.step, self._last_checkpoint())  # too many non-finite steps: NonFiniteError
                self._refresh_scale()
                if self.step_log is not None:
                    self._log_step(epoch, n_steps, lr, read)
                if bar is not None:
                    rate = n_steps * cfg.data.batch_size * self.dist.world_size * self.accum / max(
                        1e-9, time.time() - t0)
                    bar.set_postfix(loss=f"{last_loss:.3f}", samples_s=f"{rate:.0f}", lr=f"{lr:.2e}")
            if bar is not None:
                bar.update(1)
            if n_steps < self.steps_per_epoch and self._should_stop(n_steps):
                if bar is not None:
                    bar.close()
                self._save_interrupted(epoch, n_steps, loss_sum, epoch_rng)
            window.fetch_next()
        if bar is not None:
            bar.close()
        wall = time.time() - t0
        stats = dict(self.train_loader.stats)
        skipped = int(self.guard.epoch)
        metrics = {
            "epoch": epoch + 1,
            "step": self.step,
            "samples_seen": self.step * cfg.data.batch_size * self.dist.world_size * self.accum,
            "wall_s": round(time.time() - t_start, 3),
            "epoch_wall_s": round(wall, 3),
            "train_loss": float(loss_sum) / (n_steps - skipped) if n_steps > skipped else float("nan"),
            "nonfinite_steps": skipped,
            "lr": self.optimizer.param_groups[0]["lr"],  # the last step's (--lr-scheduler)
            "data/bad_samples": int(stats.get("bad_samples", 0)),
        }
        metrics.update(self.diag.summary())
        metrics.update({f"data/{k}": int(v) for k, v in sorted(stats.items())
                        if not k.startswith("shard:") and k not in ("ok", "bad_samples")})
        bad_frac = stats.get("bad_samples", 0) / max(1, stats.get("ok", 0) + stats.get("bad_samples", 0))
        if stats.get("bad_samples"):
            worst = sorted(((v, k[6:]) for k, v in stats.items() if k.startswith("shard:")), reverse=True)[:5]
            log.warning("epoch %d: skipped %d bad samples (%s); worst shards: %s", epoch, stats["bad_samples"],
                        {k: v for k, v in stats.items() if not k.startswith("shard:") and k != "ok"}, worst)
            if bad_frac > cfg.data.max_bad_fraction:
                msg = (f"{100 * bad_frac:.2f}% of epoch {epoch + 1}'s training samples were unreadable (> "
                       f"--max-bad-fraction {cfg.data.max_bad_fraction}); worst shards (bad samples, shard): {worst}. "
                       f"Repair or drop those shards, or raise --max-bad-fraction")
                if self.dist.is_main:
                    with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps({**metrics, "stopped": msg}) + "\n")
                raise reliability.TooManyBadSamples(msg)
        if self.val_loader is not None and ((epoch + 1) % cfg.run.val_every == 0 or epoch + 1 == cfg.optim.epochs):
            if self.dist.is_main:
                metrics.update(evaluate(self.model, self.val_loader, self.precision, self.device))
        f = cfg.run.zeroshot_frequency
        if self.zeroshot_sets and f and ((epoch + 1) % f == 0 or epoch + 1 == cfg.optim.epochs) and self.dist.is_main:
            metrics.update(self._zeroshot_eval())
        if self.dist.is_main and cfg.run.plots and self.diag.clean is not None:
            plot_epoch(self.diag.arrays(), epoch + 1, os.path.join(self.run_dir, "plots"))
        log.info("epoch %d: %s", epoch + 1, json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                         for k, v in metrics.items()}))
        return metrics
