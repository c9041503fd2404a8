"""Triton's own HTTP client (``tritonclient.http``) against a real gateway process.

One gateway per module (champion "1", canary "2" at weight 0), stopped by the fixture.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.runtime import load_predictor
from ballast.serving import Deployment
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for

pytestmark = pytest.mark.integration

MODEL = "m"
F = 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oip-artefacts")
    return {
        "1": build_mlp_onnx(root / "one.onnx", seed=21),
        "2": build_mlp_onnx(root / "two.onnx", seed=22, classes=3),
    }


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, artefacts: dict[str, Path]
) -> Iterator[Settings]:
    state = tmp_path_factory.mktemp("oip-state")
    settings = Settings(
        state_dir=state,
        gateway_port=_free_port(),
        gateway_admin_token="oip-admin-token-0",
        keyring_path=state / "keyring.json",
        signing_key_path=state / "signing-key.pem",
    )
    with (
        GatewayProcess.start(
            settings, log_path=state / "gw.log", timeout=30, exit_with_parent=True
        ),
        GatewayClient(settings.gateway_url, settings.admin_token()) as admin,
    ):
        admin.set_deployment(
            Deployment(
                model=MODEL,
                champion=spec_for(artefacts["1"], "1"),
                canary=spec_for(artefacts["2"], "2"),
                canary_weight=0,
            )
        )
        yield settings
    log = (state / "gw.log").read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def triton(gateway: Settings) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(f"{gateway.gateway_host}:{gateway.gateway_port}")
    try:
        yield client
    finally:
        client.close()


def expected(path: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(load_predictor(path, "onnxruntime").predict(x))


def infer_input(x: np.ndarray, *, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_tritonclient_sees_a_live_ready_server_and_the_models_signature(
    triton: httpclient.InferenceServerClient,
) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    assert triton.is_model_ready(MODEL, "2")
    assert not triton.is_model_ready("other")
    meta = triton.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, F]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_with_json_and_binary_tensors(
    triton: httpclient.InferenceServerClient, artefacts: dict[str, Path], binary: bool
) -> None:
    x = np.random.default_rng(5).normal(size=(3, F)).astype(np.float32)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    result = triton.infer(MODEL, [infer_input(x, binary=binary)], outputs=outputs, request_id="t-1")
    response = result.get_response()
    assert (response["model_version"], response["id"]) == ("1", "t-1")
    # Binary output carries its size instead of a "data" list.
    assert ("data" in response["outputs"][0]) is not binary
    np.testing.assert_allclose(result.as_numpy("logits"), expected(artefacts["1"], x), rtol=1e-6)


def test_tritonclient_version_pinned_request_bypasses_the_split(
    triton: httpclient.InferenceServerClient, artefacts: dict[str, Path]
) -> None:
    x = np.random.default_rng(6).normal(size=(2, F)).astype(np.float32)
    result = triton.infer(MODEL, [infer_input(x, binary=True)], model_version="2")
    assert result.get_response()["model_version"] == "2", "canary weight is 0, pin must win"
    logits = result.as_numpy("logits")
    assert logits is not None and logits.shape == (2, 3)
    np.testing.assert_allclose(logits, expected(artefacts["2"], x), rtol=1e-6)
    with pytest.raises(InferenceServerException, match="no serving version '7'"):
        triton.infer(MODEL, [infer_input(x, binary=True)], model_version="7")


def test_tritonclient_wrong_shape_raises_with_the_gateways_message(
    triton: httpclient.InferenceServerClient,
) -> None:
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(InferenceServerException, match=r"has shape \[2, 5\], the model takes"):
        triton.infer(MODEL, [infer_input(x, binary=False)])
