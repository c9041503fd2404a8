"""Stage 5 and 8: register the candidate (signed, hashed, tagged) and move aliases.

Registration is idempotent per flow run: a retried or resumed run finds the version it already
registered (tag ``ballast.flow_run_id``) instead of creating a duplicate.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.audit import record
from ballast.compile import CompiledArtifact
from ballast.data import ValidatedDataset
from ballast.manifest import build_manifest, current_git_commit, sign_manifest
from ballast.release import (
    ALIAS_CANDIDATE,
    TAG_ARTIFACT,
    TAG_ARTIFACT_SHA,
    TAG_BACKEND,
    TAG_DATASET,
    TAG_DATASET_CIPHERTEXT_SHA,
    TAG_DATASET_SHA,
    TAG_FAULT,
    TAG_FLOW_RUN,
    TAG_PARITY,
    TAG_REASON,
    TAG_STATUS,
    TAG_VALIDATION_ARTIFACT,
    TAG_VERDICT,
)
from ballast.serving import Fault
from ballast.settings import get_settings
from ballast.training import TrainResult
from model_registry import ModelVersionInfo
from tasks.common import logger, registry


def stage_artifacts(
    out_dir: Path, ds: ValidatedDataset, trained: TrainResult, compiled: CompiledArtifact
) -> Path:
    """Lay out what gets registered: compiled artefact, ONNX, eager weights, signed manifest."""
    import torch

    s = get_settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in {compiled.path, compiled.onnx_path}:
        if src.parent.resolve() != out_dir.resolve():
            shutil.copy2(src, out_dir / src.name)
    torch.save(trained.model.state_dict(), out_dir / "state_dict.pt")
    metrics = {**trained.metrics, **compiled.metrics()}
    manifest = build_manifest(
        out_dir,
        model_name=s.model_name,
        dataset_sha256=ds.sha256,
        backend=compiled.backend,
        precision=compiled.precision,
        metrics=metrics,
        parity={
            "max_abs_err": compiled.parity.max_abs_err,
            "max_rel_err": compiled.parity.max_rel_err,
            "rtol": compiled.parity.rtol,
            "passed": compiled.parity.passed,
        },
        git_commit=current_git_commit(),
    )
    sign_manifest(manifest, s.signing_key_path).write(out_dir)
    return out_dir


@task(name="register-candidate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 3])
def register_candidate(
    ds: ValidatedDataset,
    trained: TrainResult,
    compiled: CompiledArtifact,
    staging_dir: Path,
    *,
    flow_run_id: str,
    inject_fault: Fault | None = None,
) -> ModelVersionInfo:
    s = get_settings()
    reg = registry(s)
    existing = reg.find_by_tag(s.model_name, TAG_FLOW_RUN, flow_run_id)
    if existing:
        logger().info(
            "stage=register version=%s already registered by this run", existing[0].version
        )
        return existing[0]
    artifact_dir = stage_artifacts(staging_dir, ds, trained, compiled)
    tags = {
        TAG_DATASET: ds.name,
        TAG_DATASET_SHA: ds.sha256,
        TAG_DATASET_CIPHERTEXT_SHA: ds.ciphertext_sha256 or "",
        TAG_VALIDATION_ARTIFACT: ds.validation_artifact_id or "",
        TAG_BACKEND: compiled.backend,
        TAG_ARTIFACT: compiled.path.name,
        TAG_ARTIFACT_SHA: compiled.sha256,
        TAG_PARITY: f"max_rel_err={compiled.parity.max_rel_err:.3e} rtol={compiled.parity.rtol:g}",
        TAG_FLOW_RUN: flow_run_id,
        TAG_STATUS: "candidate",
        "ballast.accuracy": f"{trained.metrics['accuracy']:.4f}",
    }
    if inject_fault:
        tags[TAG_FAULT] = inject_fault
    info = reg.register_version(
        s.model_name,
        artifact_dir=artifact_dir,
        params=trained.params,
        metrics={**trained.metrics, **compiled.metrics()},
        metric_history=trained.metric_history(),
        tags=tags,
        description=f"dataset {ds.name} sha256 {ds.sha256[:12]}, backend {compiled.backend}",
    )
    reg.set_alias(s.model_name, ALIAS_CANDIDATE, info.version)
    record(s.audit_log, "register", model=s.model_name, version=info.version, tags=tags)
    logger().info("stage=register model=%s version=%s alias=candidate", s.model_name, info.version)
    return reg.get_version(s.model_name, info.version)


@task(name="record-promotion", cache_policy=NO_CACHE)
def record_promotion(version: str, evidence: dict[str, object]) -> None:
    """Tag and audit a promotion (the alias move itself happened with the traffic switch)."""
    s = get_settings()
    reg = registry(s)
    reg.set_tags(s.model_name, version, {TAG_STATUS: "champion", TAG_VERDICT: "promote"})
    record(s.audit_log, "promote", model=s.model_name, version=version, evidence=evidence)
    logger().info("stage=decide model=%s version=%s decision=promote", s.model_name, version)


@task(name="reject-candidate", cache_policy=NO_CACHE)
def close_candidate(
    version: str, *, status: str, verdict: str, reason: str, evidence: dict[str, object]
) -> None:
    """A candidate that will not serve: tag it, drop the candidate alias, never touch champion."""
    s = get_settings()
    reg = registry(s)
    reg.set_tags(
        s.model_name, version, {TAG_STATUS: status, TAG_VERDICT: verdict, TAG_REASON: reason[:500]}
    )
    current = reg.get_by_alias(s.model_name, ALIAS_CANDIDATE)
    if current is not None and current.version == version:
        reg.delete_alias(s.model_name, ALIAS_CANDIDATE)
    record(
        s.audit_log, status, model=s.model_name, version=version, reason=reason, evidence=evidence
    )
    logger().info(
        "stage=decide model=%s version=%s decision=%s reason=%s",
        s.model_name,
        version,
        status,
        reason,
    )
