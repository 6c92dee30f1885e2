"""Fused Triton kernels, each with its plain-torch reference (one op per file)."""

from .fused_select import fused_select, fused_select_reference

__all__ = ["fused_select", "fused_select_reference"]
