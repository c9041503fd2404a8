"""Stage 6: release approval. Policy ``auto`` decides from the checks; ``manual`` pauses the flow
run with a typed form (Prefect renders it in the UI; ``resume_flow_run`` or ``ballast approve``
answers it from code).

Who started the run: :func:`ballast.audit.current_actor` evaluated here, in the flow's own process
(``request_approval`` is a plain function called by the flow, not a task shipped elsewhere), so it
is the actor that launched the run. It is recorded as ``started_by`` in the audit log, on the model
version and in the form's description. An answer from someone without the approver role, or from
the starter, is refused (audit action ``approval_refused``) and the run pauses again with a fresh
pause key, waiting for a valid answer until the original timeout runs out. A timed-out approval is
a rejection that changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from ballast.audit import current_actor, record
from ballast.canary import trial_in_force
from ballast.cost import CostDecision
from ballast.data import ValidatedDataset
from ballast.decisions import APPROVAL_TIMEOUT, Authorization, prior_decision
from ballast.errors import ApprovalRejected, ConfigError, GatewayError
from ballast.gateway_client import GatewayClient
from ballast.locks import held
from ballast.quality import QualityDecision
from ballast.release import (
    PAUSE_KEY_PREFIX,
    STARTED_BY_LINE,
    TAG_APPROVAL,
    TAG_STATUS,
    TAG_VERDICT,
    holds_trial,
)
from ballast.roles import ApprovalConfig, approval_config_from_settings
from ballast.settings import Settings, get_settings
from model_registry import ApprovalRecord, ModelVersionInfo
from tasks.common import logger, registry, server_lock

__all__ = [
    "TAG_APPROVAL_BY",
    "TAG_APPROVAL_REASON",
    "TAG_APPROVAL_STARTED_BY",
    "ApprovalForm",
    "approval_evidence",
    "evidence_markdown",
    "prior_decision_of",
    "request_approval",
]

TAG_APPROVAL_BY = f"{TAG_APPROVAL}.by"  # model_registry.types.TAG_APPROVAL_BY
TAG_APPROVAL_REASON = f"{TAG_APPROVAL}.reason"
TAG_APPROVAL_STARTED_BY = f"{TAG_APPROVAL}.started_by"

# Evidence sections of the form, chosen by words in the metric's name (first match wins).
_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Evaluation against the champion", ("champion", "delta", "baseline")),
    ("Parity (compiled vs eager)", ("parity", "max_abs", "rtol")),
    ("Benchmark", ("latency", "throughput", "bench", "_ms", "qps", "rps")),
    ("Data checks", ("rows", "data_", "null", "valid")),
)


def _section(metric: str) -> str:
    low = metric.lower()
    for title, words in _SECTIONS:
        if any(w in low for w in words):
            return title
    return "Training and evaluation"


class ApprovalForm(RunInput):
    """What an approver fills in on the paused run."""

    approve: bool = Field(default=False, description="Approve this version for the canary")
    approver: str = Field(min_length=1, description="Your name (recorded in the audit log)")
    reason: str = Field(min_length=1, description="Why (recorded on the model version)")
    signature: str = Field(
        default="",
        description=(
            "Your signature of this answer, if your approval key is registered "
            "(`ballast approve RUN_ID --as NAME --reason ... --key FILE` signs and sends it)"
        ),
    )


def evidence_markdown(
    model: str,
    version: str,
    checks: Mapping[str, bool],
    metrics: Mapping[str, float],
    started_by: str | None = None,
    fault: str | None = None,
) -> str:
    """The form's description: every check, then the metrics grouped into evidence sections. A
    rehearsal (``fault``) says so first: approving it fails or slows real requests."""
    rows = "\n".join(f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in checks.items())
    out = [f"## Approve {model} version {version}?\n"]
    if fault:
        out.append(
            f"**Rehearsal: this candidate carries the injected fault `{fault}`.** Approved, it "
            "fails or slows its share of real requests until the canary rolls it back.\n"
        )
    if started_by:
        out.append(STARTED_BY_LINE.format(started_by) + "\n")
    out.append(f"### Checks\n\n| check | result |\n|---|---|\n{rows}\n")
    grouped: dict[str, list[str]] = {}
    for k, v in sorted(metrics.items()):
        grouped.setdefault(_section(k), []).append(f"| {k} | {v:.6g} |")
    grouped.setdefault(_SECTIONS[0][0], ["| (none) | no champion yet: first release |"])
    for title, _ in (*_SECTIONS, ("Training and evaluation", ())):
        if title in grouped:
            body = "\n".join(grouped[title])
            out.append(f"### {title}\n\n| metric | value |\n|---|---|\n{body}\n")
    return "\n".join(out)


def approval_evidence(
    ds: ValidatedDataset,
    training: Mapping[str, float],
    compiled: Mapping[str, float],
    quality: QualityDecision,
    cost: CostDecision | None = None,
) -> dict[str, float]:
    """Every figure an approver should see, named so :func:`evidence_markdown` sections them:
    data checks, evaluation against the champion, parity, benchmark, training."""
    out: dict[str, float] = {**training, **compiled}
    out["data_rows"] = float(ds.n_rows)
    out["data_checks_passed"] = float(len(ds.checks))
    if quality.champion is not None:
        out[f"champion_{quality.metric}"] = quality.champion
    if quality.drop is not None:
        # Positive: the candidate is better than the champion.
        out[f"{quality.metric}_delta_vs_champion"] = -quality.drop
    if cost is not None:
        # Time per call over the champion's, measured side by side (the cost gate).
        out.update(cost.evidence())
    return out


def _wait_for_valid_answer(
    *,
    model: str,
    version: str,
    form: Any,
    started_by: str,
    compared_champion: str | None = None,
) -> tuple[Any, dict[str, str]] | None:
    """Pause until an authorised answer arrives or the timeout runs out (None). Returned with
    the answer: what its signature covered, for the audit log ({} when unsigned)."""
    from ballast.approval_signing import approval_message, public_key_text, registered_key
    from ballast.decisions import authorize_approval, authorize_signature

    s = get_settings()
    log = logger()
    approval_config_from_settings(s)  # a bad roles file fails here, before anyone is asked
    run_id = _flow_run_id()
    question = hashlib.sha256(f"champion={compared_champion or ''}".encode()).hexdigest()[:12]
    deadline = time.monotonic() + s.approval_timeout_s
    attempt = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        attempt += 1
        # A fresh key per attempt: Prefect keys the stored input by the pause key, so a reused
        # key would hand back the refused answer again. A rerun of the same flow run counts its
        # attempts from 1 again and so meets the keys of its earlier run: an answer given there
        # (a worker killed while the release waited) carries over, signature included, only
        # while the question is the same: the same version weighed against the same champion,
        # which the last part of the key names. After the champion moved it is a new question.
        pause_key = f"{PAUSE_KEY_PREFIX}{version}-{attempt}-{question}"
        try:
            answer = pause_flow_run(
                wait_for_input=form,
                timeout=max(1, math.ceil(remaining)),
                poll_interval=s.approval_poll_s,
                key=pause_key,
            )
        except FlowPauseTimeout:
            log.warning("stage=approve timed out after %d answer(s)", attempt - 1)
            _running_again()
            return None
        # Read again for every answer: a pause can last hours, and a role revoked or a key
        # replaced meanwhile (it leaked) must bind the answers given after the change.
        config, auth = _current_config(s)
        if config is not None:
            auth = authorize_approval(answer.approver, started_by, config.roles)
        if auth.allowed and not answer.reason.strip():
            # The form says a reason is required, but Prefect's initial-data form drops that
            # constraint from the schema it enforces: the gate checks it itself.
            auth = Authorization(False, "an answer needs a reason")
        if auth.allowed and config is not None:
            message = approval_message(
                flow_run_id=run_id,
                pause_key=pause_key,
                approve=bool(answer.approve),
                approver=answer.approver,
                reason=answer.reason,
            )
            auth = authorize_signature(
                answer.approver,
                answer.signature,
                message,
                config.keys,
                required=s.approval_signatures == "required",
            )
        if auth.allowed:
            proof: dict[str, str] = {}
            if answer.signature.strip():
                assert config is not None
                key = registered_key(config.keys, answer.approver)
                assert key is not None  # authorize_signature accepted a signature by it
                proof = {
                    "signature": answer.signature.strip(),
                    "pause_key": pause_key,
                    "flow_run_id": run_id,
                    "approval_key": public_key_text(key),
                }
            return answer, proof
        record(
            s.audit_log,
            "approval_refused",
            model=model,
            version=version,
            approver=answer.approver,
            approve=bool(answer.approve),
            reason=auth.reason,
            answer_reason=answer.reason,
            started_by=started_by,
            signed=bool(answer.signature.strip()),
        )
        log.warning("stage=approve refused answer: %s; waiting again", auth.reason)


def _current_config(s: Settings) -> tuple[ApprovalConfig | None, Authorization]:
    """The roles file as it is now, or None and a refusal when it cannot be read (being
    replaced, made readable by others): the answer is refused, never judged on an older copy,
    and the run asks again."""
    try:
        return approval_config_from_settings(s), Authorization(True, "")
    except ConfigError as exc:
        return None, Authorization(
            False, f"the roles file cannot be read now ({exc.message}); answer again once it can"
        )


def _flow_run_id() -> str:
    """The id of the flow run this code runs in (what a signed answer names); "" outside one,
    where no signature can match (nothing but a run pauses for an answer)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return ""
    return str(ctx.flow_run.id)


