"""Unit tests for engine.sample (CPU, deterministic: every draw is seeded)."""
from __future__ import annotations

import pytest
import torch

from engine.sample import (
    position_seed,
    Sampler,
    SamplingRow,
    apply_penalties,
    build_sampling_metadata,
)
from engine.sampling_params import SamplingParams

V = 16  # small vocab for statistical tests
N_DRAWS = 20_000  # rows per statistical batch (one sampler call)
TV_BOUND = 0.03  # expected TV at N_DRAWS, V=16 is ~0.01


def make_logits(batch: int, vocab: int = V, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale  # [B, V]


def row(prompt=(), output=(), noise_seed=None, eos=(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), noise_seed, list(eos))


def run(rows, logits):
    meta = build_sampling_metadata(rows, logits.shape[-1], "cpu")
    return Sampler()(logits.clone(), meta)


def empirical(tokens: torch.Tensor, vocab: int = V) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()  # [V]


def draw_many(logits_row: torch.Tensor, n: int = N_DRAWS, seed: int = 1234, **kw) -> torch.Tensor:
    """n independent draws of one row's distribution, in a single batched call."""
    torch.manual_seed(seed)
    rows = [row(**kw)] * n
    return run(rows, logits_row.expand(n, -1)).sampled_token_ids  # [n]


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


# ----------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_consumes_no_randomness():
    logits = make_logits(6, 50)
    global_state = torch.get_rng_state()
    rows = [row(temperature=0.0, noise_seed=position_seed(1, i), seed=1) for i in range(6)]
    meta = build_sampling_metadata(rows, logits.shape[-1], "cpu")
    assert meta.noise_seeds == [None] * 6  # greedy rows draw no noise
    out = Sampler()(logits.clone(), meta)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.topk_token_ids is None and out.sampled_ranks is None
    assert torch.equal(torch.get_rng_state(), global_state)


def reference_penalties(logits, prompt, output, params: SamplingParams):
    """Per-row, per-token reference of bias -> repetition -> freq/presence."""
    x = logits.clone()
    for tok, b in (params.logit_bias or {}).items():
        x[tok] += b
    for tok in set(prompt) | set(output):
        rp = params.repetition_penalty
        x[tok] = x[tok] / rp if x[tok] > 0 else x[tok] * rp
    for tok in set(output):
        x[tok] -= params.frequency_penalty * output.count(tok) + params.presence_penalty
    return x


PENALTY_CASES = [
    dict(),
    dict(logit_bias={3: 8.0, 7: -100.0}),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(frequency_penalty=-0.7, presence_penalty=0.9, repetition_penalty=1.3, logit_bias={1: 2.5}),
    dict(presence_penalty=-2.0, frequency_penalty=2.0),
]


def test_greedy_penalties_match_reference():
    vocab = 12
    logits = make_logits(len(PENALTY_CASES), vocab, seed=3)
    prompt, output = [0, 1, 2, 2, 9], [5, 5, 5, 6, logits[0].argmax().item()]
    rows = [row(prompt, output, temperature=0.0, **kw) for kw in PENALTY_CASES]
    meta = build_sampling_metadata(rows, vocab, "cpu")
    processed = apply_penalties(logits.clone(), meta)
    ref = torch.stack([reference_penalties(logits[i], prompt, output, r.params)
                       for i, r in enumerate(rows)])
    torch.testing.assert_close(processed, ref)
    out = run(rows, logits)
    assert torch.equal(out.sampled_token_ids, ref.argmax(-1))
    # the penalties actually matter for this fixture
    assert len(set(ref.argmax(-1).tolist())) > 1


def test_penalty_tensors_only_built_when_needed():
    plain = build_sampling_metadata([row([1, 2], [3], temperature=0.7)], V, "cpu")
    assert plain.output_token_counts is None and plain.prompt_token_mask is None
    assert plain.logit_bias is None and plain.suppress_mask is None
    assert plain.max_num_logprobs is None and plain.all_random and not plain.all_greedy
    freq = build_sampling_metadata([row([1, 2], [3, 3, 4], frequency_penalty=1.0),
                                    row([5], [6])], V, "cpu")
    assert freq.prompt_token_mask is None
    expected = torch.zeros(2, V, dtype=torch.int32)
    expected[0, 3], expected[0, 4] = 2, 1  # row 1 uses no penalty: left at zero
    assert torch.equal(freq.output_token_counts, expected)


def test_builder_ignores_out_of_range_ids_and_large_top_k():
    rows = [row([1, 99, -1], [2, 100], repetition_penalty=1.1, top_k=V + 5,
                logit_bias={V + 3: 5.0})]
    meta = build_sampling_metadata(rows, V, "cpu")
    assert meta.prompt_token_mask[0].nonzero().flatten().tolist() == [1]
    assert meta.output_token_counts[0].nonzero().flatten().tolist() == [2]
    assert meta.logit_bias is None and meta.top_k.tolist() == [0] and meta.no_top_k


# ----------------------------------------------------------------- seeds


def mixed_batch(target_seed: int):
    """8 rows: row 3 is the seeded row under test, the rest are distractors."""
    return [
        row(temperature=0.0),
        row(temperature=1.0, noise_seed=11, seed=11),
        row(temperature=0.8, top_k=5),
        row(temperature=1.3, top_p=0.95, noise_seed=target_seed, seed=7),
        row(temperature=0.0, noise_seed=5, seed=5),
        row(temperature=0.5, min_p=0.05),
        row(temperature=1.0, noise_seed=12, seed=12, top_k=3),
        row(temperature=2.0, frequency_penalty=0.5, output=[1, 2]),
    ]


def test_same_seed_same_tokens_alone_and_in_batch():
    vocab, steps = 64, 12
    logits = make_logits(steps * 8, vocab, seed=9, scale=1.0).view(steps, 8, vocab)
    alone, batched = [], []
    for s in range(steps):
        key = position_seed(7, s)
        torch.manual_seed(1000 + s)  # unseeded rows see different global noise
        alone.append(run([mixed_batch(key)[3]], logits[s, 3:4]).sampled_token_ids[0])
        torch.manual_seed(2000 + s)
        batched.append(run(mixed_batch(key), logits[s]).sampled_token_ids[3])
    assert torch.equal(torch.stack(alone), torch.stack(batched))


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)  # uniform: collisions are very unlikely
    a = [run([row(noise_seed=position_seed(1, i), seed=1)], logits).sampled_token_ids[0] for i in range(10)]
    b = [run([row(noise_seed=position_seed(2, i), seed=2)], logits).sampled_token_ids[0] for i in range(10)]
    c = [run([row(noise_seed=position_seed(1, i), seed=1)], logits).sampled_token_ids[0] for i in range(10)]
    assert torch.stack(a).tolist() != torch.stack(b).tolist()
    assert torch.stack(a).tolist() == torch.stack(c).tolist()


