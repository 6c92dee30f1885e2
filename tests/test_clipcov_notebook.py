"""CLIPCov's optional notebook score (``--clipcov-score notebook``, docs/clipcov-notebook.md).

The reference below transcribes the scoring loop of the paper's notebook (clip_core.ipynb in
BigML-CS-UCLA/clipcov-data-efficient-clip) in plain Python/numpy: dense per-class matrices,
one globally sorted list read from its end, re-sorted after a class's deductions. The
notebook's precomputed inputs (r, the class-centre and the label similarities) are built
here from their definitions in docs/clipcov-notebook.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dissect_fast.offline import (
    ClipCovConfig,
    Embeddings,
    EmbeddingWriter,
    clipcov_reference,
    clipcov_select,
    main_select_subset,
    select_subset,
)
from dissect_fast.offline.clipcov import label_similarity
from dissect_fast.offline.proxy import split_large_classes

F64 = {"dtype": "float64"}


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_data(n, d, classes, seed):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d))
    g = f + rng.normal(size=(n, d))
    labels = rng.integers(0, classes, n).astype(np.int64)
    names = rng.normal(size=(classes, d))
    return f, g, labels, names


def notebook_inputs(f, g, labels, ls):
    """The notebook's inputs, from their definitions: partition, A+ blocks, e, r, itc, tic, ls."""
    f, g = unit(f), unit(g)
    n = len(f)
    partition = {c: [i for i in range(n) if labels[i] == c] for c in sorted(set(labels.tolist()))}
    it_sims, easiness, r, itc, tic = {}, np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for c, idx in partition.items():
        A = f[idx] @ g[idx].T  # rows: images, columns: captions
        easiness[idx] = np.diag(A)
        it_sims[c] = A * (A > 0)  # the notebook's THRESHOLD = 0
        r[idx] = (it_sims[c].sum(1) + it_sims[c].sum(0)) / len(idx)
        itc[idx] = f[idx] @ unit(g[idx].mean(0))
        tic[idx] = g[idx] @ unit(f[idx].mean(0))
    return partition, it_sims, easiness, r, itc, tic, np.asarray(ls, dtype=np.float64)


def notebook_transcription(f, g, labels, ls, subset_size, round_size=200):
    """The notebook's selection loop, literally (its deductions, re-sorts and off-by-one)."""
    partition, it_sims, easiness, raw_r, itc_sim, tic_sim, renorm_ls = notebook_inputs(f, g, labels, ls)
    inverse_partition = {i: c for c, idx in partition.items() for i in idx}

    def cross_to_subset(c, subset):
        conv = [k for k, idx in enumerate(partition[c]) if idx in subset]
        return (np.sum(it_sims[c][:, conv], axis=1) + np.sum(it_sims[c][conv, :], axis=0)) / len(partition[c])

    def ls_of_subset(c, subset):
        return (np.sum(renorm_ls[subset]) / 2) / len(partition[c])

    scores = (raw_r + 2 * easiness + renorm_ls / 2) - (tic_sim + itc_sim)
    subset, gains = [], []
    counter = {c: 0 for c in partition}
    selected = {c: [] for c in partition}
    new_selected = {c: [] for c in partition}
    sorted_idx = np.argsort(scores, kind="stable")
    while len(sorted_idx) > 0 and len(subset) < subset_size:
        subset.append(int(sorted_idx[-1]))
        gains.append(scores[sorted_idx[-1]])
        c = inverse_partition[subset[-1]]
        selected[c].append(subset[-1])
        new_selected[c].append(subset[-1])
        counter[c] += 1
        if (counter[c] + 1) % round_size == 0:
            scores[partition[c]] -= cross_to_subset(c, new_selected[c])
            scores[partition[c]] -= np.sum(raw_r[selected[c]]) / len(partition[c])
            scores[partition[c]] -= ls_of_subset(c, new_selected[c])
            scores[subset] = -np.inf
            sorted_idx = np.argsort(scores, kind="stable")[len(subset) :]
            new_selected[c] = []
        else:
            sorted_idx = sorted_idx[:-1]
    return subset, gains


