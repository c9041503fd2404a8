"""The champion watchdog flow under Prefect, against a real gateway process and MLflow store.

Tests in this module run in order and share one state: two releases make a champion and a
previous version; the watchdog finds the champion healthy, then, once the gateway fails 30 % of
its requests, rolls back to previous; the new champion then has no previous and only alerts.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

from ballast.audit import read as read_audit
from ballast.gateway_client import GatewayClient
from ballast.release import ALIAS_CHAMPION, ALIAS_PREVIOUS
from ballast.settings import Settings, get_settings
from flows.release import release_flow
from flows.watchdog import WatchdogReport, champion_watchdog_flow
from model_registry import Registry
from tests.conftest import free_port
from tests.flows.conftest import next_distinct_release

pytestmark = pytest.mark.flow

# Small windows so that a test run is a few flow runs, not hours of 5-minute checks.
FLOW_ARGS: dict[str, Any] = {"warmup_checks": 3, "min_requests": 20}
ROWS = np.random.default_rng(0).normal(size=(64, 30)).astype(np.float32)


@pytest.fixture(scope="module")
def env(release_env: Settings) -> Settings:
    """release_env with a champion and a previous version (two promoted releases).

    Each release is made distinct (a rerun of the champion is ``unchanged``). The fixture's
    canary judges accuracy on about 30 requests, so a healthy release is occasionally rolled
    back as noise: release again (that is not what this module tests)."""
    promoted = []
    for _ in range(6):
        next_distinct_release()
        report = release_flow()
        if report.outcome == "promoted":
            promoted.append(report.version)
        if len(promoted) == 2:
            break
    assert len(promoted) == 2, promoted
    return release_env


def _registry(s: Settings) -> Registry:
    return Registry(s.tracking_uri, s.artifact_root)


def _traffic(s: Settings, n: int) -> None:
    with GatewayClient(s.gateway_url) as gw:
        for i in range(n):
            # An injected fault answers 500: the gateway counts it, which is the point.
            with contextlib.suppress(Exception):
                gw.predict_array(s.model_name, ROWS[i % len(ROWS)][None, :])


def _watch(s: Settings) -> WatchdogReport:
    logs = [str(s.state_dir.parent / "gateway.log")]
    return champion_watchdog_flow(gateway_logs=logs, **FLOW_ARGS)


def _healthy_gauge(s: Settings) -> str | None:
    with GatewayClient(s.gateway_url) as gw:
        text = gw._http.get("/metrics").text
    prefix = f'ballast_watchdog_healthy{{model="{s.model_name}"}} '
    line = next((ln for ln in text.splitlines() if ln.startswith(prefix)), None)
    return None if line is None else line[len(prefix) :]


def _set_fault(s: Settings, fault: str | None) -> None:
    with GatewayClient(s.gateway_url, s.admin_token()) as gw:
        dep = gw.get_deployment()
        assert dep is not None and dep.champion is not None
        champion = dep.champion.model_copy(update={"fault": fault})
        gw.set_deployment(dep.model_copy(update={"champion": champion}))


def _artifacts(key: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def test_a_healthy_champion_is_left_alone_and_the_heartbeat_says_so(env: Settings) -> None:
    s = env
    reg = _registry(s)
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None
    reports = []
    for _ in range(5):  # first look, warm-up, then judged windows
        _traffic(s, 30)
        reports.append(_watch(s))
    assert [r.status for r in reports[:3]] == ["insufficient_data"] * 3
    assert [r.status for r in reports[3:]] == ["healthy", "healthy"]
    assert all(r.action == "none" and r.heartbeat_sent for r in reports)
    assert all(r.version == champion.version for r in reports)
    assert _healthy_gauge(s) == "1.0"
    after = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert after is not None and after.version == champion.version
    assert not any(e["action"].startswith("watchdog") for e in read_audit(s.audit_log))


def test_a_failing_champion_is_rolled_back_to_previous_with_a_report(env: Settings) -> None:
    s = env
    reg = _registry(s)
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    previous = reg.get_by_alias(s.model_name, ALIAS_PREVIOUS)
    assert champion is not None and previous is not None
    _set_fault(s, "errors")  # the gateway now fails 30 % of the champion's requests
    reports = []
    for _ in range(4):
        _traffic(s, 60)
        report = _watch(s)
        reports.append(report)
        if report.action != "none":
            break
    report = reports[-1]
    assert report.action == "rollback" and report.status == "breach", reports
    assert len(reports) <= 3, "a 30 % error rate is caught within three checks"
    assert report.version == champion.version and report.rolled_back_to == previous.version
    assert report.metric == "error_rate" and report.replica
    # Aliases moved, the gateway serves previous (without the fault), the audit says why.
    now = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert now is not None and now.version == previous.version
    assert reg.get_by_alias(s.model_name, ALIAS_PREVIOUS) is None
    with GatewayClient(s.gateway_url, s.admin_token()) as gw:
        dep = gw.get_deployment()
    assert dep is not None and dep.champion is not None
    assert dep.champion.version == previous.version and dep.champion.fault is None
    entries = read_audit(s.audit_log)
    assert [e["action"] for e in entries[-2:]] == ["rollback", "watchdog_rollback"]
    assert "watchdog" in entries[-2]["why"] and "error_rate" in entries[-2]["why"], entries[-2]
    audit = entries[-1]
    assert audit["version"] == champion.version and audit["rolled_back_to"] == previous.version
    assert audit["metric"] == "error_rate" and audit["replica"] == report.replica
    # The heartbeat says unhealthy (the alert fires for an automatic rollback), and the artifact
    # names the version, replica and metric, with the gateway log's fault report.
    assert report.heartbeat_sent and _healthy_gauge(s) == "0.0"
    (art,) = [a for a in _artifacts(f"watchdog-{s.model_name}") if str(a.id) == report.artifact_id]
    md = art.data
    assert f"version: `{champion.version}`" in md and f"replica: `{report.replica}`" in md
    assert "metric that broke: **error_rate**" in md
    assert f"rolled back to {previous.version}" in md
    assert f"# Fault report: {s.model_name} version {champion.version}" in md
    assert "failed requests" in md


def test_without_previous_a_breach_alerts_without_crashing(env: Settings) -> None:
    s = env
    reg = _registry(s)
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None and reg.get_by_alias(s.model_name, ALIAS_PREVIOUS) is None
    _set_fault(s, "errors")
    reports = []
    for _ in range(4):  # first look at the new champion, then the hard ceiling needs two windows
        _traffic(s, 60)
        report = _watch(s)
        reports.append(report)
        if report.action != "none":
            break
    report = reports[-1]
    assert report.status == "breach" and report.action == "alert", reports
    assert "no previous" in report.reason and report.rolled_back_to is None
    assert report.artifact_id and report.heartbeat_sent and _healthy_gauge(s) == "0.0"
    after = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert after is not None and after.version == champion.version, "nothing to roll back to"
    last = read_audit(s.audit_log)[-1]
    assert last["action"] == "watchdog_alert" and last["version"] == champion.version
    assert not report.already_reported
    # The next run finds the same breach it cannot act on: not reported again (before: an
    # audit entry, artifact and event every 5 min), while the heartbeat stays unhealthy.
    entries = len(read_audit(s.audit_log))
    _traffic(s, 60)
    again = _watch(s)
    assert (again.status, again.action, again.already_reported) == ("breach", "alert", True)
    assert again.artifact_id is None and len(read_audit(s.audit_log)) == entries
    assert again.heartbeat_sent and _healthy_gauge(s) == "0.0"
    # Past the re-alert interval it is reported again.
    _traffic(s, 60)
    logs = [str(s.state_dir.parent / "gateway.log")]
    late = champion_watchdog_flow(gateway_logs=logs, realert_after_s=0, **FLOW_ARGS)
    assert late.action == "alert" and not late.already_reported and late.artifact_id
    assert read_audit(s.audit_log)[-1]["action"] == "watchdog_alert"
    _set_fault(s, None)


def test_a_gateway_that_is_down_is_reported_not_rolled_back(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = env
    champion = _registry(s).get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None
    audit_before = len(read_audit(s.audit_log))
    monkeypatch.setenv("BALLAST_GATEWAY_PORT", str(free_port()))  # nothing listens there
    get_settings.cache_clear()
    try:
        report = _watch(get_settings())
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert report.status == "unavailable" and report.action == "alert"
    assert report.rolled_back_to is None and not report.heartbeat_sent
    assert report.artifact_id
    after = _registry(s).get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert after is not None and after.version == champion.version
    assert len(read_audit(s.audit_log)) == audit_before, "only breaches are audited"


def test_a_failed_rollback_is_reported_and_fails_the_run(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import task

    import flows.watchdog as fw
    from ballast.anomaly import DetectorState, MetricVerdict
    from ballast.errors import IntegrityError
    from ballast.watchdog import Observation, WatchdogDecision
    from tasks.rollback import RolledBack
    from tasks.watchdog import WatchdogCheck

    s = env
    verdict = MetricVerdict(
        "error_rate", "breach", 0.3, 100, threshold=0.05, reason="error_rate 0.3", rule="cusum"
    )
    decision = WatchdogDecision(
        "breach",
        s.model_name,
        "9",
        (verdict,),
        (verdict.reason,),
        DetectorState(s.model_name),
        Observation(model=s.model_name, version="9", requests=100, errors=30, replica="r"),
    )

    @task
    def fake_check(model_name: str | None = None, policy: object = None) -> WatchdogCheck:
        return WatchdogCheck(decision, previous="8")

    @task
    def failing_rollback(
        model_name: str | None = None, *, why: str = "", expect_champion: str | None = None
    ) -> RolledBack:
        raise IntegrityError("version 8: artefact not in its manifest")

    monkeypatch.setattr(fw, "check_champion", fake_check)
    monkeypatch.setattr(fw, "rollback_to_previous", failing_rollback)
    with pytest.raises(IntegrityError, match="version 8"):
        _watch(s)
    last = read_audit(s.audit_log)[-1]
    assert last["action"] == "watchdog_rollback_failed" and last["version"] == "9"
    assert "IntegrityError" in last["rollback_error"]
    assert _healthy_gauge(s) == "0.0"
    arts = _artifacts(f"watchdog-{s.model_name}")
    assert any("rollback failed: IntegrityError" in a.data for a in arts)


def _fast_breach_flow(monkeypatch: pytest.MonkeyPatch, rollback: Any, report_incident: Any) -> Any:
    """The flow's body via .fn() with its tasks replaced (no harness or gateway): version 9 of
    model m breached on its error rate, previous is 8. Returns the flow's report."""
    import flows.watchdog as fw
    from ballast.anomaly import DetectorState, MetricVerdict
    from ballast.watchdog import Observation, WatchdogDecision
    from tasks.watchdog import WatchdogCheck

    verdict = MetricVerdict(
        "error_rate", "breach", 0.3, 100, threshold=0.05, reason="error_rate 0.3", rule="cusum"
    )
    decision = WatchdogDecision(
        "breach",
        "m",
        "9",
        (verdict,),
        (verdict.reason,),
        DetectorState("m"),
        Observation(model="m", version="9", requests=100, errors=30, replica="r"),
    )
    monkeypatch.setattr(fw, "check_champion", lambda name, policy: WatchdogCheck(decision, "8"))
    monkeypatch.setattr(fw, "rollback_to_previous", rollback)
    monkeypatch.setattr(fw, "localisation_markdown", lambda *a, **k: "")
    monkeypatch.setattr(fw, "report_incident", report_incident)
    monkeypatch.setattr(fw, "send_heartbeat", lambda *a, **k: True)
    return fw.champion_watchdog_flow.fn("m")


