"""A latency-injected candidate against a real gateway process, judged by the SequentialJudge.

Real process, real HTTP load, real ONNX models: the candidate's weights equal the champion's, so
the only thing wrong with it is the gateway's injected 60 ms delay, and the judge must name
latency alone. The wall-clock time to rollback is printed (run with ``-s`` to see it).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from ballast.canary import StepRecord, http_load, run_canary
from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.judge import SequentialJudge
from ballast.loadgen import run_load
from ballast.runtime import OnnxRuntimePredictor
from ballast.serving import Deployment, VersionSpec
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "breast-cancer-mlp"
STEPS = (5, 25, 50, 100)
MIN_SAMPLES = 200  # candidate answers per step before the controller may move on
STEP_MAX_S = 20.0
# Each load call stops after this many candidate answers, so the judge is asked every few
# candidate requests (it may be asked as often as one likes).
PER_CALL = 3


@dataclass(frozen=True)
class Live:
    client: GatewayClient
    url: str
    champion: VersionSpec
    slow: VersionSpec
    rows: np.ndarray
    labels: np.ndarray


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    d = tmp_path_factory.mktemp("artefacts")
    champion = build_mlp_onnx(d / "champion.onnx", seed=1)
    same = d / "same.onnx"
    shutil.copyfile(champion, same)
    rows = np.random.default_rng(0).normal(size=(256, 30)).astype(np.float32)
    labels = OnnxRuntimePredictor(champion).predict(rows).argmax(axis=1)
    s = Settings(state_dir=tmp_path_factory.mktemp("gw") / "state", gateway_port=free_port())
    with (
        GatewayProcess.start(s) as proc,
        GatewayClient(proc.url, s.admin_token()) as client,
    ):
        champ = spec_for(champion, "1")
        client.set_deployment(Deployment(model=MODEL, champion=champ))
        yield Live(client, proc.url, champ, spec_for(same, "2", fault="latency"), rows, labels)


def test_latency_injected_candidate_is_rolled_back_by_the_sequential_judge(live: Live) -> None:
    judge = SequentialJudge()
    steps: list[StepRecord] = []
    load = http_load(
        live.url,
        MODEL,
        live.rows,
        live.labels,
        candidate_version=live.slow.version,
        min_samples=PER_CALL,
        max_seconds=STEP_MAX_S,
        concurrency=8,
    )

    started = time.monotonic()
    result = run_canary(
        live.client,
        model=MODEL,
        champion=live.champion,
        candidate=live.slow,
        steps=STEPS,
        judge=judge,
        load=load,
        min_samples=MIN_SAMPLES,
        step_max_seconds=STEP_MAX_S,
        on_step=steps.append,
    )
    wall = time.monotonic() - started
    ev = result.evidence
    print(
        f"\nlatency canary rolled back after {result.seconds_to_decision:.2f} s "
        f"(wall {wall:.2f} s, {ev['canary_n']:.0f} canary / {ev['baseline_n']:.0f} champion "
        f"requests, latency e-value 1e{ev['latency_max_log_e'] / np.log(10):.1f})"
    )

    assert result.decision == "rollback", result.reasons
    assert [s.weight for s in result.steps] == [STEPS[0]], "caught in the first step"
    assert len(result.reasons) == 1 and result.reasons[0].startswith("latency:"), result.reasons
    assert ev["latency_failed"] == 1.0
    assert ev["errors_failed"] == 0.0 and ev["accuracy_failed"] == 0.0
    assert ev["latency_max_log_e"] >= ev["latency_log_threshold"]
    assert ev["canary_p50_ms"] >= 60.0, "every candidate answer carries the injected 60 ms"
    assert ev["canary_n"] < MIN_SAMPLES, "decided before the step's minimum sample count"
    assert result.seconds_to_decision < STEP_MAX_S
    # The champion alone serves again, and answers for itself.
    assert live.client.get_deployment() == Deployment(model=MODEL, champion=live.champion)
    obs = run_load(live.url, MODEL, live.rows, None, concurrency=2, max_requests=40, max_seconds=5)
    assert {o.version for o in obs} == {"1"}
    assert all(o.ok for o in obs)
