"""Faults, bad data and bad input lose nothing (issue 9). Every fault is injected for real: a child
process killed with SIGKILL / SIGTERM / SIGINT, bytes flipped or cut in a checkpoint, broken images
and tars in the shards, a NaN in the loss, a write that fails with ENOSPC."""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image

from dissect_fast import ioutil
from dissect_fast.config import config_from_args
from dissect_fast.data.shards import DatasetIndex, ShardInfo, encode_id
from dissect_fast.tools.writer import ShardWriter
from dissect_fast.training import checkpoint as ckpt_io
from dissect_fast.training.loop import Trainer
from dissect_fast.training.reliability import NonFiniteError, RunStopped, TooManyBadSamples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2
ARGS = [
    "--model",
    "micro-vit",
    "--batch-size",
    "40",
    "--epochs",
    str(EPOCHS),
    "--lr",
    "1e-3",
    "--warmup",
    "2",
    "--workers",
    "0",
    "--no-progress",
    "--no-tensorboard",
    "--no-plots",
    "--device",
    "cpu",
    "--seed",
    "4",
    "--select-strategy",
    "dissect-momentum",
    "--select-rate",
    "0.5",
    "--log-every-n-steps",
    "2",
]

# A child that trains normally and, at a chosen point, writes a marker file and waits there so the
# test can kill it at a known place. Modes: step:N (after global step N), slow:N (from step N on,
# 0.3 s per step), ckpt:E (in the middle of writing epoch_E.pt, after its first bytes).
CHILD = r"""
import os, sys, time
from dissect_fast.training import checkpoint as C, loop as T
mode, arg = os.environ["FAULT"].split(":")
arg, marker = int(arg), os.environ["FAULT_MARKER"]
def mark():
    if not os.path.exists(marker):
        open(marker, "w").close()
if mode in ("step", "slow"):
    orig = T.Trainer.train_step
    def step(self, *a):
        out = orig(self, *a)
        if self.step + 1 >= arg:
            mark()
            time.sleep(600 if mode == "step" else 0.3)
        return out
    T.Trainer.train_step = step
if mode == "ckpt":
    orig_save, orig_write = C.save_checkpoint, C._HashingWriter.write
    target = {"on": False}
    def save(state, path):
        target["on"] = os.path.basename(path) == f"epoch_{arg}.pt"
        return orig_save(state, path)
    def write(self, b):
        n = orig_write(self, b)
        if target["on"] and self.size > 4096:
            self.f.flush(); os.fsync(self.f.fileno()); mark(); time.sleep(600)
        return n
    C.save_checkpoint, C._HashingWriter.write = save, write
from dissect_fast.train import main
main(sys.argv[1:])
"""


def child_env(fault, marker):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", FAULT=fault, FAULT_MARKER=str(marker))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_child(tiny_data, logs, name, fault, *extra):
    marker = logs / f"{name}.marker"
    argv = ["--train-data", str(tiny_data / "train"), *ARGS, "--logs", str(logs), "--name", name, *extra]
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, *argv],
        env=child_env(fault, marker),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while not marker.exists():
        if p.poll() is not None:
            raise AssertionError(f"child ended early ({p.returncode}): {p.stderr.read()[-3000:]}")
        if time.time() - t0 > 120:
            p.kill()
            raise AssertionError("child never reached the fault point")
        time.sleep(0.05)
    return p


@pytest.fixture(autouse=True)
def one_thread():
    """The children run with one thread; so do the in-process runs, for bitwise-equal floats."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(tiny_data, logs, name, *extra, data=None):
    cfg = config_from_args(
        ["--train-data", str(data or tiny_data / "train"), *ARGS, "--logs", str(logs), "--name", name, *extra]
    )
    t = Trainer(cfg)
    return t, t.fit()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted run every resumed run must reproduce."""
    logs = tmp_path_factory.mktemp("ref")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, metrics = train(tiny_data, logs, "ref")
    finally:
        torch.set_num_threads(n)
    return logs / "ref" / "checkpoints", metrics


def comparable(metrics):
    return [{k: v for k, v in m.items() if not k.endswith("wall_s")} for m in metrics]


