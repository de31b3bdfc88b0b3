"""Turn EngineArgs into running parts: model, tokenizer, KV cache size, scheduler, runner."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.attention.cascade import SHARED_PREFIX_MODES
from engine.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
from engine.errors import UnsupportedModelError
from engine.kv.manager import KVCacheManager
from engine.models.cpu_linear import pack_linears, packing_available
from engine.models.loader import load_model_config, load_tokenizer, resolve_model
from engine.models.registry import build_model
from engine.runner.model_runner import ModelRunner, RunnerConfig, kv_bytes_per_block
from engine.sched.scheduler import Scheduler

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineParts:
    args: EngineArgs
    model_config: ModelConfig
    tokenizer: Any
    scheduler: Scheduler
    runner: ModelRunner
    eos_token_ids: tuple[int, ...]
    spec: Any = None  # engine.spec.decoder.SpeculativeDecoder when speculation is on


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UnsupportedModelError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def _num_blocks(args: EngineArgs, cfgs: list[ModelConfig], dtype: torch.dtype, device: torch.device) -> int:
    """Blocks that fit the KV budget; a block holds KV for every model in `cfgs` (target, draft)."""
    if args.num_kv_blocks:
        return args.num_kv_blocks
    per_block = sum(kv_bytes_per_block(cfg, args.block_size, dtype) for cfg in cfgs)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - args.gpu_memory_utilization) * total
    else:
        budget = args.kv_cache_memory
    blocks = int(budget // per_block)
    if blocks < 1:
        raise UnsupportedModelError(f"KV cache budget too small for one block ({per_block} bytes); "
                                    "raise --kv-cache-memory / --gpu-memory-utilization")
    return blocks


def _max_model_len(args: EngineArgs, cfg: ModelConfig, num_blocks: int) -> int:
    capacity = num_blocks * args.block_size
    if args.max_model_len is not None:
        if args.max_model_len > capacity:
            raise UnsupportedModelError(f"max_model_len {args.max_model_len} needs more KV cache than the "
                                        f"{capacity} tokens available; raise the KV budget or lower it")
        return args.max_model_len
    if cfg.max_position_embeddings > capacity:
        log.warning("max_model_len capped at %d tokens by the KV cache size", capacity)
    return min(cfg.max_position_embeddings, capacity)


@dataclass(frozen=True)
class LoadedModel:
    """Weights, config and tokenizer: the expensive part, reusable across engines (tests)."""
    config: ModelConfig
    tokenizer: Any
    model: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    max_positions: int
    source: Path | None = None  # the checkpoint it was loaded from (resolved)


def load_model(args: EngineArgs, progress: bool = False) -> LoadedModel:
    src = resolve_model(args.model)
    cfg = load_model_config(src)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    max_positions = max(cfg.max_position_embeddings, args.max_model_len or 0)
    if args.cpu_activation_quant not in ("none", "q8"):
        raise ValueError(f"cpu_activation_quant must be 'none' or 'q8', got {args.cpu_activation_quant!r}")
    native = args.cpu_native_kernels and device.type == "cpu" and dtype == torch.float32 and _extension_built()
    q8 = args.cpu_activation_quant == "q8"
    if q8 and not (native and src.kind == "gguf"):
        log.warning("q8 activations need a GGUF model on the native CPU kernels; running fp32 activations")
    prepare = _native_blocks(src, cfg, q8) if native and src.kind == "gguf" else None
    model = build_model(src, cfg, dtype, device, max_positions, progress, prepare)
    _drop_file_maps()
    if native and model.use_fused_cpu_ops():
        log.info("fused CPU decoder ops: RMSNorm, residual add + RMSNorm, RoPE, SiLU * up")
    if args.cpu_packed_linear and device.type == "cpu" and dtype == torch.float32 and packing_available():
        model.tie_lm_head()
        n = pack_linears(model, batch_hint=min(args.max_num_seqs, 64))
        log.info("packed %d linear layers for oneDNN", n)
    return LoadedModel(cfg, load_tokenizer(src), model, dtype, device, max_positions, src.path.resolve())


def _extension_built() -> bool:
    from kernels import gguf_cpu

    return gguf_cpu.available()  # False after one log line saying why: the fp32 torch path


def _native_blocks(src, cfg: ModelConfig, q8: bool):
    """build_model's `prepare`: GGUF linears and embedding on their blocks (kernels/cpu) before
    the weights load, so those tensors are never dequantized."""
    from engine.models.gguf_linear import read_blocks, use_native_kernels

    def prepare(model: torch.nn.Module) -> frozenset[str]:
        used = use_native_kernels(model, read_blocks(src.path, cfg), q8)
        log.info("native GGUF kernels: %d tensors run on their quantized blocks%s", len(used),
                 " (q8 activations at one row)" if q8 else "")
        return used

    return prepare


def _drop_file_maps() -> None:
    """The GGUF reader maps the whole file; every tensor is copied out by now."""
    from engine.models.loader import _gguf_reader

    _gguf_reader.cache_clear()


def build_parts(args: EngineArgs, progress: bool = False, loaded: LoadedModel | None = None,
                draft: LoadedModel | None = None) -> EngineParts:
    """Everything the engine core needs; `loaded` (and `draft`, the draft model of method
    "draft") reuse weights already in memory."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    loaded = loaded or load_model(args, progress)
    cfg, tokenizer = loaded.config, loaded.tokenizer
    draft, same = _draft_model(args, loaded, draft)
    shared_kv = draft is not None and _draft_shares_kv(args.speculative_draft_kv, cfg, draft.config, same)
    # A block holds KV for the target and, unless it shares the target's, the draft model.
    own = [draft.config] if draft is not None and not shared_kv else []
    num_blocks = _num_blocks(args, [cfg] + own, loaded.dtype, loaded.device)
    max_len = min(_max_model_len(args, cfg, num_blocks), loaded.max_positions)
    cache = CacheConfig(args.block_size, num_blocks, args.enable_prefix_caching)
    kv = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching)
    if args.shared_prefix_attention not in SHARED_PREFIX_MODES:
        raise ValueError(f"shared_prefix_attention must be one of {SHARED_PREFIX_MODES}")
    sched_cfg = SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, max_len, args.max_waiting_requests,
                                shared_prefix_groups=args.shared_prefix_attention != "off")
    # Without our CPU kernels, `auto` keeps torch's attention on the CPU too.
    attention = "torch" if args.attention_backend == "auto" and not args.cpu_native_kernels else args.attention_backend
    runner = ModelRunner(loaded.model, RunnerConfig(cfg, cache, loaded.dtype, loaded.device, attention,
                                                    args.shared_prefix_attention))
    eos = cfg.eos_token_ids or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    log.info("model %s: %d layers, %d KV blocks x %d tokens, max_model_len %d, %s on %s",
             args.model, cfg.num_layers, num_blocks, args.block_size, max_len, loaded.dtype, loaded.device)
    scheduler = Scheduler(sched_cfg, kv)
    spec = build_speculative(args, scheduler, runner, draft, shared_kv)
    return EngineParts(args, cfg, tokenizer, scheduler, runner, eos, spec)


