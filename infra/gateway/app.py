"""The gateway's ASGI app: admin API, weighted/sticky predict routing, health, metrics, faults.

Build it with :func:`create_app`; ``python -m infra.gateway`` serves it with uvicorn. All mutable
state lives on one :class:`Gateway` object per app, touched only from the event loop thread;
inference and artefact loading run in worker threads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ballast.runtime import Predictor, load_predictor
from ballast.serving import Deployment, VersionSpec
from ballast.settings import Settings
from infra.gateway.metrics import GatewayMetrics
from infra.gateway.versions import (
    DeploymentRefusedError,
    Live,
    LoadedVersion,
    Loader,
    Role,
    Slot,
    identity,
    load_version,
)

__all__ = [
    "KEY_HEADER",
    "ROLE_HEADER",
    "VERSION_HEADER",
    "Gateway",
    "GatewayConfig",
    "create_app",
]

VERSION_HEADER = "X-Ballast-Version"
ROLE_HEADER = "X-Ballast-Role"
KEY_HEADER = "X-Ballast-Key"

logger = logging.getLogger("ballast.gateway")

T = TypeVar("T")

try:  # orjson parses a 30-float body ~10x faster than json; it comes with prefect, not promised.
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - exercised only where orjson is absent
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


# Below this many logits the softmax runs in plain Python: numpy's per-call overhead dominates
# at batch 1, where the gateway spends most of its time.
_SMALL_OUTPUT = 64


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything a gateway needs; :meth:`from_settings` maps ``BALLAST_*`` settings onto it."""

    admin_token: str
    # 4096 rows x 30 features of full-precision JSON floats is about 2.6 MB.
    max_body_bytes: int = 8 << 20
    max_admin_body_bytes: int = 1 << 20
    max_rows: int = 4096  # PredictRequest's own bound
    seed: int = 0
    # ORT threads per session: 1 because the server's own threads need the other cores.
    intra_op_threads: int = 1
    # Concurrent inferences; ORT releases the GIL, so about the core count is the useful ceiling.
    inference_threads: int = 2
    stats_window: int = 2048
    fault_error_rate: float = 0.3
    fault_latency_s: float = 0.060
    # A retired version is unloaded when its in-flight requests finish, or after this long.
    unload_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.admin_token:
            raise ValueError("the gateway needs a non-empty admin token")
        if self.inference_threads < 1 or self.max_rows < 1 or self.stats_window < 1:
            raise ValueError("inference_threads, max_rows and stats_window must be >= 1")

    @classmethod
    def from_settings(cls, s: Settings, **overrides: Any) -> GatewayConfig:
        return cls(admin_token=s.admin_token(), intra_op_threads=s.gateway_threads, **overrides)


