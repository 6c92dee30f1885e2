"""Nothing poisoned is kept (issue 22, item 5; item 6's non-finite embeddings): non-finite hyper-parameters and a
k below 2 are refused at set-up, a checkpoint holding NaN/Inf is never written (and the run's message names a
checkpoint that is finite, or none), a skipped step leaves the history buffer bit for bit as it was (one rank
and several), and select-subset refuses embeddings with NaN rows."""

import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tiny_run import tiny_argv, tiny_trainer

from dissect_fast import config as config_mod
from dissect_fast.config import config_from_args
from dissect_fast.offline.embeddings_io import Embeddings, EmbeddingsError, EmbeddingWriter, load_embeddings
from dissect_fast.offline.subset import main_select_subset, select_subset
from dissect_fast.selection.strategies import make_strategy
from dissect_fast.training import checkpoint as ckpt_io
from dissect_fast.training.callbacks import Callback
from dissect_fast.training.loop import Trainer
from dissect_fast.training.reliability import NonFiniteError, NonFiniteGuard, agree_on_all_ranks, nonfinite_state

SYNTH = ["--data-backend", "synthetic", "--device", "cpu"]


def float_flags() -> list[str]:
    """The option of every float field of the config (a new float field is covered without editing this list)."""
    out = []
    for section in config_mod._sections().values():
        for f in dataclasses.fields(section):
            if "float" in str(f.type):
                out.append(config_mod._flags(f)[0])
    return out


def refused(argv, capsys) -> str:
    """The one-line error of a refused command line (argparse exits 2)."""
    with pytest.raises(SystemExit) as e:
        config_from_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ set-up
def test_every_float_flag_is_covered():
    assert {"--lr", "--wd", "--grad-clip-norm", "--beta1", "--beta2", "--eps", "--select-rate"} <= set(float_flags())


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("flag", float_flags())
def test_nonfinite_float_flags_are_refused(flag, value, capsys):
    strategy = ["--select-strategy", "dissect-momentum"] if flag in ("--select-rate", "--momentum") else []
    line = refused([*SYNTH, *strategy, f"{flag}={value}"], capsys)
    assert flag in line and value.lstrip("-") in line, line


@pytest.mark.parametrize(
    "argv", [["--beta1", "1"], ["--beta2=-0.1"], ["--eps", "0"], ["--grad-clip-norm", "0"], ["--lr", "0"]]
)
def test_out_of_range_optimizer_flags_are_refused(argv, capsys):
    assert argv[0].split("=")[0] in refused([*SYNTH, *argv], capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["--select-strategy", "clipscore", "--select-rate", "0.05", "--batch-size", "20"],  # k = 1
        ["--select-strategy", "dissect-momentum", "--select-rate", "0.05", "--batch-size", "20", "--accum-freq", "4"],
        ["--select-strategy", "random", "--select-rate", "0.01", "--batch-size", "40"],  # k = 0
        ["--batch-size", "1"],  # full: k = B = 1
    ],
)
def test_k_below_two_is_refused(argv, capsys):
    line = refused([*SYNTH, *argv], capsys)
    assert "--batch-size" in line and "k = " in line, line
    if "--select-rate" in argv:
        assert "--select-rate" in line


def test_k_of_two_is_accepted():
    cfg = config_from_args([*SYNTH, "--select-strategy", "clipscore", "--select-rate", "0.1", "--batch-size", "20"])
    assert cfg.select.k(cfg.data.batch_size) == 2


def test_lr_inf_run_exits_at_setup_without_a_run_folder(tmp_path, capsys):
    from dissect_fast.train import main

    with pytest.raises(SystemExit) as e:
        main(tiny_argv(tmp_path, "inf", synthetic=True, lr="inf"))
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err
    assert not (tmp_path / "inf").exists()


# ------------------------------------------------------------------------------------------------ checkpoints
def test_nonfinite_state_is_exact():
    big = torch.full((64,), 1e20)  # finite, but its L2 norm overflows float32: must not be called non-finite
    state = {
        "state_dict": {"w": big, "b": torch.zeros(3), "n": torch.tensor(5)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}}},
        "scaler": {"scale": 65536.0},
        "strategy": {"history": {"values": torch.full((8,), float("nan"))}},  # NaN = never scored: fine
    }
    assert nonfinite_state(state) == []
    state["optimizer"]["state"][0]["exp_avg"][2] = float("nan")
    state["state_dict"]["b"][0] = float("-inf")
    state["scaler"]["scale"] = float("inf")
    assert sorted(nonfinite_state(state)) == ["optimizer.state.0.exp_avg", "scaler.scale", "state_dict.b"]


def all_checkpoints_finite(ck) -> list[str]:
    names = sorted(p for p in os.listdir(ck) if p.endswith(".pt")) if ck.exists() else []
    for p in names:
        assert nonfinite_state(ckpt_io.load_checkpoint(str(ck / p))) == [], p
    return names


