"""The canary controller's logic, against a FAKE of the gateway's admin API and synthetic load.

``FakeAdmin`` stands in for ``GatewayClient.get_deployment`` / ``set_deployment`` only (it
validates nothing beyond the ``Deployment`` model itself); ``SyntheticLoad`` fabricates
observations. The real gateway, real requests and real ONNX models are exercised in
``tests/integration/test_canary_rollback.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from ballast.canary import (
    CanaryResult,
    CanaryTurnTimeout,
    LoadFn,
    StepRecord,
    UnattributedPolicy,
    judge_unattributed,
    run_canary,
    wait_for_turn,
)
from ballast.errors import GatewayError
from ballast.gateway_client import GatewayHTTPError
from ballast.judge import UNKNOWN_VERSION, Observation, SequentialJudge, ThresholdJudge
from ballast.serving import Deployment, VersionSpec, deployment_etag, precondition_holds

MODEL = "m"
STEPS = (5, 25, 50, 100)
MIN = 20


def spec(version: str) -> VersionSpec:
    return VersionSpec(version=version, artifact_path=f"/a/{version}.onnx", sha256="0" * 64)


CHAMPION = spec("1")
CANDIDATE = spec("2")
CHAMPION_ONLY = Deployment(model=MODEL, champion=CHAMPION)


class FakeAdmin:
    """FAKE of the gateway admin API (get/set deployment) that records every change."""

    def __init__(self, current: Deployment | None, *, fail_on_set: int | None = None) -> None:
        self.current = current
        self.history: list[Deployment] = []
        self._fail_on_set = fail_on_set

    def get_deployment(self) -> Deployment | None:
        return self.current

    def set_deployment(
        self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
    ) -> Deployment:
        # If-Match as the gateway checks it (a compare-and-set on the deployment in force).
        tags = frozenset(deployment_etag(d) for d in expect)
        if expect and not precondition_holds(tags, self.current, time.time()):
            raise GatewayHTTPError("fake admin: 412 precondition failed", status_code=412)
        if self._fail_on_set is not None and len(self.history) + 1 == self._fail_on_set:
            self.history.append(dep)
            raise GatewayError("fake admin refused the change")
        self.history.append(dep)
        self.current = dep
        return dep


class SyntheticLoad:
    """Fabricates one step's traffic: exactly ``MIN`` candidate answers and the champion's share.

    ``candidate_error_every=k`` fails every k-th candidate request; ``candidate_latency_s`` sets
    its latency (champion: 10 ms); ``raise_on_call=n`` raises on the n-th call.
    """

    def __init__(
        self,
        *,
        candidate_error_every: int | None = None,
        candidate_latency_s: float = 0.010,
        raise_on_call: int | None = None,
        exc: BaseException | None = None,
        per_call: int = MIN,
    ) -> None:
        self.calls: list[int] = []
        self.error_every = candidate_error_every
        self.latency = candidate_latency_s
        self.raise_on_call = raise_on_call
        self.exc = exc or RuntimeError("load generator crashed")
        self.per_call = per_call

    def __call__(self, weight: int) -> list[Observation]:
        self.calls.append(weight)
        if self.raise_on_call == len(self.calls):
            raise self.exc
        out = []
        for i in range(self.per_call):
            ok = self.error_every is None or i % self.error_every != 0
            out.append(Observation(CANDIDATE.version, ok, self.latency, None))
        n_champion = self.per_call * (100 - weight) // weight
        out += [Observation(CHAMPION.version, True, 0.010, None) for _ in range(n_champion)]
        return out


JUDGE = ThresholdJudge(min_samples=MIN)


def canary(admin: FakeAdmin, load: LoadFn, **kw: Any) -> CanaryResult:
    """run_canary with this module's defaults; ``kw`` overrides any of them."""
    args: dict[str, Any] = {
        "model": MODEL,
        "champion": CHAMPION,
        "candidate": CANDIDATE,
        "steps": STEPS,
        "judge": JUDGE,
        "load": load,
        "min_samples": MIN,
        "step_max_seconds": 5.0,
    }
    args.update(kw)
    return run_canary(admin, **args)


