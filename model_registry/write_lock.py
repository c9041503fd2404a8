"""A lock kept in the registry itself: one writer at a time, whichever machine it runs on.

MLflow has no conditional write (no compare-and-set on a tag or an alias), so a look followed by
a write can always be overtaken by another writer. The one thing its store orders is a model
version's number: a new version of a registered model takes the highest number so far plus one,
and the store's unique key on (name, version) makes two concurrent creations take distinct
numbers (the loser retries with the next). A version whose number a client has seen therefore
has every lower version that will ever exist already in the store.

So a would-be writer creates a *ticket*, a version of a registered model kept for the lock
(``ballast-lock-<hash>``, tagged with what it locks), and holds the lock once its ticket is the
lowest live one: first come, first served, in the order the store gave out the numbers.

* **Live.** A ticket's ``last_updated_timestamp`` is stamped by the store's clock whenever its
  holder beats (rewrites its description), which a holder does every ``lease_s / 6`` while it
  waits or holds. A waiter judges the others' stamps against its own latest stamp, so only the
  store's clock counts: machines' clocks may disagree. A ticket not stamped for ``lease_s`` is
  skipped (its holder died), and deleted once it is ten leases old.
* **Released** by deleting the ticket (a failed delete only leaves a ticket that runs out).
* **Limit**: a holder stalled for longer than the lease (a process paused, a registry that
  stops answering its beats) can lose the lock without knowing. What runs under it must be
  short: a few tag writes.

A version needs a run as its source: one finished run per lock, in the registry's experiment,
named ``ballast-write-lock`` (its id kept as a tag of the lock's registered model).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ballast.errors import RegistryError, redacted_cause

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

__all__ = [
    "LOCK_MODEL_PREFIX",
    "TAG_LOCK_FOR",
    "LockLostError",
    "RegistryLock",
    "lock_model_name",
    "serving_lock_name",
]

log = logging.getLogger(__name__)

LOCK_MODEL_PREFIX = "ballast-lock-"
TAG_LOCK_FOR = "ballast.lock_for"
TAG_LOCK_RUN = "ballast.lock_run"
TAG_HOLDER = "ballast.lock_holder"
# Tickets this much older than the lease are deleted by whoever sees them (their holders died).
_GARBAGE_LEASES = 10


def serving_lock_name(model: str) -> str:
    """The lock every change to what ``model`` serves takes: alias moves (promotion, rollback)
    and a registry-backed gateway's weight and lease writes."""
    return f"serving/{model}"


def lock_model_name(name: str) -> str:
    """The registered model that holds the tickets of the lock called ``name`` (any string:
    hashed, as a registered model's name may not take every character)."""
    return LOCK_MODEL_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:16]


def _stamp(mv: ModelVersion) -> int:
    if mv.last_updated_timestamp is None:  # every store sets it; the type allows None
        raise RegistryError(f"{mv.name} version {mv.version} has no last-updated time")
    return int(mv.last_updated_timestamp)


class LockLostError(RegistryError):
    """This process's ticket was deleted while it waited: others judged it dead (it had not
    been stamped for a lease)."""


