"""The robust online detector (ballast/anomaly.py): warm-up, noise floor, CUSUM, adaptation, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ballast.anomaly import (
    MAD_TO_SD,
    SCHEMA,
    DetectorPolicy,
    DetectorState,
    MetricSpec,
    MetricState,
    MetricVerdict,
    median,
    update_metric,
)

POLICY = DetectorPolicy(warmup=5, min_count=10)
LATENCY = MetricSpec("latency_p99_ms", "value", "up", abs_floor=0.5, rel_floor=0.05)
ERRORS = MetricSpec("error_rate", "rate", "up", abs_floor=0.002, hard_ceiling=0.05)
SHARE = MetricSpec("class_share:1", "share", "both", abs_floor=0.01)


def feed(
    spec: MetricSpec,
    values: list[float],
    count: int = 1000,
    state: MetricState | None = None,
    policy: DetectorPolicy = POLICY,
) -> tuple[MetricState, list[MetricVerdict]]:
    st = state or MetricState()
    out = []
    for v in values:
        st, verdict = update_metric(st, spec, v, count, policy)
        out.append(verdict)
    return st, out


def test_median_and_mad_constant() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert pytest.approx(1 / 0.6744897501960817) == MAD_TO_SD
    with pytest.raises(ValueError, match="median of nothing"):
        median([])


def test_policy_refuses_a_clip_that_lets_one_window_page() -> None:
    with pytest.raises(ValueError, match="one window"):
        DetectorPolicy(cusum_k=0.5, z_clip=9.0, cusum_h=8.0)
    with pytest.raises(ValueError, match="warmup >= 3"):
        DetectorPolicy(warmup=2)


def test_warm_up_sets_median_level_and_ignores_a_wild_window() -> None:
    st, verdicts = feed(LATENCY, [20.0, 21.0, 19.0, 500.0, 20.5])
    assert [v.status for v in verdicts[:4]] == ["warmup"] * 4
    assert verdicts[4].status == "ok" and verdicts[4].reason == "baseline set"
    assert st.level == 20.5  # the median: the 500 ms window does not move it


def test_too_few_requests_change_nothing() -> None:
    st, _ = feed(LATENCY, [20.0] * 5)
    after, verdict = update_metric(st, LATENCY, 900.0, 3, POLICY)
    assert verdict.status == "insufficient" and "3 requests" in verdict.reason
    assert after == st
    after, verdict = update_metric(st, LATENCY, None, 1000, POLICY)
    assert verdict.status == "insufficient" and after == st
    after, verdict = update_metric(st, LATENCY, math.nan, 1000, POLICY)
    assert verdict.status == "insufficient" and after == st


def test_one_extreme_window_never_pages_two_do() -> None:
    st, _ = feed(LATENCY, [20.0, 20.4, 19.6, 20.2, 19.8, 20.1, 19.9])
    one, verdicts = feed(LATENCY, [10_000.0], state=st)
    assert verdicts[0].status == "ok", "a single window adds at most z_clip - k"
    assert verdicts[0].cusum == pytest.approx(POLICY.z_clip - POLICY.cusum_k)
    # ... and it decays again when traffic is normal.
    back, verdicts = feed(LATENCY, [20.0] * 5, state=one)
    assert all(v.status == "ok" for v in verdicts) and back.cusum_hi == 0.0
    _, verdicts = feed(LATENCY, [10_000.0] * 3, state=st)
    assert [v.status for v in verdicts] == ["ok", "ok", "breach"]
    breach = verdicts[-1]
    assert breach.metric == "latency_p99_ms" and breach.threshold == POLICY.cusum_h
    assert breach.cusum > POLICY.cusum_h and breach.baseline == pytest.approx(20.0, abs=0.2)
    assert "above its baseline" in breach.reason and breach.rule == "cusum"
    assert breach.severity == pytest.approx(breach.cusum / POLICY.cusum_h)


def test_a_moderate_sustained_shift_accumulates_to_a_breach() -> None:
    rng = np.random.default_rng(0)
    normal = list(20.0 + rng.normal(0, 1.0, 40))
    st, verdicts = feed(LATENCY, normal)
    assert not any(v.breached for v in verdicts)
    # +4 sd: no single window pages, but the sum does within a few windows.
    shifted = list(24.0 + rng.normal(0, 1.0, 10))
    _, verdicts = feed(LATENCY, shifted, state=st)
    first = next(i for i, v in enumerate(verdicts) if v.breached)
    assert 2 <= first <= 5


def test_normal_noise_does_not_page_over_a_simulated_week() -> None:
    rng = np.random.default_rng(1)
    values = list(20.0 * np.exp(rng.normal(0, 0.05, 2016)))
    _, verdicts = feed(LATENCY, values, policy=DetectorPolicy(warmup=12, min_count=10))
    assert sum(v.breached for v in verdicts) == 0


def test_the_binomial_floor_keeps_a_zero_error_baseline_from_paging_on_one_error() -> None:
    st, _ = feed(ERRORS, [0.0] * 8, count=300)
    assert st.level == 0.0
    # One error in 300 requests: the MAD scale is 0, the floor makes it about 1 sd (or less).
    _, verdicts = feed(ERRORS, [1 / 300] * 10, count=300, state=st)
    assert not any(v.breached for v in verdicts)


def test_hard_ceiling_breaches_during_warm_up_after_consecutive_windows() -> None:
    _, verdicts = feed(ERRORS, [0.01, 0.30, 0.30], count=500)
    assert [v.status for v in verdicts] == ["warmup", "warmup", "breach"]
    assert verdicts[-1].threshold == 0.05 and "hard ceiling" in verdicts[-1].reason
    assert verdicts[-1].rule == "hard_ceiling" and verdicts[-1].severity == pytest.approx(6.0)
    # Interrupted runs above the ceiling do not add up.
    _, verdicts = feed(ERRORS, [0.30, 0.01, 0.30, 0.01], count=500)
    assert not any(v.breached for v in verdicts)


def test_two_sided_metric_breaches_on_a_drop() -> None:
    rng = np.random.default_rng(2)
    st, _ = feed(SHARE, list(0.37 + rng.normal(0, 0.01, 20)), count=5000)
    _, verdicts = feed(SHARE, [0.25] * 4, count=5000, state=st)
    assert verdicts[-1].breached and "below its baseline" in verdicts[-1].reason
    _, up_only = feed(
        MetricSpec("x", "share", "up", abs_floor=0.01),
        [0.25] * 4,
        count=5000,
        state=st,
    )
    assert not any(v.breached for v in up_only)


def test_windows_far_out_do_not_move_the_baseline() -> None:
    st, _ = feed(LATENCY, [20.0, 20.4, 19.6, 20.2, 19.8])
    level = st.level
    after, _ = feed(LATENCY, [1000.0], state=st)
    assert after.level == level and after.residuals == st.residuals
    after, _ = feed(LATENCY, [20.3], state=st)
    assert after.level != level


def test_overlap_inflates_the_scale() -> None:
    st, _ = feed(LATENCY, [20.0, 20.4, 19.6, 20.2, 19.8])
    _, plain = update_metric(st, LATENCY, 25.0, 1000, POLICY)
    _, overlapped = update_metric(st, LATENCY, 25.0, 1000, POLICY, overlap=0.8)
    assert plain.scale is not None and overlapped.scale is not None
    assert overlapped.scale == pytest.approx(plain.scale * 3.0)  # sqrt(1.8 / 0.2)


def test_state_round_trips_through_json() -> None:
    st, _ = feed(LATENCY, [20.0, 20.4, 19.6, 20.2, 19.8, 30.0])
    state = DetectorState(
        model="m", version="3", snapshot={"replicas": {}}, metrics={"latency_p99_ms": st}, checks=7
    )
    back = DetectorState.from_dict(json.loads(json.dumps(state.to_dict())), "m")
    assert back == state
    # Continuing from the reloaded state gives the same verdict as continuing in memory.
    assert update_metric(st, LATENCY, 31.0, 1000, POLICY) == update_metric(
        back.metrics["latency_p99_ms"], LATENCY, 31.0, 1000, POLICY
    )


def test_state_of_another_model_or_schema_starts_fresh() -> None:
    d = DetectorState(model="m", version="3", checks=5).to_dict()
    assert DetectorState.from_dict(d, "other") == DetectorState(model="other")
    assert DetectorState.from_dict({**d, "schema": SCHEMA + 1}, "m") == DetectorState(model="m")
