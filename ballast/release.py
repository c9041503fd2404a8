"""Release building blocks that are plain Python: packaging a candidate and reading evidence.

The flow in ``flows/release.py`` composes these through thin tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ballast.decisions import CANDIDATE, CHAMPION, PREVIOUS

# Tag keys on model versions: one vocabulary for tasks, CLI and tests.
TAG_DATASET_SHA = "ballast.dataset_sha256"
TAG_DATASET = "ballast.dataset"
TAG_DATASET_CIPHERTEXT_SHA = "ballast.dataset_ciphertext_sha256"
TAG_VALIDATION_ARTIFACT = "ballast.validation_artifact_id"
TAG_BACKEND = "ballast.backend"
TAG_ARTIFACT = "ballast.artifact"
TAG_ARTIFACT_SHA = "ballast.artifact_sha256"
TAG_PARITY = "ballast.parity"
TAG_FAULT = "ballast.fault_injection"
TAG_STATUS = "ballast.status"
TAG_VERDICT = "ballast.verdict"
TAG_REASON = "ballast.reason"
TAG_FLOW_RUN = "ballast.flow_run_id"
TAG_APPROVAL = "ballast.approval"

# One alias vocabulary, defined with the decisions that move them.
ALIAS_CHAMPION = CHAMPION
ALIAS_CANDIDATE = CANDIDATE
ALIAS_PREVIOUS = PREVIOUS


@dataclass
class ReleaseReport:
    """What a release run did, stage by stage; returned by the flow and printed by the CLI."""

    model: str
    version: str | None = None
    outcome: str = "pending"  # promoted | rolled_back | rejected | failed
    reason: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds_to_decision: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    canary_steps: list[dict[str, Any]] = field(default_factory=list)
