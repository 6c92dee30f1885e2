"""Offline subset selection: embeddings I/O, proxy classes, CLIPCov greedy variants, select-subset CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from dissect_fast.offline import (
    ClipCovConfig,
    Embeddings,
    EmbeddingsError,
    EmbeddingWriter,
    budget_for,
    clipcov_reference,
    clipcov_select,
    load_embeddings,
    main_select_subset,
    select_subset,
)
from dissect_fast.offline.clipcov import _dense_block, _streamed_r_sum, merge_sequences
from dissect_fast.offline.proxy import kmeans, split_large_classes

F64 = {"dtype": "float64"}


# ---------------------------------------------------------------------------------------------
# Brute force straight from the definition of F (METHOD.md), independent of the module's code
# ---------------------------------------------------------------------------------------------
def objective_from_definition(f, g, labels, S, clamp=True):
    """F(S) = sum_{i in S} u_i - sum_c 1/(2 n_c) sum_{i != j in S_c} (A+_ij + A+_ji)."""
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    total = 0.0
    for c in np.unique(labels):
        V = np.flatnonzero(labels == c)
        n_c = len(V)
        A = {(i, j): float(f[i] @ g[j]) for i in V for j in V}
        Ap = {k: (max(v, 0.0) if clamp else v) for k, v in A.items()}
        Sc = [i for i in S if labels[i] == c]
        for i in Sc:
            r = sum(Ap[i, j] + Ap[j, i] for j in V) / n_c
            total += r + 2 * A[i, i]
        total -= sum(Ap[i, j] + Ap[j, i] for i in Sc for j in Sc if i != j) / (2 * n_c)
    return total


def brute_force_greedy(f, g, labels, m, clamp=True):
    """Greedy that evaluates F(S + i) - F(S) from the definition for every candidate, every round."""
    S, gains = [], []
    for _ in range(m):
        base = objective_from_definition(f, g, labels, S, clamp)
        cand = [
            (objective_from_definition(f, g, labels, S + [i], clamp) - base, -i) for i in range(len(f)) if i not in S
        ]
        best, neg_i = max(cand)
        S.append(-neg_i), gains.append(best)
    return S, gains


def brute_force_optimum(f, g, labels, m, clamp=True):
    return max(
        objective_from_definition(f, g, labels, list(S), clamp) for S in itertools.combinations(range(len(f)), m)
    )


def make_data(n, d, classes, seed, noise=1.0, common=0.0):
    """Paired embeddings: g = f + noise; ``common`` adds a shared direction (all cosines > 0 when large)."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d))
    g = f + noise * rng.normal(size=(n, d))
    if common:
        f[:, 0] += common
        g[:, 0] += common
    labels = np.sort(rng.integers(0, classes, n)) if classes > 1 else np.zeros(n, dtype=np.int64)
    return f, g, labels.astype(np.int64)


def greedy_all(f, g, labels, m, approx="exact", **cfg):
    """Positions picked (in order) by the merge, plain and (exact only) lazy implementations."""
    out = {
        "merge": clipcov_select(f, g, labels, m, ClipCovConfig(approx=approx, **F64, **cfg)),
        "plain": clipcov_reference(f, g, labels, m, approx, lazy=False),
    }
    if approx == "exact":
        out["lazy"] = clipcov_reference(f, g, labels, m, approx, lazy=True)
    return out


