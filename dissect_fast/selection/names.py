"""The strategies' names, reference aliases and groups: what the flags and the config checks need, without torch
(``--help`` and the config import this, not the strategies themselves; tests/test_selection.py checks that the
groups agree with the strategy classes)."""

from __future__ import annotations

#: name -> reference-code alias (METHOD.md table)
STRATEGIES: dict[str, str | None] = {
    "full": None,
    "random": "random",
    "clipscore": "clipscore",
    "small_loss": "small_loss",
    "big_loss": "big_loss",
    "dissect-momentum": "historical_base_sampling",
    "dissect-warmup": "warmup_base_sampling",
    "dissect-gain": None,  # this project's sign-flipped variant (not in the reference code)
    "warmup-clipscore": None,  # this project's score-level variant (not in the reference code)
    "warmup-snapshot": None,  # this project's frozen-score variant, no scoring pass after the warm-up
}
#: every other spelling --select-strategy takes -> the name it stands for (SelectConfig applies it): the reference code's names, its default
#: name `ours`, `none` and the underscore spellings of this project's names
STRATEGY_ALIASES: dict[str, str] = {
    **{alias: name for name, alias in STRATEGIES.items() if alias and alias != name},
    "none": "full",
    "ours": "dissect-warmup",
    **{name.replace("-", "_"): name for name in STRATEGIES if "-" in name},
}


#: strategies with a warm-up phase and a frozen snapshot (--warmup-point, --warmup-train apply): the subclasses of
#: strategies.DissectWarmup
WARMUP_STRATEGIES: tuple[str, ...] = ("dissect-warmup", "dissect-gain", "warmup-clipscore", "warmup-snapshot")
#: strategies that keep a history buffer indexed by sample id (they need the dataset's id range)
HISTORY_STRATEGIES: tuple[str, ...] = ("dissect-momentum", *WARMUP_STRATEGIES)
