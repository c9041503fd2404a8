"""Stage 7–8: canary the candidate on the gateway, then promote or roll back.

A promotion moves the registry's aliases first, then switches the gateway (a registry-backed
gateway, as on Kubernetes, serves only what the aliases name). Both sit in one guard: if moving
the aliases fails, the gateway goes back to the deployment it had before the canary; if the
gateway then refuses, the alias move is undone as well. Registry and traffic never disagree
about who the champion is.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.canary import (
    CanaryPreempted,
    CanaryResult,
    LoadFn,
    ShadowPolicy,
    ShadowStats,
    StepRecord,
    UnattributedPolicy,
    another_trial_took_over,
    http_load,
    live_traffic,
    read_pods_shadow,
    read_shadow,
    run_canary,
    wait_for_turn,
)
from ballast.errors import BallastError, GatewayError
from ballast.gateway_client import GatewayClient, gateway_urls
from ballast.gateway_process import ensure_gateway
from ballast.judge import Judge, SequentialJudge, ThresholdJudge
from ballast.release import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    ALIAS_SHADOW,
    NO_LEASE,
    TAG_CANARY_WEIGHT,
    TAG_FAULT,
    TAG_LEASE,
    TAG_SHADOW_FRACTION,
    verify_version,
)
from ballast.serving import VersionSpec
from ballast.settings import Settings, get_settings
from model_registry import ModelVersionInfo, PromotionResult, Registry
from tasks.common import AuditedAdmin, idempotent_registry_task, logger, registry


@dataclass
class CanaryOutcome:
    decision: str  # promote | rollback
    reasons: list[str]
    champion: str | None  # the version it was judged against (None on a first release)
    seconds_to_decision: float
    steps: list[dict[str, Any]] = field(default_factory=list)
    evidence: dict[str, float] = field(default_factory=dict)
    # When its first turn sent the candidate traffic (epoch seconds): where a fault report
    # of the candidate's failures starts.
    started_at: float = 0.0


def version_spec(reg: Registry, s: Settings, info: ModelVersionInfo) -> VersionSpec:
    """Fetch a version's artefacts and verify its signed manifest before anything serves it.

    From a remote store the copy is kept under ``state_dir/versions`` (a file-backed gateway's
    desired state names it), fetched once; a copy that fails verification is removed."""
    cache = s.state_dir / "versions"
    local = Path(reg.local_copy(info.name, info.version, cache))
    try:
        verified = verify_version(
            local, info.tags, info.version, s.signing_key_path, model=info.name
        )
    except BallastError:
        if local.is_relative_to(cache):  # our copy, never the store's own folder
            shutil.rmtree(local, ignore_errors=True)  # the next try fetches it again
        raise
    return VersionSpec(
        version=info.version,
        artifact_path=verified.path,
        sha256=verified.sha256,
        backend=verified.backend,
        fault=info.tags.get(TAG_FAULT) or None,
    )


def _judge(s: Settings) -> Judge:
    """A fresh judge per canary: the sequential one keeps state across looks."""
    if s.judge_kind == "sequential":
        return SequentialJudge()
    return ThresholdJudge.from_settings(s)


def _shadow_reader(s: Settings, client: GatewayClient, shadow: str) -> Callable[[], ShadowStats]:
    """The shadow phase's look at version ``shadow``: every pod once where
    ``gateway_pods_host`` names them, else polls through the one gateway URL until no new
    replica turns up."""
    if s.gateway_pods_host is None:
        return lambda: read_shadow(client.shadow)
    token = s.admin_token()

    def fetch(url: str) -> dict[str, Any]:
        with GatewayClient(url, token) as gw:
            return gw.shadow()

    def read() -> ShadowStats:
        try:
            urls = gateway_urls(s)
        except GatewayError as exc:  # the pods' name did not resolve just now
            logger().warning("stage=canary shadow read through the gateway's Service: %s", exc)
            return read_shadow(client.shadow)
        return read_pods_shadow(urls, fetch, shadow=shadow)

    return read


def _load(s: Settings, candidate: str, rows: np.ndarray, labels: np.ndarray) -> LoadFn:
    """Real clients' traffic as the gateway saw it, or replayed held-out rows (opt-in for
    models with little traffic, and for the laptop demo, which has no users)."""
    if s.canary_traffic == "live":
        return live_traffic(
            s.gateway_url,
            s.admin_token(),
            candidate_version=candidate,
            min_samples=s.canary_min_samples,
            max_seconds=s.canary_step_max_seconds,
            # Every pod each poll (a headless Service), not one at random through the Service.
            pods=None if s.gateway_pods_host is None else partial(gateway_urls, s),
            model=s.model_name,
        )
    return http_load(
        s.gateway_url,
        s.model_name,
        rows,
        labels,
        candidate_version=candidate,
        min_samples=s.canary_min_samples,
        max_seconds=s.canary_step_max_seconds,
        concurrency=s.canary_concurrency,
    )


def _shadow_policy(s: Settings) -> ShadowPolicy | None:
    if not s.canary_shadow_seconds:
        return None
    return ShadowPolicy(
        seconds=s.canary_shadow_seconds,
        fraction=s.canary_shadow_fraction,
        max_disagreement=s.canary_shadow_max_disagreement,
        min_rows=s.canary_min_samples,
    )


def _step_dict(r: StepRecord) -> dict[str, Any]:
    return {
        "step": r.index,
        "weight": r.weight,
        "decision": r.verdict.decision,
        "seconds": round(r.seconds, 3),
        "baseline_n": r.baseline_n,
        "canary_n": r.canary_n,
        "reasons": list(r.verdict.reasons),
    }


@contextmanager
def promotion(reg: Registry, model: str, version: str) -> Iterator[PromotionResult]:
    """Move the aliases to make ``version`` the champion; undo the move if the block raises."""
    result = reg.promote(model, version)
    try:
        yield result
    except BaseException as exc:
        try:
            reg.undo(result)
        except Exception as undo_exc:
            exc.add_note(f"undoing the alias move failed too: {undo_exc!r}")
            logger().error("stage=canary promotion failed and undoing its alias move failed")
        raise


@contextmanager
def trial_aliases(reg: Registry, model: str, version: str, *, shadow: bool) -> Iterator[None]:
    """Point ``candidate`` (and ``shadow``, for a shadow phase) at the version on trial for
    the block; the ``shadow`` alias is removed after it.

    A registry-backed gateway serves only the versions the aliases name. A later run may have
    registered a newer candidate while this one waited for its turn, so the alias is pointed
    here now; any traffic share an earlier trial left on this version is cleared first, so
    pointing the alias here never brings that trial back.
    """
    # Looks and the writes they decide under the model's serving lock (not across the block:
    # the trial's own gateway changes take it too).
    with reg.serving_lock(model):
        trialled = reg.get_by_alias(model, ALIAS_CANDIDATE)
        if trialled is None or trialled.version != version:
            reg.set_tags(model, version, {TAG_CANARY_WEIGHT: "0", TAG_LEASE: NO_LEASE})
            reg.set_alias(model, ALIAS_CANDIDATE, version)
        if shadow:
            reg.set_tags(model, version, {TAG_SHADOW_FRACTION: "0"})
            reg.set_alias(model, ALIAS_SHADOW, version)
    if not shadow:
        yield
        return
    try:
        yield
    finally:
        try:
            with reg.serving_lock(model):
                current = reg.get_by_alias(model, ALIAS_SHADOW)
                if current is not None and current.version == version:
                    reg.delete_alias(model, ALIAS_SHADOW)
        except Exception as exc:  # the trial's own outcome stands; a stale alias is harmless
            logger().warning("stage=canary could not remove the shadow alias: %r", exc)


def _canary_once(
    s: Settings,
    reg: Registry,
    gw: AuditedAdmin,
    client: GatewayClient,
    candidate: ModelVersionInfo,
    cand_spec: VersionSpec,
    rows: np.ndarray,
    labels: np.ndarray,
) -> CanaryResult:
    """One canary of ``cand_spec`` against the champion the registry names now."""
    log = logger()
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    champ_spec = version_spec(reg, s, champion) if champion is not None else None
    shadowing = _shadow_policy(s) is not None and champ_spec is not None
    with trial_aliases(reg, s.model_name, candidate.version, shadow=shadowing):
        return run_canary(
            gw,
            model=s.model_name,
            champion=champ_spec,
            candidate=cand_spec,
            steps=s.canary_steps,
            judge=_judge(s),
            load=_load(s, cand_spec.version, rows, labels),
            min_samples=s.canary_min_samples,
            step_max_seconds=s.canary_step_max_seconds,
            lease_s=s.canary_lease_s or None,
            unattributed=UnattributedPolicy(max_share=s.canary_max_unattributed_share),
            shadow=_shadow_policy(s),
            shadow_reader=_shadow_reader(s, client, cand_spec.version),
            promote=partial(promotion, reg, s.model_name, candidate.version),
            on_step=lambda r: log.info(
                "stage=canary version=%s weight=%d decision=%s canary_n=%d t=%.1fs",
                cand_spec.version,
                r.weight,
                r.verdict.decision,
                r.canary_n,
                r.seconds,
            ),
        )


# How many times a release starts its canary when other releases' canaries keep taking the
# gateway first (each start waits up to BALLAST_CANARY_TURN_TIMEOUT_S for its turn).
CANARY_TURNS = 3


@idempotent_registry_task("fetch-candidate")
def fetch_candidate(candidate: ModelVersionInfo) -> VersionSpec:
    """The candidate's artefacts fetched and verified (:func:`version_spec`), before the canary."""
    s = get_settings()
    return version_spec(registry(s), s, candidate)


