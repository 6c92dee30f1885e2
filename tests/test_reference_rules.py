"""The published selection rules against a transcription of the DISSect reference code, over random batches of a
small simulated training run.

``Reference`` is written from the reference's own rules (its ``src/train.py`` and ``open_clip/loss.py``, as
METHOD.md and docs/method.md read them), with Python floats and dicts only, and never from this project's code:

* k = ``int(batch_size * select_rate)`` (truncation, also where r * B is not a whole number);
* ``torch.topk`` picks the k largest keys; its order among equal keys is unspecified, so a choice is checked as a
  SET (``is_top_k``: every chosen key >= every key left out), never as a sequence;
* CLIPScore s = max(0, 100 cos(f, g)); ``clipscore`` ranks the raw 100 cos;
* ``small_loss`` / ``big_loss``: the per-pair symmetric InfoNCE of the batch at the model's logit scale;
* ``warmup_base_sampling``: a dict starting at 0, overwritten with s by every scored warm-up step, then the key
  ``(w - mean w) - (s - mean s)``;
* ``historical_base_sampling``: key ``h - s`` (h from a dict starting at 0, no mean-shift), then
  ``h <- 0.9 * old + 0.1 * s`` with old = s in epoch 0 (every epoch-0 step overwrites) and old = h (0 if never
  written) in later epochs.

The project (``make_strategy``, driven the way the trainer drives it) is compared with the transcription where the
two rules agree, and where they deliberately differ (dissect-momentum's first sight of a sample, docs/method.md)
the tests assert the difference on a case that shows it.
"""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from dissect_fast.config import SelectConfig
from dissect_fast.selection.strategies import make_strategy

D, SCORE_SCALE = 6, 100.0
#: the project's history update runs in single process inside the selection op ("in-place"), on several ranks
#: through HistoryBuffer.update with every rank's (id, score) ("gathered", here a one-rank all-gather)
PATHS = ("in-place", "gathered")


# ----------------------------------------------------------------------------------------------- simulated data
class World:
    """N pairs whose features drift a little every epoch (so scores change between epochs), shuffled into batches
    of B each epoch; the last N mod B samples of every epoch are dropped (drop_last)."""

    def __init__(self, n: int, b: int, seed: int, matched: float = 0.6) -> None:
        rng = random.Random(seed)
        self.n, self.b, self.rng = n, b, rng
        self.f = [[rng.gauss(0, 1) for _ in range(D)] for _ in range(n)]
        # mostly matching captions (g close to f), some mismatched (independent g): both signs of cos occur
        self.g = [
            [x + rng.gauss(0, 0.8) for x in fi] if rng.random() < matched else [rng.gauss(0, 1) for _ in range(D)]
            for fi in self.f
        ]
        self.drift = [[rng.gauss(0, 0.3) for _ in range(D)] for _ in range(n)]

    def feats(self, i: int, epoch: int) -> tuple[list[float], list[float]]:
        return [a + epoch * d for a, d in zip(self.f[i], self.drift[i])], list(self.g[i])

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(self.n))
        self.rng.shuffle(order)
        return [order[s : s + self.b] for s in range(0, self.n - self.b + 1, self.b)]


