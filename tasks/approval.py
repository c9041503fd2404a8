"""Stage 6: release approval. Policy ``auto`` decides from the checks; ``manual`` pauses the flow
run with a typed form (Prefect renders it in the UI; ``resume_flow_run`` answers it from code)."""

from __future__ import annotations

from typing import Any

from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from ballast.audit import record
from ballast.settings import get_settings
from tasks.common import logger


class ApprovalForm(RunInput):
    """What an approver fills in on the paused run."""

    approve: bool = Field(default=False, description="Approve this version for the canary")
    approver: str = Field(min_length=1, description="Your name (recorded in the audit log)")
    reason: str = Field(min_length=1, description="Why (recorded on the model version)")


def evidence_markdown(
    model: str, version: str, checks: dict[str, bool], metrics: dict[str, float]
) -> str:
    rows = "\n".join(f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in checks.items())
    mrows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()))
    return (
        f"## Approve {model} version {version}?\n\n| check | result |\n|---|---|\n{rows}\n\n"
        f"| metric | value |\n|---|---|\n{mrows}\n"
    )


def request_approval(
    *, model: str, version: str, checks: dict[str, bool], metrics: dict[str, float], policy: str
) -> tuple[bool, str, str]:
    """Returns (approved, approver, reason). Must run inside a flow: it may pause the run."""
    from ballast.decisions import decide_approval

    s = get_settings()
    log = logger()
    decision = decide_approval(policy, checks)  # type: ignore[arg-type]
    if not decision.needs_human:
        approved, approver, reason = decision.approved, "policy:auto", decision.reason
    else:
        form: Any = ApprovalForm.with_initial_data(
            description=evidence_markdown(model, version, checks, metrics),
            approve=False,
            approver="",
            reason="",
        )
        log.info("stage=approve model=%s version=%s waiting for a human", model, version)
        try:
            answer = pause_flow_run(
                wait_for_input=form, timeout=s.approval_timeout_s, poll_interval=s.approval_poll_s
            )
        except Exception as exc:  # FlowPauseTimeout: a timed-out approval is a rejection
            answer = None
            log.warning("stage=approve timed out: %s", type(exc).__name__)
        if answer is None:
            approved, approver, reason = False, "timeout", "approval timed out"
        else:
            approved, approver, reason = bool(answer.approve), answer.approver, answer.reason
    record(
        s.audit_log,
        "approve" if approved else "reject",
        model=model,
        version=version,
        approver=approver,
        reason=reason,
        checks=checks,
    )
    log.info(
        "stage=approve model=%s version=%s approved=%s by=%s", model, version, approved, approver
    )
    return approved, approver, reason
