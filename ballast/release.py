"""Release building blocks that are plain Python: packaging a candidate and reading evidence.

The flow in ``flows/release.py`` composes these through thin tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ballast.decisions import CANDIDATE, CHAMPION, PREVIOUS
from ballast.errors import IntegrityError
from ballast.manifest import SignedManifest, verify_manifest

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
# The release flow pauses for approval under the key "approval-<version>-<attempt>" (a fresh key
# per attempt; tasks/approval.py); `ballast approve` reads the version back from it.
PAUSE_KEY_PREFIX = "approval-"
# The approval form's line naming the run's starter: tasks/approval.py writes it, `ballast
# approve` reads it back to refuse the starter's own answer before sending it.
STARTED_BY_LINE = "Run started by **{}**: approval needs the approver role and someone else."


def started_by_in(description: str) -> str | None:
    """The starter an approval form's description names (None: it names none)."""
    head, _, rest = STARTED_BY_LINE.partition("{}")
    start = description.find(head)
    if start < 0:
        return None
    end = description.find(rest, start + len(head))
    return description[start + len(head) : end] if end >= 0 else None


TAG_CONTENT_KEY = "ballast.content_key"
TAG_CODE = "ballast.code"
# A registry-backed gateway's traffic shares and trial lease (infra/gateway/registry_source.py).
TAG_CANARY_WEIGHT = "ballast.canary_weight"
TAG_SHADOW_FRACTION = "ballast.shadow_fraction"
TAG_LEASE = "ballast.lease_expires_at"
TAG_KEY_SALT = "ballast.key_salt"  # Deployment.key_salt, on the candidate
NO_LEASE = "none"

# One alias vocabulary, defined with the decisions that move them.
ALIAS_CHAMPION = CHAMPION
ALIAS_CANDIDATE = CANDIDATE
ALIAS_PREVIOUS = PREVIOUS
# The version a canary's shadow phase mirrors traffic to (read by registry-backed gateways).
ALIAS_SHADOW = "shadow"


def content_key(
    *, training_key: str, code: str | None, backend: str, precision: str, fault: str | None
) -> str:
    """What makes two releases the same release: the training key (dataset hash,
    hyperparameters, seed), the code, how it was compiled and any injected fault. A release whose
    key is already registered reuses that version instead of creating a second one."""
    payload = {
        "training": training_key,
        "code": code or "unknown",
        "backend": backend,
        "precision": precision,
        "fault": fault,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class ReleaseReport:
    """What a release run did, stage by stage; returned by the flow and printed by the CLI."""

    model: str
    version: str | None = None
    # promoted | rolled_back | rejected | unchanged (this release is the champion already)
    outcome: str = "pending"
    reason: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds_to_decision: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    canary_steps: list[dict[str, Any]] = field(default_factory=list)
    decision_artifact_id: str | None = None  # the Prefect markdown artifact of the decision


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def decision_markdown(
    *,
    model: str,
    version: str,
    outcome: str,
    reasons: list[str] | tuple[str, ...],
    champion: str | None,
    steps: list[dict[str, Any]],
    evidence: dict[str, Any],
    extra: str = "",
) -> str:
    """The release decision as a report: outcome and reason, each canary step, the judge's
    evidence (statistics, counts, thresholds), and optional extra sections (fault localisation)."""
    title = {"promoted": "promoted", "rolled_back": "ROLLED BACK"}.get(outcome, outcome)
    out = [
        f"# {model} version {version}: {title}\n",
        f"Champion during the canary: **{champion or 'none (first release)'}**.\n",
        "## Reason\n",
        *(f"- {_cell(r)}" for r in (reasons or ["(none given)"])),
        "",
    ]
    if steps:
        out += [
            "## Canary steps\n",
            "| step | weight % | decision | t (s) | champion n | canary n | reasons |",
            "|---|---|---|---|---|---|---|",
        ]
        for st in steps:
            out.append(
                "| "
                + " | ".join(
                    _cell(st.get(k, ""))
                    for k in ("step", "weight", "decision", "seconds", "baseline_n", "canary_n")
                )
                + f" | {_cell('; '.join(st.get('reasons', [])))} |"
            )
        out.append("")
    flat = {k: v for k, v in sorted(evidence.items()) if k != "steps"}
    if flat:
        out += ["## Evidence\n", "| metric | value |", "|---|---|"]
        out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in flat.items()]
        out.append("")
    if extra:
        out += [extra.rstrip(), ""]
    return "\n".join(out)


def holds_trial(tags: Mapping[str, str], now: float) -> bool:
    """Whether a version with these tags is on trial on a registry-backed gateway: canary
    traffic (a weight above 0) or mirrored traffic in a shadow phase (a fraction above 0), and a
    lease that has not run out (or no lease). Unreadable tags count as no trial, as the gateway
    refuses them too."""
    try:
        weight = int(tags.get(TAG_CANARY_WEIGHT, "0"))
        fraction = float(tags.get(TAG_SHADOW_FRACTION, "0"))
        lease = tags.get(TAG_LEASE, NO_LEASE)
        expires = math.inf if lease in (NO_LEASE, "") else float(lease)
    except ValueError:
        return False
    return (weight > 0 or fraction > 0) and now < expires


@dataclass(frozen=True)
class VerifiedArtifact:
    """The file a registered version serves, once its signed manifest verified."""

    path: str
    sha256: str
    backend: str


def verify_version(
    local: Path, tags: Mapping[str, str], version: str, trusted_key: Path, *, model: str
) -> VerifiedArtifact:
    """Verify the signed manifest of version ``version`` of ``model`` (its files in ``local``)
    against ``trusted_key``; the artefact named by tag ``ballast.artifact`` must be in it with the
    sha256 of tag ``ballast.artifact_sha256``. :class:`IntegrityError` (or the manifest's own)
    otherwise.

    The signature says the files are ours, not which version they belong to: the manifest must
    also name this model, and the version's content key and backend tags must be what it
    signed, so another model's signed files (or a retagged backend) cannot pass as this version.

    Shared by the release flow (before it deploys a version) and a registry-backed gateway
    (before a replica loads one)."""
    manifest = verify_manifest(SignedManifest.read(local), trusted_key, local)
    if manifest.model_name != model:
        raise IntegrityError(
            f"version {version}: its signed manifest is for model {manifest.model_name!r}, "
            f"not {model!r}"
        )
    if (tags.get(TAG_CONTENT_KEY) or None) != manifest.content_key:
        raise IntegrityError(
            f"version {version}: tag {TAG_CONTENT_KEY} does not match its signed manifest"
        )
    if tags.get(TAG_BACKEND, manifest.backend) != manifest.backend:
        raise IntegrityError(
            f"version {version}: tag {TAG_BACKEND}={tags[TAG_BACKEND]!r} but its signed manifest "
            f"says {manifest.backend!r}"
        )
    artifact = tags.get(TAG_ARTIFACT, "")
    entry = next((f for f in manifest.files if f.path == artifact), None)
    if entry is None or entry.sha256 != tags.get(TAG_ARTIFACT_SHA):
        raise IntegrityError(
            f"version {version}: artefact {artifact!r} is not in its signed manifest with the "
            "tagged sha256"
        )
    return VerifiedArtifact(str(local / artifact), entry.sha256, manifest.backend)
