"""AsyncEngine: delta and final streams, coalescing, abort on consumer exit, duplicate ids,
overload bounds, tokenizer thread, engine death and shutdown."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineArgs
from engine.errors import (ContextLengthError, EngineDeadError, EngineError, EngineOverloadedError,
                           ParamError)
from engine.sampling_params import OutputKind, SamplingParams


@pytest.fixture(scope="module")
def engine(smol_loaded):
    eng = AsyncEngine.from_args(EngineArgs(num_kv_blocks=64, max_model_len=512), loaded=smol_loaded)
    yield eng
    asyncio.run(eng.shutdown())


async def _collect(engine, prompt, params, rid):
    outs = [o async for o in engine.generate(prompt, params, rid)]
    return outs


def test_concurrent_delta_streams_match_offline(engine, make_llm):
    params = SamplingParams(temperature=0, max_tokens=12, output_kind=OutputKind.DELTA)
    prompts = ["Hello, my name is", "The sky is", "1, 2, 3,"]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, params, f"a{i}") for i, p in enumerate(prompts)))
    streams = asyncio.run(main())
    offline = make_llm(num_kv_blocks=64).generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for outs, ref in zip(streams, offline):
        assert len(outs) > 1 and outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert all(o.kind is OutputKind.DELTA for o in outs)
        # Deltas: each carries only what is new, so concatenating them gives the whole.
        assert [t for o in outs for t in o.outputs[0].token_ids] == ref.outputs[0].token_ids
        assert "".join(o.outputs[0].text for o in outs) == ref.outputs[0].text
        assert outs[-1].outputs[0].finish_reason == "length"


def test_final_kind_yields_one_whole_output(engine, make_llm):
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    outs = asyncio.run(_collect(engine, "The sky is", params, "final-1"))
    ref = make_llm(num_kv_blocks=64).generate("The sky is", params)[0]
    assert len(outs) == 1 and outs[0].finished and outs[0].kind is OutputKind.FINAL
    assert outs[0].outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(outs[0].outputs[0].logprobs) == 8


def test_slow_reader_gets_merged_deltas(engine):
    """A consumer that does not read while the request runs holds one merged output."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, output_kind=OutputKind.DELTA,
                            logprobs=1)

    async def main():
        agen = engine.generate("Tell me about the sea.", params, "slow-1")
        first = await agen.__anext__()
        while engine.core.groups.get("slow-1") is not None:  # let it finish unread
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        rest = [o async for o in agen]
        return first, rest
    first, rest = asyncio.run(main())
    assert len(rest) == 1 and rest[0].finished  # 19 step outputs coalesced into one
    ids = first.outputs[0].token_ids + rest[0].outputs[0].token_ids
    assert len(ids) == 20 and len(rest[0].outputs[0].logprobs) == len(rest[0].outputs[0].token_ids)


def test_duplicate_request_id_leaves_the_running_one_alone(engine, make_llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, output_kind=OutputKind.DELTA)

    async def main():
        first = engine.generate("The sky is", params, "dup")
        head = await first.__anext__()
        with pytest.raises(ParamError) as err:
            async for _ in engine.generate("Other prompt", params, "dup"):
                pass
        assert err.value.param == "request_id"
        rest = [o async for o in first]
        return [head] + rest
    outs = asyncio.run(main())
    ref = make_llm(num_kv_blocks=64).generate("The sky is", params)[0]
    assert [t for o in outs for t in o.outputs[0].token_ids] == ref.outputs[0].token_ids


def test_tokenizer_runs_off_the_loop_on_its_own_copy(engine):
    async def main():
        return await engine.run_tokenizer(lambda tok: (threading.current_thread(), tok, tok.encode("hi")))
    thread, tok, ids = asyncio.run(main())
    assert thread is not threading.main_thread() and thread.name.startswith("tokenizer")
    assert tok is not engine.core.tokenizer and ids == engine.core.tokenizer.encode("hi")


def test_consumer_exit_aborts_and_frees_blocks(engine):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        agen = engine.generate("Tell me a long story about a dragon.", params, "abort-me")
        seen = 0
        async for _ in agen:
            seen += 1
            if seen == 3:
                break
        await agen.aclose()
        for _ in range(200):  # the engine thread applies the abort on its next turn
            if engine.core.scheduler.num_unfinished == 0:
                break
            await asyncio.sleep(0.01)
    asyncio.run(main())
    kv = engine.core.scheduler.kv
    assert engine.core.scheduler.num_unfinished == 0
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert engine.is_alive()


