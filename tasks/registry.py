"""Stage 5 and 8: register the candidate (signed, hashed, tagged) and move aliases.

Registration is idempotent: a release with the same content key (data, hyperparameters, seed,
code, compile backend, fault; :func:`ballast.release.content_key`) reuses the version already
registered, and so does a retried or resumed run (tag ``ballast.flow_run_id``). Nothing creates a
second version of the same release.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.audit import find, record
from ballast.compile import CompiledArtifact
from ballast.data import ValidatedDataset
from ballast.errors import IntegrityError
from ballast.keys import provider_from_settings
from ballast.manifest import build_manifest, code_identity, sign_manifest
from ballast.release import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    ALIAS_PREVIOUS,
    ALIAS_SHADOW,
    TAG_APPROVAL,
    TAG_ARTIFACT,
    TAG_ARTIFACT_SHA,
    TAG_BACKEND,
    TAG_CODE,
    TAG_CONTENT_KEY,
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
    content_key,
    holds_trial,
)
from ballast.serving import Fault
from ballast.settings import get_settings
from ballast.training import TrainResult
from model_registry import ApprovalRecord, ModelVersionInfo, Registry
from tasks.common import idempotent_registry_task, logger, registry, retry_registry_hiccups


def stage_artifacts(
    out_dir: Path,
    ds: ValidatedDataset,
    trained: TrainResult,
    compiled: CompiledArtifact,
    *,
    key: str | None = None,
    code: str | None = None,
) -> Path:
    """Lay out what gets registered: compiled artefact and the files it needs beside it (e.g.
    TensorRT's sidecar), ONNX, eager weights, signed manifest."""
    import torch

    s = get_settings()
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in {compiled.path, compiled.onnx_path, *compiled.companions}:
        if src.parent.resolve() != out_dir.resolve():
            shutil.copy2(src, out_dir / src.name)
    torch.save(trained.model.state_dict(), out_dir / "state_dict.pt")
    # A metric the hold-out cannot define (ROC AUC when it holds one class: NaN) is left out;
    # a signed manifest holds only numbers.
    metrics = {
        k: v for k, v in {**trained.metrics, **compiled.metrics()}.items() if math.isfinite(v)
    }
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
        git_commit=code,
        dataset_ciphertext_sha256=ds.ciphertext_sha256,
        validation_artifact_id=ds.validation_artifact_id,
        content_key=key,
    )
    # The manifest hashes the staged bytes; the tags carry the hashes taken at compile, where
    # parity was checked. Bytes changed in between (a build folder rewritten) must not be
    # signed and registered as the artefact that passed.
    for path, compiled_sha in (
        (compiled.path, compiled.sha256),
        (compiled.onnx_path, compiled.onnx_sha256),
    ):
        staged = manifest.file(path.name).sha256
        if staged != compiled_sha:
            raise IntegrityError(
                f"{path.name} changed between compile and registration: sha256 {staged[:12]} "
                f"staged, {compiled_sha[:12]} compiled and checked for parity; nothing registered",
                stage="register",
            )
    # The signing key is wrapped by the same key provider as the data (keyring or KMS).
    sign_manifest(manifest, s.signing_key_path, provider_from_settings(s)).write(out_dir)
    return out_dir