def test_lr_inf_past_validation_writes_no_checkpoint_and_exits_3(tiny_data, tmp_path, monkeypatch, capsys):
    """The issue's run (--lr inf before it was refused): the first update makes the weights non-finite; the run
    must stop with exit 3, leave no checkpoint, and not call any file good."""
    from dissect_fast import train

    real = config_mod.config_from_args

    def unchecked(argv):  # what the old validation let through
        cfg = real(argv)
        cfg.optim.lr = float("inf")
        return cfg

    monkeypatch.setattr(config_mod, "config_from_args", unchecked)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_argv(tmp_path, "inf", data=tiny_data))
    err = capsys.readouterr().err
    assert e.value.code == 3, err
    assert "not written" in err and "last good checkpoint is kept: none" in err, err
    assert all_checkpoints_finite(tmp_path / "inf" / "checkpoints") == []


class PoisonWeights(Callback):
    """After global step ``step``: a weight becomes NaN (a divergence the guard cannot undo)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, ctx, epoch, n_steps) -> None:
        if ctx.step == self.step:
            with torch.no_grad():
                next(ctx.model.parameters()).view(-1)[0] = float("nan")


def test_poisoned_weights_are_not_saved_and_the_named_checkpoint_is_finite(tiny_data, tmp_path):
    t = tiny_trainer(tmp_path, "p", "--epochs", "3", data=tiny_data)  # 6 steps an epoch
    t.callbacks.append(PoisonWeights(8))
    with pytest.raises(NonFiniteError, match="checkpoint epoch_2.pt not written") as e:
        t.fit()
    ck = tmp_path / "p" / "checkpoints"
    assert f"last good checkpoint is kept: {ck / 'latest.pt'}" in str(e.value)
    assert e.value.exit_code == 3
    assert all_checkpoints_finite(ck) == ["epoch_1.pt", "latest.pt"]
    assert ckpt_io.load_checkpoint(str(ck / "latest.pt"))["epoch"] == 1


# ------------------------------------------------------------------------------------------------ history
def history_bits(t) -> torch.Tensor:
    v = t.strategy.history.values
    return v.view(torch.int16 if v.element_size() == 2 else torch.int32).clone()


def poison_steps(monkeypatch, bad_steps, scores_too: bool):
    """NaN training features (a NaN loss, a skipped step) on ``bad_steps``; ``scores_too``: NaN scoring features
    as well (the scoring pass then writes NaN = "never scored" into the history, as weights gone bad would)."""
    orig = Trainer.train_step
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def nan_outputs(fn):
        def wrapped(*a):
            out = fn(*a)
            if isinstance(out, tuple):
                return tuple(x * float("nan") for x in out)
            return {**out, "image_features": out["image_features"] * float("nan")}

        return wrapped

    def step(self, epoch, images, tokens, ids):
        before = history_bits(self)
        if self.step in bad_steps:
            ftrain, fscore = self.forwards.train, self.forwards.score
            self.forwards.train = nan_outputs(ftrain)
            if scores_too:
                self.forwards.score = nan_outputs(fscore)
            try:
                return orig(self, epoch, images, tokens, ids)
            finally:
                self.forwards.train, self.forwards.score = ftrain, fscore
                seen[self.step] = (before, history_bits(self))
        out = orig(self, epoch, images, tokens, ids)
        seen[self.step] = (before, history_bits(self))
        return out

    monkeypatch.setattr(Trainer, "train_step", step)
    return seen


WARMUP_EVERY = ["--select-strategy", "dissect-warmup", "--warmup-point", "2", "--warmup-record", "every"]


@pytest.mark.parametrize(
    "extra, scores_too",
    [
        (["--select-strategy", "dissect-momentum"], True),
        (["--select-strategy", "dissect-momentum", "--history-dtype", "bf16"], False),
        (["--select-strategy", "dissect-momentum", "--accum-freq", "2", "--batch-size", "20"], True),
        ([*WARMUP_EVERY, "--epochs", "3", "--warmup-train", "full"], False),  # the training forward records
    ],
)
def test_skipped_steps_leave_the_history_untouched(tiny_data, tmp_path, monkeypatch, extra, scores_too):
    """Five skipped steps in the second epoch (6 steps an epoch), over entries the first epoch scored: the issue
    saw 83% of them reset to "never scored" (NaN) by the scoring pass of skipped steps."""
    bad = {7, 8, 9, 10, 11}
    seen = poison_steps(monkeypatch, bad, scores_too)
    t = tiny_trainer(tmp_path, "h", "--select-rate", "0.5", "--epochs", "2", *extra, data=tiny_data)
    assert sum(m["nonfinite_steps"] for m in t.fit()) == len(bad)
    for s in bad:  # the key: t.step when the step started (0-based)
        before, after = seen[s]
        assert torch.equal(before, after), f"skipped step {s} changed the history"
    before, after = seen[6]
    assert not torch.equal(before, after)  # an applied step of the same epoch does write: the check can fail
    assert not torch.isnan(t.strategy.history.values.float()).any()  # every entry scored, none reset


def test_commit_undoes_an_all_gathered_update_bit_for_bit():
    """Several ranks: ``update`` applies every rank's (id, score) pairs; a skipped step puts them all back."""
    cfg = config_from_args([*SYNTH, "--select-strategy", "dissect-momentum", "--select-rate", "0.5"]).select
    other = (torch.arange(8, 16), torch.rand(8) * 30)  # the second rank's contribution

    def gather(x: torch.Tensor) -> torch.Tensor:  # all_gather_cat of two ranks: this rank's, then the other's
        return torch.cat([x, other[0] if x.dtype == torch.long else other[1]])

    s = make_strategy(cfg, 8, 16, torch.device("cpu"), gather)
    s.history.values[:] = torch.rand(16) * 30
    s.history.values[3] = float("nan")
    ids, feats = torch.arange(8), (torch.randn(8, 4), torch.randn(8, 4))
    for applied in (False, True):
        start = s.history.values.clone()
        s.begin_step()
        sel = s.select(0, ids, feats, torch.tensor(1.0), 100.0, None)
        s.update(0, sel, ids[sel.index], None, 100.0)
        s.commit_step(torch.tensor(applied))
        same = torch.equal(s.history.values.view(torch.int32), start.view(torch.int32))
        assert same != applied


