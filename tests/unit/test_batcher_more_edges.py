"""Batcher behaviour a mutation-testing pass of ``infra/gateway/batcher.py`` found unchecked
(2026-11-29): failures delivered when several versions batch on the loop, a lone request above
the queue limit, a stuck batch with a slot to spare, where calls run for a given measured cost,
rows left when a loop batch turns slow, cancelled requests, a shut-down pool, malformed model
answers, and a version on the loop run once per loop iteration, then leaving the loop idle.

A call's cost is made exact by a fake CPU clock in place of the batcher's ``time``: a thread's
CPU time moves only when a model spends some, so no check here depends on the machine's speed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import infra.gateway.batcher as batcher_module
from infra.gateway.batcher import Batcher, BatchFailedError, BatchPolicy

ON_LOOP = BatchPolicy(max_batch_size=8, inline_below_us=1000.0)


def rows(n: int, start: float = 0.0) -> np.ndarray:
    return np.arange(start, start + n * 3, dtype=np.float32).reshape(n, 3)


def logits(x: np.ndarray) -> np.ndarray:
    return np.stack([x.sum(axis=1), x[:, 0]], axis=1)


class CpuClock:
    """Stands in for the ``time`` module inside the batcher: the wall clock is real, a thread's
    CPU time is ``cpu`` (seconds), moved only by the models below."""

    def __init__(self) -> None:
        self.cpu = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter()

    def thread_time(self) -> float:
        return self.cpu


class Model:
    """Logits = [sum(row), row[0]], each call spending ``cost_s`` of (fake) CPU; records
    whether each call ran on the event loop's thread and its rows."""

    def __init__(self, clock: CpuClock, cost_s: float = 0.0001) -> None:
        self.clock = clock
        self.cost_s = cost_s
        self.loop_thread: int | None = None
        self.calls: list[tuple[bool, int]] = []  # (on the loop's thread, rows)
        self.fail = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append((threading.get_ident() == self.loop_thread, x.shape[0]))
        self.clock.cpu += self.cost_s
        if self.fail:
            raise RuntimeError("boom")
        return logits(x)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as p:
        yield p


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> CpuClock:
    fake = CpuClock()
    monkeypatch.setattr(batcher_module, "time", fake)
    return fake


async def on_the_loop(model: Model, *batchers: Batcher) -> None:
    """First calls run in a thread (not timed yet); after one, these versions run on the loop."""
    model.loop_thread = threading.get_ident()
    for b in batchers:
        await b.submit(rows(1))
        assert b.on_loop()


def test_a_failing_version_fails_its_own_requests_when_several_batch_on_the_loop(
    pool: ThreadPoolExecutor, clock: CpuClock
) -> None:
    good, bad = Model(clock), Model(clock)

    async def scenario() -> list[asyncio.Future[np.ndarray]]:
        champion = Batcher("1", good, ON_LOOP, pool)
        canary = Batcher("2", bad, ON_LOOP, pool)
        await on_the_loop(good, champion)
        await on_the_loop(bad, canary)
        bad.fail = True
        asked = [
            champion.submit(rows(1, 0)),
            canary.submit(rows(1, 10)),
            champion.submit(rows(2, 20)),
            canary.submit(rows(2, 30)),
        ]
        await asyncio.wait_for(asyncio.wait(asked), 5)
        return asked

    ok1, failed1, ok2, failed2 = asyncio.run(scenario())
    assert good.calls[1:] == [(True, 3)] and bad.calls[1:] == [(True, 3)]
    np.testing.assert_allclose(ok1.result(), logits(rows(1, 0)))
    np.testing.assert_allclose(ok2.result(), logits(rows(2, 20)))
    for failed in (failed1, failed2):
        err = failed.exception()  # raised to the request, not handed over as its answer
        assert isinstance(err, BatchFailedError)
        assert err.status == 500
        assert err.message == "version 2 failed to predict (batch of 2 requests)"


def test_a_request_above_the_queue_limit_is_served_when_nothing_is_queued(
    pool: ThreadPoolExecutor, clock: CpuClock
) -> None:
    model = Model(clock)
    policy = BatchPolicy(max_batch_size=4, max_queue_rows=4)

    async def scenario() -> np.ndarray:
        return await Batcher("v", model, policy, pool).submit(rows(10))

    out = asyncio.run(scenario())
    assert [n for _, n in model.calls] == [10]
    np.testing.assert_allclose(out, logits(rows(10)))