def assert_same_state(a: dict, b: dict):
    """Model, optimizer and history buffer bitwise equal (NaN = never scored, compared as such)."""
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    ha, hb = a["strategy"]["history"]["values"], b["strategy"]["history"]["values"]
    assert torch.equal(torch.isnan(ha), torch.isnan(hb)) and torch.equal(ha.nan_to_num(), hb.nan_to_num())


# ---------------------------------------------------------------------------------------- killed
def test_sigkill_mid_epoch_then_resume_latest_reproduces_the_uninterrupted_run(tiny_data, tmp_path, reference):
    ref_dir, ref_metrics = reference
    p = start_child(tiny_data, tmp_path, "run", "step:9")  # epoch 2 of 6-step epochs
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    ck = tmp_path / "run" / "checkpoints"
    _, state = ckpt_io.find_resumable(str(ck))
    assert state["epoch"] == 1 and state["step"] == 6  # the latest complete checkpoint, verified
    assert_same_state(state, ckpt_io.load_checkpoint(str(ref_dir / "epoch_1.pt")))
    _, metrics = train(tiny_data, tmp_path, "run", "--resume", "latest")
    assert comparable(metrics) == comparable(ref_metrics)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert_same_state(
        ckpt_io.load_checkpoint(str(ck / "latest.pt")), ckpt_io.load_checkpoint(str(ref_dir / "latest.pt"))
    )


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tiny_data, tmp_path, reference):
    ref_dir, ref_metrics = reference
    p = start_child(tiny_data, tmp_path, "run", "ckpt:2")
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    ck = tmp_path / "run" / "checkpoints"
    partial = [f for f in os.listdir(ck) if ".tmp." in f]
    assert len(partial) == 1 and partial[0].startswith("epoch_2.pt.tmp.")  # the half-written file
    assert not (ck / "epoch_2.pt").exists()
    latest = ckpt_io.load_checkpoint(str(ck / "latest.pt"))  # verified against its sidecar
    assert ckpt_io.read_sidecar(str(ck / "latest.pt"))["step"] == 6
    assert_same_state(latest, ckpt_io.load_checkpoint(str(ref_dir / "epoch_1.pt")))
    _, metrics = train(tiny_data, tmp_path, "run", "--resume", "latest")
    assert not [f for f in os.listdir(ck) if ".tmp." in f]  # the stale temporary was removed
    assert comparable(metrics) == comparable(ref_metrics)