def test_healthy_candidate_walks_every_step_and_becomes_champion() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    seen: list[StepRecord] = []
    result = run_canary(
        admin,
        model=MODEL,
        champion=CHAMPION,
        candidate=CANDIDATE,
        steps=STEPS,
        judge=JUDGE,
        load=SyntheticLoad(),
        min_samples=MIN,
        step_max_seconds=5.0,
        on_step=seen.append,
    )
    assert result.decision == "promote", result.reasons
    assert [s.weight for s in result.steps] == list(STEPS)
    assert [s.verdict.decision for s in result.steps] == ["continue"] * 3 + ["promote"]
    assert [d.canary_weight for d in admin.history[:4]] == list(STEPS)
    # One salt for every step of this canary (a key keeps its side as the weight grows), a
    # fresh one for the next canary (see Deployment.key_salt).
    salts = {d.key_salt for d in admin.history[:4]}
    assert len(salts) == 1 and None not in salts
    again = FakeAdmin(CHAMPION_ONLY)
    canary(again, SyntheticLoad())
    assert again.history[0].key_salt not in salts
    assert admin.current == Deployment(model=MODEL, champion=CANDIDATE), admin.current
    assert result.final_deployment == admin.current
    assert seen == list(result.steps), "on_step sees every step, in order"
    assert result.seconds_to_decision == result.steps[-1].seconds
    assert result.steps[0].counts == {"2": MIN, "1": MIN * 95 // 5}


def test_erroring_candidate_rolls_back_at_the_first_step_with_evidence() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    load = SyntheticLoad(candidate_error_every=3)  # about a third fail
    result = canary(admin, load)
    assert result.decision == "rollback"
    assert len(result.steps) == 1, "rollback must not wait for later steps"
    assert load.calls == [5]
    assert admin.current == CHAMPION_ONLY, admin.current
    assert admin.current.canary is None
    assert admin.current.canary_weight == 0
    assert any("error rate" in r for r in result.reasons)
    assert result.evidence["canary_error_rate"] > 0.3


def test_slow_candidate_rolls_back_on_latency() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    result = canary(admin, SyntheticLoad(candidate_latency_s=0.070))
    assert result.decision == "rollback"
    assert any("p95 latency" in r for r in result.reasons)
    assert admin.current == CHAMPION_ONLY


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("load generator crashed"), KeyboardInterrupt()],
    ids=["error", "keyboard-interrupt"],
)
def test_failure_mid_canary_restores_the_champion_and_reraises(exc: BaseException) -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    load = SyntheticLoad(raise_on_call=2, exc=exc)
    with pytest.raises(type(exc)):
        canary(admin, load)
    assert admin.history[1].canary_weight == 25, "the failure happened during step 2"
    assert admin.current == CHAMPION_ONLY, admin.current


def test_failing_step_callback_restores_too() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)

    def explode(record: StepRecord) -> None:
        raise ValueError(f"report writer broke at {record.weight}%")

    with pytest.raises(ValueError, match="at 5%"):
        canary(admin, SyntheticLoad(), on_step=explode)
    assert admin.current == CHAMPION_ONLY


def test_failed_final_switch_restores_the_previous_deployment() -> None:
    admin = FakeAdmin(CHAMPION_ONLY, fail_on_set=5)  # 4 steps, then the promotion fails
    with pytest.raises(GatewayError):
        canary(admin, SyntheticLoad())
    assert admin.current == CHAMPION_ONLY


def test_restore_failure_keeps_the_original_error_and_notes_the_second() -> None:
    admin = FakeAdmin(CHAMPION_ONLY, fail_on_set=3)  # step 2 is set, then restore is refused
    load = SyntheticLoad(raise_on_call=2)
    with pytest.raises(RuntimeError, match="load generator crashed") as info:
        canary(admin, load)
    assert any("restoring the pre-canary deployment failed" in n for n in info.value.__notes__)


def test_failure_with_nothing_deployed_before_restores_an_empty_deployment() -> None:
    admin = FakeAdmin(None)
    with pytest.raises(RuntimeError):
        canary(admin, SyntheticLoad(raise_on_call=1))
    assert admin.current == Deployment(model=MODEL), admin.current


def test_first_release_takes_all_traffic_at_once_and_is_judged_absolutely() -> None:
    admin = FakeAdmin(None)
    load = SyntheticLoad()
    result = canary(admin, load, champion=None)
    assert result.decision == "promote", result.reasons
    assert admin.history[0] == Deployment(model=MODEL, canary=CANDIDATE, canary_weight=100)
    assert load.calls == [100]
    assert admin.current == Deployment(model=MODEL, champion=CANDIDATE)
    assert any("no baseline" in r for r in result.reasons)


def test_failed_first_release_leaves_nothing_served() -> None:
    admin = FakeAdmin(None)
    result = canary(admin, SyntheticLoad(candidate_error_every=2), champion=None)
    assert result.decision == "rollback"
    assert admin.current == Deployment(model=MODEL)


def test_a_step_out_of_time_short_of_evidence_ends_the_canary_there() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    # Each call gives a few candidate answers; the step clock runs out before MIN are seen.
    slow = SyntheticLoad(per_call=1)
    original = slow.__call__

    calls = [0]

    def trickle(weight: int) -> list[Observation]:
        calls[0] += 1
        time.sleep(0.04)
        return original(weight)

    started = time.monotonic()
    result = canary(admin, trickle, step_max_seconds=0.1)
    elapsed = time.monotonic() - started
    assert result.decision == "rollback"
    assert result.reasons[0] == "inconclusive at 5%"
    assert result.reasons[1].startswith("canary 2 answered ")
    assert result.reasons[1].endswith(f" of {MIN} requests in this step within 0.1 s")
    # Never more traffic on evidence nobody saw: 5 % was the most the candidate got.
    assert [d.canary_weight for d in admin.history] == [5, 0]
    assert admin.current == CHAMPION_ONLY
    # Calls counted, not time: a stalled machine can only make fewer of them fit in 0.1 s.
    assert calls[0] <= 3, f"the step must respect step_max_seconds ({calls[0]} load calls)"
    assert elapsed < 10, f"the step must respect step_max_seconds (took {elapsed:.2f}s)"


def test_too_little_evidence_at_the_last_step_is_not_promoted() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    calls = [0]

    def dries_up_at_100(weight: int) -> list[Observation]:
        calls[0] += 1
        return [] if weight == 100 else SyntheticLoad()(weight)

    result = canary(admin, dries_up_at_100)
    assert result.decision == "rollback"
    assert result.reasons[0] == "inconclusive at 100%"
    assert admin.current == CHAMPION_ONLY


# -- requests no version answered ---------------------------------------------------------------


