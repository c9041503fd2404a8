"""The gateway's ASGI app: predict (JSON or .npy), weighted/sticky routing, shadow traffic,
dynamic batching, desired-state sync, a role-checked admin API, health, readiness, metrics.

Build it with :func:`create_app`; ``python -m infra.gateway`` serves it with uvicorn (one
process, or several replicas behind one port). All mutable state lives on one
:class:`Gateway` object per app, touched only from the event loop thread; inference runs in
batches (:mod:`infra.gateway.batcher`: on inference threads, or on the loop itself for models
whose calls take less than the thread hand-off would), artefact loading and desired-state I/O
on threads of their own.

``POST /v1/models/{model}/predict`` is served by a plain ASGI handler in front of the Starlette
router: it is the hot path, and Starlette's request/response objects and middleware cost about
as much as the model itself at batch 1. So are the Open Inference Protocol (KServe v2) routes
under ``/v2`` (:mod:`infra.gateway.oip`), which share its router and batchers through
:meth:`Gateway.infer`. Every other route goes through Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ballast.localise import localise
from ballast.runtime import Predictor, load_predictor
from ballast.serving import (
    NPY_MEDIA_TYPE,
    Deployment,
    VersionSpec,
    deployment_etag,
    precondition_holds,
)
from ballast.settings import Settings
from infra.gateway import oip
from infra.gateway.auth import Principal, Role, TokenTable
from infra.gateway.batcher import Batcher, BatchFailedError, BatchPolicy, OverloadedError
from infra.gateway.desired import (
    DesiredStateError,
    DesiredStateSource,
    ReplicaBoard,
    ReplicaStatus,
)
from infra.gateway.faillog import FailureFiles, FailureLog
from infra.gateway.heartbeat import WatchdogHeartbeat
from infra.gateway.metrics import GatewayMetrics
from infra.gateway.openapi import openapi_document
from infra.gateway.versions import (
    DeploymentRefusedError,
    Live,
    LoadedVersion,
    Loader,
    Slot,
    identity,
    load_version,
)
from infra.gateway.wire import (
    BadRequestError,
    ClientGoneError,
    dumps,
    encode_prediction,
    encode_probabilities_npy,
    output_error,
    parse_instances,
    parse_npy,
    read_asgi_body,
    request_id,
    softmax,
)

__all__ = [
    "ADMIN_ROUTES",
    "KEY_HEADER",
    "REPLICAS_HEADER",
    "ROLE_HEADER",
    "VERSION_HEADER",
    "AdminRoute",
    "BadRequestError",
    "Gateway",
    "GatewayApp",
    "GatewayConfig",
    "create_app",
    "encode_prediction",
    "parse_instances",
]

VERSION_HEADER = "X-Ballast-Version"
ROLE_HEADER = "X-Ballast-Role"
KEY_HEADER = "X-Ballast-Key"
# "converged/total": how many live replicas serve what a PUT just published.
REPLICAS_HEADER = "X-Ballast-Replicas"
# How often a replica with a board writes its status there: well inside the board's staleness
# (ReplicaBoard.stale_after_s, 3 s by default).
HEARTBEAT_S = 0.5

logger = logging.getLogger("ballast.gateway")

T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_PREDICT_PREFIX = "/v1/models/"
_PREDICT_SUFFIX = "/predict"
_NPY = NPY_MEDIA_TYPE.encode()
# Sequence numbers of at most 19 ASCII digits (a cursor past the end is clamped, never an
# error); a limit of at most 5 (its range is 1..20000). The OpenAPI document says the same.
_CURSORS = re.compile(r"(?:[^=,]+=[0-9]{1,19})?(?:,[^=,]+=[0-9]{1,19})*")
_LIMIT = re.compile(r"[0-9]{1,5}")
_SMALL_INT = re.compile(r"[0-9]{1,3}")
_OIP_ROOT = "/v2"  # Open Inference Protocol (infra/gateway/oip.py)
_OIP_PREFIX = "/v2/"
# A heartbeat is three short fields; anything near this is not one.
_HEARTBEAT_MAX_BYTES = 16 << 10


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything a gateway needs; :meth:`from_settings` maps ``BALLAST_*`` settings onto it."""

    admin_token: str
    # Set by whoever started this gateway (GatewayProcess), echoed by /healthz.
    instance: str = ""
    # 4096 rows x 30 features of full-precision JSON floats is about 2.6 MB.
    max_body_bytes: int = 8 << 20
    max_admin_body_bytes: int = 1 << 20
    max_rows: int = 4096  # PredictRequest's own bound
    seed: int = 0
    # ORT threads per session: 1 because the server's own threads need the other cores.
    intra_op_threads: int = 1
    # Threads running batches (all versions together); ORT releases the GIL.
    inference_threads: int = 2
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    stats_window: int = 2048
    fault_error_rate: float = 0.3
    fault_latency_s: float = 0.060
    # A retired version is unloaded when its in-flight requests finish, or after this long.
    unload_timeout_s: float = 30.0
    # Extra bearer tokens beside the admin token: (sha256 of token, principal).
    tokens: tuple[tuple[str, Principal], ...] = ()
    # How long a PUT waits for the other replicas to serve what it published.
    converge_timeout_s: float = 5.0
    # How long a starting replica may spend loading the desired deployment before it takes
    # connections; past it, it starts unready and keeps converging in the background.
    startup_sync_timeout_s: float = 60.0
    # How often a replica checks whether the lease of a canary or shadow ran out.
    lease_check_s: float = 0.2
    # A shadow this many rows behind gets no more mirrored requests until it catches up.
    shadow_max_queue_rows: int = 512
    shadow_log_size: int = 50  # recent disagreements kept for /admin/shadow
    # Recent answered requests kept for /admin/observations (a canary judging live traffic).
    observation_log_size: int = 20_000
    # A desired state this replica refused is tried again after this long (artefacts may appear).
    refused_retry_s: float = 30.0
    replica_id: str = ""  # default: the process id
    # Failed-request log lines per version and second; the rest are counted in a summary line.
    failure_log_per_second: int = 20
    # Where routed failure lines are also kept, for GET /admin/failures (None: not kept). Every
    # replica of a pod writes its own file there, and any of them reads them all.
    failure_dir: Path | None = None
    failure_file_bytes: int = 4 << 20  # per replica, rotated once (twice this on disk)
    # How long a GET /admin/failures waits for another one's read before it answers 429.
    failure_read_wait_s: float = 10.0
    # Open AOTInductor and TensorRT versions in a child first (ballast.compile.probe): a crash
    # in their native loader refuses that version instead of ending the replica.
    probe_native_loads: bool = True
    # Hot-path metric updates are summed and written this often (0: once per loop iteration).
    # Each write costs about a microsecond per series in multiprocess mode; a replica's own
    # /metrics writes its pending updates first, another replica's may lag by this much.
    metrics_flush_s: float = 0.02

    def __post_init__(self) -> None:
        if not self.admin_token:
            raise ValueError("the gateway needs a non-empty admin token")
        if self.inference_threads < 1 or self.max_rows < 1 or self.stats_window < 1:
            raise ValueError("inference_threads, max_rows and stats_window must be >= 1")
        if not 0 <= self.metrics_flush_s <= 1:
            raise ValueError("metrics_flush_s must be between 0 and 1 second")

    @classmethod
    def from_settings(cls, s: Settings, **overrides: Any) -> GatewayConfig:
        return cls(
            admin_token=s.admin_token(),
            intra_op_threads=s.gateway_threads,
            probe_native_loads=s.native_load_probe,
            **overrides,
        )


@dataclass(frozen=True, slots=True)
class AdminRoute:
    """One admin endpoint and the least role that may call it."""

    method: str
    path: str
    role: Role
    handler: str  # name of the Gateway method


#: Every admin route and the role it needs (viewer < operator < admin). A PUT that injects a
#: fault additionally needs admin.
ADMIN_ROUTES: tuple[AdminRoute, ...] = (
    AdminRoute("GET", "/admin/deployment", "viewer", "get_deployment"),
    AdminRoute("GET", "/admin/stats", "viewer", "stats"),
    AdminRoute("GET", "/admin/replicas", "viewer", "replicas"),
    AdminRoute("GET", "/admin/shadow", "viewer", "shadow_report"),
    AdminRoute("GET", "/admin/observations", "viewer", "observations"),
    AdminRoute("GET", "/admin/failures", "viewer", "failure_report"),
    AdminRoute("PUT", "/admin/deployment", "operator", "put_deployment"),
    AdminRoute("POST", "/admin/reload", "operator", "reload"),
    AdminRoute("POST", "/admin/watchdog/heartbeat", "operator", "watchdog_heartbeat"),
    AdminRoute("DELETE", "/admin/deployment", "admin", "delete_deployment"),
    AdminRoute("GET", "/admin/tokens", "admin", "list_tokens"),
)


