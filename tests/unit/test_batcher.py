"""The dynamic batcher: its pure dispatch rule, and real batches on a real thread pool."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from infra.gateway.batcher import (
    Batcher,
    BatchFailedError,
    BatchPolicy,
    OverloadedError,
    decide,
)

POLICY = BatchPolicy(max_batch_size=8, max_queue_delay_us=1000, max_inflight=1)


# -- the pure rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queued", "waited_us", "inflight", "expected"),
    [
        (0, 0.0, 0, None),  # nothing queued: wait for an arrival
        (3, 0.0, 1, None),  # every slot busy: wait for a completion
        (1, 0.0, 0, 0.0),  # idle server: go at once (no reason to wait for company)
        (8, 0.0, 0, 0.0),  # a full batch: go
        (20, 0.0, 0, 0.0),
    ],
    ids=["empty", "slots-busy", "idle-bypass", "full", "overfull"],
)
def test_decide_basic_cases(
    queued: int, waited_us: float, inflight: int, expected: float | None
) -> None:
    assert decide(POLICY, queued, waited_us, inflight) == expected


def test_decide_waits_out_the_queue_delay_while_another_batch_runs() -> None:
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=1000, max_inflight=2)
    assert decide(policy, 3, 200.0, 1) == pytest.approx(800.0)
    assert decide(policy, 3, 1000.0, 1) == 0.0
    assert decide(policy, 3, 5000.0, 1) == 0.0
    assert decide(policy, 8, 0.0, 1) == 0.0  # full: no waiting
    assert decide(policy, 3, 0.0, 2) is None  # both slots busy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_inflight": 0},
        {"max_queue_rows": 0},
        {"max_queue_delay_us": -1},
        {"timeout_s": 0},
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=">="):
        BatchPolicy(**kwargs)  # type: ignore[arg-type]


# -- real batches -------------------------------------------------------------------------------


class Model:
    """Logits = [sum(row), row[0]]; can block on a gate, fail, or return a wrong shape."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False
        self.wrong_shape = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(x.shape[0])
        self.entered.set()
        if not self.gate.wait(10):
            raise TimeoutError("gate never opened")
        if self.fail:
            raise RuntimeError("boom")
        out = np.stack([x.sum(axis=1), x[:, 0]], axis=1)
        return out[:-1] if self.wrong_shape else out


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as p:
        yield p


def rows(n: int, start: float) -> np.ndarray:
    return np.arange(start, start + n * 3, dtype=np.float32).reshape(n, 3)


def run(coro_fn: Callable[[], object]) -> object:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def test_requests_arriving_while_a_batch_runs_leave_together(pool: ThreadPoolExecutor) -> None:
    model = Model()

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher("v", model, POLICY, pool)
        model.gate.clear()
        first = batcher.submit(rows(1, 0))  # idle: dispatched alone at once
        await asyncio.to_thread(model.entered.wait, 5)
        rest = [batcher.submit(rows(1, 100 * i)) for i in range(1, 6)]  # queue behind it
        assert batcher.queued_rows == 5
        model.gate.set()
        return list(await asyncio.gather(first, *rest))

    answers = run(scenario)
    assert model.calls == [1, 5], "the five waiting requests must share one model call"
    assert isinstance(answers, list)
    for i, out in enumerate(answers):
        x = rows(1, 100 * i)
        np.testing.assert_allclose(out, [[x.sum(), x[0, 0]]])  # each got its own row back


def test_batches_never_exceed_the_size_limit_and_keep_row_order(pool: ThreadPoolExecutor) -> None:
    model = Model()

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher("v", model, POLICY, pool)
        model.gate.clear()
        head = batcher.submit(rows(1, 0))
        await asyncio.to_thread(model.entered.wait, 5)
        sizes = [3, 4, 2, 5, 1]  # 3+4 fit in 8; 2+5+1 in the next
        futures = [batcher.submit(rows(n, 1000 * i)) for i, n in enumerate(sizes)]
        model.gate.set()
        await head
        return list(await asyncio.gather(*futures))

    answers = run(scenario)
    assert model.calls[0] == 1
    assert model.calls[1:] == [7, 8]
    assert isinstance(answers, list)
    for i, (n, out) in enumerate(zip([3, 4, 2, 5, 1], answers, strict=True)):
        x = rows(n, 1000 * i)
        np.testing.assert_allclose(out[:, 0], x.sum(axis=1))


def test_a_request_larger_than_the_batch_limit_runs_alone(pool: ThreadPoolExecutor) -> None:
    model = Model()

    async def scenario() -> np.ndarray:
        return await Batcher("v", model, POLICY, pool).submit(rows(20, 0))

    out = run(scenario)
    assert model.calls == [20]
    assert isinstance(out, np.ndarray) and out.shape == (20, 2)


