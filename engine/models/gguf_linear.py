"""Linears and the embedding table kept in their GGUF block format, run by our CPU kernels.

Before a GGUF model's weights load, `use_native_kernels` takes the file's raw
blocks (`read_blocks`: q/k rows un-permuted like the fp32 ones) and replaces each linear whose tensors all have a native format
(Q4_0, Q4_1, Q8_0, Q4_K, Q6_K: `kernels.gguf_cpu.BLOCKS`) by a `GGUFLinear`, and a Q8_0 /
Q4 embedding table by a `GGUFEmbedding` that also serves as the tied LM head.
A tensor in any other format (e.g. Q5_K) keeps its fp32 module and is dequantized
at load; the native ones never are: the fallback is per tensor. Fused modules (q/k/v, gate/up) keep one block tensor per run of parts
in the same format (one kernel call for a fused module of one format).

Math: fp32 activations and accumulation over exactly gguf-py's dequantized
weights, so outputs equal the fp32 path up to summation order. Opt-in q8 mode
(`cpu_activation_quant="q8"`): calls on Q4_0/Q4_1/Q8_0 blocks quantize the activations
per 32-block and use integer dot products: on AVX-512 VNNI at every M over a packed copy
of the blocks (kernels/cpu/gguf_q8_tiles.cpp), elsewhere at one row only (gguf_q8.cpp).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from kernels import gguf_cpu

@dataclass(frozen=True)
class BlockTensor:
    """A GGUF tensor's raw blocks: data [rows, row_bytes] uint8, `cols` weights per row."""
    data: torch.Tensor
    qtype: int
    cols: int

    @property
    def rows(self) -> int:
        return self.data.shape[0]


def _merge_same_type(parts: Sequence[BlockTensor], copy: bool) -> list[BlockTensor]:
    """Adjacent parts of one format become one block tensor (rows concatenated), so a
    fused q/k/v or gate/up of one format is one kernel call (at one row, a step's 211
    linear calls cost more than their arithmetic). `copy`: every result is an owned tensor
    (a part alone is cloned out of the file map, which can then be dropped)."""
    runs: list[list[BlockTensor]] = []
    for p in parts:
        if runs and runs[-1][0].qtype == p.qtype:
            runs[-1].append(p)
        else:
            runs.append([p])
    out = []
    for run in runs:
        if len(run) > 1:
            out.append(BlockTensor(torch.cat([p.data for p in run]), run[0].qtype, run[0].cols))
        else:
            out.append(BlockTensor(run[0].data.clone(), run[0].qtype, run[0].cols) if copy else run[0])
    return out


