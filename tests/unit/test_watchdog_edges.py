"""Edges of the watchdog's decision (ballast/watchdog.py): trials, replicas, class counts, policy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ballast.anomaly import (
    DetectorPolicy,
    DetectorState,
    MetricSpec,
    MetricVerdict,
    update_metric,
)
from ballast.watchdog import (
    ERROR_RATE,
    LATENCY_P99,
    SHARE_PREFIX,
    AlertRecord,
    Observation,
    Response,
    WatchdogDecision,
    WatchdogPolicy,
    decide,
    observe,
    observe_replicas,
    plan_response,
    repeats_alert,
    unavailable,
)

POLICY = WatchdogPolicy(detector=DetectorPolicy(warmup=3, min_count=50))
LOADED = "2026-11-27T00:00:00+00:00"


def entry(
    requests: int,
    errors: int = 0,
    *,
    p99: float | None = 2.0,
    role: str = "champion",
    classes: dict[str, Any] | None = None,
    loaded_at: str = LOADED,
) -> dict[str, Any]:
    """One version's entry in /admin/stats ``versions`` (infra/gateway/app.py)."""
    out: dict[str, Any] = {
        "role": role,
        "requests": requests,
        "errors": errors,
        "window": min(requests, 2048),
        "latency_ms": {"p50": 1.0, "p95": 1.5, "p99": p99},
        "loaded_at": loaded_at,
    }
    if classes is not None:
        out["classes"] = classes
    return out


