"""SamplingMetadata: the per-step, batched form of the rows' SamplingParams.

The model runner builds one `SamplingMetadata` per step with
`build_sampling_metadata` (the only place in the sampling path that walks
Python lists) and hands it to `Sampler` together with the logits.

Conventions (B = rows sampled this step, V = vocab size = logits.shape[-1]):
  * every [B] tensor lives on the target device;
  * the optional [B, V] tensors are None unless at least one row needs them;
  * rows that use no penalty have all-zero `output_token_counts` and an
    all-False `prompt_token_mask` (their ids are skipped to save work; the
    penalty math is a no-op for them anyway);
  * token ids outside [0, V) (in prompts, outputs, logit_bias, stop/EOS ids)
    are ignored rather than raising (EngineCore.validate refuses them at
    intake; this is the second line of defence);
  * a row whose parameters cannot be batched raises `RequestFault` naming its
    request, so the step guard fails that request alone;
  * a seeded row carries `noise_seeds[i]`, the key of its own noise for this
    token (`position_seed(seed, output position)`), so its draw does not depend
    on the batch, on retries or on how many tokens the step samples for it;
    greedy rows and unseeded rows get None.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch
from torch import Tensor

from engine.errors import RequestFault
from engine.sampling_params import SamplingParams

GREEDY_EPS = 1e-5  # temperature below this means greedy (== SamplingParams.greedy)


@dataclass(frozen=True)
class SamplingRow:
    """One sequence to sample this step (the builder's input)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    noise_seed: int | None = None  # position_seed(seed, output index) of a seeded row
    eos_token_ids: Sequence[int] = ()
    request_id: str = ""  # names the culprit when this row's metadata cannot be built


@dataclass(frozen=True)
class SamplingMetadata:
    """Batched sampling parameters; one row per sampled sequence, batch B."""

    temperature: Tensor  # [B] float32; < GREEDY_EPS => greedy row
    top_k: Tensor  # [B] int64; 0 = disabled
    top_p: Tensor  # [B] float32; 1.0 = disabled
    min_p: Tensor  # [B] float32; 0 = disabled
    presence_penalty: Tensor  # [B] float32
    frequency_penalty: Tensor  # [B] float32
    repetition_penalty: Tensor  # [B] float32; 1.0 = disabled
    output_token_counts: Tensor | None  # [B, V] int32 counts of generated tokens
    prompt_token_mask: Tensor | None  # [B, V] bool, token occurs in the prompt
    logit_bias: Tensor | None  # [B, V] float32, additive
    suppress_mask: Tensor | None  # [B, V] bool, True = banned this step
    noise_seeds: list[int | None]  # len B; None = global RNG (or greedy)
    max_num_logprobs: int | None  # None: no row wants logprobs; else max n
    all_greedy: bool
    all_random: bool
    # Host-side hints so the sampler can skip whole passes without a device
    # sync. The defaults (False) are always safe: the pass just runs.
    no_top_k: bool = False
    no_top_p: bool = False
    no_min_p: bool = False

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]


def _padded_ids(seqs: Sequence[Sequence[int]], vocab_size: int, device) -> Tensor:
    """Pack ragged id lists into a [B, L] int64 tensor padded with `vocab_size`.

    Ids outside [0, vocab_size) are also mapped to the pad value, so callers
    scatter into a [B, V + 1] buffer and drop the last column.
    """
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)  # [B]
    batch = len(seqs)
    width = max(int(lens.max()) if batch else 0, 1)
    out = torch.full((batch, width), vocab_size, dtype=torch.int64)  # [B, L]
    flat = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.int64)  # [N]
    if flat.numel():
        flat = torch.where((flat >= 0) & (flat < vocab_size), flat, vocab_size)
        rows = torch.repeat_interleave(torch.arange(batch), lens)  # [N]
        starts = torch.cumsum(lens, 0) - lens  # [B] offset of each row in flat
        cols = torch.arange(flat.numel()) - torch.repeat_interleave(starts, lens)
        out[rows, cols] = flat
    return out.to(device)


def _token_counts(seqs: Sequence[Sequence[int]], vocab_size: int, device) -> Tensor:
    """[B, V] int32 occurrence counts, via one scatter_add_ over padded ids."""
    ids = _padded_ids(seqs, vocab_size, device)  # [B, L]
    counts = torch.zeros(len(seqs), vocab_size + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab_size]  # drop the pad column (a view)


def _token_mask(seqs: Sequence[Sequence[int]], vocab_size: int, device) -> Tensor:
    """[B, V] bool, True where the token occurs in the row's id list."""
    ids = _padded_ids(seqs, vocab_size, device)  # [B, L]
    mask = torch.zeros(len(seqs), vocab_size + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, ids, True)
    return mask[:, :vocab_size]


