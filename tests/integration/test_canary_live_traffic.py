"""A canary judged on real clients' traffic (``BALLAST_CANARY_TRAFFIC=live``): the controller
sends nothing; "users" (a separate load thread, as a client fleet would) keep calling the
gateway, and the judge reads what they got from every replica via ``/admin/observations``.
Two replicas, real ONNX models, real HTTP."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ballast.canary import live_traffic, run_canary
from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.judge import ThresholdJudge
from ballast.loadgen import LoadThread
from ballast.serving import Deployment
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "m"
# Latency is what the clients saw. With 30 candidate answers a step one machine stall on a
# 2-core CI box (0.77 s, seen) can put two of them in the slowest 5 % and roll a healthy
# candidate back on p95; with 100 it would take a dozen stalls.
MIN_SAMPLES = 100


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Path, Path]]:
    d = tmp_path_factory.mktemp("live")
    champion = build_mlp_onnx(d / "champion.onnx", seed=1)
    same = d / "same.onnx"
    shutil.copyfile(champion, same)
    s = Settings(state_dir=d / "state", gateway_port=free_port())
    with GatewayProcess.start(s, workers=2, exit_with_parent=True, timeout=30):
        yield s, champion, same


def _canary(s: Settings, champion: Path, same: Path, fault: str | None) -> object:
    champ = spec_for(champion, "1")
    cand = spec_for(same, "2", fault=fault)  # type: ignore[arg-type]
    rows = np.random.default_rng(0).normal(size=(64, 30)).astype(np.float32)
    with GatewayClient(s.gateway_url, s.admin_token()) as gw:
        gw.set_deployment(Deployment(model=MODEL, champion=champ))
        with LoadThread(s.gateway_url, MODEL, rows, concurrency=3, max_seconds=60):
            return run_canary(
                gw,
                model=MODEL,
                champion=champ,
                candidate=cand,
                steps=(10, 50, 100),
                judge=ThresholdJudge(min_samples=MIN_SAMPLES),
                load=live_traffic(
                    s.gateway_url,
                    s.admin_token(),
                    candidate_version="2",
                    min_samples=MIN_SAMPLES,
                    max_seconds=10,
                ),
                min_samples=MIN_SAMPLES,
                step_max_seconds=10,
            )


def test_a_failing_candidate_is_rolled_back_on_what_real_clients_got(
    setup: tuple[Settings, Path, Path],
) -> None:
    result = _canary(*setup, fault="errors")
    assert result.decision == "rollback", result.reasons  # type: ignore[attr-defined]
    assert any("error rate" in r for r in result.reasons)  # type: ignore[attr-defined]
    assert result.evidence["canary_n"] >= MIN_SAMPLES  # type: ignore[attr-defined]
    # No labels on live traffic: nothing was judged on accuracy.
    assert "limit_accuracy" not in result.evidence  # type: ignore[attr-defined]


def test_a_healthy_candidate_is_promoted_on_live_traffic(
    setup: tuple[Settings, Path, Path],
) -> None:
    s = setup[0]
    result = _canary(*setup, fault=None)
    assert result.decision == "promote", result.reasons  # type: ignore[attr-defined]
    assert [st.weight for st in result.steps] == [10, 50, 100]  # type: ignore[attr-defined]
    # A look without a cursor only says where this replica is: nothing from before is judged.
    # (A new connection may reach the replica that served nothing: look until one that did.)
    for _ in range(50):
        with GatewayClient(s.gateway_url, s.admin_token()) as gw:
            page = gw.observations({})
        if page["next"] > 0:
            break
    assert page["observations"] == [] and page["next"] > 0
