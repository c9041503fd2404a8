"""The Open Inference Protocol (KServe v2 REST) beside Ballast's own routes.

Triton's, KServe's and MLServer's clients and load tools speak it, so they work against the
gateway unchanged:

- ``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``;
- ``GET /v2/models/{name}[/versions/{v}]`` (metadata) and ``.../ready``;
- ``POST /v2/models/{name}/infer``: the same router (canary weight, sticky ``X-Ballast-Key``,
  shadow) and the same batcher as ``/v1/models/{name}/predict``;
- ``POST /v2/models/{name}/versions/{v}/infer``: pinned to a serving version, no split.

Tensors come as JSON ``data`` (flat or nested) or through the binary tensor data extension
(``Inference-Header-Content-Length``: a JSON header, then raw little-endian bytes). The
signature is one ``input`` FP32 ``[-1, features]`` and one ``logits`` FP32 ``[-1, classes]``.
Parsing (:func:`parse_infer_request`) and encoding (:func:`encode_infer_response`) are pure;
every refusal is a :class:`BadRequestError` answered with the protocol's ``{"error": "..."}``.

Served as plain ASGI, like the predict route: it is a hot path too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from infra.gateway.versions import Live, Slot
from infra.gateway.wire import (
    BadRequestError,
    ClientGoneError,
    NonFiniteOutputError,
    dumps,
    holds_bool,
    loads,
    output_error,
    read_asgi_body,
    request_id,
)

if TYPE_CHECKING:
    from infra.gateway.app import Gateway

__all__ = [
    "BINARY_HEADER",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "InferRequest",
    "dispatch",
    "encode_infer_response",
    "model_metadata",
    "parse_infer_request",
]

logger = logging.getLogger("ballast.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DATATYPE = "FP32"
#: The binary tensor data extension's header: length of the JSON part of the body.
BINARY_HEADER = "Inference-Header-Content-Length"
_BINARY_HEADER = BINARY_HEADER.lower().encode()
_JSON = b"application/json"
_OCTETS = b"application/octet-stream"
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
_SERVER_NAME = "ballast-gateway"
_EXTENSIONS = ["binary_tensor_data"]
# Up to this many logits the finiteness check runs in plain Python (as wire.softmax's does).
_SMALL_OUTPUT = 64


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A validated infer request: float32 rows, and how the answer is to be encoded."""

    x: np.ndarray  # float32 [rows, features]
    id: str | None
    binary_output: bool  # logits as raw bytes after the JSON header


class _MethodNotAllowedError(BadRequestError):
    def __init__(self, allowed: str) -> None:
        super().__init__(405, "method_not_allowed", "Method Not Allowed")
        self.allowed = allowed


def _bad(message: str, status: int = 400, reason: str = "oip_invalid") -> BadRequestError:
    return BadRequestError(status, reason, message)


def _flag(params: Any, key: str, where: str) -> bool | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise _bad(f"{where}.parameters must be a JSON object")
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(f"{where}.parameters.{key} must be true or false, got {value!r}")
    return value


