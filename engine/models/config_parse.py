"""Normalise a model's hyper-parameters (HF config.json or GGUF metadata) into ModelConfig.

Unsupported architectures or features fail here, at start, with a clear message.
"""
from __future__ import annotations

from typing import Any

from engine.config import ModelConfig
from engine.errors import UnsupportedModelError

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


def _as_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),)


def from_hf_config(cfg: dict, generation_cfg: dict | None = None) -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: {sorted(HF_ARCHITECTURES)}")
    window = cfg.get("sliding_window")
    if window is not None and (arch == "llama" or cfg.get("use_sliding_window")):
        if window < cfg.get("max_position_embeddings", 0):
            raise UnsupportedModelError(f"sliding-window attention (window {window}) is not supported")
    heads = cfg["num_attention_heads"]
    eos = _as_tuple((generation_cfg or {}).get("eos_token_id")) or _as_tuple(cfg.get("eos_token_id"))
    qkv_bias = arch == "qwen2" or bool(cfg.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=arch == "llama" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope_scaling=_rope_scaling(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos,
    )


def _rope_scaling(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind not in ("linear", "llama3"):
        raise UnsupportedModelError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    return dict(rs)


def from_gguf_fields(fields: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch_name = fields.get("general.architecture")
    arch = GGUF_ARCHITECTURES.get(arch_name)
    if arch is None:
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch_name!r}; supported: {sorted(GGUF_ARCHITECTURES)}")
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError("GGUF files with rope_freqs (Llama 3.1 rope scaling) are not supported; "
                                    "use the Hugging Face directory instead")
    p = arch_name + "."
    hidden, heads = fields[p + "embedding_length"], fields[p + "attention.head_count"]
    vocab = fields.get(p + "vocab_size") or len(fields["tokenizer.ggml.tokens"])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(fields[p + "feed_forward_length"]),
        num_layers=int(fields[p + "block_count"]),
        num_heads=int(heads),
        num_kv_heads=int(fields.get(p + "attention.head_count_kv", heads)),
        head_dim=int(fields.get(p + "attention.key_length", hidden // heads)),
        rms_norm_eps=float(fields.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(fields.get(p + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(fields.get(p + "context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_tuple(eos),
    )
