"""Stage 2 of the config checks: everything that needs the disk, the model registry or torch, before a run is built.

:mod:`dissect_fast.config` (stage 1) checks the flags themselves and touches nothing; :func:`preflight` checks the
config against this machine: the files and folders it names (training and validation shards, dataset index,
subset, zero-shot sets, --resume checkpoint, --pretrained file, --model-config), the model registry (model name,
scoring options), the device, optional packages (wandb, DALI) and the run's geometry (a full batch per step, the
--profile-steps window). Every failure is a one-line ConfigError naming the flag and the fix; ``train.main``
prints it and exits 2.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from dissect_fast.config import ConfigError, TrainConfig
from dissect_fast.data.index import DatasetIndex
from dissect_fast.data.shards import check_id_ranges, check_ids_known, is_url, resolve_data
from dissect_fast.data.synthetic_loader import DEFAULT_BATCHES
from dissect_fast.selection.names import HISTORY_STRATEGIES


@dataclass
class Preflight:
    """What the checks resolved on the way (the builders may reuse it)."""

    model_name: str  #: the open_clip name the model is built by (a --model-config file registered under its stem)
    steps_per_epoch: int  #: optimizer steps per epoch
    total_steps: int  #: steps of the whole run


def preflight(cfg: TrainConfig, world_size: int | None = None) -> Preflight:
    """Check ``cfg`` against this machine (see the module's docstring); ConfigError on the first failure.
    ``world_size``: the ranks the run trains on (default: torchrun's WORLD_SIZE, else 1)."""
    ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    try:
        _check_files(cfg)
        model_name = _check_model(cfg)
        steps = _check_data(cfg, ws)
        _check_backends(cfg)
    except ConfigError:
        raise
    except (ValueError, OSError, RuntimeError) as e:  # the data and model helpers' errors name their flag
        raise ConfigError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    total = steps * cfg.optim.epochs
    _check_profile_window(cfg, steps, total)
    return Preflight(model_name, steps, total)


def looks_like_path(value: str) -> bool:
    """A --pretrained value meant as a file (a folder in it, or a checkpoint suffix), not an open_clip tag."""
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))


def _check_files(cfg: TrainConfig) -> None:
    """The files and folders the flags name exist."""
    d, m, r = cfg.data, cfg.model, cfg.run
    for flag, path in (("--imagenet-val", d.imagenet_val), ("--imagenet-v2", d.imagenet_v2)):
        if path is not None and not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: no such folder (an ImageFolder: one sub-folder of images per class)")
    if d.zeroshot_data is not None and not os.path.isdir(d.zeroshot_data):
        raise ConfigError(
            f"--zeroshot-data {d.zeroshot_data}: no such folder (an ImageFolder: one sub-folder of images per class)"
        )
    if d.zeroshot_classnames is not None and not os.path.isfile(d.zeroshot_classnames):
        raise ConfigError(
            f"--zeroshot-classnames {d.zeroshot_classnames}: no such file (one class name per line, in the "
            f"folders' order)"
        )
    if d.data_index is not None and not (
        os.path.isfile(d.data_index) or os.path.isfile(os.path.join(d.data_index, "index.json"))
    ):
        raise ConfigError(
            f"--data-index {d.data_index}: no index.json there (write one with `dissect-fast index SHARDS --out DIR`)"
        )
    if d.subset is not None and not os.path.isfile(d.subset):
        raise ConfigError(f"--subset {d.subset}: no such file (write one with `dissect-fast select-subset`)")
    if m.pretrained is not None and looks_like_path(m.pretrained) and not os.path.isfile(m.pretrained):
        raise ConfigError(
            f"--pretrained {m.pretrained}: no such checkpoint file (give a .pt/.bin/.safetensors file, or an "
            f"open_clip pretrained tag such as laion2b_s34b_b79k)"
        )
    if m.model_config is not None and not os.path.isfile(m.model_config):
        raise ConfigError(f"--model-config {m.model_config}: no such file")
    if r.resume not in (None, "latest") and not os.path.isfile(r.resume):
        raise ConfigError(
            f"--resume {r.resume}: no such checkpoint file (give a .pt path, or `latest` with the run's --logs and "
            f"--name)"
        )


