"""Triton kernel: apply a token bitmask to the constrained rows of the logits, in place.

logits [B, V] float (any float dtype), bitmask [R, W] int32 (W = ceil(V / 32),
bit t % 32 of word t // 32 = token t allowed), rows [R] int64 (logits row of
each mask row). Grid (R, ceil(V / BLOCK)): each program unpacks BLOCK bits of
one mask row and writes -inf where a token is not allowed; allowed entries are
not written. Reference: `engine.structured.bitmask.apply_bitmask_torch`.
Verified on CPU under TRITON_INTERPRET=1 (tests/unit/test_bitmask_kernel.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _apply_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, vocab_size, logits_stride, mask_stride,
                          BLOCK: tl.constexpr):
    r = tl.program_id(0)
    block = tl.program_id(1)
    row = tl.load(rows_ptr + r)
    offs = block * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] token ids
    in_vocab = offs < vocab_size
    words = tl.load(bitmask_ptr + r * mask_stride + offs // 32, mask=in_vocab, other=0)  # [BLOCK]
    allowed = ((words >> (offs % 32)) & 1) != 0
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32)
    ptrs = logits_ptr + row * logits_stride + offs
    tl.store(ptrs, neg_inf.to(logits_ptr.dtype.element_ty), mask=in_vocab & ~allowed)


def apply_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    assert logits.dim() == 2 and logits.stride(1) == 1
    assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.shape[0] == rows.shape[0]
    num_rows, vocab = rows.shape[0], logits.shape[1]
    if num_rows == 0:
        return
    grid = (num_rows, triton.cdiv(vocab, BLOCK))
    _apply_bitmask_kernel[grid](logits, bitmask, rows.to(torch.int64), vocab, logits.stride(0),
                                bitmask.stride(0), BLOCK=BLOCK)