def cos(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def is_top_k(chosen: list[int], keys: list[float], k: int, tol: float = 1e-3) -> bool:
    """Whether ``chosen`` is a set ``torch.topk(keys, k)`` may return: k distinct positions whose keys are all >=
    every key left out (``tol`` absorbs float32 vs float64 rounding; keys closer than that count as tied)."""
    if len(chosen) != k or len(set(chosen)) != k:
        return False
    rest = [keys[p] for p in range(len(keys)) if p not in set(chosen)]
    return not rest or not chosen or min(keys[p] for p in chosen) >= max(rest) - tol


# ----------------------------------------------------------------------------------------------- the reference
def reference_k(batch_size: int, rate: float) -> int:
    return int(batch_size * rate)


def reference_score(f: list[float], g: list[float]) -> float:
    return max(0.0, SCORE_SCALE * cos(f, g))


def per_sample_infonce(feats, logit_scale: float) -> list[float]:
    """The reference's eval_rank on one rank: (CE of the image row + CE of the text row) / 2 for every pair."""
    n = len(feats)
    sim = [[logit_scale * cos(feats[i][0], feats[j][1]) for j in range(n)] for i in range(n)]

    def ce(row: list[float], target: int) -> float:
        m = max(row)
        return -(row[target] - m - math.log(sum(math.exp(x - m) for x in row)))

    return [0.5 * (ce(sim[i], i) + ce([sim[j][i] for j in range(n)], i)) for i in range(n)]


class Reference:
    """One rank of the reference's training loop: ``step`` returns the keys the reference runs ``torch.topk`` on
    (None in a warm-up step, which trains on a random subset) and applies its dict updates."""

    def __init__(self, strategy: str, batch_size: int, rate: float, warmup_point: int = 0) -> None:
        self.strategy, self.k, self.W = strategy, reference_k(batch_size, rate), warmup_point
        self.warmup_score: dict[int, float] = {}  # read as 0 where never written
        self.hist_score: dict[int, float] = {}  # read as 0 where never written

    def step(self, epoch: int, ids: list[int], feats, logit_scale: float = SCORE_SCALE) -> list[float] | None:
        if self.strategy == "clipscore":
            return [SCORE_SCALE * cos(f, g) for f, g in feats]
        if self.strategy in ("small_loss", "big_loss"):
            loss = per_sample_infonce(feats, logit_scale)
            return [-x for x in loss] if self.strategy == "small_loss" else loss  # topk(largest=False) for small
        s = [reference_score(f, g) for f, g in feats]
        if self.strategy == "warmup_base_sampling":
            if epoch < self.W:
                for i, si in zip(ids, s):
                    self.warmup_score[i] = si
                return None
            w = [self.warmup_score.get(i, 0.0) for i in ids]
            mw, ms = sum(w) / len(w), sum(s) / len(s)
            return [(wi - mw) - (si - ms) for wi, si in zip(w, s)]
        if self.strategy == "historical_base_sampling":
            key = [self.hist_score.get(i, 0.0) - si for i, si in zip(ids, s)]
            for i, si in zip(ids, s):
                old = si if epoch == 0 else self.hist_score.get(i, 0.0)
                self.hist_score[i] = old * 0.9 + si * 0.1
            return key
        raise ValueError(self.strategy)


# ----------------------------------------------------------------------------------------------- the project
class Ours:
    """A Strategy driven the way the trainer drives it: the scoring pass only when needs_scoring, select, then
    update with the trained sub-batch's features."""

    def __init__(self, strategy: str, n: int, b: int, rate: float, path: str = "in-place", **cfg) -> None:
        self.cfg = SelectConfig(strategy=strategy, rate=rate, backend="torch", **cfg)
        gather = (lambda t: t) if path == "gathered" else None
        self.s = make_strategy(self.cfg, b, n, torch.device("cpu"), gather=gather)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, epoch: int, ids: list[int], feats, logit_scale: float = SCORE_SCALE):
        """(the trained positions, or None in a warm-up step; the Selection)."""
        f = torch.tensor([x for x, _ in feats], dtype=torch.float32)
        g = torch.tensor([y for _, y in feats], dtype=torch.float32)
        tid = torch.tensor(ids, dtype=torch.int64)
        scored = (f, g) if self.s.needs_scoring(epoch) else None
        self.s.begin_step()
        sel = self.s.select(epoch, tid, scored, torch.tensor(logit_scale), SCORE_SCALE, self.gen)
        index = torch.arange(len(ids)) if sel.index is None else sel.index
        self.s.update(epoch, sel, tid[index], (f[index], g[index]), SCORE_SCALE)
        self.s.commit_step(torch.tensor(True))
        in_warmup = hasattr(self.s, "in_warmup") and self.s.in_warmup(epoch)
        return (None if in_warmup else sel.index.tolist()), sel

    def history(self, i: int) -> float:
        assert self.s.history is not None
        return self.s.history.values[i].item()