# ---------------------------------------------------------------------------------------------
# CLIPCov
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approx", ["exact", "factorized"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_brute_force_greedy(approx, seed):
    f, g, labels = make_data(10, 4, classes=2 + seed % 2, seed=seed)
    m = 6
    S_bf, gains_bf = brute_force_greedy(f, g, labels, m, clamp=approx == "exact")
    for name, res in greedy_all(f, g, labels, m, approx).items():
        assert res.positions.tolist() == S_bf, name  # same picks in the same order
        np.testing.assert_allclose(res.gains, gains_bf, rtol=1e-9, atol=1e-9, err_msg=name)
        assert res.objective == pytest.approx(objective_from_definition(f, g, labels, S_bf, approx == "exact"))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_is_optimal_for_m1_and_modular_objectives(seed):
    # m = 1: greedy takes argmax_i F({i}) = the optimum
    f, g, labels = make_data(9, 3, classes=2, seed=seed)
    res = clipcov_select(f, g, labels, 1, ClipCovConfig(**F64))
    assert res.objective == pytest.approx(brute_force_optimum(f, g, labels, 1))
    # modular F: orthogonal embeddings inside each class make A_ij = 0 for i != j, so there is
    # no pairwise term (F(S) = sum of u_i, some negative) and greedy is optimal for every m
    rng = np.random.default_rng(seed)
    n, d = 8, 8
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    f = np.linalg.qr(rng.normal(size=(d, d)))[0] * rng.uniform(0.5, 2, size=(n, 1))
    g = f * np.where(np.arange(n) % 3 == 0, -1.0, 1.0)[:, None]
    for m in range(1, n + 1):
        ours = clipcov_select(f, g, labels, m, ClipCovConfig(**F64)).objective
        assert ours == pytest.approx(brute_force_optimum(f, g, labels, m), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_within_1_minus_1_over_e_of_brute_force_optimum(seed):
    # all e_i > 0 makes F monotone (gains >= 2 e_i): the (1 - 1/e) guarantee applies
    f, g, labels = make_data(11, 5, classes=2, seed=seed, noise=0.4)
    assert (np.einsum("ij,ij->i", f, g) > 0).all()
    for m in (2, 4, 6):
        ours = clipcov_select(f, g, labels, m, ClipCovConfig(**F64)).objective
        best = brute_force_optimum(f, g, labels, m)
        assert best >= ours - 1e-9
        assert ours >= (1 - 1 / math.e) * best


def test_lazy_and_plain_greedy_pick_the_same_set():
    f, g, labels = make_data(300, 16, classes=5, seed=7)
    for m in (1, 37, 150, 300):
        plain = clipcov_reference(f, g, labels, m, lazy=False)
        lazy = clipcov_reference(f, g, labels, m, lazy=True)
        assert plain.positions.tolist() == lazy.positions.tolist()
        if m > 1:
            assert lazy.stats["evaluations"] < plain.stats["evaluations"]
    with pytest.raises(ValueError, match="submodular"):
        clipcov_reference(f, g, labels, 5, "factorized", lazy=True)


def test_running_minimum_merge_equals_literal_greedy_merge():
    rng = np.random.default_rng(1)
    for _ in range(300):
        seqs = [rng.normal(size=rng.integers(1, 7)) for _ in range(rng.integers(1, 5))]
        heads, literal = [0] * len(seqs), []
        for _ in range(sum(len(x) for x in seqs)):
            c = max((seqs[c][heads[c]], c) for c in range(len(seqs)) if heads[c] < len(seqs[c]))[1]
            literal.append((c, heads[c]))
            heads[c] += 1
        m = int(rng.integers(1, len(literal) + 1))
        top, which = merge_sequences(seqs, m)
        steps = np.concatenate([np.arange(len(x)) for x in seqs])[top]
        assert list(zip(which.tolist(), steps.tolist())) == literal[:m]


@pytest.mark.parametrize("approx", ["exact", "factorized"])
def test_per_class_merge_equals_global_greedy(approx):
    # imbalanced classes; no extra picks forces reruns; a 512 KiB budget forces the
    # "rows" path for the biggest class
    rng = np.random.default_rng(3)
    sizes = [5, 40, 160, 300]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n, d = len(labels), 32
    f = rng.normal(size=(n, d)) + 2.0 * (labels[:, None] == 3)  # class 3: high cross-cosines
    g = f + rng.normal(size=(n, d))
    for m, cfg in [
        (3, {"extra_picks": 0}),
        (120, {"extra_picks": 0, "block_bytes": 1 << 19, "tile": 64}),
        (400, {"slack": 2.0}),
        (n, {}),
    ]:
        res = greedy_all(f, g, labels, m, approx, **cfg)
        ref = res["plain"]
        assert res["merge"].positions.tolist() == ref.positions.tolist(), (m, cfg)
        np.testing.assert_allclose(res["merge"].gains, ref.gains, rtol=1e-9, atol=1e-12)
        if m == 3:
            assert res["merge"].stats["rounds"] > 1  # the rerun path ran
        if "block_bytes" in cfg:
            assert res["merge"].stats["classes_rows"] >= 1 and res["merge"].stats["classes_dense"] >= 1


def test_merge_float32_matches_reference_and_exact_objective():
    f, g, labels = make_data(500, 24, classes=6, seed=11)
    ref = clipcov_reference(f, g, labels, 150, lazy=True)
    res = clipcov_select(f.astype(np.float16), g.astype(np.float16), labels, 150, ClipCovConfig())
    overlap = len(set(ref.positions) & set(res.positions)) / 150
    assert overlap > 0.97  # fp16 storage + fp32 compute may flip near-ties only
    assert res.objective == pytest.approx(ref.objective, rel=1e-3)


def test_factorized_equals_exact_when_nothing_is_clamped():
    f, g, labels = make_data(200, 8, classes=3, seed=5, noise=0.3, common=6.0)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    assert (fn @ gn.T).min() > 0  # no entry of A is clamped
    m = 80
    ex = clipcov_select(f, g, labels, m, ClipCovConfig(approx="exact", **F64))
    fa = clipcov_select(f, g, labels, m, ClipCovConfig(approx="factorized", **F64))
    assert ex.positions.tolist() == fa.positions.tolist()
    np.testing.assert_allclose(ex.gains, fa.gains, rtol=1e-10)
    # and the gains of the factorised path are O(d) sums: <f_i, G_c> + <F_c, g_i>
    idx = labels == 0
    A = fn[idx] @ gn[idx].T
    r_fact = (fn[idx] @ gn[idx].sum(0) + gn[idx] @ fn[idx].sum(0)) / idx.sum()
    np.testing.assert_allclose(r_fact, (A.sum(1) + A.sum(0)) / idx.sum(), rtol=1e-12)
    # with clamped entries they differ
    f2, g2, l2 = make_data(200, 8, classes=3, seed=5)
    ex2 = clipcov_select(f2, g2, l2, m, ClipCovConfig(approx="exact", **F64))
    fa2 = clipcov_select(f2, g2, l2, m, ClipCovConfig(approx="factorized", **F64))
    assert ex2.objective != pytest.approx(fa2.objective)


@pytest.mark.parametrize("n,tile", [(1, 16), (7, 16), (40, 16), (33, 32)])
def test_tiled_class_blocks_match_full_matrix(n, tile):
    rng = np.random.default_rng(n)
    f = torch.from_numpy(rng.normal(size=(2, n, 5)))
    g = torch.from_numpy(rng.normal(size=(2, n, 5)))
    Ap = (f @ g.transpose(1, 2)).clamp_min(0)
    P = Ap + Ap.transpose(1, 2)
    torch.testing.assert_close(_dense_block(f, g, tile), P)
    torch.testing.assert_close(_streamed_r_sum(f, g, tile), P.sum(2))
    A = f @ g.transpose(1, 2)
    torch.testing.assert_close(_dense_block(f, g, tile, clamp=False), A + A.transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_on_cuda_matches_cpu():
    f, g, labels = make_data(3000, 64, classes=9, seed=2)
    for approx in ("exact", "factorized"):
        cpu = clipcov_select(f, g, labels, 900, ClipCovConfig(approx=approx, **F64))
        gpu = clipcov_select(f, g, labels, 900, ClipCovConfig(approx=approx, device="cuda", **F64))
        assert cpu.positions.tolist() == gpu.positions.tolist()


# ---------------------------------------------------------------------------------------------
# Proxy classes
# ---------------------------------------------------------------------------------------------
def test_kmeans_recovers_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    centers = np.linalg.qr(rng.normal(size=(16, 4)))[0].T  # 4 orthogonal directions
    truth = rng.integers(0, 4, 2000)
    x = (centers[truth] + 0.1 * rng.normal(size=(2000, 16))).astype(np.float16)
    lab, _cent = kmeans(x, 4, seed=1, fit_samples_per_center=100)
    # a bijection between clusters and blobs
    pairs = set(zip(truth.tolist(), lab.tolist()))
    assert len(pairs) == 4 and len({t for t, _ in pairs}) == 4 and len({c for _, c in pairs}) == 4
    assert (kmeans(x, 4, seed=1, fit_samples_per_center=100)[0] == lab).all()


def test_split_large_classes_caps_sizes_and_keeps_small_ones():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 1000 + [1] * 30 + [2] * 7)
    text = rng.normal(size=(len(labels), 8))
    new, n_split = split_large_classes(labels, text, max_size=128)
    counts = np.bincount(new)
    assert n_split == 1 and counts.max() <= 128 and counts[counts > 0].min() >= 7
    assert (new[1000:] == labels[1000:]).all()  # small classes untouched
    assert set(np.unique(new[:1000])) & {1, 2} == set()  # pieces never merge into other classes


def test_split_several_interleaved_large_classes():
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat([0, 1, 2, 3], [500, 9, 300, 260]))
    new, n_split = split_large_classes(labels, rng.normal(size=(len(labels), 6)), max_size=100)
    counts = np.bincount(new)
    assert n_split == 3 and counts.max() <= 100 and counts[np.unique(new[labels != 1])].min() >= 50
    assert (new[labels == 1] == 1).all() and counts[1] == 9
    for c in (0, 2, 3):  # each big class becomes pieces that hold exactly its members
        pieces = np.unique(new[labels == c])
        assert np.isin(new, pieces).sum() == (labels == c).sum()


