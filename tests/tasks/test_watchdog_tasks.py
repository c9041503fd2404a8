"""The watchdog's tasks via .fn(): state on disk, a real gateway process for the statistics and the
heartbeat, the report's audit entry, artifact and event (Prefect's publishers captured)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ballast.anomaly import DetectorPolicy, DetectorState, MetricState
from ballast.audit import read as read_audit
from ballast.audit import verify_chain
from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.serving import Deployment
from ballast.settings import Settings
from ballast.watchdog import (
    ERROR_RATE,
    Observation,
    Response,
    WatchdogDecision,
    WatchdogPolicy,
)
from infra.gateway.testing import build_mlp_onnx, spec_for
from tasks import watchdog as wt

pytestmark = pytest.mark.integration

POLICY = WatchdogPolicy(detector=DetectorPolicy(warmup=3, min_count=20))


@dataclass
class FakeVersion:
    version: str


class FakeRegistry:
    """Only what check_champion reads: the champion and previous aliases."""

    def __init__(self, champion: str | None, previous: str | None) -> None:
        self.aliases = {"champion": champion, "previous": previous}

    def get_by_alias(self, name: str, alias: str) -> FakeVersion | None:
        v = self.aliases.get(alias)
        return None if v is None else FakeVersion(v)


def test_state_is_written_atomically_and_read_back(settings: Settings) -> None:
    path = wt.state_path(settings, "my model/1")
    assert path.name == "my_model_1.json" and path.parent.name == "watchdog"
    state = DetectorState(
        model="m", version="3", metrics={"error_rate": MetricState(level=0.01)}, checks=4
    )
    wt.save_state(path, state)
    assert wt.load_state(path, "m") == state
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left"
    # A failed write leaves the old state whole.
    with pytest.raises(TypeError):
        wt.save_state(path, DetectorState(model="m", snapshot={"x": object()}))
    assert wt.load_state(path, "m") == state
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_an_unreadable_state_starts_a_fresh_baseline(settings: Settings) -> None:
    path = wt.state_path(settings, "m")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert wt.load_state(path, "m") == DetectorState(model="m")
    path.write_text("[1, 2]")
    assert wt.load_state(path, "m") == DetectorState(model="m")
    assert wt.load_state(path.with_name("absent.json"), "m") == DetectorState(model="m")
    # JSON, but not a state (a hand edit): before, every run failed on it for good.
    for doc in ('{"metrics": {"error_rate": null}}', '{"metrics": [1]}', '{"checks": "many"}'):
        path.write_text(doc)
        assert wt.load_state(path, "m") == DetectorState(model="m"), doc


@pytest.fixture
def gateway(settings: Settings, tmp_path: Path) -> Iterator[GatewayClient]:
    """A real gateway process serving version 3 of `settings.model_name` as champion."""
    spec = spec_for(build_mlp_onnx(tmp_path / "three.onnx", seed=3), "3")
    with (
        GatewayProcess.start(
            settings, log_path=tmp_path / "gw.log", timeout=30, exit_with_parent=True
        ),
        GatewayClient(settings.gateway_url, settings.admin_token()) as client,
    ):
        client.set_deployment(Deployment(model=settings.model_name, champion=spec))
        yield client


def _traffic(client: GatewayClient, model: str, n: int) -> None:
    for _ in range(n):
        with contextlib.suppress(Exception):  # injected faults answer 500: that is the point
            client.predict(model, [[0.1] * 30])


def test_check_champion_reads_the_real_gateway_and_detects_a_fault(
    settings: Settings, gateway: GatewayClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = settings.model_name
    monkeypatch.setattr(wt, "registry", lambda s=None: FakeRegistry("3", "2"))
    statuses = []
    for _ in range(3):  # first look + 2 warm-up windows; the third sets the baseline
        _traffic(gateway, model, 30)
        check = wt.check_champion.fn(model, POLICY)
        statuses.append(check.decision.status)
        assert check.previous == "2"
    assert statuses == ["insufficient_data"] * 3
    _traffic(gateway, model, 30)
    check = wt.check_champion.fn(model, POLICY)
    assert check.decision.status == "healthy", check.decision.summary()
    obs = check.decision.observation
    assert obs.requests == 30 and obs.errors == 0 and obs.replica
    # Class counts come from the same replica's /admin/stats answer as the request counts.
    assert obs.class_counts is not None and sum(obs.class_counts.values()) == 30, obs
    saved = json.loads(wt.state_path(settings, model).read_text())
    assert saved["version"] == "3" and saved["checks"] == 4
    # The champion starts failing 30 % of its requests (the gateway's injected fault).
    dep = gateway.get_deployment()
    assert dep is not None and dep.champion is not None
    gateway.set_deployment(
        dep.model_copy(update={"champion": dep.champion.model_copy(update={"fault": "errors"})})
    )
    statuses = []
    for _ in range(3):
        _traffic(gateway, model, 60)
        check = wt.check_champion.fn(model, POLICY)
        statuses.append(check.decision.status)
        if check.decision.status == "breach":
            break
    assert statuses[-1] == "breach", statuses
    assert check.decision.culprit is not None and check.decision.culprit.metric == ERROR_RATE


def test_check_champion_reports_a_gateway_that_is_down(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wt, "registry", lambda s=None: FakeRegistry("3", "2"))
    check = wt.check_champion.fn(settings.model_name, POLICY)
    assert check.decision.status == "unavailable" and not check.decision.healthy
    assert "unreachable" in check.decision.reasons[0]


def test_check_champion_without_a_champion_has_nothing_to_watch(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wt, "registry", lambda s=None: FakeRegistry(None, None))
    check = wt.check_champion.fn(settings.model_name, POLICY)
    assert check.decision.status == "insufficient_data" and check.decision.healthy
    assert check.previous is None


def test_heartbeat_reaches_the_gateway_and_a_down_gateway_is_not_an_error(
    settings: Settings, gateway: GatewayClient
) -> None:
    model = settings.model_name
    assert wt.send_heartbeat.fn(model, False, "breach model=x") is True
    metrics = gateway._http.get("/metrics").text
    assert f'ballast_watchdog_healthy{{model="{model}"}} 0.0' in metrics
    assert wt.send_heartbeat.fn(model, True) is True
    assert f'ballast_watchdog_healthy{{model="{model}"}} 1.0' in gateway._http.get("/metrics").text


def test_heartbeat_to_a_gateway_that_is_down_returns_false(settings: Settings) -> None:
    assert wt.send_heartbeat.fn(settings.model_name, True) is False


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    seen: dict[str, list[dict[str, Any]]] = {"artifacts": [], "events": []}

    def artifact(**kw: Any) -> str:
        seen["artifacts"].append(kw)
        return "artifact-1"

    def event(**kw: Any) -> None:
        seen["events"].append(kw)

    monkeypatch.setattr(wt, "create_markdown_artifact", artifact)
    monkeypatch.setattr(wt, "emit_event", event)
    return seen


def _breach(settings: Settings) -> WatchdogDecision:
    from ballast.anomaly import MetricVerdict

    verdict = MetricVerdict(
        ERROR_RATE, "breach", 0.3, 600, baseline=0.001, scale=0.004, z=70.0, cusum=10.5,
        threshold=8.0, reason="error_rate 0.3 above its baseline 0.001",
    )  # fmt: skip
    obs = Observation(
        model=settings.model_name, version="3", requests=600, errors=180, replica="r9"
    )
    return WatchdogDecision(
        "breach",
        settings.model_name,
        "3",
        (verdict,),
        (verdict.reason,),
        DetectorState(settings.model_name),
        obs,
    )


def test_report_of_a_rollback_audits_publishes_and_emits(
    settings: Settings, published: dict[str, list[dict[str, Any]]]
) -> None:
    d = _breach(settings)
    fault_md = "# Fault report: m version 3\n\nlog lines\n"
    artifact_id = wt.report_incident.fn(
        d, Response("rollback", "back to 2"), rolled_back_to="2", localisation=fault_md
    )
    assert artifact_id == "artifact-1"
    (entry,) = read_audit(settings.audit_log)
    assert entry["action"] == "watchdog_rollback" and entry["version"] == "3"
    assert entry["metric"] == ERROR_RATE and entry["replica"] == "r9"
    assert entry["rolled_back_to"] == "2" and entry["evidence"]["window"]["errors"] == 180
    assert verify_chain(settings.audit_log) == []
    (art,) = published["artifacts"]
    assert art["key"] == f"watchdog-{settings.model_name}"
    md = art["markdown"]
    assert "metric that broke: **error_rate**" in md and "replica: `r9`" in md
    assert "rolled back to 2" in md and md.rstrip().endswith("log lines")
    (ev,) = published["events"]
    assert ev["event"] == "ballast.watchdog.breach"
    assert ev["payload"]["rolled_back_to"] == "2" and ev["payload"]["metric"] == ERROR_RATE


def test_report_without_previous_alerts_and_a_failed_event_is_not_fatal(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, published: dict[str, list[dict[str, Any]]]
) -> None:
    def broken(**kw: Any) -> None:
        raise RuntimeError("events down")

    monkeypatch.setattr(wt, "emit_event", broken)
    d = _breach(settings)
    wt.report_incident.fn(d, Response("alert", "breach, but m has no previous version"))
    (entry,) = read_audit(settings.audit_log)
    assert entry["action"] == "watchdog_alert" and entry["rolled_back_to"] is None
    assert "no previous version" in published["artifacts"][0]["markdown"]


def test_localisation_is_guarded(settings: Settings, tmp_path: Path) -> None:
    d = _breach(settings)
    assert "No gateway log" in wt.localisation_markdown(settings, d, [], 900)
    log = tmp_path / "gw.log"
    log.write_text("not json at all\n")
    md = wt.localisation_markdown(settings, d, [log], 900)
    assert md.startswith("# Fault report") and "Metric that broke" in md
    missing = wt.localisation_markdown(settings, d, [tmp_path / "absent.log"], 900)
    assert "Fault report" in missing or "failed" in missing
    assert os.path.exists(log)


def test_an_artifact_that_cannot_be_created_does_not_fail_the_report(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, published: dict[str, list[dict[str, Any]]]
) -> None:
    # Before: a Prefect API hiccup here replaced a failed rollback's own error as the run's
    # error and skipped the heartbeat the flow sends next.
    def broken(**kw: Any) -> None:
        raise RuntimeError("artifacts down")

    monkeypatch.setattr(wt, "create_markdown_artifact", broken)
    d = _breach(settings)
    assert wt.report_incident.fn(d, Response("rollback", "back to 2"), rolled_back_to="2") is None
    (entry,) = read_audit(settings.audit_log)
    assert entry["action"] == "watchdog_rollback"
    (ev,) = published["events"]  # the event still goes out
    assert ev["payload"]["rolled_back_to"] == "2"
