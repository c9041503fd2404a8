"""Predict bodies in and out: JSON (``{"instances": [[...], ...]}``) and ``application/x-npy``.

Everything here is pure and raises :class:`BadRequestError` (a 4xx with a clear message) for any
input it refuses, so a request is fully validated before it can join a batch.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.types import Receive

__all__ = [
    "EXTREME_INPUT",
    "BadRequestError",
    "NonFiniteOutputError",
    "encode_prediction",
    "encode_probabilities_npy",
    "holds_bool",
    "output_error",
    "parse_instances",
    "parse_npy",
    "request_id",
]

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


class BadRequestError(Exception):
    """A request refused before any version saw it; ``reason`` labels the metric.

    ``detail`` is for the log only (an exception's type and text), never for the client.
    """

    def __init__(self, status: int, reason: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.detail = detail


# A client's X-Request-Id is echoed and logged: bounded, and only characters that need no
# escaping anywhere (headers, JSON, a shell). Anything else is replaced by one of ours.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:=+/-]{1,128}")


# Request ids correlate log lines; they guard nothing, so a seeded-from-the-OS PRNG will do.
# os.urandom costs a syscall that drops the GIL on the hot path (the inference threads then
# take it), measurably slower under load.
_ids = random.Random(os.urandom(16))


def request_id(header: bytes | None) -> str:
    """The client's ``X-Request-Id`` when it is safe to reuse, else a fresh random one."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header.decode("ascii")
    return f"{_ids.getrandbits(64):016x}"


_SHAPE_HINT = 'expected {"instances": [[number, ...], ...]}'


_F32_MAX = float(np.finfo(np.float32).max)


_U, _L = ord("u"), ord("l")


def holds_bool(values: list[Any]) -> bool:
    """Whether a (nested) list holds a JSON boolean anywhere. numpy turns ``[true, 2.5]`` into
    ``[1.0, 2.5]``, so a dtype check alone misses booleans mixed with numbers. Callers walk
    only bodies that may hold one (a byte search first), which keeps it off the hot path."""
    return any(type(v) is bool or (type(v) is list and holds_bool(v)) for v in values)


def parse_instances(body: bytes, max_rows: int) -> np.ndarray:
    """Parse and validate a JSON predict body into float32 ``[rows, features]``."""
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
    # Strings, nulls, objects or booleans are refused; numpy would coerce some of them.
    # A body of numbers under the key "instances" holds neither "u" nor "l"; "true" and
    # "false" do. Two memchr byte searches (tens of ns) keep the walk off the hot path.
    if arr.dtype.kind not in "iuf" or ((_U in body or _L in body) and holds_bool(instances)):
        raise BadRequestError(422, "invalid_instances", "instances must hold only numbers")
    # The documented limit is float32's largest finite value, checked before the cast rounds
    # a slightly larger number down to it. One reduction: NaN makes the maximum NaN, which
    # compares false, as does infinity; within range the cast cannot overflow.
    if not np.abs(arr).max() <= _F32_MAX:
        raise BadRequestError(422, "invalid_instances", "instances must be finite float32 numbers")
    return arr.astype(np.float32)


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HINT = "expected one 2-D float32 array [rows, features] in .npy format (numpy.save)"


def parse_npy(body: bytes, max_rows: int) -> np.ndarray:
    """Parse and validate an ``application/x-npy`` body into float32 ``[rows, features]``.

    The header is read with ``ast.literal_eval`` (as NumPy does) and checked before any data is
    touched; pickled object arrays are never loaded.
    """
    if len(body) < 10 or not body.startswith(_NPY_MAGIC):
        raise BadRequestError(400, "malformed_npy", f"body is not an .npy array: {_NPY_HINT}")
    major = body[6]
    if major == 1:
        hlen, start = int.from_bytes(body[8:10], "little"), 10
    elif major in (2, 3) and len(body) >= 12:
        hlen, start = int.from_bytes(body[8:12], "little"), 12
    else:
        raise BadRequestError(400, "malformed_npy", f"unsupported .npy version {major}")
    if hlen > 4096 or start + hlen > len(body):
        raise BadRequestError(400, "malformed_npy", "truncated or oversized .npy header")
    # The header is untrusted (if bounded) text: whatever literal_eval or np.dtype raise for it
    # (ValueError, SyntaxError, TypeError for an unhashable key, RecursionError, ...) is the
    # client's malformed body, never a server error.
    try:
        header = ast.literal_eval(body[start : start + hlen].decode("latin-1"))
    except Exception:
        raise BadRequestError(400, "malformed_npy", "unreadable .npy header") from None
    if (
        not isinstance(header, dict)
        or set(header) != {"descr", "fortran_order", "shape"}
        or not isinstance(header["descr"], str)
        or not isinstance(header["fortran_order"], bool)
        or not isinstance(header["shape"], tuple)
        # Bounded: literal_eval reads hex, and a 4 KB header can hold an int whose decimal
        # form is longer than Python will print (a ValueError in every message below).
        or not all(type(d) is int and 0 <= d < 2**63 for d in header["shape"])
    ):
        raise BadRequestError(400, "malformed_npy", "invalid .npy header")
    shape: tuple[int, ...] = header["shape"]
    try:
        dtype = np.dtype(header["descr"])
    except Exception:
        raise BadRequestError(400, "malformed_npy", "invalid dtype in .npy header") from None
    if dtype != np.dtype("<f4") and dtype != np.dtype("=f4"):
        raise BadRequestError(
            422, "invalid_dtype", f"array dtype must be float32 ('<f4'), got {dtype.str!r}"
        )
    if len(shape) != 2:
        raise BadRequestError(422, "invalid_shape", f"array must be 2-D, got shape {shape}")
    rows, features = shape
    if rows == 0 or features == 0:
        raise BadRequestError(422, "invalid_shape", f"array must not be empty, got shape {shape}")
    if rows > max_rows:
        raise BadRequestError(
            422, "too_many_rows", f"{rows} rows exceed the limit of {max_rows} per request"
        )
    data = memoryview(body)[start + hlen :]
    expected = rows * features * 4
    if len(data) != expected:
        raise BadRequestError(
            400,
            "malformed_npy",
            f"array data is {len(data)} bytes, shape {shape} float32 needs {expected}",
        )
    flat = np.frombuffer(data, dtype="<f4")
    x = flat.reshape((rows, features), order="F" if header["fortran_order"] else "C")
    if not np.isfinite(x).all():
        raise BadRequestError(422, "invalid_instances", "array must hold only finite numbers")
    return np.ascontiguousarray(x, dtype=np.float32)


class NonFiniteOutputError(ValueError):
    """The model answered NaN or infinity (a :class:`ValueError`, like any other bad output)."""


# Whose fault is a non-finite answer? Inputs are checked to be finite float32, but a model
# multiplies and sums them: a feature whose square overflows float32 (|x| > ~1.8e19) can make
# any model overflow, while for smaller inputs only a gain beyond 1e19 could, which no sane
# model has. So NaN or infinity in the answer to a row holding such a feature is the client's
# doing (422, a client error); for any other row it is the version's failure (500), so a model
# that answers NaN to ordinary input cannot pass its failures off as the clients'.
EXTREME_INPUT = math.sqrt(_F32_MAX)


def output_error(
    version: str, x: np.ndarray, logits: np.ndarray, exc: ValueError
) -> BadRequestError:
    """The answer to a request whose output did not encode (``exc``): 422 when every row that
    came out non-finite had an extreme input (rule above), else 500 from ``version``.

    Runs only on the failure path: the successful path pays nothing for the distinction.
    """
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, NonFiniteOutputError):
        bad = ~np.isfinite(np.asarray(logits, dtype=np.float64)).all(axis=1)
        if bad.any() and (np.abs(x[bad]).max(axis=1) > EXTREME_INPUT).all():
            return BadRequestError(
                422,
                "input_overflow",
                f"version {version} overflowed float32 on this input (its answer is not finite): "
                f"features beyond ±{EXTREME_INPUT:.3g} are outside what models are served for",
                detail,
            )
    return BadRequestError(500, "bad_output", f"version {version} failed to predict", detail)


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


