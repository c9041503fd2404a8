"""The Prometheus config and alert rules, checked by Debian's ``promtool`` as a real process.

``promtool`` comes from the ``prometheus`` package (CI installs it). A missing ``promtool`` fails
these tests on purpose: a skipped rules test would let a broken alert ship silently.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "infra" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
RULE_NAMES = {
    "BallastCanaryErrorBudgetFastBurn",
    "BallastCanaryErrorBudgetSlowBurn",
    "BallastLatencyP99High",
    "BallastPredictionDrift",
    "BallastGatewayDown",
    "BallastWatchdogSilent",
    "BallastChampionUnhealthy",
}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe is not None, (
        "promtool is not installed: apt-get update && apt-get install -y prometheus"
    )
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_prometheus_config_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_severity_summary_and_a_unit_test() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert set(alerts) == RULE_NAMES
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"], name
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for group in tests for t in group.get("alert_rule_test", [])}
    assert tested == RULE_NAMES
    # Each alert is tested both firing and not firing.
    for name in RULE_NAMES:
        cases = [t for g in tests for t in g.get("alert_rule_test", []) if t["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in cases), f"{name}: no case where it stays silent"


def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    # Guards the guard: promtool's exit status really reports a bad rule file.
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: rate(x[5m]\n")
    result = promtool("check", "rules", str(bad), cwd=tmp_path)
    assert result.returncode != 0


def test_the_latency_rule_unit_test_fails_when_the_objective_changes(tmp_path: Path) -> None:
    # The promtool tests are not vacuous: a looser objective makes them fail.
    (tmp_path / "alerts.yml").write_text(
        ALERTS.read_text().replace("p99_5m > 0.05", "p99_5m > 0.2")
    )
    shutil.copy(MONITORING / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "BallastLatencyP99High" in result.stdout + result.stderr


def test_the_champion_unhealthy_unit_test_fails_when_the_rule_ignores_the_verdict(
    tmp_path: Path,
) -> None:
    # Not vacuous: a rule that fires on a healthy champion fails the "must not fire" cases.
    (tmp_path / "alerts.yml").write_text(
        ALERTS.read_text().replace("ballast_watchdog_healthy == 0", "ballast_watchdog_healthy >= 0")
    )
    shutil.copy(MONITORING / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "BallastChampionUnhealthy" in result.stdout + result.stderr


def test_a_stale_unhealthy_instance_does_not_fire_the_champion_alert(tmp_path: Path) -> None:
    # Without the newest-heartbeat filter, instance a's stale 0 for model s would fire.
    rules = ALERTS.read_text()
    start = rules.index("ballast_watchdog_healthy == 0")
    end = rules.index("for: 1m", start)
    (tmp_path / "alerts.yml").write_text(
        rules[:start] + "ballast_watchdog_healthy == 0\n        " + rules[end:]
    )
    shutil.copy(MONITORING / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert 'model="s"' in result.stdout + result.stderr


def test_an_older_unhealthy_verdict_does_not_fire_when_the_newest_instance_goes_away(
    tmp_path: Path,
) -> None:
    # Given the rule picking the newest heartbeat among the series present now (not over the
    # last hour), instance a's old 0 for model s2 becomes the newest once b is gone: it fires.
    rules = ALERTS.read_text()
    windowed = "max_over_time(ballast_watchdog_heartbeat_timestamp_seconds[1h])"
    assert windowed in rules
    (tmp_path / "alerts.yml").write_text(
        rules.replace(windowed, "ballast_watchdog_heartbeat_timestamp_seconds")
    )
    shutil.copy(MONITORING / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert 'model="s2"' in result.stdout + result.stderr
