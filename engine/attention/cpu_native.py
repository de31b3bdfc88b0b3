"""Native CPU attention backend: our paged-attention op for short query runs, the torch
reference for the rest.

Per step, requests with at most `NATIVE_MAX_Q` query tokens and no draft tree (decodes,
speculative verification of a chain, short prefill chunks) attend through
`kernels/attention_cpu.py` straight from the pages, one op per layer that also writes every
new token's K/V. Longer prefill chunks keep the torch backend's padded SDPA groups (torch's
flash kernel runs them as blocked GEMMs, faster per key than our row kernel at long query
runs), as do tree requests; a step whose plan decomposes shared-prefix levels runs wholly on
the torch backend (its LSE merge). Same contract and outputs as the torch backend up to fp32
summation order; chosen by `auto` on an fp32 CPU model when the extension is built.
"""
from __future__ import annotations

import torch

from engine.attention.base import AttentionShape, BatchLayout, register_backend
from engine.attention.torch_ref import TorchReferenceBackend
from kernels import attention_cpu

NATIVE_MAX_Q = 16  # query tokens of a request attended natively (decode, verification of up to 15 drafts)


@register_backend("cpu")
class CpuNativeBackend(TorchReferenceBackend):
    @classmethod
    def usable(cls, shape: AttentionShape) -> bool:
        from kernels import gguf_cpu

        return (shape.device.type == "cpu" and shape.dtype == torch.float32
                and attention_cpu.supported(shape.num_heads, shape.num_kv_heads, shape.head_dim)
                and gguf_cpu.available())

    def __init__(self, shape: AttentionShape, shared_prefix: str = "auto"):
        # Named explicitly, this backend is not vetted by `auto`; checking here also builds and
        # loads the extension when no native linear did (`--no-cpu-native-kernels`).
        if not self.usable(shape):
            raise ValueError("attention backend 'cpu' needs an fp32 model on the CPU, a head shape our op "
                             "supports and the built extension (kernels/cpu); use 'auto' or 'torch'")
        super().__init__(shape, shared_prefix)

    def plan(self, layout: BatchLayout) -> None:
        cascade = self.plan_levels(layout)
        trees = {i for i, _ in layout.tree_masks}
        n = len(layout.q_lens)
        native = [] if cascade.active else [i for i in range(n) if layout.q_lens[i] <= NATIVE_MAX_Q and i not in trees]
        chosen = set(native)
        self.plan_torch(layout, cascade, [i for i in range(n) if i not in chosen])
        s = self.shape
        self.native = attention_cpu.make_plan(layout, native, s.num_heads, s.num_kv_heads, s.scale) if native else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return super().forward(q, k, v, kv_cache)
        out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
        attention_cpu.paged_attention(out, q, k, v, kv_cache, self.native)  # writes every token's K/V first
        return self.attend_groups(q, kv_cache, out) if self.groups else out