@task(name="canary", cache_policy=NO_CACHE)
def canary_release(
    candidate: ModelVersionInfo,
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    spec: VersionSpec | None = None,
) -> CanaryOutcome:
    """``spec``: the candidate as :func:`fetch_candidate` verified it (fetched here if None)."""
    s = get_settings()
    log = logger()
    reg = registry(s)
    cand_spec = spec if spec is not None else version_spec(reg, s, candidate)
    started = ensure_gateway(s)
    if started is not None:
        log.info("stage=canary started gateway pid=%s at %s", started.pid, s.gateway_url)
    with GatewayClient(s.gateway_url, s.admin_token()) as client:
        gw = AuditedAdmin(client, s.audit_log, why=f"canary of {cand_spec.version}")
        started_at = 0.0
        for turn in range(1, CANARY_TURNS + 1):
            # Another release's canary (the nightly run's, a person's) goes first: wait for it
            # to end, then judge against the champion it leaves.
            wait_for_turn(
                gw,
                s.canary_turn_timeout_s,
                on_wait=lambda live: log.info(
                    "stage=canary version=%s waiting for the trial in force to end",
                    cand_spec.version,
                ),
            )
            started_at = started_at or time.time()
            try:
                result = _canary_once(s, reg, gw, client, candidate, cand_spec, rows, labels)
                break
            except CanaryPreempted as exc:
                # Runs waiting for the same trial see it end within a poll of each other and
                # both go on; the one whose trial was overwritten, or whose first change lost
                # the race (412, nothing applied), waits for the other's turn to end and
                # starts again from a new look. A person's rollback mid-canary is an answer:
                # it stops here.
                if turn == CANARY_TURNS or not (
                    exc.raced or another_trial_took_over(exc, cand_spec.version, time.time())
                ):
                    raise
                log.warning(
                    "stage=canary version=%s another release's change took the gateway first "
                    "(%s); waiting for its turn to end, then starting again (turn %d of %d)",
                    cand_spec.version,
                    exc,
                    turn + 1,
                    CANARY_TURNS,
                )
    return CanaryOutcome(
        decision=result.decision,
        reasons=list(result.reasons),
        champion=result.champion,
        seconds_to_decision=result.seconds_to_decision,
        steps=[_step_dict(r) for r in result.steps],
        evidence=dict(result.evidence),
        started_at=started_at,
    )