def batch_feats(world: World, ids: list[int], epoch: int):
    return [world.feats(i, epoch) for i in ids]


# ----------------------------------------------------------------------------------------------- rate and ranking
@pytest.mark.parametrize(("rate", "b"), [(0.45, 8), (0.5, 7), (0.29, 100), (0.999, 10)])
def test_k_truncates_r_times_b_like_the_reference(rate, b):
    """r * B is not a whole number here (0.29 * 100 is 28.999... in floating point): the reference trains on
    int(B * r) pairs per step, which is 3, 3, 28 and 9, where rounding would give 4, 4, 29 and 10."""
    world = World(n=2 * b, b=b, seed=3, matched=0.3)
    ours, ref = Ours("clipscore", 2 * b, b, rate), Reference("clipscore", b, rate)
    for epoch in range(2):
        for ids in world.epoch_batches(epoch):
            feats = batch_feats(world, ids, epoch)
            picked, _ = ours.step(epoch, ids, feats)
            assert picked is not None and is_top_k(picked, ref.step(epoch, ids, feats), ref.k)
    assert ref.k != round(b * rate)  # the case tells truncation from rounding


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipscore_ranks_the_raw_cosine_like_the_reference(seed):
    """At random initialisation many pairs have a negative cosine; the reference ranks them by their raw score,
    while the clamped score would tie them at 0 and pick the first batch positions."""
    world = World(n=48, b=16, seed=seed, matched=0.0)  # an untrained model: about half the cosines are negative
    ours, ref = Ours("clipscore", 48, 16, 0.75), Reference("clipscore", 16, 0.75)
    steps = 0
    for epoch in range(2):
        for ids in world.epoch_batches(epoch):
            feats = batch_feats(world, ids, epoch)
            keys = ref.step(epoch, ids, feats)
            picked, _ = ours.step(epoch, ids, feats)
            assert picked is not None and is_top_k(picked, keys, ref.k, tol=1e-4)
            steps += 1
    assert steps == 6
    # some batch really has fewer than k = 12 positive pairs, or the test would not see the clamp
    assert sum(cos(*world.feats(i, 0)) < 0 for i in range(48)) > 3 * 4


@pytest.mark.parametrize("rule", ["small_loss", "big_loss"])
def test_loss_rules_rank_the_batch_loss_at_the_models_logit_scale(rule):
    """One rank, k = int(0.45 * 8) = 3, at three logit scales: the loss the rules rank depends on the scale (the
    reference's picks at 1 and at 100 differ on some step here), and the project follows the model's scale."""
    b, rate, scales = 8, 0.45, (1.0, 10.0, 100.0)
    world = World(n=32, b=b, seed=7)
    ours = {t: Ours(rule, 32, b, rate) for t in scales}
    ref = Reference(rule, b, rate)
    picks_by_scale: dict[float, list[set[int]]] = {t: [] for t in scales}
    for epoch in range(2):
        for ids in world.epoch_batches(epoch):
            feats = batch_feats(world, ids, epoch)
            for t in scales:
                keys = ref.step(epoch, ids, feats, logit_scale=t)
                assert keys is not None
                picked, _ = ours[t].step(epoch, ids, feats, logit_scale=t)
                assert picked is not None and is_top_k(picked, keys, ref.k, tol=1e-4), (t, picked, keys)
                picks_by_scale[t].append(set(picked))
    assert picks_by_scale[1.0] != picks_by_scale[100.0]


