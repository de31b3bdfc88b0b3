"""Lossless rejection sampling of drafts with a general draft distribution q (torch reference).

For a drafter whose proposals are sampled from a distribution q (a draft
model, a layer-skipping target), draft d_i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection the output token is drawn
from norm(max(0, p_i - q_i)), and when all k drafts are accepted a bonus token
is drawn from p_k. The emitted tokens are then distributed exactly as k + 1
sequential draws from p (Leviathan et al. 2023; Chen et al. 2023). A
deterministic drafter is the special case q = one-hot(d_i) (`draft_probs=None`):
accept with probability p_i(d_i), resample from p_i without d_i.

Batch layout (flattened over requests r = 0..R-1 with k_r drafts each):
    target_probs  [T, V]  T = sum(k_r + 1): k_r draft positions then the bonus row
    draft_probs   [D, V]  D = sum(k_r), or None for one-hot q
    draft_ids     [D]     int64
    num_drafts    [R]     int64 (k_r; 0 = plain sampling from the bonus row)
    uniform       [D]     U[0, 1) acceptance draws
    exp_noise     [T, V]  Exp(1) draws; a draw from weights w is argmax(w / E)
Output: tokens [R, max_k + 1] int64 (accepted drafts, then the correction or
bonus token, then -1), num_accepted [R]. The Triton kernel in
`kernels/rejection.py` implements the same contract for the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftBatch:
    target_probs: torch.Tensor  # [T, V]
    draft_probs: torch.Tensor | None  # [D, V] or None (one-hot q)
    draft_ids: torch.Tensor  # [D] int64
    num_drafts: torch.Tensor  # [R] int64
    uniform: torch.Tensor  # [D]
    exp_noise: torch.Tensor  # [T, V]


def rejection_sample_torch(batch: DraftBatch, residual_is_p: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (tokens [R, max_k + 1], num_accepted [R]). `residual_is_p` swaps the residual for
    p: a deliberately wrong sampler, kept so tests can show they detect the bias."""
    p, k = batch.target_probs, batch.num_drafts
    num_req = k.shape[0]
    max_k = int(k.max()) if num_req else 0
    d_start = torch.cumsum(k, 0) - k  # [R] first draft row of r
    t_start = d_start + torch.arange(num_req)  # [R] first target row of r
    j = torch.arange(max_k)
    valid = j < k[:, None]  # [R, max_k]
    d_rows = torch.where(valid, d_start[:, None] + j, 0)  # [R, max_k]
    t_rows = t_start[:, None] + j  # [R, max_k]
    drafts = batch.draft_ids[d_rows] if batch.draft_ids.numel() else torch.zeros_like(d_rows)
    p_d = p[torch.where(valid, t_rows, 0), drafts]  # [R, max_k]
    q_d = torch.ones_like(p_d) if batch.draft_probs is None else batch.draft_probs[d_rows, drafts]
    accept = (batch.uniform[d_rows] * q_d < p_d) & valid  # u < p/q without dividing by q
    num_acc = torch.cumprod(accept.long(), 1).sum(1) if max_k else torch.zeros(num_req, dtype=torch.long)

    final_row = t_start + num_acc  # [R] the rejected position, or the bonus row
    rejected = num_acc < k
    weights = p[final_row].clone()  # [R, V]
    if not residual_is_p and bool(rejected.any()):
        rej_d = (d_start + num_acc)[rejected]
        q = batch.draft_probs[rej_d] if batch.draft_probs is not None else \
            torch.zeros_like(weights[rejected]).scatter_(1, batch.draft_ids[rej_d, None], 1.0)
        residual = (weights[rejected] - q).clamp_min(0)
        # p == q on the support leaves no residual; rejection then had probability 0, keep p.
        empty = residual.sum(1) <= 0
        weights[rejected] = torch.where(empty[:, None], weights[rejected], residual)
    final = (weights / batch.exp_noise[final_row]).argmax(1)  # [R]

    tokens = torch.full((num_req, max_k + 1), -1, dtype=torch.long)
    keep = j < num_acc[:, None]
    tokens[:, :max_k] = torch.where(keep, drafts, -1)
    tokens[torch.arange(num_req), num_acc] = final
    return tokens, num_acc
