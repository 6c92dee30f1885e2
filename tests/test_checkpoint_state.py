"""Checkpoint state as the state of a list of stateful components (``checkpoint.Part``): each saves and loads
itself, under its key or merged into the top level, and a component that older checkpoints lack loads ``{}``."""

import pytest
import torch

from dissect_fast.training.checkpoint import TOP, GeneratorState, Part, gather_state, restore_state


class Box:
    """A stateful component holding one dict."""

    def __init__(self, state: dict) -> None:
        self.state = dict(state)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def test_state_round_trips_with_keys_and_top_level():
    opt, pos = Box({"lr": 0.1}), Box({"epoch": 3, "step": 30})
    state = gather_state([Part("optimizer", opt), Part(TOP, pos)])
    assert state == {"optimizer": {"lr": 0.1}, "epoch": 3, "step": 30}  # open_clip reads `epoch` at the top
    opt2, pos2 = Box({}), Box({})
    restore_state([Part("optimizer", opt2), Part(TOP, pos2)], state)
    assert opt2.state == {"lr": 0.1} and pos2.state["epoch"] == 3 and pos2.state["step"] == 30


def test_a_missing_optional_part_loads_empty_and_a_missing_required_one_fails():
    old = {"optimizer": {"lr": 0.1}}  # written before the `nonfinite` component existed
    guard = Box({"total": 5})
    restore_state([Part("optimizer", Box({})), Part("nonfinite", guard, optional=True)], old)
    assert guard.state == {}
    with pytest.raises(KeyError, match="scaler"):
        restore_state([Part("scaler", Box({}))], old)


def test_generator_state_restores_the_stream():
    g = torch.Generator().manual_seed(7)
    saved = gather_state([Part("generator", GeneratorState(g))])
    first = torch.rand(3, generator=g)
    restore_state([Part("generator", GeneratorState(g))], saved)
    assert torch.equal(torch.rand(3, generator=g), first)
