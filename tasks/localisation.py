"""Fault localisation for a report: which replica failed a version's requests, since when, why.

Read from the gateway's log files when this process can see them (``ballast stack``: under the
state folder), else from the gateway itself: every pod's ``GET /admin/failures`` (with
``BALLAST_GATEWAY_PODS_HOST``; the gateway's URL otherwise), each reading the failure files its
replicas keep, merged into one report (:func:`ballast.localise.merge_reports`). Used by the
champion watchdog's breach report and a release's rollback report.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.errors import GatewayError
from ballast.gateway_client import ask_each, gateway_urls
from ballast.localise import (
    FaultReport,
    default_log_paths,
    localise,
    markdown_cell,
    merge_reports,
)
from ballast.settings import Settings, get_settings
from tasks.common import logger


def fault_markdown(
    s: Settings,
    model: str,
    version: str,
    start: datetime,
    *,
    metric: str | None = None,
    log_paths: list[Path] | None = None,
) -> str:
    """``version``'s fault report since ``start`` as markdown, or a line saying why there is
    none. Never raises: the report it goes into is published with or without it."""
    paths = log_paths if log_paths is not None else default_log_paths(s.state_dir)
    try:
        if not paths:
            return _from_gateway(s, model, version, start, metric)
        return localise(paths, model, version, start, metric=metric).to_markdown()
    except Exception as exc:  # the report it goes into must not be lost to this part
        return f"_Fault localisation failed: {type(exc).__name__}: {_cell(str(exc))}_\n"


@task(name="fault-report", cache_policy=NO_CACHE)
def rollback_fault_report(model: str, version: str, since: float) -> str:
    """A rolled-back version's fault report from ``since`` (epoch seconds: its canary's start)
    to now."""
    s = get_settings()
    md = fault_markdown(s, model, version, datetime.fromtimestamp(since, UTC))
    logger().info("stage=report fault_report=%s", "written" if md.startswith("#") else "none")
    return md


def _from_gateway(
    s: Settings, model: str, version: str, start: datetime, metric: str | None
) -> str:
    failed: list[str] = []
    # By failure folder (each pod's own, shared by its replicas): two addresses reaching one
    # pod are counted once.
    by_folder: dict[str, tuple[str, FaultReport]] = {}
    try:
        urls = gateway_urls(s)
    except GatewayError as exc:
        urls, failed = [], [exc.message]
    end = datetime.now(UTC)
    answers, unread = ask_each(
        urls, s.admin_token() if urls else None, lambda gw: gw.failures(model, version, start, end)
    )
    failed += unread
    for answer in answers:
        by_folder.setdefault(answer.folder, (answer.pod, answer.report))
    if len(urls) > 1:
        logger().info(
            "stage=localise pods=%d read=%d failed=%d", len(urls), len(by_folder), len(failed)
        )
    if not by_folder:
        why = "; ".join(failed[:3]) or "no gateway address"
        if s.gateway_pods_host is not None:
            minutes = max(1, math.ceil(round((end - start).total_seconds()) / 60))
            return (
                f"_No pod's failures could be read ({_cell(why)}). The pods' own log: "
                f"`kubectl logs -l app.kubernetes.io/name=ballast-gateway --since={minutes}m "
                f"--prefix | grep request.failed`._\n"
            )
        return f"_No gateway log found for fault localisation ({_cell(why)})._\n"
    merged = merge_reports(by_folder.values(), metric=metric)
    md = merged.to_markdown()
    if failed:
        md += "\n\nNot read (their failures are missing above): " + "; ".join(
            _cell(m) for m in failed
        )
    return md + "\n"


def _cell(text: str) -> str:
    return markdown_cell(text)[:300]  # a pod's error message is not a report's whole page
