"""Canaries against a real gateway process, real HTTP load and real ONNX models.

One gateway serves the whole module (started in about 0.5 s); every test begins from the
champion alone. The fault cases use a candidate whose weights equal the champion's, so the only
thing wrong with it is the injected fault and the rollback reasons must name exactly that.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ballast.canary import CanaryResult, LoadFn, http_load, run_canary
from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.judge import Observation, ThresholdJudge, stats_by_version
from ballast.loadgen import LoadThread, run_load
from ballast.runtime import OnnxRuntimePredictor
from ballast.serving import Deployment, Fault, VersionSpec
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "breast-cancer-mlp"
STEPS = (10, 50, 100)
MIN_SAMPLES = 30
STEP_MAX_S = 5.0
CONCURRENCY = 4
JUDGE = ThresholdJudge(min_samples=MIN_SAMPLES)
# Tests whose verdict latency must not touch (a healthy candidate must pass every step; an
# erroring one must be rolled back on errors alone) take more answers a step. Latency is measured
# by the client, and a 2-core CI box once stalled for 0.77 s while two of the canary's 30
# first-step answers were in flight: its p95 read 765 ms against a 13.5 ms limit and a healthy
# canary was rolled back. With 100 answers a step one stall (at most CONCURRENCY requests, a
# tenth of them the canary's) cannot reach the slowest 5 %; it would take a dozen.
STALL_PROOF_MIN_SAMPLES = 100


@dataclass(frozen=True)
class Artefacts:
    champion: Path  # seed 1
    same: Path  # a byte-for-byte copy of the champion: a candidate that behaves identically
    other: Path  # seed 2: different weights, so different answers ("bad weights")
    rows: np.ndarray
    labels: np.ndarray  # the champion's own answers: it scores 1.0 by construction


@dataclass(frozen=True)
class Live:
    client: GatewayClient
    url: str
    art: Artefacts

    @property
    def champion(self) -> VersionSpec:
        return spec_for(self.art.champion, "1")

    def candidate(self, fault: Fault | None = None, *, path: Path | None = None) -> VersionSpec:
        return spec_for(path or self.art.same, "2", fault=fault)

    def load(self, candidate: VersionSpec, min_samples: int = MIN_SAMPLES) -> LoadFn:
        return http_load(
            self.url,
            MODEL,
            self.art.rows,
            self.art.labels,
            candidate_version=candidate.version,
            min_samples=min_samples,
            max_seconds=STEP_MAX_S,
            concurrency=CONCURRENCY,
        )

    def canary(
        self,
        candidate: VersionSpec,
        *,
        champion: VersionSpec | None,
        load: LoadFn | None = None,
        min_samples: int = MIN_SAMPLES,
    ) -> CanaryResult:
        return run_canary(
            self.client,
            model=MODEL,
            champion=champion,
            candidate=candidate,
            steps=STEPS,
            judge=JUDGE if min_samples == MIN_SAMPLES else ThresholdJudge(min_samples=min_samples),
            load=load or self.load(candidate, min_samples),
            min_samples=min_samples,
            step_max_seconds=STEP_MAX_S,
        )


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Artefacts:
    d = tmp_path_factory.mktemp("artefacts")
    champion = build_mlp_onnx(d / "champion.onnx", seed=1)
    same = d / "same.onnx"
    shutil.copyfile(champion, same)
    other = build_mlp_onnx(d / "other.onnx", seed=2)
    rows = np.random.default_rng(0).normal(size=(256, 30)).astype(np.float32)
    labels = OnnxRuntimePredictor(champion).predict(rows).argmax(axis=1)
    return Artefacts(champion, same, other, rows, labels)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, artefacts: Artefacts) -> Iterator[Live]:
    # Built explicitly (not the function-scoped `settings` fixture) so one gateway serves the
    # module; the admin token is created in state_dir, where the child process reads it too.
    s = Settings(state_dir=tmp_path_factory.mktemp("gw") / "state", gateway_port=free_port())
    with (
        GatewayProcess.start(s) as proc,
        GatewayClient(proc.url, s.admin_token()) as client,
    ):
        yield Live(client, proc.url, artefacts)


@pytest.fixture
def live(gateway: Live) -> Live:
    """The module's gateway, serving the champion alone."""
    gateway.client.set_deployment(Deployment(model=MODEL, champion=gateway.champion))
    return gateway


