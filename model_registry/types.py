"""Plain types of the registry facade (no mlflow import, so callers can type against them cheaply)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

# One alias vocabulary for the whole project, defined with the decisions that move the aliases.
from ballast.decisions import CANDIDATE, CHAMPION, PREVIOUS

__all__ = [
    "APPROVAL_STATUSES",
    "CANDIDATE",
    "CHAMPION",
    "PREVIOUS",
    "ApprovalRecord",
    "ApprovalStatus",
    "ModelVersionInfo",
    "PromotionResult",
    "model_uri",
]

ApprovalStatus = Literal["pending", "approved", "rejected"]
APPROVAL_STATUSES: tuple[ApprovalStatus, ...] = ("pending", "approved", "rejected")

# Where the record lives on the model version (tags: readable in the MLflow UI as they are).
TAG_APPROVAL = "ballast.approval"
TAG_APPROVAL_BY = "ballast.approval.by"
TAG_APPROVAL_AT = "ballast.approval.at"
TAG_APPROVAL_REASON = "ballast.approval.reason"


def model_uri(name: str, alias: str = CHAMPION) -> str:
    """The MLflow URI of the version ``alias`` points at: ``models:/{name}@{alias}``."""
    return f"models:/{name}@{alias}"


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(hash=False)
    run_id: str | None
    source: str
    created_ms: int


@dataclass(frozen=True)
class PromotionResult:
    """What an alias move did. ``version`` is the champion afterwards."""

    name: str
    version: str
    previous_champion: str | None  # the champion before the move (None if there was none)
    candidate_cleared: bool  # the candidate alias pointed at ``version`` and was removed
    changed: bool  # False when ``version`` already was the champion and nothing moved
    # alias -> version (None: absent) before the move, for each alias it moved, and after it:
    # what Registry.undo puts back, and checks is still in place.
    moved_from: Mapping[str, str | None] = field(default_factory=dict, hash=False)
    moved_to: Mapping[str, str | None] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ApprovalRecord:
    """A version's release approval: ``pending`` from registration until someone (or the
    policy, or the timeout) decides; who, when and why travel with it."""

    status: ApprovalStatus
    by: str
    at: datetime
    reason: str

    def __post_init__(self) -> None:
        if self.status not in APPROVAL_STATUSES:
            raise ValueError(f"approval status must be one of {APPROVAL_STATUSES}: {self.status!r}")
        if self.at.tzinfo is None:
            raise ValueError("approval time must be timezone-aware")

    def as_tags(self) -> dict[str, str]:
        return {
            TAG_APPROVAL: self.status,
            TAG_APPROVAL_BY: self.by,
            TAG_APPROVAL_AT: self.at.isoformat(timespec="seconds"),
            TAG_APPROVAL_REASON: self.reason[:500],
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> ApprovalRecord | None:
        """The record in ``tags``; None when the version has none (registered before it
        existed). A status outside the vocabulary (an older ``timeout``) reads as rejected."""
        status = tags.get(TAG_APPROVAL)
        if status is None:
            return None
        try:
            at = datetime.fromisoformat(tags.get(TAG_APPROVAL_AT, ""))
        except ValueError:
            at = datetime.fromtimestamp(0).astimezone()
        return cls(
            status=status if status in APPROVAL_STATUSES else "rejected",
            by=tags.get(TAG_APPROVAL_BY, ""),
            at=at if at.tzinfo else at.astimezone(),
            reason=tags.get(TAG_APPROVAL_REASON, ""),
        )
