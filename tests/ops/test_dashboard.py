"""The Grafana dashboard: it loads, its panels are well formed, and every query names a series a
REAL gateway exports (scraped from a gateway process serving a champion, a canary and a shadow)
or a recording rule of alerts.yml. Every expression also parses with promtool.

The alert rules get the same name check, with no exception: every series a rule reads is one
the gateway exports (the drift rules' ``ballast_predictions_total`` and the watchdog alert's
heartbeat gauge included) or one a recording rule makes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ballast.gateway_client import GatewayClient, GatewayHTTPError
from ballast.gateway_process import GatewayProcess
from ballast.serving import Deployment
from ballast.settings import get_settings
from infra.gateway.testing import build_mlp_onnx, spec_for
from tests.conftest import free_port
from tests.ops.promql import (
    exported_labels,
    exported_names,
    grouping_labels,
    metric_names,
    promtool_parse_errors,
    recorded_names,
    rule_exprs,
    selector_labels,
)

MONITORING = Path(__file__).resolve().parents[2] / "infra" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "ballast.json"
ALERTS = MONITORING / "alerts.yml"
# Series Prometheus itself makes (alert state, scrape health), not the gateway.
PROMETHEUS_OWN = {"ALERTS", "ALERTS_FOR_STATE", "up"}
MODEL = "m"
ROW = [0.25] * 30


@pytest.fixture(scope="module")
def gateway_exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of a real gateway after champion, canary and shadow traffic, and a refusal."""
    root = tmp_path_factory.mktemp("dashboard")
    one, two, three = (
        spec_for(build_mlp_onnx(root / f"{v}.onnx", seed=10 + int(v)), v) for v in ("1", "2", "3")
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BALLAST_STATE_DIR", str(root / "state"))
        mp.setenv("BALLAST_GATEWAY_PORT", str(free_port()))
        mp.setenv("BALLAST_GATEWAY_ADMIN_TOKEN", "dashboard-test-token")
        get_settings.cache_clear()
        s = get_settings()
        try:
            with (
                GatewayProcess.start(
                    s, log_path=root / "gw.log", timeout=30, exit_with_parent=True
                ),
                GatewayClient(s.gateway_url, s.admin_token()) as gw,
            ):
                gw.set_deployment(
                    Deployment(
                        model=MODEL,
                        champion=one,
                        canary=two,
                        canary_weight=50,
                        shadow=three,
                        shadow_fraction=1.0,
                    )
                )
                for _ in range(30):
                    gw.predict(MODEL, [ROW, ROW])
                gw.watchdog_heartbeat(MODEL, healthy=True, detail="dashboard test")
                with pytest.raises(GatewayHTTPError):
                    gw.predict("no-such-model", [ROW])
                yield httpx.get(f"{s.gateway_url}/metrics", trust_env=False, timeout=5).text
        finally:
            get_settings.cache_clear()


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target, annotation and variable query."""
    out = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in dash["panels"]
        for t in p.get("targets", [])
    ]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"]]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            # label_values(metric, label) is Grafana's, not PromQL: check the metric inside.
            inner = v["definition"].removeprefix("label_values(").rsplit(",", 1)[0]
            out.append((f"variable {v['name']!r}", inner))
    return out


def test_dashboard_loads_with_well_formed_panels() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    cells: set[tuple[int, int]] = set()
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 8
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{p['title']} leaves the 24-column grid"
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{p['title']!r} overlaps another panel"
        cells |= mine
    for p in graphs:
        assert p["title"], p
        assert p["datasource"]["uid"] == "${datasource}", f"{p['title']}: hard-wired datasource"
        targets = p["targets"]
        assert targets, f"{p['title']} has no query"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refIds"
        for t in targets:
            assert t["expr"].strip(), f"{p['title']} {t['refId']}: empty expr"


def test_dashboard_shows_what_the_release_needs() -> None:
    used = set().union(*(metric_names(e) for _, e in queries(dashboard())))
    needed = {
        "ballast_requests_total",  # per-version requests and errors
        "ballast_request_latency_seconds_bucket",  # latency percentiles
        "ballast_batch_size_rows_bucket",  # batch sizes
        "ballast_canary_weight",  # canary weight
        "ballast_deployment_info",  # release decisions (who serves in which role)
        "ballast_deployments_total",  # deployment changes by result
    }
    assert needed <= used, f"missing: {sorted(needed - used)}"
    exprs = " ".join(e for _, e in queries(dashboard()))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs, f"no p{q} latency panel"


@pytest.mark.integration
def test_every_dashboard_query_names_a_series_the_gateway_exports(gateway_exposition: str) -> None:
    exported = exported_names(gateway_exposition)
    known = exported | recorded_names(ALERTS) | PROMETHEUS_OWN
    unknown = {
        where: sorted(metric_names(expr) - known)
        for where, expr in queries(dashboard())
        if metric_names(expr) - known
    }
    assert not unknown, f"queries name series nobody exports: {unknown}"
    # Every query names at least one series (a typo'd name would otherwise vanish silently).
    assert all(metric_names(expr) for _, expr in queries(dashboard()))


@pytest.mark.integration
def test_every_alert_rule_names_an_exported_or_recorded_series(gateway_exposition: str) -> None:
    known = exported_names(gateway_exposition) | recorded_names(ALERTS) | PROMETHEUS_OWN
    used = set().union(*(metric_names(e) for e in rule_exprs(ALERTS).values()))
    unknown = used - known
    assert not unknown, f"alert rules read series nobody exports: {sorted(unknown)}"


# Labels Prometheus adds at scrape time, and the histogram bucket label.
SCRAPE_LABELS = {"instance", "job", "le"}


@pytest.mark.integration
def test_every_label_a_query_or_rule_matches_or_groups_by_is_one_the_series_carry(
    gateway_exposition: str,
) -> None:
    # A renamed label (status -> code) or a typo blanks a panel and silences an alert while
    # every metric name still checks out.
    carried = exported_labels(gateway_exposition)
    vocabulary = set().union(*carried.values()) | SCRAPE_LABELS
    exprs = [*queries(dashboard()), *rule_exprs(ALERTS).items()]
    wrong: dict[str, list[str]] = {}
    for where, expr in exprs:
        for metric, labels in selector_labels(expr).items():
            if metric in carried:
                wrong.setdefault(where, []).extend(
                    f"{metric}{{{label}}}"
                    for label in sorted(labels - carried[metric] - SCRAPE_LABELS)
                )
        wrong.setdefault(where, []).extend(sorted(grouping_labels(expr) - vocabulary))
    wrong = {where: found for where, found in wrong.items() if found}
    assert not wrong, f"labels no exported series carries: {wrong}"
    # The check reads something: the request counter's selectors were matched by status.
    assert any(
        "status" in selector_labels(expr).get("ballast_requests_total", set()) for _, expr in exprs
    )


@pytest.mark.integration
def test_the_drift_and_watchdog_series_carry_samples(gateway_exposition: str) -> None:
    # Exported with values, not just declared: the drift rules group by model and class, the
    # watchdog alert takes the max by model.
    labels: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(gateway_exposition):
        for s in fam.samples:
            labels.setdefault(s.name, []).append(s.labels)
    # The label set alerts_test.yml feeds the drift rules, and the roles they select.
    predictions = labels["ballast_predictions_total"]
    assert all(set(ls) == {"model", "version", "role", "class"} for ls in predictions)
    assert {ls["role"] for ls in predictions} == {"champion", "canary"}
    assert {ls["model"] for ls in predictions} == {MODEL}
    assert labels["ballast_watchdog_heartbeat_timestamp_seconds"] == [{"model": MODEL}]
    assert labels["ballast_watchdog_healthy"] == [{"model": MODEL}]


@pytest.mark.integration
def test_the_gateway_exposition_passes_promtool_lint(gateway_exposition: str) -> None:
    import shutil
    import subprocess

    exe = shutil.which("promtool")
    assert exe is not None, "promtool is not installed: apt-get install -y prometheus"
    result = subprocess.run(
        [exe, "check", "metrics"],
        input=gateway_exposition,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    error = promtool_parse_errors([e for _, e in queries(dashboard())], tmp_path)
    assert error is None, error


def _panel_expr(legend: str) -> str:
    exprs = [
        t["expr"]
        for p in dashboard()["panels"]
        for t in p.get("targets", [])
        if t.get("legendFormat") == legend
    ]
    assert len(exprs) == 1, exprs
    return str(exprs[0]).replace("$model", MODEL)


def promtool_expr_tests(tmp_path: Path, cases: list[dict[str, Any]]) -> str:
    """Run ``promtool test rules`` on promql_expr_test cases (alerts.yml loaded); its output."""
    import shutil
    import subprocess

    import yaml

    exe = shutil.which("promtool")
    assert exe is not None, "promtool is not installed: apt-get install -y prometheus"
    path = tmp_path / "panel_test.yml"
    path.write_text(
        yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "15s", "tests": cases})
    )
    result = subprocess.run(
        [exe, "test", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_healthy_panel_shows_the_verdict_the_champion_alert_reads(tmp_path: Path) -> None:
    expr = _panel_expr("healthy")

    def series(instance: str, ts: str, healthy: str) -> list[dict[str, str]]:
        labels = f'model="{MODEL}",instance="{instance}"'
        return [
            {"series": f"ballast_watchdog_heartbeat_timestamp_seconds{{{labels}}}", "values": ts},
            {"series": f"ballast_watchdog_healthy{{{labels}}}", "values": healthy},
        ]

    promtool_expr_tests(
        tmp_path,
        [
            # Two pods: the newest heartbeat (b) says unhealthy, a holds a stale healthy 1: the
            # panel shows 0, as the alert fires.
            {
                "interval": "1m",
                "input_series": series("a:8765", "300x10", "1x10")
                + series("b:8765", "600x10", "0x10"),
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "5m",
                        "exp_samples": [{"labels": f'{{model="{MODEL}"}}', "value": 0}],
                    }
                ],
            },
            # The pod with the newest (healthy) heartbeat goes away: a's older 0 is not shown
            # as the verdict, as it does not fire the alert.
            {
                "interval": "1m",
                "input_series": series("a:8765", "_x2 120x30", "_x2 0x30")
                + series("b:8765", "_x7 420x2", "_x7 1x2"),
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "8m",
                        "exp_samples": [{"labels": f'{{model="{MODEL}"}}', "value": 1}],
                    },
                    {"expr": expr, "eval_time": "17m", "exp_samples": []},
                ],
            },
        ],
    )


def test_the_deployment_changes_panel_says_each_replica_counts_a_change() -> None:
    # ballast_deployments_total counts once per replica process that applies a change.
    panels = [
        p
        for p in dashboard()["panels"]
        if any("ballast_deployments_total" in t["expr"] for t in p.get("targets", []))
    ]
    assert panels, "no deployment changes panel"
    for p in panels:
        assert "once per replica" in p["title"], p["title"]
        assert "with N replicas one change reads N" in p["description"], p["description"]
    # Replica restarts (result=startup) are shown apart from changes, never as one.
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    changes = [e for e in exprs if 'result!="startup"' in e]
    restarts = [e for e in exprs if 'result="startup"' in e]
    assert changes and restarts and len(changes) + len(restarts) == len(exprs), exprs
