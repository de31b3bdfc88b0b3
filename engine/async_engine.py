"""AsyncEngine: the EngineCore on its own thread, async streams per request.

Threads: the event loop (callers), one tokenizer thread (a private copy of the
tokenizer: HF tokenizers must not be used from two threads at once, and the
engine thread detokenizes with its own), the engine thread (the core), and a
watchdog that logs a step running longer than `step_watchdog_s`.

A request is tokenized and validated on the tokenizer thread (so errors raise
before the first yield and a long prompt never blocks the event loop), then
handed to the engine thread through a command queue. Outputs come back through
`loop.call_soon_threadsafe` into the request's `_Stream`, which holds at most
one pending output: a DELTA output arriving before the consumer took the last
one is merged into it, so a slow reader costs O(its own output), never a
growing queue. A consumer that stops iterating aborts its request.

If the engine thread dies (a bug), every open stream gets `EngineDeadError`,
`is_alive()` turns False at once and the death listeners run (the server exits
non-zero so a supervisor restarts it); the traceback is logged once.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, TypeVar

from engine.config import EngineArgs
from engine.core import EngineCore
from engine.errors import EngineDeadError, EngineError, EngineOverloadedError, ParamError
from engine.memory_trim import HeapTrimmer
from engine.openmp_pool import release_openmp_pool
from engine.outputs import RequestOutput, StepStats
from engine.sampling_params import SamplingParams, check_text
from engine.setup import LoadedModel, build_parts

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Stream:
    """One request's mailbox: at most one pending item (outputs merge; an error wins)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:  # any thread
        self.loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: RequestOutput | BaseException) -> None:  # event loop
        pending = self._pending
        if isinstance(pending, BaseException):
            return
        if isinstance(pending, RequestOutput) and isinstance(item, RequestOutput):
            pending.merge(item)
        else:
            self._pending = item
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        item, self._pending = self._pending, None
        self._ready.clear()
        return item


