"""The gateway app in-process (Starlette TestClient) with real ONNX artefacts.

Two small MLPs built once per module are the champion and the canary. Wrapping loaders stand
in for a predictor that blocks, fails or returns garbage where a test needs one.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from ballast.errors import GatewayError
from ballast.gateway_client import GatewayClient
from ballast.runtime import Predictor, load_predictor
from ballast.serving import Deployment, Fault, VersionSpec
from infra.gateway.app import (
    BadRequestError,
    GatewayConfig,
    create_app,
    encode_prediction,
    parse_instances,
)
from infra.gateway.testing import build_mlp_onnx, spec_for

TOKEN = "unit-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "m"
N_FEATURES = 30
PREDICT = f"/v1/models/{MODEL}/predict"
ROW = [0.1] * N_FEATURES


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artefacts")
    garbage = root / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model")
    return {
        "a": build_mlp_onnx(root / "a.onnx", seed=1),
        "b": build_mlp_onnx(root / "b.onnx", seed=2),
        "garbage": garbage,
    }


def spec(artefacts: dict[str, Path], version: str, fault: Fault | None = None) -> VersionSpec:
    """Version "1" is artefact a, version "2" artefact b."""
    return spec_for(artefacts["a" if version == "1" else "b"], version, fault=fault)


def champion_only(artefacts: dict[str, Path], fault: Fault | None = None) -> Deployment:
    return Deployment(model=MODEL, champion=spec(artefacts, "1", fault))


def with_canary(artefacts: dict[str, Path], weight: int, fault: Fault | None = None) -> Deployment:
    return Deployment(
        model=MODEL,
        champion=spec(artefacts, "1"),
        canary=spec(artefacts, "2", fault),
        canary_weight=weight,
    )


class Recorder:
    """Wraps the real loader: counts loads, can block or break predictions, records close()."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        # Predictions on ``block`` (an artefact name) wait for ``gate``; others never do.
        self.block: str | None = None
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail = False
        self.output: np.ndarray | None = None
        self.closed: list[Path] = []

    def __call__(self, path: Path, backend: str, threads: int) -> Predictor:
        self.loads.append(path.name)
        return Wrapped(load_predictor(path, backend, intra_op_threads=threads), self, path)


class Wrapped:
    backend = "onnxruntime"

    def __init__(self, inner: Any, rec: Recorder, path: Path) -> None:
        self.inner, self.rec, self.path = inner, rec, path
        self.n_features = inner.n_features

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.rec.block == self.path.name:
            self.rec.entered.set()
            if not self.rec.gate.wait(10):
                raise TimeoutError("test gate never opened")
        if self.rec.fail:
            raise RuntimeError("boom")
        if self.rec.output is not None:
            return self.rec.output
        return np.asarray(self.inner.predict(x))

    def close(self) -> None:
        self.rec.closed.append(self.path)


def make_client(**overrides: Any) -> tuple[TestClient, Recorder]:
    rec = Recorder()
    config = GatewayConfig(admin_token=TOKEN, seed=1, **overrides)
    return TestClient(create_app(config, loader=rec)), rec


@pytest.fixture
def gw() -> Iterator[TestClient]:
    client, _ = make_client()
    with client:
        yield client


@pytest.fixture
def gw_rec() -> Iterator[tuple[TestClient, Recorder]]:
    client, rec = make_client()
    with client:
        yield client, rec


def put(client: TestClient, dep: Deployment) -> Any:
    return client.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH)


def deploy(client: TestClient, dep: Deployment) -> None:
    resp = put(client, dep)
    assert resp.status_code == 200, resp.text


def versions_seen(client: TestClient, n: int, **kwargs: Any) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        resp = client.post(PREDICT, json={"instances": [ROW]}, **kwargs)
        assert resp.status_code == 200, resp.text
        seen[resp.headers["X-Ballast-Version"]] += 1
    return seen


def metric_samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- health, readiness --------------------------------------------------------------------------


