"""Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral without sliding window, Qwen2/2.5)
on top of the paged KV cache. Numerics follow HF transformers (RMSNorm in fp32,
rotate-half RoPE) so fp32 logits match it closely.

Weights use HF names with fused projections: `qkv_proj` = cat(q, k, v) and
`gate_up_proj` = cat(gate, up) along the output dim (one matmul each).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention.base import AttentionBackend
from engine.config import ModelConfig
from kernels import decoder_cpu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False  # our fused CPU op (kernels/decoder_cpu.py): the same math in one op

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual)): the residual add and this norm (one op when fused)."""
        if self.fused:
            return decoder_cpu.add_rms_norm(x, residual, self.weight, self.eps)
        x = x + residual
        return x, self(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return decoder_cpu.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama-3 or linear scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        low_wl, high_wl = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        inv = rope_inv_freq(cfg)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_pos, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, 1, head_dim] for the step (computed once, used by every layer)."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, heads, head_dim]; rotate-half convention (HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.splits = (q, kv, kv)
        # Fused CPU ops (kernels/decoder_cpu.py) for the norms, RoPE and SiLU * up (`set_fused`, from
        # LlamaModel.use_fused_cpu_ops); the same math as the torch path.
        self.fused = False

    def set_fused(self, on: bool) -> None:
        self.fused = self.input_layernorm.fused = self.post_attention_layernorm.fused = on

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend, kv_cache) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self._qkv(x, rope)  # [n, heads, head_dim] each
        o = attn.forward(q, k, v, kv_cache)  # [num_tokens, heads, head_dim]
        x, h = self.post_attention_layernorm.add_forward(x, self.o_proj(o.reshape(n, -1)))
        return x + self.down_proj(self._act(self.gate_up_proj(h)))

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return decoder_cpu.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        cfg, n = self.cfg, x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x))
        if self.fused:
            q, k = decoder_cpu.rope_qkv(qkv, *rope, cfg.num_heads, cfg.num_kv_heads)
            v = qkv[:, self.splits[0] + self.splits[1]:]
        else:
            q, k, v = qkv.split(self.splits, dim=-1)
            q = apply_rotary(q.view(n, cfg.num_heads, cfg.head_dim), *rope)
            k = apply_rotary(k.view(n, cfg.num_kv_heads, cfg.head_dim), *rope)
        return q, k, v.view(n, cfg.num_kv_heads, cfg.head_dim)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        # Weights come from the checkpoint: no random init (on the meta device, nn.Embedding's
        # normal_ would import torch._dynamo and with it libtriton, ~65 MB resident).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        with torch.device("cpu"):  # computed tables, not weights: never built on the meta device
            self.rotary = Rotary(cfg, max_positions)

    def forward(self, input_ids, positions, attn: AttentionBackend, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids/positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, rope, attn, cache)
        return x

    def use_fused_cpu_ops(self) -> bool:
        """Run the layers' norms, RoPE and SiLU * up as our fused CPU ops (fp32 CPU models whose shapes
        fit the kernels; the caller checked the extension is built). True when switched on."""
        cfg, w = self.cfg, self.norm.weight
        fits = decoder_cpu.supported(cfg.hidden_size, cfg.head_dim, cfg.intermediate_size)
        if w.device.type != "cpu" or w.dtype != torch.float32 or not fits:
            return False
        for layer in self.layers:
            layer.set_fused(True)
        return True

    def tie_lm_head(self) -> None:
        """Give tied embeddings an explicit (shared-weight) LM head module, so the head can
        be swapped for a faster implementation like any other linear layer."""
        if self.lm_head is None:
            self.lm_head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False,
                                     device=self.embed_tokens.weight.device, dtype=self.embed_tokens.weight.dtype)
            self.lm_head.weight = self.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_sampled, hidden] (pre-norm) -> fp32 logits [num_sampled, vocab]."""
        h = self.norm(hidden)
        if self.lm_head is None:
            return F.linear(h, self.embed_tokens.weight).float()
        return self.lm_head(h).float()
