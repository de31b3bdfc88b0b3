"""Greedy fp32 SmolLM2 through our engine (continuous batching, chunked prefill,
requests arriving at different steps) equals HF transformers generate token for
token, and top-5 logprobs are within 1e-3 of HF's."""
from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Hi",
    "Write a haiku about the sea.\n",
    "List three colours: red,",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 12),
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Question: what is 12 times 12?\nAnswer:",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):\n    def __init__(self):\n",
]
MAX_NEW = 24


def hf_greedy(hf_model, ids: list[int]):
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=hf_model.generation_config.eos_token_id)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1) for l in out.logits]
    return tokens, logprobs


def test_greedy_matches_hf_with_continuous_batching(make_llm, hf_smol):
    llm = make_llm(max_num_batched_tokens=40, max_num_seqs=6, block_size=16, num_kv_blocks=128)
    core, tok = llm.core, llm.tokenizer
    assert core.runner.attn.name == "cpu"  # the native paged-attention op (decodes, short chunks)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=5)
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) >= 8
    final, step = {}, 0
    while step < len(PROMPTS) or core.has_unfinished():
        if step < len(PROMPTS):  # one new arrival per step, joining a running batch
            core.add_request(f"r{step}", prompt_ids[step], params)
        outputs, stats = core.step()
        final.update({o.request_id: o for o in outputs if o.finished})
        step += 1
    assert core.scheduler.kv.num_free_blocks == 128
    for i, ids in enumerate(prompt_ids):
        ours = final[f"r{i}"].outputs[0]
        ref_tokens, ref_logprobs = hf_greedy(hf_smol, ids)
        assert ours.token_ids == ref_tokens, f"prompt {i}: {ours.token_ids} != {ref_tokens}"
        assert len(ours.logprobs) == len(ref_tokens)
        expected_cum = sum(d[t].logprob for d, t in zip(ours.logprobs, ours.token_ids))
        assert abs(ours.cumulative_logprob - expected_cum) < 1e-6
        for pos, (lp_dict, ref) in enumerate(zip(ours.logprobs, ref_logprobs)):
            ref_top = torch.topk(ref, 5)
            assert set(ref_top.indices.tolist()) <= set(lp_dict), f"prompt {i} pos {pos}: top-5 ids differ"
            for token_id, lp in lp_dict.items():
                assert abs(lp.logprob - ref[token_id].item()) < 1e-3, (i, pos, token_id)
