"""The registry-held lock (``model_registry.write_lock``) on a real MLflow store (sqlite).

Each "machine" is a :class:`Registry` of its own on the same store: its own client, no file
lock and no memory shared with the others, as processes on different machines would be. The
same lock against an ``mlflow server`` over HTTP is in
``tests/integration/test_registry_mlflow_server.py``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from ballast.errors import RegistryError
from model_registry import Registry
from model_registry.write_lock import (
    TAG_HOLDER,
    TAG_LOCK_FOR,
    LockLostError,
    RegistryLock,
    lock_model_name,
)


class Busy(Exception):
    pass


@pytest.fixture
def machines(tmp_path: Path) -> list[Registry]:
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    return [Registry(uri, tmp_path / "artifacts") for _ in range(3)]


def tickets(reg: Registry, lock: str) -> dict[str, dict[str, str]]:
    client = MlflowClient(reg.tracking_uri, reg.tracking_uri)
    found = client.search_model_versions(f"name = '{lock_model_name(lock)}'")
    return {str(mv.version): dict(mv.tags) for mv in found}


def most_inside_at_once(
    guards: Sequence[Callable[[], contextlib.AbstractContextManager[None]]],
    rounds: int,
    hold_s: float,
) -> tuple[int, list[int]]:
    """Each of ``guards`` (a "machine") in a thread of its own enters its guard ``rounds``
    times and stays ``hold_s`` inside: the most that were inside at once, and who entered."""
    inside: list[int] = []
    most = [0]
    entries: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            for _ in range(rounds):
                with guards[i]():
                    with lock:
                        inside.append(i)
                        most[0] = max(most[0], len(inside))
                        entries.append(i)
                    time.sleep(hold_s)  # others are waiting now, if the guard makes them
                    with lock:
                        inside.remove(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(guards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    return most[0], sorted(entries)


def test_one_holder_at_a_time_across_machines(machines: list[Registry]) -> None:
    guards = [
        functools.partial(reg.exclusive, "m", holder=f"w{i}", timeout_s=60, busy=Busy())
        for i, reg in enumerate(machines)
    ]
    most, entries = most_inside_at_once(guards, rounds=4, hold_s=0.02)
    assert most == 1, "two holders at once"
    assert entries == [0] * 4 + [1] * 4 + [2] * 4
    assert tickets(machines[0], "m") == {}  # every ticket released


def test_without_the_lock_the_same_work_overlaps() -> None:
    # The check above can fail: the same work with no lock has two inside at once.
    most, entries = most_inside_at_once([contextlib.nullcontext] * 3, rounds=4, hold_s=0.02)
    assert most > 1 and len(entries) == 12


@contextlib.contextmanager
def held_elsewhere(reg: Registry, holder: str) -> Iterator[None]:
    """``reg`` holds lock "m" in a thread of its own for the block."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with reg.exclusive("m", holder=holder, timeout_s=10, busy=Busy()):
            holding.set()
            done.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(30)
        yield
    finally:
        done.set()
        t.join(30)


def test_a_waiter_gives_up_at_its_timeout_and_removes_its_ticket(
    machines: list[Registry],
) -> None:
    a, b = machines[0], machines[1]
    with held_elsewhere(a, "a"):
        started = time.monotonic()
        with (
            pytest.raises(Busy),
            b.exclusive("m", holder="b", timeout_s=0.5, busy=Busy()),
        ):
            pytest.fail("b entered while a held the lock")
        assert 0.5 <= time.monotonic() - started < 10
        # Only a's ticket is left, named for whoever looks at the registry.
        left = tickets(a, "m")
        assert [tags[TAG_HOLDER] for tags in left.values()] == [
            f"{socket.gethostname()}:{os.getpid()}:a"
        ]
    assert tickets(a, "m") == {}


