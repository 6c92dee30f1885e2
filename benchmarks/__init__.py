"""The benchmarks: run each as ``python -m benchmarks.NAME`` from the checkout (see benchmarks/README.md)."""
