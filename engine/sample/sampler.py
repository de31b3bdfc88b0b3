"""Sampler: one step of token selection for a batch of rows.

Processing order for logits [B, V] (all vectorized over the batch):
  0. raw logprobs = log_softmax(logits), only if some row wants logprobs
     (taken before anything below, like vLLM's default "raw_logprobs" and
     OpenAI: the reported logprobs ignore temperature, top-k and penalties)
  1. logit_bias -> 2. suppress_mask -> 3. repetition penalty
     -> 4. frequency/presence
     bias is additive; suppressed tokens become -inf; repetition uses HF
     semantics on tokens seen in prompt OR output (logit > 0 ? logit / rp :
     logit * rp); frequency/presence use OpenAI semantics on output tokens
     only (logit -= freq * count + presence * (count > 0)). Each is skipped
     when its optional metadata tensor is None and is a no-op for rows at the
     neutral value (bias 0, rp 1.0, penalties 0.0).
  4b. grammar bitmask (constrained rows only): disallowed tokens -> -inf,
     applied after 1-4 and before 5-10, so every selection path is constrained;
     a row the suppress mask left with nothing allowed falls back to its
     pre-penalty logits under the grammar (the grammar wins over min_tokens).
  5. greedy rows (temperature < 1e-5) take argmax here; they consume no
     randomness and skip everything below
  6. temperature (random rows only)
  7. top-k -> 8. top-p     (one shared descending sort, mixed rows handled by
                            masking; disabled rows keep their whole vocab)
  9. min-p                 (on the renormalised probs after top-k/top-p)
 10. sample by inverting the row's CDF at one uniform u: the first token whose
     float64 cumulative weight exceeds u * total. Exact for Categorical(probs),
     O(V) per row with no host sync (an exponential race would draw V random
     numbers per row: ~0.75 ms a row on this CPU against ~0.02 ms here).

Randomness: a seeded row's u is a pure function of its `noise_seed` =
position_seed(request seed, output position) (its top 53 bits; a Python loop
over seeded rows only); all other random rows share one batched torch.rand from
the global RNG. The draw of a seeded token thus depends only on (seed,
position): the same seed gives the same tokens alone or batched, after a
retried step, and whether a speculative step samples one position of the
request or k + 1 of them (engine/spec/verify.py).

No .item()/.tolist() here: every decision that needs host knowledge comes
from the host-side fields of SamplingMetadata.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.sample.metadata import GREEDY_EPS, SamplingMetadata
from engine.structured.bitmask import GrammarBitmask, constrain


# ----------------------------------------------------------- penalties (1-4)


def apply_logit_bias(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    if meta.logit_bias is not None:
        logits.add_(meta.logit_bias)  # [B, V] += [B, V]
    return logits


def apply_suppress_mask(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    if meta.suppress_mask is not None:
        logits.masked_fill_(meta.suppress_mask, float("-inf"))  # [B, V]
    return logits


def _seen_mask(meta: SamplingMetadata) -> Tensor | None:
    """[B, V] bool: token occurs in the prompt or in the output so far."""
    seen = meta.prompt_token_mask
    if meta.output_token_counts is not None:
        in_output = meta.output_token_counts > 0  # [B, V]
        seen = in_output if seen is None else seen | in_output
    return seen


def apply_repetition_penalty(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """HF/CTRL repetition penalty. Runs only when the builder saw a row with
    repetition_penalty != 1 (it then builds prompt_token_mask)."""
    if meta.prompt_token_mask is None:
        return logits
    seen = _seen_mask(meta)  # [B, V]
    rp = meta.repetition_penalty.to(logits.dtype).unsqueeze(1)  # [B, 1]
    penalized = torch.where(logits > 0, logits / rp, logits * rp)  # [B, V]
    # where() allocates; copy back so callers may rely on in-place semantics.
    logits.copy_(torch.where(seen, penalized, logits))
    return logits


def apply_frequency_presence(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """OpenAI frequency/presence penalties over generated tokens only."""
    counts = meta.output_token_counts
    if counts is None:
        return logits
    counts_f = counts.to(logits.dtype)  # [B, V]
    freq = meta.frequency_penalty.to(logits.dtype).unsqueeze(1)  # [B, 1]
    pres = meta.presence_penalty.to(logits.dtype).unsqueeze(1)  # [B, 1]
    logits.sub_(counts_f * freq)
    logits.sub_((counts > 0).to(logits.dtype) * pres)
    return logits


def apply_penalties(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """Steps 1-4 above, in order. Applies to greedy and random rows alike."""
    logits = apply_logit_bias(logits, meta)
    logits = apply_suppress_mask(logits, meta)
    logits = apply_repetition_penalty(logits, meta)
    logits = apply_frequency_presence(logits, meta)
    return logits


# ----------------------------------------------------------- sampling (5-10)


@dataclass(frozen=True)
class SamplerOutput:
    sampled_token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] float32, raw logprob of the sampled token
    topk_token_ids: Tensor | None  # [B, max_num_logprobs] int64, most likely first
    topk_logprobs: Tensor | None  # [B, max_num_logprobs] float32
    sampled_ranks: Tensor | None  # [B] int64, 1 = most likely under raw logits


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus.

    logits [B, V]; top_k [B] int64 (0 = disabled) or None; top_p [B] float32
    (1.0 = disabled) or None. Returns a new [B, V] tensor with dropped tokens
    at -inf. Top-k is by position in the sorted order, so exactly k tokens
    survive even with ties. Top-p keeps the smallest prefix of the sorted
    distribution (renormalised after top-k) whose mass reaches top_p; the top
    token is always kept.
    """
    vocab = logits.shape[-1]
    # Stable sort: ties resolve the same way regardless of the batch around a row.
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).clamp(1, vocab)  # [B], disabled -> V
        pos = torch.arange(vocab, device=logits.device)  # [V]
        sorted_logits.masked_fill_(pos.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [B, V], descending
        mass_before = probs.cumsum(dim=-1) - probs  # [B, V] exclusive cumsum
        drop = mass_before >= top_p.unsqueeze(1)  # [B, V]
        drop &= (top_p < 1.0).unsqueeze(1)  # disabled rows: no float-rounding drops
        drop[:, 0] = False  # invariant: the most likely token always survives
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def apply_min_p(probs: Tensor, min_p: Tensor) -> Tensor:
    """Zero probs < min_p * max prob of the row. probs [B, V], min_p [B].

    min_p = 0 keeps everything; the max token always survives (min_p <= 1).
    The result is not renormalised: inverse-CDF sampling scales u by the row's total.
    """
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [B, 1]
    return probs.masked_fill_(probs < threshold, 0.0)


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for token `position` of a request seeded with `seed`
    (splitmix64 of the pair: nearby pairs give unrelated seeds)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


_U_MAX = 1.0 - 2.0 ** -40  # u * total stays below the row's last cumulative weight


def uniforms(noise_seeds: list[int | None], device: torch.device) -> Tensor:
    """u [B] float64 in [0, 1): seeded rows from their key's top 53 bits, rest batched."""
    u = torch.rand(len(noise_seeds), dtype=torch.float64)  # [B], global RNG
    seeded = [(i, (seed >> 10) * 2.0 ** -53) for i, seed in enumerate(noise_seeds) if seed is not None]
    if seeded:  # loop over seeded rows only
        rows, values = zip(*seeded)
        u[list(rows)] = torch.tensor(values, dtype=torch.float64)
    return u.clamp_max_(_U_MAX).to(device)


def random_probs(logits: Tensor, meta: SamplingMetadata, greedy: Tensor) -> Tensor:
    """Steps 6-9 on processed logits [B, V] (clobbered): the unnormalised distribution
    [B, V] each random row samples from (greedy rows: garbage-but-valid)."""
    temperature = torch.where(greedy, 1.0, meta.temperature.to(logits.dtype))  # [B]
    logits = logits.div_(temperature.unsqueeze(1))
    top_k = None if meta.no_top_k else meta.top_k
    top_p = None if meta.no_top_p else meta.top_p
    if top_k is not None or top_p is not None:
        logits = apply_top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)  # [B, V]
    if not meta.no_min_p:
        probs = apply_min_p(probs, meta.min_p)
    return probs


