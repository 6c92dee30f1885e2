"""The run folder RUN = --logs/--name: its name, the refusal to overwrite another run, the lock that keeps one
process per folder (RUN/run.lock), RUN/out.log, the provenance and resolved config the run first started with
(config.json, provenance.json, never rewritten) and one record per later start (resumes.jsonl)."""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import logging.handlers
import os
import socket
import sys
import time

import torch

from dissect_fast.config import save_config
from dissect_fast.ioutil import atomic_write, write_json_atomic
from dissect_fast.provenance import provenance
from dissect_fast.training.distributed import (
    ELASTIC_ID_FILE,
    DistInfo,
    barrier,
    broadcast_object,
    elastic_restart_count,
    elastic_run_id,
    find_elastic_run,
)

log = logging.getLogger("dissect_fast")
_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(run_dir: str | None, is_main: bool, buffer: bool = False) -> None:
    """Log to stdout, and on the main rank to RUN/out.log; ``buffer``: no run folder yet, keep the records
    in memory until ``attach_run_log`` (the folder is made only once set-up has succeeded)."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.handlers.clear()
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(_LOG_FORMAT)
    h.addFilter(lambda r: not getattr(r, "file_only", False))  # the full config and provenance: out.log only
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


LOCK_FILE = "run.lock"
RESUMES_FILE = "resumes.jsonl"


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock; the message names its host and pid."""


class RunLock:
    """RUN/run.lock: an exclusive ``flock`` on an open file, held by the one process that runs in RUN (rank 0),
    with its host, pid and start time written in it. The kernel releases it when the process dies, so a lock left
    by a killed run is taken over (with a warning naming the dead holder); a live holder makes ``acquire`` raise
    RunFolderBusy. Re-entrant within a process (a notebook or test that builds a second Trainer on the folder)."""

    _held: dict[str, RunLock] = {}  #: realpath of the run folder -> this process's lock on it

    def __init__(self, run_dir: str, f) -> None:
        self.run_dir, self.f = run_dir, f

    @classmethod
    def acquire(cls, run_dir: str) -> RunLock:
        key = os.path.realpath(run_dir)
        if key in cls._held:
            return cls._held[key]
        path = os.path.join(run_dir, LOCK_FILE)
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunFolderBusy(
                f"run folder {run_dir} is in use by {holder} ({path}): wait for that run to end (or stop it), or "
                f"pick another --name"
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.warning("%s: took over the lock of a run that ended without releasing it (%s)", path, previous)
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        lock = cls._held[key] = cls(run_dir, f)
        return lock

    @classmethod
    def holding(cls, run_dir: str) -> bool:
        return os.path.realpath(run_dir) in cls._held

    @classmethod
    def release(cls, run_dir: str) -> None:
        """Empty the lock file and release it (a no-op when this process holds no lock on ``run_dir``)."""
        lock = cls._held.pop(os.path.realpath(run_dir), None)
        if lock is None:
            return
        try:
            lock.f.seek(0)
            lock.f.truncate()
            lock.f.flush()
        except OSError:
            pass  # the lock goes with the file descriptor anyway
        finally:
            fcntl.flock(lock.f.fileno(), fcntl.LOCK_UN)
            lock.f.close()


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
    if dist.is_main and os.path.isdir(path):  # a folder made by this run is claimed when it is made
        error = _claim(path, fresh=r.resume is None and elastic_restart_count() == 0)
    error = broadcast_object(error, dist)  # every rank fails alike, none waits for the others
    if error is not None:
        raise RunFolderBusy(error) if " is in use by " in error else ValueError(error)
    return path


def _claim(path: str, fresh: bool) -> str | None:
    """Take RUN's lock (main rank) and, for a ``fresh`` start, check that RUN holds no run; the refusal's message,
    or None once the lock is held."""
    try:
        RunLock.acquire(path)
    except RunFolderBusy as e:
        return str(e)
    if fresh and run_exists(path):
        RunLock.release(path)
        return (
            f"Error. Experiment already exists at {path}. Use --name NEW_NAME to specify a new experiment, "
            f"or --resume latest to continue this one"
        )
    return None


def make_run_dir(run_dir: str, dist: DistInfo, fresh: bool = True) -> None:
    """Make the run folder (nested for a --name with slashes), take its lock unless held since ``run_dir_for``
    (refused when another process holds it, or for a ``fresh`` start when another run got there first) and start
    RUN/out.log."""
    error = None
    if dist.is_main:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        if not RunLock.holding(run_dir):
            error = _claim(run_dir, fresh)
        if error is None:
            run_id = elastic_run_id()
            if run_id is not None:  # lets a restarted torchrun job without --name find this folder
                with open(os.path.join(run_dir, ELASTIC_ID_FILE), "w") as f:
                    f.write(run_id)
            attach_run_log(run_dir)
    error = broadcast_object(error, dist)
    if error is not None:
        raise RunFolderBusy(error) if " is in use by " in error else ValueError(error)
    barrier(dist)


def write_run_start(run_dir: str, cfg, device: torch.device, resumed: dict | None = None) -> None:
    """The run's start, also logged (main rank, to out.log only). The first start writes RUN/config.json (the
    resolved config) and RUN/provenance.json; they are never rewritten. A resume (``resumed``: what it resumed
    from and changed, flag -> [old, new]) or a torchelastic restart appends one record to RUN/resumes.jsonl
    instead: time, command line, ``resumed``, its resolved config and provenance."""
    from dissect_fast.training.logs import append_jsonl

    prov = provenance(device)
    log.info("provenance: %s", json.dumps(prov), extra={"file_only": True})
    log.info("config: %s", json.dumps(cfg.to_dict()), extra={"file_only": True})
    config_path = os.path.join(run_dir, "config.json")
    first = not os.path.isfile(config_path)
    if first:
        save_config(cfg, config_path)
        write_json_atomic(os.path.join(run_dir, "provenance.json"), prov, fsync=False, indent=1)
        if resumed is None:
            return
    record = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv,
        **(resumed or {"resumed_from": None}),
        "config": cfg.to_dict(),
        "provenance": prov,
    }
    append_jsonl(os.path.join(run_dir, RESUMES_FILE), record)
    if record.get("overrides"):
        log.warning("--resume-override: changed %s", json.dumps(record["overrides"]))
    if record.get("allowed"):
        log.info("changed on resume: %s", json.dumps(record["allowed"]))


def rewrite_metrics(run_dir: str, metrics: list[dict]) -> None:
    """RUN/metrics.jsonl holding exactly ``metrics`` (a resumed run drops epochs its checkpoint does not hold)."""
    with atomic_write(os.path.join(run_dir, "metrics.jsonl"), fsync=False) as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