def hanging_candidate(hang_every: int) -> LoadFn:
    """Every ``hang_every``-th request routed to the candidate gets no answer (client timeout:
    no version header); the rest are as healthy and fast as the champion's."""

    def load(weight: int) -> list[Observation]:
        out = []
        for i in range(MIN):
            out.append(Observation(CANDIDATE.version, True, 0.010, None))
            if i % hang_every == 0:
                out.append(Observation(UNKNOWN_VERSION, False, 5.0, None))
        n_champion = MIN * (100 - weight) // weight
        out += [Observation(CHAMPION.version, True, 0.010, None) for _ in range(n_champion)]
        return out

    return load


def test_a_candidate_that_hangs_on_some_requests_is_rolled_back_not_promoted() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    result = canary(admin, hanging_candidate(hang_every=3))  # 7 of 27 of its requests hang
    assert result.decision == "rollback"
    # 7 unanswered of 407 requests at 5 %: 1.7 % of the step, over the 1 % tolerated.
    assert result.reasons[0].startswith("7 of 407 requests at 5% got no answer from any version")
    assert result.steps[-1].verdict.evidence["unattributed_failures"] == 7.0
    assert [d.canary_weight for d in admin.history] == [5, 0]
    assert admin.current == CHAMPION_ONLY


def test_a_candidate_no_request_reaches_never_gets_more_than_the_first_step() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)

    def nothing_answers_for_the_candidate(weight: int) -> list[Observation]:
        return [Observation(CHAMPION.version, True, 0.010, None) for _ in range(40)]

    result = canary(admin, nothing_answers_for_the_candidate, step_max_seconds=0.05)
    assert result.decision == "rollback"
    assert result.reasons == (
        "inconclusive at 5%",
        f"canary 2 answered 0 of {MIN} requests in this step within 0.05 s",
    )
    assert [d.canary_weight for d in admin.history] == [5, 0]


def test_a_stream_judge_does_not_advance_a_candidate_that_answered_too_little() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)

    def champion_only(weight: int) -> list[Observation]:
        time.sleep(0.01)
        return [Observation(CHAMPION.version, True, 0.010, None) for _ in range(40)]

    result = canary(admin, champion_only, judge=SequentialJudge(), step_max_seconds=0.05)
    assert result.decision == "rollback" and result.reasons[0] == "inconclusive at 5%"
    assert [d.canary_weight for d in admin.history] == [5, 0]


def test_a_few_unanswered_requests_within_the_tolerance_do_not_stop_a_healthy_canary() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    result = canary(admin, hanging_candidate(hang_every=MIN))  # one unanswered per step
    assert result.decision == "promote"
    strict = canary(
        FakeAdmin(CHAMPION_ONLY),
        hanging_candidate(hang_every=MIN),
        unattributed=UnattributedPolicy(max_share=0.0, min_failures=1),
    )
    assert strict.decision == "rollback"


def _obs(unanswered: int, answered: int) -> list[Observation]:
    return [Observation(UNKNOWN_VERSION, False, 5.0, None)] * unanswered + [
        Observation("1", True, 0.01, None)
    ] * answered


@pytest.mark.parametrize(
    ("unanswered", "answered", "rolled_back"),
    [
        (0, 100, False),
        (1, 0, False),  # one alone never decides (min_failures 2)
        (2, 198, False),  # exactly 1 %: not over the limit
        (2, 197, True),  # 2 of 199: just over
        (3, 0, True),
        (0, 0, False),  # nothing seen: the sample check speaks, not this one
    ],
)
def test_judge_unattributed_boundaries(unanswered: int, answered: int, rolled_back: bool) -> None:
    verdict = judge_unattributed(_obs(unanswered, answered), 25, UnattributedPolicy())
    assert (verdict is not None) == rolled_back
    if verdict is not None:
        assert verdict.decision == "rollback"
        assert verdict.evidence["unattributed_share"] == unanswered / (unanswered + answered)


def test_judge_unattributed_ignores_failures_a_version_answered() -> None:
    # A 500 with a version header is that version's error (the judge's business), not this.
    failed = [Observation("2", False, 0.01, None)] * 50
    assert judge_unattributed(failed, 50, UnattributedPolicy()) is None


@pytest.mark.parametrize("kw", [{"max_share": -0.1}, {"max_share": 1.5}, {"min_failures": 0}])
def test_unattributed_policy_refuses_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="max_share"):
        UnattributedPolicy(**kw)  # type: ignore[arg-type]


def test_step_keeps_loading_until_the_candidate_has_enough_samples() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    load = SyntheticLoad(per_call=MIN // 4)
    result = canary(admin, load)
    assert result.decision == "promote"
    assert load.calls == [5] * 4 + [25] * 4 + [50] * 4 + [100] * 4
    assert all(s.counts["2"] == MIN for s in result.steps)


def test_empty_load_does_not_spin_until_the_deadline() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    started = time.monotonic()
    result = canary(admin, lambda weight: [], step_max_seconds=30.0)
    assert time.monotonic() - started < 10  # spinning would take the step's 30 s
    assert result.decision == "rollback"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"candidate": CHAMPION}, "already the champion"),
        ({"steps": (50, 25, 100)}, "canary steps"),
        ({"min_samples": 0}, "min_samples"),
        ({"step_max_seconds": 0.0}, "step_max_seconds"),
    ],
    ids=["candidate-is-champion", "bad-steps", "zero-samples", "zero-seconds"],
)
def test_bad_arguments_are_refused_before_traffic_moves(kw: dict[str, object], match: str) -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    with pytest.raises(ValueError, match=match):
        canary(admin, SyntheticLoad(), **kw)
    assert admin.history == [], "nothing may change before the arguments are checked"