def own_label_sims(g, names, labels):
    return (unit(g) * unit(names)[labels]).sum(1)


# ---------------------------------------------------------------------------------------------
# The implementation against the transcription
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "n", "round_size"), [(0, 45, 3), (1, 60, 4), (2, 50, 1), (3, 40, 2), (4, 60, 200)])
def test_notebook_score_matches_transcription(seed, n, round_size):
    f, g, labels, names = make_data(n, 6, 3, seed)
    m = n // 2
    ls = label_similarity(g, names, labels, dtype=torch.float64)
    np.testing.assert_allclose(ls, own_label_sims(g, names, labels), atol=1e-12)
    want, want_gains = notebook_transcription(f, g, labels, ls, m, round_size)
    cfg = ClipCovConfig(score="notebook", notebook_round=round_size, **F64)
    res = clipcov_select(f, g, labels, m, cfg, label_sim=ls)
    assert res.positions.tolist() == want
    np.testing.assert_allclose(res.gains, want_gains, atol=1e-9)
    assert res.stats["score"] == "notebook" and res.stats["notebook_round"] == round_size
    if round_size < 200:  # the deductions ran and changed the choice vs the initial scores' top m
        assert res.stats["rescorings"] > 0
        no_rescore, _ = notebook_transcription(f, g, labels, ls, m, round_size=10**9)
        assert no_rescore != want
    else:  # 200 > any class here: no re-scoring, the top m of the initial score
        assert res.stats["rescorings"] == 0
    res32 = clipcov_select(f, g, labels, m, ClipCovConfig(score="notebook", notebook_round=round_size), label_sim=ls)
    assert res32.positions.tolist() == want  # float32 (the CLI default) picks the same here


def test_notebook_score_dense_and_rows_modes_agree():
    """Small ``block_bytes`` makes the classes' r use the streamed ("rows") path: same picks."""
    f, g, labels, names = make_data(300, 8, 3, 5)
    ls = own_label_sims(g, names, labels)
    want, _ = notebook_transcription(f, g, labels, ls, 120, 7)
    for block_bytes in (None, 1 << 16):
        cfg = ClipCovConfig(score="notebook", notebook_round=7, block_bytes=block_bytes, tile=16, **F64)
        assert clipcov_select(f, g, labels, 120, cfg, label_sim=ls).positions.tolist() == want


def test_select_subset_notebook_with_class_names_and_split_classes():
    """Zero-shot classes from the names; a split class's pieces keep their class name's ls."""
    f, g, _, names = make_data(90, 8, 3, 6)
    emb = Embeddings.from_arrays(np.arange(500, 590), f, g)
    labels = (unit(f) @ unit(names).T).argmax(1)
    ls = own_label_sims(g, names, labels)
    cfg = ClipCovConfig(score="notebook", notebook_round=3, **F64)
    res = select_subset(emb, "clipcov", 0.4, class_names_emb=names, config=cfg)
    want, _ = notebook_transcription(f, g, labels, ls, 36, 3)
    assert res.ids.tolist() == sorted(500 + i for i in want)
    assert res.clipcov_score == "notebook" and "notebook score" in res.summary()
    split, n_split = split_large_classes(labels, g, 20)
    assert n_split > 0
    cfg = ClipCovConfig(score="notebook", notebook_round=3, max_class_size=20, **F64)
    res = select_subset(emb, "clipcov", 0.4, class_names_emb=names, config=cfg)
    want, _ = notebook_transcription(f, g, split, ls, 36, 3)  # ls from the original classes
    assert res.ids.tolist() == sorted(500 + i for i in want) and res.stats["classes_split"] == n_split


