"""Each strategy's selection on hand-made scores: ties, unseen (NaN) entries, k = 0 and k = B, aliases."""

import math

import pytest
import torch

from dissect_fast.config import ConfigError, SelectConfig
from dissect_fast.selection import strategies
from dissect_fast.selection.history import HistoryBuffer
from dissect_fast.selection.names import HISTORY_STRATEGIES, STRATEGIES, WARMUP_STRATEGIES
from dissect_fast.selection.strategies import make_strategy, per_sample_clip_loss, topk_positions


def feats_with_cos(cos):
    """Unit image/text features whose pairwise cosine is exactly `cos[i]` (2-D rotation)."""
    cos = torch.tensor(cos, dtype=torch.float32)
    f = torch.zeros(len(cos), 4)
    f[:, 0] = 1.0
    g = torch.zeros(len(cos), 4)
    g[:, 0] = cos
    g[:, 1] = torch.sqrt(1 - cos**2)
    return f, g


def test_names_and_aliases_resolve_to_names():
    """Every name, reference-code alias and other spelling: the one place --select-strategy is resolved."""
    reference = {
        "random": "random",
        "clipscore": "clipscore",
        "small_loss": "small_loss",
        "big_loss": "big_loss",
        "historical_base_sampling": "dissect-momentum",
        "warmup_base_sampling": "dissect-warmup",
        "ours": "dissect-warmup",  # the reference code's default --select-strategy
        "none": "full",
        "warmup_snapshot": "warmup-snapshot",
    }
    for given, name in [*reference.items(), *((n, n) for n in STRATEGIES)]:
        assert SelectConfig(strategy=given, warmup_point=1).strategy == name, given
    with pytest.raises(ConfigError, match="--select-strategy must be one of full, random, .* got 'bogus'"):
        SelectConfig(strategy="bogus")


def test_topk_ties_go_to_smaller_position():
    key = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk_positions(key, 3).tolist() == [1, 2, 4]
    assert topk_positions(key, 0).tolist() == []
    assert topk_positions(key, 5).tolist() == [1, 2, 4, 3, 0]


def make(strategy, B=5, num_ids=10, **kw):
    cfg = SelectConfig(strategy=strategy, **kw)
    return make_strategy(cfg, B, num_ids, torch.device("cpu")), cfg


def test_clipscore_keeps_highest_scores_with_ties():
    s, _ = make("clipscore", rate=0.6)  # k = 3
    f, g = feats_with_cos([0.1, 0.5, 0.3, 0.5, -0.2])
    sel = s.select(0, torch.arange(5), (f, g), torch.tensor(100.0), 100.0, None)
    assert sel.index.tolist() == [1, 3, 2]
    assert torch.allclose(sel.score, torch.tensor([10.0, 50.0, 30.0, 50.0, 0.0]), atol=1e-4)


def test_momentum_unseen_delta_zero_then_update():
    s, _ = make("dissect-momentum", rate=0.4, momentum=0.9)  # k = 2
    ids = torch.tensor([7, 2, 5, 0, 9])
    s.history.values[2] = 80.0  # seen: delta = 80 - 50 = 30
    s.history.values[0] = 10.0  # seen: delta = 10 - 20 = -10
    f, g = feats_with_cos([0.4, 0.5, 0.1, 0.2, 0.3])
    sel = s.select(3, ids, (f, g), torch.tensor(100.0), 100.0, None)
    # deltas: [0 (unseen), 30, 0 (unseen), -10, 0 (unseen)] -> 1, then the tie among 0s -> position 0
    assert sel.index.tolist() == [1, 0]
    assert torch.allclose(sel.delta, torch.tensor([0.0, 30.0, 0.0, -10.0, 0.0]), atol=1e-4)
    h = s.history.values
    assert math.isclose(h[7].item(), 40.0, abs_tol=1e-3)  # unseen: h <- s
    assert math.isclose(h[2].item(), 0.9 * 80 + 0.1 * 50, abs_tol=1e-3)
    assert math.isclose(h[0].item(), 0.9 * 10 + 0.1 * 20, abs_tol=1e-3)
    assert torch.isnan(h[1]) and torch.isnan(h[3])


@pytest.mark.parametrize("rate,k", [(1.0, 5), (0.1, 0)])
def test_k_extremes(rate, k):
    s, cfg = make("dissect-momentum", rate=rate)
    assert cfg.k(5) == k
    f, g = feats_with_cos([0.4, 0.5, 0.1, 0.2, 0.3])
    sel = s.select(0, torch.arange(5), (f, g), torch.tensor(100.0), 100.0, None)
    assert sel.index.shape == (k,)
    if k == 5:
        assert sorted(sel.index.tolist()) == [0, 1, 2, 3, 4]


