"""Stage 3: train and evaluate on the held-out split; then the quality gate against the champion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.data import ValidatedDataset
from ballast.distributed import Topology, resolve_world_size, train_data_parallel
from ballast.errors import QualityGateFailed
from ballast.quality import ChampionMetric, QualityDecision, QualityPolicy, judge_quality
from ballast.serving import Fault
from ballast.settings import Settings, get_settings
from ballast.training import EpochRecord, TrainResult, corrupt_weights, evaluate, train
from model_registry import CHAMPION, Registry
from tasks.common import logger, registry

#: Version tag the register stage writes with the held-out accuracy (fallback source).
TAG_PREFIX = "ballast."


@task(name="train", cache_policy=NO_CACHE)
def train_model(
    ds: ValidatedDataset,
    inject_fault: Fault | None = None,
    model: str | None = None,
    model_params: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` (a name in :mod:`ballast.models`) with checkpoints in ``state_dir``.

    A retried or restarted run with the same data and configuration resumes from its last
    checkpoint (``TrainResult.resumed_from_epoch``) instead of starting over.

    With ``BALLAST_TRAIN_WORLD_SIZE`` above 1 (or several nodes) training runs data-parallel under
    torchrun (:mod:`ballast.distributed`): rank output is streamed into this task's log, and a
    failed or timed-out rank fails the task after every rank was stopped.
    """
    s = get_settings()
    log = logger()

    def on_epoch(r: EpochRecord) -> None:
        log.debug(
            "epoch=%d train_loss=%.5f val_loss=%.5f val_accuracy=%.4f",
            r.epoch,
            r.train_loss,
            r.val_loss,
            r.val_accuracy,
        )

    topology = _topology(s)
    if topology.distributed:
        log.info(
            "stage=train launcher=torchrun nproc_per_node=%d nnodes=%d world_size=%d",
            topology.nproc_per_node,
            topology.nnodes,
            topology.world_size,
        )
        result = train_data_parallel(
            ds,
            topology=topology,
            work_dir=s.state_dir / "ddp",
            model=model or s.model_spec,
            model_params=model_params,
            hidden=s.hidden,
            epochs=s.epochs,
            learning_rate=s.learning_rate,
            batch_size=s.batch_size,
            seed=s.seed,
            device=_resolved_device(s.device),
            test_fraction=s.test_fraction,
            val_fraction=s.val_fraction,
            patience=s.patience,
            torch_compile=s.torch_compile,
            checkpoint_dir=s.state_dir / "checkpoints",
            timeout_s=s.train_timeout_s,
            pause_after_epoch_s=s.train_pause_after_epoch_s,
            on_line=lambda line: log.info("stage=train torchrun: %s", line),
        )
    else:
        result = train(
            ds,
            model=model or s.model_spec,
            model_params=model_params,
            hidden=s.hidden,  # model_params' own hidden, when given, wins
            epochs=s.epochs,
            learning_rate=s.learning_rate,
            batch_size=s.batch_size,
            seed=s.seed,
            device=s.device,
            test_fraction=s.test_fraction,
            val_fraction=s.val_fraction,
            patience=s.patience,
            torch_compile=s.torch_compile,
            checkpoint_dir=s.state_dir / "checkpoints",
            on_epoch=on_epoch,
        )
    if inject_fault == "bad-weights":
        # Deliberately broken candidate: evaluated after corruption, so every number is honest.
        corrupt_weights(result.model, s.seed)
        result.metrics.update(evaluate(result.model, result.split.x_test, result.split.y_test))
        # The training-time numbers too: any of them may be the quality gate's metric, and
        # left as they were they would vouch for the model before it was broken.
        val = evaluate(result.model, result.split.x_val, result.split.y_val)
        fit = evaluate(result.model, result.split.x_train, result.split.y_train)
        result.metrics.update(
            val_loss=val["log_loss"], val_accuracy=val["accuracy"], train_loss=fit["log_loss"]
        )
        result.params["fault_injection"] = "bad-weights"
    log.info(
        "stage=train model=%s device=%s seconds=%.1f epochs=%d best_epoch=%d resumed_from=%s "
        "accuracy=%.4f roc_auc=%.4f",
        result.model_name,
        result.device,
        result.seconds,
        len(result.history),
        result.best_epoch,
        result.resumed_from_epoch,
        result.metrics["accuracy"],
        result.metrics["roc_auc"],
    )
    return result


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _resolved_device(preference: str) -> str:
    return "cuda" if preference == "cuda" or (preference == "auto" and _visible_gpus()) else "cpu"


def _topology(s: Settings) -> Topology:
    """Processes per node from the settings (the default, 1 on one node, is not distributed)."""
    nproc = 1  # as before: train() itself checks the device
    if s.train_world_size != "1":
        nproc = resolve_world_size(
            s.train_world_size, device=s.device, visible_gpus=_visible_gpus()
        )
    return Topology(
        nproc_per_node=nproc,
        nnodes=s.train_nnodes,
        rdzv_endpoint=s.train_rdzv_endpoint,
        rdzv_id=s.train_rdzv_id,
    )


def champion_metric(reg: Registry, model_name: str, metric: str) -> ChampionMetric | None:
    """The champion's recorded held-out ``metric``: its run's metric, else its ``ballast.<metric>``
    version tag; None when there is no champion."""
    champ = reg.get_by_alias(model_name, CHAMPION)
    if champ is None:
        return None
    value = reg.version_metrics(model_name, champ.version).get(metric)
    if value is not None:
        return ChampionMetric(champ.version, value, f"run metric {metric}")
    tag = TAG_PREFIX + metric
    raw = champ.tags.get(tag)
    try:
        parsed = float(raw) if raw is not None else None
    except ValueError:
        parsed = None
    source = f"tag {tag}" if raw is not None else f"no run metric {metric} and no tag {tag}"
    return ChampionMetric(champ.version, parsed, source)


@task(name="quality-gate", cache_policy=NO_CACHE)
def quality_gate(trained: TrainResult, policy: QualityPolicy | None = None) -> QualityDecision:
    """Stop the release before compile when the candidate is worse than the champion beyond
    tolerance (or below the floor): raises :class:`QualityGateFailed` with the decision."""
    s = get_settings()
    # The metric's direction comes from ballast.quality.METRICS (a loss: lower is better).
    policy = policy or s.quality_policy()
    if policy.metric not in trained.metrics:
        raise QualityGateFailed(
            f"the candidate has no {policy.metric!r} metric; it has {sorted(trained.metrics)}"
        )
    champion = champion_metric(registry(s), s.model_name, policy.metric)
    decision = judge_quality(float(trained.metrics[policy.metric]), champion, policy)
    logger().info(
        "stage=quality passed=%s %s=%.4f champion=%s %s",
        decision.passed,
        policy.metric,
        decision.candidate,
        decision.champion_version,
        "; ".join(decision.reasons),
    )
    if not decision.passed:
        raise QualityGateFailed("; ".join(decision.reasons), decision)
    return decision