@pytest.mark.parametrize(("n", "fraction"), [(45, 0.3), (70, 0.35), (100, 0.29)])
def test_notebook_budget_is_the_notebooks(n, fraction):
    """docs/clipcov-notebook.md, "The budget": the notebook stops at int(N * fraction) picks (13, 24 and 28 here:
    0.29 * 100 is 28.999... in floating point), and so does --clipcov-score notebook; the paper's score takes the
    nearest integer, floor(fraction * N + 0.5) (14, 25, 29)."""
    f, g, _, names = make_data(n, 8, 3, n)
    emb = Embeddings.from_arrays(np.arange(n), f, g)
    labels = (unit(f) @ unit(names).T).argmax(1)
    notebook_m = int(n * fraction)  # the notebook's subset_size = int(len(full) * fraction)
    want, _ = notebook_transcription(f, g, labels, own_label_sims(g, names, labels), notebook_m, 3)
    cfg = ClipCovConfig(score="notebook", notebook_round=3, **F64)
    ours = select_subset(emb, "clipcov", fraction, class_names_emb=names, config=cfg)
    assert ours.budget == notebook_m and ours.ids.tolist() == sorted(want)
    paper = select_subset(emb, "clipcov", fraction, class_names_emb=names, config=ClipCovConfig(**F64))
    assert paper.budget == notebook_m + 1


# ---------------------------------------------------------------------------------------------
# The default (the paper's objective) is unchanged
# ---------------------------------------------------------------------------------------------
# Picks of the code before the notebook option existed, on these exact inputs.
BEFORE_POSITIONS = [43, 46, 31, 58, 57, 8, 5, 51, 3, 26, 20, 29, 55, 19, 34, 45, 15, 10, 25, 41]
BEFORE_SUBSET_IDS = [1010, 1011, 1014, 1018, 1023, 1024, 1027, 1032, 1034, 1035, 1037, 1038, 1039, 1053, 1056]
BEFORE_SUBSET_IDS += [1057, 1068, 1071, 1073, 1074, 1076, 1080, 1081, 1084, 1087, 1100, 1106, 1112, 1114, 1117]


def test_default_is_the_paper_objective_unchanged():
    f, g, labels, _ = make_data(60, 8, 3, 7)
    assert ClipCovConfig().score == "paper" and ClipCovConfig().notebook_round == 200
    for cfg in (ClipCovConfig(), ClipCovConfig(score="paper"), ClipCovConfig(**F64)):
        assert clipcov_select(f, g, labels, 20, cfg).positions.tolist() == BEFORE_POSITIONS
    assert clipcov_reference(f, g, labels, 20, lazy=False).positions.tolist() == BEFORE_POSITIONS
    rng = np.random.default_rng(11)
    f = rng.normal(size=(120, 8))
    g = f + rng.normal(size=(120, 8))
    names = np.random.default_rng(12).normal(size=(3, 8)).astype(np.float32)
    emb = Embeddings.from_arrays(np.arange(1000, 1120), f.astype(np.float16), g.astype(np.float16))
    for kw in ({}, {"clipcov_score": "paper"}):
        res = select_subset(emb, "clipcov", 0.25, class_names_emb=names, **kw)
        assert res.ids.tolist() == BEFORE_SUBSET_IDS and res.clipcov_score == "paper"
        assert "CLIPCov objective F(S)" in res.summary()


# ---------------------------------------------------------------------------------------------
# Invalid combinations
# ---------------------------------------------------------------------------------------------
def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--approx factorized"):
        ClipCovConfig(score="notebook", approx="factorized")
    with pytest.raises(ValueError, match="--greedy lazy"):
        ClipCovConfig(score="notebook", algorithm="lazy")
    with pytest.raises(ValueError, match="--clipcov-score"):
        ClipCovConfig(score="nb")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="--notebook-round"):
            ClipCovConfig(score="notebook", notebook_round=bad)


