"""What every task needs: settings, the registry facade, a logger that works outside runs too."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_run_logger

from ballast.settings import Settings, get_settings
from model_registry import Registry


def logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:  # called via .fn() in tests or from the CLI
        return logging.getLogger("ballast")


def remove_staging(path: Path) -> None:
    """Delete a run's staging folder (compile outputs, the files registered), best effort: a
    leftover is disk space, not a failed release."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger().warning("stage=register staging %s not removed: %s", path, exc)


# A crashed holder's slot comes back after this long (the server's shortest lease); a live
# holder's lease is renewed in the background while it holds the slot.
SERVER_LOCK_LEASE_S = 60.0


def _one_slot(name: str) -> None:
    """Make the global concurrency limit ``name`` exist with one slot, active."""
    with get_client(sync_client=True) as client:
        try:
            found = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            return
        if found.limit != 1 or not found.active:
            # Ours by name; with more slots (or inactive) it would let two holders in at once.
            logger().warning(
                "lock %s had limit=%s active=%s; set back to one active slot",
                name,
                found.limit,
                found.active,
            )
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
            )


@contextlib.contextmanager
def server_lock(name: str, timeout_s: float, busy: BaseException) -> Iterator[None]:
    """One holder at a time among every run on this Prefect server, whatever machine it runs
    on: a global concurrency limit of one slot named ``name`` (created on first use), held
    under a lease the server takes back :data:`SERVER_LOCK_LEASE_S` after a holder dies.
    Waits up to ``timeout_s``, then raises ``busy``.

    Outside a flow or task run (a task called via ``.fn()``, the CLI) there is no server to
    ask and it holds nothing: pair it with a local lock (:mod:`ballast.locks`) for those.
    """
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        yield
        return
    _one_slot(name)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(
                    name,
                    occupy=1,
                    timeout_seconds=timeout_s,
                    lease_duration=SERVER_LOCK_LEASE_S,
                    strict=True,
                    # A lease lost mid-block means another holder may be inside: stop.
                    raise_on_lease_renewal_failure=True,
                )
            )
        except TimeoutError:
            raise busy from None
        yield


def registry(settings: Settings | None = None) -> Registry:
    s = settings or get_settings()
    return Registry(s.tracking_uri, s.artifact_root)


# Libraries whose own exceptions mean a network or server hiccup.
_NETWORK_MODULES = ("httpx", "httpcore", "botocore", "urllib3", "requests")


def not_retryable(exc: BaseException) -> bool:
    """Bad input never gets better by retrying: only storage or network hiccups are retried.

    A :class:`FetchError` or :class:`KeyServiceUnavailable` says itself (a missing object or a
    denied read is not transient; a KMS outage is); other typed errors are bad input; an
    untyped error is retried only when it is an ``OSError`` or a network library's (anything
    else is a bug or a setting, which a retry repeats).
    """
    from ballast.errors import BallastError

    if isinstance(exc, BallastError):
        # FetchError and KeyServiceUnavailable say themselves whether a retry may succeed.
        return not getattr(exc, "transient", False)
    network = type(exc).__module__.split(".")[0] in _NETWORK_MODULES
    return not (isinstance(exc, OSError) or network)


def _failure(state: Any) -> BaseException | None:
    try:
        state.result()
    except BaseException as exc:
        return exc
    return None


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is bad input."""
    exc = _failure(state)
    return exc is not None and not not_retryable(exc)


def retry_registry_hiccups(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` for registry writes: a tracking server that went away
    (:class:`RegistryError`) may be back; a bad signing key or manifest will not be."""
    from ballast.errors import RegistryError

    exc = _failure(state)
    return exc is not None and (isinstance(exc, RegistryError) or not not_retryable(exc))


P = ParamSpec("P")
R = TypeVar("R")


def idempotent_registry_task(name: str) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A task whose registry reads and writes may be repeated (tags set again, an alias moved
    only while it names this version, audit entries once per task run): Prefect retries it on
    a registry hiccup (:func:`retry_registry_hiccups`), 1, 5 and 15 s apart."""
    return task(
        name=name,
        cache_policy=NO_CACHE,
        retries=3,
        retry_delay_seconds=[1, 5, 15],
        retry_condition_fn=retry_registry_hiccups,
    )


class AuditedAdmin:
    """The gateway's deployment admin API with every change written to the audit log.

    Only changes the gateway confirmed are recorded (a refused PUT changed nothing). ``why``
    says which stage changed traffic (canary step, rollback, restore after a failure).
    """

    def __init__(self, client: Any, audit_path: Any, *, why: str) -> None:
        self._client, self._audit, self.why = client, audit_path, why
        self._last: Any = None  # the last change recorded, without its lease stamp

    def get_deployment(self) -> Any:
        return self._client.get_deployment()

    def set_deployment(self, dep: Any, *, expect: Any = ()) -> Any:
        from ballast.audit import record

        applied = self._client.set_deployment(dep, expect=expect)
        unstamped = dep.model_copy(update={"lease_expires_at": None})
        if unstamped == self._last:
            # A lease renewal (or a re-send to a lagging replica) changes no traffic: one entry
            # per change, not one every few seconds that reads like a step.
            return applied
        self._last = unstamped
        record(
            self._audit,
            "deployment",
            model=dep.model,
            version=dep.champion.version if dep.champion else None,
            canary=dep.canary.version if dep.canary else None,
            canary_weight=dep.canary_weight,
            shadow=dep.shadow.version if dep.shadow else None,
            why=self.why,
        )
        return applied
