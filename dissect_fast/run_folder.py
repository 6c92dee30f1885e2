"""The run folder RUN = --logs/--name: its name, the refusal to overwrite another run, RUN/out.log, and the
provenance and resolved config every run starts with."""

from __future__ import annotations

import glob
import json
import logging
import logging.handlers
import os
import sys
import time

import torch

from dissect_fast.config import save_config
from dissect_fast.distributed import (
    ELASTIC_ID_FILE,
    DistInfo,
    barrier,
    broadcast_object,
    elastic_restart_count,
    elastic_run_id,
    find_elastic_run,
)
from dissect_fast.ioutil import atomic_write, write_json_atomic
from dissect_fast.provenance import provenance

log = logging.getLogger("dissect_fast")
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
        glob.glob(os.path.join(path, "checkpoints", "*.pt"))
    )


def default_run_name(logs: str, strategy: str) -> str:
    """A restarted torchrun job's own folder (found by its elastic run id), else strategy-date-time."""
    rid = elastic_run_id()
    if rid is not None and elastic_restart_count() > 0:
        found = find_elastic_run(logs, rid)
        if found is not None:
            return found
    return f"{strategy}-{time.strftime('%Y_%m_%d-%H_%M_%S')}"


def run_dir_for(run_cfg, strategy: str, dist: DistInfo) -> str:
    """The run folder's path (not made yet; names the run when --name is not given). A folder that already holds
    a run is refused, like open_clip does, unless this run resumes (--resume, or a torchelastic restart)."""
    r = run_cfg
    if r.name is None:  # rank 0 names the run: the ranks' clocks may straddle a second
        r.name = broadcast_object(default_run_name(r.logs, strategy) if dist.is_main else None, dist)
    path = os.path.join(r.logs, r.name)
    error = None
    if dist.is_main and r.resume is None and elastic_restart_count() == 0 and run_exists(path):
        error = (
            f"Error. Experiment already exists at {path}. Use --name NEW_NAME to specify a new experiment, "
            f"or --resume latest to continue this one"
        )
    error = broadcast_object(error, dist)  # every rank fails alike, none waits for the others
    if error is not None:
        raise ValueError(error)
    return path


def make_run_dir(run_dir: str, dist: DistInfo) -> None:
    """Make the run folder (nested for a --name with slashes) and start RUN/out.log."""
    if dist.is_main:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        run_id = elastic_run_id()
        if run_id is not None:  # lets a restarted torchrun job without --name find this folder
            with open(os.path.join(run_dir, ELASTIC_ID_FILE), "w") as f:
                f.write(run_id)
        attach_run_log(run_dir)
    barrier(dist)


def write_run_start(run_dir: str, cfg, device: torch.device) -> None:
    """RUN/config.json (the resolved config) and RUN/provenance.json, both also logged first (main rank)."""
    save_config(cfg, os.path.join(run_dir, "config.json"))
    prov = provenance(device)
    write_json_atomic(os.path.join(run_dir, "provenance.json"), prov, fsync=False, indent=1)
    log.info("provenance: %s", json.dumps(prov))
    log.info("config: %s", json.dumps(cfg.to_dict()))


def rewrite_metrics(run_dir: str, metrics: list[dict]) -> None:
    """RUN/metrics.jsonl holding exactly ``metrics`` (a resumed run drops epochs its checkpoint does not hold)."""
    with atomic_write(os.path.join(run_dir, "metrics.jsonl"), fsync=False) as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
