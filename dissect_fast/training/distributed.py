"""Process group set-up from torchrun's environment (or SLURM's, under ``srun`` without torchrun), the
gathers the trainer needs, the history sync check, and torchelastic restart support."""

from __future__ import annotations

import datetime
import glob
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class HistoryDesyncError(RuntimeError):
    """The history buffer replicas differ between ranks (they must be bit-identical)."""


class LaunchError(RuntimeError):
    """The launcher's environment cannot start a process group; the message says what to set."""


#: the two lines an sbatch script needs before ``srun python -m dissect_fast.train ...`` (open_clip's docs)
SLURM_EXPORTS = (
    'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\nexport MASTER_PORT=12802'
)


def world_from_env() -> tuple[int, int, int, str]:
    """(rank, world size, local rank, launcher) of this process.

    torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` when set (launcher ``torchrun``); else, under
    ``srun`` with more than one task, SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
    (launcher ``slurm``, open_clip's rule); else a single process (``none``).
    """
    if "WORLD_SIZE" in os.environ:
        return (
            int(os.environ.get("RANK", "0")),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", "0")),
            "torchrun",
        )
    ntasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if ntasks > 1 and "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        rank = int(os.environ["SLURM_PROCID"])
        if not 0 <= rank < ntasks:
            raise LaunchError(f"SLURM_PROCID={rank} is outside 0..SLURM_NTASKS-1={ntasks - 1}")
        return rank, ntasks, int(os.environ.get("SLURM_LOCALID", "0") or 0), "slurm"
    return 0, 1, 0, "none"


def _check_slurm_rendezvous(world: int) -> None:
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise LaunchError(
            f"srun without torchrun (SLURM_NTASKS={world}): {' and '.join(missing)} must be set so the tasks can "
            f"find each other; export both in the sbatch script before srun:\n{SLURM_EXPORTS}"
        )
    if not os.environ["MASTER_PORT"].isdigit():
        raise LaunchError(
            f"MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number: e.g. export MASTER_PORT=12802"
        )


def init_distributed(device_type: str, timeout_minutes: float = 10.0) -> DistInfo:
    """Initialise NCCL (GPU) or gloo (CPU) when launched by torchrun or by ``srun`` (several SLURM tasks,
    no torchrun: ranks from SLURM's variables, rendezvous at ``MASTER_ADDR:MASTER_PORT``, which the
    sbatch script exports); a single process otherwise.

    ``timeout_minutes`` bounds every collective: a rank whose peer died fails after it instead of
    hanging (torchrun's agent normally tears the group down first; this covers the rest).
    """
    rank, world, local_rank, launcher = world_from_env()
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if launcher == "slurm":
            _check_slurm_rendezvous(world)
            # torchrun's names too, for anything downstream that reads them
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
            try:
                dist.init_process_group(
                    backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout
                )
            except RuntimeError as e:
                raise LaunchError(
                    f"SLURM task {rank} of {world}: no process group at {os.environ['MASTER_ADDR']}:"
                    f"{os.environ['MASTER_PORT']} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                    f"every one of the SLURM_NTASKS={world} tasks must run this command (launch it with srun, "
                    f"not directly in the batch script) and MASTER_ADDR must be reachable from every node"
                ) from e
        else:
            store = _attempt_store(world, timeout)
            if store is None:
                dist.init_process_group(backend=backend, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def cuda_device_index(info: DistInfo) -> int:
    """The CUDA device this rank trains on: its local rank, or 0 when the launcher shows each rank a single
    GPU (``srun --gpus-per-task=1``, or CUDA_VISIBLE_DEVICES set per rank)."""
    n = torch.cuda.device_count()
    if n <= 1:
        return 0
    if info.local_rank >= n:
        raise LaunchError(
            f"local rank {info.local_rank} but this process sees {n} GPUs: start at most {n} tasks per node, or "
            f"show each task one GPU (srun --gpus-per-task=1)"
        )
    return info.local_rank


def _attempt_store(world: int, timeout: datetime.timedelta):
    """On one node under torchrun, the agent's TCPStore, with keys private to this restart attempt.

    torchrun shares one TCPStore server across all restart attempts of a job; the process group's
    keys (each rank's address) of a killed attempt are still there, and a restarted rank that reads
    its dead peer's stale address waits forever to connect (seen with gloo on torch 2.14). Prefixing
    the keys with the restart count fixes that. One agent (one node) gives every rank the same
    count; with several nodes the agents' counts may differ, so there we leave the default store
    (multi-node elastic runs: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for a fresh store per
    attempt; see the README)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or elastic_restart_count() == 0:
        return None  # the first attempt finds no stale keys: torch's own set-up
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) != 1 or "MASTER_ADDR" not in os.environ:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"dissect_fast/attempt_{elastic_restart_count()}/", store)


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenation over ranks of equally shaped tensors (no host round trip on NCCL)."""
    if not info.enabled:
        return t
    out = torch.empty((info.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a small picklable object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_in_sync(checksum: torch.Tensor, info: DistInfo, step: int) -> list[list[int]]:
    """All-gather every rank's history checksum and compare; returns them per rank (a host sync:
    call it every ``--check-sync-every`` steps, not every step). Every rank sees the same gathered
    values, so every rank raises together on drift and none is left waiting in a collective."""
    sums = all_gather_cat(checksum.reshape(1, -1), info).cpu().tolist()
    bad = [r for r, s in enumerate(sums) if s != sums[0]]
    if bad:
        raise HistoryDesyncError(
            f"history buffer out of sync at step {step}: rank(s) {bad} differ from rank 0 "
            f"(checksums per rank: {sums}). Every rank must apply the same all-gathered updates; this is a bug "
            f"or memory corruption, not a setting: report it, and resume from the last checkpoint"
        )
    return sums


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- torchelastic restarts
def elastic_restart_count() -> int:
    """How often torchrun (``--max-restarts``) has restarted this job's workers; 0 on the first try."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def elastic_run_id() -> str | None:
    """torchrun's rendezvous id (a fresh uuid with ``--standalone``, ``--rdzv-id`` otherwise); None
    outside torchrun or when it is the uninformative default ``none``."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    return rid if rid and rid != "none" else None


ELASTIC_ID_FILE = "torchelastic_run_id"


def find_elastic_run(logs: str, run_id: str) -> str | None:
    """Name of the newest run folder under ``logs`` that this torchrun job created (it holds the
    job's rendezvous id), so a restarted job without ``--name`` finds its own checkpoints."""
    found = []
    for marker in glob.glob(os.path.join(logs, "*", ELASTIC_ID_FILE)):
        try:
            with open(marker) as f:
                if f.read().strip() == run_id:
                    found.append((os.path.getmtime(marker), os.path.basename(os.path.dirname(marker))))
        except OSError:
            continue
    return max(found)[1] if found else None


# ---------------------------------------------------------------------- fault injection (tests only)
