"""End-to-end semantics of sampling parameters and request lifecycle on the real
SmolLM2: penalties / logit_bias / min_tokens equal HF transformers' processors
token for token (greedy, fp32); max_model_len ends a request with "length";
seeded sampling survives preemption; aborts (mid-prefill and mid-decode) leave
the other requests' outputs unchanged and free every KV block."""
from __future__ import annotations

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor)

from engine.sampling_params import SamplingParams

MAX_NEW = 16
# A list the model continues by repeating "," and day names: every penalty bites.
LIST_PROMPT = "List the days of the week: Monday, Tuesday,"
# A question the instruct model answers in a couple of tokens, then EOS.
SHORT_QUESTION = "Reply with one word: yes or no?"


# ----------------------------------------------------------- HF oracle helpers


class OpenAIPenalties(LogitsProcessor):
    """OpenAI presence/frequency penalties over generated tokens only (not the prompt)."""

    def __init__(self, prompt_len: int, presence: float = 0.0, frequency: float = 0.0):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_generate(hf_model, ids: list[int], processors=(), eos: int | None = None) -> list[int]:
    """Greedy HF continuation (ends with EOS if the model emitted it)."""
    eos = hf_model.generation_config.eos_token_id if eos is None else eos
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                            logits_processor=LogitsProcessorList(list(processors)),
                            eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def _split_eos(tokens: list[int], eos: int) -> tuple[list[int], bool]:
    """(tokens before the first EOS, whether an EOS was emitted)."""
    if eos in tokens:
        return tokens[:tokens.index(eos)], True
    return tokens, False


def _assert_same_as_hf(name, ours, hf_tokens: list[int], eos: int) -> None:
    """Token-for-token equality and the same finish. HF keeps the final EOS; ours may
    or may not list it, but nothing may follow it and it must end the request as "stop"."""
    hf_body, hf_eos = _split_eos(hf_tokens, eos)
    assert hf_tokens == hf_body + [eos] * hf_eos  # HF stopped right at EOS
    ours_ids = list(ours.token_ids)
    if hf_eos and ours_ids[-1:] == [eos]:
        ours_ids = ours_ids[:-1]
    assert ours_ids == hf_body, f"{name}: ours {ours.token_ids} != HF {hf_tokens}"
    assert ours.finish_reason == ("stop" if hf_eos else "length"), (name, ours.finish_reason)


# ----------------------------------------------------------- 1. parity with HF


def test_sampling_params_match_hf_processors(make_llm, hf_smol):
    llm = make_llm(num_kv_blocks=128)
    tok = llm.tokenizer
    eos = hf_smol.generation_config.eos_token_id
    assert tuple(llm.core.eos_token_ids) == (eos,)
    list_ids = tok.encode(LIST_PROMPT)
    chat_ids = tok.apply_chat_template([{"role": "user", "content": SHORT_QUESTION}], tokenize=True,
                                       add_generation_prompt=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)

    plain_list = hf_generate(hf_smol, list_ids)
    plain_chat = hf_generate(hf_smol, chat_ids)
    natural_len = len(plain_chat)
    assert plain_chat[-1] == eos and natural_len < 6, plain_chat  # the model stops early by itself
    # Tightest floor: EOS banned exactly where the model emits it (catches off-by-one).
    tight_min = natural_len
    min_tokens = natural_len + 5
    # -100 bans the first greedy token; +5 pushes a token that appears later in the greedy output.
    bias = {plain_list[0]: -100.0, plain_list[2]: 5.0}
    assert plain_list[0] != plain_list[2]

    greedy = dict(temperature=0.0, max_tokens=MAX_NEW)
    cases = {
        # name: (prompt ids, engine params, HF processors)
        "plain_list": (list_ids, SamplingParams(**greedy), []),
        "plain_chat": (chat_ids, SamplingParams(**greedy), []),
        "repetition_penalty": (list_ids, SamplingParams(repetition_penalty=1.3, **greedy),
                               [RepetitionPenaltyLogitsProcessor(1.3)]),
        "presence_penalty": (list_ids, SamplingParams(presence_penalty=1.5, **greedy),
                             [OpenAIPenalties(len(list_ids), presence=1.5)]),
        "frequency_penalty": (list_ids, SamplingParams(frequency_penalty=1.2, **greedy),
                              [OpenAIPenalties(len(list_ids), frequency=1.2)]),
        "logit_bias": (list_ids, SamplingParams(logit_bias=bias, **greedy),
                       [SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])]),
        "min_tokens": (chat_ids, SamplingParams(min_tokens=min_tokens, ignore_eos=False, **greedy),
                       [MinNewTokensLengthLogitsProcessor(len(chat_ids), min_tokens, eos)]),
        "min_tokens_tight": (chat_ids, SamplingParams(min_tokens=tight_min, **greedy),
                             [MinNewTokensLengthLogitsProcessor(len(chat_ids), tight_min, eos)]),
    }
    names = list(cases)
    outs = llm.generate([cases[n][0] for n in names], [cases[n][1] for n in names])
    ours = {n: o.outputs[0] for n, o in zip(names, outs)}

    for name in names:
        ids, _, processors = cases[name]
        if name == "plain_list":
            ref = plain_list
        elif name == "plain_chat":
            ref = plain_chat
        else:
            ref = hf_generate(hf_smol, ids, processors, eos)
            plain = plain_chat if ids is chat_ids else plain_list
            assert ref != plain, f"{name} did not change HF's greedy output: the case is vacuous"
        _assert_same_as_hf(name, ours[name], ref, eos)

    # The parameters' own contracts, beyond parity.
    assert plain_list[0] not in ours["logit_bias"].token_ids
    mt = list(ours["min_tokens"].token_ids)
    assert eos not in mt[:min_tokens] and len(_split_eos(mt, eos)[0]) >= min_tokens


