"""Selection quality: which pairs does each strategy train on, and what does the model learn from them?

Synthetic data with known noisy correspondence (a share of training captions permuted; a clean validation split);
every strategy trains the same model, epochs, schedule and seed (``harness.grid_main``; the row:
``harness.selection_row``). Runs go by priority: 50% noise first, then the other noise levels, seeds, sweeps.

    python -m benchmarks.bench_quality --grid reduced             # CPU grid, about an hour on 2 cores
    python -m benchmarks.bench_quality --grid full --device cuda
    python -m benchmarks.bench_quality --grid quick --out /tmp/q  # 1 seed, 2 strategies, tiny data (tests)
"""

from __future__ import annotations

from benchmarks import harness
from dissect_fast.selection.names import STRATEGIES, WARMUP_STRATEGIES

RATE = 0.3
MAIN = ["full", "dissect-warmup", "dissect-gain", "warmup-clipscore", "random", "clipscore", "dissect-momentum"]
_BASE = dict(num_val=500, batch_size=100, epochs=30, warmup_point=10, model="micro-rn", lr=3e-3, lr_warmup=50,
             warmup_train="full", noises=[0.5], seeds=[0, 1, 2], dissect_rates=[], sweeps=False)  # fmt: skip
#: grid presets. ``reduced``: the demo's regime (2,000 pairs, 30 epochs), sized for an hour on a 2-core CPU;
#: ``reduced-w20``: its 50% noise runs of the snapshot rules at W = 20; ``full``: 5x the data, every strategy
GRIDS = {
    "quick": dict(_BASE, num_train=200, num_val=50, batch_size=40, epochs=2, warmup_point=1, lr_warmup=5,
                  warmup_train="random", seeds=[0], strategies=["random", "dissect-gain"]),
    "reduced": dict(_BASE, num_train=2000, noises=[0.5, 0.0, 0.2, 0.7], strategies=[*MAIN, "small_loss", "big_loss"],
                    more_seed_noises=[0.5], more_seed_strategies=MAIN, dissect_rates=[0.2, 0.5],
                    dissect_rate_noises=[0.5], dissect_rate_strategies=["dissect-warmup"],
                    dissect_rate_more_seeds=False, sweeps=True,
                    sweep_strategies=["dissect-warmup", "warmup-clipscore"], sweep_epochs=False),
    "reduced-w20": dict(_BASE, num_train=2000, warmup_point=20, strategies=["warmup-clipscore", "dissect-warmup"]),
    "full": dict(_BASE, num_train=10000, num_val=1000, lr_warmup=100, noises=[0.0, 0.2, 0.5, 0.7],
                 strategies=list(STRATEGIES), dissect_rates=[0.2, 0.5], sweeps=True),
}  # fmt: skip


def plan_runs(g: dict) -> list[dict]:
    """Every run of a grid in priority order; a run is a dict of its settings (its identity). Optional grid keys
    limit the expensive parts: ``more_seed_*``, ``dissect_rate_*``, ``sweep_strategies``, ``sweep_epochs``."""
    runs: list[dict] = []
    main_mode = g.get("warmup_train", "random")

    def add(noise, strategy, seed, rate=RATE, sweep="main", **over):
        r = dict(noise=noise, strategy=strategy, seed=seed, rate=1.0 if strategy == "full" else rate, sweep=sweep,
                 num_train=g["num_train"], epochs=g["epochs"], warmup_point=g["warmup_point"],
                 warmup_train=main_mode if strategy in WARMUP_STRATEGIES else "random", momentum=0.9,
                 model=g["model"])  # fmt: skip
        r.update(over)
        if r not in runs:
            runs.append(r)

    seeds, noises, strategies = g["seeds"], g["noises"], g["strategies"]
    seed_strategies = [s for s in strategies if s in g.get("more_seed_strategies", strategies)]
    seed_noises = [n for n in noises[1:] if n in g.get("more_seed_noises", noises)]
    rate_strategies = [
        s for s in g.get("dissect_rate_strategies", ("dissect-warmup", "dissect-gain")) if s in strategies
    ]
    rate_noises = g.get("dissect_rate_noises", noises)
    sweep_strategies = [s for s in g.get("sweep_strategies", WARMUP_STRATEGIES) if s in strategies]
    for noise in noises:  # priority: the first noise level (50%), then the others, all strategies, first seed
        for s in strategies:
            add(noise, s, seeds[0])
    for seed in seeds[1:]:  # then more seeds at the first noise level
        for s in seed_strategies:
            add(noises[0], s, seed)
    for noise in rate_noises:  # then DISSect's other rates
        for s in rate_strategies:
            for rate in g["dissect_rates"]:
                add(noise, s, seeds[0], rate=rate)
    if g["sweeps"]:  # then the sweeps at 50% noise, first seed
        seed, e, w = seeds[0], g["epochs"], g["warmup_point"]
        for s in (s for s in WARMUP_STRATEGIES if s in strategies):
            add(0.5, s, seed, sweep="warmup_train", warmup_train="full" if main_mode == "random" else "random")
        for s in sweep_strategies:
            for wp in sorted({max(1, w // 2), min(e - 1, 2 * w)} - {w}):
                add(0.5, s, seed, sweep="warmup_point", warmup_point=wp)
        for m in (0.5, 0.99):
            add(0.5, "dissect-momentum", seed, sweep="momentum", momentum=m)
        for s in ("full", *sweep_strategies):
            add(0.5, s, seed, sweep="data_size", num_train=g["num_train"] // 2)
            if g.get("sweep_epochs", True):
                add(0.5, s, seed, sweep="epochs", epochs=2 * e)
    for seed in seeds[1:]:  # the rest of the grid with more seeds
        for noise in seed_noises:
            for s in seed_strategies:
                add(noise, s, seed)
        for noise in rate_noises if g.get("dissect_rate_more_seeds", True) else []:
            for s in rate_strategies:
                for rate in g["dissect_rates"]:
                    add(noise, s, seed, rate=rate)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = harness.grid_parser("python -m benchmarks.bench_quality", __doc__, GRIDS, "reduced")
    a = p.parse_args(argv)
    g, work = GRIDS[a.grid], a.work or "runs/bench_quality"
    fields = {
        **harness.header("quality", "bench_quality", a.device, argv),
        "settings": dict(g, rate=RATE, device=a.device),
        "note": "wall-clock is comparable only between runs at a similar load (load_start/load_end per run); "
        "compute_units (forward = 1, backward = 2 per sample) is the load-free cost",
    }

    def run_one(r: dict) -> dict:
        train, val = harness.synthetic_data(work, r["noise"], r["num_train"], g["num_val"])
        name = f"{r['sweep']}-noise{round(100 * r['noise'])}-{r['strategy']}-r{r['rate']}-s{r['seed']}"
        load = harness.machine_load()
        return harness.selection_row(
            r, *harness.train_run(harness.train_argv(r, g, train, val, work, name, a.device)), load
        )

    def describe(r: dict, row: dict) -> str:
        return (
            f"{r['sweep']} noise {r['noise']:.0%} {r['strategy']} r={r['rate']} seed {r['seed']}: R@1 i2t "
            f"{row['i2t_R@1']:.1f} t2i {row['t2i_R@1']:.1f}, clean share (>= W) "
            f"{row['clean_fraction_after_warmup']:.3f}, {row['wall_s']:.0f} s"
        )

    tag = a.tag or f"{a.device}-{a.grid}"
    return harness.grid_main(p, a, "quality", tag, fields, plan_runs(g), run_one, describe)


if __name__ == "__main__":
    raise SystemExit(main())
