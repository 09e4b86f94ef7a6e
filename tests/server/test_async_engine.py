"""The asyncio engine: streaming, cancellation that aborts, backpressure, shutdown, and
failures delivered to the streams they concern only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from pagedkv.errors import EngineBusyError, EngineDeadError, RequestFailedError
from pagedkv.models import ModelRunner, generate_no_cache
from pagedkv.scheduler import EngineConfig, FinishReason, LLMEngine, SamplingParams
from pagedkv.server.async_engine import AsyncLLMEngine
from tests.fakes import FailingRunner
from tests.helpers import assert_drained

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def make(tiny_model) -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=4, num_blocks=64)))


class CharTokenizer:
    """Token ``t`` reads as the character ``chr(0x100 + t)``: text to compare, one character a token."""

    chat_template: str | None = None

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 0x100 for c in text]

    def detokenizer(self) -> CharTokenizer:
        return self

    def step(self, token_id: int) -> str:
        return chr(0x100 + token_id)


async def collect(engine: AsyncLLMEngine, prompt, params=GREEDY, **kw) -> list[int]:
    tokens = []
    async for out in engine.generate(prompt, params, **kw):
        tokens += out.new_token_ids
    return tokens


def test_concurrent_streams_equal_the_reference(tiny_model):
    async def main():
        engine = make(tiny_model)
        prompts = [[i + 1, i + 2, i + 3] for i in range(6)]
        results = await asyncio.gather(*(collect(engine, p) for p in prompts))
        await engine.shutdown()
        return engine, prompts, results

    engine, prompts, results = asyncio.run(main())
    assert results == [generate_no_cache(tiny_model, p, 8) for p in prompts]
    assert_drained(engine.engine)


def test_cancelling_a_consumer_aborts_its_request_and_frees_its_blocks(tiny_model):
    async def main():
        engine = make(tiny_model)
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

        async def stop_after(n):
            got = 0
            async for _ in engine.generate([1, 2, 3], long, request_id="quitter"):
                got += 1
                if got == n:
                    break  # closes the generator: the request is aborted

        task = asyncio.create_task(collect(engine, [9, 8, 7], long, request_id="cancelled"))
        await stop_after(3)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        survivor = await collect(engine, [4, 5, 6])
        assert not engine.engine.has_unfinished_requests() and engine.num_in_flight == 0
        await engine.shutdown()
        return engine, survivor

    engine, survivor = asyncio.run(main())
    assert survivor == generate_no_cache(tiny_model, [4, 5, 6], 8)
    assert_drained(engine.engine)


def test_a_full_queue_refuses_new_requests_and_drops_nothing(tiny_model):
    async def main():
        engine = AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=4, num_blocks=64,
                                                                                 max_num_seqs=1)), max_waiting=2)
        accepted = [asyncio.create_task(collect(engine, [1, 2], SamplingParams(temperature=0.0, max_tokens=30)))]
        while not engine.engine.scheduler.running:
            await asyncio.sleep(0.001)
        accepted += [asyncio.create_task(collect(engine, [i + 2, 2])) for i in range(2)]
        while len(engine.engine.scheduler.waiting) < 2:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineBusyError, match="2 requests are already waiting"):
            await collect(engine, [7, 7])
        results = await asyncio.gather(*accepted)
        await engine.shutdown()
        return engine, results

    engine, results = asyncio.run(main())
    want = [generate_no_cache(tiny_model, [1, 2], 30)]
    want += [generate_no_cache(tiny_model, [i + 2, 2], 8) for i in range(2)]
    assert results == want
    assert_drained(engine.engine)


def test_a_failed_step_reaches_only_its_streams_and_serving_goes_on(tiny_model):
    async def main():
        runner = FailingRunner(ModelRunner(tiny_model), fail_steps={2}, nan_request="nan")
        engine = AsyncLLMEngine(LLMEngine(runner, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=2)))
        outcomes = await asyncio.gather(
            collect(engine, [1, 2, 3], request_id="a"), collect(engine, [4, 5, 6], request_id="b"),
            collect(engine, [7, 8, 9], request_id="c"), collect(engine, [3, 3, 3], request_id="nan"),
            return_exceptions=True,
        )
        after = await collect(engine, [4, 5, 6])
        await engine.shutdown()
        return engine, outcomes, after

    engine, (a, b, c, nan), after = asyncio.run(main())
    assert isinstance(a, RequestFailedError) and isinstance(b, RequestFailedError), "step 2 held a and b"
    assert "injected failure" in str(a)
    assert c == generate_no_cache(tiny_model, [7, 8, 9], 8)
    assert isinstance(nan, RequestFailedError) and "non-finite logits" in str(nan)
    assert after == generate_no_cache(tiny_model, [4, 5, 6], 8)
    assert_drained(engine.engine)


def test_shutdown_ends_every_stream_and_refuses_new_requests(tiny_model):
    async def main():
        engine = make(tiny_model)
        task = asyncio.create_task(collect(engine, [1, 2], SamplingParams(max_tokens=100, ignore_eos=True)))
        while not engine.engine.has_unfinished_requests():
            if task.done():
                task.result()  # it failed at once: show why instead of waiting forever
            await asyncio.sleep(0.001)
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await task
        with pytest.raises(EngineDeadError):
            await collect(engine, [1])
        return engine

    engine = asyncio.run(main())
    assert_drained(engine.engine)
    assert not engine.is_running


def test_a_stalled_consumer_holds_one_merged_output_and_reads_the_same_result(tiny_model):
    n = 60
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    async def main():
        engine = AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=4, num_blocks=64),
                                          tokenizer=CharTokenizer()))
        reference = [out async for out in engine.generate([1, 2, 3], params)]
        stream = engine.generate([1, 2, 3], params, request_id="slow")
        first = await anext(stream)
        buffer = engine._streams["slow"]
        while "slow" in engine._streams:  # the request runs to its end; its consumer reads nothing
            await asyncio.sleep(0.001)
        held = buffer.held()
        rest = [out async for out in stream]
        await engine.shutdown()
        return engine, reference, first, held, rest

    engine, reference, first, held, rest = asyncio.run(main())
    assert len(held) == 1, "everything generated while the consumer stalled is one merged output"
    assert sum(len(o.new_token_ids) + len(o.output_token_ids) for o in held) <= 2 * n
    assert sum(len(o.new_text) + len(o.text) for o in held) <= 2 * n
    stalled, whole = [first, *rest], reference[-1]
    assert len(stalled) == 2 and stalled[-1].finished
    assert [t for o in stalled for t in o.new_token_ids] == whole.output_token_ids
    assert whole.output_token_ids == [t for o in reference for t in o.new_token_ids]
    assert len(whole.output_token_ids) == n
    assert "".join(o.new_text for o in stalled) == whole.text == "".join(o.new_text for o in reference)
    assert (stalled[-1].output_token_ids, stalled[-1].text, stalled[-1].finish_reason) == (
        whole.output_token_ids, whole.text, whole.finish_reason)
    assert_drained(engine.engine)


LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


def slowed(engine: AsyncLLMEngine, monkeypatch, seconds: float = 0.005) -> AsyncLLMEngine:
    """``engine`` with every step lasting at least ``seconds``: a long request stays in flight."""
    step = engine.engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(engine.engine, "step", slow_step)
    return engine


def test_a_dying_loop_ends_every_open_stream_with_engine_dead_error(tiny_model, monkeypatch):
    async def main():
        engine = make(tiny_model)
        step, calls = engine.engine.step, 0

        def buggy_step():
            nonlocal calls
            calls += 1
            if calls == 4:
                raise ZeroDivisionError("a bug in the loop")
            return step()

        monkeypatch.setattr(engine.engine, "step", buggy_step)
        outcomes = await asyncio.gather(collect(engine, [1, 2], LONG), collect(engine, [3, 4], LONG),
                                        return_exceptions=True)
        with pytest.raises(EngineDeadError):
            await collect(engine, [1])
        await engine.shutdown()  # after the loop died: nothing left to do, no error
        return engine, outcomes

    engine, outcomes = asyncio.run(main())
    assert all(isinstance(o, EngineDeadError) for o in outcomes), outcomes
    assert all(isinstance(o.__cause__, ZeroDivisionError) for o in outcomes)
    assert not engine.is_running
    assert_drained(engine.engine)


def test_abort_ends_the_stream_with_an_abort_output_and_spares_the_others(tiny_model):
    async def main():
        engine = make(tiny_model)
        other = asyncio.create_task(collect(engine, [4, 5, 6]))
        outs = []
        async for out in engine.generate([1, 2, 3], LONG, request_id="x"):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("x")
        engine.abort("x")  # finished: ignored
        engine.abort("unknown")
        survivor = await other
        await engine.shutdown()
        return engine, outs, survivor

    engine, outs, survivor = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ABORT
    assert 2 <= len(outs[-1].output_token_ids) < 200
    assert survivor == generate_no_cache(tiny_model, [4, 5, 6], 8)
    assert_drained(engine.engine)


def test_shutdown_before_first_use_stops_the_engine_quietly(tiny_model):
    async def main():
        engine = make(tiny_model)
        await engine.shutdown()
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await collect(engine, [1])
        return engine

    engine = asyncio.run(main())
    assert not engine.is_running
    assert_drained(engine.engine)


def test_a_request_id_is_free_again_as_soon_as_its_stream_closed(tiny_model):
    async def main():
        engine = make(tiny_model)
        stream = engine.generate([1, 2, 3], LONG, request_id="x")
        await anext(stream)
        await stream.aclose()  # aborted, but the abort waits for the next step
        again = await collect(engine, [4, 5, 6], request_id="x")
        finished = await collect(engine, [7, 8], request_id="x")  # and after a stream that ran to its end
        await engine.shutdown()
        return engine, again, finished

    engine, again, finished = asyncio.run(main())
    assert again == generate_no_cache(tiny_model, [4, 5, 6], 8)
    assert finished == generate_no_cache(tiny_model, [7, 8], 8)
    assert_drained(engine.engine)


def test_the_engine_serves_successive_event_loops_but_one_at_a_time(tiny_model):
    engine = make(tiny_model)

    async def leave_a_request_running():
        stream = engine.generate([1, 2, 3], LONG, request_id="left")
        await anext(stream)
        return stream  # asyncio.run cancels the engine's loop with the request in flight

    async def elsewhere():
        return await asyncio.to_thread(asyncio.run, collect(engine, [1, 2]))

    async def main():
        task = asyncio.create_task(collect(engine, [9, 9], LONG))
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="another event loop"):
            await elsewhere()
        task.cancel()

    first = asyncio.run(collect(engine, [1, 2, 3]))
    asyncio.run(leave_a_request_running())
    second = asyncio.run(collect(engine, [1, 2, 3], request_id="left"))
    asyncio.run(main())
    asyncio.run(engine.shutdown())
    assert first == second == generate_no_cache(tiny_model, [1, 2, 3], 8)
    assert_drained(engine.engine)


def test_graceful_shutdown_lets_requests_finish_within_its_timeout(tiny_model):
    async def main():
        engine = make(tiny_model)
        task = asyncio.create_task(collect(engine, [1, 2, 3]))
        while not engine.engine.has_unfinished_requests():
            await asyncio.sleep(0.001)
        closing = asyncio.create_task(engine.shutdown(timeout=30))
        await asyncio.sleep(0)
        with pytest.raises(EngineDeadError, match="shutting down"):
            await collect(engine, [1])
        await closing
        return engine, await task

    engine, tokens = asyncio.run(main())
    assert tokens == generate_no_cache(tiny_model, [1, 2, 3], 8)
    assert_drained(engine.engine)


def test_graceful_shutdown_aborts_what_outlasts_its_timeout(tiny_model, monkeypatch):
    async def main():
        engine = slowed(make(tiny_model), monkeypatch, seconds=0.01)
        task = asyncio.create_task(collect(engine, [1, 2, 3], LONG))
        while not engine.engine.has_unfinished_requests():
            await asyncio.sleep(0.001)
        started = time.monotonic()
        await engine.shutdown(timeout=0.1)
        took = time.monotonic() - started
        with pytest.raises(EngineDeadError):
            await task
        return engine, took

    engine, took = asyncio.run(main())
    assert 0.1 <= took < 1.5  # the 200 slowed steps would take 2 s at least
    assert_drained(engine.engine)