@pytest.mark.parametrize("failure", ["raises", "wrong-shape"])
def test_a_failed_batch_answers_every_member_with_an_error(
    pool: ThreadPoolExecutor, failure: str
) -> None:
    model = Model()

    async def scenario() -> list[object]:
        batcher = Batcher("v7", model, POLICY, pool)
        model.gate.clear()
        head = batcher.submit(rows(1, 0))
        await asyncio.to_thread(model.entered.wait, 5)
        model.fail = failure == "raises"
        model.wrong_shape = failure == "wrong-shape"
        members = [batcher.submit(rows(1, i)) for i in range(4)]
        model.gate.set()
        return list(await asyncio.gather(head, *members, return_exceptions=True))

    outcomes = run(scenario)
    assert isinstance(outcomes, list)
    errors = outcomes[1:]
    assert len(errors) == 4
    for err in errors:
        assert isinstance(err, BatchFailedError)
        assert err.status == 500
        assert "version v7 failed to predict (batch of 4 requests)" in err.message


def test_a_batch_that_hangs_fails_its_members_and_its_slot_returns_with_the_call(
    pool: ThreadPoolExecutor,
) -> None:
    model = Model()
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=0, timeout_s=0.2)

    async def scenario() -> tuple[object, float, np.ndarray]:
        batcher = Batcher("v", model, policy, pool)
        model.gate.clear()
        started = time.perf_counter()
        hung = batcher.submit(rows(2, 0))
        outcome = await asyncio.gather(hung, return_exceptions=True)
        waited = time.perf_counter() - started
        # Until the stuck call returns it keeps its slot (and its thread): no new work.
        with pytest.raises(OverloadedError, match=r"stuck past 0\.2 s"):
            batcher.submit(rows(1, 5))
        model.gate.set()  # the stuck call finishes later; its late answer is dropped
        for _ in range(200):
            if not batcher.stuck:
                break
            await asyncio.sleep(0.01)
        after = await batcher.submit(rows(1, 5))  # the slot came back with the call
        return outcome[0], waited, after

    err, waited, after = run(scenario)  # type: ignore[misc]
    assert isinstance(err, BatchFailedError)
    assert err.status == 504 and "timed out after 0.2 s" in err.message
    assert 0.15 < waited < 2.0
    assert after.shape == (1, 2)


def test_cancelled_requests_are_dropped_before_their_batch_runs(pool: ThreadPoolExecutor) -> None:
    model = Model()

    async def scenario() -> None:
        batcher = Batcher("v", model, POLICY, pool)
        model.gate.clear()
        head = batcher.submit(rows(1, 0))
        await asyncio.to_thread(model.entered.wait, 5)
        gone = batcher.submit(rows(3, 0))
        kept = batcher.submit(rows(1, 9))
        gone.cancel()  # the client went away while queued
        model.gate.set()
        await head
        assert (await kept).shape == (1, 2)

    run(scenario)
    assert model.calls == [1, 1], "the cancelled request's rows must not be computed"


def test_a_full_queue_refuses_with_overloaded(pool: ThreadPoolExecutor) -> None:
    model = Model()
    policy = BatchPolicy(max_batch_size=4, max_queue_rows=6)

    async def scenario() -> None:
        batcher = Batcher("v", model, policy, pool)
        model.gate.clear()
        head = batcher.submit(rows(1, 0))
        await asyncio.to_thread(model.entered.wait, 5)
        queued = [batcher.submit(rows(3, 0)), batcher.submit(rows(3, 0))]
        with pytest.raises(OverloadedError, match="6 rows queued"):
            batcher.submit(rows(1, 0))
        model.gate.set()
        await asyncio.gather(head, *queued)
        assert batcher.queued_rows == 0

    run(scenario)


def test_rows_of_cancelled_requests_do_not_fill_the_queue(pool: ThreadPoolExecutor) -> None:
    # Before: cancelled requests' rows counted until the running batch ended, and the version
    # answered 503 to live requests meanwhile.
    model = Model()
    policy = BatchPolicy(max_batch_size=4, max_queue_rows=6)

    async def scenario() -> None:
        batcher = Batcher("v", model, policy, pool)
        model.gate.clear()
        head = batcher.submit(rows(1, 0))
        await asyncio.to_thread(model.entered.wait, 5)
        gone = [batcher.submit(rows(3, 0)), batcher.submit(rows(3, 0))]
        for fut in gone:
            fut.cancel()
        kept = batcher.submit(rows(2, 0))  # refused before the fix: 6 rows queued
        assert batcher.queued_rows == 2
        more = batcher.submit(rows(3, 0))
        with pytest.raises(OverloadedError, match="5 rows queued"):  # live rows still count
            batcher.submit(rows(2, 0))
        model.gate.set()
        await head
        assert (await kept).shape == (2, 2) and (await more).shape == (3, 2)

    run(scenario)


