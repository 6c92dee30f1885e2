"""The embedded demo: one noisy synthetic set, one small CLIP, five ways of training it.

Full data, the published ``dissect-warmup`` rule, ``clipscore`` and ``random`` (both at the same
rate), and this project's ``warmup-clipscore`` variant train for the same epochs; the table shows
what each run measured: retrieval R@1 on the clean validation split, wall-clock, and the share of
clean pairs among the samples each run trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

DEFAULTS = dict(
    num_train=2000,
    num_val=500,
    noise=0.4,
    epochs=30,
    warmup_point=10,
    rate=0.3,
    batch_size=100,
    lr=3e-3,
    model="micro-rn",
)


def _runs(a) -> list[tuple[str, dict]]:
    """(run name, its SelectConfig fields) of the five demo runs."""
    warm = {"rate": a.rate, "warmup_point": a.warmup_point, "warmup_train": a.warmup_train}
    return [
        ("full", {"strategy": "full"}),
        ("dissect-warmup", {"strategy": "dissect-warmup", **warm}),
        ("clipscore", {"strategy": "clipscore", "rate": a.rate}),
        ("random", {"strategy": "random", "rate": a.rate}),
        # this project's variant (not the published rule): the same warm-up, then the highest current scores
        ("warmup-clipscore", {"strategy": "warmup-clipscore", **warm}),
    ]


def _configs(a, data: str, backend: str) -> dict:
    """The TrainConfig of every wanted run, all validated before any data is written."""
    from dissect_fast.config import DataConfig, ModelConfig, OptimConfig, RunConfig, SelectConfig, TrainConfig

    wanted = set(a.only.split(",")) if a.only else None
    return {
        name: TrainConfig(
            data=DataConfig(
                train_data=os.path.join(data, "train"),
                val_data=os.path.join(data, "val"),
                batch_size=a.batch_size,
                workers=a.workers,
                data_backend=backend,
            ),
            model=ModelConfig(model=a.model, device=a.device),
            optim=OptimConfig(epochs=a.epochs, lr=a.lr, warmup=50, wd=0.1),
            select=SelectConfig(**select),
            run=RunConfig(
                logs=os.path.join(a.out, "runs"),
                name=name,
                seed=a.seed,
                progress=False,
                val_every=max(1, a.epochs // 6),
            ),
        )
        for name, select in _runs(a)
        if not wanted or name in wanted
    }


def _clean_after(metrics: list[dict], first_epoch: int) -> float | None:
    """Share of clean pairs among all samples trained on in epochs >= first_epoch (1-based)."""
    num = den = 0.0
    for m in metrics:
        if m["epoch"] >= first_epoch and "clean_share_trained" in m:  # the trainer's accounting, all ranks
            num += m["clean_share_trained"] * m["samples_trained"]
            den += m["samples_trained"]
    return num / den if den else None


def _progress_line(name: str, epochs: int):
    """One short line per epoch, so the demo shows it is alive."""

    def show(m: dict) -> None:
        parts = [f"[demo] {name} epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.3f}", f"{m['wall_s']:.0f} s"]
        if "val/image_to_text_R@1" in m:
            parts.append(f"i2t R@1 {m['val/image_to_text_R@1']:.1f}")
        if "clean_share_trained" in m:
            parts.append(f"clean share trained {m['clean_share_trained']:.2f}")
        print(", ".join(parts), flush=True)

    return show


def plot_demo(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    full = results["full"]["metrics"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, c in (("clean", "tab:green"), ("noisy", "tab:red")):
        pts = [(m["epoch"], m[f"diag/score_{label}_mean"]) for m in full if f"diag/score_{label}_mean" in m]
        ax.plot(*zip(*pts), marker="o", ms=3, color=c, label=f"{label} pairs")
    if "warmup_point" in results["_settings"]:
        ax.axvline(results["_settings"]["warmup_point"] + 0.5, ls="--", color="gray", label="DISSect warm-up point")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean CLIPScore (training pairs)")
    ax.set_title("full-data training: do noisy pairs' scores rise late?", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "score_clean_vs_noisy_full.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, res in results.items():
        if name.startswith("_"):
            continue
        ms = res["metrics"]
        axes[0].plot(
            [m["epoch"] for m in ms],
            [m.get("val/image_to_text_R@1", float("nan")) for m in ms],
            marker="o",
            ms=3,
            label=name,
        )
        axes[1].plot(
            [m["epoch"] for m in ms],
            [m.get("select/clean_fraction", float("nan")) for m in ms],
            marker="o",
            ms=3,
            label=name,
        )
    axes[0].set_ylabel("image->text R@1 (%)")
    axes[1].set_ylabel("clean share of trained samples")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "r1_and_clean_fraction.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def summary_rows(results: dict) -> list[dict]:
    """One row per run: final recall both ways, wall-clock, and the clean share of the trained pairs over all
    epochs and after the warm-up point."""
    w = results["_settings"]["warmup_point"]
    rows = []
    for name, res in results.items():
        if name.startswith("_"):
            continue
        last = res["metrics"][-1]
        rows.append(
            {
                "strategy": name,
                "i2t_R@1": last["val/image_to_text_R@1"],
                "t2i_R@1": last["val/text_to_image_R@1"],
                "wall_s": res["wall_s"],
                "clean_share_all": _clean_after(res["metrics"], 1),
                "clean_share_after_warmup": _clean_after(res["metrics"], w + 1),
            }
        )
    return rows


def format_table(results: dict) -> str:
    w = results["_settings"]["warmup_point"]
    rows = [
        "| strategy | image->text R@1 | text->image R@1 | wall-clock (s) | clean share trained (all epochs) "
        f"| clean share trained (epochs > {w}) |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary_rows(results):
        rows.append(
            f"| {r['strategy']} | {r['i2t_R@1']:.1f} | {r['t2i_R@1']:.1f} | {r['wall_s']:.0f} "
            f"| {r['clean_share_all']:.3f} | {r['clean_share_after_warmup']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dissect-fast demo", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="runs/demo", help="folder of the data, the five runs, the table and plots")
    p.add_argument("--num-train", type=int, default=DEFAULTS["num_train"], help="synthetic training pairs")
    p.add_argument("--num-val", type=int, default=DEFAULTS["num_val"], help="clean validation pairs")
    p.add_argument(
        "--noise", type=float, default=DEFAULTS["noise"], help="share of training pairs with a wrong caption"
    )
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="epochs of every run")
    p.add_argument(
        "--warmup-point", type=int, default=DEFAULTS["warmup_point"], help="warm-up epochs of the warm-up strategies"
    )
    p.add_argument(
        "--warmup-train",
        default="full",
        choices=["random", "full"],
        help="what the warm-up epochs train on: the full batch or a random k-subset",
    )
    p.add_argument("--rate", type=float, default=DEFAULTS["rate"], help="r: share of each batch the selections train")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="batch size B before selection")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate")
    p.add_argument("--model", default=DEFAULTS["model"], help="open_clip model name or a dissect_fast tiny config")
    p.add_argument("--workers", type=int, default=1, help="loader worker processes")
    p.add_argument(
        "--data-backend",
        default="auto",
        choices=["auto", "torch", "dali"],
        help="auto: DALI whenever it imports, else the torch loader",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--only", default=None, help="comma-separated subset of: full,dissect-warmup,clipscore,random,warmup-clipscore"
    )
    a = p.parse_args(argv)
    from dissect_fast.training.reliability import Interrupted

    try:
        return _run(p, a)
    except (KeyboardInterrupt, Interrupted) as e:  # Ctrl-C: one line; the demo has no --resume, a re-run starts over
        print(f"\n[demo] stopped; `dissect-fast demo --out {a.out}` starts it again", flush=True)
        return e.exit_code if isinstance(e, Interrupted) else 130


def _run(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """The demo with parsed flags ``a``: the data, the runs, the table and plots."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dissect_fast.config import ConfigError
    from dissect_fast.data.dali_loader import dali_if_available
    from dissect_fast.data.shards import INDEX_NAME
    from dissect_fast.tools.synthetic import make_synthetic
    from dissect_fast.training.callbacks import EpochEndFunction
    from dissect_fast.training.loop import Trainer

    data = os.path.join(a.out, "data")
    backend = dali_if_available() if a.data_backend == "auto" else a.data_backend
    try:
        configs = _configs(a, data, backend)
    except ConfigError as e:
        p.error(str(e))
    t0 = time.time()
    if not os.path.isfile(os.path.join(data, "train", INDEX_NAME)):
        print(
            f"[demo] writing a synthetic set: {a.num_train} training pairs ({a.noise:.0%} noisy), "
            f"{a.num_val} clean validation pairs -> {data}"
        )
        make_synthetic(data, a.num_train, a.num_val, a.noise, 32, a.seed, samples_per_shard=500)
    settings = {
        k: getattr(a, k)
        for k in (
            "num_train",
            "num_val",
            "noise",
            "epochs",
            "warmup_point",
            "warmup_train",
            "rate",
            "batch_size",
            "lr",
            "model",
            "seed",
        )
    }
    settings["data_backend"] = backend
    results: dict = {"_settings": settings}
    for name, cfg in configs.items():
        print(f"[demo] training {name} for {a.epochs} epochs ...", flush=True)
        run_dir = os.path.join(a.out, "runs", name)
        if os.path.isdir(run_dir):  # a re-run of the demo starts this run afresh (the trainer refuses old runs)
            shutil.rmtree(run_dir)
        trainer = Trainer(cfg, callbacks=[EpochEndFunction(_progress_line(name, a.epochs))])
        import logging

        logging.getLogger("dissect_fast").setLevel(logging.WARNING)
        t = time.time()
        metrics = trainer.fit()
        results[name] = {"metrics": metrics, "wall_s": time.time() - t}
    if "full" in results and all(n in results for n, _ in _runs(a)):
        plots = plot_demo(results, a.out)
        table = format_table(results)
        print("\nDemo results (measured by this run):\n")
        print(table)
        print(f"\nplots: {', '.join(plots)} and per-run plots under {a.out}/runs/*/plots/")
        with open(os.path.join(a.out, "demo_table.md"), "w") as f:
            f.write(table + "\n")
    from dissect_fast.provenance import provenance

    doc = {
        "benchmark": "demo",
        **provenance(None if a.device == "auto" else a.device),
        "summary": summary_rows(results),
    }
    with open(os.path.join(a.out, "demo_results.json"), "w") as f:
        json.dump({**doc, **results}, f, indent=1)
    print(f"[demo] total {time.time() - t0:.0f} s")
    return 0
