"""The Open Inference Protocol routes in-process (Starlette TestClient, real ONNX artefacts).

Pure parsing/encoding is tested directly; the routes against one gateway per module, whose
deployment each test sets itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from ballast.runtime import load_predictor
from ballast.serving import Deployment
from infra.gateway.app import GatewayConfig, create_app
from infra.gateway.oip import (
    BINARY_HEADER,
    InferRequest,
    encode_infer_response,
    parse_infer_request,
)
from infra.gateway.testing import build_mlp_onnx, spec_for
from infra.gateway.wire import BadRequestError

TOKEN = "oip-unit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "m"
F = 30
INFER = f"/v2/models/{MODEL}/infer"


def body(rows: list[list[float]], **extra: Any) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": [len(rows), len(rows[0])], "data": rows}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def binary_body(x: np.ndarray, **extra: Any) -> tuple[bytes, int]:
    raw = x.astype("<f4").tobytes()
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": list(x.shape),
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor], **extra}).encode()
    return header + raw, len(header)


# -- pure parsing and encoding -------------------------------------------------------------------


def test_flat_and_nested_json_data_parse_to_the_same_rows() -> None:
    rows = [[float(i) for i in range(F)], [0.5] * F]
    nested = parse_infer_request(body(rows), None, F, 16)
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, F], "data": rows[0] + rows[1]}
    flat = parse_infer_request(json.dumps({"inputs": [tensor]}).encode(), None, F, 16)
    assert nested.x.dtype == np.float32
    np.testing.assert_array_equal(nested.x, np.asarray(rows, np.float32))
    np.testing.assert_array_equal(flat.x, nested.x)
    assert not nested.binary_output


def test_binary_input_is_read_after_the_json_header() -> None:
    x = np.arange(2 * F, dtype=np.float32).reshape(2, F)
    raw, length = binary_body(x, id="r1", parameters={"binary_data_output": True})
    parsed = parse_infer_request(raw, length, F, 16)
    np.testing.assert_array_equal(parsed.x, x)
    assert parsed.id == "r1"
    assert parsed.binary_output


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, F], "data": [0] * F}]},
            "unknown input 'x'",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, F], "data": [0] * F}]},
            "datatype 'INT64', the model takes FP32",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0] * 3}]},
            "has shape [1, 3], the model takes [n, 30]",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, F], "data": [0] * F}]},
            "'data' holds 30 values, shape [2, 30] needs 60",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, F], "data": ["a"] * F}]},
            "must hold only numbers",
        ),
        (  # numpy would read the boolean as 1.0
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, F],
                        "data": [0] * 29 + [True],
                    }
                ]
            },
            "must hold only numbers",
        ),
        (
            {
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, F], "data": [0] * F}],
                "outputs": [{"name": "probs"}],
            },
            "unknown output 'probs'",
        ),
    ],
)
def test_a_request_that_does_not_match_the_signature_is_refused_with_a_clear_400(
    payload: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_infer_request(json.dumps(payload).encode(), None, F, 16)
    assert info.value.status == 400
    assert message in info.value.message, info.value.message


def test_binary_data_of_the_wrong_size_or_left_over_is_refused() -> None:
    x = np.zeros((1, F), np.float32)
    raw, length = binary_body(x)
    with pytest.raises(BadRequestError, match="binary data truncated"):
        parse_infer_request(raw[:-4], length, F, 16)
    with pytest.raises(BadRequestError, match="belong to no input"):
        parse_infer_request(raw + b"\0\0\0\0", length, F, 16)
    with pytest.raises(BadRequestError, match="body has"):
        parse_infer_request(raw, len(raw) + 1, F, 16)


def test_per_output_binary_flag_overrides_the_request_default() -> None:
    payload = json.loads(body([[0.0] * F]))
    payload["parameters"] = {"binary_data_output": True}
    payload["outputs"] = [{"name": "logits", "parameters": {"binary_data": False}}]
    assert not parse_infer_request(json.dumps(payload).encode(), None, F, 16).binary_output


def test_binary_response_puts_raw_little_endian_logits_after_the_header() -> None:
    logits = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)
    req = InferRequest(x=np.zeros((2, F), np.float32), id="abc", binary_output=True)
    out, length = encode_infer_response(MODEL, "1", req, logits)
    assert length is not None
    header = json.loads(out[:length])
    assert header["id"] == "abc"
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_array_equal(np.frombuffer(out[length:], "<f4").reshape(2, 2), logits)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("size", [1, 64], ids=["batch-1", "wide"])
def test_non_finite_logits_are_never_encoded_as_an_answer(binary: bool, size: int) -> None:
    logits = np.zeros((size, 2), np.float32)
    logits[-1, 1] = np.nan
    req = InferRequest(x=np.zeros((size, F), np.float32), id=None, binary_output=binary)
    with pytest.raises(ValueError, match="non-finite"):
        encode_infer_response(MODEL, "1", req, logits)


# -- the routes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oip")
    return {
        "1": build_mlp_onnx(root / "a.onnx", seed=1),
        "2": build_mlp_onnx(root / "b.onnx", seed=2, classes=3),
    }


@pytest.fixture(scope="module")
def client(artefacts: dict[str, Path]) -> Iterator[TestClient]:
    with TestClient(create_app(GatewayConfig(admin_token=TOKEN, seed=1))) as c:
        yield c


def deploy(client: TestClient, artefacts: dict[str, Path], weight: int) -> None:
    dep = Deployment(
        model=MODEL,
        champion=spec_for(artefacts["1"], "1"),
        canary=spec_for(artefacts["2"], "2"),
        canary_weight=weight,
    )
    r = client.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH)
    assert r.status_code == 200, r.text


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(load_predictor(path, "onnxruntime").predict(x))


def test_health_readiness_and_metadata_follow_the_deployment(
    client: TestClient, artefacts: dict[str, Path]
) -> None:
    client.delete("/admin/deployment", headers=AUTH)
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get(f"/v2/models/{MODEL}").status_code == 503
    deploy(client, artefacts, 0)
    live = client.app.gateway.live  # type: ignore[attr-defined]
    batches = [s.loaded.batcher.batches for s in live.all_slots]
    assert client.get("/v2/health/ready").json()["ready"] is True
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, F]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]
    pinned = client.get(f"/v2/models/{MODEL}/versions/2").json()
    assert pinned["outputs"][0]["shape"] == [-1, 3], "version 2 has three classes"
    # Learnt at warm-up: metadata runs no model call (one sent through the version's batcher
    # was waited for by no unload, so a version switch could close the model under it).
    assert [s.loaded.batcher.batches for s in live.all_slots] == batches
    missing = client.get("/v2/models/other")
    assert missing.status_code == 404
    assert "unknown model 'other'" in missing.json()["error"]


def test_json_infer_goes_through_the_router_and_answers_the_models_logits(
    client: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(client, artefacts, 0)
    x = np.random.default_rng(0).normal(size=(3, F)).astype(np.float32)
    r = client.post(INFER, content=body(x.tolist(), id="req-9"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["model_name"], out["model_version"], out["id"]) == (MODEL, "1", "req-9")
    assert r.headers["x-ballast-version"] == "1"
    logits = out["outputs"][0]
    assert (logits["name"], logits["datatype"], logits["shape"]) == ("logits", "FP32", [3, 2])
    np.testing.assert_allclose(
        np.asarray(logits["data"]).reshape(3, 2), reference(artefacts["1"], x), rtol=1e-6
    )
    # Weight 100: the same route now answers from the canary.
    deploy(client, artefacts, 100)
    assert client.post(INFER, content=body(x.tolist())).json()["model_version"] == "2"


def test_sticky_key_keeps_one_version_across_oip_requests(
    client: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(client, artefacts, 50)
    seen = {
        client.post(INFER, content=body([[0.1] * F]), headers={"X-Ballast-Key": "user-3"}).json()[
            "model_version"
        ]
        for _ in range(15)
    }
    assert len(seen) == 1, seen
    unkeyed = {
        client.post(INFER, content=body([[0.1] * F])).json()["model_version"] for _ in range(40)
    }
    assert unkeyed == {"1", "2"}, "without a key the 50 % split reaches both versions"


def test_the_canary_judge_sees_routed_oip_answers_with_their_key_but_never_pinned_ones(
    client: TestClient, artefacts: dict[str, Path]
) -> None:
    # A request that names its version was not drawn at the weight: counting it would tell the
    # judge that the canary's arm took more (or fewer) answers than the split sent it.
    deploy(client, artefacts, 50)
    start = client.get("/admin/observations", headers=AUTH).json()
    pinned = client.post(f"/v2/models/{MODEL}/versions/2/infer", content=body([[0.1] * F]))
    keyed = client.post(INFER, content=body([[0.1] * F]), headers={"X-Ballast-Key": "user-3"})
    assert pinned.status_code == keyed.status_code == 200
    page = client.get(
        "/admin/observations",
        params={"cursors": f"{start['replica']}={start['next']}"},
        headers=AUTH,
    ).json()
    (only,) = page["observations"]
    assert only[1] == keyed.json()["model_version"] and len(only[6]) == 16


def test_binary_infer_round_trips_and_pinned_version_bypasses_the_split(
    client: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(client, artefacts, 0)
    x = np.random.default_rng(1).normal(size=(4, F)).astype(np.float32)
    raw, length = binary_body(x, parameters={"binary_data_output": True})
    r = client.post(
        f"/v2/models/{MODEL}/versions/2/infer",
        content=raw,
        headers={BINARY_HEADER: str(length), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers[BINARY_HEADER])
    header = json.loads(r.content[:n])
    assert header["model_version"] == "2", "pinned to the canary although its weight is 0"
    got = np.frombuffer(r.content[n:], "<f4").reshape(header["outputs"][0]["shape"])
    np.testing.assert_allclose(got, reference(artefacts["2"], x), rtol=1e-6)


def test_errors_use_the_protocols_body_and_status(
    client: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(client, artefacts, 0)
    wrong = client.post(INFER, content=body([[0.1] * 5]))
    assert wrong.status_code == 400
    assert "has shape [1, 5], the model takes [n, 30]" in wrong.json()["error"]
    unknown = client.post(f"/v2/models/{MODEL}/versions/9/infer", content=body([[0.1] * F]))
    assert unknown.status_code == 404
    assert "no serving version '9'" in unknown.json()["error"]
    assert client.post(INFER, content=b"{not json").status_code == 400
    get = client.get(INFER)
    assert (get.status_code, get.headers["allow"]) == (405, "POST")


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "input", "datatype": "FP32", "shape": [True, F], "data": [0] * F},
        {"name": "input", "datatype": "FP32", "shape": [0, F], "data": []},
        {"name": "input", "datatype": "FP32", "shape": [1, F], "data": [True] * F},
        {"name": "input", "datatype": "FP32", "shape": [1, F], "data": [1e39] * F},
        {"name": "input", "datatype": "FP32", "shape": [1, F], "data": [[[0]]] * F},
        {"name": "input", "datatype": "FP32", "shape": [1, F], "data": [10**40] * F},
        {
            "name": "input",
            "datatype": "FP32",
            "shape": [1, F],
            "parameters": {"binary_data_size": -4},
        },
        {"name": "input", "datatype": "FP32", "shape": [1, F], "data": [0] * F, "parameters": 3},
    ],
)
def test_odd_tensors_get_a_400_never_a_500(tensor: dict[str, Any]) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_infer_request(json.dumps({"inputs": [tensor]}).encode(), None, F, 16)
    assert info.value.status == 400


def test_oip_requests_are_mirrored_to_the_shadow_like_predict_requests(
    client: TestClient, artefacts: dict[str, Path]
) -> None:
    dep = Deployment(
        model=MODEL,
        champion=spec_for(artefacts["1"], "1"),
        shadow=spec_for(artefacts["2"], "2"),
        shadow_fraction=1.0,
    )
    assert client.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH).is_success
    for _ in range(5):
        assert client.post(INFER, content=body([[0.3] * F])).json()["model_version"] == "1"
    assert client.get("/admin/shadow", headers=AUTH).json()["mirrored"] == 5


def test_server_metadata_names_the_binary_extension_and_unknown_routes_are_404(
    client: TestClient,
) -> None:
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    missing = client.get("/v2/nothing/here")
    assert missing.status_code == 404
    assert "no such route" in missing.json()["error"]


EXTREME = [3e38, -3e38] * (F // 2)  # finite float32, but ∞ - ∞ inside the MLP


def test_an_input_that_overflows_the_model_is_a_422_for_the_client(
    client: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(client, artefacts, 0)
    before = client.get("/admin/stats", headers=AUTH).json()["versions"]["1"]
    for binary in (False, True):
        params = {"parameters": {"binary_data_output": True}} if binary else {}
        r = client.post(INFER, content=body([EXTREME], **params))
        assert r.status_code == 422, r.text  # before: 200 with null logits
        assert "overflowed float32" in r.json()["error"]
    after = client.get("/admin/stats", headers=AUTH).json()["versions"]["1"]
    assert after["errors"] == before["errors"], "not the version's error"
    assert after["client_errors"] == before["client_errors"] + 2


class _NanForAnythingButZeros:
    """A broken model: finite for its warm-up (zeros), NaN for anything else."""

    n_features = F

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((x.shape[0], 2), np.float32)
        out[np.abs(x).max(axis=1) > 0] = np.nan
        return out


def test_a_model_answering_nan_to_ordinary_input_is_the_versions_500(
    artefacts: dict[str, Path],
) -> None:
    app = create_app(
        GatewayConfig(admin_token=TOKEN),
        loader=lambda path, backend, threads: _NanForAnythingButZeros(),
    )
    with TestClient(app) as c:
        dep = Deployment(model=MODEL, champion=spec_for(artefacts["1"], "1"))
        assert c.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH).is_success
        r = c.post(INFER, content=body([[0.3] * F]))
        assert r.status_code == 500, r.text
        assert r.json() == {"error": "version 1 failed to predict"}
        assert c.post(INFER, content=body([EXTREME])).status_code == 422
        stats = c.get("/admin/stats", headers=AUTH).json()["versions"]["1"]
        assert (stats["errors"], stats["client_errors"]) == (1, 1)


def test_a_canary_of_another_width_fails_its_oip_share_on_the_record(
    client: TestClient, artefacts: dict[str, Path], tmp_path: Path
) -> None:
    # Before: its share came back 400 "the model takes [n, 20]" (the client's mistake) and was
    # never recorded, so the canary's error rate stayed clean.
    narrow = build_mlp_onnx(tmp_path / "narrow.onnx", seed=3, n_features=20)
    dep = Deployment(
        model=MODEL,
        champion=spec_for(artefacts["1"], "1"),
        canary=spec_for(narrow, "w20"),
        canary_weight=50,
    )
    r = client.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH)
    assert r.status_code == 200, r.text
    start = client.get("/admin/observations", headers=AUTH).json()
    rows = [[0.1] * F]
    answers = [client.post(INFER, content=body(rows)) for _ in range(40)]
    assert {a.status_code for a in answers} == {200, 500}
    refused = [a for a in answers if a.status_code == 500]
    assert all(a.headers["x-ballast-version"] == "w20" for a in refused)
    page = client.get(
        "/admin/observations",
        params={"cursors": f"{start['replica']}={start['next']}"},
        headers=AUTH,
    ).json()
    ok = {v: {o[3] for o in page["observations"] if o[1] == v} for v in ("1", "w20")}
    assert ok == {"1": {True}, "w20": {False}}
    # A width no serving version takes is still the client's 400.
    assert client.post(INFER, content=body([[0.1] * 7])).status_code == 400


def test_ready_routes_say_ready_while_a_served_model_answers(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    # "Ready for inferencing": a replica loading a change keeps serving what it has, and its
    # OIP ready routes must say so (they answered 503, as /readyz does, during every load).
    import threading
    import time

    from infra.gateway.app import _default_loader
    from infra.gateway.desired import FileDesiredState

    loading = threading.Event()
    release = threading.Event()
    release.set()

    def gated(path: Path, backend: str, threads: int) -> Any:
        if not release.is_set():
            loading.set()
            release.wait(10)
        return _default_loader(path, backend, threads)

    source = FileDesiredState(tmp_path / "desired.json", poll_interval_s=0.05)
    source.publish(Deployment(model=MODEL, champion=spec_for(artefacts["1"], "1")), actor="t")
    config = GatewayConfig(admin_token=TOKEN)
    with TestClient(create_app(config, loader=gated, source=source)) as c:
        assert c.get("/v2/health/ready").status_code == 200
        release.clear()
        change = Deployment(
            model=MODEL,
            champion=spec_for(artefacts["1"], "1"),
            canary=spec_for(artefacts["2"], "2"),
            canary_weight=10,
        )
        source.publish(change, actor="t")
        assert loading.wait(5)
        try:
            assert c.get("/readyz").status_code == 503  # the change is not in yet
            assert c.get("/v2/health/ready").status_code == 200
            assert c.get(f"/v2/models/{MODEL}/ready").status_code == 200
            assert c.get(f"/v2/models/{MODEL}/versions/1/ready").json() == {
                "name": MODEL,
                "ready": True,
                "version": "1",
            }
            assert c.get(f"/v2/models/{MODEL}/versions/2/ready").status_code == 404
        finally:
            release.set()
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get(f"/v2/models/{MODEL}/versions/2/ready").status_code == 200
