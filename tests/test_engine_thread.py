"""The model thread in-process, on a tiny random GPT-2: failures stay contained."""

from __future__ import annotations

import asyncio

from engine import Engine, Final, GenerationRequest, Sampling


def _request(n: int = 5) -> GenerationRequest:
    return GenerationRequest(prompt="The quick brown fox", max_tokens=n, sampling=Sampling(temperature=0))


async def _collect(stream) -> tuple[str, Final]:
    text = "".join([piece async for piece in stream])
    return text, stream.final


def test_a_failing_step_ends_its_requests_with_an_error_and_the_next_ones_run(tiny_gpt2_folder):
    async def main():
        engine = Engine(model=str(tiny_gpt2_folder), dtype="float32", max_batch=4, cache_dir=None)
        engine.start()
        await engine.wait_loaded()
        real_step = engine._decode_step
        calls = {"n": 0}

        def failing_once(active):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated failure")
            real_step(active)

        engine._decode_step = failing_once
        broken = await _collect(engine.submit(_request(20)))
        after = await asyncio.gather(*[_collect(engine.submit(_request())) for _ in range(3)])
        await engine.close()
        return broken, after

    (text, final), after = asyncio.run(main())
    assert final.done_reason == "error" and "simulated failure" in final.error
    assert all(f.done_reason in ("stop", "length") and f.error is None for _, f in after)


def test_every_stream_gets_exactly_one_final_even_when_cancelled_anywhere(tiny_gpt2_folder):
    async def main():
        engine = Engine(model=str(tiny_gpt2_folder), dtype="float32", max_batch=2, queue_size=64, cache_dir=None)
        engine.start()
        await engine.wait_loaded()
        streams = [engine.submit(_request(30)) for _ in range(12)]
        for i, s in enumerate(streams):
            if i % 3 == 0:
                s.cancel()  # some while queued, before the model saw them
        await asyncio.sleep(0)
        for s in streams[1::3]:
            s.cancel()  # others a little later, possibly mid-generation
        finals = []
        for s in streams:
            while not isinstance(item := await s.next(), Final):
                pass
            finals.append(item)
            assert s._items.empty(), "nothing may follow the final event"
        await engine.close()
        return finals, engine

    finals, engine = asyncio.run(main())
    assert all(f.done_reason == "cancelled" for f in finals[0::3])
    assert all(f.done_reason in ("stop", "length", "cancelled") for f in finals)
    assert engine.active_count == 0