def champion_only(live: Live) -> Deployment:
    return Deployment(model=MODEL, champion=live.champion)


def versions_answering(live: Live, n: int = 60) -> set[str]:
    obs = run_load(
        live.url, MODEL, live.art.rows, None, concurrency=2, max_requests=n, max_seconds=5
    )
    assert all(o.ok for o in obs), "the deployment left in force must serve cleanly"
    return {o.version for o in obs}


# ------------------------------------------------------------------------------ canaries


def test_erroring_candidate_is_rolled_back_at_the_first_step_with_evidence(live: Live) -> None:
    result = live.canary(
        live.candidate("errors"), champion=live.champion, min_samples=STALL_PROOF_MIN_SAMPLES
    )

    assert result.decision == "rollback", result.reasons
    assert [s.weight for s in result.steps] == [STEPS[0]], "must not wait for later steps"
    assert result.reasons and all("error rate" in r for r in result.reasons), result.reasons
    assert result.evidence["canary_error_rate"] > JUDGE.max_error_rate
    assert result.evidence["canary_n"] >= STALL_PROOF_MIN_SAMPLES
    assert result.seconds_to_decision < STEP_MAX_S, "rollback comes with the evidence, not a timer"
    assert result.evidence["baseline_error_rate"] == 0.0
    assert live.client.get_deployment() == champion_only(live)
    assert versions_answering(live) == {"1"}


def test_slow_candidate_is_rolled_back_on_latency(live: Live) -> None:
    result = live.canary(live.candidate("latency"), champion=live.champion)

    assert result.decision == "rollback", result.reasons
    assert result.reasons and all("p95 latency" in r for r in result.reasons), result.reasons
    assert result.evidence["canary_p95_ms"] > result.evidence["limit_p95_ms"]
    assert result.evidence["canary_p95_ms"] >= 60.0, "the injected delay is 60 ms"
    assert live.client.get_deployment() == champion_only(live)


def test_candidate_with_different_answers_is_rolled_back_on_accuracy(live: Live) -> None:
    result = live.canary(live.candidate("bad-weights", path=live.art.other), champion=live.champion)

    assert result.decision == "rollback", result.reasons
    assert any("accuracy" in r for r in result.reasons), result.reasons
    assert result.evidence["baseline_accuracy"] == 1.0
    assert result.evidence["canary_accuracy"] < result.evidence["limit_accuracy"]
    assert live.client.get_deployment() == champion_only(live)


def test_healthy_candidate_is_promoted_after_every_step(live: Live) -> None:
    candidate = live.candidate()
    result = live.canary(candidate, champion=live.champion, min_samples=STALL_PROOF_MIN_SAMPLES)

    assert result.decision == "promote", result.reasons
    assert [s.weight for s in result.steps] == list(STEPS)
    assert [s.verdict.decision for s in result.steps] == ["continue", "continue", "promote"]
    assert all(s.counts.get("2", 0) >= STALL_PROOF_MIN_SAMPLES for s in result.steps)
    assert result.steps[0].counts.get("1", 0) > result.steps[0].counts["2"], "10% is a minority"
    assert live.client.get_deployment() == Deployment(model=MODEL, champion=candidate)
    assert versions_answering(live) == {"2"}


def test_first_release_goes_straight_to_all_traffic(live: Live) -> None:
    live.client.set_deployment(Deployment(model=MODEL))  # nothing served yet
    candidate = live.champion

    result = live.canary(candidate, champion=None)

    assert result.decision == "promote", result.reasons
    assert [s.weight for s in result.steps] == [100]
    assert "no baseline: absolute thresholds only" in result.reasons
    assert live.client.get_deployment() == Deployment(model=MODEL, champion=candidate)


