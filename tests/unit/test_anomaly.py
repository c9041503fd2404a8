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
FREEZE_AT = POLICY.freeze_share * POLICY.cusum_h  # windows taking the CUSUM past it are not learnt


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
    with pytest.raises(ValueError, match="freeze_share"):
        DetectorPolicy(freeze_share=-0.1)
    with pytest.raises(ValueError, match="freeze_share"):
        DetectorPolicy(freeze_share=float("nan"))


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


def _step_after_noise() -> tuple[MetricState, list[float]]:
    """A latency baseline of scale 1.0 (the 5 % floor of 20 ms), then a step of about 2.6 sd."""
    rng = np.random.default_rng(0)
    warm = [19.0, 21.0, 20.0, 19.5, 20.5] + [20.0 + float(x) for x in rng.normal(0, 0.7, 30)]
    st, verdicts = feed(LATENCY, warm)
    assert not any(v.breached for v in verdicts)
    return st, [22.6] * 60


def test_a_sustained_step_of_two_to_three_sd_is_not_learnt_once_half_way_to_a_page() -> None:
    st, step = _step_after_noise()
    _, verdicts = feed(LATENCY, step, state=st)
    first = next(i for i, v in enumerate(verdicts) if v.breached)
    assert 8 <= first <= 14  # about an hour of 5-minute windows
    # From the window that took the CUSUM past freeze_share of h on, the level stays put.
    half = next(i for i, v in enumerate(verdicts) if (v.cusum or 0) > FREEZE_AT)
    assert half < first
    assert {v.baseline for v in verdicts[half + 1 : first + 1]} == {verdicts[half].baseline}
    # The same step with the baseline learning from every window within z_update (the
    # behaviour before freeze_share): it is absorbed and never pages.
    never = DetectorPolicy(warmup=5, min_count=10, freeze_share=1.0)
    after, verdicts = feed(LATENCY, step, state=st, policy=never)
    assert not any(v.breached for v in verdicts)
    assert max(v.cusum or 0 for v in verdicts) < never.cusum_h
    assert after.level is not None and after.level > 21.5


def test_a_window_below_the_freeze_still_moves_the_baseline_and_freezing_ends_with_the_evidence() -> (
    None
):
    st, _ = _step_after_noise()
    level = st.level
    assert level is not None
    # z about 2.9 adds 1.4: one such window stays below the freeze and is learnt.
    after, (v,) = feed(LATENCY, [level + 2.9], state=st)
    assert 0 < (v.cusum or 0) < FREEZE_AT and after.level != level
    # Five in a row pass it (each learnt one brings z down a little): the fifth is not learnt,
    # neither its level nor its residual.
    frozen, verdicts = feed(LATENCY, [level + 2.9] * 5, state=st)
    assert (verdicts[-2].cusum or 0) < FREEZE_AT < (verdicts[-1].cusum or 0)
    assert frozen.level == verdicts[-1].baseline
    assert len(frozen.residuals) == len(st.residuals) + 4
    # Normal windows then bring the sum back under it, and learning resumes.
    resumed, verdicts = feed(LATENCY, [level, level], state=frozen)
    assert (verdicts[-1].cusum or 0) < FREEZE_AT
    assert resumed.level != frozen.level


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


def test_an_up_metric_follows_a_lower_plateau_after_a_high_warm_up_and_pages_on_a_regression() -> (
    None
):
    # Given a p99 that is high while caches are cold (the warm-up) and then settles far lower
    rng = np.random.default_rng(3)
    st, _ = feed(LATENCY, list(120.0 + rng.normal(0, 3.0, 5)))
    st, settled = feed(LATENCY, list(50.0 + rng.normal(0, 2.0, 288)), state=st)
    # then the level walks down to the plateau instead of freezing at the warm-up's level
    assert not any(v.breached for v in settled)
    assert st.level == pytest.approx(50.0, abs=2.0), f"baseline stuck at {st.level}"
    # and when the p99 regresses back up to twice the plateau, the watchdog pages within windows
    st, regressed = feed(LATENCY, list(100.0 + rng.normal(0, 2.0, 48)), state=st)
    first = next((i for i, v in enumerate(regressed) if v.breached), None)
    assert first is not None and first <= 3, "a 2x regression after the plateau never paged"
    # and the fault does not become the new normal: it still pages after four hours
    assert st.level == pytest.approx(50.0, abs=2.0) and regressed[-1].breached


def test_an_error_rate_after_a_high_warm_up_pages_on_a_regression_from_a_lower_plateau() -> None:
    # Given 3 % errors in the first hour (under the hard ceiling), then a day at 0.1 %
    rng = np.random.default_rng(4)
    n = 2000
    st, _ = feed(ERRORS, list(rng.binomial(n, 0.03, 5) / n), count=n)
    st, settled = feed(ERRORS, list(rng.binomial(n, 0.001, 288) / n), count=n, state=st)
    assert not any(v.breached for v in settled)
    assert st.level is not None and st.level < 0.003, f"baseline stuck at {st.level}"
    # When errors rise 25-fold to 2.5 % (still under the 5 % ceiling), the CUSUM pages
    _, regressed = feed(ERRORS, list(rng.binomial(n, 0.025, 6) / n), count=n, state=st)
    assert any(v.breached and v.rule == "cusum" for v in regressed)


