"""Triton kernel: lossless rejection sampling of drafts, one program per request.

Same contract as the torch reference `engine.spec.rejection.rejection_sample_torch`
(see there for the batch layout and the maths). Program r walks its k_r draft
positions, accepting while u * q(d) < p(d), then draws the correction token
(from max(0, p - q) at the first rejection, p when the residual is empty) or
the bonus token (from p after k_r acceptances) as argmax(w / E) over the
vocabulary in BLOCK-wide chunks, and writes tokens [max_k + 1] (-1 padded).
fp32 inside the kernel whatever the input dtype. Verified on CPU under
TRITON_INTERPRET=1 (tests/unit/test_rejection_kernel.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.spec.rejection import DraftBatch

BLOCK = 1024


@triton.jit
def _rejection_kernel(p_ptr, q_ptr, ids_ptr, k_ptr, d_start_ptr, u_ptr, e_ptr, out_ptr, acc_ptr, vocab,
                      out_stride, HAS_Q: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    k = tl.load(k_ptr + r)
    d0 = tl.load(d_start_ptr + r)
    t0 = d0 + r  # target rows: k_r drafts then the bonus row
    num_acc = 0
    running = 1  # 1 while every draft so far was accepted
    for j in range(0, k):
        d = tl.load(ids_ptr + d0 + j)
        p_d = tl.load(p_ptr + (t0 + j) * vocab + d).to(tl.float32)
        if HAS_Q:
            q_d = tl.load(q_ptr + (d0 + j) * vocab + d).to(tl.float32)
        else:
            q_d = 1.0
        u = tl.load(u_ptr + d0 + j).to(tl.float32)
        ok = (u * q_d < p_d).to(tl.int32) * running
        tl.store(out_ptr + r * out_stride + j, d, mask=ok != 0)
        num_acc += ok
        running = ok
    rejected = num_acc < k
    row = t0 + num_acc
    q_row = tl.where(rejected, d0 + num_acc, 0)  # a safe row when nothing was rejected (unused)
    rej_d = tl.load(ids_ptr + q_row)
    best_res = -1.0
    arg_res = 0
    best_p = -1.0
    arg_p = 0
    res_sum = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)  # [BLOCK] token ids
        inside = offs < vocab
        p = tl.load(p_ptr + row * vocab + offs, mask=inside, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + row * vocab + offs, mask=inside, other=1.0).to(tl.float32)
        if HAS_Q:
            q = tl.load(q_ptr + q_row * vocab + offs, mask=inside, other=0.0).to(tl.float32)
        else:
            q = tl.where(offs == rej_d, 1.0, 0.0)
        res = tl.maximum(p - q, 0.0)
        res_sum += tl.sum(res, axis=0)
        s_res = tl.where(inside, res / e, -1.0)
        s_p = tl.where(inside, p / e, -1.0)
        m_res = tl.max(s_res, axis=0)
        m_p = tl.max(s_p, axis=0)
        i_res = tl.argmax(s_res, axis=0) + start
        i_p = tl.argmax(s_p, axis=0) + start
        arg_res = tl.where(m_res > best_res, i_res, arg_res)
        best_res = tl.maximum(m_res, best_res)
        arg_p = tl.where(m_p > best_p, i_p, arg_p)
        best_p = tl.maximum(m_p, best_p)
    use_res = rejected & (res_sum > 0.0)
    final = tl.where(use_res, arg_res, arg_p)
    tl.store(out_ptr + r * out_stride + num_acc, final.to(tl.int64))
    tl.store(acc_ptr + r, num_acc.to(tl.int64))


def rejection_sample_triton(batch: DraftBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens [R, max_k + 1], num_accepted [R]), as `rejection_sample_torch`."""
    p = batch.target_probs.contiguous()
    k = batch.num_drafts.to(torch.int64)
    num_req, vocab = k.shape[0], p.shape[1]
    max_k = int(k.max()) if num_req else 0
    out = torch.full((num_req, max_k + 1), -1, dtype=torch.int64, device=p.device)
    num_acc = torch.zeros(num_req, dtype=torch.int64, device=p.device)
    if num_req == 0:
        return out, num_acc
    d_start = torch.cumsum(k, 0) - k
    ids = batch.draft_ids.to(torch.int64)
    if ids.numel() == 0:  # keep a valid pointer
        ids = torch.zeros(1, dtype=torch.int64, device=p.device)
    q = batch.draft_probs.contiguous() if batch.draft_probs is not None else p
    u = batch.uniform if batch.uniform.numel() else torch.zeros(1, device=p.device)
    _rejection_kernel[(num_req,)](p, q, ids, k, d_start, u, batch.exp_noise.contiguous(), out, num_acc,
                                  vocab, out.stride(0), HAS_Q=batch.draft_probs is not None, BLOCK=BLOCK)
    return out, num_acc