def _two_ranks(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=0.1, fused=True)
        guard = NonFiniteGuard(opt, torch.device("cpu"), 10, False, agree=agree_on_all_ranks)
        p.grad = torch.ones(3)  # the all-reduced gradient: finite on both ranks
        loss = torch.tensor(float("inf") if rank == 1 else 1.0)  # only rank 1's own loss is not finite
        guard.before_step(loss)
        opt.step()
        guard.after_step()
        out.put((rank, bool(guard.applied), p.detach().tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_the_skip_decision_is_agreed_across_ranks():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [g[1] for g in got] == [False, False]  # rank 0's finite loss does not step alone
    assert got[0][2] == got[1][2] == [1.0, 1.0, 1.0]  # the replicas stay identical (and untouched)


# ------------------------------------------------------------------------------------------------ select-subset
def nan_embeddings(tmp_path, bad_rows=(3, 17, 40)):
    rng = np.random.default_rng(0)
    n, d = 60, 8
    img, txt = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)
    ids = np.arange(1000, 1000 + n)
    with EmbeddingWriter(tmp_path / "emb", d, capacity=n) as w:  # the project's own writer, then damaged
        w.append(ids, img, txt)
    image = np.load(tmp_path / "emb" / "image.npy", mmap_mode="r+")
    for i, r in enumerate(bad_rows):
        image[r, i % d] = float("nan") if i % 2 == 0 else float("inf")
    image.flush()
    del image
    return tmp_path / "emb"


@pytest.mark.parametrize("method", ["clipscore", "clipcov"])
def test_select_subset_refuses_nonfinite_rows(tmp_path, method, capsys):
    emb_dir = nan_embeddings(tmp_path)
    with pytest.raises(EmbeddingsError, match=r"3 of 60 rows hold NaN or Inf \(rows 3, 17, 40; sample ids 1003"):
        select_subset(load_embeddings(emb_dir), method, 0.5)
    out = tmp_path / "ids.npy"
    with pytest.raises(SystemExit) as e:
        main_select_subset(["--embeddings", str(emb_dir), "--method", method, "--fraction", "0.5", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    assert "rows 3, 17, 40" in capsys.readouterr().err


def test_select_subset_refuses_an_all_nan_set_and_nan_class_names():
    n, d = 20, 4
    emb = Embeddings.from_arrays(np.arange(n), np.full((n, d), np.nan, np.float32), np.ones((n, d), np.float32))
    with pytest.raises(EmbeddingsError, match=r"20 of 20 rows .*rows 0, 1, 2, 3, 4, \.\.\."):
        select_subset(emb, "clipscore", 0.25)
    rng = np.random.default_rng(1)
    ok = Embeddings.from_arrays(np.arange(n), rng.standard_normal((n, d)), rng.standard_normal((n, d)))
    names = rng.standard_normal((3, d)).astype(np.float32)
    names[1, 0] = np.nan
    with pytest.raises(EmbeddingsError, match="--class-names: 1 of 3 rows .*class indices 1"):
        select_subset(ok, "clipcov", 0.5, class_names_emb=names)


def test_embedding_writer_refuses_values_that_overflow_float16(tmp_path):
    with EmbeddingWriter(tmp_path / "e", 2) as w, pytest.raises(EmbeddingsError, match="float16"):
        w.append([0], np.array([[1e6, 0.0]], np.float32), np.ones((1, 2), np.float32))