def test_a_stuck_batch_does_not_refuse_requests_while_another_slot_is_free(
    pool: ThreadPoolExecutor,
) -> None:
    gate = threading.Event()
    calls: list[int] = []

    def model(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape[0])
        if len(calls) == 1:
            gate.wait(10)  # the first call hangs until the end of the test
        return logits(x)

    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=0, max_inflight=2, timeout_s=0.05)

    async def scenario() -> tuple[object, int, np.ndarray, tuple[int, int]]:
        b = Batcher("v", model, policy, pool)
        hung = (await asyncio.gather(b.submit(rows(1)), return_exceptions=True))[0]
        stuck = b.stuck
        try:
            out = await asyncio.wait_for(b.submit(rows(2, 5)), 5)  # the second slot serves it
        finally:
            gate.set()
        for _ in range(500):
            if not b.stuck:
                break
            await asyncio.sleep(0.01)
        return hung, stuck, out, (b.stuck, b.inflight)

    hung, stuck, out, after = asyncio.run(scenario())
    assert isinstance(hung, BatchFailedError) and hung.status == 504
    assert stuck == 1
    np.testing.assert_allclose(out, logits(rows(2, 5)))
    assert calls == [1, 2]
    assert after == (0, 0)


@pytest.mark.parametrize(
    ("inline_below_us", "cost_s"),
    [(0.0, 0.0), (976.5625, 2**-10)],  # 2**-10 s is exactly 976.5625 us
    ids=["zero-means-threads-even-for-free-calls", "a-call-at-the-limit-is-not-below-it"],
)
def test_calls_not_below_inline_below_us_run_in_threads(
    pool: ThreadPoolExecutor, clock: CpuClock, inline_below_us: float, cost_s: float
) -> None:
    model = Model(clock, cost_s)

    async def scenario() -> bool:
        model.loop_thread = threading.get_ident()
        b = Batcher("v", model, BatchPolicy(inline_below_us=inline_below_us), pool)
        for i in range(3):
            await b.submit(rows(1, i))
        return b.on_loop()

    assert asyncio.run(scenario()) is False
    assert model.calls == [(False, 1)] * 3


def test_steady_calls_below_the_limit_stay_on_the_loop(
    pool: ThreadPoolExecutor, clock: CpuClock
) -> None:
    model = Model(clock, cost_s=0.0007)  # 700 us a call, the limit is 1000

    async def scenario() -> None:
        b = Batcher("v", model, ON_LOOP, pool)
        await on_the_loop(model, b)
        for i in range(20):
            await b.submit(rows(1, i))

    asyncio.run(scenario())
    assert model.calls == [(False, 1)] + [(True, 1)] * 20


def test_rows_left_after_a_loop_batch_turns_slow_run_in_a_thread(
    pool: ThreadPoolExecutor, clock: CpuClock
) -> None:
    model = Model(clock)
    policy = BatchPolicy(max_batch_size=2, inline_below_us=1000.0)

    async def scenario() -> list[np.ndarray]:
        b = Batcher("v", model, policy, pool)
        await on_the_loop(model, b)
        model.cost_s = 1.0  # the next call takes a second of CPU: the average crosses the limit
        asked = [b.submit(rows(1, 10 * i)) for i in range(3)]  # one loop iteration: 2 + 1 rows
        return list(await asyncio.gather(*asked))

    answers = asyncio.run(scenario())
    assert model.calls[1:] == [(True, 2), (False, 1)]
    for i, out in enumerate(answers):
        np.testing.assert_allclose(out, logits(rows(1, 10 * i)))


def collect_loop_errors() -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