def test_an_automatic_rollback_says_it_was_the_watchdog_and_why(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.rollback import RolledBack

    whys: list[str] = []
    expected: list[str | None] = []

    def rollback(
        model_name: str | None = None,
        *,
        why: str = "manual rollback",
        expect_champion: str | None = None,
    ) -> RolledBack:
        whys.append(why)
        expected.append(expect_champion)
        return RolledBack(restored="8", replaced="9")

    report = _fast_breach_flow(monkeypatch, rollback, lambda *a, **k: "artifact")
    # The audit log's rollback entry must not read "manual rollback" for an automatic one.
    assert report.action == "rollback" and report.rolled_back_to == "8"
    assert len(whys) == 1 and whys[0] != "manual rollback", whys
    assert "watchdog" in whys[0] and "error_rate 0.3" in whys[0], whys
    # Only while the judged version is still the champion.
    assert expected == ["9"]


def test_a_champion_promoted_since_it_was_judged_is_reported_not_a_failed_run(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ballast.errors import ChampionChanged

    reported: list[str | None] = []

    def rollback(*a: object, **k: object) -> None:
        raise ChampionChanged("m's champion is version 10, not the judged version 9")

    def report_incident(*a: object, **k: object) -> str:
        reported.append(k.get("rollback_error"))  # type: ignore[arg-type]
        return "artifact"

    # Before: the RegistryError failed the run and the report said "rollback failed".
    report = _fast_breach_flow(monkeypatch, rollback, report_incident)
    assert report.rolled_back_to is None and report.action == "rollback"
    assert reported == ["not rolled back: m's champion is version 10, not the judged version 9"]