@task(
    name="register-candidate",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 3],
    retry_condition_fn=retry_registry_hiccups,
)
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
    code = code_identity()
    key = content_key(
        training_key=trained.checkpoint_key,
        code=code,
        backend=compiled.backend,
        precision=compiled.precision,
        fault=inject_fault,
    )
    for tag, value, why in (
        (TAG_FLOW_RUN, flow_run_id, "by this run"),
        (TAG_CONTENT_KEY, key, "for the same data, code and parameters"),
    ):
        existing = reg.find_by_tag(s.model_name, tag, value)
        if existing:
            logger().info(
                "stage=register version=%s already registered %s", existing[0].version, why
            )
            # A retry after a failure past register_version lands here: finish what is missing
            # (the duplicate check included, when that is what failed; a version found by its
            # content key is the first of its release already: oldest first).
            kept = existing[0]
            if tag == TAG_FLOW_RUN:
                kept = _keep_first(reg, s.model_name, kept, key, flow_run_id, s.audit_log)
            return _finish_registration(reg, s.model_name, kept, s.audit_log)
    artifact_dir = stage_artifacts(staging_dir, ds, trained, compiled, key=key, code=code)
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
        TAG_CONTENT_KEY: key,
        TAG_CODE: code or "unknown",
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
    kept = _keep_first(reg, s.model_name, info, key, flow_run_id, s.audit_log)
    # The tags are this version's: another kept version's are read back from the registry.
    own_tags = tags if kept is info else None
    return _finish_registration(reg, s.model_name, kept, s.audit_log, tags=own_tags)


def _keep_first(
    reg: Registry, model: str, info: ModelVersionInfo, key: str, flow_run_id: str, audit_log: Path
) -> ModelVersionInfo:
    """The version of this release to go on with: the first one registered.

    Two runs of the same release may both have found nothing and registered one each (MLflow
    has no unique tags to stop them). Version numbers only grow, so whichever run registered
    second sees both versions afterwards: the first one is the release, and ``info``, if later
    and not yet pointed at by any alias, is discarded. A retry of a run whose discard failed
    comes back here and finishes it.
    """
    twins = reg.find_by_tag(model, TAG_CONTENT_KEY, key)
    first = min([info, *twins], key=lambda v: int(v.version))
    if first.version == info.version:
        return info
    if info.aliases:  # finished by an earlier attempt: in use, never dropped now
        logger().warning(
            "stage=register version=%s and %s are the same release; keeping %s (it holds %s)",
            first.version,
            info.version,
            info.version,
            info.aliases,
        )
        return info
    reg.discard_version(model, info)
    record(
        audit_log,
        "register_duplicate_dropped",
        model=model,
        version=info.version,
        kept=first.version,
        flow_run_id=flow_run_id,
    )
    logger().info(
        "stage=register version=%s dropped: version %s is the same release, registered by "
        "another run at the same time",
        info.version,
        first.version,
    )
    return first


def _finish_registration(
    reg: Registry,
    model: str,
    info: ModelVersionInfo,
    audit_log: Path,
    *,
    tags: Mapping[str, str] | None = None,
) -> ModelVersionInfo:
    """What follows ``register_version``: a pending approval record, the ``candidate`` alias and
    the ``register`` audit entry. Each step is done only if it is missing, so a Prefect retry (or
    a later run reusing the version) completes a registration that failed halfway and repeats
    nothing; a version that was already decided keeps its record and aliases."""
    version = info.version
    approval = reg.get_approval(model, version)
    if approval is None:
        approval = ApprovalRecord(
            status="pending", by="", at=datetime.now(UTC), reason="awaiting approval"
        )
        reg.set_approval(model, version, approval)
    if _undecided(info, approval) and ALIAS_CANDIDATE not in info.aliases:
        # Under the serving lock: a trial that starts (its lease written by a gateway) cannot
        # land between this look and the alias move.
        with reg.serving_lock(model):
            current = reg.get_by_alias(model, ALIAS_CANDIDATE)
            shadow = reg.get_by_alias(model, ALIAS_SHADOW)
            on_trial = current is not None and (
                holds_trial(current.tags, time.time())
                # A canary with a shadow phase names its version shadow for the whole trial.
                or (shadow is not None and shadow.version == current.version)
            )
            if not on_trial:
                reg.set_alias(model, ALIAS_CANDIDATE, version)
            # else another run's canary holds the alias (a registry-backed gateway would drop
            # its trial at once); this version's canary points it here when its turn comes.
    if not _register_recorded(audit_log, model, info):
        if tags is None:  # the tags it was registered with (the approval record came after)
            tags = {
                k: v
                for k, v in info.tags.items()
                if k != TAG_APPROVAL and not k.startswith(f"{TAG_APPROVAL}.")
            }
        record(audit_log, "register", model=model, version=version, tags=dict(tags))
    final = reg.get_version(model, version)
    logger().info(
        "stage=register model=%s version=%s aliases=%s",
        model,
        version,
        ",".join(final.aliases) or "-",
    )
    return final


