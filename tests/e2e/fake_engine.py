"""A deterministic stand-in for `engine.AsyncEngine`, for app-level tests.

Same public surface as the real engine (generate/abort/run_tokenizer/model_name/vocab_size/
max_model_len/is_alive/add_stats_listener/num_unfinished_requests/
get_kv_cache_usage/shutdown) and the same error behaviour. The tokenizer is
byte-level (id = byte value) plus three special tokens; each step emits one
byte of a fixed text per completion, offset by seed and completion index, so
outputs are reproducible and easy to predict in tests.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from engine.errors import ContextLengthError, EngineOverloadedError
from engine.outputs import (CompletionOutput, FinishedRequestStats, Logprob, RequestOutput,
                            StepStats)
from engine.sampling_params import OutputKind, SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs. "
SPECIAL = {256: "<|im_start|>", 257: "<|im_end|>", 258: "<|endoftext|>"}


class FakeTokenizer:
    eos_token_id = 258

    def __len__(self) -> int:
        return 256 + len(SPECIAL)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for t in ids:
            if t in SPECIAL:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special_tokens:
                    out.append(SPECIAL[t])
            else:
                buf.append(t)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, conversation: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        if not conversation:
            raise ValueError("empty conversation")
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                       for m in conversation)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class FakeEngine:
    def __init__(self, model_name: str = "fake-model", max_model_len: int = 512,
                 step_delay: float = 0.002, capacity: int | None = None):
        self.tokenizer = FakeTokenizer()
        self.vocab_size = len(self.tokenizer)
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.capacity = capacity  # most unfinished requests before EngineOverloadedError
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.requests: list[tuple[list[int] | str, SamplingParams]] = []
        self.alive = True
        self.shut_down = False
        self._listeners: list[Callable[[StepStats], None]] = []
        self._abort_flags: set[str] = set()

    # ----------------------------------------------------------- public API
    def is_alive(self) -> bool:
        return self.alive

    def add_stats_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)

    def num_unfinished_requests(self) -> int:
        return len(self.active)

    def get_kv_cache_usage(self) -> float:
        return min(1.0, 0.01 * len(self.active))

    async def abort(self, request_id: str) -> None:
        self._abort_flags.add(request_id)

    async def shutdown(self) -> None:
        self.shut_down = True
        self.alive = False

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + (params.max_tokens or 1) > self.max_model_len:
            raise ContextLengthError(f"prompt {len(ids)} + max_tokens {params.max_tokens} > "
                                     f"{self.max_model_len}", "prompt")
        if self.capacity is not None and len(self.active) >= self.capacity:
            raise EngineOverloadedError("queue full")
        self.requests.append((prompt, params))
        self.active.add(request_id)
        arrival = time.monotonic()
        outs = [CompletionOutput(j, "", [], 0.0 if params.logprobs is not None else None,
                                 [] if params.logprobs is not None else None)
                for j in range(params.n)]
        sent_upto = [[0, 0] for _ in outs]  # (chars, tokens) already handed out per completion
        finished = False
        try:
            rng = random.Random(params.seed if params.seed is not None else
                                (0 if params.greedy else None))
            starts = [0 if params.greedy else rng.randrange(len(TEXT)) for _ in outs]
            limit = params.max_tokens or (self.max_model_len - len(ids))
            step = 0
            while not finished:
                await asyncio.sleep(self.step_delay)
                if request_id in self._abort_flags:
                    break
                for out, start in zip(outs, starts):
                    if not out.finished:
                        self._advance(out, start, step, params, limit)
                step += 1
                finished = all(o.finished for o in outs)
                self._emit_step(len(ids) if step == 1 else 0, len(outs), finished,
                                arrival, len(ids), sum(len(o.token_ids) for o in outs))
                if params.output_kind is OutputKind.DELTA:
                    yield RequestOutput(request_id, None, ids, [_delta(o, sent) for o, sent in
                                                                zip(outs, sent_upto)],
                                        finished, kind=OutputKind.DELTA)
                elif finished:
                    yield RequestOutput(request_id, None, ids, outs, finished)
        finally:
            self.active.discard(request_id)
            self._abort_flags.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def run_tokenizer(self, fn: Callable[[Any], Any]) -> Any:
        return fn(self.tokenizer)

    # ------------------------------------------------------------- internals
    def _advance(self, out: CompletionOutput, start: int, step: int,
                 params: SamplingParams, limit: int) -> None:
        token = ord(TEXT[(start + step) % len(TEXT)])
        out.token_ids.append(token)
        if out.logprobs is not None:
            k = params.logprobs or 0
            entry = {token: Logprob(-0.25, 1, chr(token))}
            for r, alt in enumerate((t for t in range(97, 123) if t != token), start=2):
                if r > k + 1:
                    break
                entry[alt] = Logprob(-1.0 * r, r, chr(alt))
            out.logprobs.append(entry)
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) - 0.25
        full = self.tokenizer.decode(out.token_ids)
        for stop in params.stop:
            pos = full.find(stop)
            if pos >= 0:
                out.text = full[:pos + len(stop)] if params.include_stop_str_in_output \
                    else full[:pos]
                out.finish_reason, out.stop_reason = "stop", stop
                return
        out.text = full
        if token in params.stop_token_ids:
            out.finish_reason, out.stop_reason = "stop", token
        elif len(out.token_ids) >= limit:
            out.finish_reason = "length"

    def _emit_step(self, prompt_tokens: int, gen_tokens: int, finished: bool,
                   arrival: float, num_prompt: int, num_generated: int) -> None:
        fin = [FinishedRequestStats("length", num_prompt, num_generated,
                                    time.monotonic() - arrival, 0.0)] if finished else []
        stats = StepStats(num_running=len(self.active), num_waiting=0,
                          kv_cache_usage=self.get_kv_cache_usage(),
                          num_prompt_tokens=prompt_tokens, num_generation_tokens=gen_tokens,
                          num_preemptions=0, prefix_cache_queries=prompt_tokens,
                          prefix_cache_hits=0,
                          time_to_first_tokens=[0.01] if prompt_tokens else [],
                          inter_token_latencies=[] if prompt_tokens else [self.step_delay],
                          finished=fin)
        for fn in self._listeners:
            fn(stats)


def _delta(out: CompletionOutput, sent: list[int]) -> CompletionOutput:
    """What `out` gained since `sent` = [chars, tokens] (updated)."""
    chars, tokens = sent
    sent[0], sent[1] = len(out.text), len(out.token_ids)
    return CompletionOutput(out.index, out.text[chars:], out.token_ids[tokens:],
                            out.cumulative_logprob,
                            None if out.logprobs is None else out.logprobs[tokens:],
                            out.finish_reason, out.stop_reason)
