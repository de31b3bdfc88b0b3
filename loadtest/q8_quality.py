"""Quality of `--cpu-activation-quant q8` against fp32 activations on a real text.

The default model's own layers and GGUF blocks (our kernels) score a text that ships
with Python (the argparse and heapq module documentation), teacher-forced one token
at a time, so every linear runs at one row: the case q8 mode changes. Both modes see
the same tokens; prints perplexity of each, the top-1 agreement of q8 with fp32 (how
often the greedy token is the same), the mean KL(fp32 || q8) per token, and the time
per token of each mode. --json writes the figures.

    python loadtest/q8_quality.py --tokens 384 --json loadtest/results/q8_quality_cpu.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class GrowingKV:
    """Attention for one sequence fed one token at a time: each layer's keys and values are
    appended and the new query attends to all of them (no paged cache needed here)."""

    def __init__(self, num_layers: int):
        self.k: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.v: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def forward(self, q, k, v, layer: int):  # q [1, hq, d], k/v [1, hkv, d]
        self.k[layer].append(k.clone())
        self.v[layer].append(v.clone())
        keys, values = torch.cat(self.k[layer]), torch.cat(self.v[layer])  # [t, hkv, d]
        rep = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1))
        return out.transpose(0, 1)  # [1, hq, d]


def score(model, ids: list[int]) -> tuple[torch.Tensor, float]:
    """Log-probabilities [len(ids) - 1, vocab] of each next token, and seconds per token."""
    attn = GrowingKV(len(model.layers))
    caches = list(range(len(model.layers)))
    rows = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for pos, tok in enumerate(ids[:-1]):
            hidden = model(torch.tensor([tok]), torch.tensor([pos]), attn, caches)
            rows.append(torch.log_softmax(model.compute_logits(hidden), dim=-1)[0])
    return torch.stack(rows), (time.perf_counter() - t0) / (len(ids) - 1)


def set_q8(model, on: bool) -> int:
    from engine.models.gguf_linear import GGUFLinear

    mods = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    return sum(m.set_q8(on) for m in mods)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--json")
    args = ap.parse_args()
    import heapq

    from engine.config import EngineArgs
    from engine.setup import load_model

    loaded = load_model(EngineArgs(cpu_activation_quant="q8"))
    model = loaded.model
    text = inspect.getdoc(argparse) + "\n\n" + inspect.getdoc(heapq)
    ids = loaded.tokenizer(text)["input_ids"][:args.tokens]
    target = torch.tensor(ids[1:])
    out = {"command": " ".join(sys.argv), "tokens": len(ids), "text": "argparse + heapq module docs"}
    logp = {}
    for mode in ("fp32", "q8"):
        n = set_q8(model, mode == "q8")
        logp[mode], sec = score(model, ids)
        nll = -logp[mode].gather(1, target[:, None]).mean()
        out[mode] = {"perplexity": float(nll.exp()), "ms_per_token": sec * 1e3, "q8_linears": n}
        print(f"{mode:5s}: perplexity {float(nll.exp()):7.3f}  ({sec * 1e3:5.1f} ms/token, {n} q8 linears)", flush=True)
    agree = float((logp["fp32"].argmax(-1) == logp["q8"].argmax(-1)).float().mean())
    kl = float((logp["fp32"].exp() * (logp["fp32"] - logp["q8"])).sum(-1).mean())
    out.update(top1_agreement=agree, mean_kl=kl)
    print(f"q8 vs fp32: top-1 agreement {agree:.4f}, mean KL {kl:.5f} nats/token", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
