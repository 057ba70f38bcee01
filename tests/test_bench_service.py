"""The service benchmark's arithmetic (its runs are measurements, not tests)."""

from __future__ import annotations

import math
import os
import threading
import time

import pytest

from bench.bench_service import clock_text, ratios_by_round, thread_clock


def test_ratios_by_round_pair_each_round_and_skip_rounds_without_latencies() -> None:
    service = {"p50_by_round": [16.0, 17.0, math.nan, 15.0]}
    bare = {"p50_by_round": [14.5, 14.0, 14.2, math.nan]}
    assert ratios_by_round(service, bare) == pytest.approx([16.0 / 14.5, 17.0 / 14.0])


def test_ratios_by_round_need_as_many_rounds_on_both_sides() -> None:
    with pytest.raises(ValueError):
        ratios_by_round({"p50_by_round": [16.0]}, {"p50_by_round": [14.0, 15.0]})


def test_thread_clock_counts_this_threads_cpu_and_zero_for_a_thread_that_is_gone() -> None:
    me = (os.getpid(), threading.get_native_id())
    before = thread_clock(*me)
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:  # 50 ms of CPU on this thread
        pass
    ran = thread_clock(*me)[0] - before[0]
    if before == (0.0, 0.0):
        pytest.skip("this kernel has no schedstat")
    assert 0.04 <= ran < 1.0
    assert thread_clock(os.getpid(), 2**22 + 1) == (0.0, 0.0)


def test_clock_text_gives_run_and_wait_per_group() -> None:
    row = {"threads_ms": {"event loop": [1.234, 0.5], "Milvus Lite": [4.0, 2.25]}}
    assert clock_text(row) == (
        "CPU ms per request: event loop 1.23 ran / 0.50 waited, Milvus Lite 4.00 ran / 2.25 waited"
    )
    assert clock_text({}) == ""
