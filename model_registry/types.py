"""Plain types of the registry facade (no mlflow import, so callers can type against them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass, field

# One alias vocabulary for the whole project, defined with the decisions that move the aliases.
from ballast.decisions import CANDIDATE, CHAMPION, PREVIOUS

__all__ = ["CANDIDATE", "CHAMPION", "PREVIOUS", "ModelVersionInfo", "PromotionResult", "model_uri"]


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
