"""Concurrent searches sent to Milvus together (serving/search_batching.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from serving.search_batching import SearchBatcher

SPEC = object()


class Recorder:
    """A search function that answers each vector with its own first component, and records
    every call (collection, number of vectors, limit, filter)."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.calls: list[tuple[str, int, int, str]] = []
        self.gate = gate
        self.fail = fail

    def __call__(
        self, collection: str, vectors: np.ndarray, limit: int, spec: Any, filter_expr: str
    ) -> list[list[dict[str, Any]]]:
        assert spec is SPEC
        self.calls.append((collection, len(vectors), limit, filter_expr))
        if self.gate is not None:
            assert self.gate.wait(5), "the test never opened the gate"
        if self.fail:
            raise ConnectionError("Milvus went away")
        return [[{"image_id": str(float(v[0])), "score": 1.0}] * limit for v in vectors]


def _vector(value: float) -> np.ndarray:
    return np.array([value, 0.0, 0.0], np.float32)


def test_concurrent_searches_of_one_kind_go_in_one_call_and_each_gets_its_own_hits() -> None:
    recorder, sizes = Recorder(), []

    async def main() -> list:
        batcher = SearchBatcher(recorder, on_call=sizes.append)
        return await asyncio.gather(
            *(batcher.search("c", _vector(i), 2, SPEC, "") for i in range(5))
        )

    answers = asyncio.run(main())
    assert recorder.calls == [("c", 5, 2, "")]
    assert sizes == [5]
    assert [hits[0]["image_id"] for hits in answers] == ["0.0", "1.0", "2.0", "3.0", "4.0"]
    assert all(len(hits) == 2 for hits in answers)


def test_searches_that_differ_in_collection_limit_or_filter_go_separately() -> None:
    recorder = Recorder()

    async def main() -> None:
        batcher = SearchBatcher(recorder)
        await asyncio.gather(
            batcher.search("c", _vector(1), 2, SPEC, ""),
            batcher.search("c", _vector(2), 2, SPEC, 'category == "tea"'),
            batcher.search("c", _vector(3), 4, SPEC, ""),
            batcher.search("d", _vector(4), 2, SPEC, ""),
            batcher.search("c", _vector(5), 2, SPEC, ""),
        )

    asyncio.run(main())
    assert sorted(recorder.calls) == sorted(
        [("c", 2, 2, ""), ("c", 1, 2, 'category == "tea"'), ("c", 1, 4, ""), ("d", 1, 2, "")]
    )


def test_a_lone_search_is_sent_at_once() -> None:
    recorder = Recorder()

    async def main() -> list:
        batcher = SearchBatcher(recorder)
        return await asyncio.wait_for(batcher.search("c", _vector(7), 1, SPEC), 5)

    assert asyncio.run(main())[0]["image_id"] == "7.0"
    assert recorder.calls == [("c", 1, 1, "")]


async def _first_call_held(recorder: Recorder) -> tuple[SearchBatcher, asyncio.Future]:
    """A batcher allowing one call at a time, and a first search whose call is running, held
    at the recorder's gate."""
    batcher = SearchBatcher(recorder, max_in_flight=1)
    first = asyncio.ensure_future(batcher.search("c", _vector(0), 1, SPEC))
    while not recorder.calls:
        await asyncio.sleep(0.001)
    return batcher, first


def test_searches_arriving_while_calls_run_queue_and_go_together() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def main() -> list:
        batcher, first = await _first_call_held(recorder)
        later = [asyncio.ensure_future(batcher.search("c", _vector(i), 1, SPEC)) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        assert len(recorder.calls) == 1  # the others wait for the call in flight
        gate.set()
        return await asyncio.gather(first, *later)

    answers = asyncio.run(main())
    assert recorder.calls == [("c", 1, 1, ""), ("c", 3, 1, "")]
    assert [hits[0]["image_id"] for hits in answers] == ["0.0", "1.0", "2.0", "3.0"]


def test_max_batch_splits_a_crowd_into_calls() -> None:
    recorder = Recorder()

    async def main() -> None:
        batcher = SearchBatcher(recorder, max_batch=4, max_in_flight=2)
        await asyncio.gather(*(batcher.search("c", _vector(i), 1, SPEC) for i in range(10)))

    asyncio.run(main())
    assert sorted(n for _, n, _, _ in recorder.calls) == [2, 4, 4]


def test_a_crowd_larger_than_max_batch_goes_in_parallel_calls() -> None:
    """Sixteen searches at once with max_batch 4 are four calls running together, not one
    call at a time (the ones beyond the first batch used to wait for it)."""
    gate = threading.Event()
    recorder = Recorder(gate)

    async def main() -> None:
        batcher = SearchBatcher(recorder, max_batch=4, max_in_flight=4)
        searches = [
            asyncio.ensure_future(batcher.search("c", _vector(i), 1, SPEC)) for i in range(16)
        ]
        for _ in range(500):
            if len(recorder.calls) == 4:
                break
            await asyncio.sleep(0.01)
        assert len(recorder.calls) == 4  # all four running before any returns
        gate.set()
        await asyncio.gather(*searches)

    asyncio.run(main())
    assert [n for _, n, _, _ in recorder.calls] == [4, 4, 4, 4]


def test_drain_waits_for_calls_whose_callers_gave_up() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def main() -> None:
        batcher, first = await _first_call_held(recorder)
        first.cancel()  # the caller goes; its call still runs against the collection
        draining = asyncio.ensure_future(batcher.drain())
        await asyncio.sleep(0.05)
        assert not draining.done()
        gate.set()
        await asyncio.wait_for(draining, 5)

    asyncio.run(main())


def test_a_failed_call_fails_its_searches_and_the_next_ones_still_run() -> None:
    failing = Recorder(fail=True)

    async def main() -> list:
        batcher = SearchBatcher(failing)
        failed = await asyncio.gather(
            *(batcher.search("c", _vector(i), 1, SPEC) for i in range(3)),
            return_exceptions=True,
        )
        failing.fail = False
        return [failed, await batcher.search("c", _vector(9), 1, SPEC)]

    failed, recovered = asyncio.run(main())
    assert all(isinstance(err, ConnectionError) for err in failed)
    assert recovered[0]["image_id"] == "9.0"
    assert [n for _, n, _, _ in failing.calls] == [3, 1]


def test_a_search_whose_caller_gave_up_is_left_out() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def main() -> list:
        batcher, first = await _first_call_held(recorder)
        abandoned = asyncio.ensure_future(batcher.search("c", _vector(1), 1, SPEC))
        kept = asyncio.ensure_future(batcher.search("c", _vector(2), 1, SPEC))
        await asyncio.sleep(0)
        abandoned.cancel()
        gate.set()
        return await asyncio.gather(first, kept)

    answers = asyncio.run(main())
    assert recorder.calls == [("c", 1, 1, ""), ("c", 1, 1, "")]
    assert [hits[0]["image_id"] for hits in answers] == ["0.0", "2.0"]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SearchBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError):
        SearchBatcher(Recorder(), max_in_flight=0)


def test_a_failing_metrics_callback_does_not_fail_the_search(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def on_call(size: int) -> None:
        raise RuntimeError("metrics down")

    async def main() -> list:
        return await SearchBatcher(Recorder(), on_call=on_call).search("c", _vector(7), 1, SPEC, "")

    assert asyncio.run(main())[0]["image_id"] == "7.0"
    assert "metrics down" in caplog.text