class AsyncEngine:
    def __init__(self, core: EngineCore, args: EngineArgs):
        self.core = core
        self.args = args
        self.model_name = args.served_model_name or args.model
        self.max_model_len = core.max_model_len
        self.num_speculative_tokens = core.spec.max_k if core.spec is not None else 0
        self.vocab_size = core.vocab_size  # the model's: token ids must be below it
        # The event-loop side's tokenizer: a private copy used only on `_tok_pool`'s thread.
        self.tokenizer = copy.deepcopy(core.tokenizer)
        self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams membership against death/shutdown
        self._listeners: list[Callable[[StepStats], None]] = []
        self._death_listeners: list[Callable[[BaseException], None]] = []
        self._error: BaseException | None = None
        self._stopping = False
        self._trimmer = HeapTrimmer()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        # The model was loaded and warmed here; the engine thread computes from now on, and
        # this thread's OpenMP team would slow every one of its ops (engine/openmp_pool.py).
        release_openmp_pool()
        self._thread.start()
        # Joined at shutdown: a daemon thread still holding tensors when the interpreter
        # finalizes is killed mid-deallocation, and the process aborts.
        self._watchdog_stop = threading.Event()
        self._watchdog_thread = None
        if args.step_watchdog_s:
            self._watchdog_thread = threading.Thread(target=self._watchdog, name="engine-watchdog", daemon=True)
            self._watchdog_thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs, progress: bool = False, loaded: LoadedModel | None = None) -> "AsyncEngine":
        return cls(EngineCore(build_parts(args, progress=progress, loaded=loaded)), args)

    # ---- caller side (event loop) -------------------------------------------
    async def run_tokenizer(self, fn: Callable[[Any], T]) -> T:
        """`fn(tokenizer)` on the tokenizer thread (never concurrently, never on the loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, fn, self.tokenizer)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request in `params.output_kind`; raises before the first yield
        when the request is refused (ParamError, ContextLengthError, overload, dead engine)."""
        self._check_admission()
        if not isinstance(request_id, str) or not request_id:
            raise ParamError("request_id must be a non-empty string", "request_id")
        if request_id in self._streams:
            raise ParamError(f"request id {request_id!r} is already in use", "request_id")
        text, prompt_ids = await self.run_tokenizer(lambda _: self._prepare(prompt, params))
        grammar = None  # compiled on the grammar pool: neither the loop nor the engine waits
        if params.structured_outputs is not None:
            grammar = await self.core.grammars.compile_async(params.structured_outputs)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:  # registered atomically against death and shutdown
            self._check_admission()
            if request_id in self._streams:
                raise ParamError(f"request id {request_id!r} is already in use", "request_id")
            self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, text, params, grammar))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing left to abort
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def _prepare(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenizer thread: text -> ids with our copy; ids and lengths validated."""
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            text, ids = prompt, list(self.tokenizer.encode(prompt))
        else:
            text, ids = None, list(prompt)
        self.core.validate(ids, params)
        return text, ids

    def _check_admission(self) -> None:
        if not self.is_alive():
            raise EngineError("the engine is not running")
        limit = self.args.max_waiting_requests
        if limit is not None and self.num_waiting() >= limit:
            raise EngineOverloadedError(f"too many waiting requests ({limit}); retry later")

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopping

    def add_stats_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)

    def add_death_listener(self, fn: Callable[[BaseException], None]) -> None:
        """`fn(exc)` runs once, on the engine thread, if the engine thread dies."""
        self._death_listeners.append(fn)

    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    def num_waiting(self) -> int:
        return len(self.core.scheduler.waiting) + self._commands.qsize()

    def grammar_stats(self) -> tuple[list[float], int]:
        """(grammar compile durations, compile errors) since the last call (for metrics)."""
        return self.core.grammars.drain_stats()

    def get_kv_cache_usage(self) -> float:
        return self.core.scheduler.kv.usage()

    async def shutdown(self) -> None:
        """Stop the engine thread; every stream still open ends with EngineError."""
        self._stopping = True
        self._commands.put(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        self._fail_streams(EngineError("the engine was shut down"))
        self._tok_pool.shutdown(wait=False)
        self.core.grammars.shutdown()
        self._watchdog_stop.set()
        if self._watchdog_thread is not None:
            self._watchdog_thread.join(5)

    # ---- engine thread ------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                idle = not self.core.has_unfinished()
                self._trimmer.maybe_trim(idle)
                if not self._drain_commands(block=idle):
                    return
                if not self.core.has_unfinished():
                    continue
                outputs, stats = self.core.step()
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                self._publish(stats)
        except BaseException as exc:  # a bug: fail everything, tell the listeners, stop
            self._error = exc
            log.critical("engine thread died; failing every open request", exc_info=exc)
            self._fail_streams(EngineDeadError(f"the engine failed: {type(exc).__name__}"))
            for fn in self._death_listeners:
                try:
                    fn(exc)
                except Exception:
                    log.exception("engine death listener failed")

    def _fail_streams(self, exc: EngineError) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(exc)

    def _publish(self, stats: StepStats) -> None:
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:  # a broken listener must not kill the engine
                log.exception("stats listener failed")

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued add/abort commands; waits for one when idle. False on stop."""
        while True:
            try:
                cmd = self._commands.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "abort":
                self.core.abort(cmd[1])
            else:
                self._add(*cmd[1:])

    def _add(self, request_id: str, prompt_ids: list[int], text: str | None, params: SamplingParams,
             grammar: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is None:  # cancelled before it reached the engine
            return
        try:
            self.core.add_request(request_id, prompt_ids, params, prompt_text=text, grammar=grammar)
        except Exception as exc:  # validation already ran; report anything else to the caller
            stream.put(exc)

    # ---- watchdog -------------------------------------------------------------
    def _watchdog(self) -> None:
        """Log (once per step) a step running longer than the limit, with its batch."""
        limit = self.args.step_watchdog_s
        reported = None
        while self._thread.is_alive() and not self._watchdog_stop.wait(min(limit / 4, 1.0)):
            current = self.core.current_step
            if current is None or current is reported:
                continue
            elapsed = time.monotonic() - current[0]
            if elapsed > limit:
                reported = current
                log.warning("engine step running for %.1f s (limit %.1f s); batch (request, tokens): %s",
                            elapsed, limit, list(current[1]))