def test_failure_during_step_two_restores_the_champion_and_reraises(live: Live) -> None:
    candidate = live.candidate()
    real = live.load(candidate, STALL_PROOF_MIN_SAMPLES)
    calls: list[int] = []

    def load_that_breaks(weight: int) -> list[Observation]:
        calls.append(weight)
        if len(calls) == 2:
            raise RuntimeError("load generator lost its data")
        return real(weight)

    with pytest.raises(RuntimeError, match="lost its data"):
        live.canary(
            candidate,
            champion=live.champion,
            load=load_that_breaks,
            min_samples=STALL_PROOF_MIN_SAMPLES,
        )

    assert calls == [STEPS[0], STEPS[1]], "the failure happened at step 2"
    restored = live.client.get_deployment()
    assert restored == champion_only(live), restored
    assert restored is not None
    assert restored.canary is None
    assert restored.canary_weight == 0
    assert versions_answering(live) == {"1"}


# ------------------------------------------------------------------------------ load generator


def test_load_attributes_each_answer_to_the_version_that_gave_it(live: Live) -> None:
    live.client.set_deployment(
        Deployment(
            model=MODEL,
            champion=live.champion,
            canary=live.candidate("errors"),
            canary_weight=50,
        )
    )
    obs = run_load(
        live.url,
        MODEL,
        live.art.rows,
        live.art.labels,
        concurrency=CONCURRENCY,
        max_requests=300,
        max_seconds=10,
    )
    by = stats_by_version(obs)

    assert len(obs) == 300, "max_requests bounds the count"
    assert set(by) == {"1", "2"}
    assert by["1"].errors == 0
    assert by["2"].error_rate > 0.1, "the injected 500s carry the canary's version header"
    assert by["1"].accuracy == 1.0
    assert by["2"].n_labelled == by["2"].n_ok, "only successful answers are labelled"


def test_load_stops_when_asked_and_within_its_time_bound(live: Live) -> None:
    started = time.monotonic()
    obs = run_load(
        live.url,
        MODEL,
        live.art.rows,
        None,
        concurrency=CONCURRENCY,
        max_requests=1_000_000,
        max_seconds=0.5,
    )
    assert time.monotonic() - started < 5  # a million requests would take minutes
    assert obs, "half a second is plenty for some answers"

    stopped = run_load(
        live.url,
        MODEL,
        live.art.rows,
        None,
        concurrency=CONCURRENCY,
        max_requests=1_000_000,
        max_seconds=10,
        stop_when=lambda counts: "1" in counts and counts["1"].n >= 20,
    )
    assert 20 <= len(stopped) < 20 + CONCURRENCY, "in-flight requests finish, no new ones start"


def test_unreachable_gateway_gives_unknown_failures() -> None:
    rows = np.zeros((2, 30), dtype=np.float32)
    obs = run_load(
        f"http://127.0.0.1:{free_port()}", MODEL, rows, concurrency=2, max_requests=6, max_seconds=5
    )
    assert len(obs) == 6
    assert {(o.version, o.ok) for o in obs} == {("unknown", False)}


def test_load_runs_from_a_thread_whose_event_loop_is_running(live: Live) -> None:
    async def caller() -> list[Observation]:
        # Sync code called from async code: asyncio.run would refuse here.
        return run_load(
            live.url, MODEL, live.art.rows, None, concurrency=2, max_requests=20, max_seconds=5
        )

    obs = asyncio.run(caller())
    assert len(obs) == 20
    assert all(o.ok and o.version == "1" for o in obs)


def test_background_load_follows_a_deployment_change(live: Live) -> None:
    candidate = live.candidate()
    with LoadThread(live.url, MODEL, live.art.rows, concurrency=2, max_seconds=10) as load:
        time.sleep(0.3)
        live.client.set_deployment(Deployment(model=MODEL, champion=candidate))
        time.sleep(0.3)
        assert load.running
    obs = load.stop()
    assert not load.running
    versions = [o.version for o in obs]
    assert versions[0] == "1"
    assert versions[-1] == "2", "answers after the switch come from the new champion"
    assert all(o.ok for o in obs), "a deployment switch must not fail requests"
