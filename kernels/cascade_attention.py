"""Triton kernels: paged attention returning the log-sum-exp, and Hydragen-style shared-prefix
(cascade) attention with the exact log-sum-exp merge.

Layout (fixed). Per layer `kv_cache` [num_blocks, 2, page, HKV, D] (fp32/fp16/bf16), read
through its flat row view `flat = kv_cache.view(num_blocks * 2 * page, HKV, D)`: the K of
(block b, offset o) is flat row 2 * b * page + o, its V is that row + page. Queries
q [T, H, D] (T tokens flattened over requests); GQA: query head h reads KV head h // G,
G = H // HKV. Scores are q . k * scale; lse [T, H] fp32 is the natural log of
sum(exp(scores)) over the attended keys; out has q's dtype. Inside the kernels scores,
softmax statistics and accumulators are fp32; the tl.dot operands are fp32 (IEEE, no TF32)
for fp32 or mixed-dtype inputs, and for same-dtype fp16/bf16 inputs q, k, v in their dtype
with the probabilities rounded to it for PV (fp32 accumulation, as FlashAttention).

- `paged_attention_lse`: token t of request r = token_req[t] attends to the keys i in
  key_indptr[r]:key_indptr[r + 1] (flat K rows key_rows[i], slots key_slot[i], any order)
  with key_slot[i] <= token_slot[t], and, when tree_start[r] >= 0 and key_slot[i] >=
  tree_start[r], only if tree_mask[t, key_slot[i] - tree_start[r]] != 0 (the draft tree's
  ancestor row). Grid (T, HKV): one program per (token, KV head) holds the G query heads
  of that KV head (padded to 16 rows for tl.dot) and walks the keys in PAGED_BLOCK_N
  chunks with an online softmax, so each key is read once for the whole GQA group.
- `prefix_attention_lse`: the queries q[q_index] against all the keys key_rows [P] (a
  shared prefix), non-causal. Grid (HKV, cdiv(N * G, PREFIX_BLOCK_M)): a program's rows are
  (query token, head of the KV head's group) pairs, each K/V tile is loaded once per
  program and QK^T, PV are tl.dot products, so the prefix KV is read once per group.
- `merge_lse_`: in place, (out, lse)[index[i]] := the exact merge with (part_out, part_lse)[i].

Each has a plain torch reference `*_torch` (`merge_lse_torch_` for the in-place merge).
A token with no attended key gets out = 0 and lse = -inf (both in kernels and references),
and merging with lse = -inf is a no-op. Verified on CPU under TRITON_INTERPRET=1
(tests/unit/test_cascade_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PAGED_BLOCK_N = 32  # keys per chunk of the paged kernel
PREFIX_BLOCK_M = 64  # (query token, head) rows per prefix program; tl.dot needs >= 16
PREFIX_BLOCK_N = 64  # prefix keys per tile; tl.dot needs >= 16


def _flat(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 2, page, HKV, D] -> flat rows [num_blocks * 2 * page, HKV, D] (a view)."""
    assert kv_cache.dim() == 5 and kv_cache.shape[1] == 2, kv_cache.shape
    nb, _, page, hkv, d = kv_cache.shape
    return kv_cache.view(nb * 2 * page, hkv, d)


