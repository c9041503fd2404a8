"""The release decision, published where people look: a Prefect markdown artifact (the run's
Artifacts tab) and a Prefect event (automations and notifications can trigger on it)."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from ballast.audit import anchor
from ballast.release import decision_markdown
from ballast.settings import get_settings
from tasks.common import logger

#: Event names: ``ballast.release.promoted`` / ``ballast.release.rolled_back``.
EVENT_PREFIX = "ballast.release."


def artifact_key(model: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "release-" + (re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-") or "model")


@task(name="publish-decision", cache_policy=NO_CACHE)
def publish_decision(
    *,
    model: str,
    version: str,
    outcome: str,
    reasons: list[str],
    champion: str | None,
    steps: list[dict[str, Any]],
    evidence: dict[str, Any],
    extra: str = "",
) -> str | None:
    """Publish the report; returns the artifact id. Never raises for the event: a decision that
    already changed traffic must not fail because a notification could not be sent."""
    # The audit log's anchor after this release's entries, kept in Prefect's database: the
    # chain alone cannot show a log cut short or rewritten whole (`ballast audit verify
    # --anchor`).
    held = anchor(get_settings().audit_log).text()
    md = decision_markdown(
        model=model,
        version=version,
        outcome=outcome,
        reasons=reasons,
        champion=champion,
        steps=steps,
        evidence=evidence,
        extra=extra,
    )
    md += f"\nAudit log anchor: `{held}` (check with `ballast audit verify --anchor {held}`).\n"
    try:
        artifact_id: object = create_markdown_artifact(
            markdown=md,
            key=artifact_key(model),
            description=f"{model} {version}: {outcome}",
        )
    except Exception as exc:
        # Traffic already changed: a Prefect API hiccup must not fail the run. The anchor is
        # in this line of the run's log instead.
        logger().warning("stage=report artifact not created (audit anchor %s): %r", held, exc)
        artifact_id = None
    payload = {
        "model": model,
        "version": version,
        "outcome": outcome,
        "champion": champion,
        "reasons": reasons,
        "evidence": {k: v for k, v in evidence.items() if isinstance(v, int | float | str)},
        "audit_anchor": held,
    }
    try:
        emit_event(
            event=EVENT_PREFIX + outcome,
            resource={
                "prefect.resource.id": f"ballast.model.{model}.{version}",
                "prefect.resource.name": f"{model} {version}",
            },
            payload=payload,
        )
    except Exception as exc:  # the report is best effort after the fact
        logger().warning("stage=report event not sent: %r", exc)
    logger().info(
        "stage=report model=%s version=%s outcome=%s artifact=%s",
        model,
        version,
        outcome,
        artifact_id,
    )
    return None if artifact_id is None else str(artifact_id)
