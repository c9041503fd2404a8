"""Boundaries of the gateway's body parsing and encoding (infra/gateway/wire.py) that a
mutation-testing pass found unchecked (2026-11-29): row and size limits taken inclusively,
float32's largest value, .npy versions 2.0/3.0 and the header-length bound."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import numpy as np
import pytest

from infra.gateway.wire import (
    EXTREME_INPUT,
    BadRequestError,
    NonFiniteOutputError,
    encode_probabilities_npy,
    output_error,
    parse_instances,
    parse_npy,
    read_asgi_body,
)

F32_MAX = float(np.finfo(np.float32).max)


def npy(arr: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version)
    return buf.getvalue()


def npy_v1(header: str, data: bytes) -> bytes:
    """A version 1.0 body with ``header`` verbatim (its declared length is len(header))."""
    raw = header.encode("latin-1")
    return b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + data


def refused(fn: Any, *args: Any) -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        fn(*args)
    return info.value


# -- JSON bodies ----------------------------------------------------------------------------------


def test_json_row_limit_is_inclusive() -> None:
    body = json.dumps({"instances": [[1.0], [2.0], [3.0]]}).encode()
    assert parse_instances(body, 3).tolist() == [[1.0], [2.0], [3.0]]
    err = refused(parse_instances, body, 2)
    assert (err.status, err.reason) == (422, "too_many_rows")


def test_float32_max_itself_is_accepted() -> None:
    # The documented limit is float32's largest finite value: it is in range, the next one is not.
    x = parse_instances(json.dumps({"instances": [[F32_MAX, -F32_MAX]]}).encode(), 10)
    assert x.dtype == np.float32
    assert x.tolist() == [[F32_MAX, -F32_MAX]]
    err = refused(parse_instances, json.dumps({"instances": [[F32_MAX * 1.0001]]}).encode(), 10)
    assert (err.status, err.reason) == (422, "invalid_instances")


def test_a_unicode_escaped_key_is_still_instances() -> None:
    # Valid JSON holding a "u" (an escape) but no boolean: no refusal for the byte alone.
    assert parse_instances(b'{"\\u0069nstances": [[1, 2]]}', 10).tolist() == [[1.0, 2.0]]


# -- .npy bodies ----------------------------------------------------------------------------------


def test_npy_row_limit_is_inclusive() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert parse_npy(npy(arr), 3).tolist() == arr.tolist()
    err = refused(parse_npy, npy(arr), 2)
    assert (err.status, err.reason) == (422, "too_many_rows")


@pytest.mark.parametrize("version", [(2, 0), (3, 0)])
def test_npy_versions_2_and_3_are_read(version: tuple[int, int]) -> None:
    arr = np.array([[1.5, -2.0, 3.25], [4.0, 5.0, 6.0]], dtype=np.float32)
    body = npy(arr, version)
    assert body[6] == version[0]
    x = parse_npy(body, 10)
    assert x.dtype == np.float32
    assert x.tolist() == arr.tolist()


def test_npy_version_2_needs_its_four_byte_header_length() -> None:
    # 11 bytes: long enough for a 1.0 preamble, one byte short of a 2.0 one.
    err = refused(parse_npy, b"\x93NUMPY\x02\x00\x00\x00\x00", 10)
    assert (err.status, err.reason) == (400, "malformed_npy")
    assert err.message == "unsupported .npy version 2"


def test_an_unknown_npy_version_is_refused() -> None:
    # A well-formed 2.0 body relabelled 4.0: the layout is unknown, so it is not read.
    body = bytearray(npy(np.ones((1, 2), dtype=np.float32), (2, 0)))
    body[6] = 4
    err = refused(parse_npy, bytes(body), 10)
    assert (err.status, err.reason, err.message) == (
        400,
        "malformed_npy",
        "unsupported .npy version 4",
    )


@pytest.mark.parametrize("body", [b"\x93NUMPY", b"\x93NUMPY\x01\x00\x10"])
def test_a_body_shorter_than_the_npy_preamble_is_refused(body: bytes) -> None:
    err = refused(parse_npy, body, 10)
    assert (err.status, err.reason) == (400, "malformed_npy")
    assert err.message.startswith("body is not an .npy array")


def test_npy_header_of_exactly_4096_bytes_is_read() -> None:
    head = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2)}"
    data = np.array([[7.0, 8.0]], dtype="<f4").tobytes()
    ok = npy_v1(head.ljust(4095) + "\n", data)
    assert parse_npy(ok, 10).tolist() == [[7.0, 8.0]]
    err = refused(parse_npy, npy_v1(head.ljust(4096) + "\n", data), 10)
    assert (err.status, err.reason, err.message) == (
        400,
        "malformed_npy",
        "truncated or oversized .npy header",
    )


def test_npy_header_may_end_exactly_at_the_end_of_the_body() -> None:
    # A 1x0 shape needs no data: a header reaching the last byte is read, and refused as empty.
    err = refused(
        parse_npy, npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 0)}", b""), 10
    )
    assert (err.status, err.reason) == (422, "invalid_shape")


# -- output errors --------------------------------------------------------------------------------


def test_a_feature_exactly_at_the_extreme_bound_is_the_versions_fault() -> None:
    # Strictly beyond EXTREME_INPUT is the client's doing (422); at it, the version's (500).
    logits = np.array([[np.nan, 0.0]])
    exc = NonFiniteOutputError("model returned non-finite logits")
    at = output_error("7", np.array([[EXTREME_INPUT, 0.0]]), logits, exc)
    assert (at.status, at.reason) == (500, "bad_output")
    beyond = output_error("7", np.array([[EXTREME_INPUT * 2, 0.0]]), logits, exc)
    assert (beyond.status, beyond.reason) == (422, "input_overflow")


# -- request bodies -------------------------------------------------------------------------------


def receiver(*chunks: bytes) -> Any:
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    return receive


def test_body_limits_are_inclusive() -> None:
    assert asyncio.run(read_asgi_body(receiver(b"abcd"), b"4", 4)) == b"abcd"
    assert asyncio.run(read_asgi_body(receiver(b"ab", b"cd"), None, 4)) == b"abcd"
    with pytest.raises(BadRequestError) as info:
        asyncio.run(read_asgi_body(receiver(b"abcd"), b"5", 4))
    assert (info.value.status, info.value.reason) == (413, "too_large")


def test_a_streamed_body_over_the_limit_is_refused() -> None:
    with pytest.raises(BadRequestError) as info:
        asyncio.run(read_asgi_body(receiver(b"ab", b"cd", b"e"), None, 4))
    assert (info.value.status, info.value.reason) == (413, "too_large")


# -- .npy answers ---------------------------------------------------------------------------------


def test_npy_answer_header_is_padded_to_64_bytes() -> None:
    body = encode_probabilities_npy(np.array([[0.0, 0.0], [1.0, 1.0]]), 2)
    hlen = int.from_bytes(body[8:10], "little")
    assert (10 + hlen) % 64 == 0
    assert body[10 + hlen - 1 : 10 + hlen] == b"\n"
    assert np.load(io.BytesIO(body)).tolist() == [[0.5, 0.5], [0.5, 0.5]]
