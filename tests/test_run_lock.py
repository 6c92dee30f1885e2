"""One run per folder (issue 22, item 7): RUN/run.lock is held by the live run; a second process on the folder (a
fresh start with the same --logs/--name, or a resume) is refused naming the holder; a killed holder's lock is taken
over with a warning; the clean-up of unfinished checkpoint writes spares a live writer's file."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from tiny_run import tiny_argv

from dissect_fast.config import config_from_args
from dissect_fast.train import main
from dissect_fast.training import checkpoint as ckpt_io
from dissect_fast.training.distributed import DistInfo
from dissect_fast.training.loop import Trainer
from dissect_fast.training.run_folder import LOCK_FILE, RunFolderBusy, RunLock, make_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run that pauses for good after its 2nd step (before its first checkpoint), once it wrote the marker file.
CHILD = r"""
import os, sys, time
from dissect_fast.training import loop as T
marker = os.environ["MARKER"]
orig = T.Trainer.train_step
def step(self, *a):
    out = orig(self, *a)
    if self.step + 1 >= 2:
        open(marker, "w").close()
        time.sleep(600)
    return out
T.Trainer.train_step = step
from dissect_fast.train import main
main(sys.argv[1:])
"""


def start_holder(argv, marker):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MARKER=str(marker))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    t0 = time.time()
    while not marker.exists():
        if p.poll() is not None:
            raise AssertionError(f"holder ended early ({p.returncode}): {p.stderr.read()[-3000:]}")
        if time.time() - t0 > 120:
            p.kill()
            raise AssertionError("holder never reached its second step")
        time.sleep(0.05)
    return p


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tiny_data, tmp_path, capsys):
    argv = tiny_argv(tmp_path, "busy", "--epochs", "1", "--log-every-n-steps", "1", data=tiny_data)
    run = tmp_path / "busy"
    holder = start_holder(argv, tmp_path / "marker")
    try:
        who = f"host {socket.gethostname()} pid {holder.pid}"
        assert (run / LOCK_FILE).read_text().startswith(who)
        # the same command again, then a resume: both refused while the holder lives, naming it
        for again in (argv, [*argv, "--resume", "latest"]):
            with pytest.raises(SystemExit) as e:
                main(again)
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"is in use by {who}" in err and len(err.strip().splitlines()) == 1, err
        # a fresh start that made the folder itself is refused when it takes the lock
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}"):
            make_run_dir(str(run), DistInfo(), fresh=True)
        # unfinished checkpoint writes: the live holder's stays, a dead writer's goes
        ck = run / "checkpoints"
        live, dead = ck / f"epoch_1.pt.tmp.{holder.pid}.1", ck / f"latest.pt.tmp.{dead_pid()}"
        live.write_bytes(b"x")
        dead.write_bytes(b"x")
        assert ckpt_io.remove_stale_temporaries(str(ck)) == [str(dead)]
        assert live.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_FILE).read_text().startswith(who)  # a killed process cannot clean up
    t = Trainer(config_from_args([*argv, "--resume", "latest"]))
    t.fit()
    log = (run / "out.log").read_text()
    assert "took over the lock" in log and who in log
    assert not live.exists()  # its writer is dead now
    assert (run / LOCK_FILE).read_text() == ""  # released at the end of the run
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the killed attempt's lines are gone


def test_the_lock_is_released_and_reentrant_in_one_process(tmp_path):
    RunLock.acquire(str(tmp_path))
    assert RunLock.acquire(str(tmp_path)) is RunLock.acquire(str(tmp_path))  # a second Trainer in this process
    code = (  # another process tries the same flock (plain fcntl: no torch import, fast)
        "import fcntl, sys\n"
        "f = open(sys.argv[1], 'a+')\n"
        "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('acquired')\n"
        "except OSError:\n    f.seek(0); print('busy:', f.read())\n"
    )
    lock = str(tmp_path / LOCK_FILE)
    other = subprocess.run([sys.executable, "-c", code, lock], capture_output=True, text=True)
    assert other.stdout.startswith(f"busy: host {socket.gethostname()} pid {os.getpid()}"), other.stdout + other.stderr
    RunLock.release(str(tmp_path))
    other = subprocess.run([sys.executable, "-c", code, lock], capture_output=True, text=True)
    assert other.stdout.strip() == "acquired", other.stdout + other.stderr
