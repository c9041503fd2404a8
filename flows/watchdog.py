"""The champion watchdog: every few minutes, judge the champion's live health; on a breach roll
back to ``previous`` and raise an alert (audit entry, markdown artifact, Prefect event).

What it does per outcome (the decision is :func:`ballast.watchdog.decide`, the action
:func:`ballast.watchdog.plan_response`):

* healthy / insufficient data: nothing but the heartbeat (healthy);
* breach: roll back with :func:`tasks.rollback.rollback_to_previous`, then report with the fault
  localisation from the gateway log; with no ``previous`` (or during a canary, or with
  ``rollback=False``) it reports without rolling back. A failed rollback is reported, then the
  run fails;
* unavailable (gateway down, or not serving the registry's champion): report, no rollback
  (nothing was measured, nothing says ``previous`` would do better).

An alert without a rollback (those two, or a breach with nothing to roll back to) is reported
once, then again only every ``realert_after_s`` while it lasts (the heartbeat keeps Prometheus's
alert firing between); a healthy run or a rollback ends the incident.

Every run ends with a heartbeat to the gateway (``ballast_watchdog_healthy{model}``); it is
unhealthy for a breach or an unavailable champion, even after a successful rollback, so the
``BallastChampionUnhealthy`` alert fires for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from ballast.anomaly import DetectorPolicy
from ballast.errors import ChampionChanged
from ballast.settings import get_settings
from ballast.watchdog import WatchdogPolicy, plan_response
from tasks.common import logger
from tasks.rollback import rollback_to_previous
from tasks.watchdog import (
    already_reported,
    check_champion,
    localisation_markdown,
    mark_reported,
    report_incident,
    send_heartbeat,
)


@dataclass(frozen=True, slots=True)
class WatchdogReport:
    model: str
    version: str | None
    status: str  # healthy | breach | insufficient_data | unavailable
    action: str  # none | rollback | alert
    reason: str
    metric: str | None = None
    replica: str | None = None
    rolled_back_to: str | None = None
    artifact_id: str | None = None
    heartbeat_sent: bool = False
    already_reported: bool = False  # the same alert was reported within realert_after_s


def _run_name() -> str:
    return f"watchdog-{flow_run.parameters.get('model_name') or get_settings().model_name}"


@flow(name="champion-watchdog", flow_run_name=_run_name, log_prints=False)
def champion_watchdog_flow(
    model_name: str | None = None,
    rollback: bool = True,
    # Ranges in the parameter schema: a deployment refuses a bad value when the run is
    # submitted (a ceiling of 5 meant as 5 % never trips; a negative one rolls back at once).
    error_rate_ceiling: Annotated[float, Field(gt=0, le=1)] | None = 0.05,
    latency_p99_ceiling_ms: Annotated[float, Field(gt=0)] | None = None,
    # At most the detector's MAD window (48 checks, DetectorPolicy.mad_window).
    warmup_checks: Annotated[int, Field(ge=3, le=48)] = 12,
    min_requests: Annotated[int, Field(ge=1)] = 100,
    gateway_logs: list[str] | None = None,
    lookback_s: Annotated[float, Field(gt=0)] = 900.0,
    realert_after_s: Annotated[float, Field(ge=0)] = 3600.0,
) -> WatchdogReport:
    """``gateway_logs``: files for fault localisation (default: the gateway logs under the state
    folder); ``lookback_s``: how far back the fault report reads them; ``realert_after_s``: an
    alert that cannot be acted on (no rollback) is reported again after this long while it
    lasts, not at every run (the heartbeat keeps Prometheus's alert firing meanwhile)."""
    name = model_name or get_settings().model_name
    policy = WatchdogPolicy(
        detector=DetectorPolicy(warmup=warmup_checks, min_count=min_requests),
        error_rate_ceiling=error_rate_ceiling,
        latency_p99_ceiling_ms=latency_p99_ceiling_ms,
        rollback=rollback,
    )
    check = check_champion(name, policy)
    decision = check.decision
    response = plan_response(decision, previous=check.previous, policy=policy)
    rolled_back_to: str | None = None
    failure: BaseException | None = None
    skipped: str | None = None
    artifact_id: str | None = None
    if response.action == "rollback":
        try:
            # The audit log says who rolled back and why: not the "manual rollback" default.
            why = f"watchdog: {response.reason} ({'; '.join(decision.reasons)})"[:500]
            rolled_back_to = rollback_to_previous(
                name, why=why, expect_champion=decision.version
            ).restored
        except ChampionChanged as exc:
            # Promoted since it was judged: the breaching version serves no more, and the new
            # champion was never judged. Reported, not a failed run.
            skipped = exc.message
        except Exception as exc:  # reported below, then the run fails
            failure = exc
    repeated = already_reported(name, decision, response, every_s=realert_after_s)
    if response.action != "none" and not repeated:
        localisation = ""
        if decision.status == "breach":
            paths = None if gateway_logs is None else [Path(p) for p in gateway_logs]
            localisation = localisation_markdown(get_settings(), decision, paths, lookback_s)
        artifact_id = report_incident(
            decision,
            response,
            rolled_back_to=rolled_back_to,
            rollback_error=(
                f"{type(failure).__name__}: {failure}"
                if failure is not None
                else (None if skipped is None else f"not rolled back: {skipped}")
            ),
            localisation=localisation,
        )
        if response.action == "alert":
            mark_reported(name, decision, response)
    detail = decision.summary()
    if response.action != "none":
        detail = f"{detail} | {response.action}: {rolled_back_to or response.reason}"[:1000]
    sent = send_heartbeat(name, decision.healthy and failure is None, detail)
    culprit = decision.culprit
    report = WatchdogReport(
        model=name,
        version=decision.version,
        status=decision.status,
        action=response.action,
        reason=response.reason,
        metric=culprit.metric if culprit else None,
        replica=decision.observation.replica,
        rolled_back_to=rolled_back_to,
        artifact_id=artifact_id,
        heartbeat_sent=sent,
        already_reported=repeated,
    )
    logger().info(
        "stage=watchdog model=%s version=%s status=%s action=%s rolled_back_to=%s heartbeat=%s",
        name,
        report.version,
        report.status,
        report.action,
        rolled_back_to,
        sent,
    )
    if failure is not None:
        raise failure
    return report


if __name__ == "__main__":  # pragma: no cover
    champion_watchdog_flow()
