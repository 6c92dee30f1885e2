import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic noisy set (240 train in 3 shards, 64 val), made once per test session."""
    from dissect_fast.tools.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synth")
    make_synthetic(
        str(root), num_train=240, num_val=64, noise=0.4, image_size=32, seed=3, samples_per_shard=80, progress=False
    )
    return root


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