def body(
    versions: dict[str, dict[str, Any]],
    *,
    replica: str | None = None,
    peers: dict[str, dict[str, dict[str, Any]]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A /admin/stats body for model ``m`` (no trial unless ``extra`` says so)."""
    out: dict[str, Any] = {
        "model": "m",
        "canary_weight": 0,
        "shadow_fraction": 0.0,
        "versions": versions,
        "draining": [],
        **extra,
    }
    if replica is not None:
        out["replica"] = replica
        out["replicas"] = [{"replica": r, "versions": v} for r, v in (peers or {}).items()]
    return out


def test_a_breach_of_a_champion_outside_any_trial_rolls_back() -> None:
    # Only the champion is loaded, weight 0 and fraction 0.0: no trial, so a breach rolls back.
    state, snap = DetectorState("m"), None
    decisions = []
    for requests, errors in [(1000, 0), (2000, 300), (3000, 600)]:
        obs = observe(
            body({"3": entry(requests, errors)}), model="m", version="3", last_snapshot=snap
        )
        snap = obs.snapshot
        d = decide(obs, state, POLICY)
        state = d.state
        decisions.append(d)
    assert not any(d.observation.canary_active for d in decisions)
    assert decisions[-1].status == "breach"
    assert plan_response(decisions[-1], previous="2", policy=POLICY).action == "rollback"


@pytest.mark.parametrize(
    ("extra", "active"),
    [
        ({"canary_weight": 1}, True),
        ({"shadow_fraction": 0.5}, True),
        # A body with neither field set (null): no trial, and no crash.
        ({"canary_weight": None, "shadow_fraction": None}, False),
    ],
    ids=["weight-1", "fraction-half", "no-fields"],
)
def test_a_trial_is_seen_from_the_weight_or_the_fraction_alone(
    extra: dict[str, Any], active: bool
) -> None:
    obs = observe(body({"3": entry(10)}, **extra), model="m", version="3", last_snapshot=None)
    assert obs.canary_active is active


def test_a_malformed_version_entry_is_no_trial_and_no_crash() -> None:
    obs = observe(
        body({"3": entry(10), "9": None}),  # type: ignore[dict-item]
        model="m",
        version="3",
        last_snapshot=None,
    )
    assert obs.available and obs.canary_active is False


def test_a_trial_seen_on_one_replica_is_a_trial() -> None:
    # The answering replica shows no trial yet; its peer has loaded the canary.
    def stats(n: int) -> dict[str, Any]:
        return body(
            {"3": entry(n)},
            replica="a",
            peers={"b": {"3": entry(n), "4": entry(0, role="canary")}},
        )

    first = observe_replicas(stats(1000), model="m", version="3", last_snapshot=None)
    assert (first.first, first.replica, first.canary_active) == (True, "a", True)
    nxt = observe_replicas(stats(2000), model="m", version="3", last_snapshot=first.snapshot)
    assert nxt.replica == "2 replicas" and nxt.canary_active is True


def test_a_window_without_requests_has_no_error_rate() -> None:
    first = observe(body({"3": entry(1000, 5)}), model="m", version="3", last_snapshot=None)
    same = observe(
        body({"3": entry(1000, 5)}), model="m", version="3", last_snapshot=first.snapshot
    )
    assert (same.first, same.requests, same.error_rate) == (False, 0, None)
    assert decide(same, DetectorState("m"), POLICY).status == "insufficient_data"
    one = Observation(model="m", version="3", requests=1, errors=1)
    assert one.error_rate == 1.0


def first_state(first: Observation) -> DetectorState:
    return decide(first, DetectorState("m"), POLICY).state


def test_a_gateway_without_a_percentile_window_gets_no_overlap_and_no_crash() -> None:
    def stats(n: int) -> dict[str, Any]:
        e = entry(n)
        del e["window"]
        return body({"3": e})

    first = observe(stats(1000), model="m", version="3", last_snapshot=None)
    obs = observe(stats(2000), model="m", version="3", last_snapshot=first.snapshot)
    assert (obs.requests, obs.latency_window, obs.latency_count) == (1000, 0, 0)
    d = decide(obs, first_state(first), POLICY)
    assert d.status == "insufficient_data"


def test_a_replica_less_window_survives_the_state_round_trip() -> None:
    # The flow persists the state as JSON: the snapshot's key for "no replica id" must be a string.
    first = observe(body({"3": entry(1000, 10)}), model="m", version="3", last_snapshot=None)
    state = first_state(first)
    loaded = DetectorState.from_dict(json.loads(json.dumps(state.to_dict())), "m")
    nxt = observe(
        body({"3": entry(1600, 13)}), model="m", version="3", last_snapshot=loaded.snapshot
    )
    assert (nxt.first, nxt.requests, nxt.errors) == (False, 600, 3)


def test_a_replica_that_now_serves_another_version_gets_a_first_look() -> None:
    # The same replica id after a rollout to 3: its counters are 3's, not a window of 2's.
    old = observe(body({"2": entry(1000)}), model="m", version="2", last_snapshot=None, replica="r")
    later = "2026-11-28T00:00:00+00:00"
    new = observe(
        body({"3": entry(500, loaded_at=later)}),
        model="m",
        version="3",
        last_snapshot=old.snapshot,
        replica="r",
    )
    assert new.first and new.requests == 0
    assert new.snapshot == {
        "replicas": {"r": {"version": "3", "loaded_at": later, "requests": 500, "errors": 0}}
    }


def test_the_snapshot_drops_other_versions_and_malformed_entries() -> None:
    snap = {
        "replicas": {
            "a": {"version": "2", "loaded_at": LOADED, "requests": 10, "errors": 0},
            "c": "junk",
        }
    }
    obs = observe(body({"3": entry(100)}), model="m", version="3", last_snapshot=snap, replica="b")
    assert obs.first and list(obs.snapshot["replicas"]) == ["b"]  # type: ignore[index]


def test_malformed_peers_and_the_answering_replicas_own_entry_are_ignored() -> None:
    def stats(n: int) -> dict[str, Any]:
        out = body({"3": entry(n, 1)}, replica="a")
        out["replicas"] = [
            "junk",
            {"replica": 7, "versions": {"3": entry(5000, 2500)}},
            {"versions": {"3": entry(5000, 2500)}},
            {"replica": "a", "versions": {"3": entry(n - 10)}},  # its own board entry
        ]
        return out

    first = observe_replicas(stats(1000), model="m", version="3", last_snapshot=None)
    assert list(first.snapshot["replicas"]) == ["a"]  # type: ignore[index]
    nxt = observe_replicas(stats(1500), model="m", version="3", last_snapshot=first.snapshot)
    # One replica: its own observation, under its own name, not "1 replicas".
    assert (nxt.replica, nxt.requests, nxt.errors, nxt.first) == ("a", 500, 0, False)


def test_the_answering_replica_not_serving_the_champion_is_unavailable() -> None:
    peers = {"b": {"3": entry(100)}}
    other = body({"9": entry(100)}, replica="a", peers=peers)
    obs = observe_replicas(other, model="m", version="3", last_snapshot=None)
    assert not obs.available and "champion 3" in obs.reason
    wrong_model = body({"3": entry(100)}, replica="a", peers=peers, model="x")
    obs = observe_replicas(wrong_model, model="m", version="3", last_snapshot=None)
    assert not obs.available and "'x'" in obs.reason


def test_the_p99_is_the_slowest_replicas_with_enough_requests() -> None:
    def stats(a: int, b: int) -> dict[str, Any]:
        return body({"3": entry(a, p99=10.0)}, replica="a", peers={"b": {"3": entry(b, p99=30.0)}})

    first = observe_replicas(stats(1000, 1000), model="m", version="3", last_snapshot=None)
    # b has exactly min_count requests in the window: it counts, and it is the slower.
    obs = observe_replicas(
        stats(2000, 1100), model="m", version="3", last_snapshot=first.snapshot, min_count=100
    )
    assert (obs.latency_p99_ms, obs.latency_count) == (30.0, 100)


def test_windows_with_no_timed_requests_have_no_p99() -> None:
    def stats(n: int, p99: float | None) -> dict[str, Any]:
        return body({"3": entry(n, p99=p99)}, replica="a", peers={"b": {"3": entry(n, p99=p99)}})

    first = observe_replicas(stats(1000, 5.0), model="m", version="3", last_snapshot=None)
    idle = observe_replicas(stats(1000, 5.0), model="m", version="3", last_snapshot=first.snapshot)
    assert (idle.requests, idle.latency_p99_ms, idle.latency_count) == (0, None, 0)
    untimed = observe_replicas(
        stats(2000, None), model="m", version="3", last_snapshot=idle.snapshot
    )
    assert untimed.requests == 2000
    assert (untimed.latency_p99_ms, untimed.latency_count, untimed.latency_window) == (None, 0, 0)


def test_class_counts_missing_on_one_replica_give_no_class_window() -> None:
    def stats(n: int) -> dict[str, Any]:
        # The answering replica (an older gateway) reports no classes; its peer does.
        peer = {"3": entry(n, classes={"0": n // 2, "1": n - n // 2})}
        return body({"3": entry(n)}, replica="a", peers={"b": peer})

    first = observe_replicas(stats(1000), model="m", version="3", last_snapshot=None)
    obs = observe_replicas(stats(2000), model="m", version="3", last_snapshot=first.snapshot)
    assert obs.requests == 2000 and obs.class_counts is None


@pytest.mark.parametrize(
    ("after", "window"),
    [
        ({"0": 590, "1": 500}, None),  # class 0 went backwards within one load
        ({"0": 700}, None),  # class 1 vanished
        ({"0": 700, "1": 500, "2": 5}, {"0": 100, "1": 100, "2": 5}),  # a new class
        ({"0": 700, "1": 500, "2": 0}, {"0": 100, "1": 100, "2": 0}),
        ({"0": 700, "1": None}, None),  # a malformed count
    ],
    ids=["backwards", "vanished", "new-class", "new-class-zero", "malformed"],
)
def test_class_windows_are_none_when_the_counts_are_inconsistent(
    after: dict[str, Any], window: dict[str, int] | None
) -> None:
    before = {"0": 600, "1": 400}
    first = observe(
        body({"3": entry(1000, classes=before)}), model="m", version="3", last_snapshot=None
    )
    nxt = observe(
        body({"3": entry(1200, classes=after)}),
        model="m",
        version="3",
        last_snapshot=first.snapshot,
    )
    assert nxt.requests == 200 and nxt.class_counts == window


def breached(metric: str, cusum: float) -> MetricVerdict:
    return MetricVerdict(metric, "breach", 1.0, 100, cusum=cusum, threshold=8.0, rule="cusum")


def test_the_culprit_is_the_breach_furthest_past_its_threshold() -> None:
    verdicts = (breached(ERROR_RATE, 9.0), breached(LATENCY_P99, 20.0), breached("x", 8.5))
    obs = Observation(model="m", version="3")
    d = WatchdogDecision("breach", "m", "3", verdicts, (), DetectorState("m"), obs)
    assert d.culprit is verdicts[1] and d.evidence()["metric"] == LATENCY_P99


def warm_state(n: int = 4) -> DetectorState:
    state = DetectorState("m", version="3")
    for _ in range(n):
        obs = Observation(
            model="m",
            version="3",
            requests=1000,
            errors=2,
            latency_p99_ms=2.0,
            latency_count=1000,
            latency_window=1000,
            class_counts={"0": 600, "1": 400},
        )
        state = decide(obs, state, POLICY).state
    return state


def test_a_window_is_healthy_when_one_metric_is_judged_and_none_breached() -> None:
    # No p99 in this window: latency is not judged, the error rate is, and it is fine.
    obs = Observation(model="m", version="3", requests=1000, errors=2, class_counts=None)
    d = decide(obs, warm_state(), POLICY)
    assert [v.status for v in d.verdicts] == ["ok", "insufficient"]
    assert d.status == "healthy"


def test_only_the_latency_window_is_judged_as_overlapping_the_previous_one() -> None:
    state = warm_state()
    obs = Observation(
        model="m",
        version="3",
        requests=1000,
        errors=3,
        latency_p99_ms=2.1,
        latency_count=500,
        latency_window=2000,  # the p99 spans 2000 requests, 500 of them new: overlap 0.75
        class_counts={"0": 590, "1": 410},
    )
    d = decide(obs, state, POLICY)
    expected = [
        (ERROR_RATE, 0.003, 1000, 0.0),
        (LATENCY_P99, 2.1, 500, 0.75),
        (SHARE_PREFIX + "0", 0.59, 1000, 0.0),
        (SHARE_PREFIX + "1", 0.41, 1000, 0.0),
    ]
    assert [v.metric for v in d.verdicts] == [e[0] for e in expected]
    for verdict, (name, value, count, overlap) in zip(d.verdicts, expected, strict=True):
        _, want = update_metric(
            state.metrics[name], POLICY.spec(name), value, count, POLICY.detector, overlap
        )
        assert verdict.scale == pytest.approx(want.scale), name
        assert verdict.status == want.status == "ok", name


def test_at_most_max_classes_shares_are_watched() -> None:
    counts = {f"c{i:02d}": 10 for i in range(25)}
    obs = Observation(model="m", version="3", requests=250, class_counts=counts)
    d = decide(obs, DetectorState("m", version="3"), POLICY)
    shares = [v.metric for v in d.verdicts if v.metric.startswith(SHARE_PREFIX)]
    assert shares == [f"{SHARE_PREFIX}c{i:02d}" for i in range(20)]


def test_the_default_policy_specs() -> None:
    # The documented defaults: a 5 % error ceiling, 0.2-point error floor, 5 %/0.5 ms latency floors.
    policy = WatchdogPolicy()
    assert policy.spec(ERROR_RATE) == MetricSpec(
        ERROR_RATE, "rate", "up", abs_floor=0.002, hard_ceiling=0.05
    )
    assert policy.spec(LATENCY_P99) == MetricSpec(
        LATENCY_P99, "value", "up", abs_floor=0.5, rel_floor=0.05, hard_ceiling=None
    )
    assert policy.spec(SHARE_PREFIX + "1") == MetricSpec(
        SHARE_PREFIX + "1", "share", "both", abs_floor=0.01
    )


def test_a_new_champion_over_the_default_ceiling_breaches_during_warm_up() -> None:
    # 8 % errors in two windows in a row: above the default 5 % ceiling, baseline or not.
    policy = WatchdogPolicy(detector=DetectorPolicy(warmup=3, min_count=50))
    state = DetectorState("m", version="3")
    statuses = []
    for _ in range(2):
        obs = Observation(model="m", version="3", requests=1000, errors=80)
        d = decide(obs, state, policy)
        state = d.state
        statuses.append(d.status)
    assert statuses == ["insufficient_data", "breach"]


@pytest.mark.parametrize(
    ("kwargs", "ok"),
    [
        ({"error_rate_ceiling": 1.0}, True),
        ({"error_rate_ceiling": 1.5}, False),
        ({"latency_p99_ceiling_ms": 0.5}, True),
        ({"latency_p99_ceiling_ms": 0.0}, False),
    ],
)
def test_ceiling_bounds(kwargs: dict[str, float], ok: bool) -> None:
    if ok:
        WatchdogPolicy(**kwargs)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match="ceiling"):
            WatchdogPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"version": "3", "status": 1, "reason": "x", "at": 1.0},
        {"version": "3", "status": "breach", "reason": None, "at": 1.0},
        {"version": "3", "status": "breach", "reason": "x", "at": "1"},
    ],
    ids=["status", "reason", "at"],
)
def test_an_alert_record_of_the_wrong_types_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not an alert record"):
        AlertRecord.from_dict(bad)


def test_an_alert_record_without_a_version_round_trips() -> None:
    rec = AlertRecord(None, "unavailable", "no live statistics", 5.0)
    assert AlertRecord.from_dict(rec.to_dict()) == rec


def test_an_alert_repeats_from_the_same_instant_but_not_for_another_reason() -> None:
    d = decide(unavailable("m", "3", "gateway down"), DetectorState("m"), POLICY)
    alert = plan_response(d, previous="2", policy=POLICY)
    last = AlertRecord("3", "unavailable", alert.reason, at=1000.0)
    assert repeats_alert(last, d, alert, now=1000.0, every_s=3600)
    assert repeats_alert(last, d, alert, now=1000.5, every_s=3600)
    other = Response("alert", "no live statistics (timeout): nothing to compare, no rollback")
    assert not repeats_alert(last, d, other, now=1300.0, every_s=3600)


def test_a_new_version_with_the_same_load_time_is_not_an_older_look() -> None:
    # Counters of the version served before are no stale view of the new one: keeping them
    # (they were higher) made every run a first look and left the new champion unjudged.
    loaded = "2026-11-27T00:00:00+00:00"

    def board(version: str, n: int) -> dict[str, Any]:
        entry = {"requests": n, "errors": 0, "window": n, "loaded_at": loaded}
        return {"model": "m", "versions": {version: {**entry, "latency_ms": {"p99": 2.0}}}}

    snap = observe(board("2", 1000), model="m", version="2", last_snapshot=None, replica="r")
    first = observe(
        board("3", 500), model="m", version="3", last_snapshot=snap.snapshot, replica="r"
    )
    assert first.first and first.snapshot["replicas"]["r"] == {
        "version": "3",
        "loaded_at": loaded,
        "requests": 500,
        "errors": 0,
    }
    then = observe(
        board("3", 700), model="m", version="3", last_snapshot=first.snapshot, replica="r"
    )
    assert not then.first and then.requests == 200