def test_select_errors_name_the_flag():
    f, g, labels, names = make_data(30, 4, 3, 8)
    cfg = ClipCovConfig(score="notebook")
    with pytest.raises(ValueError, match="--class-names"):
        clipcov_select(f, g, labels, 5, cfg)
    with pytest.raises(ValueError, match=r"label_sim must be \[N=30\]"):
        clipcov_select(f, g, labels, 5, cfg, label_sim=np.zeros(29))
    with pytest.raises(ValueError, match="only used by the notebook score"):
        clipcov_select(f, g, labels, 5, ClipCovConfig(), label_sim=np.zeros(30))
    emb = Embeddings.from_arrays(np.arange(30), f, g)
    for kw in ({"clusters": 3}, {}):  # k-means proxy classes have no class names: refused
        with pytest.raises(ValueError, match="--clipcov-score notebook needs --class-names"):
            select_subset(emb, "clipcov", 0.5, clipcov_score="notebook", **kw)
    with pytest.raises(ValueError, match="only applies to --method clipcov"):
        select_subset(emb, "clipscore", 0.5, clipcov_score="notebook", class_names_emb=names)
    with pytest.raises(ValueError, match="--clipcov-score must be one of"):
        select_subset(emb, "clipcov", 0.5, clipcov_score="nb", class_names_emb=names)


# ---------------------------------------------------------------------------------------------
# The CLI, end to end on a tiny embeddings directory
# ---------------------------------------------------------------------------------------------
def test_cli_clipcov_score_notebook(tmp_path, capsys):
    f, g, _, names = make_data(90, 8, 3, 9)
    ids = np.random.default_rng(9).permutation(10_000)[:90].astype(np.int64)
    with EmbeddingWriter(tmp_path / "emb", 8, meta={"model": "test"}) as w:
        w.append(ids, f, g)  # stored as float16
    np.save(tmp_path / "names.npy", names.astype(np.float32))
    f16, g16 = np.load(tmp_path / "emb" / "image.npy"), np.load(tmp_path / "emb" / "text.npy")
    labels = (unit(f16) @ unit(names).T).argmax(1)
    want, _ = notebook_transcription(f16, g16, labels, own_label_sims(g16, names, labels), 36, 4)

    base = ["--embeddings", str(tmp_path / "emb"), "--method", "clipcov", "--fraction", "0.4", "--device", "cpu"]
    names_arg = ["--class-names", str(tmp_path / "names.npy")]
    out = tmp_path / "nb.npy"
    argv = base + names_arg + ["--clipcov-score", "notebook", "--notebook-round", "4", "--out", str(out)]
    assert main_select_subset(argv) == 0
    assert np.load(out).tolist() == sorted(ids[want].tolist())
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["clipcov_score"] == "notebook" and info["notebook_round"] == 4 and info["stats"]["rescorings"] > 0
    assert "CLIPCov notebook score" in capsys.readouterr().out

    paper = tmp_path / "paper.npy"  # default: the paper objective, recorded as such
    assert main_select_subset(base + names_arg + ["--out", str(paper)]) == 0
    info = json.loads(paper.with_suffix(".json").read_text())
    assert info["clipcov_score"] == "paper" and info["notebook_round"] is None

    bad = [
        (names_arg + ["--notebook-round", "5"], "--notebook-round only applies to --clipcov-score notebook"),
        (["--clusters", "3", "--clipcov-score", "notebook"], "--clipcov-score notebook needs --class-names"),
        (names_arg + ["--clipcov-score", "notebook", "--approx", "factorized"], "drop --approx factorized"),
        (names_arg + ["--clipcov-score", "notebook", "--greedy", "plain"], "--greedy plain"),
        (names_arg + ["--clipcov-score", "notebook", "--notebook-round", "0"], "--notebook-round"),
    ]
    capsys.readouterr()
    for extra, msg in bad:
        with pytest.raises(SystemExit) as e:
            main_select_subset(base + extra + ["--out", str(tmp_path / "x.npy")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    argv = base[:3] + ["clipscore"] + base[4:] + ["--clipcov-score", "notebook", "--out", str(tmp_path / "y.npy")]
    with pytest.raises(SystemExit):
        main_select_subset(argv)
    assert "only applies to --method clipcov" in capsys.readouterr().err