def sample_random(logits: Tensor, meta: SamplingMetadata, greedy: Tensor) -> Tensor:
    """Steps 6-10 on processed logits [B, V]; returns [B] int64 token ids.

    Values for greedy rows are garbage-but-valid (the caller overwrites them).
    """
    probs = random_probs(logits, meta, greedy)  # [B, V], unnormalised
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [B, V]
    target = uniforms(meta.noise_seeds, probs.device) * cdf[:, -1]  # [B], < each row's total
    # right=True: the first token whose cumulative weight exceeds the target, so a token
    # of weight 0 (same cdf as the token before it) is never chosen.
    ids = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)  # [B]
    return ids.clamp_max_(probs.shape[-1] - 1)


def gather_logprobs(
    raw_logprobs: Tensor, sampled: Tensor, num_logprobs: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """raw_logprobs [B, V], sampled [B] -> (sampled lp [B], top ids [B, n],
    top lps [B, n], ranks [B]). Rank = 1 + #tokens strictly more likely."""
    sampled_lp = raw_logprobs.gather(1, sampled.unsqueeze(1))  # [B, 1]
    ranks = (raw_logprobs > sampled_lp).sum(dim=-1) + 1  # [B] int64
    top_lp, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)  # [B, n], sorted desc
    return sampled_lp.squeeze(1), top_ids, top_lp, ranks


