"""Sustained load from a separate process through a promotion and a rollback: zero failures.

The release sequence of ``benchmarks/load_through_release.py`` (champion v1, canary v2 at
5/25/50 %, promote v2, canary v3, roll back to v2) against a gateway with two replica
processes, with short phases: every request sent at any point must be answered 200. Bounded
(about 15 s) on 127.0.0.1; the gateway and the load process are stopped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ballast.loadgen import TimedLoad, summarise_phases
from benchmarks.load_through_release import run


@pytest.mark.integration
def test_a_release_and_a_rollback_under_load_fail_no_request(tmp_path: Path) -> None:
    workers = 8
    out = run(tmp_path, phase_seconds=1.2, workers=workers, replicas=2, say=lambda _: None)
    phases = {p["phase"]: p for p in out["phases"]}
    assert list(phases) == [
        "champion v1",
        "canary v2 5%",
        "canary v2 25%",
        "canary v2 50%",
        "promote v2 100%",
        "canary v3 25%",
        "rollback to v2",
    ]
    failures = {name: p["failures"] for name, p in phases.items()}
    assert out["failures"] == 0 and set(failures.values()) == {0}, failures
    assert all(p["requests"] >= 50 for p in phases.values()), phases
    # Every request the load process sent was in some phase and counted.
    assert out["requests"] == out["sent_in_all"]
    # The traffic really moved: v2 took part in the canary, v3 in its own, and once the
    # rollback's PUT returned only v2 answered.
    # A phase holds the requests *sent* in it; the gateway routes a request when it reads it.
    # So only requests in flight as the first canary PUT landed (at most one per connection:
    # a closed loop) can have met the 5 % split; the champion answered all the others.
    first = phases["champion v1"]["versions"]
    assert set(first) <= {"1", "2"} and first["1"] > 0 and first.get("2", 0) <= workers, first
    assert set(phases["canary v2 50%"]["versions"]) == {"1", "2"}
    assert "3" in phases["canary v3 25%"]["versions"]
    assert set(out["after_rollback"]) == {"2"} and out["after_rollback"]["2"] > 0
    assert out["gateway_exit"] == 0


def test_phases_take_the_requests_sent_in_them() -> None:
    load = TimedLoad(
        started=np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]),
        latency_s=np.array([0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.1]),
        ok=np.array([True, True, False, True, True, True, True]),
        version=("1", "1", "unknown", "1", "2", "2", "2"),
    )
    a, b = summarise_phases(load, [("a", 1.0), ("b", 2.0)], end=3.0)
    assert (a.phase, a.requests, a.failures, a.rps) == ("a", 2, 1, 2.0)
    assert a.versions == {"1": 1, "unknown": 1}
    assert (b.requests, b.failures, b.versions) == (3, 0, {"1": 1, "2": 2})
    assert b.p50_ms == pytest.approx(5.0) and b.p99_ms == pytest.approx(5.98)
    (empty,) = summarise_phases(load, [("late", 10.0)], end=11.0)
    assert (empty.requests, empty.p50_ms, empty.p99_ms) == (0, None, None)
    assert summarise_phases(load, [], end=1.0) == []
    with pytest.raises(ValueError, match="time order"):
        summarise_phases(load, [("a", 2.0), ("b", 1.0)], end=3.0)
