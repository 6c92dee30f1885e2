"""dissect_fast: DISSect online sample selection for CLIP training, made fast."""
from setuptools import setup

setup(
    name="dissect_fast",
    version="0.1.0",
    description="High-throughput CLIP trainer with DISSect online sample selection",
    python_requires=">=3.10",
    packages=[
        "dissect_fast",
        "dissect_fast.selection",
        "dissect_fast.data",
        "dissect_fast.offline",
        "dissect_fast.kernels",
    ],
    package_dir={"dissect_fast.kernels": "kernels"},
    package_data={"dissect_fast": ["model_configs/*.json"]},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "open_clip_torch>=2.27",
        "webdataset>=0.2.86",
        "braceexpand",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["triton>=3.0", "nvidia-dali-cuda130"],
        "test": ["pytest>=7", "pandas"],
    },
    entry_points={"console_scripts": ["dissect-fast=dissect_fast.cli:main"]},
)