def test_a_holder_that_keeps_beating_keeps_the_lock_past_its_lease(tmp_path: Path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    other = Registry(reg.tracking_uri, tmp_path / "artifacts")
    released: list[float] = []
    holding = threading.Event()

    def hold() -> None:
        with reg.exclusive("m", holder="a", timeout_s=10, busy=Busy(), lease_s=0.3):
            holding.set()
            time.sleep(1.2)  # four leases, beating every 0.05 s
            released.append(time.monotonic())

    t = threading.Thread(target=hold)
    t.start()
    assert holding.wait(30)
    with other.exclusive("m", holder="b", timeout_s=20, busy=Busy(), lease_s=0.3):
        entered = time.monotonic()
    t.join(30)
    assert released and entered >= released[0]


def test_a_dead_holders_ticket_is_skipped_after_its_lease_and_swept_later(
    machines: list[Registry],
) -> None:
    a, b = machines[0], machines[1]
    # A process that took a ticket and died: it never beats and never releases.
    dead = RegistryLock(a._client, a.experiment_id, "m", lease_s=0.2)
    dead_ticket, _ = dead._take_ticket("crashed")
    started = time.monotonic()
    with b.exclusive("m", holder="b", timeout_s=20, busy=Busy(), lease_s=0.2):
        waited = time.monotonic() - started
        assert str(dead_ticket) in tickets(a, "m")  # skipped, not yet swept
    assert 0.2 <= waited < 20
    # Ten leases on, the next taker deletes it.
    time.sleep(2.2)
    with b.exclusive("m", holder="b", timeout_s=20, busy=Busy(), lease_s=0.2):
        pass
    assert tickets(a, "m") == {}


def test_a_waiter_whose_ticket_was_removed_stops_with_a_registry_error(
    machines: list[Registry],
) -> None:
    a, b = machines[0], machines[1]
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            with b.exclusive("m", holder="b", timeout_s=30, busy=Busy()):
                pass
        except BaseException as exc:
            outcome.append(exc)

    with held_elsewhere(a, "a"):
        w = threading.Thread(target=wait)
        w.start()
        deadline = time.monotonic() + 30
        while len(tickets(a, "m")) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting = max(tickets(a, "m"), key=int)
        MlflowClient(a.tracking_uri, a.tracking_uri).delete_model_version(
            lock_model_name("m"), waiting
        )
        w.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], LockLostError)
    assert isinstance(outcome[0], RegistryError)


def test_the_lock_model_says_what_it_is_and_is_one_per_lock(machines: list[Registry]) -> None:
    a = machines[0]
    with a.exclusive("model one", holder="x", timeout_s=5, busy=Busy()):
        pass
    with a.exclusive("model/two", holder="x", timeout_s=5, busy=Busy()):
        pass
    client = MlflowClient(a.tracking_uri, a.tracking_uri)
    one = client.get_registered_model(lock_model_name("model one"))
    two = client.get_registered_model(lock_model_name("model/two"))
    assert one.tags[TAG_LOCK_FOR] == "model one" and two.tags[TAG_LOCK_FOR] == "model/two"
    assert "write lock" in (one.description or "")
    assert lock_model_name("model one") != lock_model_name("model/two")
    with pytest.raises(ValueError, match="must be positive"):
        RegistryLock(client, a.experiment_id, "m", lease_s=0)