class GGUFLinear(nn.Module):
    """y = x @ W^T (+ b) with W the row-wise concatenation of `parts` (all `in_features` wide).
    Each part's blocks are a buffer (`blocks{i}`), so they move with `.to()`."""

    def __init__(self, parts: Sequence[BlockTensor], bias: torch.Tensor | None = None, q8: bool = False,
                 copy: bool = True):
        super().__init__()
        parts = _merge_same_type(parts, copy)
        # q8 activations (opt-in), when every part has an integer kernel
        self.q8_capable = all(p.qtype in gguf_cpu.Q8_ACTIVATION_TYPES for p in parts)
        self.qtypes = [p.qtype for p in parts]
        self.part_rows = [p.rows for p in parts]
        self.in_features = parts[0].cols
        self.out_features = sum(self.part_rows)
        for i, p in enumerate(parts):
            self.register_buffer(f"blocks{i}", p.data, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.q8 = False
        self.q8_tiles: list[torch.Tensor] | None = None  # packed copies (VNNI), built with q8 on
        self.set_q8(q8)

    def set_q8(self, on: bool) -> bool:
        """q8 activations on or off (on only where every part has an integer kernel). On an
        AVX-512 VNNI CPU every call then runs the packed tiles (any M; the packed copy of the
        blocks is made once); elsewhere one-row calls run the q8 GEMV and the rest stay fp32."""
        self.q8 = on and self.q8_capable
        if self.q8 and self.q8_tiles is None and gguf_cpu.q8_tiles_fast():
            self.q8_tiles = [gguf_cpu.pack_q8_tiles(getattr(self, f"blocks{i}"), qtype, self.in_features)
                             for i, qtype in enumerate(self.qtypes)]
        return self.q8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()  # [M, K]
        if self.q8 and self.q8_tiles is not None:
            weights, op = self.q8_tiles, gguf_cpu.linear_q8_tiles
        else:
            weights = [getattr(self, f"blocks{i}") for i in range(len(self.qtypes))]
            op = gguf_cpu.linear_q8 if self.q8 and flat.shape[0] == 1 else gguf_cpu.linear
        outs = [op(flat, w, qtype, rows) for w, qtype, rows in zip(weights, self.qtypes, self.part_rows)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class GGUFEmbedding(nn.Module):
    """Rows of a quantized embedding table (a buffer, `blocks`), dequantized on lookup."""

    def __init__(self, table: BlockTensor):
        super().__init__()
        self.qtype, self.dim = table.qtype, table.cols
        self.register_buffer("blocks", table.data.clone(), persistent=False)  # owned: not the file map

    def as_linear(self, q8: bool) -> GGUFLinear:
        """The same blocks as a tied LM head (shared, not copied)."""
        return GGUFLinear([BlockTensor(self.blocks, self.qtype, self.dim)], q8=q8, copy=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = gguf_cpu.embedding(ids, self.blocks, self.qtype, self.dim)
        return out.view(*ids.shape, self.dim)


def read_blocks(path: Path, cfg) -> dict[str, BlockTensor]:
    """HF-style name -> raw blocks of every natively supported tensor of the GGUF file, views of
    its map (q/k rows un-permuted); the modules built on them copy each out once."""
    from engine.models.loader import _gguf_reader, _gguf_to_hf_name, _unpermute_rope

    out = {}
    for t in _gguf_reader(path).tensors:
        qtype = int(t.tensor_type)
        if qtype not in gguf_cpu.BLOCKS or len(t.shape) != 2:
            continue
        name = _gguf_to_hf_name(t.name)
        with warnings.catch_warnings():  # a read-only map: the kernels only ever read it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(t.data)  # [rows, row_bytes], memory-mapped from the file
        if cfg.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _unpermute_rope(data, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads).contiguous()
        out[name] = BlockTensor(data, qtype, int(t.shape[0]))
    return out


_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def use_native_kernels(model: nn.Module, blocks: dict[str, BlockTensor], q8: bool = False) -> frozenset[str]:
    """Swap every module whose weights all have native blocks; returns the checkpoint names now
    held in blocks. `q8`: one-row calls quantize their activations (`--cpu-activation-quant q8`).
    Runs before the weights load (biases and norms load into the new modules afterwards)."""
    used: set[str] = set()
    for i, layer in enumerate(model.layers):
        for attr in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            names = [f"layers.{i}.{part}.weight" for part in _PARTS.get(attr, (attr,))]
            if all(n in blocks for n in names):
                old = getattr(layer, attr)
                setattr(layer, attr, GGUFLinear([blocks[n] for n in names], old.bias, q8))
                used.update(names)
    table = blocks.get("embed_tokens.weight")
    if table is not None:
        model.embed_tokens = GGUFEmbedding(table)
        if model.lm_head is None:  # tied: the same blocks serve as the LM head
            model.lm_head = model.embed_tokens.as_linear(q8)
        used.add("embed_tokens.weight")
    head = blocks.get("lm_head.weight")
    if head is not None and model.lm_head is not None and not isinstance(model.lm_head, GGUFLinear):
        model.lm_head = GGUFLinear([head], q8=q8)
        used.add("lm_head.weight")
    return frozenset(used)