def _check_model(cfg: TrainConfig) -> str:
    """The device exists, the model name (or --model-config) is known to open_clip, the scoring options fit the
    model; returns the name the model is built by."""
    from dissect_fast.config import resume_source
    from dissect_fast.model import check_scoring_options, model_name_for, resolve_device

    m = cfg.model
    resolve_device(m.device)
    source = m.pretrained if m.pretrained and os.path.isfile(m.pretrained) else None
    if source is None and cfg.run.resume is not None:
        found = resume_source(cfg.run.resume, cfg.run.logs, cfg.run.name)
        source = found[0] if found is not None and found[0].endswith(".pt") else None
    name = model_name_for(m.model, m.model_config, checkpoint=source)
    check_scoring_options(name, m.score_resolution, m.score_patch_dropout)
    return name


def _check_data(cfg: TrainConfig, world_size: int) -> int:
    """The shards, their index and the subset describe a known id range and at least one full batch per step;
    returns the optimizer steps per epoch."""
    d = cfg.data
    if d.val_data:
        resolve_data(d.val_data, "--val-data")
    if d.data_backend == "synthetic":
        return _steps_per_epoch(cfg, d.train_num_samples or DEFAULT_BATCHES * d.batch_size * world_size, world_size)
    shards, index = resolve_data(d.train_data, "--train-data", d.data_index)
    if d.dataset_resampled and d.train_num_samples is None and index is None:
        raise ConfigError(
            "--dataset-resampled needs a known epoch size: give --train-num-samples, or shards with a dataset "
            "index (run `dissect-fast index` on them)"
        )
    check_ids_known(shards, index, "--train-data")
    if index is not None:
        check_id_ranges(index, "--train-data")
    if index is None and (cfg.select.strategy in HISTORY_STRATEGIES or d.subset is not None):
        raise ConfigError(
            f"--train-data {d.train_data}: no dataset index (index.json) beside the shards; the history buffer "
            f"needs the id range: run `dissect-fast index` on them"
        )
    n = d.train_num_samples or (index.num_samples if index is not None else None)
    if n is None:
        raise ConfigError("--train-num-samples is needed: the shards have no dataset index (index.json)")
    if d.subset is not None:
        n = min(n, _check_subset(d.subset, index))
    if d.data_backend == "dali" and (d.dataset_resampled or any(is_url(s) for s in shards)):
        raise ConfigError(
            "--data-backend dali reads local shard files in passes: use --data-backend gpu or torch for "
            "webdataset URLs (pipe:, http://, ...) and --dataset-resampled"
        )
    return _steps_per_epoch(cfg, n, world_size)


def _check_subset(path: str, index: DatasetIndex | None) -> int:
    """--subset holds distinct sample ids of the training data; returns how many."""
    ids = np.load(path)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"--subset {path}: expected a 1-D integer array of sample ids")
    if ids.size == 0:
        raise ConfigError(f"--subset {path}: the subset is empty")
    num_ids = index.num_ids if index is not None else None
    if ids.min() < 0 or (num_ids is not None and ids.max() >= num_ids):
        raise ConfigError(f"--subset {path}: ids outside [0, {num_ids}) of the training data")
    if np.unique(ids).size != ids.size:
        raise ConfigError(f"--subset {path}: duplicate ids")
    return int(ids.size)


def _steps_per_epoch(cfg: TrainConfig, num_samples: int, world_size: int) -> int:
    d, accum = cfg.data, cfg.optim.accum_freq
    steps = num_samples // (d.batch_size * world_size * accum)
    if steps < 1:
        raise ConfigError(
            f"{num_samples} training samples make no full batch of --batch-size {d.batch_size} x {world_size} "
            f"rank(s) x --accum-freq {accum}: lower the batch size or --accum-freq"
        )
    return steps


def _check_backends(cfg: TrainConfig) -> None:
    """The optional packages the flags ask for are installed."""
    if "wandb" in cfg.run.report_to.split(",") and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "--report-to wandb: wandb is not installed: `pip install wandb` (and `wandb login`, or "
            "WANDB_MODE=offline), or drop wandb from --report-to"
        )
    if cfg.data.data_backend == "dali":
        from dissect_fast.data.dali_loader import dali_unavailable_reason

        reason = dali_unavailable_reason()
        if reason:
            raise ConfigError(
                f"--data-backend dali: {reason}; install nvidia-dali-cuda130 or use --data-backend gpu/torch"
            )


def _check_profile_window(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> None:
    """--profile-steps A:B starts inside the run (a B past the end profiles to the end)."""
    window = cfg.run.profile_window()
    if window is not None and window[0] >= total_steps:
        start, stop = window
        raise ConfigError(
            f"--profile-steps {start}:{stop}: the run has only {total_steps} steps ({steps_per_epoch} per epoch x "
            f"{cfg.optim.epochs} epochs, numbered from 0): start the window below {total_steps}"
        )