# -- shadow phase and lease -----------------------------------------------------------------------


def shadow_load(per_call: int = 50, pause_s: float = 0.0) -> LoadFn:
    """Traffic at weight 0: the champion answers everything (the shadow's answers are discarded)."""

    def load(weight: int) -> list[Observation]:
        assert weight == 0 or weight in STEPS
        if pause_s:
            time.sleep(pause_s)
        if weight == 0:
            return [Observation(CHAMPION.version, True, 0.010, None) for _ in range(per_call)]
        return SyntheticLoad()(weight)

    return load


def stats_reader(rows: int, agree: int, failed: int = 0, mirrored: int | None = None) -> Any:
    from ballast.canary import ShadowStats

    return lambda: ShadowStats(
        mirrored=rows if mirrored is None else mirrored,
        rows_compared=rows,
        rows_agreeing=agree,
        failed=failed,
    )


def test_an_agreeing_shadow_goes_on_to_the_weight_steps() -> None:
    from ballast.canary import ShadowPolicy

    admin = FakeAdmin(CHAMPION_ONLY)
    result = canary(
        admin,
        shadow_load(),
        shadow=ShadowPolicy(seconds=0.05, max_disagreement=0.05, min_rows=50),
        shadow_reader=stats_reader(200, 198),
    )
    assert result.decision == "promote", result.reasons
    assert [s.weight for s in result.steps] == [0, *STEPS]
    assert [s.index for s in result.steps] == [0, 1, 2, 3, 4]
    first = admin.history[0]
    assert first.shadow == CANDIDATE and first.canary is None and first.shadow_fraction == 1.0
    assert result.steps[0].verdict.evidence["shadow_disagreement"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("reader", "why"),
    [
        (stats_reader(200, 180), "disagrees with the champion on 10.0% of 200 rows"),
        (stats_reader(200, 200, failed=5, mirrored=100), "shadow failed 5 of 100"),
    ],
)
def test_a_shadow_that_disagrees_or_fails_is_rolled_back_before_any_user_sees_it(
    reader: Any, why: str
) -> None:
    from ballast.canary import ShadowPolicy

    admin = FakeAdmin(CHAMPION_ONLY)
    result = canary(admin, shadow_load(), shadow=ShadowPolicy(seconds=0.05), shadow_reader=reader)
    assert result.decision == "rollback" and why in result.reasons[0], result.reasons
    assert [s.weight for s in result.steps] == [0]
    assert all(d.canary is None for d in admin.history), "no user request reached the candidate"
    assert admin.current == CHAMPION_ONLY


def test_the_shadow_phase_runs_its_length_after_the_gateway_took_the_change() -> None:
    from ballast.canary import ShadowPolicy

    class SlowToLoad(FakeAdmin):
        def set_deployment(
            self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
        ) -> Deployment:
            if dep.shadow is not None:
                time.sleep(0.3)  # loading and warming the candidate on every replica
            return super().set_deployment(dep, expect=expect)

    # Before: the phase's 0.2 s ran out while the change loaded; no traffic was sent at all.
    result = canary(
        SlowToLoad(CHAMPION_ONLY),
        shadow_load(),
        shadow=ShadowPolicy(seconds=0.2, max_disagreement=0.05, min_rows=50),
        shadow_reader=stats_reader(200, 198),
    )
    shadow = result.steps[0]
    assert shadow.weight == 0 and shadow.baseline_n >= 50, shadow
    assert shadow.step_seconds >= 0.5, shadow


def test_judge_shadow_calls_too_few_rows_inconclusive_not_bad() -> None:
    from ballast.canary import ShadowPolicy, ShadowStats, judge_shadow

    policy = ShadowPolicy(seconds=1, min_rows=100)
    verdict = judge_shadow(ShadowStats(10, 10, 0, 0), policy)
    assert verdict.decision == "continue" and "inconclusive" in verdict.reasons[0]
    assert judge_shadow(ShadowStats(0, 0, 0, 0), policy).decision == "continue"
    assert judge_shadow(ShadowStats(100, 100, 94, 0), policy).decision == "rollback"
    assert judge_shadow(ShadowStats(100, 100, 95, 0), policy).decision == "continue"


def test_trial_deployments_carry_a_renewed_lease_and_the_final_one_none() -> None:
    admin = FakeAdmin(CHAMPION_ONLY)
    t0 = time.time()
    # Each load call takes 0.1 s: the lease (0.3 s, renewed every 0.1 s) is renewed meanwhile.
    result = canary(admin, shadow_load(pause_s=0.1), lease_s=0.3)
    assert result.decision == "promote"
    trials = [d for d in admin.history if d.has_trial()]
    assert trials and all(d.lease_expires_at is not None for d in trials)
    assert all(t0 < d.lease_expires_at <= time.time() + 0.3 for d in trials)  # type: ignore[operator]
    assert len(trials) > len(STEPS), "renewals re-send the trial in force"
    assert admin.history[-1] == Deployment(model=MODEL, champion=CANDIDATE)
    assert admin.history[-1].lease_expires_at is None