# ----------------------------------------------------------------------------------------------- dissect-warmup
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("warmup_train", ["random", "full"])
@pytest.mark.parametrize("W", [1, 3])
def test_dissect_warmup_matches_the_reference_with_every_epoch_recorded(seed, warmup_train, W):
    """With --warmup-record every, w is the reference's (each sample's last warm-up score, including samples epoch
    W-1 dropped); samples never scored keep w = 0 (key -s); the reference's mean-shifted key ranks like w - s."""
    n, b = 45, 8  # 45 = 5 batches of 8 + a dropped tail of 5 every epoch (W = 1: 5 samples never scored)
    world = World(n, b, seed)
    ours = Ours("dissect-warmup", n, b, 0.375, warmup_point=W, warmup_record="every", warmup_train=warmup_train)
    ref = Reference("warmup_base_sampling", b, 0.375, W)
    compared = 0
    for epoch in range(6):
        for ids in world.epoch_batches(epoch):
            feats = batch_feats(world, ids, epoch)
            keys = ref.step(epoch, ids, feats)
            picked, _ = ours.step(epoch, ids, feats)
            assert (picked is None) == (keys is None)
            if keys is not None:
                assert picked is not None and is_top_k(picked, keys, ref.k), (epoch, picked, keys)
                compared += 1
    assert compared == (6 - W) * 5


def test_never_scored_samples_get_w_zero_and_are_not_selected():
    """w = 0 for a sample without a warm-up score, so its key is -s (never the top)."""
    cfg = SelectConfig(strategy="dissect-warmup", rate=0.5, warmup_point=1, backend="torch")
    s = make_strategy(cfg, 4, 10, torch.device("cpu"))
    s.history.values[:] = torch.tensor([30.0, 30.0, 30.0] + [float("nan")] * 7)
    f = torch.eye(4, 6)
    g = torch.eye(4, 6) * 1.0 + 0.2  # every pair scores ~94 (positive): unseen key -94, seen keys 30 - 94
    sel = s.select(1, torch.tensor([3, 0, 1, 2]), (f, g), torch.tensor(SCORE_SCALE), SCORE_SCALE, torch.Generator())
    assert sorted(sel.index.tolist()) == [1, 2]  # ids 0 and 1 (seen); id 3 (unseen) would win with delta 0
    assert sel.delta[0].item() == pytest.approx(-sel.score[0].item())
    assert not torch.isnan(s.history.values).any()  # w frozen with 0 for the never-scored ids


def test_warmup_record_last_differs_only_on_samples_epoch_w_minus_1_dropped():
    """With the default --warmup-record last, w differs from the reference's exactly on the samples the last
    warm-up epoch did not score (the dropped tail), and their share is what the run reports."""
    n, b, W = 45, 8, 3
    world = World(n, b, seed=5)
    ours = Ours("dissect-warmup", n, b, 0.375, warmup_point=W)
    ref = Reference("warmup_base_sampling", b, 0.375, W)
    last_epoch_ids: set[int] = set()
    for epoch in range(W):
        for ids in world.epoch_batches(epoch):
            feats = batch_feats(world, ids, epoch)
            ours.step(epoch, ids, feats)
            ref.step(epoch, ids, feats)
            if epoch == W - 1:
                last_epoch_ids.update(ids)
    report = ours.s.epoch_metrics(W - 1, n)["select/warmup_unscored_fraction"]
    assert report == pytest.approx((n - len(last_epoch_ids)) / n)
    assert len(last_epoch_ids) < n  # the case has a dropped tail
    for i in range(n):
        if i in last_epoch_ids:
            assert ours.history(i) == pytest.approx(ref.warmup_score[i], abs=1e-3)
        else:
            assert math.isnan(ours.history(i)) and i in ref.warmup_score  # the reference kept an older score


