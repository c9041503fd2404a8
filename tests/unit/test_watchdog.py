"""The watchdog's pure decision (ballast/watchdog.py): windows from /admin/stats, verdicts, actions."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from ballast.anomaly import DetectorPolicy, DetectorState
from ballast.watchdog import (
    ERROR_RATE,
    LATENCY_P99,
    SHARE_PREFIX,
    Observation,
    WatchdogDecision,
    WatchdogPolicy,
    decide,
    observe,
    plan_response,
    unavailable,
)

POLICY = WatchdogPolicy(detector=DetectorPolicy(warmup=3, min_count=50))


def stats(
    requests: int,
    errors: int,
    *,
    p99: float | None = 2.0,
    version: str = "3",
    loaded_at: str = "2026-11-27T00:00:00+00:00",
    model: str = "m",
    canary_weight: int = 0,
    shadow_fraction: float = 0.0,
    trial: dict[str, str] | None = None,
    window: int = 2048,
    classes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The shape of the gateway's /admin/stats body (infra/gateway/app.py: Gateway.stats).

    ``trial`` adds idle versions by role (``{"4": "shadow"}``), as a trial deployment loads them.
    ``classes``: the champion's answered rows per predicted class (None: an older gateway that
    does not report them).
    """
    idle = {"requests": 0, "errors": 0, "window": 0, "loaded_at": loaded_at}
    body: dict[str, Any] = {
        "model": model,
        "canary_weight": canary_weight,
        "shadow_fraction": shadow_fraction,
        "versions": {
            **{v: {**idle, "role": role} for v, role in (trial or {}).items()},
            version: {
                "role": "champion",
                "fault": None,
                "requests": requests,
                "errors": errors,
                "client_errors": 0,
                "inflight": 0,
                "window": min(requests, window),
                "latency_ms": {"p50": 1.0, "p95": 1.5, "p99": p99},
                "batches": 0,
                "queued_rows": 0,
                "loaded_at": loaded_at,
            },
        },
        "draining": [],
    }
    if classes is not None:
        body["versions"][version]["classes"] = classes
    return body


def test_first_look_records_counters_and_the_next_one_is_a_window() -> None:
    first = observe(stats(1000, 10), model="m", version="3", last_snapshot=None, replica="r1")
    assert first.first and first.available and first.snapshot is not None
    nxt = observe(
        stats(1600, 13, p99=2.5), model="m", version="3", last_snapshot=first.snapshot, replica="r1"
    )
    assert not nxt.first
    assert (nxt.requests, nxt.errors) == (600, 3)
    assert nxt.error_rate == pytest.approx(0.005)
    assert nxt.latency_p99_ms == 2.5 and nxt.latency_count == 600
    assert nxt.latency_window == 1600 and nxt.replica == "r1"


def test_counters_are_kept_per_replica() -> None:
    a = observe(stats(1000, 0), model="m", version="3", last_snapshot=None, replica="a")
    # Replica b counts its own requests: no window against a's counters.
    b = observe(stats(50, 0), model="m", version="3", last_snapshot=a.snapshot, replica="b")
    assert b.first
    a2 = observe(stats(1500, 5), model="m", version="3", last_snapshot=b.snapshot, replica="a")
    assert not a2.first and (a2.requests, a2.errors) == (500, 5)


def test_the_snapshot_keeps_the_champions_most_recent_replicas_only() -> None:
    from ballast.watchdog import SNAPSHOT_REPLICAS

    snap = observe(stats(10, 0, version="2"), model="m", version="2", last_snapshot=None).snapshot
    # Before: every replica id (host-pid: each restart is a new one) stayed for ever.
    for pid in range(SNAPSHOT_REPLICAS + 10):
        snap = observe(
            stats(1000, 0), model="m", version="3", last_snapshot=snap, replica=f"h-{pid}"
        ).snapshot
    replicas = snap["replicas"]
    assert len(replicas) == SNAPSHOT_REPLICAS and "h-0" not in replicas
    assert all(e["version"] == "3" for e in replicas.values())  # the old champion's are gone
    # A replica seen again is kept as the most recent, with its window taken as before.
    again = observe(stats(1500, 5), model="m", version="3", last_snapshot=snap, replica="h-10")
    assert (again.requests, again.errors) == (500, 5)
    assert list(again.snapshot["replicas"])[-1] == "h-10"


