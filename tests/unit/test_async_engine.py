"""AsyncEngine: concurrent streams, cumulative outputs, abort on consumer exit, errors."""
from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineArgs
from engine.errors import ContextLengthError, EngineOverloadedError
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(smol_loaded):
    eng = AsyncEngine.from_args(EngineArgs(num_kv_blocks=64, max_model_len=512), loaded=smol_loaded)
    yield eng
    asyncio.run(eng.shutdown())


async def _collect(engine, prompt, params, rid):
    outs = [o async for o in engine.generate(prompt, params, rid)]
    return outs


def test_concurrent_streams_match_offline(engine, make_llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = ["Hello, my name is", "The sky is", "1, 2, 3,"]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, params, f"a{i}") for i, p in enumerate(prompts)))
    streams = asyncio.run(main())
    offline = make_llm(num_kv_blocks=64).generate(prompts, params)
    for outs, ref in zip(streams, offline):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        texts = [o.outputs[0].text for o in outs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, never shrinks
        assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
        assert outs[-1].outputs[0].finish_reason == "length"


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


def test_overload_rejects_when_queue_full(smol_loaded):
    eng = AsyncEngine.from_args(EngineArgs(num_kv_blocks=64, max_model_len=512, max_waiting_requests=0),
                                loaded=smol_loaded)

    async def main():
        with pytest.raises(EngineOverloadedError):
            async for _ in eng.generate("hi", SamplingParams(max_tokens=2), "x"):
                pass
        await eng.shutdown()
    asyncio.run(main())