# ----------------------------------------------------------------------------------------------- dissect-momentum
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_momentum_matches_the_reference_once_epoch_0_has_scored_every_sample(seed, path):
    """Whole batches (N = 5 B): epoch 0 scores every sample once, so the reference's epoch-0 overwrite (h <- s) and
    the project's first-sight rule (h <- s) leave the same h, and from epoch 1 on the keys h - s and the picks
    agree step for step. In epoch 0 itself the reference ranks -s (its dict starts at 0: the lowest scores win)
    while the project ranks 0 for every unseen sample: a documented difference."""
    n, b, rate = 40, 8, 0.45
    world = World(n, b, seed)
    ours, ref = Ours("dissect-momentum", n, b, rate, path=path), Reference("historical_base_sampling", b, rate)
    compared = epoch0_differs = 0
    for epoch in range(4):
        for ids in world.epoch_batches(epoch):
            feats = batch_feats(world, ids, epoch)
            keys = ref.step(epoch, ids, feats)
            picked, sel = ours.step(epoch, ids, feats)
            assert keys is not None and picked is not None and sel.delta is not None
            if epoch == 0:
                assert sel.delta.tolist() == [0.0] * b
                epoch0_differs += not is_top_k(picked, keys, ref.k)
                continue
            assert sel.delta.tolist() == pytest.approx(keys, abs=1e-3)
            assert is_top_k(picked, keys, ref.k), (epoch, picked, keys)
            compared += 1
        for i in range(n):
            assert ours.history(i) == pytest.approx(ref.hist_score[i], abs=1e-3), (epoch, i)
    assert compared == 15 and epoch0_differs > 0


@pytest.mark.parametrize("path", PATHS)
def test_momentum_first_sight_after_epoch_0_is_where_the_project_differs(path):
    """A dropped tail: 5 of 45 samples are not read in epoch 0. The reference then meets them with h = 0, so their
    key is -s and their first update h <- 0.9 * 0 + 0.1 * s; the project gives an unseen sample key 0 and
    h <- s. Samples epoch 0 scored follow the same rule in both; a batch of only such samples gets the same picks,
    and batches holding a late sample can pick differently (they do here)."""
    n, b, rate = 45, 8, 0.5
    world = World(n, b, seed=4)
    ours, ref = Ours("dissect-momentum", n, b, rate, path=path), Reference("historical_base_sampling", b, rate)
    seen_in_epoch_0: set[int] = set()
    seen: set[int] = set()
    shared_steps = differing_steps = late_first_sights = 0
    for epoch in range(4):
        for ids in world.epoch_batches(epoch):
            feats = batch_feats(world, ids, epoch)
            s = [reference_score(f, g) for f, g in feats]
            keys = ref.step(epoch, ids, feats)
            picked, sel = ours.step(epoch, ids, feats)
            assert keys is not None and picked is not None and sel.delta is not None
            if epoch == 0:
                seen_in_epoch_0.update(ids)
            else:
                for p, i in enumerate(ids):
                    if i in seen_in_epoch_0:  # the shared rule
                        assert sel.delta[p].item() == pytest.approx(keys[p], abs=1e-3)
                        assert ours.history(i) == pytest.approx(ref.hist_score[i], abs=1e-3)
                    elif i not in seen:  # first sight after epoch 0: key 0 vs -s, h <- s vs 0.1 s
                        assert sel.delta[p].item() - keys[p] == pytest.approx(s[p], abs=1e-3)
                        assert ours.history(i) == pytest.approx(10 * ref.hist_score[i], abs=1e-3)
                        late_first_sights += s[p] > 1.0
                if all(i in seen_in_epoch_0 for i in ids):
                    assert is_top_k(picked, keys, ref.k)
                    shared_steps += 1
                else:
                    differing_steps += not is_top_k(picked, keys, ref.k)
            seen.update(ids)
    assert len(seen_in_epoch_0) == 40 and late_first_sights > 0 and shared_steps > 0 and differing_steps > 0


