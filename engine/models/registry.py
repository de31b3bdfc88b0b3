"""Build a model from its source: instantiate the architecture, load (fusing) weights."""
from __future__ import annotations

import re
from collections.abc import Callable

import torch

from engine.config import ModelConfig
from engine.errors import UnsupportedModelError
from engine.models.llama import LlamaModel
from engine.models.loader import ModelSource, iter_weights

ARCHITECTURES = {"llama": LlamaModel, "qwen2": LlamaModel}
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn\.|mlp\.)?(\w+)\.(weight|bias)$")


def build_model(src: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, progress: bool = False,
                prepare: Callable[[torch.nn.Module], frozenset[str]] | None = None) -> LlamaModel:
    """`prepare` runs on the allocated (unwritten) model before the weights load: it may swap
    modules for ones holding their own weights (GGUF blocks) and returns the checkpoint names
    it consumed, which are then never read (their fp32 parameters are never touched)."""
    model_cls = ARCHITECTURES.get(cfg.architecture)
    if model_cls is None:
        raise UnsupportedModelError(f"no implementation for architecture {cfg.architecture!r}")
    with torch.device("meta"):
        model = model_cls(cfg, max_positions)
    model = model.to_empty(device=device)
    model.rotary = type(model.rotary)(cfg, max_positions).to(device)  # buffers are not weights
    weights = iter_weights(src, cfg, prepare(model) if prepare else frozenset())
    if progress:
        from tqdm import tqdm
        weights = tqdm(weights, desc="loading weights", unit="tensor")
    load_weights(model, weights)
    return model.to(dtype).eval()


def load_weights(model: torch.nn.Module, weights) -> None:
    """Copy HF-named tensors into `model`, fusing q/k/v and gate/up. Every parameter
    must be written exactly once (fused ones by all their parts)."""
    params = dict(model.named_parameters())
    pending: dict[str, list] = {}
    written: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb" in name:
            continue
        target, tensor = _target(name, tensor, pending)
        if target is None:
            continue
        if target not in params:
            raise UnsupportedModelError(f"checkpoint tensor {name!r} has no place in the model")
        param = params[target]
        if param.shape != tensor.shape:
            raise UnsupportedModelError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        written.add(target)
    missing = set(params) - written
    if missing:
        raise UnsupportedModelError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def _target(name: str, tensor: torch.Tensor, pending: dict[str, list]):
    """Map a checkpoint name to our parameter; fused parts wait until all arrive."""
    m = _LAYER.search(name)
    if m is None:
        return name, tensor
    layer, kind, suffix = m.groups()
    if kind not in FUSED:
        return f"layers.{layer}.{kind}.{suffix}", tensor
    fused, idx = FUSED[kind]
    key = f"layers.{layer}.{fused}.{suffix}"
    parts = pending.setdefault(key, [None] * (3 if fused == "qkv_proj" else 2))
    parts[idx] = tensor
    if any(p is None for p in parts):
        return None, None
    del pending[key]
    return key, torch.cat(parts, dim=0)
