"""``dissect-fast`` subcommands: synth, shards, train, index, noise, eval, demo, embed, select-subset, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _synth(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dissect-fast synth",
        description="Write a synthetic noisy image-caption set: OUT/train and OUT/val shards with ids, clean flags "
        "and a dataset index.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (train/ and val/ go under it)")
    p.add_argument("--num-train", type=int, default=10000, help="training pairs")
    p.add_argument("--num-val", type=int, default=1000, help="validation pairs (all clean); 0: no val/")
    p.add_argument("--noise", type=float, default=0.4, help="share of training pairs with another sample's caption")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, captions and noise")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar shard")
    a = p.parse_args(argv)
    from dissect_fast.tools.synthetic import make_synthetic

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
    from dissect_fast.tools.writer import DEFAULT_LOADER_WORKERS, DEFAULT_WORLD_SIZE, SHARDS_PER_LOADER

    p = argparse.ArgumentParser(
        prog="dissect-fast shards",
        description="Shards from a CSV of captions and a folder of images (open_clip's CSV layout). Rows are "
        "grouped by image (same file, or same bytes): --val-fraction holds out whole images, and --noise gives a "
        "noisy pair the caption of another image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--csv", required=True, help="the CSV/TSV of image paths and captions")
    p.add_argument("--images", required=True, help="folder the CSV's image paths are relative to")
    p.add_argument("--out", required=True, help="output folder: OUT/train (and OUT/val) shards with index.json")
    p.add_argument(
        "--csv-img-key",
        default=None,
        help="image path column (None: the first of filepath, file, image, img, path in the header)",
    )
    p.add_argument(
        "--csv-caption-key",
        default=None,
        help="caption column (None: the first of title, caption, text in the header)",
    )
    p.add_argument("--csv-separator", default=None, help="None: tab if the header has tabs, else comma")
    p.add_argument(
        "--noise", type=float, default=0.0, help="share of training pairs given the caption of another image"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of rows held out as OUT/val, as whole images (no image in both splits)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the noise")
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help=f"None: picked so that every rank x worker of --world-size x --workers reads >= {SHARDS_PER_LOADER} "
        "shards (32 to 10,000 samples a shard)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=DEFAULT_WORLD_SIZE,
        help="most ranks (GPUs) you will train on: the shard count is planned for it",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_LOADER_WORKERS,
        help="loader workers per rank you will train with (the trainer's --workers)",
    )
    a = p.parse_args(argv)
    from dissect_fast.tools.csv_shards import csv_to_shards

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
            world_size=a.world_size,
            workers=a.workers,
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(
        f"wrote {train.num_samples} training samples in {len(train.shards)} shards to {a.out}/train"
        + (f" and {val.num_samples} validation samples to {a.out}/val" if val else "")
    )
    readers = len(train.shards) // SHARDS_PER_LOADER
    print(
        f"{len(train.shards)} shards: >= {SHARDS_PER_LOADER} per loader for up to {readers} ranks x workers"
        if readers
        else f"{len(train.shards)} shard(s): fewer than {SHARDS_PER_LOADER} per loader even on one rank with one "
        "worker (a small set); train with --workers 0 or 1"
    )
    print(f"skipped rows: {sum(skipped.values())} {json.dumps(skipped)}")
    return 0


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dissect-fast eval",
        description="Retrieval R@K of a saved checkpoint on validation shards, and zero-shot top-1/top-5 on image "
        "folders (the training's flags). The model is rebuilt from the config the checkpoint carries; --model / "
        "--model-config are for checkpoints written without one (open_clip's, older dissect_fast ones).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a dissect_fast or open_clip checkpoint file")
    p.add_argument("--val-data", default=None, help="validation shards: retrieval R@1/5/10 both ways")
    p.add_argument("--data-index", default=None, help="dataset index of --val-data when it is not beside the shards")
    p.add_argument("--model", default=None, help="open_clip model name (None: the checkpoint's own model)")
    p.add_argument("--model-config", default=None, help="open_clip-style model JSON (None: the checkpoint's own)")
    p.add_argument("--imagenet-val", default=None, help="ImageNet val as an ImageFolder: zero-shot top-1/top-5")
    p.add_argument("--imagenet-v2", default=None, help="ImageNetV2 as an ImageFolder (class folders 0..999)")
    p.add_argument("--zeroshot-data", default=None, help="any ImageFolder: zero-shot with folder names as classes")
    p.add_argument(
        "--zeroshot-classnames", default=None, help="with --zeroshot-data: class names, one a line, in folder order"
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="open_clip's --precision; auto: amp_bf16 on CUDA, else fp32")
    a = p.parse_args(argv)
    if a.val_data is None and not (a.imagenet_val or a.imagenet_v2 or a.zeroshot_data):
        p.error("nothing to evaluate: give --val-data (retrieval) and/or --zeroshot-data / --imagenet-val")
    if a.zeroshot_classnames and not a.zeroshot_data:
        p.error("--zeroshot-classnames needs --zeroshot-data")
    from dissect_fast.data.loader import eval_loader
    from dissect_fast.data.shards import resolve_data, tokenizer_for
    from dissect_fast.evaluation.retrieval import evaluate
    from dissect_fast.evaluation.zeroshot import run_zeroshot, zeroshot_sets
    from dissect_fast.model import model_from_checkpoint, resolve_device, resolve_precision, text_tokenizer

    try:  # user errors end in one line, not a traceback
        device = resolve_device(a.device)
        shards, index = resolve_data(a.val_data, "--val-data", a.data_index) if a.val_data else (None, None)
        model, name, pre_val, ctx = model_from_checkpoint(a.checkpoint, a.model, device, a.model_config)
        sets = zeroshot_sets(
            pre_val,
            imagenet_val=a.imagenet_val,
            imagenet_v2=a.imagenet_v2,
            zeroshot_data=a.zeroshot_data,
            zeroshot_classnames=a.zeroshot_classnames,
        )
        tok = (text_tokenizer(name) or tokenizer_for(ctx)) if sets else None  # the model's own unless CLIP BPE
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        p.error(str(e))
    precision = resolve_precision(a.precision, device)
    m: dict = {}
    if shards is not None:
        loader = eval_loader(shards, index, a.batch_size, pre_val, ctx, a.workers, device)
        m.update(evaluate(model, loader, precision, device))
    if sets and tok is not None:
        m.update(run_zeroshot(model, sets, tok, device, precision, a.batch_size, a.workers))
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
    from dissect_fast.data.index import main_index

    return main_index(argv) or 0


def _noise(argv: list[str]) -> int:
    from dissect_fast.tools.noise import main_noise

    return main_noise(argv) or 0


_NO_BENCHMARKS = (
    "the benchmarks ship with the repository, not with the package: run from a checkout "
    "(`python -m benchmarks.bench_NAME` in its root, or `dissect-fast bench NAME` with the package installed from it)"
)
#: the checkout this package runs from (an editable install), whose benchmarks/ a console script cannot import
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark_folders() -> list[str]:
    """Where ``benchmarks`` is: the importable package's folders, else the checkout's, else none."""
    import importlib.util

    spec = importlib.util.find_spec("benchmarks")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)
    folder = os.path.join(_CHECKOUT, "benchmarks")
    return [folder] if os.path.isfile(os.path.join(folder, "__init__.py")) else []


def benchmark_list() -> dict[str, str]:
    """``{name: first line of its docstring}`` of every ``benchmarks.bench_NAME`` module (read, not imported)."""
    import ast
    import glob

    out: dict[str, str] = {}
    for folder in _benchmark_folders():
        for path in sorted(glob.glob(os.path.join(folder, "bench_*.py"))):
            with open(path) as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            out[os.path.basename(path)[len("bench_") : -len(".py")]] = doc.strip().splitlines()[0] if doc else ""
    return out


def _bench_usage() -> None:
    benches = benchmark_list()
    print("usage: dissect-fast bench [NAME] [flags]   (NAME defaults to train; `dissect-fast bench NAME --help`)")
    print("\nbenchmarks:" if benches else f"\nno benchmarks found: {_NO_BENCHMARKS}")
    for name, doc in benches.items():
        print(f"  {name:<15} {doc}")


def _bench(argv: list[str]) -> int:
    """``benchmarks.bench_NAME.main(flags)``: imported when ``benchmarks`` is importable (a checkout's root), else run
    as ``python -m benchmarks.bench_NAME`` with the checkout this package is installed from on its path."""
    import importlib
    import importlib.util
    import subprocess

    if argv[:1] in (["-h"], ["--help"]):  # the list of benchmarks; `bench NAME --help` gives one's flags
        _bench_usage()
        return 0
    which = argv[0] if argv and not argv[0].startswith("-") else "train"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    names = benchmark_list()
    if which not in names:
        where = f"the benchmarks are {', '.join(names)}" if names else _NO_BENCHMARKS
        print(f"dissect-fast bench: no benchmark {which!r}: {where}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("benchmarks") is not None:
        return importlib.import_module(f"benchmarks.bench_{which}").main(rest) or 0
    path = os.pathsep.join([_CHECKOUT, *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", f"benchmarks.bench_{which}", *rest]
    return subprocess.call(cmd, env={**os.environ, "PYTHONPATH": path})


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
    "bench": (_bench, "run a benchmark: train (default), select, data, quality, real, subset, ... (bench --help)"),
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
