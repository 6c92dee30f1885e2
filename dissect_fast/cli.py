"""``dissect-fast`` subcommands: synth, shards, train, index, noise, eval, demo, embed, select-subset, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _synth(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dissect-fast synth", description="Write a synthetic noisy image-caption set.")
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--num-val", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.4, help="share of training pairs with another sample's caption")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    from dissect_fast.data.synthetic import make_synthetic

    try:
        train, val = make_synthetic(a.out, a.num_train, a.num_val, a.noise, a.image_size, a.seed, a.samples_per_shard)
    except ValueError as e:
        p.error(str(e))
    print(
        f"wrote {train.num_samples} training samples in {len(train.shards)} shards to {a.out}/train"
        + (f", {val.num_samples} validation samples to {a.out}/val" if val else "")
    )
    return 0


def _shards(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dissect-fast shards", description="Shards from a CSV of captions and images.")
    p.add_argument("--csv", required=True)
    p.add_argument("--images", required=True, help="folder the CSV's image paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--csv-img-key",
        default=None,
        help="image path column (default: the first of filepath, file, image, img, path in the header)",
    )
    p.add_argument(
        "--csv-caption-key",
        default=None,
        help="caption column (default: the first of title, caption, text in the header)",
    )
    p.add_argument("--csv-separator", default=None, help="default: tab if the header has tabs, else comma")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    from dissect_fast.data.csv_shards import csv_to_shards

    try:
        train, val, skipped = csv_to_shards(
            a.csv,
            a.images,
            a.out,
            img_key=a.csv_img_key,
            caption_key=a.csv_caption_key,
            sep=a.csv_separator,
            noise=a.noise,
            val_fraction=a.val_fraction,
            seed=a.seed,
            samples_per_shard=a.samples_per_shard,
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(
        f"wrote {train.num_samples} training samples to {a.out}/train"
        + (f" and {val.num_samples} validation samples to {a.out}/val" if val else "")
    )
    print(f"skipped rows: {sum(skipped.values())} {json.dumps(skipped)}")
    return 0


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dissect-fast eval", description="Retrieval R@K of a saved checkpoint.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--val-data", required=True)
    p.add_argument("--data-index", default=None, help="dataset index of --val-data when it is not beside the shards")
    p.add_argument("--model", default=None, help="default: the model named in the checkpoint")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    a = p.parse_args(argv)
    from dissect_fast.data.loader import eval_loader
    from dissect_fast.data.shards import resolve_data
    from dissect_fast.evaluate import evaluate
    from dissect_fast.model import model_from_checkpoint, resolve_device, resolve_precision

    device = resolve_device(a.device)
    try:  # user errors end in one line, not a traceback
        shards, index = resolve_data(a.val_data, "--val-data", a.data_index)
        model, _, pre_val, ctx = model_from_checkpoint(a.checkpoint, a.model, device)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    loader = eval_loader(shards, index, a.batch_size, pre_val, ctx, a.workers, device)
    m = evaluate(model, loader, resolve_precision(a.precision, device), device)
    print(json.dumps(m, indent=1))
    return 0


def _train(argv: list[str]) -> int:
    from dissect_fast.train import main

    main(argv)
    return 0


def _demo(argv: list[str]) -> int:
    from dissect_fast.demo import main

    return main(argv)


def _select_subset(argv: list[str]) -> int:
    from dissect_fast.offline.subset import main_select_subset

    return main_select_subset(argv) or 0


def _embed(argv: list[str]) -> int:
    from dissect_fast.offline.embed import main_embed

    return main_embed(argv) or 0


def _index(argv: list[str]) -> int:
    from dissect_fast.data.index_tool import main_index

    return main_index(argv) or 0


def _noise(argv: list[str]) -> int:
    from dissect_fast.data.noise import main_noise

    return main_noise(argv) or 0


def _bench(argv: list[str]) -> int:
    import importlib.util

    which = argv[0] if argv and not argv[0].startswith("-") else "train"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"bench_{which}.py")
    if not os.path.isfile(path):
        print(f"dissect-fast bench: no benchmark {which!r} ({path} is missing; benchmarks ship with the repository)")
        return 2
    spec = importlib.util.spec_from_file_location(f"bench_{which}", path)
    assert spec is not None and spec.loader is not None  # a .py file that exists
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(rest) or 0


COMMANDS = {
    "synth": (_synth, "write a synthetic noisy image-caption data set as shards"),
    "shards": (_shards, "write shards from a CSV of captions and a folder of images"),
    "train": (_train, "train (same flags as python -m dissect_fast.train)"),
    "index": (_index, "dataset index (+ DALI .idx files) for shards made elsewhere"),
    "noise": (_noise, "give a share of the pairs of any shards or CSV another caption, with clean flags"),
    "eval": (_eval, "retrieval metrics of a checkpoint on validation shards"),
    "demo": (_demo, "the embedded demo: full data vs DISSect vs baselines on noisy synthetic data"),
    "embed": (_embed, "embeddings of every sample with a reference model (offline selection)"),
    "select-subset": (_select_subset, "choose a training subset offline (random, clipscore, clipcov)"),
    "bench": (_bench, "run a benchmark: train (default), select, data, quality, real, subset"),
}


def _usage(file=None) -> None:
    print("usage: dissect-fast COMMAND [flags]\n\ncommands:", file=file)
    for name, (_, doc) in COMMANDS.items():
        print(f"  {name:<14} {doc}", file=file)


def unknown_command_message(cmd: str) -> str:
    """One line for a command that is not one of COMMANDS, with the closest ones when there are any."""
    import difflib

    if cmd.startswith("-"):
        return f"expected a command before the flags, e.g. `dissect-fast train {cmd} ...`"
    close = difflib.get_close_matches(cmd.lower(), list(COMMANDS), n=2, cutoff=0.6)
    if not close:
        return f"unknown command {cmd!r}; the commands are {', '.join(COMMANDS)}"
    return f"unknown command {cmd!r}; did you mean " + " or ".join(repr(c) for c in close) + "?"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        _usage()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"dissect-fast: {unknown_command_message(argv[0])}", file=sys.stderr)
        return 2
    fn, _ = COMMANDS[argv[0]]
    return fn(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
