"""Fault localisation (ballast/localise.py) on synthetic gateway logs.

Lines are written as the gateway writes them: by hand for exact cases, and by the gateway's own
FailureLog (infra/gateway/faillog.py) so the reader and the writer cannot drift apart.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ballast.localise import (
    EVENT_FAILED,
    EVENT_SUPPRESSED,
    FaultReport,
    default_log_paths,
    localise,
    merge_reports,
)
from infra.gateway.faillog import EVENT_FAILED as GATEWAY_FAILED
from infra.gateway.faillog import EVENT_SUPPRESSED as GATEWAY_SUPPRESSED
from infra.gateway.faillog import FailureLog

T0 = datetime(2025, 11, 27, 5, 0, 0, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


def failed(
    t: datetime,
    *,
    version: str = "2",
    replica: str = "r1",
    status: int = 500,
    reason: str = "injected_fault",
    rid: str = "x",
    model: str = "m",
    role: str = "canary",
) -> str:
    return json.dumps(
        {
            "ts": iso(t),
            "event": "request.failed",
            "request_id": rid,
            "model": model,
            "version": version,
            "role": role,
            "replica": replica,
            "route": "predict",
            "status": status,
            "reason": reason,
        }
    )


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_event_names_match_the_gateway() -> None:
    assert (EVENT_FAILED, EVENT_SUPPRESSED) == (GATEWAY_FAILED, GATEWAY_SUPPRESSED)


def test_report_counts_replicas_reasons_and_finds_the_first_failure(tmp_path: Path) -> None:
    lines = [
        "INFO:     Started server process [123]",
        json.dumps({"ts": iso(T0), "event": "deployment.applied", "canary": "2"}),
        failed(T0 - timedelta(minutes=5), rid="before-window"),
        failed(T0 + timedelta(seconds=1), rid="a1", replica="r1"),
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        failed(T0 + timedelta(seconds=2), rid="a2", replica="r2", reason="inference_failed"),
        failed(T0 + timedelta(seconds=3), rid="a3", replica="r1", status=503, reason="overloaded"),
        failed(T0 + timedelta(seconds=3), rid="champ", version="1", role="champion"),
        failed(T0 + timedelta(seconds=3), rid="other-model", model="n"),
        failed(T0 + timedelta(seconds=4), rid="client", status=422, reason="feature_mismatch"),
        failed(T0 + timedelta(seconds=4), rid="v22", version="22"),
        '{not json but mentions "2"',
        failed(T0 + timedelta(hours=2), rid="after-window"),
    ]
    log = write(tmp_path / "gateway.log", lines)
    report = localise(
        log, "m", "2", T0, T0 + timedelta(minutes=10), metric="error_rate 0.31 > 0.05"
    )
    assert report.failed and report.failures == 3 and report.logged == 3
    assert [(r.replica, r.failures) for r in report.replicas] == [("r1", 2), ("r2", 1)]
    assert report.replicas[0].share == pytest.approx(2 / 3)
    assert report.first_failure == T0 + timedelta(seconds=1)
    assert report.reasons == {"injected_fault": 1, "inference_failed": 1, "overloaded": 1}
    assert report.statuses == {500: 2, 503: 1}
    assert report.roles == {"canary": 3}
    assert report.first_request_ids == ("a1", "a2", "a3")
    assert report.metric == "error_rate 0.31 > 0.05"
    # Context: the lines before the first failure (a quarter of 20 = 5) and after it.
    assert report.context[0] == lines[0] and report.context[3] == lines[3]
    assert "Traceback (most recent call last):" in report.context
    assert report.context_source == f"{log}:4"
    # Client errors count only when asked for.
    with_4xx = localise(log, "m", "2", T0, T0 + timedelta(minutes=10), min_status=400)
    assert with_4xx.failures == 4 and with_4xx.statuses[422] == 1


def test_suppressed_summaries_are_counted_with_their_status_and_reason(tmp_path: Path) -> None:
    summary = {
        "ts": iso(T0 + timedelta(seconds=1.9)),
        "event": "request.failures_suppressed",
        "model": "m",
        "version": "2",
        "role": "canary",
        "replica": "r2",
        "first_ts": iso(T0 + timedelta(seconds=1.1)),
        "logged": 20,
        "suppressed": 70,
        "reasons": {"injected_fault": 60, "feature_mismatch": 10},
        "statuses": {"500": 60, "422": 10},
        "counts": [[422, "feature_mismatch", 10], [500, "injected_fault", 60]],
    }
    log = write(
        tmp_path / "g.log",
        [failed(T0 + timedelta(seconds=1), replica="r2", rid="first"), json.dumps(summary)],
    )
    report = localise(log, "m", "2", T0)
    assert report.failures == 61 and report.logged == 1
    assert report.reasons == {"injected_fault": 61}
    assert report.statuses == {500: 61}
    assert [(r.replica, r.share) for r in report.replicas] == [("r2", 1.0)]
    assert report.first_failure == T0 + timedelta(seconds=1)
    assert localise(log, "m", "2", T0, min_status=400).failures == 71


def test_lines_written_by_the_gateways_failure_log_are_read_back_in_full(tmp_path: Path) -> None:
    out: list[dict[str, Any]] = []
    clock = [T0.timestamp()]
    logs = {
        name: FailureLog(out.append, replica=name, per_second=3, clock=lambda: clock[0])
        for name in ("replica-a", "replica-b")
    }
    sent = 0
    for step in range(200):  # 2 s of failures, mostly on replica a
        clock[0] = T0.timestamp() + step * 0.01
        name = "replica-a" if step % 4 else "replica-b"
        logs[name].record(
            request_id=f"id-{step}",
            model="m",
            version="3",
            role="canary",
            route="predict",
            status=500,
            reason="injected_fault",
        )
        sent += 1
    for log in logs.values():
        log.flush(final=True)
    path = write(tmp_path / "gateway.log", [json.dumps(e) for e in out])
    report = localise([path], "m", "3", T0 - timedelta(seconds=1), T0 + timedelta(minutes=1))
    assert report.failures == sent == 200
    assert report.logged == 4 * 3  # 3 lines per replica and second, two seconds, two replicas
    assert {r.replica: r.failures for r in report.replicas} == {"replica-a": 150, "replica-b": 50}
    assert report.first_request_ids[0] == "id-0"
    assert report.first_failure == T0


def test_a_failure_line_past_2000_characters_is_still_counted(tmp_path: Path) -> None:
    # A non-ASCII error message: JSON writes each character as a 6-character escape, so the
    # gateway's own line passes 2000 characters. Before: cut to 2000, unparsable, dropped.
    out: list[dict[str, Any]] = []
    log = FailureLog(out.append, replica="r", per_second=10, clock=lambda: T0.timestamp())
    for rid, error in (("abc", "é" * 300), ("def", "plain")):
        log.record(
            request_id=rid,
            model="m",
            version="3",
            role="canary",
            route="predict",
            status=500,
            reason="model_error",
            error=error,
        )
    lines = [json.dumps(e) for e in out]
    assert len(lines[0]) > 2000
    tail = "x" * 100_000  # and a line with no end in sight is skipped, not held whole
    path = write(tmp_path / "gateway.log", [*lines, tail])
    report = localise([path], "m", "3", T0 - timedelta(seconds=1), T0 + timedelta(minutes=1))
    assert report.failures == 2
    assert report.first_request_ids == ("abc", "def")


def test_several_files_merge_and_the_earliest_first_failure_gives_the_context(
    tmp_path: Path,
) -> None:
    a = write(tmp_path / "a.log", ["a-noise", failed(T0 + timedelta(seconds=5), rid="late")])
    b = write(tmp_path / "b.log", ["b-noise", failed(T0 + timedelta(seconds=2), rid="early")])
    missing = tmp_path / "gone.log"
    report = localise([a, b, missing], "m", "2", T0, T0 + timedelta(minutes=1), context_lines=4)
    assert report.failures == 2 and report.first_request_ids == ("early", "late")
    assert report.context == ("b-noise", failed(T0 + timedelta(seconds=2), rid="early"))
    assert report.context_source == f"{b}:2"
    assert len(report.unreadable) == 1 and str(missing) in report.unreadable[0]


def test_no_failure_gives_an_empty_report_and_markdown_says_so(tmp_path: Path) -> None:
    log = write(tmp_path / "g.log", [failed(T0, version="1", role="champion")])
    report = localise(log, "m", "2", T0 - timedelta(seconds=1), T0 + timedelta(seconds=1))
    assert not report.failed and report.replicas == () and report.first_failure is None
    assert report.context == () and report.context_source is None
    md = report.to_markdown()
    assert md.startswith("# Fault report: m version 2")
    assert "No failed request of version 2" in md


def test_markdown_holds_the_tables_the_metric_and_a_safe_log_block(tmp_path: Path) -> None:
    lines = [
        "```  a fence in the log must not end the block",
        failed(T0, replica="r|1", rid="id-1"),
    ]
    log = write(tmp_path / "g.log", lines)
    report = localise(log, "m", "2", T0, T0 + timedelta(seconds=1), metric="p95 latency")
    md = report.to_markdown()
    assert "**Metric that broke:** p95 latency" in md
    assert "**1 failed requests**" in md and "2025-11-27T05:00:00.000Z" in md
    assert "| r\\|1 | 1 | 100.0% |" in md
    assert "| injected_fault | 1 |" in md and "| 500 | 1 |" in md
    assert "`id-1`" in md
    assert md.count("```") == 2, "exactly one fenced block: the log's own fence is defused"
    assert json.loads(json.dumps(report.to_dict()))["replicas"][0]["replica"] == "r|1"


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    log = write(tmp_path / "g.log", [])
    with pytest.raises(ValueError, match="ends"):
        localise(log, "m", "2", T0, T0 - timedelta(seconds=1))
    with pytest.raises(ValueError, match="context_lines"):
        localise(log, "m", "2", T0, context_lines=-1)
    # Naive datetimes are UTC.
    naive = localise(log, "m", "2", T0.replace(tzinfo=None))
    assert naive.start == T0


def test_default_log_paths_are_the_gateways_and_the_stacks(tmp_path: Path) -> None:
    assert default_log_paths(tmp_path) == []
    (tmp_path / "stack").mkdir()
    write(tmp_path / "stack" / "gateway.log", [])
    write(tmp_path / "gateway.log", [])
    assert default_log_paths(tmp_path) == [
        tmp_path / "gateway.log",
        tmp_path / "stack" / "gateway.log",
    ]


def test_pods_reports_merge_as_if_one_log_held_every_line(tmp_path: Path) -> None:
    """Two pods' files read apart and merged give what one read of both files gives."""
    pod1 = write(
        tmp_path / "p1.jsonl",
        [failed(T0 + timedelta(seconds=s), replica="p1-r", rid=f"a{s}") for s in (3, 5, 7)],
    )
    pod2 = write(
        tmp_path / "p2.jsonl",
        [
            failed(T0 + timedelta(seconds=2), replica="p2-r", rid="b2", status=503, reason="x"),
            failed(T0 + timedelta(seconds=9), replica="p2-r", rid="b9"),
        ],
    )
    window = (T0, T0 + timedelta(minutes=1))
    both = localise([pod1, pod2], "m", "2", *window)
    apart = [(f"pod-{i}", localise(p, "m", "2", *window)) for i, p in enumerate((pod1, pod2))]
    merged = merge_reports(apart, metric="error_rate")
    for field in ("failures", "logged", "first_failure", "reasons", "statuses"):
        assert getattr(merged, field) == getattr(both, field), field
    # Replicas are named by their source (a pod) as well.
    assert [(r.replica, r.failures, r.share) for r in merged.replicas] == [
        ("pod-0/p1-r", 3, 0.6),
        ("pod-1/p2-r", 2, 0.4),
    ]
    assert [(r.failures, r.share) for r in both.replicas] == [(3, 0.6), (2, 0.4)]
    assert merged.first_request_ids == both.first_request_ids == ("b2", "a3", "a5", "a7", "b9")
    # The context is the pod's with the first failure, named by pod.
    assert merged.context == both.context and merged.context_source == f"pod-1: {pod2}:1"
    assert merged.files == (f"pod-0: {pod1}", f"pod-1: {pod2}") and merged.metric == "error_rate"
    # An answer through the wire reads back the same.
    for _, report in apart:
        assert FaultReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_merge_refuses_nothing_and_mixed_versions_and_from_dict_refuses_garbage(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "p.jsonl", [failed(T0)])
    two = localise(path, "m", "2", T0, T0 + timedelta(seconds=1))
    three = localise(path, "m", "3", T0, T0 + timedelta(seconds=1))
    with pytest.raises(ValueError, match="no report"):
        merge_reports([])
    with pytest.raises(ValueError, match="other versions"):
        merge_reports([("a", two), ("b", three)])
    good = two.to_dict()
    for bad in ([], {**good, "failures": -1}, {**good, "start": "soon"}, {"model": "m"}):
        with pytest.raises(ValueError, match="not a fault report"):
            FaultReport.from_dict(bad)
    # An older gateway's answer without the ids' times: they count at its first failure.
    old = FaultReport.from_dict({**good, "first_request_times": None})
    assert merge_reports([("a", old)]).first_request_times == (T0,)