def test_a_first_user_whose_run_tag_is_refused_still_takes_the_lock(
    machines: list[Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two first users both make a run and tag the lock's model with it; a store may refuse the
    # second tag (sqlite: UNIQUE constraint failed). The loser's own run still serves.
    from mlflow.exceptions import MlflowException

    a = machines[0]

    def refused(*args: object, **kwargs: object) -> None:
        raise MlflowException("UNIQUE constraint failed")

    monkeypatch.setattr(a._client, "set_registered_model_tag", refused)
    with a.exclusive("m", holder="a", timeout_s=5, busy=Busy()):
        assert len(tickets(a, "m")) == 1
    assert tickets(a, "m") == {}


@pytest.mark.parametrize("locked", [True, False], ids=["serving-lock", "no-lock"])
def test_a_rollback_decided_before_a_promotion_on_another_machine_moves_nothing(
    machines: list[Registry], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locked: bool
) -> None:
    # Machine A promotes version 3; machine B's rollback was decided on champion 2, previous 1.
    # A pauses between its look and its alias move (up to a second) for B's look.
    from tests.unit.test_registry import make_artifacts, register

    a, b = machines[0], machines[1]
    for tag in ("1", "2", "3"):
        register(a, "served", make_artifacts(tmp_path, tag))
    a.promote("served", "1")
    a.promote("served", "2")
    if not locked:
        for reg in (a, b):
            monkeypatch.setattr(reg, "serving_lock", lambda name: contextlib.nullcontext())
    a_moving, b_looked = threading.Event(), threading.Event()
    waited: list[bool] = []
    move, look = a._move_aliases, b._aliases

    def paused_move(*args: Any, **kwargs: Any) -> None:
        a_moving.set()
        waited.append(b_looked.wait(timeout=1.0))
        move(*args, **kwargs)

    def looking(*args: Any, **kwargs: Any) -> dict[str, str]:
        b_looked.set()
        return look(*args, **kwargs)

    monkeypatch.setattr(a, "_move_aliases", paused_move)
    monkeypatch.setattr(b, "_aliases", looking)
    promoting = threading.Thread(target=a.promote, args=("served", "3"))
    promoting.start()
    assert a_moving.wait(30)  # A is in its move (the lock held, if any)
    outcome: list[BaseException | None] = []
    try:
        b.rollback_to_previous("served", expect={"previous": "1", "champion": "2"})
        outcome.append(None)
    except RegistryError as exc:
        outcome.append(exc)
    promoting.join(30)
    if locked:
        # B looked only after A's move: it saw champion 3 and moved nothing.
        assert waited == [False]
        assert isinstance(outcome[0], RegistryError) and "not rolling back" in str(outcome[0])
        assert a._aliases("served") == {"champion": "3", "previous": "2"}
    else:
        # Without the lock B looked inside A's move and rolled back: both moves landed.
        assert waited == [True] and outcome == [None]


def test_a_lock_whose_model_was_deleted_fails_once_then_is_made_again(
    machines: list[Registry],
) -> None:
    a = machines[0]
    with a.exclusive("m", holder="a", timeout_s=5, busy=Busy()):
        pass
    MlflowClient(a.tracking_uri, a.tracking_uri).delete_registered_model(lock_model_name("m"))
    with (
        pytest.raises(RegistryError, match="taking lock 'm'"),
        a.exclusive("m", holder="a", timeout_s=5, busy=Busy()),
    ):
        pytest.fail("entered without a ticket")
    with a.exclusive("m", holder="a", timeout_s=5, busy=Busy()):
        assert len(tickets(a, "m")) == 1


# --- from a mutation-testing pass of write_lock.py ----------------------------------------


def swept_ticket(reg: Registry, lease_s: float) -> int:
    """A ticket of lock "m" whose holder died over ten leases ago: the next waiter sweeps it."""
    dead = RegistryLock(reg._client, reg.experiment_id, "m", lease_s=lease_s)
    ticket, _ = dead._take_ticket("crashed")
    age_ticket(reg, "m", ticket, int(10 * lease_s * 1000) + 3000)
    return ticket


def age_ticket(reg: Registry, lock: str, ticket: int | str, age_ms: int) -> None:
    """Back-date ``ticket``'s last stamp to ``age_ms`` before now (the store's clock is this
    machine's: a sqlite store stamps with ``time.time()``)."""
    import sqlite3

    db = reg.tracking_uri.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "UPDATE model_versions SET last_updated_time = ? WHERE name = ? AND version = ?",
            (int(time.time() * 1000) - age_ms, lock_model_name(lock), int(ticket)),
        )


def test_a_ticket_is_skipped_just_past_one_lease_and_swept_just_past_ten(
    machines: list[Registry],
) -> None:
    a, b = machines[0], machines[1]
    lease_s = 1000.0  # long, so the seconds this test takes are a sliver of a lease
    dead = RegistryLock(a._client, a.experiment_id, "m", lease_s=lease_s)
    stale, _ = dead._take_ticket("stalled")
    old, _ = dead._take_ticket("crashed")
    age_ticket(a, "m", stale, int(lease_s * 1000) + 300)  # one lease and 0.3 s
    age_ticket(a, "m", old, int(10 * lease_s * 1000) + 3000)  # ten leases and 3 s
    started = time.monotonic()
    with b.exclusive("m", holder="b", timeout_s=5, busy=Busy(), lease_s=lease_s):
        assert time.monotonic() - started < 5  # neither counted as ahead
        left = tickets(a, "m")
        assert str(stale) in left and str(old) not in left  # only the older one swept
    assert set(tickets(a, "m")) == {str(stale)}


def test_a_ticket_younger_than_ten_leases_is_not_swept(machines: list[Registry]) -> None:
    a, b = machines[0], machines[1]
    lease_s = 1000.0
    dead = RegistryLock(a._client, a.experiment_id, "m", lease_s=lease_s)
    stale, _ = dead._take_ticket("stalled")
    age_ticket(a, "m", stale, int(10 * lease_s * 1000) - 3000)
    with b.exclusive("m", holder="b", timeout_s=5, busy=Busy(), lease_s=lease_s):
        pass
    assert set(tickets(a, "m")) == {str(stale)}


def test_a_lock_refuses_a_poll_or_lease_that_is_not_positive(machines: list[Registry]) -> None:
    a = machines[0]
    client = MlflowClient(a.tracking_uri, a.tracking_uri)
    for bad in ({"poll_s": 0}, {"poll_s": -0.1}, {"lease_s": -1.0}, {"lease_s": float("nan")}):
        with pytest.raises(ValueError, match="must be positive"):
            RegistryLock(client, a.experiment_id, "m", **bad)


def test_a_lock_with_its_defaults_works(machines: list[Registry]) -> None:
    a = machines[0]
    lock = RegistryLock(MlflowClient(a.tracking_uri, a.tracking_uri), a.experiment_id, "m")
    with lock.held(holder="x", timeout_s=5, busy=Busy()):
        assert len(tickets(a, "m")) == 1
    assert tickets(a, "m") == {}


def test_the_lock_models_name_does_not_change_between_releases() -> None:
    # Processes running different ballast releases on one store must meet in the same model.
    assert lock_model_name("serving/m") == "ballast-lock-2f17c2e7953f0acc"


def test_every_machine_shares_one_finished_run_as_the_tickets_source(
    machines: list[Registry],
) -> None:
    for i, reg in enumerate(machines):
        for _ in range(2):
            with reg.exclusive("m", holder=f"w{i}", timeout_s=10, busy=Busy()):
                pass
    client = MlflowClient(machines[0].tracking_uri, machines[0].tracking_uri)
    runs = client.search_runs(
        [machines[0].experiment_id], filter_string="attributes.run_name = 'ballast-write-lock'"
    )
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    model = client.get_registered_model(lock_model_name("m"))
    assert model.tags["ballast.lock_run"] == runs[0].info.run_id


def test_a_first_user_that_loses_the_race_to_create_the_lock_model_still_takes_the_lock(
    machines: list[Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    a, b = machines[0], machines[1]
    with a.exclusive("m", holder="a", timeout_s=5, busy=Busy()):
        pass  # the lock's model exists now
    looks = [0]
    look = b._client.get_registered_model

    def looked_before_a_made_it(name: str) -> Any:
        looks[0] += 1
        if looks[0] == 1:  # b looked just before a created the model
            raise MlflowException("not found", error_code=codes.RESOURCE_DOES_NOT_EXIST)
        return look(name)

    monkeypatch.setattr(b._client, "get_registered_model", looked_before_a_made_it)
    with b.exclusive("m", holder="b", timeout_s=5, busy=Busy()):
        assert len(tickets(b, "m")) == 1
    assert tickets(b, "m") == {}


def test_a_failed_look_at_the_lock_model_is_a_registry_error_and_creates_nothing(
    machines: list[Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    a = machines[0]
    look = a._client.get_registered_model
    looks = [0]

    def unavailable_once(name: str) -> Any:
        looks[0] += 1
        if looks[0] == 1:
            raise MlflowException("try later", error_code=codes.TEMPORARILY_UNAVAILABLE)
        return look(name)

    monkeypatch.setattr(a._client, "get_registered_model", unavailable_once)
    with (
        pytest.raises(RegistryError, match="try later"),
        a.exclusive("m", holder="a", timeout_s=5, busy=Busy()),
    ):
        pytest.fail("entered after a failed look")
    client = MlflowClient(a.tracking_uri, a.tracking_uri)
    assert client.search_registered_models(f"name = '{lock_model_name('m')}'") == []
    with a.exclusive("m", holder="a", timeout_s=5, busy=Busy()):  # the next try goes through
        pass


def test_a_failed_creation_of_the_lock_model_is_reported_as_itself(
    machines: list[Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    a = machines[0]

    def refused(*args: object, **kwargs: object) -> None:
        raise MlflowException("quota of registered models reached", error_code=codes.INTERNAL_ERROR)

    monkeypatch.setattr(a._client, "create_registered_model", refused)
    with (
        pytest.raises(RegistryError, match="quota of registered models reached"),
        a.exclusive("m", holder="a", timeout_s=5, busy=Busy()),
    ):
        pytest.fail("entered without a lock model")


def test_a_dead_ticket_swept_by_another_waiter_first_is_no_error(
    machines: list[Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = machines[0]
    lease_s = 1000.0
    old = swept_ticket(a, lease_s)
    other = MlflowClient(a.tracking_uri, a.tracking_uri)
    delete = a._client.delete_model_version

    def overtaken(name: str, version: str) -> None:
        if version == str(old):
            other.delete_model_version(name, version)  # another waiter's sweep got there first
        delete(name, version)

    monkeypatch.setattr(a._client, "delete_model_version", overtaken)
    with a.exclusive("m", holder="a", timeout_s=5, busy=Busy(), lease_s=lease_s):
        assert len(tickets(a, "m")) == 1
    assert tickets(a, "m") == {}


def test_a_sweep_the_registry_refuses_is_logged_and_the_lock_is_still_taken(
    machines: list[Registry], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    a = machines[0]
    lease_s = 1000.0
    old = swept_ticket(a, lease_s)
    delete = a._client.delete_model_version
    refusals = []

    def denied(name: str, version: str) -> None:
        if version == str(old):
            refusals.append(version)
            raise MlflowException("no delete for you", error_code=codes.PERMISSION_DENIED)
        delete(name, version)

    monkeypatch.setattr(a._client, "delete_model_version", denied)
    with caplog.at_level("WARNING", logger="model_registry.write_lock"):
        with a.exclusive("m", holder="a", timeout_s=5, busy=Busy(), lease_s=lease_s):
            # Before: the refused sweep failed this attempt (and every later one) to take the
            # lock.
            assert set(tickets(a, "m")) == {str(old), str(old + 1)}
        with a.exclusive("m", holder="a", timeout_s=5, busy=Busy(), lease_s=lease_s):
            pass
    assert set(tickets(a, "m")) == {str(old)}  # the dead one stays, skipped; ours released
    said = [r.getMessage() for r in caplog.records if "sweeping dead ticket" in r.getMessage()]
    assert len(refusals) == len(said) == 1, (refusals, said)  # tried and said once, not per poll
    assert f"ticket {old} failed (PERMISSION_DENIED)" in said[0]


def test_a_release_the_registry_refuses_is_logged_and_left_to_lapse(
    machines: list[Registry], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    a = machines[0]

    def denied(*args: object, **kwargs: object) -> None:
        raise MlflowException("no delete for you", error_code=codes.PERMISSION_DENIED)

    monkeypatch.setattr(a._client, "delete_model_version", denied)
    with (
        caplog.at_level("WARNING", logger="model_registry.write_lock"),
        a.exclusive("m", holder="a", timeout_s=5, busy=Busy()),
    ):
        pass
    assert len(tickets(a, "m")) == 1  # left behind: it runs out after a lease
    assert any("removing ticket" in r.getMessage() for r in caplog.records)


def test_a_registry_error_while_waiting_removes_the_waiters_ticket(
    machines: list[Registry], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2 as codes

    a, b = machines[0], machines[1]
    search = b._client.search_model_versions
    looks = [0]

    def fails_on_the_third_look(*args: Any, **kwargs: Any) -> Any:
        looks[0] += 1
        if looks[0] == 3:
            raise MlflowException("registry went away", error_code=codes.TEMPORARILY_UNAVAILABLE)
        return search(*args, **kwargs)

    monkeypatch.setattr(b._client, "search_model_versions", fails_on_the_third_look)
    with held_elsewhere(a, "a"):
        with (
            pytest.raises(RegistryError, match="registry went away"),
            b.exclusive("m", holder="b", timeout_s=30, busy=Busy()),
        ):
            pytest.fail("b entered while a held the lock")
        left = tickets(a, "m")
        assert [tags[TAG_HOLDER] for tags in left.values()] == [
            f"{socket.gethostname()}:{os.getpid()}:a"
        ]


def test_a_version_without_a_last_updated_time_is_a_registry_error() -> None:
    from types import SimpleNamespace

    from model_registry.write_lock import _stamp

    with pytest.raises(RegistryError, match="no last-updated time"):
        _stamp(SimpleNamespace(name="ballast-lock-x", version="3", last_updated_timestamp=None))  # type: ignore[arg-type]


def test_a_holder_stamps_its_ticket_several_times_a_lease(machines: list[Registry]) -> None:
    a = machines[0]
    client = MlflowClient(a.tracking_uri, a.tracking_uri)
    stamps: set[int] = set()
    with a.exclusive("m", holder="a", timeout_s=10, busy=Busy(), lease_s=0.6):
        end = time.monotonic() + 2.4  # four leases
        while time.monotonic() < end:
            for mv in client.search_model_versions(f"name = '{lock_model_name('m')}'"):
                stamps.add(int(mv.last_updated_timestamp or 0))
            time.sleep(0.02)
    ordered = sorted(stamps)
    assert len(ordered) >= 4  # a beat every 0.1 s: about 24
    assert max(later - earlier for earlier, later in itertools.pairwise(ordered)) < 600
