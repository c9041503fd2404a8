"""Thin tasks of the champion watchdog: read the gateway, persist the detector, report, heartbeat.

The decision itself is :mod:`ballast.watchdog` (pure); the rollback is
:func:`tasks.rollback.rollback_to_previous`, called by ``flows/watchdog.py``.

The detector's state lives in ``<state_dir>/watchdog/<model>.json`` between runs (each run is a
separate process), written atomically: a run killed mid-write leaves the previous state, never
half a file. A state that cannot be read starts a fresh warm-up rather than failing every run.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from ballast.anomaly import DetectorState
from ballast.audit import record
from ballast.errors import GatewayError
from ballast.gateway_client import ask_each, gateway_urls
from ballast.release import ALIAS_CHAMPION, ALIAS_PREVIOUS
from ballast.settings import Settings, get_settings
from ballast.watchdog import (
    AlertRecord,
    Observation,
    Response,
    WatchdogDecision,
    WatchdogPolicy,
    decide,
    merge_pod_stats,
    observe_replicas,
    repeats_alert,
    unavailable,
)
from tasks.common import logger, registry
from tasks.localisation import fault_markdown

#: Event names: ``ballast.watchdog.breach`` / ``ballast.watchdog.unavailable``.
EVENT_PREFIX = "ballast.watchdog."


@dataclass(frozen=True, slots=True)
class WatchdogCheck:
    """One run's look at the champion: the decision and what the registry says about rollback."""

    decision: WatchdogDecision
    previous: str | None


def state_path(s: Settings, model: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model) or "model"
    return s.state_dir / "watchdog" / f"{safe}.json"


def load_state(path: Path, model: str) -> DetectorState:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return DetectorState(model=model)
    except (OSError, ValueError) as exc:
        logger().warning("stage=watchdog state unreadable, starting a fresh baseline: %s", exc)
        return DetectorState(model=model)
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return DetectorState.from_dict(data, model)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        # JSON, but not a state this version reads (a hand edit, an older format).
        logger().warning("stage=watchdog state malformed, starting a fresh baseline: %s", exc)
        return DetectorState(model=model)


def save_state(path: Path, state: DetectorState) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(state.to_dict(), fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def alert_path(s: Settings, model: str) -> Path:
    return state_path(s, model).with_suffix(".alert.json")


def load_alert(path: Path) -> AlertRecord | None:
    """The last alert reported for a model, None when there is none (or it cannot be read:
    then the next alert is reported, which errs on the loud side)."""
    try:
        data = json.loads(path.read_text())
        return AlertRecord.from_dict(data) if isinstance(data, dict) else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger().warning("stage=watchdog last alert unreadable, reporting anew: %s", exc)
        return None


def remember_alert(path: Path, alert: AlertRecord | None) -> None:
    """Keep (or, with None, forget) the last alert reported; best effort: losing it means one
    more report, never a missed one."""
    try:
        if alert is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(alert.to_dict()))
        os.replace(tmp, path)
    except OSError as exc:
        logger().warning("stage=watchdog could not keep the last alert: %s", exc)


def already_reported(
    model: str, decision: WatchdogDecision, response: Response, *, every_s: float
) -> bool:
    """Whether this run's alert was reported less than ``every_s`` ago
    (:func:`ballast.watchdog.repeats_alert`); a run that has nothing to alert (healthy, or a
    rollback) forgets the last alert, so the next one is a new incident."""
    path = alert_path(get_settings(), model)
    last = load_alert(path)
    now = time.time()
    if repeats_alert(last, decision, response, now=now, every_s=every_s):
        logger().info(
            "stage=watchdog model=%s version=%s status=%s still %s, reported %.0f s ago: "
            "not reported again",
            model,
            decision.version,
            decision.status,
            response.reason,
            now - (last.at if last else now),
        )
        return True
    if response.action != "alert":
        remember_alert(path, None)
    return False


def mark_reported(model: str, decision: WatchdogDecision, response: Response) -> None:
    """Remember an alert once its report went out (a failed report is tried again next run)."""
    remember_alert(
        alert_path(get_settings(), model),
        AlertRecord(decision.version, decision.status, response.reason, time.time()),
    )


def _observe_gateway(
    s: Settings, model: str, version: str, state: DetectorState, min_count: int
) -> Observation:
    try:
        urls = gateway_urls(s)
    except GatewayError as exc:
        return unavailable(model, version, exc.message)
    # One answer a pod, from one replica: its counters and its pod's other replicas' (from the
    # board the replicas of one pod share). The token is read once, not once a pod.
    answers, failed = ask_each(urls, s.admin_token(), lambda gw: gw.stats())
    if len(urls) > 1:
        # One line per run: which pods were read. A pod that did not answer is left out of
        # this window; its counters are differenced against its last ones when it answers.
        logger().info(
            "stage=watchdog pods=%d read=%d failed=%d", len(urls), len(answers), len(failed)
        )
        for message in failed:
            logger().warning("stage=watchdog pod not read: %s", message)
    if not answers:
        where = s.gateway_url if s.gateway_pods_host is None else f"{len(urls)} pod(s)"
        return unavailable(model, version, f"gateway at {where}: {failed[0]}")
    stats = (
        answers[0] if len(answers) == 1 else merge_pod_stats(answers, model=model, version=version)
    )
    return observe_replicas(
        stats, model=model, version=version, last_snapshot=state.snapshot, min_count=min_count
    )