def test_a_lease_that_cannot_be_renewed_stops_the_canary_and_restores() -> None:
    from ballast.canary import CanaryLeaseLost

    class Flaky(FakeAdmin):
        """Takes every change the controller makes, but not one renewal (the same trial sent
        again): the gateway cannot be told the canary is still watched."""

        def set_deployment(
            self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
        ) -> Deployment:
            last = self.current
            if last is not None and dep.has_trial() and _unleased(dep) == _unleased(last):
                raise GatewayError("renewal not delivered")
            return super().set_deployment(dep, expect=expect)

    def slow_step(weight: int) -> list[Observation]:
        time.sleep(0.05)  # 2 candidate answers per call: the first step takes 0.5 s
        return [Observation(CANDIDATE.version, True, 0.010, None) for _ in range(2)]

    admin = Flaky(CHAMPION_ONLY)
    started = time.monotonic()
    with pytest.raises(CanaryLeaseLost, match="could not be renewed"):
        canary(admin, slow_step, lease_s=0.3, step_max_seconds=10.0)
    assert time.monotonic() - started < 5, "stopped within the lease, not at the step's end"
    assert [d.canary_weight for d in admin.history] == [5, 0]
    assert admin.current == CHAMPION_ONLY, "the pre-canary deployment is restored"


def _unleased(dep: Deployment) -> Deployment:
    return dep.model_copy(update={"lease_expires_at": None})


PREVIOUS_ONLY = Deployment(model=MODEL, champion=spec("0"))


@pytest.mark.parametrize("lease_s", [0.3, None], ids=["leased", "no-lease"])
def test_a_deployment_changed_by_someone_else_stops_the_canary_and_stays(
    lease_s: float | None,
) -> None:
    from ballast.canary import CanaryPreempted

    # Given a canary whose first step is under way,
    admin = FakeAdmin(CHAMPION_ONLY)
    changed_at: list[int] = []

    def load(weight: int) -> list[Observation]:
        if not changed_at:
            # when somebody else (a forced rollback) replaces the deployment mid-step,
            admin.current = PREVIOUS_ONLY
            changed_at.append(len(admin.history))
            time.sleep(0.25)  # long enough for a renewal (every 0.1 s) to look
        return SyntheticLoad()(weight)

    with pytest.raises(CanaryPreempted, match="changed by someone else"):
        canary(admin, load, lease_s=lease_s)
    # then the canary stops without renewing, stepping, promoting or "restoring" over it.
    assert admin.history[changed_at[0] :] == [], "the canary overwrote another party's change"
    assert admin.current == PREVIOUS_ONLY


def test_a_rollback_between_reading_the_champion_and_the_first_step_is_not_undone() -> None:
    from ballast.canary import CanaryPreempted

    # The release read champion 1 from the registry; a rollback (the watchdog's) then put
    # version 0 on the gateway. Before: "canary goes on", and its first step sent champion 1
    # back, undoing the rollback; a rollback verdict then left 1 at 100 %.
    admin = FakeAdmin(PREVIOUS_ONLY)
    with pytest.raises(CanaryPreempted, match="did not start and sent nothing"):
        canary(admin, SyntheticLoad(), champion_settle_s=0.3)
    assert admin.history == [] and admin.current == PREVIOUS_ONLY


def _other_release_trial() -> Deployment:
    """Another release's canary (of version 3) over our champion, leased for a minute."""
    return Deployment(
        model=MODEL,
        champion=CHAMPION,
        canary=spec("3"),
        canary_weight=10,
        lease_expires_at=time.time() + 60,
    )


def test_another_trial_in_force_when_the_canary_begins_is_not_overwritten() -> None:
    from ballast.canary import CanaryPreempted, another_trial_took_over

    # Two runs saw the last trial end within a poll of each other; the other sent its trial
    # first. Before: this one's first step overwrote it.
    other = _other_release_trial()
    admin = FakeAdmin(other)
    with pytest.raises(CanaryPreempted, match="another trial is in force") as info:
        canary(admin, SyntheticLoad())
    assert admin.history == [] and admin.current == other
    assert info.value.live == other
    assert another_trial_took_over(info.value, CANDIDATE.version, time.time())


def test_a_trial_sent_between_the_look_and_the_first_step_is_not_overwritten() -> None:
    from ballast.canary import CanaryPreempted

    # The other run's trial lands after this canary's look: its first step carries If-Match
    # (the deployment it looked at), so the gateway refuses it (412) and nothing is sent after.
    other = _other_release_trial()

    class Racing(FakeAdmin):
        def set_deployment(
            self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
        ) -> Deployment:
            if not self.history:
                assert expect == (CHAMPION_ONLY,), expect
                self.current = other
            return super().set_deployment(dep, expect=expect)

    admin = Racing(CHAMPION_ONLY)
    with pytest.raises(CanaryPreempted, match="changed after the canary looked") as info:
        canary(admin, SyntheticLoad(), lease_s=30.0)
    assert admin.history == [] and admin.current == other  # no restore over theirs either
    assert info.value.raced and info.value.live == other


def test_a_rollback_between_a_steps_look_and_its_change_is_not_overwritten() -> None:
    from ballast.canary import CanaryPreempted

    # A person's rollback lands in the moment between the second step's look (is the trial in
    # force still ours?) and its PUT: the PUT names this canary's deployments in If-Match, so
    # the gateway refuses it and the rollback stands.
    rolled_back = Deployment(model=MODEL, champion=spec("0"))

    class Racing(FakeAdmin):
        def set_deployment(
            self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
        ) -> Deployment:
            if len(self.history) == 1:
                assert expect and all(d is not None and d.canary == CANDIDATE for d in expect)
                self.current = rolled_back
            return super().set_deployment(dep, expect=expect)

    admin = Racing(CHAMPION_ONLY)
    with pytest.raises(CanaryPreempted, match="changed by someone else") as info:
        canary(admin, SyntheticLoad())
    assert len(admin.history) == 1 and admin.current == rolled_back
    assert info.value.live == rolled_back and not info.value.raced


