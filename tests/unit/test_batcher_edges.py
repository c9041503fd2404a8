"""Batcher edges a mutation-testing pass found unchecked (2026-11-29): policy ranges and
defaults, the queue-delay timer with several slots, a stuck batch's recovery, row counts after a
purge, counters and the batch observer, list answers from a runtime, slots given back.
Timing checks have only lower bounds or wide upper ones: a stalled CI machine must not fail
them."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from infra.gateway.batcher import Batcher, BatchFailedError, BatchPolicy


def rows(n, start=0.0):
    return np.arange(start, start + n * 3, dtype=np.float32).reshape(n, 3)


class Model:
    def __init__(self):
        self.calls, self.starts = [], []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, x):
        self.calls.append(x.shape[0])
        self.starts.append(time.perf_counter())
        self.entered.set()
        self.gate.wait(10)
        return np.stack([x.sum(axis=1), x[:, 0]], axis=1)

    async def hold(self, batcher, x):
        """Submit ``x`` and return once its batch is inside the model, held there until
        ``gate`` is set."""
        self.gate.clear()
        future = batcher.submit(x)
        await asyncio.to_thread(self.entered.wait, 5)
        return future


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as p:
        yield p


def test_p1_batch_size_one_and_queue_rows_one_are_valid():
    assert BatchPolicy(max_batch_size=1).max_batch_size == 1
    assert BatchPolicy(max_queue_rows=1).max_queue_rows == 1


def test_p2_defaults():
    p = BatchPolicy()
    assert (
        p.max_batch_size,
        p.max_queue_delay_us,
        p.max_inflight,
        p.max_queue_rows,
        p.timeout_s,
        p.inline_below_us,
    ) == (64, 500, 1, 16_384, 30.0, 0.0)


def test_p3_queue_delay_timer_with_two_slots(pool):
    model = Model()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=40_000, max_inflight=3)

    async def scenario():
        b = Batcher("v", model, policy, pool)
        a = await model.hold(b, rows(1))
        t0 = time.perf_counter()
        f1 = b.submit(rows(1))  # waits up to 40 ms for company
        await asyncio.sleep(0.025)
        f2 = b.submit(rows(1))  # joins at 25 ms: must not go before 40 ms
        await asyncio.sleep(0.2)  # A still gated: the timer alone must send it
        calls = list(model.calls)
        started = model.starts[1] - t0 if len(model.starts) > 1 else None
        # a second round: the timer must work again
        t1 = time.perf_counter()
        f3 = b.submit(rows(1))
        await asyncio.sleep(0.2)
        calls2 = list(model.calls)
        started2 = model.starts[2] - t1 if len(model.starts) > 2 else None
        model.gate.set()
        await asyncio.gather(a, f1, f2, f3)
        return calls, started, calls2, started2

    calls, started, calls2, started2 = asyncio.run(scenario())
    assert calls == [1, 2]
    assert started is not None and started >= 0.035  # waited for the 40 ms delay
    assert calls2 == [1, 2, 1]
    assert started2 is not None and started2 >= 0.035


def test_p4_a_stuck_batch_fails_the_queue_then_recovers_fully(pool):
    model = Model()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=0, timeout_s=0.2)

    async def scenario():
        b = Batcher("v", model, policy, pool)
        hung = await model.hold(b, rows(2))
        queued = b.submit(rows(1))  # behind the hung batch
        t0 = time.perf_counter()
        res = await asyncio.gather(hung, queued, return_exceptions=True)
        waited = time.perf_counter() - t0
        model.gate.set()
        for _ in range(200):
            if not b.stuck and not b.inflight:
                break
            await asyncio.sleep(0.01)
        counters = (b.stuck, b.inflight)
        # healthy again: a request arriving while a batch runs is queued, not refused
        x = await model.hold(b, rows(1))
        y = b.submit(rows(1))
        model.gate.set()
        await asyncio.gather(x, y)
        return res, waited, counters

    (_, e2), waited, counters = asyncio.run(scenario())
    assert isinstance(e2, BatchFailedError) and e2.status == 504 and "stuck past" in e2.message
    assert waited < 10.0  # 0.2 s timeout; the model itself is held for good
    assert counters == (0, 0)


def test_p5_purge_recounts_rows_not_features(pool):
    model = Model()
    policy = BatchPolicy(max_batch_size=8, max_queue_rows=4)

    async def scenario():
        b = Batcher("v", model, policy, pool)
        head = await model.hold(b, rows(1))
        live = b.submit(rows(1))
        gone = b.submit(rows(3))
        gone.cancel()
        more = b.submit(rows(3))  # 1 live + 3 new = 4 rows: fits
        q = b.queued_rows
        model.gate.set()
        await asyncio.gather(head, live, more)
        return q

    assert asyncio.run(scenario()) == 4


def test_p6_fail_queued_zeroes_queued_rows(pool):
    model = Model()

    async def scenario():
        b = Batcher("v", model, BatchPolicy(max_batch_size=8), pool)
        head = await model.hold(b, rows(1))
        w = b.submit(rows(2))
        b.fail_queued("gone")
        q = b.queued_rows
        model.gate.set()
        await head
        await asyncio.gather(w, return_exceptions=True)
        return q

    assert asyncio.run(scenario()) == 0


def test_p7_p8_observer_and_counters(pool):
    model = Model()
    seen = []

    async def scenario():
        b = Batcher(
            "v",
            model,
            BatchPolicy(max_batch_size=8),
            pool,
            observe=lambda n, w: seen.append((n, w)),
        )
        head = await model.hold(b, rows(1))
        rest = [b.submit(rows(2)) for _ in range(2)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(head, *rest)
        return b.batches, b.rows_total

    assert asyncio.run(scenario()) == (2, 5)
    assert [n for n, _ in seen] == [1, 4]
    assert all(len(w) == k for (_, w), k in zip(seen, [1, 2], strict=True))
    assert all(0 <= t < 5 for _, w in seen for t in w)
    assert seen[1][1][0] >= 0.04  # the queued ones waited for the head batch


def test_p9_single_request_failure_message(pool):
    def boom(x):
        raise RuntimeError("boom")

    async def scenario():
        return await asyncio.gather(
            Batcher("v", boom, BatchPolicy(), pool).submit(rows(1)), return_exceptions=True
        )

    (err,) = asyncio.run(scenario())
    assert isinstance(err, BatchFailedError) and err.message == "version v failed to predict"


def test_p12_a_model_returning_lists_is_answered(pool):
    async def scenario():
        b = Batcher("v", lambda x: [[1.0, 2.0]] * x.shape[0], BatchPolicy(), pool)
        return await asyncio.wait_for(b.submit(rows(2)), 5)

    out = asyncio.run(scenario())
    assert np.asarray(out).shape == (2, 2)


def test_p13_slots_return_after_each_batch(pool):
    async def scenario():
        b = Batcher(
            "v",
            lambda x: np.zeros((x.shape[0], 2), np.float32),
            BatchPolicy(max_queue_delay_us=5_000_000),
            pool,
        )
        await b.submit(rows(1))
        t = time.perf_counter()
        await b.submit(rows(1))  # idle again: must go at once, not after the 5 s delay
        return b.inflight, time.perf_counter() - t

    inflight, took = asyncio.run(scenario())
    assert inflight == 0 and took < 2.5


def test_p14_timer_still_works_after_a_full_batch_cut_it_short(pool):
    model = Model()
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_us=40_000, max_inflight=4)

    async def scenario():
        b = Batcher("v", model, policy, pool)
        a = await model.hold(b, rows(1))
        f1 = b.submit(rows(1))  # timer armed
        f2 = b.submit(rows(3))  # full batch: dispatched now, timer cancelled
        t0 = time.perf_counter()
        f3 = b.submit(rows(1))  # must be sent by a new timer within ~40 ms
        await asyncio.sleep(0.2)
        calls = list(model.calls)
        model.gate.set()
        await asyncio.gather(a, f1, f2, f3)
        return calls, model.starts[2] - t0 if len(model.starts) > 2 else None

    calls, started = asyncio.run(scenario())
    assert calls == [1, 4, 1] and started is not None and started >= 0.035