def _dot_f32(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """fp32 or mixed dtypes: tl.dot in IEEE fp32; same-dtype half inputs: the tensor-core dot."""
    return kv_cache.dtype == torch.float32 or q.dtype != kv_cache.dtype


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # a power of two, >= 16 for tl.dot


def _rows_f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float32 else x


@triton.jit
def _attend_tile(m_i, l_i, acc, q, k, v, keep, scale, DOT_F32: tl.constexpr):
    """One online-softmax step over a key tile. m_i, l_i [M] fp32 running max / sum of exp,
    acc [M, BD] fp32, q [M, BD] (fp32 if DOT_F32, else the cache dtype), k/v [N, BD] cache
    dtype, keep [N] bool (False = masked key) -> updated (m_i, l_i, acc)."""
    if DOT_F32:  # exact fp32 products (no TF32)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:  # half operands (exact products), fp32 accumulation
        s = tl.dot(q, tl.trans(k))
    s = tl.where(keep[None, :], s * scale, float("-inf"))  # [M, N] fp32
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key kept yet: keep exp() finite
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])  # [M, N], 0 where masked
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:  # p rounded to the cache dtype for the tensor cores, as FlashAttention
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _store_rows(out_ptr, lse_ptr, out_off, out_ok, lse_off, lse_ok, acc, m_i, l_i):
    """out = acc / l ([M, BD] offsets / mask), lse = m + log(l) ([M]); a row with no key
    gets out = 0 and lse = -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    tl.store(out_ptr + out_off, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)
    tl.store(lse_ptr + lse_off, tl.where(empty, float("-inf"), m_i + tl.log(l_safe)), mask=lse_ok)


@triton.jit
def _paged_lse_kernel(q_ptr, kv_ptr, out_ptr, lse_ptr, token_req_ptr, token_slot_ptr, key_indptr_ptr,
                      key_rows_ptr, key_slot_ptr, tree_start_ptr, tree_mask_ptr, scale, page, G, D, max_q,
                      q_st, q_sh, kv_sr, kv_sh, mask_st, H: tl.constexpr, HAS_TREE: tl.constexpr,
                      DOT_F32: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.load(token_req_ptr + t)
    my_slot = tl.load(token_slot_ptr + t)
    k_lo = tl.load(key_indptr_ptr + r)
    k_hi = tl.load(key_indptr_ptr + r + 1)
    offs_g = tl.arange(0, BLOCK_G)  # [BLOCK_G] heads of this KV head's group (padded to >= 16)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    heads = kvh * G + offs_g
    qd_ok = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + t * q_st + heads[:, None] * q_sh + offs_d[None, :], mask=qd_ok, other=0.0)
    q = q.to(tl.float32) if DOT_F32 else q.to(kv_ptr.dtype.element_ty)  # [BLOCK_G, BLOCK_D]
    if HAS_TREE:
        tree_lo = tl.load(tree_start_ptr + r)
        # No tree (-1): a start past every slot, so no key is "in the tree". (A scalar
        # compare & a vector compare gives int32 in the interpreter, not a bool mask.)
        tree_lo = tl.where(tree_lo >= 0, tree_lo, 1 << 30)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(k_lo, k_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key indices
        inside = offs_n < k_hi
        rows = tl.load(key_rows_ptr + offs_n, mask=inside, other=0).to(tl.int64)
        slot = tl.load(key_slot_ptr + offs_n, mask=inside, other=0)
        keep = inside & (slot <= my_slot)
        if HAS_TREE:
            rel = slot - tree_lo  # position among the request's query tokens
            in_tree = rel >= 0
            anc = tl.load(tree_mask_ptr + t * mask_st + rel, mask=keep & in_tree & (rel < max_q), other=0)
            keep = keep & (~in_tree | (anc != 0))
        kv_off = rows[:, None] * kv_sr + kvh * kv_sh + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        kd_ok = inside[:, None] & d_ok[None, :]
        k = tl.load(kv_ptr + kv_off, mask=kd_ok, other=0.0)
        v = tl.load(kv_ptr + kv_off + page * kv_sr, mask=kd_ok, other=0.0)
        m_i, l_i, acc = _attend_tile(m_i, l_i, acc, q, k, v, keep, scale, DOT_F32)
    _store_rows(out_ptr, lse_ptr, (t * H + heads[:, None]) * D + offs_d[None, :], qd_ok, t * H + heads, g_ok,
                acc, m_i, l_i)


def paged_attention_lse(q, kv_cache, scale, token_req, token_slot, key_indptr, key_rows, key_slot,
                        tree_start=None, tree_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [T, H, D] q.dtype, lse [T, H] fp32); see the module docstring for the contract."""
    flat = _flat(kv_cache)
    T, H, D = q.shape
    page, hkv = kv_cache.shape[2], kv_cache.shape[3]
    assert H % hkv == 0 and flat.stride(2) == 1 and D == kv_cache.shape[4]
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    has_tree = tree_start is not None
    if has_tree:
        tree_mask = tree_mask.view(torch.int8) if tree_mask.dtype == torch.bool else tree_mask
        assert tree_mask.dim() == 2 and tree_mask.shape[0] == T and tree_mask.stride(1) == 1
    else:  # valid dummy pointers, never read
        tree_start, tree_mask = token_req, token_req.view(1, -1)
    key_rows = key_rows if key_rows.numel() else torch.zeros(1, dtype=torch.int32, device=q.device)
    key_slot = key_slot if key_slot.numel() else key_rows
    G = H // hkv
    _paged_lse_kernel[(T, hkv)](
        q, flat, out, lse, token_req, token_slot, key_indptr, key_rows, key_slot, tree_start, tree_mask,
        float(scale), page, G, D, tree_mask.shape[1], q.stride(0), q.stride(1), flat.stride(0), flat.stride(1),
        tree_mask.stride(0), H=H, HAS_TREE=has_tree, DOT_F32=_dot_f32(q, kv_cache),
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=PAGED_BLOCK_N, BLOCK_D=_block_d(D))
    return out, lse