def test_requests_cancelled_before_their_loop_batch_cost_nothing_and_raise_nothing(
    pool: ThreadPoolExecutor, clock: CpuClock
) -> None:
    model = Model(clock)

    async def scenario() -> tuple[list[dict[str, Any]], np.ndarray]:
        errors = collect_loop_errors()
        b = Batcher("v", model, ON_LOOP, pool)
        await on_the_loop(model, b)
        gone = [b.submit(rows(1)), b.submit(rows(2))]
        for fut in gone:
            fut.cancel()  # both clients left before the iteration's batch
        await asyncio.sleep(0)  # the runner's turn: nothing left to run
        out = await b.submit(rows(1, 7))
        return errors, out

    errors, out = asyncio.run(scenario())
    assert errors == []
    assert model.calls == [(False, 1), (True, 1)]
    np.testing.assert_allclose(out, logits(rows(1, 7)))


def test_requests_cancelled_behind_a_running_batch_cost_nothing_and_raise_nothing(
    pool: ThreadPoolExecutor,
) -> None:
    gate, entered = threading.Event(), threading.Event()
    calls: list[int] = []

    def model(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape[0])
        entered.set()
        gate.wait(10)
        return logits(x)

    async def scenario() -> tuple[list[dict[str, Any]], np.ndarray, tuple[int, int]]:
        errors = collect_loop_errors()
        b = Batcher("v", model, BatchPolicy(max_batch_size=8), pool)
        head = b.submit(rows(1))
        await asyncio.to_thread(entered.wait, 5)
        gone = [b.submit(rows(1)), b.submit(rows(2))]
        for fut in gone:
            fut.cancel()
        gate.set()
        await head
        out = await asyncio.wait_for(b.submit(rows(1, 7)), 5)
        return errors, out, (b.inflight, b.queued_rows)

    errors, out, after = asyncio.run(scenario())
    assert errors == []
    assert calls == [1, 1]
    np.testing.assert_allclose(out, logits(rows(1, 7)))
    assert after == (0, 0)


def test_a_request_after_the_pool_shut_down_is_failed_not_raised() -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()

    async def scenario() -> tuple[list[object], int]:
        b = Batcher("v", logits, BatchPolicy(), pool)
        answered = await asyncio.gather(b.submit(rows(1)), return_exceptions=True)
        return list(answered), b.inflight

    (err,), inflight = asyncio.run(scenario())
    assert isinstance(err, BatchFailedError) and err.status == 500
    assert err.message == "version v failed to predict"
    assert inflight == 0


@pytest.mark.parametrize(
    "answer",
    [
        lambda x: np.zeros(x.shape[0], np.float32),
        lambda x: np.zeros((x.shape[0], 2, 1), np.float32),
        lambda x: None,
    ],
    ids=["one-value-per-row", "three-dimensional", "none"],
)
def test_a_malformed_model_answer_fails_the_request(
    pool: ThreadPoolExecutor, answer: Callable[[np.ndarray], Any]
) -> None:
    async def scenario() -> list[object]:
        b = Batcher("v", answer, BatchPolicy(), pool)
        return await asyncio.wait_for(asyncio.gather(b.submit(rows(2)), return_exceptions=True), 5)

    (err,) = asyncio.run(scenario())
    assert isinstance(err, BatchFailedError)
    assert err.status == 500 and err.message == "version v failed to predict"


def test_a_version_on_the_loop_runs_once_per_iteration_and_then_leaves_the_loop_idle(
    pool: ThreadPoolExecutor, clock: CpuClock
) -> None:
    model = Model(clock)

    async def scenario() -> int:
        b = Batcher("v", model, ON_LOOP, pool)
        await on_the_loop(model, b)
        runs = [0]
        run_on_loop = b._run_on_loop

        def counted() -> None:
            runs[0] += 1
            run_on_loop()

        b._run_on_loop = counted  # type: ignore[method-assign]
        await asyncio.gather(*(b.submit(rows(1, i)) for i in range(3)))  # one iteration
        for _ in range(10):  # ten more loop iterations with nothing queued
            await asyncio.sleep(0)
        return runs[0]

    assert asyncio.run(scenario()) == 1
    assert model.calls == [(False, 1), (True, 3)]


def test_a_request_without_rows_is_refused_at_once_not_left_waiting(
    pool: ThreadPoolExecutor,
) -> None:
    async def scenario() -> int:
        b = Batcher("v", logits, BatchPolicy(), pool)
        with pytest.raises(ValueError, match="at least one row"):
            b.submit(np.zeros((0, 3), np.float32))
        return b.queued_rows

    assert asyncio.run(scenario()) == 0