def _logit_bias(rows: Sequence[SamplingRow], vocab_size: int, device) -> Tensor | None:
    """[B, V] float32 additive bias, or None when no row has one."""
    idx_r: list[int] = []
    idx_t: list[int] = []
    vals: list[float] = []
    for i, row in enumerate(rows):
        for tok, bias in (row.params.logit_bias or {}).items():
            tok = int(tok)
            if 0 <= tok < vocab_size:
                idx_r.append(i)
                idx_t.append(tok)
                vals.append(float(bias))
    if not idx_r:
        return None
    bias = torch.zeros(len(rows), vocab_size, dtype=torch.float32)
    bias[torch.tensor(idx_r), torch.tensor(idx_t)] = torch.tensor(vals)
    return bias.to(device)


def _suppressed_ids(row: SamplingRow) -> list[int]:
    """Ids banned for this row now: EOS + stop ids until min_tokens generated.

    EOS is banned even when ignore_eos is set (min_tokens is a hard floor).
    """
    if len(row.output_token_ids) >= row.params.min_tokens:
        return []
    return [*row.eos_token_ids, *row.params.stop_token_ids]


_FLOAT_COLS = ("temperature", "top_p", "min_p",
               "presence_penalty", "frequency_penalty", "repetition_penalty")


class _Columns:
    """Host-side lists collected in the single pass over rows."""

    def __init__(self) -> None:
        self.vals: dict[str, list] = {k: [] for k in (*_FLOAT_COLS, "top_k")}
        self.penalized_out: list[Sequence[int]] = []  # output ids, rows with any penalty
        self.rep_prompt: list[Sequence[int]] = []  # prompt ids, rows with repetition penalty
        self.suppressed: list[list[int]] = []  # banned ids per row
        self.noise_seeds: list[int | None] = []
        self.greedy: list[bool] = []
        self.logprobs: list[int] = []  # requested n, rows that want logprobs
        self.any_rep = self.any_pen = False
        self.any_top_k = self.any_top_p = self.any_min_p = False  # over random rows

    def add(self, row: SamplingRow, vocab_size: int) -> None:
        p = row.params
        is_greedy = p.temperature < GREEDY_EPS
        top_k = p.top_k if 0 < p.top_k < vocab_size else 0  # k >= V keeps everything
        for key in _FLOAT_COLS:
            self.vals[key].append(float(getattr(p, key)))
        self.vals["top_k"].append(top_k)
        uses_rep = p.repetition_penalty != 1.0
        uses_pen = uses_rep or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        self.any_rep |= uses_rep
        self.any_pen |= uses_pen
        self.penalized_out.append(row.output_token_ids if uses_pen else ())
        self.rep_prompt.append(row.prompt_token_ids if uses_rep else ())
        self.suppressed.append(_suppressed_ids(row))
        self.noise_seeds.append(None if is_greedy else row.noise_seed)
        self.greedy.append(is_greedy)
        if p.logprobs is not None:
            self.logprobs.append(p.logprobs)
        if not is_greedy:  # top-k/top-p/min-p only ever run on random rows
            self.any_top_k |= top_k > 0
            self.any_top_p |= p.top_p < 1.0
            self.any_min_p |= p.min_p > 0.0


def build_sampling_metadata(
    rows: Sequence[SamplingRow], vocab_size: int, device
) -> SamplingMetadata:
    """Batch the rows' parameters into device tensors (one pass over rows)."""
    device = torch.device(device)
    c = _Columns()
    for row in rows:
        try:
            c.add(row, vocab_size)
        except Exception as exc:
            raise RequestFault(row.request_id, exc) from exc

    def vec(key: str, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(c.vals[key], dtype=dtype, device=device)  # [B]

    return SamplingMetadata(
        temperature=vec("temperature"),
        top_k=vec("top_k", torch.int64),
        top_p=vec("top_p"),
        min_p=vec("min_p"),
        presence_penalty=vec("presence_penalty"),
        frequency_penalty=vec("frequency_penalty"),
        repetition_penalty=vec("repetition_penalty"),
        output_token_counts=(_token_counts(c.penalized_out, vocab_size, device)
                             if c.any_pen else None),
        prompt_token_mask=(_token_mask(c.rep_prompt, vocab_size, device)
                           if c.any_rep else None),
        logit_bias=_logit_bias(rows, vocab_size, device),
        suppress_mask=(_token_mask(c.suppressed, vocab_size, device)
                       if any(c.suppressed) else None),
        noise_seeds=c.noise_seeds,
        max_num_logprobs=max(c.logprobs) if c.logprobs else None,
        all_greedy=all(c.greedy),
        all_random=not any(c.greedy),
        no_top_k=not c.any_top_k,
        no_top_p=not c.any_top_p,
        no_min_p=not c.any_min_p,
    )