def test_resume_latest_skips_damaged_checkpoints(tiny_data, tmp_path, reference):
    ref_dir, _ = reference
    ck = tmp_path / "run" / "checkpoints"
    shutil.copytree(ref_dir, ck)  # separate copies: latest.pt is a hard link of epoch_2.pt in a run folder
    data = bytearray((ck / "latest.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, which torch.load alone would not notice
    (ck / "latest.pt").write_bytes(bytes(data))
    (ck / "epoch_2.pt").write_bytes((ck / "epoch_2.pt").read_bytes()[:1000])  # cut short
    with pytest.raises(ckpt_io.CheckpointError, match="SHA-256 does not match"):
        ckpt_io.load_checkpoint(str(ck / "latest.pt"))
    cfg = config_from_args(
        [
            "--train-data",
            str(tiny_data / "train"),
            *ARGS,
            "--logs",
            str(tmp_path),
            "--name",
            "run",
            "--resume",
            "latest",
        ]
    )
    t = Trainer(cfg)
    assert t.run.resume.path == str(ck / "epoch_1.pt")
    assert (tmp_path / "run" / "out.log").read_text().count("--resume latest: skipping checkpoint") == 2
    assert_same_state(t.run.resume.state, ckpt_io.load_checkpoint(str(ref_dir / "epoch_1.pt")))


# ----------------------------------------------------------------------------------- preempted
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_sigint_checkpoint_mid_epoch_and_resume_exactly(tiny_data, tmp_path, reference, sig):
    """SIGINT to the trainer alone; SIGTERM to its whole process group, a loader worker included (what a
    scheduler's preemption does: the worker must survive it until the checkpoint is written)."""
    if sig == signal.SIGINT:
        (ref_dir, ref_metrics), extra = reference, []
    else:  # a loader worker process: its own uninterrupted reference
        extra = ["--workers", "1"]
        train(tiny_data, tmp_path, "ref1", *extra)
        ref_dir = tmp_path / "ref1" / "checkpoints"
        ref_metrics = [json.loads(x) for x in (tmp_path / "ref1" / "metrics.jsonl").read_text().splitlines()]
    p = start_child(tiny_data, tmp_path, "run", "slow:8", *extra)
    if sig == signal.SIGINT:
        p.send_signal(sig)
    else:
        os.killpg(p.pid, sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    assert f"stopped by {signal.Signals(sig).name} in epoch 2" in err and "--resume latest" in err
    assert "--name run" in err
    ck = tmp_path / "run" / "checkpoints"
    meta = ckpt_io.read_sidecar(str(ck / "latest.pt"))
    assert meta["epoch"] == 1 and 0 < meta["epoch_step"] < 6 and meta["step"] == 6 + meta["epoch_step"]
    _, metrics = train(tiny_data, tmp_path, "run", "--resume", "latest", *extra)  # re-enters epoch 2 there
    assert comparable(metrics) == comparable(ref_metrics)
    assert_same_state(
        ckpt_io.load_checkpoint(str(ck / "latest.pt")), ckpt_io.load_checkpoint(str(ref_dir / "latest.pt"))
    )


# ------------------------------------------------------------------------------------ bad data
def _img(mode="RGB", size=(20, 20), fmt="JPEG"):
    buf = io.BytesIO()
    colour = {"RGB": (200, 10, 10), "L": 120, "CMYK": (0, 200, 100, 0), "RGBA": (1, 2, 3, 128)}[mode]
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make_bad_data(root, n_good=80):
    """One clean shard (ids 0..n_good-1) and a shard of every kind of trouble, indexed with N = n_good + 20."""
    w = ShardWriter(str(root), samples_per_shard=n_good, prefix="good")
    for i in range(n_good):
        w.write(i, _img(), f"a red square number {i}", None, None)
    w.finish(77, has_tokens=False)
    n = n_good
    samples = [  # (key, {ext: bytes}), counted reason
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": b"x", "id": encode_id(n)}),  # corrupt_image
        ("tiny", {"jpg": _img(size=(1, 1)), "txt": b"x", "id": encode_id(n + 1)}),  # tiny_image
        ("gray", {"jpg": _img("L"), "txt": b"grey", "id": encode_id(n + 2)}),  # mapped
        ("cmyk", {"jpg": _img("CMYK"), "txt": b"cmyk", "id": encode_id(n + 3)}),  # mapped
        ("png", {"jpg": _img("RGBA", fmt="PNG"), "txt": b"png", "id": encode_id(n + 4)}),  # mapped
        ("empty", {"jpg": _img(), "txt": b"   ", "id": encode_id(n + 5)}),  # bad_caption
        ("latin1", {"jpg": _img(), "txt": "caf\xe9".encode("latin-1"), "id": encode_id(n + 6)}),  # bad_caption
        ("noid", {"jpg": _img(), "txt": b"no id"}),  # missing_field
        ("dup", {"jpg": _img(), "txt": b"dup", "id": encode_id(n + 2)}),  # duplicate_id
        ("big", {"jpg": _img(), "txt": b"big", "id": encode_id(n + 500)}),  # id_out_of_range
    ]
    with tarfile.open(root / "bad-000.tar", "w") as tf:
        for key, fields in samples:
            for ext, data in fields.items():
                _add(tf, f"{key}.{ext}", data)
    good = (root / "good-000000.tar").read_bytes()
    (root / "cut-000.tar").write_bytes(good[: len(good) // 3])  # truncated (a copy: its ids are duplicates
    (root / "junk-000.tar").write_bytes(b"<html>404 not found</html>" * 40)  # of good ones, in another worker)
    idx = DatasetIndex.load(str(root))
    idx.shards += [ShardInfo("bad-000.tar", 10), ShardInfo("junk-000.tar", 0)]
    idx.id_max = n + 19
    idx.save(str(root))
    return idx


def test_bad_samples_are_skipped_counted_summarised_and_stop_the_run(tiny_data, tmp_path):
    from open_clip import image_transform

    from dissect_fast.data.loader import ShardDataset, TorchLoader

    idx = make_bad_data(tmp_path / "d")
    paths = idx.shard_paths() + [str(tmp_path / "d" / "cut-000.tar")]
    ds = ShardDataset(paths, 8, image_transform(32, is_train=False), 32, train=False, num_ids=idx.num_ids)
    loader = TorchLoader(ds, 0, torch.device("cpu"), drop_last=False)
    ids = torch.cat([b[2] for b in loader]).tolist()
    st = loader.stats
    assert {
        k: st[k]
        for k in (
            "corrupt_image",
            "tiny_image",
            "bad_caption",
            "missing_field",
            "id_out_of_range",
            "truncated_tar",
            "not_a_tar",
        )
    } == {
        "corrupt_image": 1,
        "tiny_image": 1,
        "bad_caption": 2,
        "missing_field": 1,
        "id_out_of_range": 1,
        "truncated_tar": 1,
        "not_a_tar": 1,
    }
    assert st["duplicate_id"] >= 2  # the `dup` sample and the complete samples of the cut copy
    assert st["image_converted"] == 3 and st["image_not_jpeg"] == 1  # grey, CMYK, RGBA-PNG: mapped to RGB
    assert sorted(set(ids)) == list(range(80)) + [82, 83, 84] and len(ids) == len(set(ids))
    assert st["bad_samples"] == sum(
        st[k]
        for k in (
            "corrupt_image",
            "tiny_image",
            "bad_caption",
            "missing_field",
            "duplicate_id",
            "id_out_of_range",
            "truncated_tar",
            "not_a_tar",
        )
    )

    # in a run: 8 bad of 91 (9%): counted in metrics.jsonl at --max-bad-fraction 0.2, a stop at the default 1%
    args = ["--batch-size", "8", "--epochs", "1", "--select-strategy", "full"]
    train(tiny_data, tmp_path, "lenient", *args, "--max-bad-fraction", "0.2", data=tmp_path / "d")
    line = json.loads((tmp_path / "lenient" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["data/bad_samples"] == 8 and line["data/corrupt_image"] == 1 and line["data/image_converted"] == 3
    assert "skipped 8 bad samples" in (tmp_path / "lenient" / "out.log").read_text()
    with pytest.raises(TooManyBadSamples, match=r"--max-bad-fraction 0.01.*bad-000.tar"):
        train(tiny_data, tmp_path, "strict", *args, data=tmp_path / "d")
    line = json.loads((tmp_path / "strict" / "metrics.jsonl").read_text().splitlines()[0])
    assert "bad-000.tar" in line["stopped"] and line["data/bad_samples"] == 8


# ---------------------------------------------------------------------------------- non-finite
def poison_loss(monkeypatch, bad_steps):
    """NaN image features (hence a NaN loss and NaN gradients) on the given 0-based global steps."""
    orig = Trainer.train_step

    def step(self, epoch, images, tokens, ids):
        if self.step in bad_steps:
            ftrain = self.forwards.train

            def nan_train(im, tok):
                out = dict(ftrain(im, tok))
                out["image_features"] = out["image_features"] * float("nan")
                return out

            self.forwards.train = nan_train
            try:
                return orig(self, epoch, images, tokens, ids)
            finally:
                self.forwards.train = ftrain
        return orig(self, epoch, images, tokens, ids)

    monkeypatch.setattr(Trainer, "train_step", step)


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(tiny_data, tmp_path, monkeypatch):
    poison_loss(monkeypatch, {7, 8})
    seen = {}
    orig_step = Trainer.train_step

    def spy(self, *a):  # parameters before/after each step, to see that a skipped step changed nothing
        before = [p.detach().clone() for p in self.model.parameters()]
        out = orig_step(self, *a)
        seen[self.step] = all(torch.equal(b, p) for b, p in zip(before, self.model.parameters()))
        return out

    monkeypatch.setattr(Trainer, "train_step", spy)
    from dissect_fast.training.reliability import NonFiniteGuard

    reads, in_step = [], [False]  # host reads of a tensor while the guard handles a step: there must be none
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def spy_read(self, *a, _real=real, _name=name):
            if in_step[0]:
                reads.append(_name)
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, name, spy_read)
    real_before = NonFiniteGuard.before_step

    def before_step(self, *a):
        in_step[0] = True
        try:
            return real_before(self, *a)
        finally:
            in_step[0] = False

    monkeypatch.setattr(NonFiniteGuard, "before_step", before_step)
    t, metrics = train(tiny_data, tmp_path, "skip")
    assert [m["nonfinite_steps"] for m in metrics] == [0, 2]
    assert metrics[1]["train_loss"] == metrics[1]["train_loss"]  # mean over the finite steps: not NaN
    assert seen[7] and seen[8] and not seen[6] and not seen[9]
    assert int(t.optimizer.state[t.model.logit_scale]["step"]) == 10  # 12 steps, 2 skipped: exactly
    assert reads == []  # the skip is decided on the device: no host sync per step

    poison_loss(monkeypatch, set(range(8, 100)))
    with pytest.raises(NonFiniteError, match=r"--max-nonfinite-steps 3.*last good checkpoint is kept: .*latest.pt"):
        train(tiny_data, tmp_path, "stop", "--max-nonfinite-steps", "3")
    ck = tmp_path / "stop" / "checkpoints"
    assert ckpt_io.load_checkpoint(str(ck / "latest.pt"))["epoch"] == 1  # the last good checkpoint, intact
    assert not (ck / "epoch_2.pt").exists()


# ------------------------------------------------------------------------------------ disk full
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullDisk(f) if "epoch_2.pt" in str(path) and "w" in mode else f

    monkeypatch.setattr(ioutil, "open", fake_open, raising=False)  # checkpoints write through ioutil.atomic_write
    with pytest.raises(RunStopped, match="no space left.*previous checkpoint is intact.*latest.pt"):
        train(tiny_data, tmp_path, "full")
    ck = tmp_path / "full" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["epoch_1.pt", "epoch_1.pt.sha256", "latest.pt", "latest.pt.sha256"]
    assert ckpt_io.load_checkpoint(str(ck / "latest.pt"))["epoch"] == 1


# --------------------------------------------------------------------------------- bad config
def test_bad_configuration_fails_before_any_model_or_data_work(tiny_data, tmp_path, reference, monkeypatch, capsys):
    from dissect_fast.data import pipeline as train_data_mod
    from dissect_fast.train import main
    from dissect_fast.training import build as build_mod

    def forbidden(*a, **k):
        raise AssertionError("model or loader built before the configuration was checked")

    monkeypatch.setattr(build_mod, "create_model", forbidden)
    monkeypatch.setattr(train_data_mod, "ShardDataset", forbidden)
    ref_dir, _ = reference
    ck = ckpt_io.load_checkpoint(str(ref_dir / "epoch_1.pt"))
    ck["strategy"]["history"]["values"] = ck["strategy"]["history"]["values"][:100]
    torch.save(ck, tmp_path / "small_buffer.pt")
    ck = ckpt_io.load_checkpoint(str(ref_dir / "epoch_1.pt"))
    ck["model_name"] = "tiny-vit"
    torch.save(ck, tmp_path / "other_model.pt")
    train_data = str(tiny_data / "train")
    cases = [
        (["--train-data", str(tmp_path / "nowhere")], "--train-data", "do not exist"),
        (["--train-data", str(tmp_path / "shard-*.tar")], "--train-data", "no shards found"),
        (["--val-data", str(tmp_path / "nowhere-*.tar")], "--val-data", "no shards found"),
        (["--select-rate", "0"], "--select-rate", "must be in (0, 1]"),
        (["--select-rate", "1.5"], "--select-rate", "must be in (0, 1]"),
        (["--select-rate", "0.01", "--batch-size", "40"], "--select-rate", "k = 0"),
        (
            ["--select-strategy", "dissect-warmup", "--warmup-point", "2"],
            "--warmup-point 2 >= --epochs 2",
            "warm-up point below",
        ),
        (["--resume", str(tmp_path / "small_buffer.pt")], "--resume", "history buffer has 100 entries"),
        (["--resume", str(tmp_path / "other_model.pt")], "--resume", "pass the same --model"),
        (["--resume", str(tmp_path / "missing.pt")], "--resume", "no such checkpoint file"),
        (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps", "must be >= 1"),
        (["--max-bad-fraction", "2"], "--max-bad-fraction", "must be in [0, 1]"),
    ]
    for extra, flag, fix in cases:
        argv = ["--train-data", train_data, *ARGS, "--logs", str(tmp_path), "--name", "cfg", *extra]
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, (extra, err)
        assert flag in err and fix in err, (extra, err)
