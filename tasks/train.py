"""Stage 3: train and evaluate on the held-out split."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.data import ValidatedDataset
from ballast.serving import Fault
from ballast.settings import get_settings
from ballast.training import TrainResult, corrupt_weights, evaluate, train
from tasks.common import logger


@task(name="train", cache_policy=NO_CACHE)
def train_model(ds: ValidatedDataset, inject_fault: Fault | None = None) -> TrainResult:
    s = get_settings()
    log = logger()
    result = train(
        ds,
        hidden=s.hidden,
        epochs=s.epochs,
        learning_rate=s.learning_rate,
        batch_size=s.batch_size,
        seed=s.seed,
        device=s.device,
        test_fraction=s.test_fraction,
        on_epoch=lambda e, loss: log.debug("epoch=%d loss=%.5f", e, loss),
    )
    if inject_fault == "bad-weights":
        # Deliberately broken candidate: evaluated after corruption, so every number is honest.
        corrupt_weights(result.model, s.seed)
        result.metrics.update(evaluate(result.model, result.split.x_test, result.split.y_test))
        result.params["fault_injection"] = "bad-weights"
    log.info(
        "stage=train device=%s seconds=%.1f accuracy=%.4f roc_auc=%.4f",
        result.device,
        result.seconds,
        result.metrics["accuracy"],
        result.metrics["roc_auc"],
    )
    return result
