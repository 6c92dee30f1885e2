"""dissect_fast: DISSect online sample selection for CLIP training, made fast."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPy(build_py):
    """Ship the top-level ``kernels/*.py`` inside ``dissect_fast.kernels`` (wheel, sdist, strict editable).

    In a checkout or a (lenient) editable install ``dissect_fast/kernels/__init__.py`` finds ``kernels/``
    itself; a wheel has no repository beside it, so the op files are copied into the package here."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "dissect_fast.kernels":
            src = os.path.join(HERE, "kernels")
            names = sorted(n for n in os.listdir(src) if n.endswith(".py") and n != "__init__.py")
            modules += [(package, n[:-3], os.path.relpath(os.path.join(src, n), HERE)) for n in names]
        return modules


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
    cmdclass={"build_py": BuildPy},
    entry_points={"console_scripts": ["dissect-fast=dissect_fast.cli:main"]},
)
