"""Attention backends: ABC + registry (base.py); importing this package registers them."""
from engine.attention import cpu_native  # noqa: F401  (registers "cpu"; our CPU op)
from engine.attention import torch_ref  # noqa: F401  (registers "torch")
from engine.attention import triton_backend  # noqa: F401  (registers "triton"; kernels imported at first use)
from engine.attention.base import AttentionBackend, AttentionShape, BatchLayout, build_layout, create_backend

__all__ = ["AttentionBackend", "AttentionShape", "BatchLayout", "build_layout", "create_backend"]