def test_healthz_answers_without_a_deployment(gw: TestClient) -> None:
    resp = gw.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_readyz_follows_the_deployment(gw: TestClient, artefacts: dict[str, Path]) -> None:
    resp = gw.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["reason"] == "no deployment set"

    deploy(gw, Deployment(model=MODEL))
    resp = gw.get("/readyz")
    assert resp.status_code == 503
    assert "no versions" in resp.json()["reason"]

    deploy(gw, with_canary(artefacts, 10))
    resp = gw.get("/readyz")
    assert resp.status_code == 200
    assert resp.json() == {
        "ready": True,
        "model": MODEL,
        "versions": {"1": "champion", "2": "canary"},
    }

    # A refused change leaves the gateway ready on what it had.
    bad = Deployment(
        model=MODEL, champion=spec(artefacts, "1").model_copy(update={"sha256": "0" * 64})
    )
    assert put(gw, bad).status_code == 409
    assert gw.get("/readyz").status_code == 200


# -- admin auth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["missing", "wrong", "wrong-scheme", "empty", "prefix-match"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/deployment"), ("PUT", "/admin/deployment"), ("GET", "/admin/stats")],
)
def test_admin_routes_need_the_token(
    gw: TestClient, artefacts: dict[str, Path], headers: dict[str, str], method: str, path: str
) -> None:
    body = champion_only(artefacts).model_dump_json() if method == "PUT" else None
    resp = gw.request(method, path, headers=headers, content=body)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert "admin token" in resp.json()["error"]
    # Nothing was applied by an unauthenticated PUT.
    assert gw.get("/admin/deployment", headers=AUTH).json() is None


def test_admin_logs_are_json_lines_without_the_token(
    gw: TestClient, artefacts: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ballast.gateway")
    gw.get("/admin/deployment", headers={"Authorization": f"Bearer {TOKEN}-guess"})
    deploy(gw, champion_only(artefacts))
    bad_spec = spec(artefacts, "2").model_copy(update={"sha256": "f" * 64})
    assert put(gw, Deployment(model=MODEL, champion=bad_spec)).status_code == 409
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ballast.gateway"]
    kinds = [e["event"] for e in events]
    assert "admin.denied" in kinds
    assert "deployment.applied" in kinds
    assert "deployment.refused" in kinds
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


def test_config_refuses_an_empty_token() -> None:
    with pytest.raises(ValueError, match="admin token"):
        GatewayConfig(admin_token="")


# -- deployments --------------------------------------------------------------------------------


def test_deploy_then_get_returns_the_same_deployment(
    gw: TestClient, artefacts: dict[str, Path]
) -> None:
    assert gw.get("/admin/deployment", headers=AUTH).json() is None
    dep = with_canary(artefacts, 25)
    resp = put(gw, dep)
    assert resp.status_code == 200
    assert Deployment.model_validate(resp.json()) == dep
    assert Deployment.model_validate(gw.get("/admin/deployment", headers=AUTH).json()) == dep


def test_prediction_matches_the_artefact(gw: TestClient, artefacts: dict[str, Path]) -> None:
    deploy(gw, champion_only(artefacts))
    rows = np.random.default_rng(0).standard_normal((5, N_FEATURES)).astype(np.float32)
    resp = gw.post(PREDICT, json={"instances": rows.tolist()})
    assert resp.status_code == 200
    assert resp.headers["X-Ballast-Version"] == "1"
    assert resp.headers["X-Ballast-Role"] == "champion"
    body = resp.json()
    logits = load_predictor(artefacts["a"], "onnxruntime").predict(rows)
    assert body["version"] == "1"
    assert body["predictions"] == logits.argmax(axis=1).tolist()
    probs = np.array(body["probabilities"])
    assert probs.shape == (5, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-9)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("mutate", "status", "message"),
    [
        (lambda s, a: s.model_copy(update={"sha256": "0" * 64}), 409, "sha256 mismatch"),
        (
            lambda s, a: s.model_copy(update={"artifact_path": str(a["a"].parent / "nope.onnx")}),
            422,
            "artefact not found",
        ),
        (lambda s, a: spec_for(a["garbage"], "2"), 422, "could not load"),
    ],
    ids=["bad-hash", "missing-file", "not-a-model"],
)
def test_refused_deployment_keeps_the_previous_one(
    gw_rec: tuple[TestClient, Recorder],
    artefacts: dict[str, Path],
    mutate: Any,
    status: int,
    message: str,
) -> None:
    gw, rec = gw_rec
    before = champion_only(artefacts)
    deploy(gw, before)
    loads = len(rec.loads)
    bad_canary = mutate(spec(artefacts, "2"), artefacts)
    bad = Deployment(model=MODEL, champion=before.champion, canary=bad_canary, canary_weight=100)
    resp = put(gw, bad)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert message in error
    assert "version 2" in error
    assert "previous one stays" in error
    assert Deployment.model_validate(gw.get("/admin/deployment", headers=AUTH).json()) == before
    assert versions_seen(gw, 20) == {"1": 20}
    assert len(rec.loads) <= loads + 1  # at most the refused load was tried; "1" not reloaded
    assert rec.closed == []  # the champion in force was not unloaded


