"""Tasks that run after the canary moved traffic are retried by Prefect on a registry hiccup
(they are idempotent); the watchdog's parameters are range-checked where a run is submitted."""

from __future__ import annotations

from typing import Any

import pytest

import tasks.registry as treg
from ballast.errors import RegistryError
from ballast.settings import Settings
from tests.tasks.fakes import FakeRegistry


class _FlakyRegistry(FakeRegistry):
    """FAKE registry whose first ``set_tags`` fails as an unreachable tracking server does."""

    def __init__(self, aliases: dict[str, str]) -> None:
        super().__init__(aliases)
        self.tag_calls = 0

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        self.tag_calls += 1
        if self.tag_calls == 1:
            raise RegistryError("tracking server unreachable")
        super().set_tags(name, version, tags)


@pytest.fixture
def flaky(
    settings: Settings, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> _FlakyRegistry:
    reg = _FlakyRegistry({"champion": "1", "candidate": "2"})
    monkeypatch.setattr(treg, "registry", lambda s=None: reg)
    return reg


def test_a_registry_hiccup_while_closing_a_rolled_back_candidate_is_retried(
    flaky: _FlakyRegistry,
) -> None:
    # Before: one hiccup left the version tagged "candidate" with no verdict, and the next
    # run offered the rolled-back model again.
    treg.close_candidate(
        "2", status="rolled_back", verdict="rollback", reason="errors", evidence={}
    )
    assert flaky.tag_calls == 2
    assert flaky.tags["2"]["ballast.status"] == "rolled_back"
    assert "candidate" not in flaky.aliases


def test_a_registry_hiccup_while_recording_a_promotion_is_retried(
    flaky: _FlakyRegistry,
) -> None:
    treg.record_promotion("2", {"steps": []})
    assert flaky.tag_calls == 2 and flaky.tags["2"]["ballast.status"] == "champion"


@pytest.mark.parametrize(
    "bad",
    [
        {"error_rate_ceiling": 5.0},  # meant as 5 %: never trips
        {"error_rate_ceiling": -0.1},  # every window a breach: a healthy champion rolled back
        {"latency_p99_ceiling_ms": 0.0},
        {"warmup_checks": 1},
        {"warmup_checks": 49},  # beyond the detector's MAD window: it would fail mid-run
        {"min_requests": 0},
    ],
    ids=lambda d: next(iter(d)),
)
def test_the_watchdog_refuses_out_of_range_parameters_before_it_looks(
    settings: Settings, prefect_harness: None, bad: dict[str, Any]
) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.watchdog import champion_watchdog_flow

    with pytest.raises(ParameterTypeError):
        champion_watchdog_flow(**bad)


def test_a_retry_after_the_audit_entry_was_written_does_not_write_it_twice(
    flaky: _FlakyRegistry, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The entry is written, then its fsync fails: Prefect retries the task (an OSError may be a
    # hiccup), and the retry must not record the promotion a second time (review finding).
    from ballast.audit import find

    flaky.tag_calls = 1  # the registry answers from the start here
    real_record, calls = treg.record, []

    def written_then_failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        entry = real_record(*args, **kwargs)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")  # as an fsync failing after the write
        return entry

    monkeypatch.setattr(treg, "record", written_then_failing)
    treg.record_promotion("2", {"steps": []})
    entries = find(settings.audit_log, "promote", model=settings.model_name, version="2")
    assert len(calls) == 1 and len(entries) == 1, entries


def test_the_watchdog_warmup_bound_is_the_detectors_window() -> None:
    from ballast.anomaly import DetectorPolicy

    assert DetectorPolicy().mad_window == 48  # the le= of warmup_checks in flows/watchdog.py
