"""Model resolution and config parsing: clear failures for what we do not support."""
from __future__ import annotations

import json

import pytest

from engine.errors import UnsupportedModelError
from engine.models import config_parse
from engine.models.loader import load_model_config, resolve_model

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        config_parse.from_hf_config({**BASE, "architectures": ["GPT2LMHeadModel"]})


def test_sliding_window_rejected_but_full_window_allowed():
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        config_parse.from_hf_config({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 1024})
    cfg = config_parse.from_hf_config({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": None})
    assert cfg.architecture == "llama"


def test_unknown_rope_scaling_rejected():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        config_parse.from_hf_config({**BASE, "architectures": ["LlamaForCausalLM"],
                                     "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_qwen2_has_qkv_bias_and_eos_from_generation_config():
    cfg = config_parse.from_hf_config({**BASE, "architectures": ["Qwen2ForCausalLM"], "eos_token_id": 5},
                                      {"eos_token_id": [7, 8]})
    assert cfg.attention_bias and not cfg.o_proj_bias and cfg.eos_token_ids == (7, 8)


def test_model_resolution(tmp_path):
    with pytest.raises(UnsupportedModelError, match="not found"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": ["LlamaForCausalLM"]}))
    src = resolve_model(str(tmp_path))
    assert src.kind == "hf" and load_model_config(src).num_kv_heads == 2
    alias = resolve_model("smollm2-135m")
    assert alias.kind == "gguf" and alias.path.exists()
    cfg = load_model_config(alias)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (30, 9, 3, True)
