"""The registry facade: the only package in Ballast that imports mlflow.

A narrow surface: register a version (one MLflow run, all-or-nothing), read versions, tags and
aliases, download a version's files, move aliases (``champion``, ``candidate``, ``previous``)
as one operation that is undone if a step fails, and hold a lock kept in the registry itself
(``Registry.exclusive``: one writer at a time across machines, :mod:`model_registry.write_lock`). mlflow is imported when a :class:`Registry` is
made, not when this package is imported.
"""

from model_registry.registry import Registry
from model_registry.serving_peer import save_onnx_as_mlflow_model
from model_registry.types import (
    CANDIDATE,
    CHAMPION,
    PREVIOUS,
    ApprovalRecord,
    ApprovalStatus,
    ModelVersionInfo,
    PromotionResult,
    model_uri,
)
from model_registry.write_lock import serving_lock_name

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "PREVIOUS",
    "ApprovalRecord",
    "ApprovalStatus",
    "ModelVersionInfo",
    "PromotionResult",
    "Registry",
    "model_uri",
    "save_onnx_as_mlflow_model",
    "serving_lock_name",
]