class RegistryLock:
    """The lock called ``name`` in the registry behind ``client`` (see the module doc)."""

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        name: str,
        *,
        lease_s: float = 30.0,
        poll_s: float = 0.1,
    ) -> None:
        if not lease_s > 0 or not poll_s > 0:
            raise ValueError("lease_s and poll_s must be positive")
        self._client = client
        self._experiment_id = experiment_id
        self.name = name
        self.model = lock_model_name(name)
        self.lease_ms = int(lease_s * 1000)
        self.beat_s = lease_s / 6
        self.poll_s = poll_s
        self._run_id: str | None = None
        # Dead tickets this process was refused deleting: skipped as dead anyway, and not
        # tried (nor logged) again at every poll of every later wait.
        self._unsweepable: set[int] = set()

    # --- set-up --------------------------------------------------------------------------------

    def _source(self) -> tuple[str, str]:
        """The lock's registered model (created on first use) and the run its tickets name."""
        from mlflow.exceptions import MlflowException

        if self._run_id is None:
            try:
                model = self._client.get_registered_model(self.model)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                try:
                    self._client.create_registered_model(
                        self.model,
                        tags={TAG_LOCK_FOR: self.name},
                        description=(
                            f"Ballast's write lock for {self.name!r}: each version is a ticket "
                            "of a writer waiting or holding it. Do not use."
                        ),
                    )
                except MlflowException as exc2:  # another process created it first
                    if exc2.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                model = self._client.get_registered_model(self.model)
            run_id = (model.tags or {}).get(TAG_LOCK_RUN)
            if not run_id:
                # Two first users may both make one; either run serves as a source.
                run = self._client.create_run(
                    self._experiment_id,
                    run_name="ballast-write-lock",
                    tags={TAG_LOCK_FOR: self.name},
                )
                run_id = run.info.run_id
                self._client.set_terminated(run_id, "FINISHED")
                try:
                    self._client.set_registered_model_tag(self.model, TAG_LOCK_RUN, run_id)
                except MlflowException:
                    # Another first user's tag won (a store may refuse the second insert);
                    # this run still serves as a source, the tag only saves the next ones.
                    log.debug("lock %r: run tag already set", self.name)
            self._run_id = run_id
        return f"runs:/{self._run_id}/lock", self._run_id

    # --- tickets -------------------------------------------------------------------------------

    def _take_ticket(self, holder: str) -> tuple[int, int]:
        """A new ticket: its number and its stamp (the store's time now, in ms)."""
        source, run_id = self._source()
        mv = self._client.create_model_version(
            self.model,
            source,
            run_id=run_id,
            tags={TAG_HOLDER: holder},
            description="0",
            await_creation_for=0,  # nothing to upload: ready at once
        )
        return int(mv.version), _stamp(mv)

    def _beat(self, ticket: int, count: int) -> int:
        """Stamp ``ticket`` with the store's time (a new description) and return that time."""
        mv = self._client.update_model_version(self.model, str(ticket), description=str(count))
        return _stamp(mv)

    def _tickets(self) -> dict[int, int]:
        """Every ticket now: number -> last stamp."""
        found: dict[int, int] = {}
        token: str | None = None
        while True:
            page = self._client.search_model_versions(f"name = '{self.model}'", page_token=token)
            found.update({int(mv.version): _stamp(mv) for mv in page})
            token = page.token
            if not token:
                return found

    def _drop(self, ticket: int) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.delete_model_version(self.model, str(ticket))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def _sweep(self, ticket: int) -> None:
        """Remove a long-dead ticket, best effort: it is skipped as dead whether or not it goes
        (a sweep refused, say a registry user without delete rights, must not stop the lock)."""
        from mlflow.exceptions import MlflowException

        if ticket in self._unsweepable:
            return
        try:
            self._drop(ticket)
        except MlflowException as exc:
            self._unsweepable.add(ticket)
            log.warning(
                "lock %r: sweeping dead ticket %s failed (%s); it stays skipped, not tried again",
                self.name,
                ticket,
                exc.error_code,
            )

    # --- the lock ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def held(self, *, holder: str, timeout_s: float, busy: BaseException) -> Iterator[None]:
        """Hold the lock for the block, waiting up to ``timeout_s`` for the tickets before this
        one; then raise ``busy``. ``holder`` (host, process, purpose) is written on the ticket
        for whoever looks at the registry while it waits. Registry failures raise
        :class:`RegistryError`."""
        from mlflow.exceptions import MlflowException

        ticket: int | None = None
        try:
            ticket, now = self._take_ticket(holder)
            beats, next_beat = 0, time.monotonic() + self.beat_s
            deadline = time.monotonic() + timeout_s
            while True:
                tickets = self._tickets()
                if ticket not in tickets:
                    raise LockLostError(
                        f"lock {self.name!r}: ticket {ticket} was removed while it waited "
                        f"(not stamped for {self.lease_ms / 1000:g} s)"
                    )
                ahead = [
                    t for t, stamp in tickets.items() if t < ticket and now - stamp <= self.lease_ms
                ]
                for t, stamp in tickets.items():
                    if now - stamp > _GARBAGE_LEASES * self.lease_ms:
                        self._sweep(t)
                if not ahead:
                    break
                if time.monotonic() >= deadline:
                    raise busy
                if time.monotonic() >= next_beat:
                    beats += 1
                    now, next_beat = self._beat(ticket, beats), time.monotonic() + self.beat_s
                time.sleep(self.poll_s)
        except MlflowException as exc:
            self._release(ticket)
            self._run_id = None  # look again next time: someone may have deleted the lock's model
            raise RegistryError(
                f"taking lock {self.name!r} in the registry: {exc.message}"
            ) from redacted_cause(exc)
        except BaseException:
            self._release(ticket)
            raise
        stop = threading.Event()
        beating = threading.Thread(
            target=self._keep_beating,
            args=(ticket, beats, stop),
            name=f"ballast-lock-beat-{ticket}",
            daemon=True,
        )
        beating.start()
        try:
            yield
        finally:
            stop.set()
            beating.join()
            self._release(ticket)

    def _keep_beating(self, ticket: int, beats: int, stop: threading.Event) -> None:
        while not stop.wait(self.beat_s):
            beats += 1
            try:
                self._beat(ticket, beats)
            except Exception as exc:  # the holder's work goes on; the lease may run out
                log.warning(
                    "lock %r: stamping ticket %s failed: %s", self.name, ticket, type(exc).__name__
                )

    def _release(self, ticket: int | None) -> None:
        if ticket is None:
            return
        try:
            self._drop(ticket)
        except Exception as exc:  # it runs out after a lease
            log.warning(
                "lock %r: removing ticket %s failed (%s); it lapses in %g s",
                self.name,
                ticket,
                type(exc).__name__,
                self.lease_ms / 1000,
            )
