"""``dissect-fast embed``: image and text embeddings of every sample with a reference model.

Batched on the GPU when there is one (bf16 autocast), written to a memory-mapped embeddings
directory with ids, resumable (ids already written are skipped), with a progress bar. With
``--class-names FILE`` it also writes the text embeddings of "a photo of a {name}." prompts as
``class_names.npy`` for ``select-subset --class-names``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

from dissect_fast.data.loader import eval_loader
from dissect_fast.data.shards import check_ids_known, resolve_data, tokenizer_for
from dissect_fast.model import autocast, model_from_checkpoint, resolve_device, resolve_precision
from dissect_fast.offline.embeddings_io import EmbeddingsError, EmbeddingWriter


def embed_class_names(model, names: list[str], context_length: int, device, precision) -> np.ndarray:
    tok = tokenizer_for(context_length)
    prompts = tok([f"a photo of a {n}." for n in names], context_length=context_length).to(device)
    with torch.no_grad(), autocast(precision, device):
        g = model.encode_text(prompts)
    return F.normalize(g.float(), dim=-1).cpu().numpy().astype(np.float16)


def main_embed(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dissect-fast embed", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="dissect_fast or open_clip checkpoint of the reference model")
    p.add_argument("--model", default=None, help="open_clip model name (default: the one named in the checkpoint)")
    p.add_argument(
        "--model-config",
        default=None,
        help="open_clip-style model JSON, for a checkpoint that carries no model config (default: the checkpoint's)",
    )
    p.add_argument("--data", required=True, help="shards: directory, brace pattern or glob")
    p.add_argument(
        "--data-index", default=None, help="dataset index of --data when it is not beside the shards (e.g. pipe: URLs)"
    )
    p.add_argument(
        "--out", required=True, help="output folder of the embeddings (read by `dissect-fast select-subset`)"
    )
    p.add_argument("--batch-size", type=int, default=512, help="samples per forward pass")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--precision", default="auto", help="as the trainer's --precision (auto: amp_bf16 on CUDA, else fp32)"
    )
    p.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "float32"],
        help="on-disk dtype; .npy has no bfloat16, and for unit-norm vectors float16 is the more precise 2-byte type",
    )
    p.add_argument("--class-names", default=None, help="text file, one class name per line -> class_names.npy")
    a = p.parse_args(argv)

    from tqdm import tqdm

    try:
        shards, index = resolve_data(a.data, "--data", a.data_index)
        check_ids_known(shards, index, "--data")  # the subset file names samples by id
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    device = resolve_device(a.device)
    precision = resolve_precision(a.precision, device)
    try:
        model, name, pre_val, ctx = model_from_checkpoint(a.checkpoint, a.model, device, a.model_config)
    except ValueError as e:
        p.error(str(e))
    model.eval()
    dim = model.text_projection.shape[1] if hasattr(model, "text_projection") else None
    if dim is None:
        with torch.no_grad():
            dim = model.encode_text(torch.zeros(1, ctx, dtype=torch.long, device=device)).shape[-1]
    try:
        writer = EmbeddingWriter(
            a.out,
            int(dim),
            a.dtype,
            capacity=index.num_samples if index else None,
            meta={"model": name, "checkpoint": os.path.abspath(a.checkpoint), "data": a.data},
        )
    except EmbeddingsError as e:  # resuming into a directory written by another model or dtype
        p.error(f"--out: {e}")
    already = writer.count
    loader = eval_loader(shards, index, a.batch_size, pre_val, ctx, a.workers, device, need_ids=True)
    bar = tqdm(total=index.num_samples if index else None, initial=already, unit="img", desc="embed")
    with torch.no_grad():
        for images, tokens, ids in loader:
            todo = ~torch.from_numpy(writer.done_mask(ids.cpu().numpy()))
            if not todo.any():
                continue
            todo = todo.to(device)
            with autocast(precision, device):
                out = model(images[todo], tokens[todo])
            f = F.normalize(out["image_features"].float(), dim=-1)
            g = F.normalize(out["text_features"].float(), dim=-1)
            writer.append(ids[todo].cpu(), f.cpu(), g.cpu())
            bar.update(int(todo.sum()))
    bar.close()
    writer.close()
    stats = dict(loader.stats)
    print(
        f"embedded {writer.count - already} new samples ({writer.count} in {a.out}); skipped "
        f"{stats.get('bad_samples', 0)} unreadable"
    )
    if a.class_names:
        with open(a.class_names) as fh:
            names = [n.strip() for n in fh if n.strip()]
        np.save(os.path.join(a.out, "class_names.npy"), embed_class_names(model, names, ctx, device, precision))
        print(f"wrote {len(names)} class-name embeddings to {a.out}/class_names.npy")
    return 0