def test_versions_loaded_for_a_refused_deployment_are_freed(
    gw_rec: tuple[TestClient, Recorder], artefacts: dict[str, Path]
) -> None:
    gw, rec = gw_rec
    bad_canary = spec(artefacts, "2").model_copy(update={"sha256": "0" * 64})
    bad = Deployment(model=MODEL, champion=spec(artefacts, "1"), canary=bad_canary, canary_weight=5)
    assert put(gw, bad).status_code == 409
    assert rec.loads == ["a.onnx"]
    assert [p.name for p in rec.closed] == ["a.onnx"]
    assert gw.get("/admin/deployment", headers=AUTH).json() is None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"model": "m", "canary_weight": 5}', 422),  # weight without a canary
        (b'{"model": "m", "surprise": 1}', 422),
        (b'{"model": ""}', 422),
        (b"[]", 422),
    ],
    ids=["malformed", "weight-without-canary", "extra-field", "empty-model", "not-an-object"],
)
def test_invalid_deployment_bodies_are_refused(gw: TestClient, body: bytes, status: int) -> None:
    resp = gw.put("/admin/deployment", content=body, headers=AUTH)
    assert resp.status_code == status
    assert resp.json()["error"].startswith("invalid deployment")
    assert gw.get("/admin/deployment", headers=AUTH).json() is None


def test_warm_up_failure_refuses_the_version(
    gw_rec: tuple[TestClient, Recorder], artefacts: dict[str, Path]
) -> None:
    gw, rec = gw_rec
    rec.fail = True
    resp = put(gw, champion_only(artefacts))
    assert resp.status_code == 422
    assert "warm-up inference failed" in resp.json()["error"]
    rec.fail = False
    rec.output = np.array([[np.nan, 0.0]], dtype=np.float32)
    resp = put(gw, champion_only(artefacts))
    assert resp.status_code == 422
    assert "non-finite" in resp.json()["error"]
    assert gw.get("/readyz").status_code == 503


def test_loaded_versions_are_reused_and_faults_change_without_reload(
    gw_rec: tuple[TestClient, Recorder], artefacts: dict[str, Path]
) -> None:
    gw, rec = gw_rec
    for weight in (5, 25, 50):
        deploy(gw, with_canary(artefacts, weight))
    deploy(gw, with_canary(artefacts, 50, fault="latency"))
    assert sorted(rec.loads) == ["a.onnx", "b.onnx"]
    stats = gw.get("/admin/stats", headers=AUTH).json()
    assert stats["versions"]["2"]["fault"] == "latency"


def test_retired_version_is_unloaded_only_after_its_in_flight_request(
    gw_rec: tuple[TestClient, Recorder], artefacts: dict[str, Path]
) -> None:
    gw, rec = gw_rec
    deploy(gw, champion_only(artefacts))
    rec.block = "a.onnx"
    answers: list[Any] = []
    slow = threading.Thread(
        target=lambda: answers.append(gw.post(PREDICT, json={"instances": [ROW]})), daemon=True
    )
    slow.start()
    try:
        assert rec.entered.wait(5), "the request never reached version 1"
        # Swap to version 2 while version 1 still holds a request.
        deploy(gw, Deployment(model=MODEL, champion=spec(artefacts, "2")))
        assert versions_seen(gw, 10) == {"2": 10}
        time.sleep(0.1)
        assert rec.closed == []
        assert gw.get("/admin/stats", headers=AUTH).json()["draining"] == ["1"]
    finally:
        rec.gate.set()
        slow.join(10)
    assert answers[0].status_code == 200
    assert answers[0].headers["X-Ballast-Version"] == "1"
    deadline = time.monotonic() + 5
    while not rec.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [p.name for p in rec.closed] == ["a.onnx"]
    assert gw.get("/admin/stats", headers=AUTH).json()["draining"] == []


