"""Static compiled graphs (issue 23): with --compile, every forward (training, --accum-freq's no-grad pass, scoring)
gets one static graph per batch shape it sees, compiled at the first step of that shape and never again.

A recording torch.compile backend (``model.COMPILE_BACKEND``) notes each graph Dynamo hands over: its frame, the
step it was compiled at, its image batch size and whether any input is symbolic; it then compiles the graph with
``aot_eager`` (forward and backward through AOTAutograd, fast on two cores) or, in the slow test, inductor.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny_run import tiny_trainer

import dissect_fast.model as model_mod

#: --warmup-train full (README's advice for warmup-clipscore): one epoch (6 steps) trains on the whole batch B = 40,
#: then 6 steps train the selected k = 8
WARMUP_FULL = (
    "--select-strategy",
    "warmup-clipscore",
    "--select-rate",
    "0.2",
    "--warmup-point",
    "1",
    "--warmup-train",
    "full",
)
IMAGE_INPUTS = ("l_image_", "l_images_")  #: the image argument's placeholder (open_clip's CLIP / our modules)


def _symbolic(v) -> bool:
    if isinstance(v, torch.SymInt):
        return True
    return isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape)


class GraphRecorder:
    """A torch.compile backend: records (frame id, trainer step, image batch size, symbolic?) per graph, then
    compiles it with ``inner`` (aot_eager or inductor's compile_fx)."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.inner = inner
        self.trainer = None
        self.graphs: list[dict] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = [n.meta.get("example_value") for n in inputs]
        images = [n.meta["example_value"] for n in inputs if n.name in IMAGE_INPUTS]
        cid = torch._guards.CompileContext.current_compile_id()
        self.graphs.append(
            {
                "frame": cid.frame_id if cid is not None else None,
                "step": self.trainer.step if self.trainer is not None else None,
                "batch": images[0].shape[0] if images else None,
                "symbolic": any(_symbolic(v) for v in values) or any(_symbolic(x) for x in example_inputs),
            }
        )
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)


@pytest.fixture
def recorder(monkeypatch):
    """A fresh Dynamo (no graphs or counters left by other tests) with the recording backend in place."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    rec = GraphRecorder()
    monkeypatch.setattr(model_mod, "COMPILE_BACKEND", rec)
    yield rec
    torch._dynamo.reset()  # the cached graphs hold the run's model


def _fit(tmp_path, name: str, data, *flags: str, recorder: GraphRecorder | None = None) -> list[float]:
    """The per-epoch training losses of a tiny run (--compile when a recorder is given)."""
    t = tiny_trainer(tmp_path, name, *flags, *(["--compile"] if recorder is not None else []), data=data)
    if recorder is not None:
        recorder.trainer = t
    t.fit()
    return [m["train_loss"] for m in t.metrics]


def _check_static(rec: GraphRecorder, expected: list[tuple[int, int]]) -> None:
    """No graph break, no symbolic input, one graph per (frame, batch size), each compiled at the first step of its
    shape: the compiles, as (step, batch size), are exactly ``expected``."""
    from torch._dynamo.utils import counters

    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert [g for g in rec.graphs if g["symbolic"]] == [], rec.graphs
    per_shape = Counter((g["frame"], g["batch"]) for g in rec.graphs)
    assert max(per_shape.values()) == 1, f"a frame recompiled at a shape it had already compiled: {rec.graphs}"
    assert sorted((g["step"], g["batch"]) for g in rec.graphs) == sorted(expected), rec.graphs
    assert counters["stats"]["unique_graphs"] == len(expected)


def test_warmup_full_then_select_has_one_static_graph_per_shape(tmp_path, tiny_data, recorder):
    """B = 40 in the warm-up epoch, then k = 8: the training forward's two static graphs (step 0 and the first
    selected step 6) and the scoring pass's one at B (step 6: the warm-up scores with the training forward); no
    dynamic graph after the switch, no recompile in the 5 steps after it; the loss is eager's."""
    compiled = _fit(tmp_path, "compiled", tiny_data, *WARMUP_FULL, recorder=recorder)
    _check_static(recorder, [(0, 40), (6, 40), (6, 8)])
    eager = _fit(tmp_path, "eager", tiny_data, *WARMUP_FULL)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_accum_freq_2_has_no_grad_mode_recompile(tmp_path, tiny_data, recorder):
    """--accum-freq 2 runs the training forward without grad (the cached features) and with grad: two frames,
    each with one static graph per shape (B in the warm-up epoch's 3 steps, k from step 3), plus the scoring pass;
    switching grad mode between them recompiles nothing. The loss is eager's."""
    flags = (*WARMUP_FULL, "--accum-freq", "2")
    compiled = _fit(tmp_path, "compiled", tiny_data, *flags, recorder=recorder)
    _check_static(recorder, [(0, 40), (0, 40), (3, 40), (3, 8), (3, 8)])
    eager = _fit(tmp_path, "eager", tiny_data, *flags)
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_inductor_static_graph_matches_eager(tmp_path, tiny_data, recorder):
    """The real backend (inductor, CPU): full-data training compiles one static graph at B and trains to eager's
    loss within float tolerance (inductor fuses and reorders reductions)."""
    recorder.inner = "inductor"
    flags = ("--select-strategy", "full", "--epochs", "1")
    compiled = _fit(tmp_path, "compiled", tiny_data, *flags, recorder=recorder)
    _check_static(recorder, [(0, 40)])
    eager = _fit(tmp_path, "eager", tiny_data, *flags)
    assert compiled == pytest.approx(eager, rel=1e-3)
