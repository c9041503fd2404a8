"""The release flow: ingest → train → compile → register → approve → canary → promote/rollback."""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from ballast.decisions import (
    approval_policy_for,
    fault_allowed,
    release_checks,
    require_approvers,
)
from ballast.release import ALIAS_CHAMPION, ReleaseReport
from ballast.roles import approval_config_from_settings
from ballast.serving import Fault
from ballast.settings import get_settings
from tasks.approval import approval_evidence, prior_decision_of, request_approval
from tasks.canary import canary_release, fetch_candidate
from tasks.common import logger, remove_staging
from tasks.compile import compile_candidate, cost_gate
from tasks.data import ingest_dataset
from tasks.localisation import rollback_fault_report
from tasks.registry import close_candidate, record_promotion, register_candidate
from tasks.report import publish_decision
from tasks.train import quality_gate, train_model


def _run_name() -> str:
    """Recognisable in the UI: model, and the injected fault when there is one."""
    fault = flow_run.parameters.get("inject_fault")
    return f"release-{get_settings().model_name}" + (f"-fault-{fault}" if fault else "")


@flow(name="release", flow_run_name=_run_name, log_prints=False)
def release_flow(
    dataset_uri: str | None = None,
    inject_fault: Fault | None = None,
    # A Literal, so the deployment's parameter schema refuses a typo when the run is
    # submitted, not after training, compiling and registering.
    approval_policy: Literal["auto", "manual"] | None = None,
) -> ReleaseReport:
    s = get_settings()
    # Refused here, before anything is ingested or trained: auto-approval outside dev, a
    # manual release nobody may approve (a bad roles file too), a rehearsed fault in prod.
    policy = approval_policy_for(approval_policy, s.approval_policy, s.environment)
    require_approvers(
        policy,
        lambda: approval_config_from_settings(s).roles,
        keys=(lambda: approval_config_from_settings(s).keys)
        if s.approval_signatures == "required"
        else None,
    )
    fault_allowed(inject_fault, s.environment)
    run_id = str(flow_run.get_id() or f"local-{time.time_ns()}")
    report = ReleaseReport(model=s.model_name)
    t0 = time.perf_counter()

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        report.stage_seconds[stage] = round(now - since, 3)
        return now

    t = t0
    ds = ingest_dataset(dataset_uri or s.default_dataset_uri)
    t = lap("ingest", t)
    trained = train_model(ds, inject_fault)
    t = lap("train", t)
    # QualityGateFailed stops the run before anything is compiled.
    quality = quality_gate(trained)
    t = lap("quality", t)
    staging = (s.state_dir / "staging" / run_id).resolve()
    try:
        compiled = compile_candidate(trained, staging / "build")
        t = lap("compile", t)
        # CostGateFailed stops the run before anything is registered.
        cost = cost_gate(compiled, int(trained.split.x_test.shape[1]))
        t = lap("cost", t)
        info = register_candidate(
            ds,
            trained,
            compiled,
            staging / "artifacts",
            flow_run_id=run_id,
            inject_fault=inject_fault,
        )
    finally:
        # The registry holds its own copy now (or nothing was registered): a run's build
        # files (a TensorRT engine is hundreds of MB) must not pile up run after run.
        remove_staging(staging)
    report.version = info.version
    report.metrics = {**trained.metrics, **compiled.metrics(), **cost.evidence()}
    t = lap("register", t)
    if ALIAS_CHAMPION in info.aliases:
        # Same data, code and parameters as the champion: nothing to approve or canary.
        report.outcome = "unchanged"
        report.reason = f"version {info.version} is this release and already the champion"
        logger().info("stage=release model=%s outcome=unchanged", s.model_name)
        return report
    decided = prior_decision_of(info)
    if decided is not None:
        # Same release as a version decided before (rejected, rolled back): that decision
        # stands; approving it again would override it (a nightly auto run undoing a rejection).
        report.outcome = "unchanged"
        report.reason = f"version {info.version} is this release and was decided before: {decided}"
        logger().info(
            "stage=release model=%s version=%s outcome=unchanged decided=%s",
            s.model_name,
            info.version,
            decided,
        )
        return report

    checks = release_checks(
        quality_passed=quality.passed,  # raised otherwise
        quality_compared=quality.champion is not None or quality.floor is not None,
        parity_passed=compiled.parity.passed,
        metrics=trained.metrics,
    )
    approved, approver, reason = request_approval(
        model=s.model_name,
        version=info.version,
        checks=checks,
        metrics=approval_evidence(ds, trained.metrics, compiled.metrics(), quality, cost),
        policy=policy,
        compared_champion=quality.champion_version,
        fault=inject_fault,
    )
    t = lap("approve", t)
    if not approved:
        close_candidate(
            info.version,
            status="rejected",
            verdict="rejected",
            reason=f"{approver}: {reason}",
            evidence={"checks": checks},
        )
        report.outcome, report.reason = "rejected", reason
        return report

    # Fetched and verified in a task of its own, retried: a registry hiccup here must not
    # throw away an approval (the canary itself is never retried).
    spec = fetch_candidate(info)
    outcome = canary_release(info, trained.split.x_test, trained.split.y_test, spec=spec)
    lap("canary", t)
    report.canary_steps = outcome.steps
    report.seconds_to_decision = round(outcome.seconds_to_decision, 3)
    report.reason = "; ".join(outcome.reasons)
    evidence: dict[str, object] = {"steps": outcome.steps, **outcome.evidence}
    if outcome.decision == "promote":
        record_promotion(info.version, evidence)
        report.outcome = "promoted"
    else:
        close_candidate(
            info.version,
            status="rolled_back",
            verdict="rollback",
            reason=report.reason,
            evidence=evidence,
        )
        report.outcome = "rolled_back"
    # Which replica failed the candidate's requests, since when, why: over its canary (from a
    # minute before its start: clocks of a cluster's pods differ a little).
    extra = (
        ""
        if report.outcome == "promoted"
        else rollback_fault_report(s.model_name, info.version, outcome.started_at - 60)
    )
    report.decision_artifact_id = publish_decision(
        model=s.model_name,
        version=info.version,
        outcome=report.outcome,
        reasons=outcome.reasons,
        champion=outcome.champion,
        steps=outcome.steps,
        evidence=dict(outcome.evidence),
        extra=extra,
    )
    logger().info(
        "stage=release model=%s version=%s outcome=%s seconds=%.1f",
        s.model_name,
        info.version,
        report.outcome,
        time.perf_counter() - t0,
    )
    return report


if __name__ == "__main__":  # pragma: no cover
    release_flow()