def test_unload_stops_waiting_after_its_bound(artefacts: dict[str, Path]) -> None:
    rec = Recorder()
    app = create_app(GatewayConfig(admin_token=TOKEN, unload_timeout_s=0.2), loader=rec)
    with TestClient(app) as gw:
        deploy(gw, champion_only(artefacts))
        live = app.state.gateway.live
        live.champion.loaded.inflight += 1  # a request that never ends
        deploy(gw, Deployment(model=MODEL, champion=spec(artefacts, "2")))
        deadline = time.monotonic() + 5
        while not rec.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [p.name for p in rec.closed] == ["a.onnx"]  # unloaded after the bound


# -- routing ------------------------------------------------------------------------------------


def test_weighted_split_is_within_binomial_tolerance(
    gw: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(gw, with_canary(artefacts, 30))
    n = 2000
    seen = versions_seen(gw, n)
    sd = math.sqrt(n * 0.3 * 0.7)
    assert abs(seen["2"] - 0.3 * n) < 4.5 * sd, seen
    assert seen["1"] + seen["2"] == n


@pytest.mark.parametrize(("weight", "only"), [(0, "1"), (100, "2")])
def test_weight_extremes_send_everything_one_way(
    gw: TestClient, artefacts: dict[str, Path], weight: int, only: str
) -> None:
    deploy(gw, with_canary(artefacts, weight))
    assert versions_seen(gw, 100) == {only: 100}


def test_sticky_keys_stay_on_one_version_and_only_move_to_the_canary(
    gw: TestClient, artefacts: dict[str, Path]
) -> None:
    keys = [f"user-{i}" for i in range(300)]

    def assignment() -> dict[str, str]:
        out = {}
        for key in keys:
            seen = versions_seen(gw, 3, headers={"X-Ballast-Key": key})
            assert len(seen) == 1, f"key {key} flapped: {seen}"
            out[key] = next(iter(seen))
        return out

    deploy(gw, with_canary(artefacts, 30))
    at30 = assignment()
    share = sum(v == "2" for v in at30.values()) / len(keys)
    assert abs(share - 0.3) < 4.5 * math.sqrt(0.3 * 0.7 / len(keys))
    deploy(gw, with_canary(artefacts, 30))
    assert assignment() == at30  # same weight, same answer
    deploy(gw, with_canary(artefacts, 60))
    at60 = assignment()
    assert all(at60[k] == "2" for k, v in at30.items() if v == "2")  # never moved back


# -- bad requests -------------------------------------------------------------------------------

# orjson refuses NaN as JSON (400); the stdlib fallback parses it and the finiteness check
# refuses it (422). Both are clear 4xx.
BAD_BODIES: list[tuple[str, bytes, int | tuple[int, ...], str]] = [
    ("malformed-json", b'{"instances": [[1, 2', 400, "not valid JSON"),
    ("not-utf8", b"\xff\xfe\x00", 400, "not valid JSON"),
    ("not-an-object", b"[[1, 2, 3]]", 422, "JSON object"),
    ("missing-instances", b"{}", 422, "'instances' must be a list"),
    ("extra-field", json.dumps({"instances": [ROW], "x": 1}).encode(), 422, "unexpected field"),
    ("instances-not-list", b'{"instances": 3}', 422, "must be a list"),
    ("empty", b'{"instances": []}', 422, "at least one row"),
    ("row-not-list", b'{"instances": [1, 2]}', 422, "each instance must be a list"),
    ("empty-row", b'{"instances": [[]]}', 422, "at least one feature"),
    ("ragged", json.dumps({"instances": [ROW, ROW[:-1]]}).encode(), 422, "same length"),
    ("nested", json.dumps({"instances": [[[0.1]] * 30]}).encode(), 422, "flat lists"),
    ("string", json.dumps({"instances": [[*ROW[:-1], "1.5"]]}).encode(), 422, "only numbers"),
    ("null", json.dumps({"instances": [[*ROW[:-1], None]]}).encode(), 422, "only numbers"),
    ("booleans", json.dumps({"instances": [[True] * 30]}).encode(), 422, "only numbers"),
    ("nan", b'{"instances": [[' + b"NaN," * 29 + b"1]]}", (400, 422), ""),
    ("overflow", json.dumps({"instances": [[1e300] * 30]}).encode(), 422, "finite float32"),
    ("huge-int", json.dumps({"instances": [[10**40] * 30]}).encode(), 422, ""),
    ("too-many-rows", json.dumps({"instances": [ROW] * 4097}).encode(), 422, "4097 rows"),
    ("deep", b"[" * 100_000, 400, "not valid JSON"),
]


@pytest.mark.parametrize(
    ("body", "status", "message"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
def test_bad_predict_requests_get_a_clear_4xx(
    gw: TestClient,
    artefacts: dict[str, Path],
    body: bytes,
    status: int | tuple[int, ...],
    message: str,
) -> None:
    deploy(gw, champion_only(artefacts))
    resp = gw.post(PREDICT, content=body, headers={"content-type": "application/json"})
    assert resp.status_code in (status if isinstance(status, tuple) else (status,)), resp.text
    assert message in resp.json()["error"]
    assert "X-Ballast-Version" not in resp.headers  # refused before any version saw it


def test_wrong_feature_count_is_attributed_to_the_version(
    gw: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(gw, champion_only(artefacts))
    resp = gw.post(PREDICT, json={"instances": [ROW[:-1]]})
    assert resp.status_code == 422
    assert resp.headers["X-Ballast-Version"] == "1"
    assert "takes 30 features, got 29" in resp.json()["error"]
    stats = gw.get("/admin/stats", headers=AUTH).json()["versions"]["1"]
    assert (stats["client_errors"], stats["errors"]) == (1, 0)


def test_body_over_the_limit_is_413_when_deployed(artefacts: dict[str, Path]) -> None:
    client, _ = make_client(max_body_bytes=1000)
    with client as gw:
        deploy(gw, champion_only(artefacts))
        big = json.dumps({"instances": [ROW] * 50}).encode()
        resp = gw.post(PREDICT, content=big)
        assert resp.status_code == 413
        assert "exceeds 1000 bytes" in resp.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while streaming
            yield big[:600]
            yield big[600:]

        resp = gw.post(PREDICT, content=chunks())
        assert resp.status_code == 413
        assert gw.post(PREDICT, json={"instances": [ROW]}).status_code == 200


def test_unknown_model_route_and_method_are_json_4xx(
    gw: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(gw, champion_only(artefacts))
    resp = gw.post("/v1/models/other/predict", json={"instances": [ROW]})
    assert resp.status_code == 404
    assert "unknown model 'other'" in resp.json()["error"]
    resp = gw.get("/no/such/route")
    assert resp.status_code == 404
    assert "error" in resp.json()
    resp = gw.get(PREDICT)
    assert resp.status_code == 405
    assert "error" in resp.json()


def test_predict_without_deployment_is_503(gw: TestClient) -> None:
    resp = gw.post(PREDICT, json={"instances": [ROW]})
    assert resp.status_code == 503
    assert resp.json() == {"error": "no model version is deployed"}


# -- version failures and fault injection -------------------------------------------------------


def test_inference_failure_is_a_500_from_that_version(
    gw_rec: tuple[TestClient, Recorder], artefacts: dict[str, Path]
) -> None:
    gw, rec = gw_rec
    deploy(gw, champion_only(artefacts))
    rec.fail = True
    resp = gw.post(PREDICT, json={"instances": [ROW]})
    assert resp.status_code == 500
    assert resp.headers["X-Ballast-Version"] == "1"
    assert resp.json() == {"error": "version 1 failed to predict"}
    rec.fail = False
    rec.output = np.array([[np.inf, 1.0]], dtype=np.float32)
    resp = gw.post(PREDICT, json={"instances": [ROW]})
    assert resp.status_code == 500
    assert resp.headers["X-Ballast-Version"] == "1"


def test_errors_fault_fails_about_30_percent_of_that_version_only(
    gw: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(gw, with_canary(artefacts, 50, fault="errors"))
    n = 800
    outcomes: Counter[tuple[str, int]] = Counter()
    for _ in range(n):
        resp = gw.post(PREDICT, json={"instances": [ROW]})
        outcomes[(resp.headers["X-Ballast-Version"], resp.status_code)] += 1
        if resp.status_code == 500:
            assert resp.json() == {"error": "injected fault"}
    canary_n = outcomes[("2", 200)] + outcomes[("2", 500)]
    assert outcomes[("1", 500)] == 0
    rate = outcomes[("2", 500)] / canary_n
    assert abs(rate - 0.3) < 4.5 * math.sqrt(0.3 * 0.7 / canary_n), outcomes
    stats = gw.get("/admin/stats", headers=AUTH).json()["versions"]
    assert stats["2"]["errors"] == outcomes[("2", 500)]
    assert stats["1"]["errors"] == 0


def test_latency_fault_delays_that_version(gw: TestClient, artefacts: dict[str, Path]) -> None:
    deploy(gw, with_canary(artefacts, 100, fault="latency"))
    for _ in range(5):
        t = time.perf_counter()
        resp = gw.post(PREDICT, json={"instances": [ROW]})
        assert resp.status_code == 200
        assert time.perf_counter() - t >= 0.06
    stats = gw.get("/admin/stats", headers=AUTH).json()["versions"]["2"]
    assert stats["latency_ms"]["p50"] >= 60.0


def test_bad_weights_fault_is_ignored_by_the_gateway(
    gw: TestClient, artefacts: dict[str, Path]
) -> None:
    deploy(gw, with_canary(artefacts, 100, fault="bad-weights"))
    assert versions_seen(gw, 50) == {"2": 50}


# -- metrics and stats --------------------------------------------------------------------------


def test_metrics_expose_the_labelled_series(gw: TestClient, artefacts: dict[str, Path]) -> None:
    deploy(gw, with_canary(artefacts, 30, fault="errors"))
    bad = with_canary(artefacts, 30).model_copy(
        update={"canary": spec(artefacts, "2").model_copy(update={"sha256": "1" * 64})}
    )
    assert put(gw, bad).status_code == 409
    for _ in range(200):
        gw.post(PREDICT, json={"instances": [ROW]})
    gw.post(PREDICT, content=b"{")
    resp = gw.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples = metric_samples(gw)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    ok1 = value("ballast_requests_total", model=MODEL, version="1", role="champion", status="200")
    ok2 = value("ballast_requests_total", model=MODEL, version="2", role="canary", status="200")
    err2 = value("ballast_requests_total", model=MODEL, version="2", role="canary", status="500")
    assert ok1 > 0 and ok2 > 0 and err2 > 0
    assert ok1 + ok2 + err2 == 200
    assert (
        value("ballast_request_latency_seconds_count", model=MODEL, version="1", role="champion")
        == ok1
    )
    assert (
        "ballast_request_latency_seconds_bucket",
        frozenset({"model": MODEL, "version": "2", "role": "canary", "le": "0.001"}.items()),
    ) in samples
    assert value("ballast_canary_weight", model=MODEL) == 30
    assert value("ballast_deployment_info", model=MODEL, version="1", role="champion") == 1
    assert value("ballast_deployment_info", model=MODEL, version="2", role="canary") == 1
    assert value("ballast_deployments_total", model=MODEL, result="applied") == 1
    assert value("ballast_deployments_total", model=MODEL, result="refused") == 1
    assert value("ballast_rejected_requests_total", reason="malformed_json") == 1

    # Promotion: the canary's info series goes, the champion's role changes.
    deploy(gw, Deployment(model=MODEL, champion=spec(artefacts, "2")))
    samples = metric_samples(gw)
    assert value("ballast_deployment_info", model=MODEL, version="2", role="champion") == 1
    assert (
        "ballast_deployment_info",
        frozenset({"model": MODEL, "version": "1", "role": "champion"}.items()),
    ) not in samples
    assert value("ballast_canary_weight", model=MODEL) == 0


def test_metrics_registries_are_per_app(artefacts: dict[str, Path]) -> None:
    first, _ = make_client()
    second, _ = make_client()
    with first as a, second as b:
        deploy(a, champion_only(artefacts))
        a.post(PREDICT, json={"instances": [ROW]})
        assert "ballast_requests_total{" in a.get("/metrics").text
        assert "ballast_requests_total{" not in b.get("/metrics").text


def test_stats_report_counts_and_latency_percentiles(
    gw: TestClient, artefacts: dict[str, Path]
) -> None:
    empty = gw.get("/admin/stats", headers=AUTH).json()
    assert empty == {"model": None, "canary_weight": 0, "versions": {}, "draining": []}
    deploy(gw, with_canary(artefacts, 50))
    seen = versions_seen(gw, 100)
    stats = gw.get("/admin/stats", headers=AUTH).json()
    assert stats["model"] == MODEL
    assert stats["canary_weight"] == 50
    for version, role in (("1", "champion"), ("2", "canary")):
        v = stats["versions"][version]
        assert v["role"] == role
        assert v["requests"] == seen[version]
        assert v["errors"] == 0
        assert v["inflight"] == 0
        lat = v["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]


def test_stats_window_is_bounded(artefacts: dict[str, Path]) -> None:
    client, _ = make_client(stats_window=10)
    with client as gw:
        deploy(gw, champion_only(artefacts))
        versions_seen(gw, 25)
        v = gw.get("/admin/stats", headers=AUTH).json()["versions"]["1"]
        assert (v["requests"], v["window"]) == (25, 10)


# -- pure helpers -------------------------------------------------------------------------------


def test_parse_instances_returns_float32_rows() -> None:
    x = parse_instances(json.dumps({"instances": [[1, 2.5], [3, 4]]}).encode(), 10)
    assert x.dtype == np.float32
    assert x.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    with pytest.raises(BadRequestError) as info:
        parse_instances(b'{"instances": [[1], [2], [3]]}', 2)
    assert info.value.status == 422


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"instances": [[NaN, 1]]}', 422),
        (b"[" * 100_000, 400),
        (b"{", 400),
        (b'{"instances": [[1, 2]]}', None),
    ],
)
def test_parse_instances_with_the_stdlib_json_fallback(
    monkeypatch: pytest.MonkeyPatch, body: bytes, status: int | None
) -> None:
    import infra.gateway.app as gateway_app

    monkeypatch.setattr(gateway_app, "_loads", json.loads)
    if status is None:
        assert parse_instances(body, 10).shape == (1, 2)
        return
    with pytest.raises(BadRequestError) as info:
        parse_instances(body, 10)
    assert info.value.status == status


def test_small_and_large_softmax_paths_agree() -> None:
    logits = np.random.default_rng(3).standard_normal((100, 3)).astype(np.float32) * 20
    large = json.loads(encode_prediction("v", logits, 100))
    small = [json.loads(encode_prediction("v", logits[i : i + 1], 1)) for i in range(100)]
    assert large["predictions"] == [s["predictions"][0] for s in small]
    np.testing.assert_allclose(
        large["probabilities"], [s["probabilities"][0] for s in small], rtol=1e-12
    )
    with pytest.raises(ValueError, match="shape"):
        encode_prediction("v", logits, 99)


def test_client_reports_an_unreachable_gateway() -> None:
    from tests.conftest import free_port

    with GatewayClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=0.5) as client:
        assert client.health() is False
        assert client.ready() is False
        with pytest.raises(GatewayError, match="unreachable"):
            client.get_deployment()
    with (
        GatewayClient("http://127.0.0.1:1") as client,
        pytest.raises(GatewayError, match="no admin token"),
    ):
        client.stats()