def parse_infer_request(
    body: bytes, header_length: int | None, n_features: int, max_rows: int
) -> InferRequest:
    """Validate an infer body against the signature (``input`` FP32 ``[-1, n_features]``).

    ``header_length`` is the ``Inference-Header-Content-Length`` value (binary extension) or
    None for a JSON-only body. Raises :class:`BadRequestError` (400) saying what is wrong.
    """
    if header_length is None:
        header, rest = body, b""
    else:
        if header_length < 0 or header_length > len(body):
            raise _bad(f"{BINARY_HEADER} is {header_length} but the body has {len(body)} bytes")
        header, rest = body[:header_length], body[header_length:]
    try:
        payload = loads(header)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"request header is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _bad("the request must be a JSON object with 'inputs'")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    binary_all = _flag(payload.get("parameters"), "binary_data_output", "request")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad(f"'inputs' must be a non-empty list; this model takes one input {INPUT_NAME!r}")
    offset = 0
    x: np.ndarray | None = None
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise _bad(f"{where} must be a JSON object")
        name = tensor.get("name")
        if name != INPUT_NAME:
            raise _bad(f"unknown input {name!r}: this model takes one input {INPUT_NAME!r}")
        if x is not None:
            raise _bad(f"input {INPUT_NAME!r} is given more than once")
        datatype = tensor.get("datatype")
        if datatype != DATATYPE:
            raise _bad(f"input {INPUT_NAME!r} has datatype {datatype!r}, the model takes FP32")
        shape = tensor.get("shape")
        want = f"[n, {n_features}] with 1 <= n <= {max_rows}"
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(type(d) is int for d in shape)
            or not 1 <= shape[0] <= max_rows
            or shape[1] != n_features
        ):
            raise _bad(f"input {INPUT_NAME!r} has shape {shape!r}, the model takes {want}")
        rows = shape[0]
        size = _binary_size(tensor.get("parameters"), where)
        if size is not None:
            if "data" in tensor:
                raise _bad(f"input {INPUT_NAME!r} has both 'data' and binary_data_size")
            expected = rows * n_features * 4
            if size != expected:
                raise _bad(
                    f"input {INPUT_NAME!r}: binary_data_size is {size} bytes, "
                    f"shape {shape} FP32 needs {expected}"
                )
            if offset + size > len(rest):
                raise _bad(
                    f"input {INPUT_NAME!r}: binary data truncated, {len(rest) - offset} bytes "
                    f"after the header, {size} needed"
                )
            flat = np.frombuffer(rest, dtype="<f4", count=rows * n_features, offset=offset)
            offset += size
            x = flat.reshape(rows, n_features).astype(np.float32)
        else:
            x = _json_tensor(
                tensor.get("data"), rows, n_features, bools=b"true" in header or b"false" in header
            )
        if not np.isfinite(x).all():
            raise _bad(f"input {INPUT_NAME!r} must hold only finite numbers")
    if offset != len(rest):
        raise _bad(f"{len(rest) - offset} bytes of binary data after the header belong to no input")
    assert x is not None  # inputs is not empty and each one sets x or raises
    binary_output = _outputs(payload.get("outputs"), binary_all)
    return InferRequest(x=x, id=request_id, binary_output=binary_output)


def _binary_size(params: Any, where: str) -> int | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise _bad(f"{where}.parameters must be a JSON object")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise _bad(f"{where}.parameters.binary_data_size must be a byte count, got {size!r}")
    return size


