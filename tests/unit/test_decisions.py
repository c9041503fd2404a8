"""Pure release decisions: approval, alias plans, canary weights."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ballast.decisions import (
    CANDIDATE,
    CHAMPION,
    PREVIOUS,
    AliasPlan,
    approval_policy_for,
    authorize_approval,
    decide_approval,
    next_weight,
    plan_promotion,
    plan_rollback_to_previous,
    prior_decision,
    release_checks,
    validate_steps,
)
from ballast.errors import ConfigError

ALL_PASS = {"parity": True, "integrity": True, "metrics": True}
ONE_FAILS = {"parity": True, "integrity": False, "metrics": True}


@pytest.mark.parametrize(
    ("policy", "checks", "status", "failed"),
    [
        ("auto", ALL_PASS, "approved", ()),
        ("auto", ONE_FAILS, "rejected", ("integrity",)),
        ("auto", {"a": False, "b": False}, "rejected", ("a", "b")),
        ("auto", {}, "rejected", ()),
        ("manual", ALL_PASS, "needs_human", ()),
        ("manual", ONE_FAILS, "rejected", ("integrity",)),
        ("manual", {}, "rejected", ()),
    ],
    ids=[
        "auto-all-pass-approves",
        "auto-one-failure-rejects",
        "auto-names-every-failure",
        "auto-no-checks-rejects",
        "manual-all-pass-asks-a-human",
        "manual-failure-rejects-without-asking",
        "manual-no-checks-rejects",
    ],
)
def test_decide_approval(
    policy: str, checks: dict[str, bool], status: str, failed: tuple[str, ...]
) -> None:
    decision = decide_approval(policy, checks)  # type: ignore[arg-type]  # str from the table
    assert decision.status == status, decision
    assert decision.failed_checks == failed
    assert decision.approved is (status == "approved")
    assert decision.needs_human is (status == "needs_human")
    assert decision.reasons, "every decision says why"
    assert decision.reason == "; ".join(decision.reasons)


@pytest.mark.parametrize(
    ("requested", "configured", "environment", "want"),
    [
        (None, "auto", "dev", "auto"),
        ("manual", "auto", "dev", "manual"),  # a run may always ask for a person
        ("auto", "manual", "dev", "auto"),
        (None, "manual", "prod", "manual"),
        ("manual", "manual", "staging", "manual"),
        ("auto", "manual", "prod", None),  # a run parameter cannot go around the settings
        ("auto", "manual", "staging", None),
        (None, "auto", "prod", None),
        ("yolo", "manual", "dev", None),
    ],
)
def test_approval_policy_for_allows_auto_in_dev_only(
    requested: str | None, configured: str, environment: str, want: str | None
) -> None:
    if want is None:
        with pytest.raises(ConfigError):
            approval_policy_for(requested, configured, environment)  # type: ignore[arg-type]
    else:
        assert approval_policy_for(requested, configured, environment) == want  # type: ignore[arg-type]


def test_decide_approval_refuses_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown approval policy"):
        decide_approval("yolo", ALL_PASS)  # type: ignore[arg-type]  # the point of the test


@pytest.mark.parametrize(
    ("aliases", "candidate", "expected_set", "expected_delete"),
    [
        ({CHAMPION: "3", CANDIDATE: "4"}, "4", {CHAMPION: "4", PREVIOUS: "3"}, (CANDIDATE,)),
        ({CANDIDATE: "1"}, "1", {CHAMPION: "1"}, (CANDIDATE,)),
        ({CHAMPION: "4", PREVIOUS: "3"}, "4", {}, ()),
        ({CHAMPION: "3", CANDIDATE: "5"}, "4", {CHAMPION: "4", PREVIOUS: "3"}, ()),
    ],
    ids=[
        "old-champion-becomes-previous",
        "first-release-has-no-previous",
        "retry-is-idempotent",
        "another-runs-candidate-alias-stays",
    ],
)
def test_plan_promotion(
    aliases: dict[str, str],
    candidate: str,
    expected_set: dict[str, str],
    expected_delete: tuple[str, ...],
) -> None:
    plan = plan_promotion(aliases, candidate)
    assert dict(plan.set) == expected_set, plan
    assert plan.delete == expected_delete
    assert plan.target() == {**expected_set, **dict.fromkeys(expected_delete)}
    assert plan.summary


def test_plan_promotion_refuses_an_empty_candidate() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        plan_promotion({CHAMPION: "1"}, "")


def test_plan_rollback_to_previous_restores_previous_and_drops_the_alias() -> None:
    plan = plan_rollback_to_previous({CHAMPION: "4", PREVIOUS: "3", CANDIDATE: "5"})
    assert plan.target() == {CHAMPION: "3", PREVIOUS: None}  # the candidate is not its business
    assert plan.summary == "champion 4 -> 3 (rollback)"


@pytest.mark.parametrize(
    "aliases", [{CHAMPION: "4"}, {CHAMPION: "4", PREVIOUS: "4"}, {}], ids=["none", "same", "empty"]
)
def test_plan_rollback_to_previous_needs_a_distinct_previous(aliases: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="no previous version"):
        plan_rollback_to_previous(aliases)


def test_empty_plan_is_empty() -> None:
    assert AliasPlan().empty
    assert not AliasPlan(delete=(CANDIDATE,)).empty


@pytest.mark.parametrize(
    ("steps", "current", "expected"),
    [
        ((5, 25, 50, 100), 0, 5),
        ((5, 25, 50, 100), 5, 25),
        ((5, 25, 50, 100), 30, 50),
        ((5, 25, 50, 100), 50, 100),
        ((5, 25, 50, 100), 100, None),
        ((100,), 0, 100),
    ],
)
def test_next_weight(steps: tuple[int, ...], current: int, expected: int | None) -> None:
    assert next_weight(steps, current) == expected


def test_the_lowest_and_highest_steps_are_valid() -> None:
    assert validate_steps([1, 100]) == (1, 100)
    assert validate_steps([100]) == (100,)


@pytest.mark.parametrize(
    "steps",
    [(), (0, 100), (5, 50), (50, 25, 100), (5, 5, 100), (5, 101)],
    ids=["empty", "zero", "no-100", "falling", "repeated", "over-100"],
)
def test_bad_steps_are_refused(steps: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="canary steps"):
        validate_steps(steps)
    with pytest.raises(ValueError, match="canary steps"):
        next_weight(steps, 0)


# -- authorize_approval: the four-eyes rule ---------------------------------------------------

ROLES = {
    "alice": frozenset({"approver"}),
    "bob": frozenset({"operator"}),
    "carol": frozenset({"approver", "admin"}),
}


@pytest.mark.parametrize(
    ("approver", "starter", "allowed", "says"),
    [
        ("alice", "bob", True, "holds the approver role"),
        ("bob", "alice", False, "does not hold the approver role"),
        ("mallory", "alice", False, "does not hold the approver role"),
        ("alice", "alice", False, "started this run"),
        (" Alice ", "alice", False, "started this run"),
        ("carol", None, True, "holds the approver role"),
        ("", "bob", False, "no approver name"),
    ],
)
def test_authorize_approval_needs_the_role_and_a_second_person(
    approver: str, starter: str | None, allowed: bool, says: str
) -> None:
    auth = authorize_approval(approver, starter, ROLES)
    assert auth.allowed is allowed, auth.reason
    assert says in auth.reason, f"reason {auth.reason!r} does not say {says!r}"


@pytest.mark.parametrize("name", ["timeout", " Timeout ", "policy:auto", "Policy:manual"])
def test_names_the_release_records_for_no_person_cannot_approve(name: str) -> None:
    # Before: a roles entry "Timeout" could answer, and a rejection "by timeout" reopened the
    # version to the next run, as if nobody had answered.
    roles = {name.strip(): ["approver"]}
    auth = authorize_approval(name, "bob", roles)
    assert not auth.allowed and "reserved" in auth.reason, auth.reason


def test_authorize_approval_with_no_roles_configured_refuses_everyone() -> None:
    assert not authorize_approval("alice", "bob", {}).allowed


# -- a release run again finds its version decided before --------------------------------------


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ({"approval": "rejected", "approval_by": "bob"}, "its approval was rejected by bob"),
        (
            {"approval": "rejected", "approval_by": "policy:auto", "verdict": "rejected"},
            "its approval was rejected by policy:auto",
        ),
        ({"approval": "approved", "verdict": "rollback"}, "its verdict is rollback"),
        ({"status": "rolled_back"}, "its status is rolled_back"),
        ({"aliases": ("previous",)}, "it is the previous"),
        ({"aliases": ("champion",)}, "it is the champion"),
        # A decided verdict or status counts without its approval tag, and after a timeout.
        ({"verdict": "rejected"}, "its verdict is rejected"),
        ({"status": "rejected"}, "its status is rejected"),
        (
            {"approval": "rejected", "approval_by": "timeout", "verdict": "rollback"},
            "its verdict is rollback",
        ),
        (
            {"approval": "rejected", "approval_by": "timeout", "status": "rolled_back"},
            "its status is rolled_back",
        ),
        # Open to a decision: never decided, approved but not canaried yet, or only timed out.
        ({}, None),
        ({"status": "candidate", "approval": "pending"}, None),
        ({"approval": "approved"}, None),
        (
            {
                "approval": "rejected",
                "approval_by": "timeout",
                "verdict": "rejected",
                "status": "rejected",
            },
            None,
        ),
    ],
)
def test_prior_decision_names_what_was_decided_and_lets_only_timeouts_be_asked_again(
    state: dict[str, object], why: str | None
) -> None:
    args: dict[str, object] = {
        "status": None,
        "verdict": None,
        "approval": None,
        "approval_by": None,
        "aliases": (),
        **state,
    }
    assert prior_decision(**args) == why  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("compared", "metrics", "approved"),
    [
        (True, {"train_loss": 0.2, "val_loss": 0.3}, True),
        # A first release judged on a loss with no floor: the gate passed with no bar at all.
        (False, {"train_loss": 0.2, "val_loss": 0.3}, False),
        # Infinity compared false with nothing, so only NaN was caught before.
        (True, {"train_loss": math.inf, "val_loss": 0.3}, False),
        (True, {"train_loss": 0.2, "val_loss": math.nan}, False),
        (True, {"train_loss": 0.2}, False),  # a loss not reported is not a finite loss
    ],
)
def test_auto_approval_needs_a_gate_that_measured_and_finite_losses(
    compared: bool, metrics: dict[str, float], approved: bool
) -> None:
    checks = release_checks(
        quality_passed=True, quality_compared=compared, parity_passed=True, metrics=metrics
    )
    assert decide_approval("auto", checks).approved is approved, checks


@pytest.mark.parametrize(
    ("compared", "current", "stale"),
    [
        ("3", "3", None),
        (None, None, None),
        ("3", "4", "moved from version 3 to 4"),
        (None, "4", "version 4 became the champion"),
        ("3", None, "version 3) lost its alias"),
    ],
)
def test_stale_evidence(compared: str | None, current: str | None, stale: str | None) -> None:
    from ballast.decisions import stale_evidence

    got = stale_evidence(compared, current)
    assert (got is None) == (stale is None), got
    if stale is not None:
        assert got is not None and stale in got


def test_a_manual_release_needs_somebody_who_may_approve_it() -> None:
    from ballast.decisions import require_approvers

    def roles(found: dict[str, set[str]]) -> Any:
        return lambda: found

    with pytest.raises(ConfigError, match="nobody holds the approver role"):
        require_approvers("manual", roles({}))
    with pytest.raises(ConfigError, match="BALLAST_APPROVERS"):
        require_approvers("manual", roles({"alice": {"viewer"}, " ": {"approver"}}))
    require_approvers("manual", roles({"alice": {"approver"}}))

    # An auto release never reads the roles (a roles file it does not need must not fail it).
    def unreadable() -> dict[str, set[str]]:
        raise ConfigError("roles file has mode 644")

    require_approvers("auto", unreadable)
    # With signatures required, an approver must have a registered key.
    with pytest.raises(ConfigError, match="no approver has a registered key"):
        require_approvers("manual", roles({"alice": {"approver"}}), keys=lambda: {"bob"})
    require_approvers("manual", roles({"Alice": {"approver"}}), keys=lambda: {"alice "})


@pytest.mark.parametrize(
    ("environment", "refused"), [("dev", False), ("staging", False), ("prod", True)]
)
def test_a_rehearsed_fault_is_refused_in_prod_only(environment: str, refused: bool) -> None:
    from ballast.decisions import fault_allowed

    fault_allowed(None, "prod")
    if refused:
        with pytest.raises(ConfigError, match="prod refuses it"):
            fault_allowed("errors", environment)
    else:
        fault_allowed("errors", environment)