def test_fail_queued_answers_what_is_left(pool: ThreadPoolExecutor) -> None:
    model = Model()

    async def scenario() -> object:
        batcher = Batcher("v", model, POLICY, pool)
        model.gate.clear()
        head = batcher.submit(rows(1, 0))
        await asyncio.to_thread(model.entered.wait, 5)
        waiting = batcher.submit(rows(1, 0))
        batcher.fail_queued("version v was unloaded")
        model.gate.set()
        await head
        return (await asyncio.gather(waiting, return_exceptions=True))[0]

    err = run(scenario)
    assert isinstance(err, BatchFailedError) and err.status == 503
    assert "unloaded" in err.message


def test_fast_versions_batch_on_the_loop_per_iteration_and_slow_ones_go_back_to_threads(
    pool: ThreadPoolExecutor,
) -> None:
    threads: list[tuple[str, int]] = []
    slow = [False]

    def model(x: np.ndarray) -> np.ndarray:
        threads.append((threading.current_thread().name, x.shape[0]))
        if slow[0]:  # 2 ms of CPU (the batcher times CPU, not the wall clock)
            end = time.thread_time() + 0.002
            while time.thread_time() < end:
                pass
        return np.stack([x.sum(axis=1), x[:, 0]], axis=1)

    policy = BatchPolicy(max_batch_size=8, inline_below_us=1000.0)
    main = threading.main_thread().name

    async def scenario() -> None:
        batcher = Batcher("v", model, policy, pool)
        await batcher.submit(rows(1, 0))  # first call: not timed yet, so a thread
        assert threads[-1][0] != main and batcher.on_loop()
        # Requests queued in one loop iteration leave together, on the loop, in row order,
        # cut at the batch limit.
        sizes = [1, 2, 3, 4]
        answers = await asyncio.gather(*(batcher.submit(rows(n, 10 * n)) for n in sizes))
        assert threads[1:] == [(main, 6), (main, 4)]
        for n, out in zip(sizes, answers, strict=True):
            np.testing.assert_allclose(out[:, 0], rows(n, 10 * n).sum(axis=1))
        slow[0] = True  # 2 ms of CPU per call: over the limit within a few calls
        for _ in range(10):
            await batcher.submit(rows(1, 0))
            if not batcher.on_loop():
                break
        assert not batcher.on_loop()
        # At twice the limit the average crosses it on the 7th call (0.9 ** 7 < 0.5).
        assert sum(1 for name, _ in threads if name == main) <= 2 + 7
        await batcher.submit(rows(1, 0))
        assert threads[-1][0] != main, "a slow version runs in threads again"
        slow[0] = False  # fast again: back on the loop once the average has come down
        for _ in range(60):
            await batcher.submit(rows(1, 0))
            if batcher.on_loop():
                break
        await batcher.submit(rows(1, 0))
        assert threads[-1][0] == main

    run(scenario)


