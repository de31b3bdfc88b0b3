"""Tiny random-initialised Llama and Qwen2 (seeded, built here, saved as sharded
safetensors): our loader + model + paged attention give HF's logits within 1e-4,
through chunked prefill, a batch mixing two requests, and decode steps."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from engine.config import EngineArgs
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.sched.output import ModelRunnerOutput
from engine.setup import build_parts

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
CASES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3-rope-tied": (LlamaForCausalLM, LlamaConfig(
        **COMMON, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=False)),
}


@pytest.fixture(params=sorted(CASES))
def tiny(request, tmp_path, smol_loaded):
    cls, cfg = CASES[request.param]
    cfg.architectures = [cls.__name__]
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    if request.param == "qwen2":  # random q/k/v biases so the bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    smol_loaded.tokenizer.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded
    return model, tmp_path


def _feed(parts, reqs: dict[str, list[int]]) -> dict[str, dict[int, torch.Tensor]]:
    """Drive the scheduler until every request's given tokens are computed; the tokens
    past each prompt are fed as if sampled. Returns logits per request per position."""
    sched = parts.scheduler
    full = {}
    for rid, ids in reqs.items():
        prompt = ids[:len(ids) // 2]
        full[rid] = ids
        sched.add_request(Request(rid, prompt, SamplingParams(temperature=0, max_tokens=64)))
    logits_at: dict[str, dict[int, torch.Tensor]] = {rid: {} for rid in reqs}
    while sched.running or sched.waiting:
        out = sched.schedule()
        logits = parts.runner.forward_logits(out)
        row, sampled_ids, sampled = 0, [], []
        for entry in out.scheduled:
            for j in range(entry.num_tokens):
                logits_at[entry.request_id][entry.start + j] = logits[row + j]
            row += entry.num_tokens
            if entry.sample:
                req = entry.request
                sampled_ids.append(entry.request_id)
                sampled.append([full[entry.request_id][req.num_tokens]])
        sched.update(out, ModelRunnerOutput(tuple(sampled_ids), tuple(sampled)))
        for rid in list(sched.requests):
            if sched.requests[rid].num_tokens == len(full[rid]):
                sched.finish_request(rid, "length")
    return logits_at


def test_tiny_model_logits_match_hf(tiny):
    hf_model, path = tiny
    args = EngineArgs(model=str(path), num_kv_blocks=64, block_size=4, max_num_batched_tokens=7,
                      enable_prefix_caching=False)
    parts = build_parts(args)
    g = torch.Generator().manual_seed(1)
    seqs = {"a": torch.randint(0, 512, (22,), generator=g).tolist(),
            "b": torch.randint(0, 512, (9,), generator=g).tolist()}
    ours = _feed(parts, seqs)
    for rid, ids in seqs.items():
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]
        got = ours[rid]
        assert sorted(got) == list(range(len(ids) - 1))  # every position computed once
        for pos, logit in got.items():
            torch.testing.assert_close(logit, ref[pos], atol=1e-4, rtol=0)
