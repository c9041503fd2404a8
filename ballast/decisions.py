"""Pure release decisions: approval, alias moves for promotion and rollback, the next canary weight.

Nothing here touches the registry or the gateway. Callers apply an :class:`AliasPlan` through the
registry facade, which keeps the decision testable apart from its side effect (and a log line
saying "promoted" can only follow a plan that was actually applied).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ballast.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "PREVIOUS",
    "AliasPlan",
    "ApprovalDecision",
    "ApprovalPolicy",
    "ApprovalStatus",
    "Authorization",
    "approval_policy_for",
    "authorize_approval",
    "authorize_signature",
    "decide_approval",
    "next_weight",
    "plan_promotion",
    "plan_rollback_to_previous",
    "prior_decision",
    "release_checks",
    "stale_evidence",
    "validate_steps",
]

# Registry aliases (MLflow 3 style ``models:/name@alias``).
CHAMPION = "champion"
CANDIDATE = "candidate"
PREVIOUS = "previous"

ApprovalPolicy = Literal["auto", "manual"]
ApprovalStatus = Literal["approved", "rejected", "needs_human"]


@dataclass(frozen=True, slots=True)
class ApprovalDecision:
    """Outcome of the approval gate. ``failed_checks`` names every check that did not pass."""

    status: ApprovalStatus
    reasons: tuple[str, ...]
    failed_checks: tuple[str, ...] = ()

    @property
    def approved(self) -> bool:
        return self.status == "approved"

    @property
    def needs_human(self) -> bool:
        return self.status == "needs_human"

    @property
    def reason(self) -> str:
        """The reasons as one line, for audit records and logs."""
        return "; ".join(self.reasons)


def release_checks(
    *,
    quality_passed: bool,
    quality_compared: bool,
    parity_passed: bool,
    metrics: Mapping[str, float],
) -> dict[str, bool]:
    """The checks an approval (the ``auto`` policy's included) is decided on. Pure.

    ``quality_compared``: the quality gate had a champion or a floor to judge by; a first
    release judged on a loss has neither, and "passed" would then mean no bar at all.
    Training's losses must be finite: infinity compared false with nothing and passed.
    """
    losses = [metrics.get(m, math.nan) for m in ("train_loss", "val_loss")]
    return {
        "data_valid": True,  # ingest raised otherwise
        "quality_gate": quality_passed,
        "quality_measured": quality_compared,
        "parity": parity_passed,
        "training_finite": all(math.isfinite(v) for v in losses),
    }


def approval_policy_for(
    requested: ApprovalPolicy | None, configured: ApprovalPolicy, environment: str
) -> ApprovalPolicy:
    """The approval policy of one release run: ``requested`` (a run parameter) or else the
    settings' ``configured`` one. Auto-approval is for dev only: in staging or prod a person
    approves every release, whoever submits the run and with whatever parameters, so ``auto``
    there is a :class:`ConfigError` (raised before the run ingests or trains anything)."""
    policy = requested or configured
    if policy not in ("auto", "manual"):
        raise ConfigError(f"unknown approval policy {policy!r}: auto or manual")
    if policy == "auto" and environment != "dev":
        raise ConfigError(
            f"approval policy auto is for dev only; this is {environment!r}, where a person "
            "approves every release (policy manual)"
        )
    return policy


def require_approvers(
    policy: ApprovalPolicy,
    roles: Callable[[], Mapping[str, Collection[str]]],
    *,
    keys: Callable[[], Collection[str]] | None = None,
) -> None:
    """A manual release needs someone who may approve it: with nobody holding the approver role
    (or, when signatures are required, nobody of them with a registered key; ``keys`` gives
    the names that have one) every answer is refused, and the run would train, compile and
    register, then wait out the approval timeout for nothing. A :class:`ConfigError` at the
    run's start instead. ``roles`` and ``keys`` are read only for a manual release: an auto
    release must not fail on a roles file it never needs."""
    if policy != "manual":
        return
    approvers = {
        name.strip().casefold()
        for name, held in roles().items()
        if name.strip() and "approver" in held
    }
    if not approvers:
        raise ConfigError(
            "approval policy manual, but nobody holds the approver role: name them in "
            "BALLAST_APPROVERS (a JSON list) or in the roles file (BALLAST_ROLES_FILE)"
        )
    if keys is not None and not approvers & {n.strip().casefold() for n in keys()}:
        raise ConfigError(
            "approval signatures are required (BALLAST_APPROVAL_SIGNATURES=required), but no "
            "approver has a registered key: add one to the roles file (`ballast approver-key`)"
        )


def fault_allowed(fault: str | None, environment: str) -> None:
    """An injected fault (a rehearsal of a rollback) fails or slows real answers of the canary:
    allowed in dev and staging, a :class:`ConfigError` in prod (at the run's start)."""
    if fault is not None and environment == "prod":
        raise ConfigError(
            f"inject_fault={fault!r} is a rehearsal: it fails the canary's share of real "
            "traffic, so prod refuses it (rehearse in dev or staging)"
        )


def decide_approval(policy: ApprovalPolicy, checks: Mapping[str, bool]) -> ApprovalDecision:
    """Decide the approval gate from the release checks (parity, integrity, metrics, ...).

    Any failed check rejects, whatever the policy: a human is not asked to wave through a
    release the machine already knows is broken. No checks at all also rejects, because "every
    check passed" must not be true by default. With every check passed, ``auto`` approves and
    ``manual`` hands the decision to a human.
    """
    if policy not in ("auto", "manual"):
        raise ValueError(f"unknown approval policy {policy!r}")
    if not checks:
        return ApprovalDecision("rejected", ("no checks were run",))
    failed = tuple(sorted(name for name, passed in checks.items() if not passed))
    if failed:
        return ApprovalDecision("rejected", (f"failed checks: {', '.join(failed)}",), failed)
    if policy == "manual":
        return ApprovalDecision("needs_human", (f"all {len(checks)} checks passed; policy manual",))
    return ApprovalDecision("approved", (f"all {len(checks)} checks passed; policy auto",))


@dataclass(frozen=True, slots=True)
class Authorization:
    """May this person answer the approval gate? ``reason`` says why or why not."""

    allowed: bool
    reason: str


def stale_evidence(compared: str | None, current: str | None) -> str | None:
    """Why an approval given on evidence measured against champion ``compared`` (None: there
    was none) no longer holds now that the champion is ``current``; None while it holds.

    The approver saw the candidate weighed against one champion. If another release or a
    rollback moved the alias while the approval waited (hours, for a human), that comparison
    says nothing about the champion the canary would now run against.
    """
    if compared == current:
        return None
    if current is None:
        return f"the champion (version {compared}) lost its alias while the approval waited"
    if compared is None:
        return (
            f"version {current} became the champion while the approval waited; the candidate "
            "was never compared with it"
        )
    return (
        f"the champion moved from version {compared} to {current} while the approval waited; "
        f"the evidence compared the candidate with version {compared}"
    )


def authorize_approval(
    approver: str, run_starter: str | None, roles: Mapping[str, Collection[str]]
) -> Authorization:
    """Four-eyes rule: the approver must hold the ``approver`` role and must not have started
    the run. Names compare after trimming and case-folding, so "Alice " cannot approve Alice's
    run. An unknown starter (None) does not block an approver: there is no one to compare with.
    """
    name = approver.strip()
    if not name:
        return Authorization(False, "no approver name given")
    folded = name.casefold()
    if folded == APPROVAL_TIMEOUT or folded.startswith("policy:"):
        # What the release records as "by" when no person decided: a person by that name
        # would have their rejection read as a timeout (and the version asked again).
        return Authorization(
            False, f"{name!r} is reserved for decisions no person made (timeout, policy:...)"
        )
    held = {n.strip().casefold(): set(r) for n, r in roles.items()}
    if "approver" not in held.get(name.casefold(), set()):
        return Authorization(False, f"{name!r} does not hold the approver role")
    if run_starter is not None and run_starter.strip().casefold() == name.casefold():
        return Authorization(False, f"{name!r} started this run and cannot approve it")
    return Authorization(True, f"{name!r} holds the approver role and did not start the run")


def authorize_signature(
    approver: str,
    signature: str,
    message: bytes,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    required: bool,
) -> Authorization:
    """Is this answer signed as it must be? An approver whose key is registered (``keys``, by
    name, compared as :func:`authorize_approval` does) must sign ``message`` with it, or anyone
    could answer in their name; with ``required`` every answer must be signed by a registered
    key. Others answer by name alone."""
    from ballast.approval_signing import registered_key, verify_approval

    name = approver.strip()
    key = registered_key(keys, name)
    if key is None:
        if required:
            return Authorization(
                False, f"{name!r} has no registered approval key: signatures are required"
            )
        if signature.strip():
            return Authorization(
                False, f"{name!r} sent a signature but has no registered approval key"
            )
        return Authorization(True, f"{name!r} has no registered approval key: answered by name")
    if not signature.strip():
        return Authorization(
            False, f"{name!r} has a registered approval key: the answer must be signed"
        )
    if not verify_approval(key, message, signature):
        return Authorization(
            False, f"the signature does not match {name!r}'s key for this run, pause and answer"
        )
    return Authorization(True, f"signed with {name!r}'s registered key")


# Who a timed-out approval is recorded as "by": nobody decided, so the version may be asked again.
APPROVAL_TIMEOUT = "timeout"


def prior_decision(
    *,
    status: str | None,
    verdict: str | None,
    approval: str | None,
    approval_by: str | None,
    aliases: Collection[str],
) -> str | None:
    """Why a version that a rerun of its release found again (same data, code and parameters)
    must not be approved or canaried again; None while it is still open to a decision.

    Decided are: a version a person (or the auto policy) rejected, one the canary rolled back or
    promoted, one serving or once served as champion. Re-approving such a version would override
    that decision, e.g. a nightly auto-approved run undoing a human's rejection. Not decided: an
    approval that only timed out (nobody answered), which may be asked again.
    """
    if CHAMPION in aliases or PREVIOUS in aliases:
        role = CHAMPION if CHAMPION in aliases else PREVIOUS
        return f"it is the {role}"
    timed_out = approval == "rejected" and approval_by == APPROVAL_TIMEOUT
    if approval == "rejected" and not timed_out:
        return f"its approval was rejected by {approval_by or 'someone unrecorded'}"
    if verdict and not (timed_out and verdict == "rejected"):
        return f"its verdict is {verdict}"
    if status not in (None, "", "candidate") and not (timed_out and status == "rejected"):
        return f"its status is {status}"
    return None


@dataclass(frozen=True, slots=True)
class AliasPlan:
    """Alias moves: every ``set`` (alias → version) and every ``delete``, applied as one move by
    the registry facade (which puts all of them back if any fails)."""

    set: Mapping[str, str] = field(default_factory=dict)
    delete: tuple[str, ...] = ()
    summary: str = ""

    @property
    def empty(self) -> bool:
        return not self.set and not self.delete

    def target(self) -> dict[str, str | None]:
        """The move as alias → version, None where the alias goes away."""
        return {**self.set, **dict.fromkeys(self.delete)}


def plan_promotion(aliases: Mapping[str, str], candidate: str) -> AliasPlan:
    """Alias moves that make ``candidate`` the champion, given the model's ``aliases`` now.

    ``champion`` → candidate, ``previous`` → the old champion (kept for rollback). The
    ``candidate`` alias goes only when it names this version: another run may have registered a
    newer candidate meanwhile, and its alias is not this promotion's to take. Promoting the
    version that is already champion (a retried flow) moves nothing else, so a retry cannot
    point ``previous`` at the champion itself.
    """
    if not candidate:
        raise ValueError("candidate version must be non-empty")
    old = aliases.get(CHAMPION)
    moves: dict[str, str] = {}
    if old == candidate:
        summary = f"version {candidate} is already champion"
    elif old is not None:
        moves = {CHAMPION: candidate, PREVIOUS: old}
        summary = f"champion {old} -> {candidate}; previous = {old}"
    else:
        moves = {CHAMPION: candidate}
        summary = f"first champion: {candidate}"
    delete = (CANDIDATE,) if aliases.get(CANDIDATE) == candidate else ()
    return AliasPlan(set=moves, delete=delete, summary=summary)


def plan_rollback_to_previous(aliases: Mapping[str, str]) -> AliasPlan:
    """Alias moves that put ``previous`` back as champion, given the model's ``aliases`` now.

    The ``previous`` alias goes too, so a second rollback cannot bounce back to the version just
    rolled away from. Without a previous version (or one that is the champion already) there is
    nothing to roll back to: an error for the caller to surface, not to guess around.
    """
    previous, champion = aliases.get(PREVIOUS), aliases.get(CHAMPION)
    if previous is None or previous == champion:
        raise ValueError(f"no previous version to roll back to (champion {champion})")
    return AliasPlan(
        set={CHAMPION: previous},
        delete=(PREVIOUS,),
        summary=f"champion {champion} -> {previous} (rollback)",
    )


def validate_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """Canary weights must rise strictly within 1..100 and end at 100 (else nothing promotes)."""
    out = tuple(steps)
    if not out or any(not 0 < s <= 100 for s in out):
        raise ValueError(f"canary steps must lie within 1..100, got {out}")
    if any(b <= a for a, b in itertools.pairwise(out)) or out[-1] != 100:
        raise ValueError(f"canary steps must rise strictly and end at 100, got {out}")
    return out


def next_weight(steps: Sequence[int], current: int) -> int | None:
    """The first step above ``current`` (0 = not started), or None once 100 % is reached."""
    for step in validate_steps(steps):
        if step > current:
            return step
    return None
