"""Fused Triton kernels, each with its plain-torch reference (one op per file).

The op files live in the repository's top-level ``kernels/`` folder (the bare name ``kernels`` belongs to
another PyPI package, so they are imported as ``dissect_fast.kernels``). One package, three ways to run:

* checkout (``PYTHONPATH=<repo>``, no install) and editable install: this ``__init__`` finds
  ``<repo>/kernels`` beside the package (next to ``setup.py``) and appends it to ``__path__``;
* wheel / regular install: setup.py's ``build_py`` copies ``kernels/*.py`` into this folder, and the
  sibling check finds nothing (no ``setup.py`` in site-packages), so nothing foreign can shadow the ops.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SRC = os.path.join(_ROOT, "kernels")
if os.path.isfile(os.path.join(_ROOT, "setup.py")) and os.path.isdir(_SRC) and _SRC not in __path__:
    __path__.append(_SRC)

from .fused_select import fused_select, fused_select_reference  # noqa: E402 -- after __path__ is set

__all__ = ["fused_select", "fused_select_reference"]
