"""DynamicBatcher: concurrent calls coalesce into model batches, each caller gets its own results."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from saferl.serving.batcher import DynamicBatcher


def test_concurrent_requests_share_calls_and_keep_their_results():
    calls = []

    def fn(items):
        calls.append(list(items))
        time.sleep(0.02)  # a model call: later requests queue up meanwhile
        return [x * 10 for x in items]

    batcher = DynamicBatcher(fn, max_batch=8, max_wait_s=0.05)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: batcher([i, i + 100]), range(16)))
    batcher.close()
    assert results == [[i * 10, (i + 100) * 10] for i in range(16)]
    assert sum(map(len, calls)) == 32 and all(len(c) <= 8 for c in calls)
    assert len(calls) <= 8  # 16 requests of 2 items in batches of at most 8: at best 4 calls, never 16
    assert batcher.stats()["mean_batch"] > 2


def test_oversized_request_runs_alone_and_order_is_kept():
    calls = []
    batcher = DynamicBatcher(lambda items: calls.append(list(items)) or list(items), max_batch=3, max_wait_s=0.0)
    assert batcher(list(range(7))) == list(range(7))
    assert calls == [list(range(7))]
    assert batcher([]) == []
    batcher.close()


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on():
    def fn(items):
        if "bad" in items:
            raise RuntimeError("model exploded")
        return [len(x) for x in items]

    batcher = DynamicBatcher(fn, max_batch=4, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="model exploded"):
        batcher(["bad"])
    assert batcher(["abc"]) == [3]
    short = DynamicBatcher(lambda items: [], max_batch=4, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        short(["x"])
    batcher.close()
    short.close()


def test_waits_at_most_max_wait_for_company():
    batcher = DynamicBatcher(lambda items: list(items), max_batch=100, max_wait_s=0.2)
    start = time.monotonic()
    assert batcher([1]) == [1]
    assert 0.15 <= time.monotonic() - start < 2.0
    batcher.close()
    assert not batcher._thread.is_alive()  # close() stops the worker thread


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        DynamicBatcher(lambda items: items, max_batch=0)