def _json_tensor(data: Any, rows: int, n_features: int, *, bools: bool = True) -> np.ndarray:
    """``data`` as float32 ``[rows, n_features]``; ``bools``: the body may hold a boolean."""
    if not isinstance(data, list):
        raise _bad(f"input {INPUT_NAME!r} needs 'data' (a list) or binary_data_size")
    try:
        arr = np.array(data)
    except (ValueError, TypeError, RecursionError):  # ragged or absurdly deep nesting
        raise _bad(f"input {INPUT_NAME!r}: 'data' must be a flat or regular nested list") from None
    # Bools, strings and nulls are refused: numpy would coerce some of them to numbers.
    if arr.size and (arr.dtype.kind not in "iuf" or (bools and holds_bool(data))):
        raise _bad(f"input {INPUT_NAME!r}: 'data' must hold only numbers (FP32)")
    if arr.ndim > 1 and arr.shape != (rows, n_features):
        raise _bad(
            f"input {INPUT_NAME!r}: nested 'data' has shape {list(arr.shape)}, "
            f"declared shape is {[rows, n_features]}"
        )
    if arr.size != rows * n_features:
        raise _bad(
            f"input {INPUT_NAME!r}: 'data' holds {arr.size} values, "
            f"shape {[rows, n_features]} needs {rows * n_features}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.reshape(rows, n_features).astype(np.float32)


def _outputs(outputs: Any, binary_all: bool | None) -> bool:
    """Whether ``logits`` goes out as binary; unknown requested outputs are refused."""
    binary = bool(binary_all)
    if outputs is None:
        return binary
    if not isinstance(outputs, list):
        raise _bad("'outputs' must be a list")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or out.get("name") != OUTPUT_NAME:
            name = out.get("name") if isinstance(out, dict) else out
            raise _bad(f"unknown output {name!r}: this model has one output {OUTPUT_NAME!r}")
        own = _flag(out.get("parameters"), "binary_data", f"outputs[{i}]")
        if own is not None:
            binary = own
    return binary


def encode_infer_response(
    model: str, version: str, request: InferRequest, logits: np.ndarray
) -> tuple[bytes, int | None]:
    """The response body and, for binary output, the length of its JSON header."""
    logits = np.asarray(logits, dtype="<f4")
    rows = request.x.shape[0]
    if logits.ndim != 2 or logits.shape[0] != rows:
        raise ValueError(f"model returned shape {logits.shape} for {rows} rows")
    flat = logits.ravel()
    values: list[float] | None = None
    if flat.size <= _SMALL_OUTPUT:  # batch 1's few logits: Python beats numpy's call overhead
        values = flat.tolist()
        finite = all(map(math.isfinite, values))
    else:
        finite = bool(np.isfinite(flat).all())
    if not finite:  # JSON would carry null, binary NaN: neither is an answer
        raise NonFiniteOutputError("model returned non-finite logits")
    output: dict[str, Any] = {
        "name": OUTPUT_NAME,
        "datatype": DATATYPE,
        "shape": list(logits.shape),
    }
    raw = b""
    if request.binary_output:
        raw = logits.tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = flat.tolist() if values is None else values
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": [output]}
    if request.id is not None:
        body["id"] = request.id
    header = dumps(body)
    if not request.binary_output:
        return header, None
    return header + raw, len(header)


def model_metadata(live: Live, slots: tuple[Slot, ...], classes: int) -> dict[str, Any]:
    """The protocol's model metadata for ``slots`` (the first one gives the signature)."""
    first = slots[0].loaded
    return {
        "name": live.model,
        "versions": [s.loaded.version for s in slots],
        "platform": _PLATFORMS.get(first.spec.backend, f"ballast_{first.spec.backend}"),
        "inputs": [{"name": INPUT_NAME, "datatype": DATATYPE, "shape": [-1, first.n_features]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": DATATYPE, "shape": [-1, classes]}],
    }


async def _send(
    send: Send, status: int, body: bytes, media: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [(b"content-type", media), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, obj: Any) -> None:
    await _send(send, status, dumps(obj), _JSON, [])


def _serving(gw: Gateway, model: str, version: str | None) -> tuple[Live, tuple[Slot, ...]]:
    """The live snapshot and the serving slots for ``model`` (one, when pinned to ``version``)."""
    live = gw.live
    if live is None or not live.slots:
        raise BadRequestError(503, "not_deployed", "no model version is deployed")
    if model != live.model:
        raise BadRequestError(
            404, "unknown_model", f"unknown model {model!r}; serving {live.model!r}"
        )
    if version is None:
        return live, live.slots
    for slot in live.slots:
        if slot.loaded.version == version:
            return live, (slot,)
    serving = [s.loaded.version for s in live.slots]
    raise BadRequestError(
        404,
        "unknown_version",
        f"model {model!r} has no serving version {version!r}; serving {serving}",
    )


async def dispatch(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one request whose path is ``/v2`` or under ``/v2/``."""
    parts = [p for p in scope["path"].split("/") if p][1:]  # without the leading "v2"
    method = scope["method"]
    try:
        if parts and parts[0] == "models" and len(parts) >= 2:
            model, rest = parts[1], parts[2:]
            version = None
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = rest[1], rest[2:]
            if rest == ["infer"]:
                _allow(method, "POST")
                await _infer(gw, scope, receive, send, model, version)
                return
            if rest in ([], ["ready"]):
                _allow(method, "GET")
                if rest:
                    await _model_ready(gw, send, model, version)
                else:
                    live, slots = _serving(gw, model, version)
                    # Learnt at warm-up: asking the version's batcher instead sent a request
                    # that no unload waited for (the version could go while it ran).
                    classes = slots[0].loaded.n_classes
                    await _send_json(send, 200, model_metadata(live, slots, classes))
                return
        elif parts in ([], ["health", "live"], ["health", "ready"]):
            _allow(method, "GET")
            if not parts:
                body = {"name": _SERVER_NAME, "version": "2", "extensions": _EXTENSIONS}
                await _send_json(send, 200, body)
            elif parts[1] == "live":
                await _send_json(send, 200, {"live": True})
            else:
                # Ready for inferencing (the protocol's meaning): serving a verified version,
                # as /readyz/serving, even while a change loads (/readyz would say 503 on every
                # replica at once then).
                ready = gw.serves()
                state: dict[str, Any] = {"ready": ready}
                if not ready:
                    state["reason"] = "no model version is served"
                await _send_json(send, 200 if ready else 503, state)
            return
        raise BadRequestError(404, "not_found", f"no such route {scope['path']!r}")
    except BadRequestError as exc:
        gw.metrics.rejected.labels(exc.reason).inc()
        allow = exc.allowed if isinstance(exc, _MethodNotAllowedError) else None
        extra = [] if allow is None else [(b"allow", allow.encode())]
        await _send(send, exc.status, dumps({"error": exc.message}), _JSON, extra)
    except Exception:
        # Nothing may escape as a dropped connection (as on the predict route): log, answer 500
        # unless the response had started.
        logger.exception("open inference protocol handler failed")
        with contextlib.suppress(Exception):
            await _send_json(send, 500, {"error": "internal error"})


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _MethodNotAllowedError(allowed)


async def _model_ready(gw: Gateway, send: Send, model: str, version: str | None) -> None:
    # Served (loaded, verified, warmed) means ready for inferencing, whether or not a change of
    # deployment is loading meanwhile; 404 / 503 when it is not served.
    _serving(gw, model, version)
    body: dict[str, Any] = {"name": model, "ready": True}
    if version is not None:
        body["version"] = version
    await _send_json(send, 200, body)


def _as_another_version_reads_it(
    body: bytes, header_length: int | None, live: Live, slot: Slot, gw: Gateway
) -> InferRequest | None:
    """The request parsed at the width of another version serving now, or None."""
    widths = {s.loaded.n_features for s in live.slots} - {slot.loaded.n_features}
    for width in sorted(widths):
        try:
            return parse_infer_request(body, header_length, width, gw.config.max_rows)
        except BadRequestError:
            continue
    return None


async def _infer(
    gw: Gateway, scope: Scope, receive: Receive, send: Send, model: str, version: str | None
) -> None:
    started = time.perf_counter()
    key = header_length = rid_header = None
    length_header: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"x-ballast-key":
            key = value.decode("latin-1")
        elif name == _BINARY_HEADER:
            length_header = value
        elif name == b"x-request-id":
            rid_header = value
    rid = request_id(rid_header)
    rid_pair = (b"x-request-id", rid.encode())
    slot: Slot | None = None
    try:
        if length_header is not None:
            try:
                header_length = int(length_header)
            except ValueError:
                raise _bad(f"invalid {BINARY_HEADER} header {length_header!r}") from None
        live, slots = _serving(gw, model, version)
        body = await read_asgi_body(receive, None, gw.config.max_body_bytes)
        # Awaiting the body may have let a deployment swap in and retire what the first
        # snapshot held: route on the deployment in force now, never on a version being
        # unloaded.
        live, slots = _serving(gw, model, version)
        # Pinned: that version. Else the predict route's router: canary weight, sticky key.
        key_id = None if key is None or version is not None else live.key_id(key)
        slot = slots[0] if version is not None else live.route(key_id, gw._rng)
        assert slot is not None  # live.slots is not empty
        try:
            request = parse_infer_request(
                body, header_length, slot.loaded.n_features, gw.config.max_rows
            )
        except BadRequestError:
            # Fit for another serving version (a canary built for another input width): the
            # routed version's failure, which gw.infer answers 500 version_mismatch and
            # records against it, as on the predict route; not the client's mistake.
            other = _as_another_version_reads_it(body, header_length, live, slot, gw)
            if other is None:
                raise
            request = other
    except BadRequestError as exc:
        gw.metrics.rejected.labels(exc.reason).inc()
        # The client's request, not a version's doing (as on the predict route).
        gw.request_failed(rid, model, None, "oip_infer", exc.status, exc.reason)
        await _send(send, exc.status, dumps({"error": exc.message}), _JSON, [rid_pair])
        return
    except ClientGoneError:
        return  # the client left
    loaded = slot.loaded
    loaded.inflight += 1
    status = 499  # stays so only if the request is cancelled (client gone, shutdown)
    reason, detail = "cancelled", None
    try:
        extra = [
            (b"x-ballast-version", loaded.version.encode()),
            (b"x-ballast-role", slot.role.encode()),
            rid_pair,
        ]
        try:
            logits = await gw.infer(live, slot, request.x)
        except BadRequestError as exc:
            status, reason, detail = exc.status, exc.reason, exc.detail
            await _send(send, status, dumps({"error": exc.message}), _JSON, extra)
            return
        try:
            out, json_length = encode_infer_response(model, loaded.version, request, logits)
        except ValueError as exc:  # bad shape: 500; not finite: 422 or 500 (output_error)
            err = output_error(loaded.version, request.x, logits, exc)
            status, reason, detail = err.status, err.reason, err.detail
            await _send(send, status, dumps({"error": err.message}), _JSON, extra)
            return
        gw.metrics.observe_predictions(live.model, loaded.version, slot.role, np.asarray(logits))
        status = 200
        if json_length is None:
            await _send(send, status, out, _JSON, extra)
        else:
            extra.append((_BINARY_HEADER, str(json_length).encode()))
            await _send(send, status, out, _OCTETS, extra)
    finally:
        gw.finish_request(
            live,
            slot,
            "oip_infer",
            status,
            started,
            rid,
            reason,
            detail,
            key_id=key_id,
            pinned=version is not None,
        )