def _draft_model(args: EngineArgs, target: LoadedModel, draft: LoadedModel | None
                 ) -> tuple[LoadedModel | None, bool]:
    """The draft model of method "draft" (loaded like the target), checked against it, and
    whether it is the target's own checkpoint (the target's object, or loaded from the
    target's file); (None, False) for other methods."""
    method, _ = args.resolved_speculative()
    if method != "draft":
        return None, False
    if draft is None:
        draft = load_draft_model(args, target)
    # The same checkpoint: the target's object, or loaded (here or by the caller) from its file.
    same = draft is target or draft.source == (target.source or resolve_model(args.model).path.resolve())
    if draft.config.vocab_size != target.config.vocab_size or draft.device != target.device:
        raise UnsupportedModelError(f"draft model vocabulary {draft.config.vocab_size} / device {draft.device} "
                                    f"differ from the target's ({target.config.vocab_size} / {target.device})")
    if draft.max_positions < target.max_positions:
        raise UnsupportedModelError("the draft model supports fewer positions than the target")
    return draft, same


def load_draft_model(args: EngineArgs, target: LoadedModel) -> LoadedModel:
    """The draft model `args` names (method "draft"), loaded as an engine of `args` loads it;
    a caller that builds many such engines loads it once and passes it (`draft_loaded`)."""
    name = args.resolved_speculative_model()
    if not name:
        raise UnsupportedModelError('speculative method "draft" needs --speculative-model')
    quant = args.speculative_draft_activation_quant
    own = {} if quant is None else {"cpu_activation_quant": quant, "cpu_native_kernels": True}
    return load_model(args.replace(model=name, max_model_len=max(target.max_positions, 1), **own))


