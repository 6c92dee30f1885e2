"""dissect_fast: CLIP contrastive training with DISSect online sample selection (open_clip models, webdataset shards).

``load_openclip(path)`` gives the (model, preprocess, tokenizer) of a saved checkpoint, as open_clip would."""

from __future__ import annotations


def load_openclip(path: str, device: str = "cpu"):
    """(model, preprocess, tokenizer) of a dissect_fast checkpoint: the model (any open_clip model, built-in or
    custom, rebuilt from the config the checkpoint carries) in eval mode on ``device``; see docs/checkpoints.md."""
    from dissect_fast.model import load_openclip as _load

    return _load(path, device)


__all__ = ["load_openclip"]