class BadRequestError(Exception):
    """A request refused before any version saw it; ``reason`` labels the metric."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


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


_SHAPE_HINT = 'expected {"instances": [[number, ...], ...]}'


def parse_instances(body: bytes, max_rows: int) -> np.ndarray:
    """Parse and validate a predict body into float32 ``[rows, features]``; raise BadRequestError."""
    try:
        payload = _loads(body)
    except (ValueError, RecursionError) as exc:  # orjson's and UnicodeDecodeError are ValueErrors
        raise BadRequestError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequestError(
            422, "invalid_instances", f"body must be a JSON object: {_SHAPE_HINT}"
        )
    unexpected = sorted(set(payload) - {"instances"})
    if unexpected:
        raise BadRequestError(
            422, "invalid_instances", f"unexpected field(s) {unexpected}: {_SHAPE_HINT}"
        )
    instances = payload.get("instances")
    if not isinstance(instances, list):
        raise BadRequestError(
            422, "invalid_instances", f"'instances' must be a list: {_SHAPE_HINT}"
        )
    if not instances:
        raise BadRequestError(422, "invalid_instances", "'instances' must hold at least one row")
    if len(instances) > max_rows:
        raise BadRequestError(
            422,
            "too_many_rows",
            f"{len(instances)} rows exceed the limit of {max_rows} per request",
        )
    if not all(isinstance(row, list) for row in instances):
        raise BadRequestError(
            422, "invalid_instances", f"each instance must be a list: {_SHAPE_HINT}"
        )
    try:
        arr = np.array(instances)
    except (ValueError, TypeError):  # ragged rows, or nested lists of different depth
        raise BadRequestError(
            422, "invalid_instances", "rows must be flat lists of numbers of the same length"
        ) from None
    if arr.ndim != 2:
        raise BadRequestError(422, "invalid_instances", "rows must be flat lists of numbers")
    if arr.shape[1] == 0:
        raise BadRequestError(422, "invalid_instances", "rows must hold at least one feature")
    # Strings, nulls, objects or all-boolean rows are refused; numpy would coerce some of them.
    if arr.dtype.kind not in "iuf":
        raise BadRequestError(422, "invalid_instances", "instances must hold only numbers")
    with np.errstate(over="ignore", invalid="ignore"):
        x = arr.astype(np.float32)
    if not np.isfinite(x).all():
        raise BadRequestError(422, "invalid_instances", "instances must be finite float32 numbers")
    return x


def _softmax_rows(rows: list[list[float]]) -> tuple[list[int], list[list[float]]]:
    preds: list[int] = []
    probs: list[list[float]] = []
    for row in rows:
        top = max(row)
        exp = [math.exp(v - top) for v in row]  # shifted by the max: no overflow
        total = sum(exp)
        preds.append(row.index(top))  # first maximum, as numpy's argmax
        probs.append([e / total for e in exp])
    return preds, probs


def encode_prediction(version: str, logits: np.ndarray, rows: int) -> bytes:
    """The PredictResponse body: argmax class and softmax probabilities (float64) per row."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != rows or logits.shape[1] < 1:
        raise ValueError(f"model returned shape {logits.shape} for {rows} rows")
    if logits.size <= _SMALL_OUTPUT:
        values = logits.tolist()
        if not all(math.isfinite(v) for row in values for v in row):
            raise ValueError("model returned non-finite logits")
        preds, probs = _softmax_rows(values)
    else:
        wide = logits.astype(np.float64)
        if not np.isfinite(wide).all():
            raise ValueError("model returned non-finite logits")
        exp = np.exp(wide - wide.max(axis=1, keepdims=True))
        preds = wide.argmax(axis=1).tolist()
        probs = (exp / exp.sum(axis=1, keepdims=True)).tolist()
    return _dumps({"version": version, "predictions": preds, "probabilities": probs})


def _default_loader(path: Path, backend: str, intra_op_threads: int) -> Predictor:
    return load_predictor(path, backend, intra_op_threads=intra_op_threads)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(eq=False)