def test_a_renewal_refused_because_the_lease_ran_out_loses_the_lease() -> None:
    from ballast.canary import CanaryLeaseLost, CanaryPreempted

    # The gateway dropped the trial (its lease ran out) between a renewal's look and its PUT.
    class Expiring(FakeAdmin):
        def set_deployment(
            self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
        ) -> Deployment:
            last = self.current
            if last is not None and dep.has_trial() and _unleased(dep) == _unleased(last):
                self.current = last.without_trial()  # what the gateway's lease check leaves
            return super().set_deployment(dep, expect=expect)

    def slow_step(weight: int) -> list[Observation]:
        time.sleep(0.05)
        return [Observation(CANDIDATE.version, True, 0.010, None) for _ in range(2)]

    admin = Expiring(CHAMPION_ONLY)
    with pytest.raises(CanaryLeaseLost, match="lease ran out") as info:
        canary(admin, slow_step, lease_s=0.3, step_max_seconds=10.0)
    assert not isinstance(info.value, CanaryPreempted)
    # Nothing revived the trial: the champion alone is in force (restored as it was).
    assert admin.current is not None and not admin.current.has_trial()


def _preempted(live: Deployment | None) -> object:
    from ballast.canary import CanaryPreempted

    return CanaryPreempted("stopped", live=live)


@pytest.mark.parametrize(
    ("live", "took_over"),
    [
        # another release's canary or shadow, leased or not: its turn, then ours again
        (Deployment(model=MODEL, champion=CHAMPION, canary=spec("3"), canary_weight=10), True),
        (Deployment(model=MODEL, champion=CHAMPION, shadow=spec("3"), shadow_fraction=1.0), True),
        # a person's answer: a rollback, another champion, nothing served
        (PREVIOUS_ONLY, False),
        (CHAMPION_ONLY, False),
        (None, False),
        # a trial of this very version is not another release's
        (Deployment(model=MODEL, champion=CHAMPION, canary=CANDIDATE, canary_weight=10), False),
        # a trial whose lease ran out is over: the gateway serves the champion alone
        (
            Deployment(
                model=MODEL,
                champion=CHAMPION,
                canary=spec("3"),
                canary_weight=10,
                lease_expires_at=1.0,
            ),
            False,
        ),
    ],
    ids=["canary", "shadow", "rollback", "champion", "nothing", "own-version", "expired"],
)
def test_only_another_releases_trial_counts_as_its_turn(
    live: Deployment | None, took_over: bool
) -> None:
    from ballast.canary import CanaryPreempted, another_trial_took_over

    exc = _preempted(live)
    assert isinstance(exc, CanaryPreempted)
    assert another_trial_took_over(exc, CANDIDATE.version, time.time()) is took_over


def test_a_gateway_still_converging_on_the_champion_is_waited_for() -> None:
    admin = FakeAdmin(PREVIOUS_ONLY)
    gets = [0]
    real_get = admin.get_deployment

    def converging() -> Deployment | None:
        gets[0] += 1
        if gets[0] == 3:  # the last replica caught up with the promotion of version 1
            admin.current = CHAMPION_ONLY
        return real_get()

    admin.get_deployment = converging  # type: ignore[method-assign]
    result = canary(admin, SyntheticLoad(), champion_settle_s=5.0)
    assert result.decision == "promote"
    assert admin.history[0].champion == CHAMPION


def test_a_preempted_canary_never_restores_over_the_other_change_even_if_a_read_fails() -> None:
    from ballast.canary import CanaryPreempted

    class Flaky(FakeAdmin):
        """Once the canary has seen the other party's change, every further read fails."""

        seen = False

        def get_deployment(self) -> Deployment | None:
            if self.seen:
                raise GatewayError("GET timed out")
            self.seen = self.current == PREVIOUS_ONLY
            return self.current

    admin = Flaky(CHAMPION_ONLY)
    changed_at: list[int] = []

    def load(weight: int) -> list[Observation]:
        if not changed_at:
            admin.current = PREVIOUS_ONLY  # a forced rollback mid-step
            changed_at.append(len(admin.history))
        return SyntheticLoad()(weight)

    with pytest.raises(CanaryPreempted):
        canary(admin, load)
    # Before: restore() read again, the read failed, and it sent the pre-canary deployment
    # (champion 1) over the forced rollback.
    assert admin.history[changed_at[0] :] == [], admin.history
    assert admin.current == PREVIOUS_ONLY


def test_a_lease_that_ran_out_during_an_outage_is_lost_for_good() -> None:
    from ballast.canary import CanaryLeaseLost

    class Gateway(FakeAdmin):
        """Unreachable while ``down``; drops a trial whose lease ran out, as every replica does."""

        down = False

        def get_deployment(self) -> Deployment | None:
            if self.down:
                raise GatewayError("gateway unreachable")
            if self.current is not None and self.current.lease_expired(time.time()):
                self.current = self.current.without_trial()
            return self.current

        def set_deployment(
            self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
        ) -> Deployment:
            if self.down:
                raise GatewayError("gateway unreachable")
            return super().set_deployment(dep, expect=expect)

    admin = Gateway(CHAMPION_ONLY)
    outage_at: list[int] = []

    def load(weight: int) -> list[Observation]:
        if not outage_at:
            # Given an outage longer than the lease (0.3 s), then the gateway back for a while,
            outage_at.append(len(admin.history))
            admin.down = True
            time.sleep(0.6)
            admin.down = False
            time.sleep(0.3)  # several renewal periods with the gateway reachable again
        return SyntheticLoad()(weight)

    # when the canary looks again, then its lease is lost: no renewal revived the dropped trial.
    with pytest.raises(CanaryLeaseLost):
        canary(admin, load, lease_s=0.3)
    after = admin.history[outage_at[0] :]
    assert not any(d.has_trial() for d in after), f"a dropped trial was sent again: {after}"
    assert admin.current == CHAMPION_ONLY, admin.current