def _running_again() -> None:
    """Take the run out of Paused after its pause timed out. Prefect leaves it Paused, and its
    server refuses any later move out of a pause past its deadline: the run, which goes on to
    record the timeout as a rejection and end normally, would finish Failed ("never resumed")
    and keep showing the form meanwhile."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Running

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(ctx.flow_run.id, Running(), force=True)


def prior_decision_of(info: ModelVersionInfo) -> str | None:
    """Why ``info`` must not be approved or canaried again (:func:`prior_decision` on its tags);
    None while it is open to a decision."""
    tags = info.tags
    return prior_decision(
        status=tags.get(TAG_STATUS),
        verdict=tags.get(TAG_VERDICT),
        approval=tags.get(TAG_APPROVAL),
        approval_by=tags.get(TAG_APPROVAL_BY),
        aliases=info.aliases,
    )


def _approval_tags(info: ModelVersionInfo) -> tuple[str | None, str | None]:
    return info.tags.get(TAG_APPROVAL), info.tags.get(TAG_APPROVAL_BY)


def _stale(reg: Any, model: str, compared_champion: str | None) -> str | None:
    """Why evidence weighed against ``compared_champion`` no longer holds (None: it holds)."""
    from ballast.decisions import CHAMPION, stale_evidence

    champion = reg.get_by_alias(model, CHAMPION)
    return stale_evidence(compared_champion, None if champion is None else champion.version)


def _refuse_if_decided(reg: Any, model: str, version: str) -> None:
    why = prior_decision_of(reg.get_version(model, version))
    if why is not None:
        raise ApprovalRejected(
            f"version {version} of {model} was decided before ({why}): a decision is never "
            "overwritten"
        )


# How long a run waits for another run on this machine to finish writing its decision on the
# same version (a few registry writes; a minute means the registry is failing).
DECIDING_TIMEOUT_S = 60.0


class _DecisionLockBusy(ApprovalRejected):
    """Another run held the version's decision lock for over DECIDING_TIMEOUT_S."""