def test_errors_raise_before_first_output(engine):
    async def main():
        with pytest.raises(ContextLengthError) as err:
            async for _ in engine.generate("hi", SamplingParams(max_tokens=10_000), "too-long"):
                pass
        assert "512" in str(err.value) and err.value.code == "context_length_exceeded"
    asyncio.run(main())


def test_overload_accepts_n_waiting_and_refuses_n_plus_1(smol_loaded):
    eng = AsyncEngine.from_args(EngineArgs(num_kv_blocks=64, max_model_len=512, max_num_seqs=1,
                                           max_waiting_requests=2), loaded=smol_loaded)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, output_kind=OutputKind.DELTA)

    async def main():
        gens = [eng.generate("Count to a thousand:", long, f"w{i}") for i in range(3)]
        await gens[0].__anext__()  # running (the one seat)
        waiting = [asyncio.ensure_future(g.__anext__()) for g in gens[1:]]
        for _ in range(500):  # both reach the scheduler's waiting queue
            if len(eng.core.scheduler.waiting) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(eng.core.scheduler.waiting) == 2 and eng.num_waiting() == 2
        with pytest.raises(EngineOverloadedError):
            async for _ in eng.generate("one more", long, "w3"):
                pass
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for g in gens:
            await g.aclose()
        await eng.shutdown()
    asyncio.run(main())


def _kill_engine(eng) -> None:
    """Make the next step raise outside the guard: the engine thread dies."""
    def broken():
        raise RuntimeError("scheduler bug")
    eng.core.scheduler.schedule = broken


def test_engine_death_fails_open_streams_and_refuses_new(smol_loaded):
    eng = AsyncEngine.from_args(EngineArgs(num_kv_blocks=64, max_model_len=512), loaded=smol_loaded)
    deaths = []
    eng.add_death_listener(deaths.append)
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True, output_kind=OutputKind.DELTA)

    async def main():
        gen = eng.generate("Count:", params, "victim")
        await gen.__anext__()
        _kill_engine(eng)
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass
        assert not eng.is_alive()
        # Racing requests never hang: each gets an error.
        results = await asyncio.wait_for(asyncio.gather(
            *(_collect(eng, "hi", params, f"late{i}") for i in range(8)), return_exceptions=True), 10)
        assert all(isinstance(r, EngineError) for r in results)
        await eng.shutdown()
    asyncio.run(main())
    assert len(deaths) == 1 and "scheduler bug" in str(deaths[0])


def test_shutdown_ends_every_open_stream(smol_loaded):
    eng = AsyncEngine.from_args(EngineArgs(num_kv_blocks=64, max_model_len=512), loaded=smol_loaded)
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True, output_kind=OutputKind.DELTA)

    async def main():
        gens = [eng.generate("Count:", params, f"s{i}") for i in range(3)]
        for g in gens:
            await g.__anext__()
        await eng.shutdown()

        async def drain(g):
            async for _ in g:
                pass
        results = await asyncio.wait_for(asyncio.gather(*(drain(g) for g in gens), return_exceptions=True), 10)
        assert all(isinstance(r, EngineError) for r in results)
    asyncio.run(main())


def test_watchdog_logs_a_slow_step_with_its_batch(smol_loaded, caplog):
    eng = AsyncEngine.from_args(EngineArgs(num_kv_blocks=64, max_model_len=512, step_watchdog_s=0.2),
                                loaded=smol_loaded)
    runner = eng.core.runner
    prepare = runner._prepare

    def slow(sched):
        time.sleep(0.6)
        return prepare(sched)
    runner._prepare = slow

    async def main():
        outs = [o async for o in eng.generate("hi", SamplingParams(max_tokens=2), "slow-step")]
        await eng.shutdown()
        return outs
    with caplog.at_level(logging.WARNING, logger="engine.async_engine"):
        outs = asyncio.run(main())
    assert outs[-1].finished
    slow_logs = [r.getMessage() for r in caplog.records if "engine step running for" in r.getMessage()]
    assert slow_logs and "slow-step" in slow_logs[0]
    # Shutdown joins the watchdog: a daemon thread left holding the engine's tensors is
    # killed while freeing them when the interpreter exits, and the process aborts.
    assert not eng._watchdog_thread.is_alive()
