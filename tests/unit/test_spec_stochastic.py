"""Stochastic verification end to end: layerskip drafts drawn from q (a real, non-one-hot
distribution: the target's own logits with one of its 4 layers skipped), verified by
rejection sampling in the runner. On a tiny random 4-layer model (peaked logits) the
sampled 3-token sequences (top-k 2) follow the target's exact distribution (chi-square), and
the same test rejects a runner whose residual is replaced by p."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.unit.test_spec import chisquare_pvalue

N = 900
PARAMS = SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True)
PROMPT = "The cat"


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    from engine.config import EngineArgs
    from engine.setup import load_model
    from tests.e2e.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny4") / "llama", num_hidden_layers=4,
                            initializer_range=0.05)
    return path, load_model(EngineArgs(model=str(path), max_model_len=256))


def exact_joint(path, prompt_ids: list[int]) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under temperature 1 and top-k 2, from HF transformers on the same weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    joint = {(): 1.0}
    for _ in range(PARAMS.max_tokens):
        nxt = {}
        for seq, prob in joint.items():
            with torch.no_grad():
                logits = hf(torch.tensor([prompt_ids + list(seq)])).logits[0, -1]
            top = logits.topk(PARAMS.top_k)
            for tok, p in zip(top.indices.tolist(), top.values.softmax(-1).tolist()):
                nxt[seq + (tok,)] = prob * p
        joint = nxt
    return joint


def sample_counts(loaded) -> tuple[Counter, object]:
    from engine.llm import LLM

    llm = LLM(loaded=loaded, max_num_seqs=256, speculative_method="layerskip", num_speculative_tokens=2,
              speculative_adaptive=False, speculative_layerskip_keep=0.75)
    outs = llm.generate([PROMPT] * N, PARAMS)
    kv = llm.core.scheduler.kv
    assert kv.num_free_blocks == len(kv.pool.blocks)
    return Counter(tuple(o.outputs[0].token_ids) for o in outs), llm


def pvalue(counts: Counter, joint: dict) -> float:
    assert set(counts) <= set(joint), "a sequence outside the target's top-k support"
    cells = sorted(joint, key=joint.get, reverse=True)
    big = [c for c in cells if joint[c] * N >= 5]  # small cells pooled into one
    rest = [c for c in cells if joint[c] * N < 5]
    observed = [counts[c] for c in big] + ([sum(counts[c] for c in rest)] if rest else [])
    expected = [joint[c] * N for c in big] + ([sum(joint[c] for c in rest) * N] if rest else [])
    return chisquare_pvalue(torch.tensor(observed, dtype=torch.float64),
                            torch.tensor(expected, dtype=torch.float64))


@pytest.fixture(scope="module")
def joint(tiny4):
    path, loaded = tiny4
    return exact_joint(path, loaded.tokenizer.encode(PROMPT))


def test_layerskip_rejection_sampling_is_exact(tiny4, joint):
    torch.manual_seed(0)
    counts, llm = sample_counts(tiny4[1])
    stats = llm.core.spec.totals
    # Drafts were drawn and verified with both outcomes (q != p).
    assert stats.num_draft_tokens >= N
    assert 0.1 * stats.num_draft_tokens < stats.num_accepted_tokens < 0.95 * stats.num_draft_tokens, stats
    assert pvalue(counts, joint) > 1e-3


def test_the_wrong_residual_is_caught(tiny4, joint, monkeypatch):
    import engine.runner.model_runner as runner_mod
    from engine.spec.rejection import rejection_sample_torch

    monkeypatch.setattr(runner_mod, "rejection_sample_torch",
                        lambda batch: rejection_sample_torch(batch, residual_is_p=True))
    torch.manual_seed(0)
    counts, _ = sample_counts(tiny4[1])
    assert pvalue(counts, joint) < 1e-6
