"""``srun python ...`` without torchrun: ranks from SLURM's variables (open_clip's documented launch)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from dissect_fast.training.distributed import LaunchError, init_distributed, world_from_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # end to end: trains, or runs commands in subprocesses

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")

CHILD = """
import json, torch, torch.distributed as dist
from dissect_fast.training.distributed import cleanup, init_distributed
info = init_distributed("cpu", 1.0)
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_rank, "sum": t.item(),
                  "dist_rank": dist.get_rank()}))
cleanup(info)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(rank: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("SLURM_")}
    env.update(
        SLURM_PROCID=str(rank),
        SLURM_NTASKS="2",
        SLURM_LOCALID=str(rank),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        **extra,
    )
    return env


def test_two_srun_tasks_form_a_group():
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            env=slurm_env(r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for r in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [(o["rank"], o["dist_rank"], o["local"], o["world"]) for o in outs] == [(0, 0, 0, 2), (1, 1, 1, 2)]
    assert all(o["sum"] == 3.0 for o in outs)  # 1 + 2: both ranks took part in the all_reduce


def test_missing_master_addr_names_the_exports(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("MASTER_PORT", "12802")
    with pytest.raises(LaunchError) as e:
        init_distributed("cpu", 0.1)
    msg = str(e.value)
    assert "MASTER_ADDR must be set" in msg and "SLURM_NTASKS=2" in msg
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in msg
    assert "export MASTER_PORT=" in msg
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT must be set"):
        init_distributed("cpu", 0.1)


def test_launcher_precedence(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    assert world_from_env() == (0, 1, 0, "none")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job step: a single process
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert world_from_env() == (0, 1, 0, "none")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert world_from_env() == (5, 8, 1, "slurm")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun inside an srun step: torchrun's variables win
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert world_from_env() == (3, 4, 3, "torchrun")


def test_lone_task_times_out_with_a_hint():
    """python run directly in a batch script with --ntasks 2: the missing peer is named, not a bare timeout."""
    code = (
        "from dissect_fast.training.distributed import LaunchError, init_distributed\n"
        "try:\n    init_distributed('cpu', 0.05)\nexcept LaunchError as e:\n    print(e)\n"
    )
    env = slurm_env(0, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    r = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert "SLURM task 0 of 2: no process group at 127.0.0.1" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "launch it with srun" in r.stdout
