"""The strategies' names, reference aliases and groups: what the flags need, without torch (``--help`` and
config checks import this, not the strategies themselves)."""

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
_ALIASES = {alias: name for name, alias in STRATEGIES.items() if alias}
_ALIASES.update(
    {
        "none": "full",
        "dissect_momentum": "dissect-momentum",
        "dissect_warmup": "dissect-warmup",
        "dissect_gain": "dissect-gain",
        "warmup_clipscore": "warmup-clipscore",
        "warmup_snapshot": "warmup-snapshot",
        "ours": "dissect-warmup",
    }
)  # the reference code's default --select-strategy name


def resolve_strategy(name: str) -> str:
    """Canonical strategy name for a name or a reference alias; KeyError with the valid names otherwise."""
    if name in STRATEGIES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    valid = ", ".join(list(STRATEGIES) + sorted(a for a in _ALIASES if a not in STRATEGIES))
    raise KeyError(f"--select-strategy: unknown strategy {name!r}; choose one of: {valid}")


#: strategies with a warm-up phase and a frozen snapshot (--warmup-point, --warmup-train apply): the subclasses of
#: strategies.DissectWarmup (tests/test_selection.py checks the two agree)
WARMUP_STRATEGIES: tuple[str, ...] = ("dissect-warmup", "dissect-gain", "warmup-clipscore", "warmup-snapshot")