def test_a_runtime_that_waits_off_the_cpu_never_runs_on_the_loop(
    pool: ThreadPoolExecutor,
) -> None:
    threads: list[str] = []

    def model(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return np.zeros((x.shape[0], 2), np.float32)

    async def scenario() -> None:
        batcher = Batcher("v", model, BatchPolicy(inline_below_us=1e9), pool, loop_ok=False)
        for _ in range(3):
            await batcher.submit(rows(1, 0))
        assert not batcher.on_loop()

    run(scenario)
    assert threading.main_thread().name not in threads and len(threads) == 3


def test_a_failing_call_on_the_loop_fails_its_members_and_the_next_batch_runs(
    pool: ThreadPoolExecutor,
) -> None:
    fail = [False]

    def model(x: np.ndarray) -> np.ndarray:
        if fail[0]:
            raise RuntimeError("boom")
        return np.zeros((x.shape[0], 2), np.float32)

    async def scenario() -> list[object]:
        batcher = Batcher("v3", model, BatchPolicy(inline_below_us=1e9), pool)
        await batcher.submit(rows(1, 0))  # timed in a thread
        fail[0] = True
        failed = await asyncio.gather(
            batcher.submit(rows(1, 0)), batcher.submit(rows(2, 0)), return_exceptions=True
        )
        fail[0] = False
        return [*failed, await batcher.submit(rows(1, 0))]

    outcomes = run(scenario)
    assert isinstance(outcomes, list)
    *errors, ok = outcomes
    for err in errors:
        assert isinstance(err, BatchFailedError)
        assert "version v3 failed to predict (batch of 2 requests)" in err.message
    assert isinstance(ok, np.ndarray) and ok.shape == (1, 2)


def test_a_stalled_version_never_takes_more_threads_than_its_slots(
    pool: ThreadPoolExecutor,
) -> None:
    # Before: the watchdog freed the slot while the call still ran, so each timeout_s sent
    # another batch into the shared pool, until a healthy version found no thread and 504'd.
    stalled, running, peak = threading.Event(), [0], [0]

    def stuck(x: np.ndarray) -> np.ndarray:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        stalled.wait(10)
        running[0] -= 1
        return np.zeros((x.shape[0], 2), np.float32)

    policy = BatchPolicy(max_batch_size=8, max_queue_delay_us=0, timeout_s=0.1)

    async def scenario() -> np.ndarray:
        a = Batcher("a", stuck, policy, pool)
        b = Batcher("b", lambda x: np.ones((x.shape[0], 2), np.float32), policy, pool)
        for _ in range(4):
            with contextlib.suppress(BatchFailedError, OverloadedError):
                await a.submit(rows(1, 0))
            await asyncio.sleep(0.15)
        try:
            return await b.submit(rows(1, 0))
        finally:
            stalled.set()

    out = run(scenario)
    assert peak[0] == 1
    assert np.asarray(out).shape == (1, 2)


def test_calls_that_turn_slow_and_fail_send_the_version_back_to_threads(
    pool: ThreadPoolExecutor,
) -> None:
    # Before: only calls that returned were timed, so a model failing slowly stayed on the
    # event loop for good and blocked the server on every call.
    slow = [False]

    def model(x: np.ndarray) -> np.ndarray:
        if slow[0]:
            t = time.thread_time()
            while time.thread_time() - t < 0.005:  # 5 ms of CPU, then fail
                pass
            raise RuntimeError("boom")
        return np.zeros((x.shape[0], 2), np.float32)

    async def scenario() -> bool:
        batcher = Batcher("v", model, BatchPolicy(inline_below_us=1000), pool)
        await batcher.submit(rows(1, 0))  # fast: timed in a thread, then on the loop
        assert batcher.on_loop()
        slow[0] = True
        for _ in range(40):
            with contextlib.suppress(BatchFailedError):
                await batcher.submit(rows(1, 0))
            if not batcher.on_loop():
                break
        return batcher.on_loop()

    assert run(scenario) is False


def test_versions_batched_on_the_loop_answer_their_requests_in_arrival_order(
    pool: ThreadPoolExecutor,
) -> None:
    # Champion, canary, champion, canary queued in one loop iteration: the requests resume in
    # that order. With a callback per version, every champion request resumed (and wrote its
    # response) before any canary one, which made an identical canary read slower under load.
    calls: list[str] = []

    def model(name: str) -> Callable[[np.ndarray], np.ndarray]:
        def predict(x: np.ndarray) -> np.ndarray:
            calls.append(name)
            return np.zeros((x.shape[0], 2), np.float32)

        return predict

    async def scenario() -> list[str]:
        champion = Batcher("1", model("1"), BatchPolicy(inline_below_us=1e6), pool)
        canary = Batcher("2", model("2"), BatchPolicy(inline_below_us=1e6), pool)
        for b in (champion, canary):
            await b.submit(rows(1, 0))  # timed in a thread; on the loop from now on
            assert b.on_loop()
        calls.clear()
        resumed: list[str] = []

        async def request(b: Batcher, label: str) -> None:
            await b.submit(rows(1, 0))
            resumed.append(label)

        order = [(champion, "a"), (canary, "b"), (champion, "c"), (canary, "d")]
        await asyncio.gather(*(request(b, label) for b, label in order))
        assert calls == ["1", "2"], "one batch per version, in one loop iteration"
        return resumed

    assert run(scenario) == ["a", "b", "c", "d"]


def test_a_version_whose_loop_batch_fails_unexpectedly_strands_no_other_versions_request(
    pool: ThreadPoolExecutor,
) -> None:
    async def scenario() -> tuple[bool, list[object]]:
        loop = asyncio.get_running_loop()
        errors: list[object] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
        zeros = lambda x: np.zeros((x.shape[0], 2), np.float32)  # noqa: E731
        first = Batcher("1", zeros, BatchPolicy(inline_below_us=1e6), pool)
        second = Batcher("2", zeros, BatchPolicy(inline_below_us=1e6), pool)
        for b in (first, second):
            await b.submit(rows(1, 0))

        def broken() -> None:  # a bug in the batcher itself, not a model error
            first._loop_batch_due = False
            raise RuntimeError("bug")

        first._run_on_loop = broken  # type: ignore[method-assign]
        stranded = first.submit(rows(1, 0))
        answered = await asyncio.wait_for(second.submit(rows(1, 0)), 5)
        stranded.cancel()
        return answered.shape == (1, 2), errors

    ok, errors = run(scenario)  # type: ignore[misc]
    assert ok
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