class Sampler:
    """Stateless; `__call__` may modify `logits` in place."""

    def __call__(self, logits: Tensor, meta: SamplingMetadata,
                 grammar: GrammarBitmask | None = None) -> SamplerOutput:
        if logits.dtype != torch.float32:
            logits = logits.float()  # [B, V] float32
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=-1)  # [B, V], new tensor
        # Only the suppress mask can leave a constrained row with no finite logit; keep
        # those rows' pre-penalty logits so the grammar can win (see `constrain`).
        before = None
        if grammar is not None and meta.suppress_mask is not None:
            before = logits.index_select(0, grammar.rows)  # [R, V]
        logits = apply_penalties(logits, meta)
        if grammar is not None:  # 4b. the grammar mask, last: it wins over bias and min_tokens
            constrain(logits, grammar, before)
        sampled = self._select(logits, meta)  # [B] int64
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None, None)
        lp, top_ids, top_lp, ranks = gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, lp, top_ids, top_lp, ranks)

    @staticmethod
    def probs(logits: Tensor, meta: SamplingMetadata) -> Tensor:
        """The normalised distribution [B, V] `__call__` would sample each row from (steps
        1-9; a greedy row is one-hot on its argmax). Modifies `logits` in place. For
        rejection sampling of drafts drawn from another distribution (engine/spec/rejection.py)."""
        logits = apply_penalties(logits.float(), meta)
        greedy = meta.temperature < GREEDY_EPS  # [B]
        onehot = torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = random_probs(logits, meta, greedy)
        probs = probs / probs.sum(-1, keepdim=True)
        return torch.where(greedy[:, None], onehot, probs)

    @staticmethod
    def _select(logits: Tensor, meta: SamplingMetadata) -> Tensor:
        """Greedy argmax and/or random sampling on penalised logits [B, V]."""
        if meta.all_greedy:
            return logits.argmax(dim=-1)
        greedy_ids = None if meta.all_random else logits.argmax(dim=-1)  # [B]
        greedy = meta.temperature < GREEDY_EPS  # [B] bool
        random_ids = sample_random(logits, meta, greedy)  # clobbers logits
        if greedy_ids is None:
            return random_ids
        return torch.where(greedy, greedy_ids, random_ids)