@triton.jit
def _prefix_lse_kernel(q_ptr, kv_ptr, out_ptr, lse_ptr, q_index_ptr, key_rows_ptr, scale, page, G, D,
                       num_rows, num_keys, q_st, q_sh, kv_sr, kv_sh, H: tl.constexpr, DOT_F32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    kvh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] row = n * G + g
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < num_rows
    d_ok = offs_d < D
    qd_ok = m_ok[:, None] & d_ok[None, :]
    n = offs_m // G  # [BLOCK_M] index into q_index
    tok = tl.load(q_index_ptr + n, mask=m_ok, other=0).to(tl.int64)  # [BLOCK_M] token of each row
    head = kvh * G + offs_m % G  # [BLOCK_M] query head of each row
    q = tl.load(q_ptr + tok[:, None] * q_st + head[:, None] * q_sh + offs_d[None, :], mask=qd_ok, other=0.0)
    q = q.to(tl.float32) if DOT_F32 else q.to(kv_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, num_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] prefix key indices
        inside = offs_n < num_keys
        rows = tl.load(key_rows_ptr + offs_n, mask=inside, other=0).to(tl.int64)
        kv_off = rows[:, None] * kv_sr + kvh * kv_sh + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        kd_ok = inside[:, None] & d_ok[None, :]
        k = tl.load(kv_ptr + kv_off, mask=kd_ok, other=0.0)  # loaded once for all BLOCK_M rows
        v = tl.load(kv_ptr + kv_off + page * kv_sr, mask=kd_ok, other=0.0)
        m_i, l_i, acc = _attend_tile(m_i, l_i, acc, q, k, v, inside, scale, DOT_F32)
    out_row = n * H + head  # out [N, H, D], lse [N, H]
    _store_rows(out_ptr, lse_ptr, out_row[:, None] * D + offs_d[None, :], qd_ok, out_row, m_ok, acc, m_i, l_i)


def prefix_attention_lse(q, kv_cache, scale, q_index, key_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [N, H, D] q.dtype, lse [N, H] fp32): q[q_index] against all of key_rows, non-causal."""
    flat = _flat(kv_cache)
    _, H, D = q.shape
    page, hkv = kv_cache.shape[2], kv_cache.shape[3]
    assert H % hkv == 0 and flat.stride(2) == 1 and D == kv_cache.shape[4]
    q = q if q.stride(2) == 1 else q.contiguous()
    N, P, G = q_index.shape[0], key_rows.shape[0], H // hkv
    out = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, H, dtype=torch.float32, device=q.device)
    if N == 0:
        return out, lse
    key_rows = key_rows if P else torch.zeros(1, dtype=torch.int32, device=q.device)
    grid = (hkv, triton.cdiv(N * G, PREFIX_BLOCK_M))
    _prefix_lse_kernel[grid](
        q, flat, out, lse, q_index, key_rows, float(scale), page, G, D, N * G, P, q.stride(0), q.stride(1),
        flat.stride(0), flat.stride(1), H=H, DOT_F32=_dot_f32(q, kv_cache), BLOCK_M=PREFIX_BLOCK_M,
        BLOCK_N=PREFIX_BLOCK_N, BLOCK_D=_block_d(D))
    return out, lse


@triton.jit
def _merge_lse_kernel(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, index_ptr, H, D, o_st, o_sh, p_st, p_sh,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    t = tl.load(index_ptr + i).to(tl.int64)  # the token whose (out, lse) row is merged
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    hd_ok = h_ok[:, None] & (offs_d < D)[None, :]
    l1 = tl.load(lse_ptr + t * H + offs_h, mask=h_ok, other=float("-inf"))  # [BLOCK_H]
    l2 = tl.load(part_lse_ptr + i * H + offs_h, mask=h_ok, other=float("-inf"))
    o_ptrs = out_ptr + t * o_st + offs_h[:, None] * o_sh + offs_d[None, :]  # [BLOCK_H, BLOCK_D]
    o1 = tl.load(o_ptrs, mask=hd_ok, other=0.0).to(tl.float32)
    o2 = tl.load(part_out_ptr + i * p_st + offs_h[:, None] * p_sh + offs_d[None, :], mask=hd_ok,
                 other=0.0).to(tl.float32)
    m = tl.maximum(l1, l2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # both parts empty: weights 0, stays empty
    w1 = tl.exp(l1 - m_safe)
    w2 = tl.exp(l2 - m_safe)
    w = w1 + w2
    w_safe = tl.where(w == 0.0, 1.0, w)
    merged = (o1 * w1[:, None] + o2 * w2[:, None]) / w_safe[:, None]
    tl.store(o_ptrs, merged.to(out_ptr.dtype.element_ty), mask=hd_ok)
    tl.store(lse_ptr + t * H + offs_h, tl.where(w == 0.0, float("-inf"), m_safe + tl.log(w_safe)), mask=h_ok)


def merge_lse_(out, lse, part_out, part_lse, index) -> None:
    """In place: (out [T, H, D], lse [T, H] fp32)[index[i]] merged with (part_out [N, H, D],
    part_lse [N, H])[i]; index [N] holds unique token indices."""
    T, H, D = out.shape
    assert lse.dtype == torch.float32 and lse.shape == (T, H) and lse.is_contiguous()
    assert part_out.shape == (index.shape[0], H, D) and part_lse.shape == (index.shape[0], H)
    assert out.stride(2) == 1
    if index.shape[0] == 0:
        return
    part_out = part_out if part_out.stride(2) == 1 else part_out.contiguous()
    part_lse = _rows_f32(part_lse).contiguous()
    _merge_lse_kernel[(index.shape[0],)](
        out, lse, part_out, part_lse, index, H, D, out.stride(0), out.stride(1), part_out.stride(0),
        part_out.stride(1), BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D))


# ---- torch references (plain ops, loops over requests) ----

def _attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, H, D], k/v [S, HKV, D], allowed [n, S] bool -> (out [n, H, D] fp32, lse [n, H] fp32)."""
    g = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(g, dim=1)  # [S, H, D]: query head h reads KV head h // g
    v = v.float().repeat_interleave(g, dim=1)
    scores = torch.einsum("nhd,shd->nhs", q.float(), k) * scale
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [n, H], -inf with no key
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("nhs,shd->nhd", probs, v), lse


