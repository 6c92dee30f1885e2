"""Smoke run of the DALI path under training: DaliLoader batches feed a real open_clip training step.

Trains ``--model`` (default ViT-B-32, random init, bf16 autocast, fused AdamW, open_clip's ClipLoss)
for ``--steps`` steps at ``--batch-size`` on shards of realistic JPEGs (made by bench_data.py, or
generated here), across as many epochs as that takes (every epoch rebuilds the DALI pipeline), and
stores steps/s, images/s, the loss curve ends and the loader's counts as JSON.

    python benchmarks/dali_smoke.py --steps 300 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchkit
from bench_data import MODULES, _sync, make_shards, short_tag


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--data", default=None, help="shards from bench_data.py --data DIR (generated when absent)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--commit", default=None)
    p.add_argument("--device", default="cuda", help="cpu only to check this script with a tiny model")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("dali_smoke: needs a CUDA device")
            return 1
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)

    data = a.data or tempfile.mkdtemp(prefix="dali_smoke_")
    if not os.path.isfile(os.path.join(data, "index.json")):
        make_shards(data, 4096, 16384, 512, a.workers) if device.type == "cuda" else make_shards(data, 32, 64, 32, 2)

    import open_clip
    from open_clip.loss import ClipLoss

    from dissect_fast.data.dali_loader import DaliLoader, Preprocess
    from dissect_fast.data.shards import DatasetIndex
    from dissect_fast.model import register_model_configs

    register_model_configs()  # dissect_fast's tiny configs, for --device cpu checks
    model, pre_train, _ = open_clip.create_model_and_transforms(a.model, device=device, output_dict=True)
    ctx = model.context_length
    index = DatasetIndex.load(data)
    loader = DaliLoader(
        index.shard_paths(),
        a.batch_size,
        ctx,
        Preprocess.from_transform(pre_train),
        train=True,
        device=device,
        workers=a.workers,
        index=index,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, fused=True)
    loss_fn = ClipLoss()
    model.train()
    losses, epochs, step = [], 0, 0
    seen_ids: set[int] = set()
    t0 = time.time()
    t_first = None
    while step < a.steps:
        loader.set_epoch(epochs)
        for images, tokens, ids in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(images, tokens)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if epochs == 0:
                seen_ids.update(ids.tolist())
            step += 1
            if step == min(10, a.steps // 2):
                _sync(device)
                t_first, step_first = time.time(), step
            if step >= a.steps:
                break
        if epochs == 0:
            stats0 = {k: v for k, v in loader.stats.items() if not k.startswith("shard:")}
        epochs += 1
    _sync(device)
    wall = time.time() - t_first
    losses = [float(x) for x in losses]
    timed = a.steps - step_first
    result = {
        **benchkit.header("dali_training_smoke", "dali_smoke.py", device, argv, MODULES, a.commit),
        "model": a.model,
        "precision": "amp_bf16",
        "batch_size": a.batch_size,
        "steps": a.steps,
        "epochs_started": epochs,
        "steps_per_s": round(timed / wall, 2),
        "images_per_s": round(timed * a.batch_size / wall, 1),
        "total_wall_s": round(time.time() - t0, 1),
        "loss_first": round(losses[0], 4),
        "loss_last10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "finite": all(math.isfinite(x) for x in losses),
        "epoch0_unique_ids": len(seen_ids),
        "dataset_samples": index.num_samples,
        "loader_stats_epoch0": stats0,
    }
    print(json.dumps(result, indent=1))
    path = os.path.join(a.out, f"dali-smoke-{short_tag(result['device'])}-{datetime.date.today().isoformat()}.json")
    benchkit.write_json(path, result)
    print(f"wrote {path}")
    return 0 if result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