class LaggingReplicas(FakeAdmin):
    """Two replicas behind one address: every other GET reaches one that still serves what it
    served before the canary began (a PUT waits only so long for every replica to converge)."""

    def __init__(self, current: Deployment | None, *, stale_every: int = 2) -> None:
        super().__init__(current)
        self.stale = current
        self.gets = 0
        self.stale_every = stale_every  # 1: every GET reaches the lagging replica

    def get_deployment(self) -> Deployment | None:
        self.gets += 1
        lagging = self.stale_every == 1 or self.gets % self.stale_every == 1
        return self.stale if lagging else self.current


def test_a_replica_that_has_not_caught_up_does_not_stop_a_healthy_canary() -> None:
    # While the lease holds, the pre-canary deployment on one replica is that replica lagging,
    # not the gateway dropping the trial: the canary goes on and promotes.
    admin = LaggingReplicas(CHAMPION_ONLY)

    def load(weight: int) -> list[Observation]:
        # A renewal looks (two GETs: one may reach the lagging replica) during each step. The
        # lease is long enough that a stalled CI machine cannot let it run out meanwhile.
        seen, deadline = admin.gets, time.monotonic() + 10
        while admin.gets < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return SyntheticLoad()(weight)

    result = canary(admin, load, lease_s=3.0)

    assert result.decision == "promote", result
    assert _unleased(admin.current) == Deployment(model=MODEL, champion=CANDIDATE)  # type: ignore[arg-type]


def test_a_restore_is_sent_even_when_a_lagging_replica_already_shows_it() -> None:
    # A GET answered by a replica that never took the trial must not skip the restore: the
    # other replicas (and the desired state) still hold the candidate's share.
    admin = LaggingReplicas(CHAMPION_ONLY, stale_every=1)

    with pytest.raises(RuntimeError, match="load generator crashed"):
        canary(admin, SyntheticLoad(raise_on_call=1), lease_s=0.3)

    assert admin.history[-1] == CHAMPION_ONLY, admin.history
    assert admin.current == CHAMPION_ONLY


# -- taking turns with another release's canary ----------------------------------------------


class TrialEndsAfter(FakeAdmin):
    """The gateway shows another release's leased trial for ``reads`` reads, then its end."""

    def __init__(self, reads: int, *, after: Deployment | None = CHAMPION_ONLY) -> None:
        other = Deployment(
            model=MODEL,
            champion=CHAMPION,
            canary=spec("7"),
            canary_weight=25,
            lease_expires_at=time.time() + 600,
        )
        super().__init__(other)
        self.reads, self.after = reads, after

    def get_deployment(self) -> Deployment | None:
        self.reads -= 1
        if self.reads < 0:
            self.current = self.after
        return self.current


def test_a_canary_waits_for_the_trial_in_force_to_end_then_goes_on() -> None:
    admin = TrialEndsAfter(3)
    waits: list[Deployment] = []
    live = wait_for_turn(admin, 10.0, poll_s=0.01, on_wait=waits.append)
    assert live == CHAMPION_ONLY and admin.history == []  # nothing sent while waiting
    assert len(waits) == 1 and waits[0].canary == spec("7")  # said once that it waits


def test_a_canary_that_waits_too_long_gives_up_having_sent_nothing() -> None:
    admin = TrialEndsAfter(10_000)
    with pytest.raises(CanaryTurnTimeout, match="sent nothing") as info:
        wait_for_turn(admin, 0.2, poll_s=0.01)
    assert info.value.stage == "canary" and admin.history == []


def test_an_operators_trial_without_a_lease_is_waited_for_too() -> None:
    manual = Deployment(model=MODEL, champion=CHAMPION, canary=spec("7"), canary_weight=50)
    with pytest.raises(CanaryTurnTimeout):
        wait_for_turn(FakeAdmin(manual), 0.05, poll_s=0.01)


def test_a_dead_controllers_trial_is_over_and_never_restored() -> None:
    # Its lease ran out (the gateway drops it at its next check): no wait, and a canary that
    # then fails restores the champion alone, not the dead trial (the gateway would refuse
    # its passed lease, and the restore with it).
    dead = Deployment(
        model=MODEL,
        champion=CHAMPION,
        canary=spec("7"),
        canary_weight=25,
        lease_expires_at=time.time() - 1,
    )
    assert wait_for_turn(FakeAdmin(dead), 0.05, poll_s=0.01) == CHAMPION_ONLY
    admin = FakeAdmin(dead)
    with pytest.raises(RuntimeError, match="crashed"):
        canary(admin, SyntheticLoad(raise_on_call=2))
    assert admin.current == CHAMPION_ONLY


