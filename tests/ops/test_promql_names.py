"""The PromQL name reader the dashboard test relies on, on the shapes our expressions use."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ops.promql import (
    exported_labels,
    exported_names,
    grouping_labels,
    metric_names,
    promtool_parse_errors,
    selector_labels,
)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up == 0", {"up"}),
        (
            'sum by (version, role) (rate(ballast_requests_total{model="$model", status=~"5.."}[$__rate_interval]))',
            {"ballast_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(ballast_request_latency_seconds_bucket[5m])))",
            {"ballast_request_latency_seconds_bucket"},
        ),
        (
            "a:ratio:rate5m > (14.4 * 0.005) and on (model, version) b_total offset 1h >= 1e3",
            {"a:ratio:rate5m", "b_total"},
        ),
        ("sum without (instance) (x) / ignoring (class) group_left sum(y)", {"x", "y"}),
        ('count({__name__="ballast_canary_weight"})', {"ballast_canary_weight"}),
        ('label_replace(z, "dst", "$1", "src", "(.*)")', {"z"}),
        ("time() - max by (model) (hb_seconds) > 900 or absent(hb_seconds)", {"hb_seconds"}),
        ('ALERTS{alertname=~"Ballast.*"}', {"ALERTS"}),
    ],
)
def test_metric_names_finds_selected_series_only(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exported_names_reads_samples_and_type_lines() -> None:
    text = (
        "# HELP h_seconds x\n# TYPE h_seconds histogram\n"
        '# HELP c_total y\n# TYPE c_total counter\nc_total{a="1"} 2.0\n'
        "g 1\n"
    )
    assert exported_names(text) == {
        "h_seconds_bucket",
        "h_seconds_sum",
        "h_seconds_count",
        "c_total",
        "g",
    }


def test_promtool_reports_an_expression_that_does_not_parse(tmp_path: Path) -> None:
    assert promtool_parse_errors(["rate(x[5m])", "sum by (le) (y)"], tmp_path) is None
    error = promtool_parse_errors(["rate(x[5m]"], tmp_path)
    assert error is not None and "parse error" in error.lower()


def test_label_readers_find_matchers_and_grouping_lists() -> None:
    expr = (
        'sum by (version, role) (rate(ballast_requests_total{model="$model", status=~"5..",'
        ' note="a,b{c=1}"}[5m])) / ignoring (class) group_left sum(y{le!="+Inf"}) and on (model) z'
    )
    assert selector_labels(expr) == {
        "ballast_requests_total": {"model", "status", "note"},
        "y": {"le"},
    }
    assert grouping_labels(expr) == {"version", "role", "class", "model"}
    exposition = (
        '# TYPE r counter\nr_total{model="m",status="200"} 1.0\nr_total{model="m",route="p"} 2.0\n'
    )
    assert exported_labels(exposition) == {"r_total": {"model", "status", "route"}}