def _with_peers(own: dict[str, Any], me: str, peers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``own`` (a stats body) as replica ``me``, with ``peers``' versions on the board."""
    return own | {
        "replica": me,
        "replicas": [{"replica": r, "versions": body["versions"]} for r, body in peers.items()],
    }


def test_every_replicas_window_is_added_up_and_a_failing_one_is_not_diluted() -> None:
    from ballast.watchdog import observe_replicas

    snap = single_snap = None
    # Four replicas, one of which fails every request; every run reaches some replica.
    totals = {r: [0, 0] for r in "abcd"}
    policy = WatchdogPolicy()
    state = single = DetectorState(model="m")
    statuses, single_statuses = [], []
    for run in range(14):
        for r, counts in totals.items():
            counts[0] += 500
            if r == "d" and run >= 12:
                counts[1] += 500  # replica d fails all its requests from run 12 on
        bodies = {r: stats(n, e, classes={"0": n - e, "1": 0}) for r, (n, e) in totals.items()}
        me = "abcd"[run % 4]  # the replica that happens to answer
        obs = observe_replicas(
            _with_peers(bodies[me], me, {r: b for r, b in bodies.items() if r != me}),
            model="m",
            version="3",
            last_snapshot=snap,
        )
        snap = obs.snapshot
        # As before: the answering replica's counters alone.
        alone = observe(bodies[me], model="m", version="3", last_snapshot=single_snap, replica=me)
        single_snap = alone.snapshot
        single_decision = decide(alone, single, policy)
        single = single_decision.state
        single_statuses.append(single_decision.status)
        if run == 0:
            assert obs.first and set(obs.snapshot["replicas"]) == set("abcd")  # type: ignore[index]
            continue
        assert (obs.requests, obs.replica) == (2000, "4 replicas")
        assert obs.class_counts is not None and sum(obs.class_counts.values()) == 2000 - obs.errors
        decision = decide(obs, state, policy)
        state = decision.state
        statuses.append(decision.status)
    # A quarter of all requests failing is 25 % errors in each window: above the 5 % ceiling
    # twice in a row. Before: one replica per run, and d's bad windows were one in four.
    assert statuses[-1] == "breach" and "breach" not in statuses[:-2], statuses
    assert "breach" not in single_statuses, single_statuses


def test_the_p99_comes_from_a_replica_with_enough_requests_to_judge() -> None:
    from ballast.watchdog import observe_replicas

    def bodies(n_a: int, n_b: int) -> dict[str, Any]:
        busy = stats(n_a, 0, p99=50.0)  # its p99 rose from 5 ms
        quiet = stats(n_b, 0, p99=60.0)  # a quiet replica, slow as ever
        return _with_peers(busy, "a", {"b": quiet})

    first = observe_replicas(bodies(1000, 40), model="m", version="3", last_snapshot=None)
    obs = observe_replicas(
        bodies(2000, 80), model="m", version="3", last_snapshot=first.snapshot, min_count=100
    )
    # Before: the highest p99 with its replica's 40 requests: latency "insufficient" every run.
    assert (obs.latency_p99_ms, obs.latency_count) == (50.0, 1000)
    quiet_only = observe_replicas(
        bodies(1010, 80), model="m", version="3", last_snapshot=first.snapshot, min_count=100
    )
    assert quiet_only.latency_count == 40  # none has enough: the busiest replica's


def test_a_state_from_before_request_counts_keeps_its_baseline() -> None:
    from ballast.anomaly import MetricState, update_metric

    old = {
        "schema": 1,
        "model": "m",
        "version": "3",
        "snapshot": {"replicas": {"a": {"version": "3", "requests": 5}}},
        "checks": 40,
        "metrics": {"error_rate": {"warm": [], "level": 0.01, "residuals": [0.001, -0.002, 0.0]}},
    }
    state = DetectorState.from_dict(old, "m")
    # Before: discarded, an hour of warm-up again after the upgrade.
    assert state.version == "3" and state.snapshot == old["snapshot"] and state.checks == 40
    metric = state.metrics["error_rate"]
    assert metric.level == 0.01 and metric.residual_counts == ()
    spec = POLICY.spec(ERROR_RATE)
    _, verdict = update_metric(metric, spec, 0.011, 1000, POLICY.detector)
    assert verdict.status == "ok" and verdict.scale is not None
    assert MetricState.from_dict(metric.to_dict()) == metric


def test_a_peer_between_deployments_is_left_for_the_next_run() -> None:
    from ballast.watchdog import observe_replicas

    mine = stats(100, 0)
    other = stats(50, 0, version="9")  # serves another version right now
    obs = observe_replicas(
        _with_peers(mine, "a", {"b": other}), model="m", version="3", last_snapshot=None
    )
    assert obs.first and set(obs.snapshot["replicas"]) == {"a"}  # type: ignore[index]


def test_a_reload_or_restart_starts_the_counters_over() -> None:
    first = observe(stats(1000, 10), model="m", version="3", last_snapshot=None)
    reloaded = observe(
        stats(200, 1, loaded_at="2026-11-27T01:00:00+00:00"),
        model="m",
        version="3",
        last_snapshot=first.snapshot,
    )
    assert (reloaded.requests, reloaded.errors) == (200, 1)
    # A gateway that reports no load time: counters that went backwards are a restart.
    before = observe(stats(1000, 10), model="m", version="3", last_snapshot=None)
    for e in before.snapshot["replicas"].values():  # type: ignore[index]
        e["loaded_at"] = None
    no_load_time = stats(300, 2)
    no_load_time["versions"]["3"]["loaded_at"] = None
    restarted = observe(no_load_time, model="m", version="3", last_snapshot=before.snapshot)
    assert (restarted.requests, restarted.errors) == (300, 2)


def test_counters_behind_the_last_ones_of_the_same_load_are_an_older_look_and_count_nothing() -> (
    None
):
    # Run 1 was answered by replica b itself (1000 requests); run 2, within a heartbeat, by
    # replica a, whose board holds b's entry from half a second earlier (990). Before, that
    # read as a restart and counted b's whole history (990 requests, its errors) as the window.
    from ballast.watchdog import observe_replicas

    first = observe_replicas(
        _with_peers(stats(500, 0), "a", {"b": stats(1000, 10)}),
        model="m",
        version="3",
        last_snapshot=None,
    )
    run1 = observe_replicas(
        _with_peers(stats(1000, 10), "b", {"a": stats(500, 0)}),
        model="m",
        version="3",
        last_snapshot=first.snapshot,
    )
    run2 = observe_replicas(
        _with_peers(stats(520, 0), "a", {"b": stats(990, 10)}),
        model="m",
        version="3",
        last_snapshot=run1.snapshot,
    )
    assert (run2.requests, run2.errors) == (20, 0), run2  # a's 20 new ones; nothing from b
    # b's newer counters stay the reference: the next window from b counts from 1000.
    assert run2.snapshot["replicas"]["b"]["requests"] == 1000  # type: ignore[index]
    run3 = observe_replicas(
        _with_peers(stats(1050, 11), "b", {"a": stats(520, 0)}),
        model="m",
        version="3",
        last_snapshot=run2.snapshot,
    )
    assert (run3.requests, run3.errors) == (50, 1), run3


def test_class_counts_become_window_differences_of_the_same_version() -> None:
    first = observe(
        stats(100, 0, classes={"0": 60, "1": 40}), model="m", version="3", last_snapshot=None
    )
    assert first.class_counts is None
    nxt = observe(
        stats(300, 0, classes={"0": 100, "1": 200}),
        model="m",
        version="3",
        last_snapshot=first.snapshot,
    )
    assert nxt.class_counts == {"0": 40, "1": 160}
    # Without the counter nothing is assumed.
    none = observe(stats(400, 0), model="m", version="3", last_snapshot=nxt.snapshot)
    assert none.class_counts is None


def _pods_behind_a_service(seed: int, runs: int) -> list[WatchdogDecision]:
    """Two gateway pods behind one Service, both serving the same 60/40 traffic (3000 rows each
    per window); pod a has run for days (lifetime mix 50/50), pod b started recently. Each run's
    /admin/stats reaches a random pod."""
    rng = random.Random(seed)
    pods = {
        "a": {"0": 500_000, "1": 500_000, "req": 1_000_000},
        "b": {"0": 6_000, "1": 4_000, "req": 10_000},
    }
    state = DetectorState(model="m", version="3")
    out = []
    for _ in range(runs):
        for p in pods.values():
            p["0"] += 1800
            p["1"] += 1200
            p["req"] += 3000
        name = rng.choice(list(pods))
        pod = pods[name]
        body = stats(pod["req"], 0, loaded_at="t0-" + name, classes={"0": pod["0"], "1": pod["1"]})
        obs = observe(body, model="m", version="3", last_snapshot=state.snapshot, replica=name)
        d = decide(obs, state, POLICY)
        state = d.state
        out.append(d)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_class_windows_behind_a_service_never_mix_two_pods_counts(seed: int) -> None:
    # Given runs that reach either of two pods with very different lifetime class mixes,
    decisions = _pods_behind_a_service(seed, runs=80)
    # then every class window is one pod's own window (the true 60/40 mix of 3000 rows per
    # elapsed window), so the share detectors see the true mix and never breach.
    windows = [d.observation.class_counts for d in decisions if d.observation.class_counts]
    assert len(windows) > 20, "most runs should take a class window"
    for w in windows:
        total = sum(w.values())
        assert total % 3000 == 0 and w["0"] / total == pytest.approx(0.6), w
    assert all(d.status != "breach" for d in decisions), [
        d.summary() for d in decisions if d.status == "breach"
    ]


def test_a_restart_is_seen_by_its_load_time_even_when_every_class_count_grew() -> None:
    # Given a replica's counters (same replica id after the restart, as a container's pid is),
    first = observe(
        stats(1000, 0, classes={"0": 600, "1": 400}),
        model="m",
        version="3",
        last_snapshot=None,
        replica="1",
    )
    # when the gateway restarted and has since answered more of every class than before,
    restarted = observe(
        stats(2000, 0, loaded_at="2026-11-28T00:00:00+00:00", classes={"0": 1000, "1": 1000}),
        model="m",
        version="3",
        last_snapshot=first.snapshot,
        replica="1",
    )
    # then the window is everything the new load counted, not a difference with the old one.
    assert (restarted.requests, restarted.class_counts) == (2000, {"0": 1000, "1": 1000})


def test_a_gateway_without_class_counts_gets_no_class_window_and_no_crash() -> None:
    # Given an older gateway whose /admin/stats has no `classes`,
    state = DetectorState(model="m")
    decisions = []
    for k in range(8):
        obs = observe(
            stats(1000 * (k + 1), 0), model="m", version="3", last_snapshot=state.snapshot
        )
        d = decide(obs, state, POLICY)
        state = d.state
        decisions.append(d)
    # then the watchdog judges errors and latency only: no class window, no share metric.
    assert all(d.observation.class_counts is None for d in decisions)
    assert decisions[-1].status == "healthy", decisions[-1].summary()
    assert not any(v.metric.startswith(SHARE_PREFIX) for v in decisions[-1].verdicts)
    # and counts that appear on a load first seen without them give no window yet.
    obs = observe(
        stats(9000, 0, classes={"0": 10, "1": 5}),
        model="m",
        version="3",
        last_snapshot=state.snapshot,
    )
    assert obs.class_counts is None and decide(obs, state, POLICY).status != "breach"


def test_the_gateway_not_serving_the_champion_is_unavailable() -> None:
    other = observe(stats(10, 0, model="x"), model="m", version="3", last_snapshot=None)
    assert not other.available and "'x'" in other.reason
    missing = observe(stats(10, 0, version="2"), model="m", version="3", last_snapshot=None)
    assert not missing.available and "champion 3" in missing.reason


def run(
    windows: list[tuple[int, int, float]], state: DetectorState | None = None
) -> list[WatchdogDecision]:
    """Feed cumulative (requests, errors, p99) per run through observe + decide."""
    state = state or DetectorState(model="m")
    out = []
    for requests, errors, p99 in windows:
        obs = observe(
            stats(requests, errors, p99=p99),
            model="m",
            version="3",
            last_snapshot=state.snapshot,
            replica="r1",
        )
        d = decide(obs, state, POLICY)
        state = d.state
        out.append(d)
    return out


def healthy_history(n: int = 6) -> list[tuple[int, int, float]]:
    return [(1000 * (i + 1), 2 * (i + 1), 2.0 + 0.05 * (i % 3)) for i in range(n)]


def test_statuses_from_first_look_through_warm_up_to_healthy() -> None:
    ds = run(healthy_history())
    assert [d.status for d in ds] == [
        "insufficient_data",  # first look
        "insufficient_data",  # warm-up 1/3
        "insufficient_data",  # warm-up 2/3
        "healthy",  # baseline set
        "healthy",
        "healthy",
    ]
    assert all(d.healthy for d in ds)
    assert ds[-1].state.checks == 6 and ds[-1].culprit is None
    assert "warm-up" in " ".join(ds[1].reasons)


def test_a_failing_champion_breaches_naming_metric_replica_and_evidence() -> None:
    history = healthy_history()
    requests, errors, _ = history[-1]
    bad = [(requests + 1000 * k, errors + 300 * k, 2.0) for k in (1, 2, 3)]
    ds = run(history + bad)
    assert ds[-1].status == "breach" and not ds[-1].healthy
    culprit = ds[-1].culprit
    assert culprit is not None and culprit.metric == ERROR_RATE
    assert culprit.value == pytest.approx(0.3) and culprit.count == 1000
    ev = ds[-1].evidence()
    assert ev["metric"] == ERROR_RATE and ev["replica"] == "r1" and ev["version"] == "3"
    assert ev["window"]["errors"] == 300
    md = ds[-1].to_markdown()
    assert "metric that broke: **error_rate**" in md and "replica: `r1`" in md
    assert "| error_rate | breach |" in md
    assert ds[-1].summary().startswith("breach model=m version=3 replica=r1")


def test_slow_latency_breaches_on_latency() -> None:
    history = healthy_history()
    requests, errors, _ = history[-1]
    slow = [(requests + 1000 * k, errors + 2 * k, 40.0) for k in (1, 2, 3)]
    ds = run(history + slow)
    assert ds[-1].status == "breach"
    assert ds[-1].culprit is not None and ds[-1].culprit.metric == LATENCY_P99


def test_a_quiet_window_is_insufficient_data_not_healthy_or_breach() -> None:
    history = healthy_history()
    requests, errors, _ = history[-1]
    ds = run([*history, (requests + 10, errors + 5, 90.0)])
    assert ds[-1].status == "insufficient_data" and ds[-1].healthy
    assert "10 requests < 50" in " ".join(ds[-1].reasons)


def test_a_new_champion_resets_the_baseline() -> None:
    ds = run(healthy_history())
    state = ds[-1].state
    obs = observe(stats(500, 0, version="4"), model="m", version="4", last_snapshot=state.snapshot)
    d = decide(obs, state, POLICY)
    assert d.status == "insufficient_data" and d.state.version == "4"
    assert d.state.metrics == {} and "changed from 3" in " ".join(d.reasons)


def test_unavailable_changes_no_state() -> None:
    state = run(healthy_history())[-1].state
    d = decide(unavailable("m", "3", "gateway down"), state, POLICY)
    assert d.status == "unavailable" and not d.healthy and d.state == state
    assert d.reasons == ("gateway down",)


def test_class_share_drift_is_watched_when_counts_are_known() -> None:
    state = DetectorState(model="m")
    decisions = []
    counts = {"0": 0, "1": 0}
    for k in range(10):
        pos = 370 if k < 6 else 700  # the positive share jumps from 37 % to 70 %
        counts = {"0": counts["0"] + 1000 - pos, "1": counts["1"] + pos}
        obs = observe(
            stats(1000 * (k + 1), 0, classes=counts),
            model="m",
            version="3",
            last_snapshot=state.snapshot,
        )
        d = decide(obs, state, POLICY)
        state = d.state
        decisions.append(d)
    assert decisions[-1].status == "breach"
    culprit = decisions[-1].culprit
    assert culprit is not None and culprit.metric.startswith(SHARE_PREFIX)


@pytest.mark.parametrize(
    "trial",
    [
        {"shadow_fraction": 1.0, "trial": {"4": "shadow"}},
        {"canary_weight": 0, "trial": {"4": "canary"}},
        {"canary_weight": 5, "trial": {"4": "canary"}},
    ],
    ids=["shadow-phase", "canary-at-0", "canary-at-5"],
)
def test_a_breach_during_any_trial_alerts_and_never_rolls_back(trial: dict[str, Any]) -> None:
    # Given a canary's shadow phase (weight 0, a mirrored fraction) or a canary at any weight,
    state, snap = DetectorState("m"), None
    decisions = []
    for requests, errors in [(1000, 0), (2000, 300), (3000, 600), (4000, 900)]:
        obs = observe(stats(requests, errors, **trial), model="m", version="3", last_snapshot=snap)
        snap = obs.snapshot
        d = decide(obs, state, POLICY)
        state = d.state
        decisions.append(d)
    # when the champion breaches, then the watchdog alerts: the release flow owns the deployment.
    assert all(d.observation.canary_active for d in decisions), "a trial is in force throughout"
    breaches = [d for d in decisions if d.status == "breach"]
    assert breaches, [d.status for d in decisions]
    for d in breaches:
        r = plan_response(d, previous="2", policy=POLICY)
        assert r.action == "alert" and "canary" in r.reason, r


def breach_decision(*, canary: bool = False, version: str = "3") -> WatchdogDecision:
    obs = Observation(model="m", version=version, requests=100, errors=50, canary_active=canary)
    return WatchdogDecision("breach", "m", version, (), ("error_rate up",), DetectorState("m"), obs)


@pytest.mark.parametrize(
    ("decision", "previous", "policy", "action", "words"),
    [
        (breach_decision(), "2", POLICY, "rollback", "back to 2"),
        (breach_decision(), None, POLICY, "alert", "no previous"),
        (breach_decision(canary=True), "2", POLICY, "alert", "canary"),
        (breach_decision(), "3", POLICY, "alert", "previous is the breaching"),
        (breach_decision(), "2", WatchdogPolicy(rollback=False), "alert", "disabled"),
    ],
)
def test_plan_response_rolls_back_only_when_it_can_help(
    decision: WatchdogDecision,
    previous: str | None,
    policy: WatchdogPolicy,
    action: str,
    words: str,
) -> None:
    r = plan_response(decision, previous=previous, policy=policy)
    assert r.action == action and words in r.reason


def test_plan_response_never_rolls_back_without_a_breach() -> None:
    state = DetectorState("m")
    down = decide(unavailable("m", "3", "gateway down"), state, POLICY)
    r = plan_response(down, previous="2", policy=POLICY)
    assert r.action == "alert" and "no rollback" in r.reason
    (first,) = run(healthy_history(1))
    assert plan_response(first, previous="2", policy=POLICY).action == "none"


def test_summary_fits_the_heartbeat_detail() -> None:
    d = breach_decision()
    long = WatchdogDecision(
        "breach", "m", "3", (), tuple("x" * 300 for _ in range(10)), d.state, d.observation
    )
    assert len(long.summary()) == 1000


@pytest.mark.parametrize(
    "bad",
    [{"error_rate_ceiling": 5.0}, {"error_rate_ceiling": 0.0}, {"latency_p99_ceiling_ms": -1.0}],
)
def test_a_watchdog_policy_refuses_ceilings_that_never_trip_or_always_do(
    bad: dict[str, float],
) -> None:
    with pytest.raises(ValueError, match=r"error_rate_ceiling|latency_p99_ceiling_ms"):
        WatchdogPolicy(**bad)  # type: ignore[arg-type]
    WatchdogPolicy(error_rate_ceiling=None, latency_p99_ceiling_ms=None)  # both off is fine


def test_an_alert_that_cannot_be_acted_on_is_reported_once_per_interval() -> None:
    from ballast.watchdog import AlertRecord, Response, repeats_alert

    d = SimpleNamespace(version="3", status="breach")
    alert = Response("alert", "breach, but m has no previous version")
    last = AlertRecord("3", "breach", alert.reason, at=1000.0)
    # The same alert within the interval: not reported again.
    assert repeats_alert(last, d, alert, now=1000.0 + 300, every_s=3600)  # type: ignore[arg-type]
    # After the interval, after another version or reason, or for a rollback: reported.
    assert not repeats_alert(last, d, alert, now=1000.0 + 3600, every_s=3600)  # type: ignore[arg-type]
    other = SimpleNamespace(version="4", status="breach")
    assert not repeats_alert(last, other, alert, now=1300.0, every_s=3600)  # type: ignore[arg-type]
    down = SimpleNamespace(version="3", status="unavailable")
    assert not repeats_alert(last, down, alert, now=1300.0, every_s=3600)  # type: ignore[arg-type]
    rollback = Response("rollback", alert.reason)
    assert not repeats_alert(last, d, rollback, now=1300.0, every_s=3600)  # type: ignore[arg-type]
    assert not repeats_alert(None, d, alert, now=1300.0, every_s=3600)  # type: ignore[arg-type]
    # A clock that went back does not silence an alert for ever.
    assert not repeats_alert(last, d, alert, now=900.0, every_s=3600)  # type: ignore[arg-type]
    assert AlertRecord.from_dict(last.to_dict()) == last
    with pytest.raises(ValueError, match="not an alert record"):
        AlertRecord.from_dict({"version": 3, "status": "breach", "reason": "x", "at": 1})