def test_a_file_met_twice_is_read_once(tmp_path: Path) -> None:
    # A gateway rotating r.jsonl to r.jsonl.1 between two opens shows one file under both
    # names: a hard link is the same situation, held still.
    current = write(tmp_path / "r.jsonl", [failed(T0 + timedelta(seconds=s)) for s in range(3)])
    os.link(current, tmp_path / "r.jsonl.1")
    report = localise(
        [current, tmp_path / "r.jsonl.1", current], "m", "2", T0, T0 + timedelta(minutes=1)
    )
    assert report.failures == 3 and len(report.files) == 3


def test_a_fifo_or_a_folder_among_the_files_is_reported_not_read(tmp_path: Path) -> None:
    # Opening a FIFO for reading waits for a writer: one matching a log pattern hung the
    # reader (and with it GET /admin/failures) before.
    real = write(tmp_path / "r.jsonl", [failed(T0)])
    fifo = tmp_path / "x.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "d.jsonl").mkdir()
    got: list[FaultReport] = []
    # In a thread, bounded: a regression would hang here, not the whole run.
    reader = threading.Thread(
        target=lambda: got.append(
            localise([fifo, tmp_path / "d.jsonl", real], "m", "2", T0, T0 + timedelta(minutes=1))
        ),
        daemon=True,
    )
    reader.start()
    reader.join(10.0)
    assert not reader.is_alive(), "the reader hung on the FIFO"
    (report,) = got
    assert report.failures == 1
    assert report.unreadable == (
        f"{fifo}: not a regular file",
        f"{tmp_path / 'd.jsonl'}: not a regular file",
    )


def test_from_dict_refuses_counts_that_do_not_add_up_and_times_out_of_range(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "p.jsonl", [failed(T0), failed(T0, replica="r2")])
    good = localise(path, "m", "2", T0, T0 + timedelta(seconds=1)).to_dict()
    assert FaultReport.from_dict(good).failures == 2
    lopsided = {**good, "failures": 0, "logged": 0}
    for bad in (
        lopsided,  # replicas hold 2 where the report says 0: merging would divide by 0
        {**good, "logged": 3},
        {**good, "first_failure": "0001-01-01T00:00:00+01:00"},  # before year 1 in UTC
    ):
        with pytest.raises(ValueError, match="not a fault report"):
            FaultReport.from_dict(bad)