def paged_attention_lse_torch(q, kv_cache, scale, token_req, token_slot, key_indptr, key_rows, key_slot,
                              tree_start=None, tree_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `paged_attention_lse`, one request at a time."""
    flat, page = _flat(kv_cache), kv_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    ptr = key_indptr.tolist()
    for r in range(len(ptr) - 1):
        toks = (token_req == r).nonzero().flatten()
        if toks.numel() == 0:
            continue
        rows = key_rows[ptr[r]:ptr[r + 1]].long()
        slots = key_slot[ptr[r]:ptr[r + 1]].long()
        allowed = slots[None, :] <= token_slot[toks].long()[:, None]  # [n, S]
        if tree_start is not None and int(tree_start[r]) >= 0:
            rel = slots - int(tree_start[r])
            in_tree = rel >= 0
            anc = tree_mask[toks][:, rel.clamp(0, tree_mask.shape[1] - 1)] != 0  # [n, S]
            allowed &= ~in_tree[None, :] | anc
        out[toks], lse[toks] = _attend_torch(q[toks], flat[rows], flat[rows + page], allowed, scale)
    return out.to(q.dtype), lse


def prefix_attention_lse_torch(q, kv_cache, scale, q_index, key_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `prefix_attention_lse`."""
    flat, page = _flat(kv_cache), kv_cache.shape[2]
    rows = key_rows.long()
    qs = q[q_index.long()]
    allowed = torch.ones(qs.shape[0], rows.shape[0], dtype=torch.bool, device=q.device)
    out, lse = _attend_torch(qs, flat[rows], flat[rows + page], allowed, scale)
    return out.to(q.dtype), lse


def merge_lse_torch_(out, lse, part_out, part_lse, index) -> None:
    """Reference for `merge_lse_`: the literal max-shifted log-sum-exp merge."""
    idx = index.long()
    l1, l2 = lse[idx], _rows_f32(part_lse)
    o1, o2 = out[idx].float(), part_out.float()
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), 0.0, m)  # both -inf (empty parts): weights 0
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    w = w1 + w2
    w_safe = torch.where(w == 0, 1.0, w)
    out[idx] = ((o1 * w1[..., None] + o2 * w2[..., None]) / w_safe[..., None]).to(out.dtype)
    lse[idx] = torch.where(w == 0, float("-inf"), m + torch.log(w_safe))