class Gateway:
    """State and handlers of one gateway. Mutated only on the event loop thread."""

    config: GatewayConfig
    loader: Loader = _default_loader
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    live: Live | None = None
    draining: list[LoadedVersion] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._token = self.config.admin_token.encode()
        self._rng = random.Random(self.config.seed)
        self._deploy_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inference: ThreadPoolExecutor | None = None
        self._loading: ThreadPoolExecutor | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # Own pools: inference gets a fixed number of threads (no oversubscription of the cores),
        # and a slow artefact load never queues behind, or ahead of, user requests.
        self._inference = ThreadPoolExecutor(
            self.config.inference_threads, thread_name_prefix="gateway-infer"
        )
        self._loading = ThreadPoolExecutor(1, thread_name_prefix="gateway-load")
        self._log("gateway.started", inference_threads=self.config.inference_threads)
        try:
            yield
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._inference.shutdown(wait=True)
            self._loading.shutdown(wait=True)
            self._log("gateway.stopped")

    async def _in_thread(
        self, pool: ThreadPoolExecutor | None, fn: Callable[..., T], *args: Any
    ) -> T:
        if pool is None:
            raise RuntimeError("the gateway app is not running (lifespan not started)")
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _log(self, event: str, **fields: Any) -> None:
        # One JSON object per line; callers never pass secrets (the token is never a field).
        logger.info(json.dumps({"ts": _now(), "event": event, **fields}, default=str))

    # -- admin ---------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant-time compare: response timing must not reveal how much of a guess matched.
        return hmac.compare_digest(token.strip().encode("latin-1"), self._token)

    def _denied(self, request: Request) -> JSONResponse:
        client = request.client.host if request.client else None
        self._log("admin.denied", method=request.method, path=request.url.path, client=client)
        return JSONResponse(
            {"error": "missing or invalid admin token (Authorization: Bearer <token>)"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def get_deployment(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._denied(request)
        live = self.live
        return JSONResponse(None if live is None else live.deployment.model_dump(mode="json"))

    async def put_deployment(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._denied(request)
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
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:8]
            )
            self.metrics.deployments.labels("", "invalid").inc()
            self._log("deployment.invalid", status=status, detail=detail)
            return _error(status, f"invalid deployment: {detail}")
        try:
            await self.apply(dep)
        except DeploymentRefusedError as exc:
            self.metrics.deployments.labels(dep.model, "refused").inc()
            self._log("deployment.refused", status=exc.status, reason=exc.message, **_summary(dep))
            return _error(exc.status, f"deployment refused, previous one stays: {exc.message}")
        self.metrics.deployments.labels(dep.model, "applied").inc()
        self._log(
            "deployment.applied", seconds=round(time.perf_counter() - started, 4), **_summary(dep)
        )
        return JSONResponse(dep.model_dump(mode="json"))

    async def apply(self, dep: Deployment) -> None:
        """Verify, load and warm what ``dep`` needs, then swap it in atomically.

        Any failure raises :class:`DeploymentRefusedError` before the swap, so the deployment
        in force stays untouched. Changes are serialised; requests keep flowing meanwhile.
        """
        async with self._deploy_lock:
            current = (
                {} if self.live is None else {s.loaded.version: s.loaded for s in self.live.slots}
            )
            wanted: tuple[tuple[Role, VersionSpec | None], ...] = (
                ("champion", dep.champion),
                ("canary", dep.canary),
            )
            slots: dict[str, Slot] = {}
            fresh: list[LoadedVersion] = []
            try:
                for role, spec in wanted:
                    if spec is None:
                        continue
                    loaded = current.get(spec.version)
                    if loaded is None or identity(loaded.spec) != identity(spec):
                        loaded = await self._in_thread(self._loading, self._load, spec)
                        fresh.append(loaded)
                    slots[role] = Slot(role, spec, loaded)
            except BaseException:
                # Loaded for a deployment that will not happen: never reachable, free it now.
                for version in fresh:
                    _close(version)
                raise
            previous = self.live
            self.live = Live(dep, slots.get("champion"), slots.get("canary"))
            self.metrics.set_deployment(
                dep.model, {s.loaded.version: s.role for s in self.live.slots}, dep.canary_weight
            )
            kept = {id(s.loaded) for s in self.live.slots}
            for old in () if previous is None else previous.slots:
                if id(old.loaded) not in kept:
                    self._retire(old.loaded)

    def _load(self, spec: VersionSpec) -> LoadedVersion:
        return load_version(
            spec,
            loader=self.loader,
            intra_op_threads=self.config.intra_op_threads,
            seed=self.config.seed,
            window=self.config.stats_window,
        )

    def _retire(self, version: LoadedVersion) -> None:
        self.draining.append(version)
        task = asyncio.get_running_loop().create_task(self._unload_when_idle(version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload_when_idle(self, version: LoadedVersion) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.unload_timeout_s
        try:
            while version.inflight and loop.time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            self.draining.remove(version)
            _close(version)
            self._log(
                "version.unloaded",
                version=version.version,
                inflight=version.inflight,
                requests=version.requests,
            )

    async def stats(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._denied(request)
        live = self.live
        versions: dict[str, Any] = {}
        for slot in () if live is None else live.slots:
            v = slot.loaded
            versions[v.version] = {
                "role": slot.role,
                "fault": slot.spec.fault,
                "requests": v.requests,
                "errors": v.errors,
                "client_errors": v.client_errors,
                "inflight": v.inflight,
                "window": len(v.latencies),
                "latency_ms": v.latency_ms(),
                "loaded_at": datetime.fromtimestamp(v.loaded_at, UTC).isoformat(),
            }
        return JSONResponse(
            {
                "model": None if live is None else live.model,
                "canary_weight": 0 if live is None else live.weight,
                "versions": versions,
                "draining": [v.version for v in self.draining],
            }
        )

    # -- health and metrics --------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        live = self.live
        if live is None:
            return JSONResponse({"ready": False, "reason": "no deployment set"}, status_code=503)
        if not live.slots:
            reason = f"the deployment of {live.model!r} has no versions"
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        # Versions enter a snapshot only after they were verified, loaded and warmed.
        versions = {s.loaded.version: s.role for s in live.slots}
        return JSONResponse({"ready": True, "model": live.model, "versions": versions})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # -- predict -------------------------------------------------------------------------------

    def _reject(self, exc: BadRequestError) -> JSONResponse:
        self.metrics.rejected.labels(exc.reason).inc()
        return _error(exc.status, exc.message)

    async def predict(self, request: Request) -> Response:
        started = time.perf_counter()
        live = self.live
        model = request.path_params["model"]
        if live is None or not live.slots:
            return self._reject(
                BadRequestError(503, "not_deployed", "no model version is deployed")
            )
        if model != live.model:
            return self._reject(
                BadRequestError(
                    404, "unknown_model", f"unknown model {model!r}; serving {live.model!r}"
                )
            )
        try:
            x = parse_instances(
                await read_body(request, self.config.max_body_bytes), self.config.max_rows
            )
        except BadRequestError as exc:
            return self._reject(exc)
        slot = live.route(request.headers.get(KEY_HEADER), self._rng)
        assert slot is not None  # live.slots is not empty
        version = slot.loaded
        version.inflight += 1
        status = 499  # stays so only if the request is cancelled (client gone, shutdown)
        try:
            response = await self._answer(slot, x)
            status = response.status_code
            return response
        finally:
            version.inflight -= 1
            elapsed = time.perf_counter() - started
            version.record(status, elapsed)
            self.metrics.observe(live.model, version.version, slot.role, status, elapsed)

    async def _answer(self, slot: Slot, x: np.ndarray) -> Response:
        version = slot.loaded
        headers = {VERSION_HEADER: version.version, ROLE_HEADER: slot.role}
        if x.shape[1] != version.n_features:
            msg = f"version {version.version} takes {version.n_features} features, got {x.shape[1]}"
            return _error(422, msg, headers)
        fault = slot.spec.fault
        if fault == "errors" and version.fault_rng.random() < self.config.fault_error_rate:
            return _error(500, "injected fault", headers)
        if fault == "latency":
            await asyncio.sleep(self.config.fault_latency_s)
        try:
            logits = await self._in_thread(self._inference, version.predictor.predict, x)
            body = encode_prediction(version.version, logits, x.shape[0])
        except Exception as exc:
            self._log_inference_failure(version.version, exc)
            return _error(500, f"version {version.version} failed to predict", headers)
        return Response(body, media_type="application/json", headers=headers)

    def _log_inference_failure(self, version: str, exc: Exception) -> None:
        logger.warning(
            json.dumps(
                {
                    "ts": _now(),
                    "event": "predict.failed",
                    "version": version,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
        )


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
        "faults": {s.version: s.fault for s in (dep.champion, dep.canary) if s and s.fault},
    }


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(500, "internal error")


def create_app(config: GatewayConfig, *, loader: Loader | None = None) -> Starlette:
    """A new gateway app with its own state and metrics registry (``app.state.gateway``)."""
    gw = Gateway(config, loader=loader or _default_loader)
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: _http_error,
        Exception: _server_error,
    }
    app = Starlette(
        routes=[
            Route("/healthz", gw.healthz, methods=["GET"]),
            Route("/readyz", gw.readyz, methods=["GET"]),
            Route("/metrics", gw.metrics_text, methods=["GET"]),
            Route("/admin/deployment", gw.get_deployment, methods=["GET"]),
            Route("/admin/deployment", gw.put_deployment, methods=["PUT"]),
            Route("/admin/stats", gw.stats, methods=["GET"]),
            Route("/v1/models/{model}/predict", gw.predict, methods=["POST"]),
        ],
        exception_handlers=handlers,
        lifespan=gw.lifespan,
    )
    app.state.gateway = gw
    return app