def softmax(logits: np.ndarray, rows: int) -> tuple[list[int], list[list[float]]]:
    """Argmax class and softmax probabilities (float64) per row; ValueError on a bad output."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != rows or logits.shape[1] < 1:
        raise ValueError(f"model returned shape {logits.shape} for {rows} rows")
    if logits.size <= _SMALL_OUTPUT:
        values = logits.tolist()
        if not all(math.isfinite(v) for row in values for v in row):
            raise NonFiniteOutputError("model returned non-finite logits")
        return _softmax_rows(values)
    wide = logits.astype(np.float64)
    if not np.isfinite(wide).all():
        raise NonFiniteOutputError("model returned non-finite logits")
    exp = np.exp(wide - wide.max(axis=1, keepdims=True))
    return wide.argmax(axis=1).tolist(), (exp / exp.sum(axis=1, keepdims=True)).tolist()


def encode_prediction(version: str, logits: np.ndarray, rows: int) -> bytes:
    """The PredictResponse body: argmax class and softmax probabilities (float64) per row."""
    preds, probs = softmax(logits, rows)
    return _dumps({"version": version, "predictions": preds, "probabilities": probs})


def encode_probabilities_npy(logits: np.ndarray, rows: int) -> bytes:
    """Softmax probabilities as one float32 ``[rows, classes]`` .npy array."""
    _, probs = softmax(logits, rows)
    arr = np.asarray(probs, dtype="<f4")
    header = repr({"descr": "<f4", "fortran_order": False, "shape": arr.shape}).encode("latin-1")
    # Version 1.0 layout: magic, version, header length, header padded to a multiple of 64.
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return _NPY_MAGIC + b"\x01\x00" + len(header).to_bytes(2, "little") + header + arr.tobytes()


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (orjson when present)."""
    return _dumps(obj)


def loads(body: bytes) -> Any:
    """Parse JSON bytes (orjson when present); ValueError on malformed input."""
    return _loads(body)


class ClientGoneError(Exception):
    """The client disconnected before its request body arrived."""


async def read_asgi_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole request body; 400/413 on a bad or oversized length, ClientGoneError if it left."""
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequestError(400, "bad_length", "invalid Content-Length header") from None
        if length > limit:
            raise BadRequestError(413, "too_large", f"body of {length} bytes exceeds {limit} bytes")
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGoneError
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BadRequestError(413, "too_large", f"body exceeds {limit} bytes")
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequestError(413, "too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