def test_a_window_far_below_moves_an_up_metric_one_clipped_step_and_not_its_scale() -> None:
    st, _ = feed(LATENCY, [20.0, 20.4, 19.6, 20.2, 19.8])
    assert st.level is not None
    after, verdict = update_metric(st, LATENCY, 1.0, 1000, POLICY)
    assert verdict.z is not None and verdict.z < -POLICY.z_update and verdict.scale is not None
    step = POLICY.alpha * POLICY.z_update * verdict.scale
    assert after.level == pytest.approx(st.level - step), "the residual is clipped at -z_update"
    assert after.residuals == st.residuals, "a clipped window must not join the scale's residuals"
    # A two-sided metric watches drops too: a window far below its level is a fault, not news.
    st, _ = feed(SHARE, [0.37, 0.38, 0.36, 0.37, 0.375], count=5000)
    after, _ = update_metric(st, SHARE, 0.05, 5000, POLICY)
    assert after.level == st.level and after.residuals == st.residuals


def test_a_hard_ceiling_of_zero_is_a_ceiling_and_its_breaches_are_infinitely_severe() -> None:
    zero = MetricSpec("error_rate", "rate", "up", abs_floor=0.002, hard_ceiling=0.0)
    policy = DetectorPolicy(warmup=3, min_count=10, hard_consecutive=1)
    st = MetricState()
    verdicts = []
    for _ in range(4):
        st, verdict = update_metric(st, zero, 0.01, 1000, policy)
        verdicts.append(verdict)
    assert all(v.breached and v.rule == "hard_ceiling" for v in verdicts)
    # The window that sets the baseline reports the ceiling, not the CUSUM's h, as its threshold.
    assert [v.threshold for v in verdicts] == [0.0] * 4
    assert all(v.severity == math.inf for v in verdicts), [v.severity for v in verdicts]
    _, ok = update_metric(st, zero, 0.0, 1000, policy)
    assert not ok.breached and ok.severity == 0.0


def test_a_non_finite_value_is_insufficient_for_that_reason_not_for_its_request_count() -> None:
    for bad in (math.nan, math.inf):
        after, verdict = update_metric(MetricState(), ERRORS, bad, 5000, POLICY)
        assert verdict.status == "insufficient" and after == MetricState()
        assert verdict.reason.startswith("non-finite value"), verdict.reason


def test_a_short_window_conclusively_above_the_hard_ceiling_counts() -> None:
    # Before: a window short of min_count was "insufficient" before the ceiling was looked at,
    # so a champion failing all of its 99 requests a window read healthy for ever.
    policy = DetectorPolicy(warmup=5, min_count=100)
    state, verdicts = MetricState(), []
    for _ in range(2):
        state, v = update_metric(state, ERRORS, 1.0, 99, policy)
        verdicts.append(v)
    assert [v.status for v in verdicts] == ["insufficient", "breach"]
    assert verdicts[-1].rule == "hard_ceiling" and "conclusive" in verdicts[-1].reason


def test_a_short_window_with_too_little_evidence_stays_insufficient() -> None:
    # 1 error in 10 requests against a 5 % ceiling: p = 0.40, nothing to act on.
    policy = DetectorPolicy(warmup=5, min_count=100)
    state = MetricState()
    for _ in range(5):
        state, v = update_metric(state, ERRORS, 0.1, 10, policy)
        assert v.status == "insufficient" and state.hard_run == 0


def test_windows_above_the_hard_ceiling_must_be_consecutive() -> None:
    # Before: the quiet windows between two bad ones (hours apart) kept the run alive.
    policy = DetectorPolicy(warmup=5, min_count=100)
    state, v = update_metric(MetricState(), ERRORS, 0.06, 200, policy)
    assert state.hard_run == 1
    for _ in range(36):  # a quiet night: 0 errors in 90 requests a window
        state, v = update_metric(state, ERRORS, 0.0, 90, policy)
    assert state.hard_run == 0
    state, v = update_metric(state, ERRORS, 0.06, 200, policy)
    assert v.status != "breach" and state.hard_run == 1


def test_a_busy_window_is_judged_by_a_busy_windows_noise_after_quiet_ones() -> None:
    from ballast.watchdog import ERROR_RATE, WatchdogPolicy

    policy = WatchdogPolicy()
    spec, detector = policy.spec(ERROR_RATE), policy.detector
    rng = np.random.default_rng(0)
    state = MetricState()
    for i in range(96):  # eight hours: an hour of 2000 requests a window, then one of 150, ...
        n = 150 if (i // 12) % 2 else 2000
        state, _ = update_metric(state, spec, rng.binomial(n, 0.01) / n, n, detector)
    _, busy = update_metric(state, spec, 0.01, 2000, detector)
    _, quiet = update_metric(state, spec, 0.01, 150, detector)
    binomial_busy = math.sqrt(0.01 * 0.99 / 2000)
    # Before: the quiet windows' spread set every window's scale (0.0052 for a busy one, 2.4x
    # its binomial noise): an error rate doubling to 2 % read as z 1.3, under the slack, and
    # never added up.
    assert busy.scale is not None and quiet.scale is not None
    assert busy.scale < 1.3 * binomial_busy and quiet.scale > 3 * busy.scale
    _, doubled = update_metric(state, spec, 0.02, 2000, detector)
    assert doubled.z is not None and doubled.z > 2.5