def _draft_shares_kv(mode: str, target: ModelConfig, draft: ModelConfig, same_checkpoint: bool) -> bool:
    """Whether the draft model reads and writes the target's KV (`speculative_draft_kv`).
    Shared, a draft pass attends over the target's KV of every committed token, so the
    draft never catches up on a prompt (with its own KV, a q8 self-draft's catch-up cost
    ~1.3 ms a prompt token here, about the target's own prefill, and at grounded B = 4 it
    was 6.2 s of a 25 s run); its writes land in this step's slots, which the verify pass
    rewrites. Only a draft that computes (nearly) the target's KV gains from reading it:
    "auto" shares for the target's own checkpoint."""
    fits = (target.num_layers, target.num_kv_heads, target.head_dim) == (draft.num_layers, draft.num_kv_heads,
                                                                          draft.head_dim)
    if mode == "shared" and not fits:
        raise UnsupportedModelError(
            f"speculative_draft_kv shared needs the target's KV shape (layers, KV heads, head dim) "
            f"{(target.num_layers, target.num_kv_heads, target.head_dim)}; the draft has "
            f"{(draft.num_layers, draft.num_kv_heads, draft.head_dim)}")
    return mode == "shared" or (mode == "auto" and same_checkpoint and fits)


def build_speculative(args: EngineArgs, scheduler: Scheduler, runner: ModelRunner,
                      draft: LoadedModel | None = None, shared_kv: bool = False) -> Any:
    """The speculative decoder of `args`, its latency models measured on this runner; None if off.
    `shared_kv`: method "draft" reads and writes the target's KV (`_draft_shares_kv`)."""
    from engine.spec import DraftController, LatencyModel, create_drafter
    from engine.spec.latency import ContextCost
    from engine.spec.decoder import SpeculativeDecoder, measure_step_latency, probe_shapes
    from engine.spec.probes import CONTEXT_ROWS, ProbeScratch, measure_context_cost, measure_draft_costs

    method, k = args.resolved_speculative()
    if method is None:
        return None
    kwargs: dict[str, Any] = {}
    if method == "layerskip":
        kwargs = {"keep": args.speculative_layerskip_keep}
    elif method == "draft":
        # A draft on the native q8 kernels takes the native attention too under "auto",
        # whatever the target runs: with torch's SDPA its drafts were accepted 84% of the
        # time on open chat, against 89% (16 prompts, batch 1; the fp32 outputs agree).
        quant = args.speculative_draft_activation_quant
        own = "auto" if quant is not None and args.attention_backend == "auto" else None
        kwargs = {"model": draft.model, "model_config": draft.config, "attention_backend": own,
                  "shared_kv": shared_kv}
    elif method == "recycling":
        kwargs = {"vocab_size": runner.cfg.model.vocab_size}
    drafter = create_drafter(method, **kwargs)
    runner.logit_topk = drafter.logit_topk
    if drafter.needs_runner:
        drafter.attach(runner)
        runner.model_drafter = drafter
    latency, draft_latency, catchup, context = LatencyModel(1.0, 0.0), None, None, ContextCost()
    if args.speculative_adaptive:
        max_tokens = min(args.max_num_batched_tokens, args.max_num_seqs * (k + 1))
        with ProbeScratch(scheduler, runner) as scratch:
            latency = measure_step_latency(scratch.step, probe_shapes(k, max_tokens, args.max_num_seqs))
            if drafter.needs_runner:
                draft_latency, catchup = measure_draft_costs(scratch, drafter)
            rows = min(CONTEXT_ROWS, args.max_num_seqs, max(args.max_num_batched_tokens // (k + 1), 1))
            context = measure_context_cost(scratch, rows, k + 1, scheduler.config.max_model_len,
                                           drafter if drafter.needs_runner else None)
    where = "" if method != "draft" else ", the draft on the target's KV" if shared_kv else ", the draft on its own KV"
    log.info("speculative decoding: %s, up to %d tokens, %s%s", method, k,
             "adaptive" if args.speculative_adaptive else "fixed k", where)
    return SpeculativeDecoder(drafter, DraftController(k, latency, args.speculative_adaptive,
                                                       draft_latency=draft_latency, catchup_per_token=catchup,
                                                       context=context))