@task(name="watchdog-check", cache_policy=NO_CACHE)
def check_champion(
    model_name: str | None = None, policy: WatchdogPolicy | None = None
) -> WatchdogCheck:
    """Read the champion's live statistics, update and persist its detector, and decide."""
    s = get_settings()
    name = model_name or s.model_name
    policy = policy or WatchdogPolicy()
    reg = registry(s)
    champion = reg.get_by_alias(name, ALIAS_CHAMPION)
    previous = reg.get_by_alias(name, ALIAS_PREVIOUS)
    path = state_path(s, name)
    state = load_state(path, name)
    if champion is None:
        obs = Observation(
            model=name, version=None, first=True, reason="no champion yet: nothing to watch"
        )
    else:
        obs = _observe_gateway(s, name, champion.version, state, policy.detector.min_count)
    decision = decide(obs, state, policy)
    save_state(path, decision.state)
    log = logger()
    line = "stage=watchdog %s"
    if decision.status == "breach":
        log.error(line, decision.summary())
    elif decision.status == "unavailable":
        log.warning(line, decision.summary())
    else:
        log.info(line, decision.summary())
    return WatchdogCheck(decision, previous.version if previous is not None else None)


@task(name="watchdog-heartbeat", cache_policy=NO_CACHE)
def send_heartbeat(model: str, healthy: bool, detail: str = "") -> bool:
    """Tell the gateway (every pod, with ``gateway_pods_host``) the watchdog ran. False when no
    pod could be told (the gateway is down: its own alert and ``BallastWatchdogSilent`` cover
    that); never raises."""
    s = get_settings()
    try:
        urls = gateway_urls(s)
    except GatewayError as exc:
        logger().warning("stage=watchdog heartbeat not sent: %s", exc)
        return False
    told, failed = ask_each(
        urls, s.admin_token(), lambda gw: gw.watchdog_heartbeat(model, healthy, detail[:1000])
    )
    for message in failed:
        logger().warning("stage=watchdog heartbeat not sent: %s", message)
    return len(told) > 0


def localisation_markdown(
    s: Settings,
    decision: WatchdogDecision,
    log_paths: list[Path] | None,
    lookback_s: float,
) -> str:
    """The fault report for the breaching version (:func:`tasks.localisation.fault_markdown`),
    or a line saying why there is none. Never raises."""
    if decision.version is None:
        return ""
    culprit = decision.culprit
    return fault_markdown(
        s,
        decision.model,
        decision.version,
        datetime.now(UTC) - timedelta(seconds=lookback_s),
        metric=culprit.metric if culprit else None,
        log_paths=log_paths,
    )


def artifact_key(model: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "watchdog-" + (re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-") or "model")


@task(name="watchdog-report", cache_policy=NO_CACHE)
def report_incident(
    decision: WatchdogDecision,
    response: Response,
    *,
    rolled_back_to: str | None = None,
    rollback_error: str | None = None,
    localisation: str = "",
) -> str | None:
    """Publish a breach or an unavailable champion: audit entry (breaches), markdown artifact,
    Prefect event, error log. Returns the artifact id (None if it could not be created): the
    artifact and the event are best effort."""
    s = get_settings()
    evidence: dict[str, Any] = {
        **decision.evidence(),
        "action": response.action,
        "action_reason": response.reason,
        "rolled_back_to": rolled_back_to,
        "rollback_error": rollback_error,
    }
    if decision.status == "breach":
        record(
            s.audit_log,
            "watchdog_rollback"
            if rolled_back_to
            else "watchdog_rollback_failed"
            if rollback_error
            else "watchdog_alert",
            model=decision.model,
            version=decision.version,
            status=decision.status,
            metric=evidence["metric"],
            replica=evidence["replica"],
            reason="; ".join(decision.reasons),
            response=response.action,
            response_reason=response.reason,
            rolled_back_to=rolled_back_to,
            rollback_error=rollback_error,
            evidence=evidence,
        )
    outcome = (
        f"rolled back to {rolled_back_to}"
        if rolled_back_to
        else f"rollback failed: {rollback_error}"
        if rollback_error
        else response.reason
    )
    md = decision.to_markdown() + f"\n**Action:** {response.action}: {outcome}\n"
    if localisation:
        md += "\n" + localisation
    try:
        artifact_id: object = create_markdown_artifact(
            markdown=md,
            key=artifact_key(decision.model),
            description=f"{decision.model} {decision.version}: {decision.status}, {response.action}",
        )
    except Exception as exc:
        # The audit entry (breaches) and the error line below still report it; a Prefect API
        # hiccup must not replace a rollback's own failure as the run's error, nor skip the
        # heartbeat the flow sends next.
        logger().warning("stage=watchdog artifact not created: %r", exc)
        artifact_id = None
    try:
        emit_event(
            event=EVENT_PREFIX + decision.status,
            resource={
                "prefect.resource.id": f"ballast.model.{decision.model}",
                "prefect.resource.name": decision.model,
            },
            related=[
                {
                    "prefect.resource.id": f"ballast.model.{decision.model}.{decision.version}",
                    "prefect.resource.role": "model-version",
                }
            ]
            if decision.version
            else None,
            payload={
                "model": decision.model,
                "version": decision.version,
                "replica": evidence["replica"],
                "metric": evidence["metric"],
                "reasons": list(decision.reasons),
                "action": response.action,
                "rolled_back_to": rolled_back_to,
                "rollback_error": rollback_error,
                "ts": time.time(),
            },
        )
    except Exception as exc:  # the artifact and the audit entry already hold the report
        logger().warning("stage=watchdog event not sent: %r", exc)
    logger().error(
        "stage=watchdog model=%s version=%s status=%s action=%s metric=%s outcome=%s artifact=%s",
        decision.model,
        decision.version,
        decision.status,
        response.action,
        evidence["metric"],
        outcome,
        artifact_id,
    )
    return None if artifact_id is None else str(artifact_id)