# ---------------------------------------------------------------------------------------------
# Embeddings directory
# ---------------------------------------------------------------------------------------------
def _batches(n, d, b, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    img, txt = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
    return [(ids[a : a + b], img[a : a + b], txt[a : a + b]) for a in range(0, n, b)], ids, img, txt


def test_writer_reader_round_trip(tmp_path):
    batches, ids, img, txt = _batches(103, 12, 10)
    meta = {"model": "RN50", "checkpoint": "ck.pt"}
    with EmbeddingWriter(tmp_path / "emb", 12, capacity=16, meta=meta) as w:  # grows 16 -> 128, trimmed
        for k, (i, a, b) in enumerate(batches):
            if k % 2:  # torch bf16 input works too
                a, b = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
            w.append(i, a, b)
    emb = load_embeddings(tmp_path / "emb")
    assert len(emb) == 103 and emb.dim == 12 and emb.image.dtype == np.float16
    assert emb.meta["model"] == "RN50" and emb.meta["count"] == 103 and emb.meta["dtype"] == "float16"
    assert (emb.ids == ids).all()
    np.testing.assert_allclose(emb.image, img, atol=2e-2, rtol=1e-2)  # bf16 batches: ~3 digits
    np.testing.assert_allclose(emb.text[::2], txt[::2], atol=2e-2, rtol=1e-2)
    assert np.load(tmp_path / "emb" / "image.npy").shape == (103, 12)  # trimmed: plain np.load works


def test_writer_resume_after_crash(tmp_path):
    batches, ids, img, _txt = _batches(50, 4, 10)
    w = EmbeddingWriter(tmp_path, 4, capacity=50, flush_every=10**9)
    w.append(*batches[0]), w.append(*batches[1])
    w.flush()
    w.append(*batches[2])  # written but never flushed: lost by the "crash"
    del w
    w = EmbeddingWriter(tmp_path, 4)
    assert w.count == 20
    assert w.done_mask(ids).tolist() == [True] * 20 + [False] * 30
    with pytest.raises(EmbeddingsError, match="duplicate"):
        w.append(*batches[1])
    for i, a, b in batches[2:]:
        keep = ~w.done_mask(i)
        w.append(i[keep], a[keep], b[keep])
    w.close()
    emb = load_embeddings(tmp_path)
    assert (emb.ids == ids).all() and np.allclose(emb.image, img, atol=1e-2)
    with pytest.raises(EmbeddingsError, match="dim"):
        EmbeddingWriter(tmp_path, 8)


def test_reader_validates(tmp_path):
    batches, *_ = _batches(20, 4, 10)
    with EmbeddingWriter(tmp_path, 4) as w:
        for bt in batches:
            w.append(*bt)
    ids = np.load(tmp_path / "ids.npy")
    ids[5] = ids[3]
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(EmbeddingsError, match="duplicate"):
        load_embeddings(tmp_path)
    np.save(tmp_path / "ids.npy", np.arange(10))
    with pytest.raises(EmbeddingsError, match="ids.npy"):
        load_embeddings(tmp_path)
    with pytest.raises(EmbeddingsError, match="not an embeddings directory"):
        load_embeddings(tmp_path / "nope")
    with pytest.raises(EmbeddingsError, match="shape"):
        EmbeddingWriter(tmp_path / "x", 4).append([1, 2], np.zeros((2, 3)), np.zeros((2, 4)))


# ---------------------------------------------------------------------------------------------
# select_subset and the CLI
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def emb():
    f, g, _ = make_data(400, 16, classes=1, seed=0)
    ids = np.random.default_rng(0).permutation(100_000)[:400]
    return Embeddings.from_arrays(ids, f.astype(np.float16), g.astype(np.float16), {"model": "test"})


def test_random_and_clipscore_subsets(emb):
    r1 = select_subset(emb, "random", 0.25, seed=3)
    assert len(r1.ids) == 100 and len(np.unique(r1.ids)) == 100 and np.isin(r1.ids, emb.ids).all()
    assert (np.diff(r1.ids) > 0).all() and r1.ids.dtype == np.int64
    assert (select_subset(emb, "random", 0.25, seed=3).ids == r1.ids).all()
    assert not (select_subset(emb, "random", 0.25, seed=4).ids == r1.ids).all()
    cs = select_subset(emb, "clipscore", 0.25)
    f, g = emb.image.astype(np.float64), emb.text.astype(np.float64)
    cos = (f * g).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(g, axis=1)
    assert set(cs.ids) == set(emb.ids[np.argsort(-cos)[:100]])
    assert cs.mean_clipscore_subset > cs.mean_clipscore_all > r1.mean_clipscore_subset - 10
    assert cs.class_counts is None  # no proxy classes asked for


def test_clipcov_subset_with_class_names_and_clusters(emb):
    names = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    res = select_subset(emb, "clipcov", 0.3, class_names_emb=names)
    assert len(res.ids) == 120 and res.class_counts.sum() == 120 and res.class_sizes.sum() == 400
    assert res.class_source == "class-names" and res.objective is not None
    res2 = select_subset(emb, "clipcov", 0.3, clusters=4, approx="factorized")
    assert res2.class_source == "kmeans-4" and len(res2.ids) == 120
    assert select_subset(emb, "clipcov", 1.0).ids.tolist() == sorted(emb.ids.tolist())
    with pytest.raises(ValueError, match="not both"):
        select_subset(emb, "clipcov", 0.3, class_names_emb=names, clusters=3)
    with pytest.raises(ValueError, match=r"\[C, 16\]"):
        select_subset(emb, "clipcov", 0.3, class_names_emb=names[:, :8])


def test_select_subset_leaves_float32_arrays_untouched():
    f, g, _ = make_data(300, 8, classes=1, seed=3)
    f32, g32 = f.astype(np.float32), g.astype(np.float32)
    emb = Embeddings.from_arrays(np.arange(300), f32.copy(), g32.copy())
    a = select_subset(emb, "clipcov", 0.2, clusters=3)
    b = select_subset(Embeddings.from_arrays(np.arange(300), f32 * 5, g32 * 0.1), "clipcov", 0.2, clusters=3)
    assert (emb.image == f32).all() and (emb.text == g32).all()  # normalised copies, never in place
    assert (a.ids == b.ids).all()  # scale-invariant: embeddings are normalised before use


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, float("nan"), "0.3", 1e-4])
def test_invalid_fraction_errors(emb, bad):
    with pytest.raises(ValueError, match="fraction"):
        select_subset(emb, "random", bad)