def test_warmup_records_then_freezes():
    s, _ = make("dissect-warmup", rate=0.4, warmup_point=2)
    ids = torch.tensor([0, 1, 2, 3, 4])
    gen = torch.Generator().manual_seed(0)
    assert not s.needs_scoring(0)  # random warm-up epochs before W-1 skip the scoring pass
    sel0 = s.select(0, ids, None, torch.tensor(1.0), 100.0, gen)
    assert sel0.index.shape == (2,) and torch.isnan(s.history.values).all()
    assert s.needs_scoring(1)
    f, g = feats_with_cos([0.4, 0.5, 0.1, 0.2, 0.3])
    s.select(1, ids, (f, g), torch.tensor(1.0), 100.0, gen)  # last warm-up epoch: w <- s
    assert torch.allclose(s.history.values[:5], torch.tensor([40.0, 50.0, 10.0, 20.0, 30.0]), atol=1e-3)
    f2, g2 = feats_with_cos([0.1, 0.55, 0.15, 0.25, 0.3])  # after warm-up: delta = w - s, w frozen
    sel = s.select(2, ids, (f2, g2), torch.tensor(1.0), 100.0, gen)
    assert sel.index.tolist() == [0, 4]  # delta = [30, -5, -5, -5, 0]
    assert torch.allclose(s.history.values[:5], torch.tensor([40.0, 50.0, 10.0, 20.0, 30.0]), atol=1e-3)


def test_warmup_full_records_from_training_forward():
    s, _ = make("dissect-warmup", rate=0.4, warmup_point=2, warmup_train="full")
    assert s.trains_full_batch(0) and s.trains_full_batch(1) and not s.trains_full_batch(2)
    assert not s.needs_scoring(1)
    f, g = feats_with_cos([0.4, 0.5, 0.1, 0.2, 0.3])
    ids = torch.arange(5)
    s.observe(0, ids, (f, g), 100.0)
    assert torch.isnan(s.history.values).all()  # only epoch W-1 records
    s.observe(1, ids, (f, g), 100.0)
    assert torch.allclose(s.history.values[:5], torch.tensor([40.0, 50.0, 10.0, 20.0, 30.0]), atol=1e-3)


def test_loss_strategies_order_by_per_sample_loss():
    torch.manual_seed(0)
    f, g = torch.randn(6, 8), torch.randn(6, 8)
    g[2] = f[2] * 3  # pair 2 is the easiest: lowest loss
    loss = per_sample_clip_loss(f, g, torch.tensor(10.0))
    small, _ = make("small_loss", B=6, rate=0.5)
    big, _ = make("big_loss", B=6, rate=0.5)
    si = small.select(0, torch.arange(6), (f, g), torch.tensor(10.0), 100.0, None).index
    bi = big.select(0, torch.arange(6), (f, g), torch.tensor(10.0), 100.0, None).index
    assert si[0].item() == 2
    assert si.tolist() == torch.argsort(loss)[:3].tolist()
    assert bi.tolist() == torch.argsort(loss, descending=True)[:3].tolist()


def test_random_and_full():
    r, _ = make("random", B=10, rate=0.3)
    gen = torch.Generator().manual_seed(1)
    idx = r.select(0, torch.arange(10), None, torch.tensor(1.0), 100.0, gen).index
    assert idx.shape == (3,) and len(set(idx.tolist())) == 3
    full, _ = make("full", B=10)
    assert full.select(0, torch.arange(10), None, torch.tensor(1.0), 100.0, gen).index is None


def test_history_buffer_state_roundtrip_and_size_check():
    h = HistoryBuffer(6, "cpu")
    h.update(torch.tensor([1, 4]), torch.tensor([2.0, 3.0]), 0.5)
    h.update(torch.tensor([1]), torch.tensor([4.0]), 0.5)
    assert h.values[1].item() == 3.0 and h.values[4].item() == 3.0
    h2 = HistoryBuffer(6, "cpu")
    h2.load_state_dict(h.state_dict())
    assert torch.equal(torch.nan_to_num(h2.values, -1), torch.nan_to_num(h.values, -1))
    with pytest.raises(ValueError, match="same training data"):
        HistoryBuffer(5, "cpu").load_state_dict(h.state_dict())


def warmed_up_then_select(name):
    """A warm-up strategy at rate 0.4, W = 2: epoch 1 records w = [40, 50, 10, 20, 30], epoch 2 sees
    s = [10, 55, 20, 28, 30] (so w - s = [30, -5, -10, -8, 0]); returns (strategy, epoch-2 selection, feats)."""
    s, _ = make(name, rate=0.4, warmup_point=2)
    ids = torch.tensor([0, 1, 2, 3, 4])
    gen = torch.Generator().manual_seed(0)
    assert not s.needs_scoring(0) and s.needs_scoring(1) and s.needs_scoring(2)
    warm = s.select(0, ids, None, torch.tensor(1.0), 100.0, gen)  # a random k-subset, nothing recorded
    assert warm.index.shape == (2,) and torch.isnan(s.history.values[:5]).all()
    s.select(1, ids, feats_with_cos([0.4, 0.5, 0.1, 0.2, 0.3]), torch.tensor(1.0), 100.0, gen)  # w <- s
    f2, g2 = feats_with_cos([0.1, 0.55, 0.2, 0.28, 0.3])
    sel = s.select(2, ids, (f2, g2), torch.tensor(1.0), 100.0, gen)
    assert torch.allclose(sel.delta, torch.tensor([30.0, -5.0, -10.0, -8.0, 0.0]), atol=1e-3)
    assert torch.allclose(s.history.values[:5], torch.tensor([40.0, 50.0, 10.0, 20.0, 30.0]), atol=1e-3)  # frozen
    return s, sel, (f2, g2)


