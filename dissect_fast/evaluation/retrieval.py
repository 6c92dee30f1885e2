"""Retrieval evaluation (open_clip's metric names) on a validation loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dissect_fast.model import autocast, input_dtype


@torch.no_grad()
def embed_all(model, loader, precision: str, device: torch.device):
    """Normalised image and text embeddings (float32, on CPU) and ids of every sample the loader yields."""
    was_training = model.training
    model.eval()
    fs, gs, ids = [], [], []
    dtype = input_dtype(precision)  # bf16/fp16 weights (--precision bf16, pure_fp16, ...) take images in their dtype
    for images, tokens, sid in loader:
        if dtype is not None:
            images = images.to(dtype)
        with autocast(precision, device):
            out = model(images, tokens)
        fs.append(F.normalize(out["image_features"].float(), dim=-1).cpu())
        gs.append(F.normalize(out["text_features"].float(), dim=-1).cpu())
        ids.append(sid.cpu())
    model.train(was_training)
    if not fs:
        raise RuntimeError("the validation loader yielded no samples: check --val-data")
    return torch.cat(fs), torch.cat(gs), torch.cat(ids)


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """R@K both ways: pair i is found when its partner ranks within the top K (ties count against)."""
    sim = image_features @ text_features.t()
    n = sim.shape[0]
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.t())):
        target = s.diagonal().unsqueeze(1)
        rank = (s > target).sum(1)  # number of candidates strictly better than the true partner
        for k in ks:
            out[f"val/{name}_R@{k}"] = 100.0 * (rank < k).float().mean().item()
        out[f"val/{name}_mean_rank"] = rank.float().mean().item() + 1
    out["val/num_samples"] = n
    return out


def evaluate(model, loader, precision: str, device: torch.device) -> dict:
    f, g, _ = embed_all(model, loader, precision, device)
    return retrieval_metrics(f, g)