def test_a_gateway_that_follows_the_registry_serves_the_promotion_before_its_put() -> None:
    # A registry-backed replica polls the moved aliases and serves the new champion before the
    # controller's PUT arrives: that is the canary's own promotion, not someone else's change.
    class FollowsRegistry(FakeAdmin):
        moved = False

        def get_deployment(self) -> Deployment | None:
            if self.moved:
                return Deployment(model=MODEL, champion=CANDIDATE)
            return self.current

    admin = FollowsRegistry(CHAMPION_ONLY)

    @contextmanager
    def promotion() -> Iterator[None]:
        admin.moved = True
        yield

    result = canary(admin, SyntheticLoad(), promote=promotion, lease_s=60.0)
    assert result.promoted, result.reasons
    assert admin.history[-1] == Deployment(model=MODEL, champion=CANDIDATE)


def _scripted_gateway(monkeypatch: pytest.MonkeyPatch, answers: list[object]) -> None:
    """GatewayClient replaced by one whose /admin/observations hands out ``answers`` in turn
    (an exception is raised; past the end: GatewayError "gone")."""
    from ballast import gateway_client

    class Client:
        def __init__(self, *args: object) -> None:
            pass

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def observations(self, cursors: dict[str, int]) -> object:
            answer = answers.pop(0) if answers else GatewayError("gone")
            if isinstance(answer, Exception):
                raise answer
            return answer

    monkeypatch.setattr(gateway_client, "GatewayClient", Client)


def test_live_traffic_counts_only_answers_served_at_the_steps_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A replica read late hands over answers served at the weight before (5 %) together with
    # this step's (25 %): only the latter count for this step.
    from ballast.canary import live_traffic

    _scripted_gateway(
        monkeypatch,
        [
            {"replica": "r1", "started": 1.0, "next": 10, "observations": []},  # first look
            {
                "replica": "r1",
                "started": 1.0,
                "next": 14,
                "observations": [
                    [11, "2", "canary", False, 0.01, 5],
                    [12, "1", "champion", True, 0.01, 5],
                    [13, "2", "canary", True, 0.01, 25],
                    [14, "1", "champion", True, 0.01, 25],
                ],
            },
        ],
    )
    load = live_traffic("http://gw", "t", candidate_version="2", min_samples=1, max_seconds=5)
    # The first look only finds where the replica is; the second reads after it.
    got = load(25)
    assert [(o.version, o.ok) for o in got] == [("2", True), ("1", True)]


def test_live_traffic_hands_the_judge_each_answers_key_pseudonym(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ballast.canary import live_traffic

    page = {"replica": "r1", "started": 1.0, "next": 10, "observations": []}
    rows = [
        [11, "2", "canary", True, 0.01, 25, "00ff00ff00ff00ff"],
        [12, "1", "champion", True, 0.01, 25, None],
        [13, "1", "champion", False, 0.01, 25],  # a gateway from before pseudonyms
    ]
    _scripted_gateway(monkeypatch, [page, {**page, "next": 13, "observations": rows}])
    load = live_traffic("http://gw", "t", candidate_version="2", min_samples=1, max_seconds=5)
    got = load(25)
    assert [o.key for o in got] == ["00ff00ff00ff00ff", None, None]


def test_live_traffic_rides_out_a_few_failed_reads_but_not_a_gateway_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ballast.canary import live_traffic

    page = {"replica": "r1", "started": 1.0, "next": 10, "observations": []}
    _scripted_gateway(
        monkeypatch,
        [
            page,
            GatewayError("503"),
            GatewayError("stall"),
            {**page, "next": 11, "observations": [[11, "2", "canary", True, 0.01, 25]]},
        ],
    )
    load = live_traffic(
        "http://gw", "t", candidate_version="2", min_samples=1, max_seconds=5, poll_s=0.01
    )
    # Before: the first failed read raised out of the step and aborted the canary.
    assert [(o.version, o.ok) for o in load(25)] == [("2", True)]
    with pytest.raises(GatewayError, match="gone"):
        load(25)  # six failed reads in a row: the gateway is gone


def test_shadow_counts_of_several_pods_are_added_once_each() -> None:
    # Behind a Kubernetes Service each poll reaches one pod, whose report adds up its own
    # workers only. Before: the controller read once and judged one pod's share.
    from ballast.canary import ShadowStats, read_shadow

    def pod(by: dict[str, tuple[int, int, int, int]]) -> dict[str, object]:
        keys = ("mirrored", "rows", "agree", "failed")
        return {"by_replica": {r: dict(zip(keys, c, strict=True)) for r, c in by.items()}}

    a = pod({"a1": (10, 10, 9, 0), "a2": (5, 5, 5, 0)})
    b_early, b_late = pod({"b1": (4, 4, 4, 1)}), pod({"b1": (7, 7, 6, 1)})
    polls = iter([a, b_early, a, b_late, a, b_late, a, a, a])
    stats = read_shadow(lambda: next(polls))
    # a1 + a2 + b1's latest counts, none twice.
    assert stats == ShadowStats(mirrored=22, rows_compared=22, rows_agreeing=20, failed=1)
    # One gateway (every replica on one board): its first report is everything; 3 polls.
    calls: list[int] = []

    def one() -> dict[str, object]:
        calls.append(1)
        return a

    assert read_shadow(one) == ShadowStats(15, 15, 14, 0) and len(calls) == 3
    # A gateway without per-replica counts: its report as a whole.
    old = {"mirrored": 3, "rows_compared": 3, "rows_agreeing": 2, "failed": 0}
    assert read_shadow(lambda: old) == ShadowStats(3, 3, 2, 0)