def test_gain_keeps_largest_score_rise_since_warmup():
    """dissect-gain: same warm-up record as dissect-warmup, then the largest s - w (the sign-flipped rule)."""
    s, sel, feats = warmed_up_then_select("dissect-gain")
    assert sel.index.tolist() == [2, 3]  # descending by gain
    # the published rule on the same scores picks the opposite end
    w, _ = make("dissect-warmup", rate=0.4, warmup_point=2)
    w.history.values.copy_(s.history.values)
    assert w.select(2, torch.arange(5), feats, torch.tensor(1.0), 100.0, None).index.tolist() == [0, 4]


def test_gain_unseen_sample_counts_as_zero_gain():
    s, _ = make("dissect-gain", rate=0.4, warmup_point=1)
    s.history.values[0] = 50.0  # gain -10; ids 1, 2 unseen -> gain 0; id 3 seen at 10 -> gain 20
    s.history.values[3] = 10.0
    f, g = feats_with_cos([0.4, 0.5, 0.1, 0.3])
    sel = s.select(1, torch.tensor([0, 1, 2, 3]), (f, g), torch.tensor(1.0), 100.0, None)
    assert sel.index.tolist() == [3, 1]


def test_warmup_clipscore_keeps_highest_current_score_after_warmup():
    """warmup-clipscore: dissect-warmup's warm-up and snapshot, then the top-k of the current score s, not of
    w - s; delta is still reported."""
    _, sel, _ = warmed_up_then_select("warmup-clipscore")
    assert sel.index.tolist() == [1, 4]  # the two largest current scores (55, 30)


def test_warmup_clipscore_full_warmup_trains_whole_batch():
    s, _ = make("warmup-clipscore", rate=0.4, warmup_point=1, warmup_train="full")
    f, g = feats_with_cos([0.4, 0.5, 0.1])
    assert s.trains_full_batch(0) and not s.trains_full_batch(1)
    sel = s.select(0, torch.tensor([0, 1, 2]), (f, g), torch.tensor(1.0), 100.0, None)
    assert sel.index is None
    assert torch.allclose(s.history.values[:3], torch.tensor([40.0, 50.0, 10.0]), atol=1e-3)


def test_warmup_snapshot_keeps_highest_warmup_score_without_a_scoring_pass():
    """warmup-snapshot: dissect-warmup's warm-up record, then the top-k of the frozen w; no scoring pass after the
    warm-up (the trained sub-batch's forward alone gives the diagnostics' scores)."""
    s, _ = make("warmup-snapshot", rate=0.4, warmup_point=2)
    ids = torch.tensor([0, 1, 2, 3, 4])
    s.select(1, ids, feats_with_cos([0.4, 0.5, 0.1, 0.2, 0.3]), torch.tensor(1.0), 100.0, None)  # w <- s
    assert not s.needs_scoring(2) and not s.needs_scoring(5)
    sel = s.select(2, torch.tensor([2, 4, 1, 0]), None, torch.tensor(1.0), 100.0, None)
    assert sel.index.tolist() == [2, 3]  # ids 1 (w 50) and 0 (w 40)
    assert sel.score is None and sel.scored_ids is None  # filled from the training forward by update()
    f, g = feats_with_cos([0.7, 0.6])
    sel = s.update(2, sel, torch.tensor([1, 0]), (f, g), 100.0)
    assert sel.scored_ids.tolist() == [1, 0] and torch.allclose(sel.score, torch.tensor([70.0, 60.0]), atol=1e-3)
    assert torch.allclose(s.history.values[:2], torch.tensor([40.0, 50.0]), atol=1e-3)  # w stays frozen


def test_warmup_snapshot_ranks_never_scored_samples_last():
    s, _ = make("warmup-snapshot", rate=0.5, warmup_point=1)
    s.history.values[:2] = torch.tensor([5.0, 0.0])
    sel = s.select(1, torch.tensor([7, 1, 8, 0]), None, torch.tensor(1.0), 100.0, None)
    assert sel.index.tolist() == [3, 1]  # w 5 and w 0 before the unseen ids 7 and 8


def test_the_light_name_lists_agree_with_the_strategy_classes():
    """selection/names.py declares the names without torch (for --help); the classes are what runs."""
    assert list(STRATEGIES) == list(strategies._CLASSES)
    warmup = tuple(n for n, c in strategies._CLASSES.items() if issubclass(c, strategies.DissectWarmup))
    assert WARMUP_STRATEGIES == warmup
    assert set(HISTORY_STRATEGIES) == {n for n, c in strategies._CLASSES.items() if c.uses_history}
