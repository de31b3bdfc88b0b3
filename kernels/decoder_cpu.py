"""Fused decoder-layer ops on CPU (`kernels/cpu/decoder_ops.cpp`), with their torch references.

One op each for RMSNorm, residual add + RMSNorm, RoPE of the fused q/k/v
projection's output, and SiLU(gate) * up of the fused gate/up output; built with the GGUF
kernels (`kernels.gguf_cpu.available()`).
fp32, CPU, contiguous inputs only; `supported` says whether a model's shapes fit. The torch
references are the model's own modules (`engine.models.llama.RMSNorm`, `apply_rotary`).
"""
from __future__ import annotations

import torch


def supported(hidden_size: int, head_dim: int, intermediate_size: int = 8) -> bool:
    """The kernels' vector widths: rows and SiLU halves of 8 floats, half heads of 8."""
    return hidden_size % 8 == 0 and head_dim % 16 == 0 and intermediate_size % 8 == 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [n, d] -> weight * x / rms(x)."""
    return torch.ops.strix_cpu.rms_norm(x.contiguous(), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual)), both [n, d], in one pass."""
    return torch.ops.strix_cpu.add_rms_norm(x.contiguous(), residual.contiguous(), weight, eps)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
             num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [n, (hq + 2 hkv) * d], cos/sin [n, (1,) d] -> rotated q [n, hq, d], k [n, hkv, d]."""
    return torch.ops.strix_cpu.rope_qkv(qkv.contiguous(), cos.contiguous(), sin.contiguous(), num_heads, num_kv_heads)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [n, 2 I] -> silu(gate) * up [n, I] (reference: F.silu(gate) * up)."""
    return torch.ops.strix_cpu.silu_mul(gate_up.contiguous())