def _undecided(info: ModelVersionInfo, approval: ApprovalRecord) -> bool:
    """Still a candidate: no verdict, status not moved on, not (once) champion, not rejected.
    Re-marking a decided version ``candidate`` would offer it for release again."""
    return (
        not info.tags.get(TAG_VERDICT)
        and info.tags.get(TAG_STATUS, "candidate") == "candidate"
        and ALIAS_CHAMPION not in info.aliases
        and ALIAS_PREVIOUS not in info.aliases
        and approval.status != "rejected"
    )


def _register_recorded(audit_log: Path, model: str, info: ModelVersionInfo) -> bool:
    """Whether the audit log already holds this version's ``register`` entry. Matched on the
    registering flow run too, so an entry left by an older store's version of the same number
    (registry wiped, audit log kept) does not count."""
    run = info.tags.get(TAG_FLOW_RUN)
    for entry in find(audit_log, "register", model=model, version=info.version):
        recorded = entry.get("tags")
        if run is None or (isinstance(recorded, dict) and recorded.get(TAG_FLOW_RUN) == run):
            return True
    return False


# Both run after the canary moved traffic: a registry hiccup must not leave the version
# unrecorded (a rolled-back candidate still tagged "candidate" is offered again). Idempotent,
# so retried: tags set again, the candidate alias removed only while it names this version.
@idempotent_registry_task("record-promotion")
def record_promotion(version: str, evidence: dict[str, object]) -> None:
    """Tag and audit a promotion (the alias move itself happened with the traffic switch)."""
    s = get_settings()
    reg = registry(s)
    reg.set_tags(s.model_name, version, {TAG_STATUS: "champion", TAG_VERDICT: "promote"})
    _record_once(s.audit_log, "promote", model=s.model_name, version=version, evidence=evidence)
    logger().info("stage=decide model=%s version=%s decision=promote", s.model_name, version)


def _record_once(audit_log: Path, action: str, *, model: str, version: str, **detail: Any) -> None:
    """Audit once per task run: a retry after the entry was written (its fsync failed, say)
    must not write it twice. The task run's id is kept in the entry; outside Prefect (``.fn()``)
    there is none, and every call records."""
    from prefect.runtime import task_run

    run_id = task_run.get_id()
    if run_id is not None and any(
        e.get("task_run") == str(run_id)
        for e in find(audit_log, action, model=model, version=version)
    ):
        return
    extra = {} if run_id is None else {"task_run": str(run_id)}
    record(audit_log, action, model=model, version=version, **detail, **extra)


@idempotent_registry_task("reject-candidate")
def close_candidate(
    version: str, *, status: str, verdict: str, reason: str, evidence: dict[str, object]
) -> None:
    """A candidate that will not serve: tag it, drop the candidate alias, never touch champion."""
    s = get_settings()
    reg = registry(s)
    reg.set_tags(
        s.model_name, version, {TAG_STATUS: status, TAG_VERDICT: verdict, TAG_REASON: reason[:500]}
    )
    with reg.serving_lock(s.model_name):
        current = reg.get_by_alias(s.model_name, ALIAS_CANDIDATE)
        if current is not None and current.version == version:
            reg.delete_alias(s.model_name, ALIAS_CANDIDATE)
    _record_once(
        s.audit_log, status, model=s.model_name, version=version, reason=reason, evidence=evidence
    )
    logger().info(
        "stage=decide model=%s version=%s decision=%s reason=%s",
        s.model_name,
        version,
        status,
        reason,
    )
