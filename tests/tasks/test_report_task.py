"""The release's decision report: published after traffic already changed, so nothing in it may
fail the run."""

from __future__ import annotations

from typing import Any

import pytest

import tasks.report as rt
from ballast.audit import record
from ballast.settings import Settings


def test_a_decision_report_whose_artifact_fails_still_ends_well_and_logs_the_anchor(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: a Prefect API hiccup creating the artifact failed a run whose candidate was
    # already promoted, and the audit log's anchor (kept only in the artifact) was lost.
    def broken(**kw: Any) -> None:
        raise RuntimeError("artifacts down")

    events: list[dict[str, Any]] = []
    monkeypatch.setattr(rt, "create_markdown_artifact", broken)
    monkeypatch.setattr(rt, "emit_event", lambda **kw: events.append(kw))
    record(settings.audit_log, "promote", model=settings.model_name, version="2")
    with caplog.at_level("WARNING"):
        out = rt.publish_decision.fn(
            model=settings.model_name,
            version="2",
            outcome="promoted",
            reasons=["every look passed"],
            champion="2",
            steps=[],
            evidence={},
        )
    assert out is None
    (event,) = events
    anchor = event["payload"]["audit_anchor"]
    assert anchor and anchor in caplog.text and "artifact not created" in caplog.text