def test_budget_rounding():
    assert budget_for(0.29, 100) == 29 and budget_for(0.3, 10) == 3 and budget_for(0.25, 10) == 3
    assert budget_for(1.0, 7) == 7 and budget_for(0.5, 1) == 1


def test_cli_select_subset(tmp_path, emb, capsys):
    with EmbeddingWriter(tmp_path / "emb", 16, meta={"model": "test"}) as w:
        w.append(emb.ids, emb.image, emb.text)
    names = tmp_path / "names.npy"
    np.save(names, np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32))
    out = tmp_path / "sub" / "subset.npy"
    args = ["--embeddings", str(tmp_path / "emb"), "--method", "clipcov", "--fraction", "0.2"]
    assert main_select_subset(args + ["--class-names", str(names), "--device", "cpu", "--out", str(out)]) == 0
    ids = np.load(out)
    assert ids.dtype == np.int64 and len(ids) == 80 and (np.diff(ids) > 0).all() and np.isin(ids, emb.ids).all()
    printed = capsys.readouterr().out
    assert "chose 80 of 400" in printed and "mean CLIPScore" in printed and "proxy classes (class-names)" in printed
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["budget"] == 80 and sum(info["class_counts"]) == 80 and info["method"] == "clipcov"
    lazy = tmp_path / "lazy.npy"  # the float64 lazy-greedy reference picks the same set
    assert main_select_subset(args + ["--class-names", str(names), "--greedy", "lazy", "--out", str(lazy)]) == 0
    assert (np.load(lazy) == ids).all() and json.loads(lazy.with_suffix(".json").read_text())["greedy"] == "lazy"
    with pytest.raises(SystemExit) as e:
        main_select_subset(args[:-1] + ["1.5", "--out", str(out)])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main_select_subset(args + ["--class-names", str(tmp_path / "names.txt"), "--out", str(out)])
    assert "dissect-fast embed --class-names" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The whole offline workflow: embed -> select-subset -> train with --subset (both loaders)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def subset_file(tiny_data, tmp_path_factory):
    """`dissect-fast embed` of tiny_data with a random-init micro-vit, then a clipcov 50% subset."""
    from dissect_fast.model import create_model
    from dissect_fast.offline.embed import main_embed

    root = tmp_path_factory.mktemp("offline")
    torch.manual_seed(0)
    model = create_model("micro-vit", torch.device("cpu"))[0]
    torch.save({"state_dict": model.state_dict(), "model_name": "micro-vit"}, root / "ref.pt")
    args = ["--checkpoint", str(root / "ref.pt"), "--data", str(tiny_data / "train"), "--out", str(root / "emb"),
            "--device", "cpu", "--batch-size", "64", "--workers", "0"]  # fmt: skip
    (root / "names.txt").write_text("circle\nsquare\n\ntriangle\n")
    assert main_embed(args + ["--class-names", str(root / "names.txt")]) == 0
    emb = load_embeddings(root / "emb")
    assert len(emb) == 240 and sorted(emb.ids.tolist()) == list(range(240)) and emb.dim == 32
    assert np.load(root / "emb" / "class_names.npy").shape == (3, 32)  # blank lines skipped
    norms = np.linalg.norm(emb.image.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # stored normalised, fp16
    before = emb.image.copy()
    assert main_embed(args) == 0  # resume: nothing left to embed, nothing rewritten
    emb2 = load_embeddings(root / "emb")
    assert len(emb2) == 240 and (emb2.image == before).all()
    with pytest.raises(SystemExit):  # resuming with another on-disk dtype is a clear CLI error
        main_embed(args + ["--dtype", "float32"])
    out = root / "subset.npy"
    assert main_select_subset(["--embeddings", str(root / "emb"), "--method", "clipcov", "--fraction", "0.5",
                               "--class-names", str(root / "emb" / "class_names.npy"), "--device", "cpu",
                               "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.with_suffix(".json").read_text())["class_source"] == "class-names"
    ids = np.load(out)
    assert len(ids) == 120 and np.isin(ids, np.arange(240)).all()
    return out


@pytest.mark.parametrize(
    "backend,strategy", [("torch", ["--select-strategy", "full"]), ("dali", ["--select-strategy", "dissect-momentum"])]
)
def test_subset_file_round_trips_into_trainer(tiny_data, subset_file, tmp_path, backend, strategy):
    from dissect_fast.config import config_from_args
    from dissect_fast.data.dali_loader import dali_unavailable_reason
    from dissect_fast.training.loop import Trainer

    if backend == "dali" and dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    argv = ["--train-data", str(tiny_data / "train"), "--model", "micro-vit", "--batch-size", "20", "--epochs", "2",
            "--lr", "1e-3", "--warmup", "2", "--workers", "0", "--logs", str(tmp_path), "--name", backend,
            "--no-progress", "--no-tensorboard", "--no-plots", "--device", "cpu", "--data-backend", backend,
            "--select-rate", "0.5", "--subset", str(subset_file), *strategy]  # fmt: skip
    t = Trainer(config_from_args(argv))
    assert t.data_backend == backend and t.num_samples == 120 and t.steps_per_epoch == 6
    seen: list[int] = []
    step = t.train_step

    def recording_step(epoch, images, tokens, ids):
        seen.extend(ids.tolist())
        return step(epoch, images, tokens, ids)

    t.train_step = recording_step
    metrics = t.fit()
    subset = set(np.load(subset_file).tolist())
    assert len(seen) == 2 * 6 * 20 and set(seen) <= subset  # only subset ids are ever loaded
    assert len(set(seen)) >= 100  # and (nearly) all of them: an epoch drops at most the shard tails
    assert metrics[-1]["select/trained_samples"] == 6 * (20 if strategy[-1] == "full" else 10)
