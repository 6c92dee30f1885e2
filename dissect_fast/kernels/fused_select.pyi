# For type checkers only: at runtime dissect_fast/kernels/__init__.py puts the top-level kernels/ folder on
# this package's __path__, which mypy cannot follow; kernels/fused_select.py is the one source.
from kernels.fused_select import *  # noqa: F403