@pytest.mark.parametrize("path", PATHS)
def test_momentum_on_a_resampled_epoch_0_the_reference_overwrites(path):
    """A sample read twice in epoch 0 (--dataset-resampled, or an epoch longer than the data): the reference's
    epoch-0 update overwrites h <- s at each reading, while the project blends the second reading into the first
    (h <- 0.9 s1 + 0.1 s2); the key at the second reading, h - s2 = s1 - s2, is the same in both."""
    b = 4
    rng = random.Random(9)
    ours, ref = Ours("dissect-momentum", 8, b, 0.5, path=path), Reference("historical_base_sampling", b, 0.5)
    first = [([rng.gauss(0, 1) for _ in range(D)], [rng.gauss(0, 1) for _ in range(D)]) for _ in range(b)]
    for i in range(b):
        first[i][1][:] = [x + 0.3 * y for x, y in zip(first[i][0], first[i][1])]  # positive scores
    second = [(first[0][0], first[0][0][:3] + [-x for x in first[0][0][3:]])] + [  # the same image, a new score
        ([rng.gauss(0, 1) for _ in range(D)], [rng.gauss(0, 1) for _ in range(D)]) for _ in range(b - 1)
    ]
    ours.step(0, [0, 1, 2, 3], first)
    ref.step(0, [0, 1, 2, 3], first)
    _, sel = ours.step(0, [0, 4, 5, 6], second)
    keys = ref.step(0, [0, 4, 5, 6], second)
    assert keys is not None and sel.delta is not None
    s1, s2 = reference_score(*first[0]), reference_score(*second[0])
    assert abs(s1 - s2) > 5.0  # the case shows the difference
    assert sel.delta[0].item() == pytest.approx(keys[0], abs=1e-3)
    assert ours.history(0) - ref.hist_score[0] == pytest.approx(0.9 * (s1 - s2), abs=1e-3)
    for i in (1, 2, 3):
        assert ours.history(i) == pytest.approx(ref.hist_score[i], abs=1e-3)


# ----------------------------------------------------------------------------------------------- in a real run
def _tiny_run(tiny_data, tmp_path, name, *extra):
    from dissect_fast.config import config_from_args
    from dissect_fast.training.loop import Trainer

    argv = [
        *("--train-data", str(tiny_data / "train"), "--model", "micro-rn", "--batch-size", "50"),
        *("--epochs", "2", "--workers", "0", "--logs", str(tmp_path), "--name", name, "--device", "cpu"),
        *("--no-progress", "--no-tensorboard", "--no-plots", "--save-frequency", "0"),
        *extra,
    ]
    t = Trainer(config_from_args(argv))
    return t, t.fit()


@pytest.mark.parametrize("record", ["last", "every"])
def test_run_reports_the_share_of_samples_without_a_warmup_score(tiny_data, tmp_path, record):
    """240 samples in batches of 50: every epoch drops 40. With --warmup-record last the 40 samples epoch W-1
    dropped have no w (1/6); with every, only those dropped in both warm-up epochs."""
    _, m = _tiny_run(
        tiny_data, tmp_path, record, "--select-strategy", "dissect-warmup", "--warmup-point", "2",
        "--warmup-record", record, "--epochs", "3",
    )  # fmt: skip
    share = m[1]["select/warmup_unscored_fraction"]
    assert "select/warmup_unscored_fraction" not in m[0] and "select/warmup_unscored_fraction" not in m[2]
    if record == "last":
        assert share == pytest.approx(40 / 240, abs=1e-5)
    else:
        assert share < 40 / 240


def test_score_precision_sets_the_scoring_autocast_and_refuses_low_precision_weights(tiny_data, tmp_path, capsys):
    from dissect_fast.config import config_from_args

    t, _ = _tiny_run(tiny_data, tmp_path, "bf16", "--select-strategy", "clipscore", "--score-precision", "bf16")
    assert t.forwards.scoring.precision == "amp_bf16" and t.forwards.precision == "fp32"
    argv = ["--train-data", str(tiny_data / "train"), "--model", "micro-rn", "--device", "cpu"]
    with pytest.raises(SystemExit):
        config_from_args([*argv, "--precision", "pure_bf16", "--score-precision", "fp32"])
    assert re.search("--score-precision fp32 needs float32 weights.*--precision pure_bf16", capsys.readouterr().err)