class PreconditionFailedError(Exception):
    """A change's If-Match does not name the desired state in force (``current``: its tag)."""

    def __init__(self, current: str) -> None:
        super().__init__(current)
        self.current = current


_ENTITY_TAG = re.compile(r'\s*((?:W/)?"[^"\s]*")\s*(?:,|$)')


def parse_if_match(value: str) -> frozenset[str]:
    """The tags of an ``If-Match`` header (RFC 9110: ``*`` or a list of quoted tags), unquoted;
    empty when malformed. A weak tag keeps its ``W/`` and so never matches (If-Match compares
    strongly)."""
    value = value.strip()
    if value == "*":
        return frozenset({"*"})
    tags: set[str] = set()
    pos = 0
    while pos < len(value):
        m = _ENTITY_TAG.match(value, pos)
        if m is None or m.end() == pos:
            return frozenset()
        tag = m.group(1)
        tags.add(tag[1:-1] if tag.startswith('"') else tag)
        pos = m.end()
    return frozenset(tags)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise BadRequestError(400, "bad_length", "invalid Content-Length header") from None
        if declared > limit:
            raise BadRequestError(
                413, "too_large", f"body of {declared} bytes exceeds {limit} bytes"
            )
    chunks: list[bytes] = []
    size = 0
    # Streamed so that a chunked body without a length is cut off at the limit, not buffered.
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequestError(413, "too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_detail(errors: Any) -> str:
    """Pydantic's errors as one bounded line: where, and what is wrong (at most 8)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:8]
    )


def _default_loader(
    path: Path, backend: str, intra_op_threads: int, *, probe: bool = True
) -> Predictor:
    # Here, not at the top: a replica serving ONNX Runtime never needs ballast.compile.
    from ballast.compile.probe import NATIVE_BACKENDS, probe_load

    if probe and backend in NATIVE_BACKENDS:
        # A crash in native loading code would end this replica and every version it serves;
        # a child takes that risk, and a crash there refuses only this version.
        probe_load(path, backend)
    return load_predictor(path, backend, intra_op_threads=intra_op_threads)


def _warn_json(fields: dict[str, Any]) -> None:
    logger.warning(json.dumps(fields, default=str))


FAILURE_DRAIN_S = 1.0


def _read_failures(
    files: FailureFiles,
    replica: str,
    model: str,
    version: str,
    since: datetime,
    until: datetime,
    min_status: int,
    context: int,
) -> dict[str, Any]:
    """``GET /admin/failures``'s answer, read in a thread."""
    # This replica's lines are written by a thread of their own: wait (briefly) for those
    # already queued, so failures a caller has just seen are in the report.
    files.drain(FAILURE_DRAIN_S)
    waiting = files.waiting
    report = localise(
        files.paths(), model, version, since, until, min_status=min_status, context_lines=context
    )
    body = report.to_dict()
    if files.lost:
        # Say so: "no failure" would otherwise read as a healthy version.
        body["unreadable"].append(
            f"{files.path}: {files.lost} failure line(s) of replica {replica} could not be written"
        )
    if waiting:
        body["unreadable"].append(
            f"{files.path}: {waiting} failure line(s) of replica {replica} were still waiting "
            f"to be written after {FAILURE_DRAIN_S:g} s (a slow disk)"
        )
    body["pod"] = socket.gethostname()
    try:
        body["folder"] = files.folder_id()
    except OSError:  # a folder this replica could not create (logged at its start)
        body["folder"] = f"{body['pod']}:{files.folder}"
    return body


def _query_time(value: str | None) -> datetime | None:
    """An ISO 8601 time from a query (naive: UTC), or ValueError saying what is wrong."""
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    except (ValueError, OverflowError):
        # A '+' in a query reads as a space: say so, it is the usual cause.
        raise ValueError(
            f"not an ISO 8601 time: {value[:64]!r} (write UTC as Z, or %2B for '+')"
        ) from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(eq=False)
class Gateway:
    """State and handlers of one gateway replica. Mutated only on the event loop thread."""

    config: GatewayConfig
    loader: Loader = _default_loader
    source: DesiredStateSource | None = None
    board: ReplicaBoard | None = None
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    live: Live | None = None
    draining: list[LoadedVersion] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = TokenTable.build(self.config.admin_token, self.config.tokens)
        # The host name too: in a container every gateway is pid 1, and replicas with one name
        # would have their counters compared with each other's (the watchdog's windows).
        self.replica_id = self.config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self._rng = random.Random(self.config.seed)
        self._shadow_rng = random.Random(self.config.seed + 1)
        self._deploy_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inference: ThreadPoolExecutor | None = None
        self._loading: ThreadPoolExecutor | None = None
        self._io: ThreadPoolExecutor | None = None
        self._started = time.time()
        # What the desired-state source last said (with a source), else the last accepted PUT.
        self.desired: Deployment | None = None
        self.desired_known = self.source is None
        self._startup_sync = True  # until this process first converges (sync_once)
        self.sync_error: str | None = None
        self._refused: tuple[str, float] | None = None  # (refused deployment JSON, retry after)
        self.disagreements: deque[dict[str, Any]] = deque(maxlen=self.config.shadow_log_size)
        # (seq, version, role, ok, latency_s, canary weight it was routed under, routing key's
        # pseudonym or None) of recent answers, oldest first, seq contiguous. The weight lets a canary step count only the
        # answers served at its own weight (a replica read late must not hand them on).
        self._observed: deque[tuple[int, str, str, bool, float, int, str | None]] = deque(
            maxlen=self.config.observation_log_size
        )
        self._observed_seq = 0
        self.answered = 0  # predict requests answered (any status), for the drain log line
        self.failure_files = (
            None
            if self.config.failure_dir is None
            else FailureFiles(
                self.config.failure_dir,
                self.replica_id,
                max_bytes=self.config.failure_file_bytes,
            )
        )
        self._failure_reads = asyncio.Semaphore(1)
        self.failures = FailureLog(
            _warn_json if self.failure_files is None else self._log_failure,
            replica=self.replica_id,
            per_second=self.config.failure_log_per_second,
        )

    def _log_failure(self, event: dict[str, Any]) -> None:
        _warn_json(event)
        if self.failure_files is not None:
            self.failure_files.write(event)

    # -- lifecycle -----------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # Own pools: inference gets a fixed number of threads (no oversubscription of the cores),
        # a slow artefact load never queues behind, or ahead of, user requests, and a slow
        # registry read never delays a load.
        self._inference = ThreadPoolExecutor(
            self.config.inference_threads, thread_name_prefix="gateway-infer"
        )
        self._loading = ThreadPoolExecutor(1, thread_name_prefix="gateway-load")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="gateway-io")
        # Hot-path metric updates are summed and written every metrics_flush_s (GatewayMetrics).
        loop = asyncio.get_running_loop()
        every = self.config.metrics_flush_s
        self.metrics.defer_with(loop.call_soon if every == 0 else partial(loop.call_later, every))
        self._log(
            "gateway.started",
            replica=self.replica_id,
            inference_threads=self.config.inference_threads,
            batch=str(self.config.batch),
            source=None if self.source is None else self.source.describe(),
        )
        if self.source is not None:
            await self._first_sync()
            self._spawn(self._sync_loop())
            self._spawn(self._heartbeat_loop())
        self._spawn(self._lease_loop())
        self._spawn(self._flush_failures())
        if self.failure_files is not None:
            try:
                swept = self.failure_files.sweep()
            except OSError as exc:  # diagnostics only: serving goes on without the files
                self._log("failure_files.unavailable", error=str(exc))
            else:
                self._log("failure_files.ready", folder=self.failure_files.folder, swept=swept)
                self._spawn(self._sweep_failure_files(self.failure_files))
        try:
            yield
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self.failures.flush(final=True)
            if self.failure_files is not None:
                self.failure_files.close()
            self.metrics.defer_with(None)  # writes what is pending
            for version in self._all_loaded():
                if version.batcher is not None:
                    version.batcher.fail_queued("the gateway is shutting down")
            if self.board is not None:
                self.board.remove(self.replica_id)
            self._inference.shutdown(wait=True)
            self._loading.shutdown(wait=True)
            self._io.shutdown(wait=True)
            self._log("gateway.stopped", replica=self.replica_id, answered=self.answered)

    async def _first_sync(self) -> None:
        """Converge to the desired state before the server accepts a connection.

        A replica (re)started by the supervisor would otherwise take connections while it
        still serves nothing and answer them 503. The server listens only after the lifespan
        starts (see supervisor.py), so load first (bounded), then join the board, so a PUT on
        another replica waits for this one too.
        """
        try:
            await asyncio.wait_for(self.sync_once(), self.config.startup_sync_timeout_s)
        except TimeoutError:
            self.sync_error = "the desired deployment did not load in time at start"
            self._log("sync.startup_timeout", seconds=self.config.startup_sync_timeout_s)
        except Exception as exc:
            # As in the sync loop: start unready and keep converging. Failing the lifespan here
            # would only make the supervisor restart the replica into the same failure.
            self.sync_error = f"{type(exc).__name__}: {exc}"
            self._log("sync.failed", error=self.sync_error, at="startup")
        await self._report()

    async def _flush_failures(self) -> None:
        # Suppressed failures of a second that is over get their summary line within ~1 s.
        while True:
            await asyncio.sleep(1.0)
            self.failures.flush()

    async def _sweep_failure_files(self, files: FailureFiles) -> None:
        # Peers restarted in a loop (a new name each time) leave files behind: bounded here,
        # not only when this replica starts.
        while True:
            await asyncio.sleep(300.0)
            try:
                swept = await self._in_thread(self._io, files.sweep)
            except OSError as exc:
                self._log("failure_files.sweep_failed", error=str(exc))
                continue
            if swept:
                self._log("failure_files.swept", removed=swept)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _all_loaded(self) -> list[LoadedVersion]:
        live = [] if self.live is None else [s.loaded for s in self.live.all_slots]
        return live + list(self.draining)

    async def _in_thread(
        self, pool: ThreadPoolExecutor | None, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        if pool is None:
            raise RuntimeError("the gateway app is not running (lifespan not started)")
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    def _log(self, event: str, **fields: Any) -> None:
        # One JSON object per line; callers never pass secrets (tokens are never a field).
        logger.info(json.dumps({"ts": _now(), "event": event, **fields}, default=str))

    # -- auth ----------------------------------------------------------------------------------

    def _check(self, request: Request, role: Role) -> Principal | JSONResponse:
        principal = self.tokens.authenticate(request.headers.get("authorization"))
        client = request.client.host if request.client else None
        if principal is None:
            self._log("admin.denied", method=request.method, path=request.url.path, client=client)
            return JSONResponse(
                {"error": "missing or invalid admin token (Authorization: Bearer <token>)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not principal.may(role):
            self._log(
                "admin.forbidden",
                method=request.method,
                path=request.url.path,
                principal=principal.name,
                role=principal.role,
                needs=role,
            )
            return _error(
                403, f"this needs the {role} role; token {principal.name!r} is {principal.role}"
            )
        return principal

    def admin_endpoint(
        self, role: Role, handler: Callable[[Request, Principal], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            checked = self._check(request, role)
            if isinstance(checked, Response):
                return checked
            return await handler(request, checked)

        return endpoint

    # -- admin: deployment ---------------------------------------------------------------------

    async def get_deployment(self, request: Request, who: Principal) -> Response:
        live = self.live
        dep = None if live is None else live.deployment
        return JSONResponse(
            None if dep is None else dep.model_dump(mode="json"),
            # What a change conditional on this deployment sends back as If-Match.
            headers={"ETag": f'"{deployment_etag(dep)}"'},
        )

    async def put_deployment(self, request: Request, who: Principal) -> Response:
        started = time.perf_counter()
        try:
            body = await read_body(request, self.config.max_admin_body_bytes)
        except BadRequestError as exc:
            return _error(exc.status, exc.message)
        try:
            dep = Deployment.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors()
            status = 400 if errors and errors[0]["type"] == "json_invalid" else 422
            detail = _validation_detail(errors)
            self.metrics.deployments.labels("", "invalid").inc()
            self._log("deployment.invalid", status=status, detail=detail, principal=who.name)
            return _error(status, f"invalid deployment: {detail}")
        if dep.lease_expired(time.time()):
            return _error(422, "invalid deployment: its lease_expires_at has already passed")
        if any(s.fault for s in dep.versions()) and not who.may("admin"):
            return _error(403, f"injecting faults needs the admin role; {who.name!r} is {who.role}")
        if_match = request.headers.get("if-match", "")
        expect = None if "if-match" not in request.headers else parse_if_match(if_match)
        if expect is not None and not expect:
            return _error(
                400, f'malformed If-Match header {if_match[:200]!r}: want "tag", ... or *'
            )
        try:
            dep = await self.publish(dep, actor=who.name, expect=expect) or dep
        except PreconditionFailedError as exc:
            self.metrics.deployments.labels(dep.model, "precondition_failed").inc()
            self._log(
                "deployment.precondition_failed",
                expected=sorted(expect or ())[:8],  # bounded: the header is the client's
                current=exc.current,
                principal=who.name,
                **_summary(dep),
            )
            return _error(
                412,
                f"deployment not applied, the one in force stays: it is {exc.current}, not "
                f"what If-Match names ({if_match[:200]})",
                headers={"ETag": f'"{exc.current}"'},
            )
        except DeploymentRefusedError as exc:
            self.metrics.deployments.labels(dep.model, "refused").inc()
            self._log(
                "deployment.refused",
                status=exc.status,
                reason=exc.message,
                principal=who.name,
                **_summary(dep),
            )
            return _error(exc.status, f"deployment refused, previous one stays: {exc.message}")
        except DesiredStateError as exc:
            # 500: the source could not even be put back (the message says what to do).
            stays = "previous one stays here" if exc.status == 500 else "previous one stays"
            return _error(exc.status, f"deployment not recorded, {stays}: {exc.message}")
        self.metrics.deployments.labels(dep.model, "applied").inc()
        converged, total = await self._await_replicas(dep.fingerprint())
        self._log(
            "deployment.applied",
            seconds=round(time.perf_counter() - started, 4),
            principal=who.name,
            replicas=f"{converged}/{total}",
            **_summary(dep),
        )
        return JSONResponse(
            dep.model_dump(mode="json"), headers={REPLICAS_HEADER: f"{converged}/{total}"}
        )

    async def delete_deployment(self, request: Request, who: Principal) -> Response:
        try:
            await self.publish(None, actor=who.name)
        except DesiredStateError as exc:
            return _error(exc.status, f"not recorded, deployment stays: {exc.message}")
        converged, total = await self._await_replicas(None)
        self._log("deployment.cleared", principal=who.name, replicas=f"{converged}/{total}")
        return JSONResponse(None, headers={REPLICAS_HEADER: f"{converged}/{total}"})

    async def reload(self, request: Request, who: Principal) -> Response:
        if self.source is None:
            return _error(409, "this gateway has no desired-state source to reload from")
        self._refused = None  # an explicit reload retries a refused state at once
        await self.sync_once()
        return JSONResponse(self._replica_view())

    async def _lease_loop(self) -> None:
        """Drop a trial whose lease ran out (see ``Deployment.lease_expires_at``)."""
        while True:
            await asyncio.sleep(self.config.lease_check_s)
            live = self.live
            if live is not None and live.deployment.lease_expired(time.time()):
                try:
                    await self.expire_lease(live.deployment)
                except Exception as exc:  # keep checking; the next tick retries
                    self._log("deployment.lease_expiry_failed", error=repr(exc))

    async def expire_lease(self, expired: Deployment) -> None:
        """Serve ``expired`` without its trial here, and record that in the source."""
        async with self._deploy_lock:
            if self.live is None or self.live.deployment != expired:
                return  # changed meanwhile (renewed, promoted, rolled back)
            settled = expired.without_trial()
            await self._apply_locked(settled)  # the champion is loaded already: no load
            self.metrics.deployments.labels(expired.model, "lease_expired").inc()
            self._log(
                "deployment.lease_expired",
                expired_at=expired.lease_expires_at,
                dropped=[v.version for v in (expired.canary, expired.shadow) if v is not None],
                **({} if settled.champion is None else {"champion": settled.champion.version}),
            )
            # What this replica should serve is now the champion alone, source or not (without
            # one, desired is the last accepted PUT: the expired deployment). So readiness
            # holds at once, not after the next poll, or never without a source.
            if self.desired == expired:
                self.desired = settled
                self.sync_error = None
            await self._record_expiry(expired, settled)
        await self._report()

    async def _record_expiry(self, expired: Deployment, settled: Deployment) -> None:
        """Replace ``expired`` in the source by ``settled`` unless another replica did already."""
        if self.source is None:
            return
        actor = "gateway:lease-expired"
        try:
            # Compare and write in one step where the source can (the file, under its lock):
            # read, then publish, would overwrite a change another replica made in between.
            replace_if = getattr(self.source, "replace_if", None)
            if replace_if is not None:
                await self._in_thread(self._io, replace_if, expired, settled, actor=actor)
            elif expired.same_as(await self._in_thread(self._io, self.source.read)):
                await self._in_thread(self._io, self.source.publish, settled, actor=actor)
        except DesiredStateError as exc:
            # Harmless: every replica treats an expired lease in the source the same way.
            self._log("deployment.lease_record_failed", error=exc.message)

    async def _desired_now(self) -> Deployment | None:
        """The desired state every replica converges on: the source's, else what is live here."""
        if self.source is not None:
            return await self._in_thread(self._io, self.source.read)
        return None if self.live is None else self.live.deployment

    async def publish(
        self, dep: Deployment | None, *, actor: str, expect: frozenset[str] | None = None
    ) -> Deployment | None:
        """Apply ``dep`` here, then record it as the desired state for every replica; returns
        it as applied (at the paths the source resolved it to for this replica).

        Refused (:class:`DeploymentRefusedError`) or not recorded (:class:`DesiredStateError`):
        the deployment that was in force stays, here and in the source. With ``expect`` (an
        If-Match), only while the desired state has one of those tags
        (:func:`ballast.serving.precondition_holds`), else :class:`PreconditionFailedError`
        and nothing changes. A source with ``publish_if`` checks and writes in one step: the
        file under its lock; the registry, which has no conditional write, under a lock the
        replicas on one machine share and then one kept in the registry itself, which pods on
        other machines share too. Other sources are checked right before the write.
        """
        async with self._deploy_lock:
            previous = None if self.live is None else self.live.deployment
            if expect is not None:
                # Checked before anything loads: a change that lost the race costs nothing.
                current = await self._desired_now()
                if not precondition_holds(expect, current, time.time()):
                    raise PreconditionFailedError(deployment_etag(current))
            if dep is not None and self.source is not None:
                # Refuses what publish would refuse (a registry's aliases) before anything loads.
                dep = await self._in_thread(self._io, self.source.resolve, dep)
            elif dep is None and self.source is not None:
                # Serving nothing cannot fail to load: record it first, so a source that refuses
                # it (a registry always does) never leaves this replica serving nothing.
                await self._in_thread(self._io, self.source.publish, None, actor=actor)
            await self._apply_locked(dep)
            if self.source is not None and dep is not None:
                try:
                    await self._in_thread(self._io, self._record, dep, actor, expect)
                except BaseException:
                    # Whatever stopped the write (a refusal, a lost race, a bug, a cancel):
                    # this replica must not go on serving what no other replica will.
                    try:
                        await self._apply_locked(previous)
                    except DeploymentRefusedError as exc:  # pragma: no cover - loaded a moment ago
                        self._log("deployment.restore_failed", reason=exc.message)
                    raise
            self.desired = dep
            self.desired_known = True
            self.sync_error = None
            self._refused = None
        await self._report()
        return dep

    def _record(self, dep: Deployment, actor: str, expect: frozenset[str] | None) -> None:
        """Write ``dep`` to the source (in an I/O thread); with ``expect``, only while it holds."""
        assert self.source is not None
        if expect is None:
            self.source.publish(dep, actor=actor)
            return
        current: list[Deployment | None] = []

        def holds(desired: Deployment | None) -> bool:
            current.append(desired)
            return precondition_holds(expect, desired, time.time())

        publish_if = getattr(self.source, "publish_if", None)
        if publish_if is not None:
            if publish_if(holds, dep, actor=actor):
                return
        elif holds(self.source.read()):
            self.source.publish(dep, actor=actor)
            return
        raise PreconditionFailedError(deployment_etag(current[-1]))

    async def apply(self, dep: Deployment | None) -> None:
        """Verify, load and warm what ``dep`` needs, then swap it in atomically (no publish)."""
        async with self._deploy_lock:
            await self._apply_locked(dep)

    async def _apply_locked(self, dep: Deployment | None) -> None:
        """Any failure raises :class:`DeploymentRefusedError` before the swap, so the deployment
        in force stays untouched. Requests keep flowing meanwhile."""
        current = {
            v.version: v
            for v in ([] if self.live is None else [s.loaded for s in self.live.all_slots])
        }
        slots: dict[str, Slot] = {}
        fresh: list[LoadedVersion] = []
        if dep is not None:
            wanted = (("champion", dep.champion), ("canary", dep.canary), ("shadow", dep.shadow))
            try:
                for role, spec in wanted:
                    if spec is None:
                        continue
                    loaded = current.get(spec.version)
                    if loaded is None or identity(loaded.spec) != identity(spec):
                        loaded = await self._in_thread(self._loading, self._load, spec)
                        fresh.append(loaded)
                    slots[role] = Slot(role, spec, loaded)  # type: ignore[arg-type]
            except BaseException:
                # Loaded for a deployment that will not happen: never reachable, free it now.
                for version in fresh:
                    _close(version)
                raise
        for version in fresh:
            self._attach_batcher(dep.model if dep else "", version)
        previous = self.live
        if dep is None:
            self.live = None
            self.metrics.clear_deployment()
        else:
            self.live = Live(dep, slots.get("champion"), slots.get("canary"), slots.get("shadow"))
            self.metrics.set_deployment(
                dep.model,
                {s.loaded.version: s.role for s in self.live.all_slots},
                dep.canary_weight,
                dep.shadow_fraction,
            )
        kept = set() if self.live is None else {id(s.loaded) for s in self.live.all_slots}
        for old in () if previous is None else previous.all_slots:
            if id(old.loaded) not in kept:
                self._retire(old.loaded)

    def _attach_batcher(self, model: str, version: LoadedVersion) -> None:
        if self._inference is None:
            raise RuntimeError("the gateway app is not running (lifespan not started)")
        version.batcher = Batcher(
            version.version,
            version.predictor.predict,
            self.config.batch,
            self._inference,
            observe=partial(self.metrics.observe_batch, model, version.version),
            # ONNX Runtime here runs on the CPU only; TensorRT and AOTInductor may wait on a GPU.
            loop_ok=version.spec.backend == "onnxruntime",
        )
        # Per-class answers of this load, for /admin/stats (the watchdog's class shares).
        self.metrics.tally_classes(model, version.version, version.classes)

    def _load(self, spec: VersionSpec) -> LoadedVersion:
        return load_version(
            spec,
            loader=self.loader,
            intra_op_threads=self.config.intra_op_threads,
            seed=self.config.seed,
            window=self.config.stats_window,
            warm_batch=self.config.batch.max_batch_size,
        )

    def _retire(self, version: LoadedVersion) -> None:
        version.retired = True
        self.draining.append(version)
        self._spawn(self._unload_when_idle(version))

    async def _unload_when_idle(self, version: LoadedVersion) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.unload_timeout_s
        try:
            while version.inflight and loop.time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            self.draining.remove(version)
            if version.batcher is not None:
                version.batcher.fail_queued(f"version {version.version} was unloaded")
            _close(version)
            self._log(
                "version.unloaded",
                version=version.version,
                inflight=version.inflight,
                requests=version.requests,
            )

    # -- desired-state sync --------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        assert self.source is not None
        interval = self.source.poll_interval_s
        while True:
            try:
                await self.sync_once()
            except Exception as exc:  # never let the loop die: log and poll again
                self.sync_error = f"{type(exc).__name__}: {exc}"
                self._log("sync.failed", error=self.sync_error)
            await asyncio.sleep(interval)

    async def _heartbeat_loop(self) -> None:
        # Its own task, not a step of the sync loop: a load can take longer than the board's
        # staleness, and a replica busy loading must stay on the board (serving the old
        # fingerprint, unready), not vanish from it as if it had died.
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._report()

    async def sync_once(self) -> None:
        """Read the desired state and converge to it (no-op when already there)."""
        if self.source is None:
            return
        async with self._deploy_lock:
            try:
                desired = await self._in_thread(self._io, self.source.read)
            except DesiredStateError as exc:
                if self.sync_error != exc.message:
                    self._log("sync.unreadable", error=exc.message)
                self.sync_error = exc.message
                return
            if desired is not None and desired.lease_expired(time.time()):
                # The controller that held this trial is gone: never bring it back.
                expired, desired = desired, desired.without_trial()
                await self._record_expiry(expired, desired)
            self.desired = desired
            self.desired_known = True
            # Until this process first converges, what it applies is a (re)started replica
            # catching up with a deployment already in force, not a change: even when its first
            # try was refused or timed out and a later one succeeds.
            startup = self._startup_sync
            have = None if self.live is None else self.live.deployment.fingerprint()
            want = None if desired is None else desired.fingerprint()
            if want == have:
                self._startup_sync = False
                self.sync_error = None
                return
            now = time.monotonic()
            # Remembered with its paths: the same versions at a corrected path are worth a try.
            exact = None if desired is None else desired.model_dump_json()
            if self._refused is not None and self._refused[0] == exact and now < self._refused[1]:
                return
            started = time.perf_counter()
            try:
                await self._apply_locked(desired)
            except DeploymentRefusedError as exc:
                self._refused = (str(exact), now + self.config.refused_retry_s)
                self.sync_error = exc.message
                self.metrics.deployments.labels(desired.model if desired else "", "refused").inc()
                self._log("sync.refused", reason=exc.message, fingerprint=want)
                return
            self._refused = None
            self.sync_error = None
            self._startup_sync = False
            self.metrics.deployments.labels(
                desired.model if desired else "", "startup" if startup else "applied"
            ).inc()
            self._log(
                "sync.applied",
                fingerprint=want,
                seconds=round(time.perf_counter() - started, 4),
                **({} if desired is None else _summary(desired)),
            )
        await self._report()

    def _is_ready(self) -> tuple[bool, str]:
        live = self.live
        if not self.desired_known:
            return False, "desired state not read yet"
        if self.desired is not None and (
            live is None or live.deployment.fingerprint() != self.desired.fingerprint()
        ):
            why = f": {self.sync_error}" if self.sync_error else ""
            return False, f"the desired deployment is not loaded yet{why}"
        if live is None:
            return False, "no deployment set"
        if not live.slots:
            return False, f"the deployment of {live.model!r} has no versions"
        return True, ""

    def _status(self) -> ReplicaStatus:
        return ReplicaStatus(
            replica=self.replica_id,
            pid=os.getpid(),
            fingerprint=None if self.live is None else self.live.deployment.fingerprint(),
            ready=self._is_ready()[0],
            heartbeat=time.time(),
            started=self._started,
            error=self.sync_error,
            shadow=self._shadow_counts(),
            versions=self._versions_stats(self.live),
        )

    def _shadow_counts(self) -> dict[str, Any] | None:
        live = self.live
        shadow = None if live is None else live.shadow
        if shadow is None:
            return None
        v = shadow.loaded
        return {
            "version": v.version,
            "sha256": v.spec.sha256,
            "mirrored": v.mirrored,
            "rows": v.shadow_rows,
            "agree": v.shadow_agree,
            "failed": v.shadow_failed,
        }

    async def _report(self) -> None:
        if self.board is None or self._io is None:
            return
        try:
            await self._in_thread(self._io, self.board.report, self._status())
        except OSError as exc:
            self._log("replica.report_failed", error=str(exc))

    async def _await_replicas(self, fingerprint: str | None) -> tuple[int, int]:
        """Wait (bounded) until every other live replica serves ``fingerprint``."""
        if self.board is None or self._io is None:
            return 1, 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.converge_timeout_s
        # Every replica seen live during the wait stays counted: one whose heartbeat lapses
        # (a stalled process, a slow disk under the board) must read as not converged, not as
        # gone.
        expected: set[str] = set()
        while True:
            others = {
                s.replica: s
                for s in await self._in_thread(self._io, self.board.live)
                if s.replica != self.replica_id
            }
            expected |= set(others)
            converged = 1 + sum(
                r in others and others[r].fingerprint == fingerprint for r in expected
            )
            if converged == len(expected) + 1 or loop.time() >= deadline:
                return converged, len(expected) + 1
            await asyncio.sleep(0.02)

    def _replica_view(self) -> dict[str, Any]:
        ready, reason = self._is_ready()
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "ready": ready,
            "reason": reason or None,
            "fingerprint": None if self.live is None else self.live.deployment.fingerprint(),
            "desired": None if self.desired is None else self.desired.fingerprint(),
            "source": None if self.source is None else self.source.describe(),
            "error": self.sync_error,
        }

    async def replicas(self, request: Request, who: Principal) -> Response:
        board = [] if self.board is None else await self._in_thread(self._io, self.board.live)
        return JSONResponse(
            {
                "this": self._replica_view(),
                "replicas": [
                    {
                        "replica": s.replica,
                        "pid": s.pid,
                        "fingerprint": s.fingerprint,
                        "ready": s.ready,
                        "error": s.error,
                        "heartbeat_age_s": round(time.time() - s.heartbeat, 3),
                    }
                    for s in board
                ],
            }
        )

    async def watchdog_heartbeat(self, request: Request, who: Principal) -> Response:
        """The champion watchdog ran: record when, and its verdict, as gauges per model."""
        try:
            body = await read_body(request, _HEARTBEAT_MAX_BYTES)
        except BadRequestError as exc:
            return _error(exc.status, exc.message)
        try:
            beat = WatchdogHeartbeat.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors()
            status = 400 if errors and errors[0]["type"] == "json_invalid" else 422
            return _error(status, f"invalid heartbeat: {_validation_detail(errors)}")
        now = time.time()
        self.metrics.heartbeat(beat.model, beat.healthy, now)
        self._log(
            "watchdog.heartbeat",
            model=beat.model,
            healthy=beat.healthy,
            detail=beat.detail,
            principal=who.name,
        )
        return JSONResponse(
            {
                "model": beat.model,
                "healthy": beat.healthy,
                "ts": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            }
        )

    async def list_tokens(self, request: Request, who: Principal) -> Response:
        return JSONResponse(
            {"principals": [{"name": p.name, "role": p.role} for p in self.tokens.principals()]}
        )

    # -- admin: stats --------------------------------------------------------------------------

    def _versions_stats(self, live: Live | None) -> dict[str, Any]:
        """Per version ``live`` serves here: its counters since it was loaded (see stats)."""
        versions: dict[str, Any] = {}
        for slot in () if live is None else live.all_slots:
            v = slot.loaded
            b = v.batcher
            versions[v.version] = {
                "role": slot.role,
                "fault": slot.spec.fault,
                "requests": v.requests,
                "errors": v.errors,
                "client_errors": v.client_errors,
                "inflight": v.inflight,
                "window": len(v.latencies),
                "latency_ms": v.latency_ms(),
                "batches": 0 if b is None else b.batches,
                "queued_rows": 0 if b is None else b.queued_rows,
                # Where its batches run now, and the moving average of a model call's CPU
                # time that decides it (None until a call has been timed).
                "batching": None if b is None else ("loop" if b.on_loop() else "threads"),
                "model_call_us": None
                if b is None or b.call_us == float("inf")
                else round(b.call_us, 1),
                "loaded_at": datetime.fromtimestamp(v.loaded_at, UTC).isoformat(),
                # Rows answered 200 per predicted class since this load (same replica and
                # load as ``requests``): what the watchdog's class shares are taken from.
                "classes": {str(c): n for c, n in sorted(v.classes.items())},
            }
        return versions

    async def stats(self, request: Request, who: Principal) -> Response:
        board = [] if self.board is None else await self._in_thread(self._io, self.board.live)
        live = self.live  # after the await: one deployment for every field below
        return JSONResponse(
            {
                # Counters are per replica: say whose they are (callers keep one series each).
                "replica": self.replica_id,
                "model": None if live is None else live.model,
                "canary_weight": 0 if live is None else live.weight,
                "shadow_fraction": 0.0 if live is None else live.deployment.shadow_fraction,
                "versions": self._versions_stats(live),
                "draining": [v.version for v in self.draining],
                # The other live replicas' counters as their last heartbeat (HEARTBEAT_S) put
                # them on the board: the champion watchdog adds every replica's window up, so
                # one replica failing all its requests is not diluted by the healthy ones its
                # single answer would otherwise come from.
                "replicas": [
                    {"replica": r.replica, "versions": r.versions}
                    for r in board
                    if r.replica != self.replica_id and r.versions is not None
                ],
            }
        )

    def finish_request(
        self,
        live: Live,
        slot: Slot,
        route: str,
        status: int,
        started: float,
        rid: str,
        reason: str,
        detail: str | None,
        *,
        key_id: str | None = None,
        pinned: bool = False,
    ) -> None:
        """The bookkeeping of one routed request, whatever its route (``/v1`` or ``/v2``): the
        version's counters, ``/admin/observations``, the metrics, and a failure log line.

        ``key_id`` is the routing key's pseudonym (sticky routing); ``pinned`` a request that
        named its version (``/v2/models/M/versions/V/infer``).
        """
        version = slot.loaded
        version.inflight -= 1
        self.answered += 1
        elapsed = time.perf_counter() - started
        version.record(status, elapsed)
        # A cancelled request says nothing about the version; a pinned one was not routed by
        # the split, so the canary's judge (which reads the arm of each answer as drawn at the
        # weight) must not see it.
        # The champion refusing a width a candidate takes (422 version_mismatch): clients
        # ahead of the champion, not its failure; counted as one it loosened the canary's
        # error limit (the judge's baseline is the champion's failure rate).
        champion_refused = slot.role == "champion" and reason == "version_mismatch"
        if status != 499 and not pinned and not champion_refused:
            self._observed_seq += 1
            # 4xx are the client's mistakes (bad bodies), not the version's failures, except a
            # width this version refuses and another serving version takes (version_mismatch):
            # a candidate built for another input must not read as fast successes.
            ok = status < 500 and reason != "version_mismatch"
            self._observed.append(
                (self._observed_seq, version.version, slot.role, ok, elapsed, live.weight, key_id)
            )
        self.metrics.observe(live.model, version.version, slot.role, status, elapsed, route)
        if status != 200:
            self.request_failed(rid, live.model, slot, route, status, reason, detail)

    async def observations(self, request: Request, who: Principal) -> Response:
        """Answers this replica gave after a cursor: what a canary judges real traffic on.

        ``cursors`` is ``replica=seq,...``; this replica reads its own entry (the caller cannot
        know which replica a new connection reaches). Without one it only returns its current
        position (start watching from now). ``started`` changes when the replica restarts.
        """
        after: int | None = None
        keys = [k for k, _ in request.query_params.multi_items()]
        if set(keys) - {"cursors", "limit"} or len(keys) != len(set(keys)):
            return _error(400, "only cursors and limit, each at most once, are understood")
        raw = request.query_params.get("cursors", "")
        raw_limit = request.query_params.get("limit", "5000")
        # Exactly what the OpenAPI document promises, nothing looser.
        if not _CURSORS.fullmatch(raw) or not _LIMIT.fullmatch(raw_limit):
            return _error(
                400,
                "cursors must be replica=integer pairs (at most 19 digits) and limit an integer",
            )
        limit = int(raw_limit)
        if not 1 <= limit <= 20_000:
            return _error(400, "limit must lie in 1..20000")
        for item in filter(None, raw.split(",")):
            name, _, seq = item.partition("=")
            if name == self.replica_id:
                after = int(seq)
        obs = self._observed
        items: list[tuple[int, str, str, bool, float, int, str | None]] = []
        dropped = 0
        if after is not None and obs:
            oldest = obs[0][0]
            dropped = max(0, oldest - after - 1)
            # Clamped: a cursor past the end (up to 19 digits, beyond sys.maxsize) reads nothing.
            start = min(max(0, after + 1 - oldest), len(obs))
            items = list(islice(obs, start, start + limit))
        nxt = items[-1][0] if items else (self._observed_seq if after is None else after)
        return JSONResponse(
            {
                "replica": self.replica_id,
                "started": self._started,
                "model": None if self.live is None else self.live.model,
                "next": min(nxt, self._observed_seq),
                "dropped": dropped,
                "observations": [
                    [q, v, r, ok, round(t, 6), w, k] for q, v, r, ok, t, w, k in items
                ],
            }
        )

    async def failure_report(self, request: Request, who: Principal) -> Response:
        """This pod's fault report for one version: :func:`ballast.localise.localise` over
        every replica's failure files in the shared folder (``failure_dir``).

        ``model``, ``version`` and ``since`` (ISO 8601) are required; ``until`` (default: now),
        ``min_status`` (default 500) and ``context`` (raw lines around the first failure,
        default 20) are optional. The answer is ``FaultReport.to_dict()`` plus ``pod`` (this
        host's name) and ``replica``; a watchdog merges the pods' answers.
        """
        q = request.query_params
        keys = [k for k, _ in q.multi_items()]
        allowed = {"model", "version", "since", "until", "min_status", "context"}
        if set(keys) - allowed or len(keys) != len(set(keys)):
            return _error(400, f"only {', '.join(sorted(allowed))}, each at most once")
        model, version = q.get("model", ""), q.get("version", "")
        if not 1 <= len(model) <= 256 or not 1 <= len(version) <= 256:
            return _error(400, "model and version are required (1 to 256 characters)")
        try:
            since = _query_time(q.get("since"))
            until = _query_time(q.get("until")) if "until" in q else datetime.now(UTC)
        except ValueError as exc:
            return _error(400, str(exc))
        if since is None or until is None:
            return _error(400, "since is required (ISO 8601)")
        if until < since:
            return _error(400, "until is before since")
        raw_status, raw_context = q.get("min_status", "500"), q.get("context", "20")
        if not _SMALL_INT.fullmatch(raw_status) or not _SMALL_INT.fullmatch(raw_context):
            return _error(400, "min_status and context must be integers")
        min_status, context = int(raw_status), int(raw_context)
        if not 100 <= min_status <= 599 or not 0 <= context <= 200:
            return _error(400, "min_status must lie in 100..599 and context in 0..200")
        files = self.failure_files
        if files is None:
            return _error(409, "this gateway keeps no failure files (it has no state folder)")
        # One read at a time per replica: each costs CPU (tens of ms for a few MB of lines),
        # and a caller must not be able to stack them up against the serving loop.
        try:
            await asyncio.wait_for(
                self._failure_reads.acquire(), timeout=self.config.failure_read_wait_s
            )
        except TimeoutError:
            return _error(
                429, "another failure report is being read; try again", {"Retry-After": "1"}
            )
        try:
            # Off the loop, and not on the board's I/O thread: a late board report would read
            # as a dead replica.
            body = await asyncio.to_thread(
                _read_failures,
                files,
                self.replica_id,
                model,
                version,
                since,
                until,
                min_status,
                context,
            )
        finally:
            self._failure_reads.release()
        body["replica"] = self.replica_id
        return JSONResponse(body)

    async def shadow_report(self, request: Request, who: Principal) -> Response:
        live = self.live
        own = self._shadow_counts()
        body: dict[str, Any] = {"shadow": None}
        if live is not None and own is not None:
            # Every replica's counts (from the board, up to a heartbeat old), this one's as of
            # now: the connection reached one replica, the shadow's traffic reached them all.
            keys = ("mirrored", "rows", "agree", "failed")
            by_replica = {self.replica_id: {k: int(own[k]) for k in keys}}
            board = [] if self.board is None else await self._in_thread(self._io, self.board.live)
            for peer in board:
                theirs = peer.shadow
                if peer.replica == self.replica_id or not theirs:
                    continue
                if (theirs.get("version"), theirs.get("sha256")) != (own["version"], own["sha256"]):
                    continue  # a replica still on another shadow
                by_replica[peer.replica] = {k: int(theirs.get(k) or 0) for k in keys}
            total = {k: sum(c[k] for c in by_replica.values()) for k in keys}
            rows, agree = total["rows"], total["agree"]
            body = {
                "shadow": own["version"],
                "fraction": live.deployment.shadow_fraction,
                "mirrored": total["mirrored"],
                "rows_compared": rows,
                "rows_agreeing": agree,
                "agreement_rate": (agree / rows) if rows else None,
                "failed": total["failed"],
                "replicas": sorted(by_replica),
                # Per replica, so a reader reaching several boards (one per Kubernetes pod,
                # through a Service) can add them up without counting one twice.
                "by_replica": by_replica,
            }
        body["recent_disagreements"] = list(self.disagreements)
        return JSONResponse(body)

    # -- health, readiness, metrics, openapi ---------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        # ``instance``: the id its starter gave it (--instance), so the starter can tell its own
        # gateway from another server that answers on the same port.
        return JSONResponse({"status": "ok", "instance": self.config.instance or None})

    async def readyz(self, request: Request) -> Response:
        ready, reason = self._is_ready()
        live = self.live
        if not ready or live is None:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        # Versions enter a snapshot only after they were verified, loaded and warmed.
        versions = {s.loaded.version: s.role for s in live.all_slots}
        return JSONResponse({"ready": True, "model": live.model, "versions": versions})

    def serves(self) -> bool:
        """A verified, warmed version answers here now (the desired one may still be loading)."""
        return self.live is not None and bool(self.live.slots)

    def injected_error(self, slot: Slot) -> bool:
        """Whether this request to ``slot`` fails by its injected ``errors`` fault (drawn from
        the version's own seeded RNG)."""
        return (
            slot.spec.fault == "errors"
            and slot.loaded.fault_rng.random() < self.config.fault_error_rate
        )

    async def serving(self, request: Request) -> Response:
        """Takes traffic: serves a verified, warmed deployment, whether or not it is the desired
        one yet. What a load balancer's readiness check wants: ``/readyz`` turns 503 on every
        replica at once while a change loads (they all read it within a poll), though each
        keeps answering with what it has."""
        live = self.live
        if not self.serves():
            reason = "no deployment set" if live is None else "the deployment has no versions"
            return JSONResponse({"serving": False, "reason": reason}, status_code=503)
        assert live is not None
        desired, why = self._is_ready()
        body: dict[str, Any] = {
            "serving": True,
            "model": live.model,
            "versions": {s.loaded.version: s.role for s in live.all_slots},
            "desired_loaded": desired,
        }
        if not desired:
            body["reason"] = why
        return JSONResponse(body)

    async def metrics_text(self, request: Request) -> Response:
        self.metrics.flush()  # this replica's pending updates too (written every metrics_flush_s)
        body = await self._in_thread(self._io, self.metrics.render)
        return Response(body, media_type=self.metrics.content_type)

    async def openapi(self, request: Request) -> Response:
        # Rows are documented with the deployed model's feature count, when one is deployed.
        live = self.live
        slot = None if live is None or not live.slots else live.slots[0]
        return JSONResponse(openapi_document(None if slot is None else slot.loaded.n_features))

    # -- predict (plain ASGI: the hot path) ----------------------------------------------------

    async def predict(self, scope: Scope, receive: Receive, send: Send, model: str) -> None:
        started = time.perf_counter()
        ctype = length = key = accept = rid_header = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                ctype = value
            elif name == b"content-length":
                length = value
            elif name == b"x-ballast-key":
                key = value
            elif name == b"accept":
                accept = value
            elif name == b"x-request-id":
                rid_header = value
        rid = request_id(rid_header)
        rid_pair = (b"x-request-id", rid.encode())
        live = self.live
        try:
            if live is None or not live.slots:
                raise BadRequestError(503, "not_deployed", "no model version is deployed")
            if model != live.model:
                raise BadRequestError(
                    404, "unknown_model", f"unknown model {model!r}; serving {live.model!r}"
                )
            media = _media_type(ctype)
            npy = media == _NPY
            if media and not npy and media != b"application/json":
                raise BadRequestError(
                    415,
                    "unsupported_media_type",
                    f"content type {media.decode('latin-1')!r} is not supported: send "
                    f"application/json or {NPY_MEDIA_TYPE}",
                )
            body = await read_asgi_body(receive, length, self.config.max_body_bytes)
            if npy:
                x = parse_npy(body, self.config.max_rows)
            else:
                x = parse_instances(body, self.config.max_rows)
            # Reading the body awaited: a deployment may have swapped in meanwhile and retired
            # the versions of the first snapshot. Route on the one in force now.
            live = self.live
            if live is None or not live.slots:
                raise BadRequestError(503, "not_deployed", "no model version is deployed")
            if model != live.model:
                raise BadRequestError(
                    404, "unknown_model", f"unknown model {model!r}; serving {live.model!r}"
                )
        except BadRequestError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self.request_failed(rid, model, None, "predict", exc.status, exc.reason)
            await _send(
                send, exc.status, dumps({"error": exc.message}), b"application/json", [rid_pair]
            )
            return
        except ClientGoneError:
            return
        key_id = None if key is None else live.key_id(key.decode("latin-1"))
        slot = live.route(key_id, self._rng)
        assert slot is not None  # live.slots is not empty
        version = slot.loaded
        version.inflight += 1
        status = 499  # stays so only if the request is cancelled (client gone, shutdown)
        reason, detail = "cancelled", None
        try:
            status, body_out, media, reason, detail = await self._answer(live, slot, x, accept)
            headers = [
                (b"x-ballast-version", version.version.encode()),
                (b"x-ballast-role", slot.role.encode()),
                rid_pair,
            ]
            await _send(send, status, body_out, media, headers)
        finally:
            self.finish_request(
                live, slot, "predict", status, started, rid, reason, detail, key_id=key_id
            )

    async def _answer(
        self, live: Live, slot: Slot, x: np.ndarray, accept: bytes | None
    ) -> tuple[int, bytes, bytes, str, str | None]:
        """(status, body, media type, failure reason, failure detail for the log)."""
        version = slot.loaded
        try:
            logits = await self.infer(live, slot, x)
        except BadRequestError as exc:
            return (
                exc.status,
                dumps({"error": exc.message}),
                b"application/json",
                exc.reason,
                exc.detail,
            )
        try:
            if accept is not None and _media_type(accept) == _NPY:
                out, media = encode_probabilities_npy(logits, x.shape[0]), _NPY
            else:
                out = encode_prediction(version.version, logits, x.shape[0])
                media = b"application/json"
        except ValueError as exc:  # bad shape (500), or not finite: 422 or 500 (output_error)
            err = output_error(version.version, x, logits, exc)
            return (
                err.status,
                dumps({"error": err.message}),
                b"application/json",
                err.reason,
                err.detail,
            )
        # Encoding checked the shape ([rows, classes], finite): count the answered classes.
        self.metrics.observe_predictions(live.model, version.version, slot.role, logits)
        return 200, out, media, "", None

    def request_failed(
        self,
        rid: str,
        model: str,
        slot: Slot | None,
        route: str,
        status: int,
        reason: str,
        detail: str | None = None,
    ) -> None:
        """One bounded log line (:mod:`.faillog`) for an inference request answered non-2xx.

        ``slot`` is None when no version was chosen (the request was refused before routing).
        """
        self.failures.record(
            request_id=rid,
            model=model[:128],
            version=None if slot is None else slot.loaded.version,
            role=None if slot is None else slot.role,
            route=route,
            status=status,
            reason=reason,
            error=detail,
        )

    async def infer(self, live: Live, slot: Slot, x: np.ndarray) -> np.ndarray:
        """Logits of ``slot`` for ``x``: fault injection, the version's batcher, shadow mirror.

        Shared by the predict route and the Open Inference Protocol routes (:mod:`.oip`).
        Any answer other than 200 raises :class:`BadRequestError` with its HTTP status.
        """
        version = slot.loaded
        if x.shape[1] != version.n_features:
            msg = f"version {version.version} takes {version.n_features} features, got {x.shape[1]}"
            # The client's mistake (422), unless another version serving now takes this width:
            # then a candidate (canary) cannot serve the deployment's traffic, a server error
            # (500) that its error rate, the canary's error-budget alerts and the judge count (a
            # 422 read as the client's: a canary refusing all its traffic kept a clean error
            # rate). The champion refusing the width a candidate takes is still the client's
            # request, 422, and the judge leaves it out: neither version's failure.
            if any(s.loaded.n_features == x.shape[1] for s in live.slots):
                status = 422 if slot.role == "champion" else 500
                raise BadRequestError(status, "version_mismatch", msg)
            raise BadRequestError(422, "feature_mismatch", msg)
        fault = slot.spec.fault
        if self.injected_error(slot):
            raise BadRequestError(500, "injected_fault", "injected fault")
        if fault == "latency":
            await asyncio.sleep(self.config.fault_latency_s)
        batcher = version.batcher
        assert batcher is not None  # attached before the version was published
        try:
            future = batcher.submit(x)
        except OverloadedError as exc:
            raise BadRequestError(503, "overloaded", f"overloaded, retry later: {exc}") from None
        shadow = live.shadow
        if (
            shadow is not None
            # ``live`` is the deployment this request was routed on; across an injected
            # latency sleep its shadow may have been retired and unloaded since.
            and not shadow.loaded.retired
            and live.deployment.shadow_fraction > 0
            and self._shadow_rng.random() < live.deployment.shadow_fraction
        ):
            self._mirror(live, shadow, version, x, future)
        try:
            return await future
        except BatchFailedError as exc:
            cause = exc.__cause__ or exc
            raise BadRequestError(
                exc.status, "inference_failed", exc.message, f"{type(cause).__name__}: {cause}"
            ) from None

    # -- shadow --------------------------------------------------------------------------------

    def _mirror(
        self,
        live: Live,
        shadow: Slot,
        primary: LoadedVersion,
        x: np.ndarray,
        primary_future: asyncio.Future[np.ndarray],
    ) -> None:
        sv = shadow.loaded
        model = live.model
        if x.shape[1] != sv.n_features:
            # A request the primary serves and the shadow cannot take is the shadow's failure:
            # skipped silently, a candidate built for another input width would look
            # "inconclusive" and go on to the weight steps.
            sv.mirrored += 1
            sv.shadow_failed += 1
            self.metrics.shadow_skipped.labels(model, sv.version, "incompatible").inc()
            return
        if self.injected_error(shadow):
            # The fault is this version's wherever its traffic comes from: the shadow phase
            # must see it as the weight steps would (it passed every injected fault before).
            sv.mirrored += 1
            sv.shadow_failed += 1
            self.metrics.shadow_skipped.labels(model, sv.version, "failed").inc()
            return
        batcher = sv.batcher
        assert batcher is not None
        if batcher.queued_rows >= self.config.shadow_max_queue_rows:
            self.metrics.shadow_skipped.labels(model, sv.version, "busy").inc()
            return
        try:
            shadow_future = batcher.submit(x)
        except OverloadedError:
            self.metrics.shadow_skipped.labels(model, sv.version, "busy").inc()
            return
        sv.mirrored += 1
        sv.inflight += 1  # keeps the shadow loaded until its answer is compared
        pending = [True]

        def compared(_: object) -> None:
            # Both callbacks may run after both futures are done: compare exactly once.
            if not (pending[0] and shadow_future.done() and primary_future.done()):
                return
            pending[0] = False
            sv.inflight -= 1
            self._compare(model, sv, primary, x, primary_future, shadow_future)

        # Whichever finishes last runs the comparison; the primary's answer never waits for it.
        shadow_future.add_done_callback(compared)
        primary_future.add_done_callback(compared)

    def _compare(
        self,
        model: str,
        sv: LoadedVersion,
        primary: LoadedVersion,
        x: np.ndarray,
        primary_future: asyncio.Future[np.ndarray],
        shadow_future: asyncio.Future[np.ndarray],
    ) -> None:
        # Retrieve both outcomes first, so no failed future is left unobserved.
        p_failed = primary_future.cancelled() or primary_future.exception() is not None
        s_failed = shadow_future.cancelled() or shadow_future.exception() is not None
        if p_failed:
            return  # nothing to compare with
        if s_failed:
            sv.shadow_failed += 1
            self.metrics.shadow_skipped.labels(model, sv.version, "failed").inc()
            return
        rows = x.shape[0]
        try:
            p_cls, p_prob = softmax(primary_future.result(), rows)
        except ValueError:
            return  # the primary's answer is bad (its own request counts that): nothing to compare
        try:
            s_cls, s_prob = softmax(shadow_future.result(), rows)
        except ValueError as exc:
            # Non-finite output for an extreme input is the client's doing, not the shadow's.
            if output_error(sv.version, x, shadow_future.result(), exc).status < 500:
                self.metrics.shadow_skipped.labels(model, sv.version, "input_overflow").inc()
                return
            sv.shadow_failed += 1
            self.metrics.shadow_skipped.labels(model, sv.version, "failed").inc()
            return
        if np.shape(s_prob) != np.shape(p_prob):
            # Another number of classes: its answers cannot replace the primary's (another
            # serving shape), so they fail, before anything is counted as agreement.
            sv.shadow_failed += 1
            self.metrics.shadow_skipped.labels(model, sv.version, "failed").inc()
            return
        agree = sum(a == b for a, b in zip(p_cls, s_cls, strict=True))
        sv.shadow_rows += rows
        sv.shadow_agree += agree
        m = self.metrics
        if agree:
            m.shadow.labels(model, sv.version, primary.version, "true").inc(agree)
        if agree < rows:
            m.shadow.labels(model, sv.version, primary.version, "false").inc(rows - agree)
        diffs = np.abs(np.asarray(p_prob) - np.asarray(s_prob)).max(axis=1)
        hist = m.shadow_diff.labels(model, sv.version)
        for d in diffs.tolist():
            hist.observe(d)
        for i in range(rows):
            if p_cls[i] != s_cls[i]:
                self.disagreements.append(
                    {
                        "ts": _now(),
                        "primary": primary.version,
                        "shadow": sv.version,
                        "primary_class": p_cls[i],
                        "shadow_class": s_cls[i],
                        "max_abs_prob_diff": round(float(diffs[i]), 6),
                        "input": x[i].tolist(),
                    }
                )


def _media_type(value: bytes | None) -> bytes:
    if not value:
        return b""
    return value.split(b";", 1)[0].strip().lower()


async def _send(
    send: Send, status: int, body: bytes, media: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", media),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, obj: Any) -> None:
    await _send(send, status, dumps(obj), b"application/json", [])


def _close(version: LoadedVersion) -> None:
    # Dropping the last reference frees an ORT session; a backend holding explicit resources
    # (a GPU engine) may also offer close().
    close = getattr(version.predictor, "close", None)
    if callable(close):
        close()


def _summary(dep: Deployment) -> dict[str, Any]:
    return {
        "model": dep.model,
        "champion": dep.champion.version if dep.champion else None,
        "canary": dep.canary.version if dep.canary else None,
        "canary_weight": dep.canary_weight,
        "shadow": dep.shadow.version if dep.shadow else None,
        "shadow_fraction": dep.shadow_fraction,
        "faults": {s.version: s.fault for s in dep.versions() if s.fault},
    }


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(500, "internal error")


class GatewayApp:
    """The ASGI app: predict requests go straight to the gateway, the rest to Starlette."""

    def __init__(self, gateway: Gateway, router: Starlette) -> None:
        self.gateway = gateway
        self.router = router
        self.state = router.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(_PREDICT_PREFIX) and path.endswith(_PREDICT_SUFFIX):
                model = path[len(_PREDICT_PREFIX) : -len(_PREDICT_SUFFIX)]
                if model and "/" not in model:
                    if scope["method"] != "POST":
                        await _send(
                            send,
                            405,
                            dumps({"error": "Method Not Allowed"}),
                            b"application/json",
                            [(b"allow", b"POST")],
                        )
                        return
                    try:
                        await self.gateway.predict(scope, receive, send, model)
                    except Exception:
                        # Nothing may escape as a dropped connection; log and answer 500 if
                        # nothing was sent yet (uvicorn closes the connection otherwise).
                        logger.exception("predict handler failed")
                        with contextlib.suppress(Exception):  # the response had started
                            await _send_json(send, 500, {"error": "internal error"})
                    return
            # -- Open Inference Protocol (KServe v2) routes: plain ASGI, see infra/gateway/oip.py
            if path == _OIP_ROOT or path.startswith(_OIP_PREFIX):
                await oip.dispatch(self.gateway, scope, receive, send)
                return
        await self.router(scope, receive, send)


def create_app(
    config: GatewayConfig,
    *,
    loader: Loader | None = None,
    source: DesiredStateSource | None = None,
    board: ReplicaBoard | None = None,
) -> GatewayApp:
    """A new gateway app with its own state and metrics registry (``app.state.gateway``).

    With a ``source`` the replica converges to the desired state it reads there (and an admin
    PUT publishes to it); with a ``board`` it reports its status for its peers.
    """
    if loader is None:
        loader = partial(_default_loader, probe=config.probe_native_loads)
    gw = Gateway(config, loader=loader, source=source, board=board)
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: _http_error,
        Exception: _server_error,
    }
    routes = [
        Route("/healthz", gw.healthz, methods=["GET"]),
        Route("/readyz", gw.readyz, methods=["GET"]),
        Route("/readyz/serving", gw.serving, methods=["GET"]),
        Route("/metrics", gw.metrics_text, methods=["GET"]),
        Route("/openapi.json", gw.openapi, methods=["GET"]),
    ]
    for r in ADMIN_ROUTES:
        routes.append(
            Route(r.path, gw.admin_endpoint(r.role, getattr(gw, r.handler)), methods=[r.method])
        )
    router = Starlette(routes=routes, exception_handlers=handlers, lifespan=gw.lifespan)
    router.state.gateway = gw
    return GatewayApp(gw, router)
