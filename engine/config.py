"""Frozen engine configuration. The only module that reads environment variables.

`EngineArgs` is what users set (CLI flags, YAML keys, `LLM(**kwargs)`);
`EngineConfig` is the resolved, validated form the engine runs with.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
DRAFT_KV_MODES = ("auto", "own", "shared")  # EngineArgs.speculative_draft_kv


@dataclass(frozen=True)
class EngineArgs:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # None: the model's own limit
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes of KV cache on CPU
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides the memory budget (tests)
    enable_prefix_caching: bool = True
    seed: int = 0
    attention_backend: str = "auto"
    # Hydragen-style attention over shared prefixes: auto (per step and group, by the
    # backend's cost model) | on (every shared level) | off.
    shared_prefix_attention: str = "auto"
    max_waiting_requests: int | None = 1000  # None: unbounded
    num_threads: int | None = None  # torch intra-op threads on CPU
    cpu_packed_linear: bool = True  # fp32 CPU: oneDNN pre-packed weights (faster; same math)
    cpu_native_kernels: bool = True  # fp32 CPU: our AVX2 kernels (kernels/cpu): GGUF weights stay in their blocks; fused norms/RoPE
    # GGUF on CPU: "q8" quantizes linears' activations per 32-block to int8 (integer dot products, as
    # llama.cpp; every M on AVX-512 VNNI, one-row linears elsewhere; not exact, quality printed by
    # loadtest/q8_quality.py); "none" keeps fp32.
    cpu_activation_quant: str = "none"
    step_watchdog_s: float = 30.0  # log a step running longer than this, with its batch (0: off)
    structured_outputs_backend: str = "llguidance"  # grammar backend (engine/structured registry)
    grammar_compile_timeout_s: float = 10.0  # a grammar taking longer to compile is refused (400)
    enable_fast_forward: bool = True  # append tokens a grammar allows alone without sampling them
    speculative_method: str | None = None  # drafter (engine/spec registry): ngram, recycling, layerskip, draft; None = off
    num_speculative_tokens: int = 4  # most drafts per request per step
    speculative_adaptive: bool = True  # choose k per step from the cost model (False: always the most)
    # vLLM's form, JSON text or dict: {"method": ..., "num_speculative_tokens": ...}; overrides the two above.
    speculative_config: str | None = None
    speculative_model: str | None = None  # method "draft": the draft model (alias or path; same tokenizer)
    # method "draft": the draft model's cpu_activation_quant ("q8": a GGUF draft on the native q8
    # kernels, e.g. the target's own GGUF as a cheap, close draft of the exact fp32 target); None:
    # the draft loads with the target's settings.
    speculative_draft_activation_quant: str | None = None
    # method "draft": where the draft model's KV lives. "own": tensors of its own (it catches up
    # on every committed token); "shared": the target's (no catch-up; the verify pass rewrites
    # every drafted slot; needs the same KV shape); "auto": shared when the draft is the target's
    # own checkpoint (a q8 self-draft), else own.
    speculative_draft_kv: str = "auto"
    speculative_layerskip_keep: float = 0.5  # method "layerskip": fraction of the layers the draft runs

    def _speculative_dict(self) -> dict:
        """speculative_config parsed and checked ({} when unset)."""
        if not self.speculative_config:
            return {}
        import json

        cfg = self.speculative_config
        cfg = json.loads(cfg) if isinstance(cfg, str) else dict(cfg)
        if not isinstance(cfg, dict) or not set(cfg) <= {"method", "num_speculative_tokens", "model"}:
            raise ValueError("speculative_config takes {\"method\": ..., \"num_speculative_tokens\": ..., "
                             "\"model\": ...}")
        return cfg

    def resolved_speculative(self) -> tuple[str | None, int]:
        """(method, num_speculative_tokens), speculative_config applied and checked."""
        cfg = self._speculative_dict()
        method = cfg.get("method", self.speculative_method)
        k = cfg.get("num_speculative_tokens", self.num_speculative_tokens)
        if method is not None and (type(k) is not int or not 1 <= k <= 64):
            raise ValueError("num_speculative_tokens must be an integer in [1, 64]")
        if not 0.0 < self.speculative_layerskip_keep <= 1.0:
            raise ValueError("speculative_layerskip_keep must be in (0, 1]")
        if self.speculative_draft_activation_quant not in (None, "none", "q8"):
            raise ValueError("speculative_draft_activation_quant must be 'none' or 'q8'")
        if self.speculative_draft_kv not in DRAFT_KV_MODES:
            raise ValueError(f"speculative_draft_kv must be one of {DRAFT_KV_MODES}")
        return method, k

    def resolved_speculative_model(self) -> str | None:
        """The draft model of method "draft" (speculative_config's "model" wins)."""
        return self._speculative_dict().get("model", self.speculative_model)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes: Any) -> "EngineArgs":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, normalised from HF config.json or GGUF metadata."""
    architecture: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_waiting_requests: int | None = None
    shared_prefix_groups: bool = False  # report the step's shared-prefix forest (attention uses it)


@dataclass(frozen=True)
class EnvSettings:
    """Everything the process environment may change, read once."""
    api_key: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "EnvSettings":
        env = os.environ if environ is None else environ
        return cls(
            api_key=env.get("STRIX_API_KEY") or None,
        )