# ----------------------------------------------------------- 2. max_model_len


def test_max_tokens_none_runs_to_max_model_len(make_llm):
    llm = make_llm(max_model_len=40, num_kv_blocks=32, block_size=8)
    base = llm.tokenizer.encode("One two three four five six seven eight nine ten eleven twelve")
    prompts = [(base * 3)[:26], (base * 3)[:33]]  # two lengths: the limit is per request
    params = SamplingParams(max_tokens=None, ignore_eos=True, temperature=0)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        assert len(out.prompt_token_ids) == len(prompt)
        assert c.finish_reason == "length"
        assert len(c.token_ids) == 40 - len(prompt)
    assert llm.core.scheduler.kv.usage() == 0


# ----------------------------------------------------------- 3. seeds vs preemption


SEED_PROMPTS = [
    "Once upon a time",
    "The best way to learn a language is",
    "def quicksort(xs):",
    "My favourite fruit is",
    "In the beginning there was",
    "Here is a short poem about the rain:",
]


def _run_to_end(core, requests) -> tuple[dict, int]:
    """Add (id, prompt, params) requests, step to the end; finished outputs by id + preemptions seen."""
    for rid, prompt, params in requests:
        core.add_request(rid, prompt, params)
    final, preemptions = {}, 0
    while core.has_unfinished():
        outputs, stats = core.step()
        preemptions += stats.num_preemptions
        final.update({o.request_id: o for o in outputs if o.finished})
    return final, preemptions


def test_seeded_sampling_identical_with_preemption(make_llm):
    reqs = [(f"s{i}", p, SamplingParams(temperature=0.8, seed=1000 + i, max_tokens=20, ignore_eos=True))
            for i, p in enumerate(SEED_PROMPTS)]
    ample = make_llm(num_kv_blocks=256, block_size=16)
    ref, ref_preempt = _run_to_end(ample.core, reqs)
    assert ref_preempt == 0
    tight = make_llm(num_kv_blocks=8, block_size=16, max_model_len=128)
    got, preempt = _run_to_end(tight.core, reqs)
    assert preempt > 0 and tight.core.scheduler.num_preemptions == preempt
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].finish_reason == "length"
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids, rid
    # Distinct seeds give distinct samples (the requests are really sampled).
    assert len({tuple(o.outputs[0].token_ids[:8]) for o in ref.values()}) == len(reqs)
    assert tight.core.scheduler.kv.usage() == 0


# ----------------------------------------------------------- 4. abort


def _assert_engine_empty(llm) -> None:
    core, sched = llm.core, llm.core.scheduler
    kv = sched.kv
    assert kv.usage() == 0 and kv.num_free_blocks == kv.pool.num_blocks
    assert not kv.req_blocks
    assert not sched.waiting and not sched.running and not sched.requests
    assert not core.groups and not core.seq_to_group and not core.has_unfinished()


def test_abort_in_prefill_and_decode_leaves_survivors_unchanged(make_llm):
    engine_args = dict(max_num_batched_tokens=32, num_kv_blocks=64, block_size=8, max_model_len=512)
    long_prompt = " ".join(f"Item {i} is a small {w} box." for i, w in enumerate(["red", "green", "blue"] * 6))
    survivors = [
        ("keep_greedy", "The capital of France is", SamplingParams(temperature=0, max_tokens=16)),
        ("keep_seeded", "Once upon a time", SamplingParams(temperature=0.8, seed=7, max_tokens=16,
                                                             ignore_eos=True)),
    ]
    ref_llm = make_llm(**engine_args)
    ref, _ = _run_to_end(ref_llm.core, survivors)

    llm = make_llm(**engine_args)
    core, sched = llm.core, llm.core.scheduler
    assert len(llm.tokenizer.encode(long_prompt)) > 4 * 32  # needs several prefill chunks
    core.add_request("keep_greedy", *survivors[0][1:])
    core.add_request("abort_decode", "My favourite fruit is", SamplingParams(temperature=0.8, seed=3, max_tokens=16,
                                                                             ignore_eos=True))
    core.add_request("abort_prefill", long_prompt, SamplingParams(temperature=0, max_tokens=16))
    core.add_request("keep_seeded", *survivors[1][1:])

    final: dict = {}

    def step():
        outputs, _ = core.step()
        final.update({o.request_id: o for o in outputs if o.finished})

    for _ in range(3):
        step()
    victim = sched.requests["abort_prefill"]
    assert 0 < victim.num_computed_tokens < victim.num_prompt_tokens  # mid chunked prefill
    assert sched.kv.block_table("abort_prefill")
    assert core.abort("abort_prefill")
    assert not sched.kv.block_table("abort_prefill") and "abort_prefill" not in sched.requests

    decoder = sched.requests["abort_decode"]
    for _ in range(20):
        if decoder.num_output_tokens >= 3:
            break
        step()
    assert 3 <= decoder.num_output_tokens < 16  # mid decode
    assert core.abort("abort_decode")
    assert not core.abort("abort_decode")  # already gone

    for _ in range(200):
        if not core.has_unfinished():
            break
        step()
    assert final["abort_prefill"].outputs[0].finish_reason == "abort"
    assert final["abort_decode"].outputs[0].finish_reason == "abort"
    for rid, _, _ in survivors:
        assert final[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids, rid
        assert final[rid].outputs[0].finish_reason == ref[rid].outputs[0].finish_reason
    _assert_engine_empty(llm)
    _assert_engine_empty(ref_llm)
