"""GrammarCompiler: compile structured-output specs off the event loop and the engine
thread, with a wall-clock limit, cached by grammar.

The cache maps `StructuredOutputsParams.key()` to a finished (or running)
future, so concurrent requests with one schema compile it once, and a
refused schema is refused again without recompiling. One compiler per engine,
so one tokenizer: the key is (grammar, tokenizer). The backend (llguidance's
tokenizer tables, ~0.3 s) is built on first use, on the compile thread, from
a private copy of the tokenizer (HF tokenizers must not be shared across threads).
Compile times and errors are recorded for the metrics (`drain_stats`).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import threading
import time
from typing import Any

from engine.sampling_params import ParamError
from engine.structured.backend import CompiledGrammar, GrammarBackend, GrammarError, create_backend
from engine.structured.params import StructuredOutputsParams

CACHE_SIZE = 512


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, backend: str = "llguidance",
                 timeout_s: float = 10.0):
        self._tokenizer = copy.deepcopy(tokenizer)
        self._vocab_size = vocab_size
        self._backend_name = backend
        self._backend: GrammarBackend | None = None
        self.timeout_s = timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple, concurrent.futures.Future] = collections.OrderedDict()
        self._durations: list[float] = []
        self._errors = 0

    def backend(self) -> GrammarBackend:
        with self._lock:
            if self._backend is None:
                self._backend = create_backend(self._backend_name, self._tokenizer, self._vocab_size)
            return self._backend

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        """A future of the compiled grammar (shared with every request of the same grammar)."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def _compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        start = time.perf_counter()
        try:
            return self.backend().compile(spec)
        except GrammarError:
            with self._lock:
                self._errors += 1
            raise
        finally:
            with self._lock:
                self._durations.append(time.perf_counter() - start)

    def _result(self, future: concurrent.futures.Future, spec: StructuredOutputsParams) -> CompiledGrammar:
        try:
            return future.result(timeout=0)
        except GrammarError as exc:
            raise ParamError(f"the {spec.kind} constraint cannot be used: {exc}", spec.param) from None

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Blocking (offline API); ParamError naming `spec.param` on failure or timeout."""
        future = self.submit(spec)
        concurrent.futures.wait([future], timeout=self.timeout_s)
        if not future.done():
            raise self._timeout(spec)
        return self._result(future, spec)

    async def compile_async(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        future = self.submit(spec)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except asyncio.TimeoutError:
            raise self._timeout(spec) from None
        except GrammarError:
            pass  # reported by _result
        return self._result(future, spec)

    def _timeout(self, spec: StructuredOutputsParams) -> ParamError:
        with self._lock:
            self._errors += 1
        return ParamError(f"compiling the {spec.kind} constraint took longer than "
                          f"{self.timeout_s:g} s", spec.param)

    def drain_stats(self) -> tuple[list[float], int]:
        """(compile durations in seconds, compile errors) since the last call."""
        with self._lock:
            durations, self._durations = self._durations, []
            errors, self._errors = self._errors, 0
        return durations, errors

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