# ----------------------------------------------------------------- support / distribution


def test_plain_temperature_one_matches_softmax():
    logits = make_logits(1, seed=21)[0]
    tokens = draw_many(logits)
    assert tv(empirical(tokens), logits.softmax(-1)) < TV_BOUND


def test_temperature_half_matches_scaled_softmax():
    logits = make_logits(1, seed=22, scale=1.0)[0]
    tokens = draw_many(logits, temperature=0.5)
    target = (logits / 0.5).softmax(-1)
    assert tv(empirical(tokens), target) < TV_BOUND
    assert tv(empirical(tokens), logits.softmax(-1)) > 3 * TV_BOUND  # not temperature 1


def renormalised(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1) * keep
    return p / p.sum()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_support_and_distribution(k):
    logits = make_logits(1, seed=30 + k)[0]
    keep = torch.zeros(V, dtype=torch.bool)
    keep[logits.topk(k).indices] = True
    tokens = draw_many(logits, top_k=k)
    assert keep[tokens].all()
    assert tv(empirical(tokens), renormalised(logits, keep)) < TV_BOUND


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference: smallest most-likely prefix whose mass reaches top_p."""
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for tok in probs.argsort(descending=True).tolist():
        keep[tok] = True
        mass += probs[tok].item()
        if mass >= top_p:
            break
    return keep


@pytest.mark.parametrize("top_p", [0.01, 0.5, 0.8, 0.95])
def test_top_p_support_and_distribution(top_p):
    logits = make_logits(1, seed=40)[0]
    keep = nucleus(logits.softmax(-1), top_p)
    tokens = draw_many(logits, top_p=top_p)
    assert keep[tokens].all()
    assert tv(empirical(tokens), renormalised(logits, keep)) < TV_BOUND


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_support_and_distribution(min_p):
    logits = make_logits(1, seed=50)[0]
    probs = logits.softmax(-1)
    keep = probs >= min_p * probs.max()
    tokens = draw_many(logits, min_p=min_p)
    assert keep[tokens].all()
    assert tv(empirical(tokens), renormalised(logits, keep)) < TV_BOUND


def test_top_k_top_p_min_p_combined_with_temperature():
    logits = make_logits(1, seed=60)[0]
    scaled = logits / 0.7
    keep = torch.zeros(V, dtype=torch.bool)
    keep[scaled.topk(8).indices] = True
    keep &= nucleus(renormalised(scaled, keep), 0.9)
    p = renormalised(scaled, keep)
    keep &= p >= 0.1 * p.max()
    tokens = draw_many(logits, temperature=0.7, top_k=8, top_p=0.9, min_p=0.1)
    assert keep[tokens].all()
    assert tv(empirical(tokens), renormalised(scaled, keep)) < TV_BOUND


def test_mixed_rows_disabled_features_keep_full_distribution():
    """Half the rows use top_k=2, half none; each half matches its own target."""
    logits = make_logits(1, seed=70)[0]
    torch.manual_seed(7)
    rows = [row(top_k=2), row()] * (N_DRAWS // 2)
    tokens = run(rows, logits.expand(len(rows), -1)).sampled_token_ids
    keep = torch.zeros(V, dtype=torch.bool)
    keep[logits.topk(2).indices] = True
    assert keep[tokens[0::2]].all()
    assert tv(empirical(tokens[0::2]), renormalised(logits, keep)) < TV_BOUND
    assert tv(empirical(tokens[1::2]), logits.softmax(-1)) < TV_BOUND


def test_top_k_exact_with_ties():
    logits = torch.zeros(N_DRAWS // 4, V)  # all tied: exactly k distinct tokens survive
    torch.manual_seed(3)
    tokens = run([row(top_k=3)] * logits.shape[0], logits).sampled_token_ids
    assert len(set(tokens.tolist())) == 3


# ----------------------------------------------------------------- min_tokens


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_suppresses_eos_and_stop_ids(temperature, ignore_eos):
    eos, stop = 2, [5, 9]
    logits = torch.zeros(200, V)
    logits[:, [eos, *stop]] = 50.0  # would be chosen every time without suppression
    kw = dict(temperature=temperature, min_tokens=3, stop_token_ids=stop, ignore_eos=ignore_eos)
    torch.manual_seed(0)
    early = run([row(output=[1, 1], eos=[eos], **kw)] * 200, logits).sampled_token_ids
    assert not torch.isin(early, torch.tensor([eos, *stop])).any()
    done = run([row(output=[1, 1, 1], eos=[eos], **kw)] * 200, logits).sampled_token_ids
    assert torch.isin(done, torch.tensor([eos, *stop])).all()


def test_suppress_mask_only_when_needed():
    meta = build_sampling_metadata(
        [row(output=[1], eos=[2], min_tokens=2, stop_token_ids=[4]), row(eos=[2])], V, "cpu")
    assert meta.suppress_mask[0].nonzero().flatten().tolist() == [2, 4]
    assert not meta.suppress_mask[1].any()
    meta = build_sampling_metadata([row(output=[1, 1], eos=[2], min_tokens=2)], V, "cpu")
    assert meta.suppress_mask is None


# ----------------------------------------------------------------- logprobs


def test_logprobs_are_raw_topk_sorted_and_ranked():
    vocab = 40
    logits = make_logits(6, vocab, seed=80)
    low = int(logits[3].argmin())  # least likely raw token of row 3
    rows = [
        row(temperature=0.0, logprobs=5),
        row(temperature=0.7, top_k=4, logprobs=2, noise_seed=1, seed=1),
        row(temperature=1.5, repetition_penalty=1.5, prompt=[0, 1, 2], logprobs=0),
        row(temperature=1.0, logit_bias={low: 60.0}, logprobs=3),  # forces a rank-40 token
        row(temperature=0.0, frequency_penalty=2.0, output=[int(logits[4].argmax())] * 3),
        row(temperature=2.0, top_p=0.5, min_p=0.1, logprobs=1),
    ]
    torch.manual_seed(0)
    out = run(rows, logits)
    raw = logits.log_softmax(-1)
    tok = out.sampled_token_ids
    assert tok[3].item() == low
    torch.testing.assert_close(out.logprobs, raw.gather(1, tok[:, None]).squeeze(1))
    ref = raw.topk(5, dim=-1)
    assert out.topk_token_ids.shape == (6, 5) and out.topk_logprobs.dtype == torch.float32
    assert torch.equal(out.topk_token_ids, ref.indices)
    torch.testing.assert_close(out.topk_logprobs, ref.values)
    assert (out.topk_logprobs[:, :-1] >= out.topk_logprobs[:, 1:]).all()
    order = raw.argsort(dim=-1, descending=True)
    ref_ranks = (order == tok[:, None]).float().argmax(-1) + 1
    assert torch.equal(out.sampled_ranks, ref_ranks)
    assert out.sampled_ranks[0].item() == 1 and out.sampled_ranks[3].item() == vocab


def test_zero_logprobs_gives_empty_topk():
    out = run([row(logprobs=0), row(temperature=0.0)], make_logits(2))
    assert out.topk_token_ids.shape == (2, 0) and out.topk_logprobs.shape == (2, 0)
    assert out.logprobs.shape == (2,) and out.sampled_ranks.shape == (2,)


def test_empty_batch():
    out = Sampler()(torch.empty(0, V), build_sampling_metadata([], V, "cpu"))
    assert out.sampled_token_ids.shape == (0,)


def test_inverse_cdf_never_picks_zero_weight_tokens_at_either_end_of_u(monkeypatch):
    """u = 0 and the largest u must land on the first and last token of positive weight,
    never on the masked (-inf) tokens around and between them."""
    import engine.sample.sampler as sampler_mod

    logits = torch.full((2, 8), float("-inf"))
    logits[:, 2] = 0.0
    logits[:, 5] = 1.0  # weight only on tokens 2 and 5
    monkeypatch.setattr(sampler_mod, "uniforms",
                        lambda seeds, device: torch.tensor([0.0, sampler_mod._U_MAX], dtype=torch.float64))
    out = run([row(temperature=1.0), row(temperature=1.0)], logits).sampled_token_ids
    assert out.tolist() == [2, 5]


def test_seeded_uniform_is_a_function_of_the_key_alone():
    from engine.sample.sampler import uniforms

    keys = [position_seed(3, i) for i in range(4)]
    torch.manual_seed(0)
    a = uniforms([None, keys[0], None, keys[1]], "cpu")
    torch.manual_seed(1)
    b = uniforms([keys[0], None, keys[1], None], "cpu")
    assert a[1] == b[0] and a[3] == b[2] and a[1] != a[3]
    assert a[0] != b[1]  # unseeded rows come from the global RNG