@contextlib.contextmanager
def _deciding(s: Settings, model: str, version: str) -> Iterator[None]:
    """One run at a time between the last look at a version's approval and the last write of
    its decision. Two locks, taken in this order by every run: a ``flock`` in ``state_dir``
    (runs on this machine, and runs outside a flow run, e.g. via ``.fn()``), then a one-slot
    global concurrency limit per model on the Prefect server (runs on any machine: workers of
    a cluster's pools share no filesystem lock). MLflow offers no conditional write that would
    serialise the decision itself."""
    digest = hashlib.sha256(f"{model}\0{version}".encode()).hexdigest()[:24]

    def busy() -> _DecisionLockBusy:
        return _DecisionLockBusy(
            f"another run held version {version} of {model}'s approval for over "
            f"{DECIDING_TIMEOUT_S:g} s; this answer was not applied (it is in the audit log): "
            "run the release again"
        )

    with (
        held(s.state_dir / "locks" / f"approval-{digest}.lock", DECIDING_TIMEOUT_S, busy()),
        server_lock(approval_lock_name(model), DECIDING_TIMEOUT_S, busy()),
    ):
        yield


def approval_lock_name(model: str) -> str:
    """The Prefect global concurrency limit that serialises ``model``'s approval decisions:
    readable, within Prefect's name rules whatever the model's name, and one per model (not
    per version: a limit is a lasting object on the server, and decisions take seconds)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model)[:48]
    return f"ballast-approval-{slug}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def _on_trial(s: Settings, model: str, version: str, tags: Mapping[str, str]) -> str | None:
    """How ``version`` is on trial now (a canary or shadow on the gateway: another run's canary),
    or None when it is not. A gateway that does not answer its health check serves nothing; one
    that answers but whose deployment cannot be read is taken as possibly holding the trial."""
    now = time.time()
    if holds_trial(tags, now):
        return "is on trial on the registry-backed gateway"
    with GatewayClient(s.gateway_url, s.admin_token()) as client:
        if not client.health():
            return None
        try:
            live = client.get_deployment()
        except GatewayError as exc:
            return f"may be on trial (the gateway's deployment could not be read: {exc})"
    if live is None or live.model != model or not trial_in_force(live, now):
        return None
    trial = {
        live.canary.version if live.canary else None,
        live.shadow.version if live.shadow else None,
    }
    return "is on trial on the gateway" if version in trial else None


def request_approval(
    *,
    model: str,
    version: str,
    checks: dict[str, bool],
    metrics: dict[str, float],
    policy: str,
    compared_champion: str | None,
    fault: str | None = None,
) -> tuple[bool, str, str]:
    """Returns (approved, approver, reason). Must run inside a flow: it may pause the run.

    ``compared_champion`` is the champion the evidence was measured against (None: none). An
    approval given after the champion moved is refused (:func:`ballast.decisions.stale_evidence`)
    and recorded in the audit log; the version stays undecided, so the release run again weighs
    it against the champion of the day.

    The decision, approver, reason and starter are tagged on the model version here and written
    to the audit log.
    """
    from ballast.decisions import approval_policy_for, decide_approval

    s = get_settings()
    # The flow checked this at its start; checked again for any other caller.
    checked = approval_policy_for(policy, s.approval_policy, s.environment)  # type: ignore[arg-type]
    log = logger()
    reg = registry(s)
    _refuse_if_decided(reg, model, version)  # before anyone is asked
    # The champion may have moved already while this run compiled and registered: nobody is
    # asked to approve evidence that no longer holds.
    stale = _stale(reg, model, compared_champion)
    if stale is not None:
        raise ApprovalRejected(
            f"version {version} of {model} not put to approval: {stale}. Run the release again "
            "to weigh the candidate against the champion now"
        )
    asked = _approval_tags(reg.get_version(model, version))
    started_by = current_actor()
    decision = decide_approval(checked, checks)
    proof: dict[str, str] = {}
    if not decision.needs_human:
        approved, approver, reason = decision.approved, "policy:auto", decision.reason
    else:
        form: Any = ApprovalForm.with_initial_data(
            description=evidence_markdown(model, version, checks, metrics, started_by, fault),
            approve=False,
            approver="",
            reason="",
        )
        log.info("stage=approve model=%s version=%s waiting for a human", model, version)
        waited = _wait_for_valid_answer(
            model=model,
            version=version,
            form=form,
            started_by=started_by,
            compared_champion=compared_champion,
        )
        if waited is None:
            approved, approver, reason = False, APPROVAL_TIMEOUT, "approval timed out"
        else:
            answer, proof = waited  # a signature here was checked: a bad one never gets back
            approved = bool(answer.approve)
            approver, reason = answer.approver.strip(), answer.reason.strip()

    # From the last look to the last write, one run at a time (_deciding): two runs deciding
    # the same version at once both passed the look and both wrote.
    def superseded(message: str, **decided: Any) -> ApprovalRejected:
        """The answer into the audit log, not applied: the error to stop this run with."""
        record(
            s.audit_log,
            "approval_superseded",
            model=model,
            version=version,
            approver=approver,
            approve=approved,
            reason=reason,
            **decided,
        )
        return ApprovalRejected(message)

    with contextlib.ExitStack() as held_lock:
        try:
            held_lock.enter_context(_deciding(s, model, version))
        except _DecisionLockBusy as exc:  # audited like any answer not applied
            raise superseded(exc.message, decided="unknown: another run held the lock") from None
        now = reg.get_version(model, version)
        # A second run of the same release may have decided it while this one waited: its
        # decision stands (an approval included: a rejection here would overwrite it under a
        # trial in progress), and this answer is recorded as superseded, not lost.
        if _approval_tags(now) != asked:
            raise superseded(
                f"version {version} of {model} was {now.tags.get(TAG_APPROVAL)} by "
                f"{now.tags.get(TAG_APPROVAL_BY)} (another run) while this one waited: that "
                "decision stands; this answer is in the audit log, not applied",
                decided=now.tags.get(TAG_APPROVAL),
                decided_by=now.tags.get(TAG_APPROVAL_BY),
            )
        decided = prior_decision_of(now)
        if decided is not None:
            # Decided meanwhile by another way (a canary's verdict, a promotion).
            raise superseded(
                f"version {version} of {model} was decided while this answer waited "
                f"({decided}): a decision is never overwritten; the answer is in the audit log",
                decided=decided,
            )
        if not approved and asked[0] == "approved":
            # Approved before this run asked (another run of the same release, whose canary
            # may be running on that approval now): a rejection written here would close the
            # candidate under that trial without stopping it.
            trial = _on_trial(s, model, version, now.tags)
            if trial is not None:
                raise superseded(
                    f"version {version} of {model} was approved by {asked[1]} and {trial}: "
                    "this rejection is in the audit log, not applied. To stop that release, "
                    "roll it back (ballast rollback --force)",
                    decided="approved",
                    decided_by=asked[1],
                    trial=trial,
                )
        if approved:
            stale = _stale(reg, model, compared_champion)
            if stale is not None:
                record(
                    s.audit_log,
                    "approval_stale",
                    model=model,
                    version=version,
                    approver=approver,
                    reason=reason,
                    stale=stale,
                    started_by=started_by,
                )
                raise ApprovalRejected(
                    f"approval of version {version} of {model} not applied: {stale}. The "
                    "answer is in the audit log; run the release again to weigh the candidate "
                    "against the champion now"
                )
        # The audit entry first: it is the record of the decision (fsynced). Then the registry, the
        # starter before the typed record, whose status goes last (pending -> approved | rejected;
        # a timeout is a rejection by "timeout"): no status without its evidence.
        record(
            s.audit_log,
            "approve" if approved else "reject",
            model=model,
            version=version,
            approver=approver,
            reason=reason,
            checks=checks,
            started_by=started_by,
            signed=bool(proof),
            # What the signature covered, so anyone can check it again later with the key.
            **({"signed_by": proof} if proof else {}),
        )
        try:
            reopened = {TAG_APPROVAL_STARTED_BY: started_by}
            if approved and now.tags.get(TAG_APPROVAL_BY) == APPROVAL_TIMEOUT:
                # An earlier ask timed out and closed the candidate (status and verdict
                # "rejected"); approved now, it is a candidate again. Left as they were, those tags
                # would block the version for good as "its verdict is rejected".
                reopened.update({TAG_STATUS: "candidate", TAG_VERDICT: ""})
            reg.set_tags(model, version, reopened)
            reg.set_approval(
                model,
                version,
                ApprovalRecord(
                    status="approved" if approved else "rejected",
                    by=approver,
                    at=datetime.now(UTC),
                    reason=reason,
                ),
            )
        except Exception as exc:
            record(
                s.audit_log,
                "approval_write_failed",
                model=model,
                version=version,
                approver=approver,
                error=f"{type(exc).__name__}: {exc}"[:500],
            )
            raise
    log.info(
        "stage=approve model=%s version=%s approved=%s by=%s", model, version, approved, approver
    )
    return approved, approver, reason
