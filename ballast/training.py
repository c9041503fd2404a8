"""Training and evaluation of a model from the spec registry (PyTorch; CUDA when present, else CPU).

- Models come from :mod:`ballast.models` by name (``tabular-mlp``, ``small-cnn``); normalisation
  lives inside the model as buffers, so the exported artefact takes raw feature rows.
- Three disjoint, stratified, seeded parts: the held-out test rows (final evaluation only), a
  validation part carved from the training rows (per-epoch metric, early stopping, best-epoch
  choice) and the rows the model is fitted on (they also give the normalisation statistics).
- On CUDA: bf16 autocast, and ``torch.compile`` when asked. On CPU the same seed and data give
  bit-identical weights.
- With a checkpoint folder, every epoch is checkpointed atomically (model, optimiser, RNG states,
  epoch, best metric and weights, history). A run started again with the same configuration
  (dataset sha256 + hyperparameters + seed) resumes after the last checkpointed epoch; since the
  RNG states are restored, a resumed CPU run ends with the same weights as an uninterrupted one.

Nothing here imports pydantic, Prefect or MLflow (``benchmarks/gpu_check.py`` runs this module on a
machine with only torch, numpy, pandas and scikit-learn).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ballast.checkpoint import CheckpointStore, config_key
from ballast.data import ValidatedDataset
from ballast.errors import TrainingError
from ballast.models import TABULAR_MLP, get_spec, params_as_dict

if TYPE_CHECKING:  # torch is imported lazily (3 s) so the CLI starts fast
    import torch

log = logging.getLogger(__name__)


class RankGroup(Protocol):
    """The hooks data-parallel training needs (one process per rank; see ballast.ddp_worker).

    ``train`` without one is today's single-process loop, unchanged.
    """

    rank: int
    world_size: int

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """The module to run the training forward pass through (DistributedDataParallel)."""
        ...

    def all_sum(self, value: float) -> float:
        """``value`` summed over every rank, on every rank."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable), on every rank."""
        ...


@dataclass(frozen=True)
class Split:
    """The three parts of a dataset. ``x_train`` is what the model is fitted on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray  # held out: final evaluation only, never seen while training
    y_test: np.ndarray
    x_val: np.ndarray  # carved from the training part: early stopping and best-epoch choice
    y_val: np.ndarray


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's batches, weighted by batch size
    val_loss: float
    val_accuracy: float


@dataclass(frozen=True)
class TrainResult:
    model: Any  # torch.nn.Module on CPU, eval mode, with the best epoch's weights
    metrics: dict[str, float]
    params: dict[str, str]
    device: str
    seconds: float
    split: Split
    history: tuple[EpochRecord, ...] = ()
    model_name: str = TABULAR_MLP
    #: The checkpointed epoch this run continued from (None: started from scratch).
    resumed_from_epoch: int | None = None
    stopped_early: bool = False
    best_epoch: int = 0
    checkpoint_key: str = ""

    def metric_history(self) -> dict[str, list[tuple[int, float]]]:
        """Per-epoch metrics as ``{name: [(epoch, value), ...]}`` (steps for the tracking store).

        Named ``epoch_*`` so they never collide with the final metrics (``val_loss`` there is the
        best epoch's, not the last one's).
        """
        return {
            "epoch_train_loss": [(r.epoch, r.train_loss) for r in self.history],
            "epoch_val_loss": [(r.epoch, r.val_loss) for r in self.history],
            "epoch_val_accuracy": [(r.epoch, r.val_accuracy) for r in self.history],
        }


def _stratified(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    try:
        x_a, x_b, y_a, y_b = train_test_split(
            x, y, test_size=fraction, random_state=seed, stratify=y
        )
    except ValueError as exc:  # e.g. a class with a single row cannot be stratified
        raise TrainingError(f"cannot carve the {what} split: {exc}") from exc
    return x_a, x_b, y_a, y_b


def class_count(ds: ValidatedDataset) -> int:
    """The model's output classes: as many as the dataset's spec declares (a sample missing its
    last class must not make a narrower model, serving another shape than the champion), else
    as many as the labels show. Labels outside them are refused here, not mid-epoch."""
    labels = ds.labels
    n = ds.n_classes if ds.n_classes is not None else int(max(labels.max(), 1)) + 1
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise TrainingError(
            f"labels must be classes 0..{n - 1}, got {int(labels.min())}..{int(labels.max())}"
        )
    return n


@functools.cache
def training_code_identity() -> str:
    """A hash of the code that decides what training produces: this module, the model
    definitions, the checkpoint format, and torch's version. Part of the checkpoint key."""
    import torch

    from ballast import checkpoint, models

    digest = hashlib.sha256(torch.__version__.encode())
    for module in (sys.modules[__name__], models, checkpoint):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def split_dataset(
    ds: ValidatedDataset, *, test_fraction: float, seed: int, val_fraction: float = 0.15
) -> Split:
    """Stratified, seeded split: the test part first, then validation out of the rest.

    ``val_fraction`` is a share of the training part. Same seed and data give the same split.
    """
    if not 0 < test_fraction < 1:
        raise TrainingError(f"test_fraction must be within (0, 1), got {test_fraction}")
    if not 0 < val_fraction < 0.5:
        raise TrainingError(f"val_fraction must be within (0, 0.5), got {val_fraction}")
    x_tr, x_te, y_tr, y_te = _stratified(ds.features, ds.labels, test_fraction, seed, "test")
    x_fit, x_val, y_fit, y_val = _stratified(x_tr, y_tr, val_fraction, seed, "validation")
    return Split(x_fit, y_fit, x_te, y_te, x_val, y_val)


def select_device(preference: str) -> str:
    import torch

    if preference not in ("auto", "cpu", "cuda"):
        raise TrainingError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but no CUDA device is available")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def evaluate(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, log-loss and ROC AUC (one-vs-rest macro for more than two classes), fp32.

    Runs on the model's device; AUC is NaN when the rows miss a class.
    """
    import torch
    from sklearn.metrics import roc_auc_score

    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(x, dtype=torch.float32, device=device)).float()
            target = torch.as_tensor(y, dtype=torch.int64, device=device)
            loss = torch.nn.functional.cross_entropy(logits, target).item()
            prob = torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64)
    finally:
        model.train(was_training)
    pred = prob.argmax(axis=1)
    n_classes = prob.shape[1]
    present = set(np.unique(y).tolist())
    auc = float("nan")
    if n_classes == 2 and present == {0, 1}:
        auc = float(roc_auc_score(y, prob[:, 1]))
    elif n_classes > 2 and present == set(range(n_classes)):
        prob /= prob.sum(axis=1, keepdims=True)  # float rounding: sklearn wants rows summing to 1
        auc = float(roc_auc_score(y, prob, multi_class="ovr", labels=list(range(n_classes))))
    return {"accuracy": float((pred == y).mean()), "log_loss": float(loss), "roc_auc": auc}


def corrupt_weights(model: Any, seed: int) -> None:
    """Fault injection for demos and tests: swap the output layer's class rows (a label mix-up, the
    classic bad-weights bug), then add seeded noise so it is not an exact mirror image."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.copy_(last.weight.flip(0))
        last.bias.copy_(last.bias.flip(0))
        last.weight.add_(0.01 * torch.randn(last.weight.shape, generator=gen))


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def train(
    ds: ValidatedDataset,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    model: str = TABULAR_MLP,
    hidden: int | None = None,
    model_params: Mapping[str, Any] | None = None,
    device: str = "auto",
    test_fraction: float = 0.25,
    val_fraction: float = 0.15,
    patience: int | None = 10,
    min_delta: float = 0.0,
    torch_compile: bool = False,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    ranks: RankGroup | None = None,
) -> TrainResult:
    """Train ``model`` with Adam; returns the best epoch's weights (lowest validation loss).

    ``hidden`` is a shortcut for ``model_params={"hidden": ...}``. ``patience`` epochs without a
    validation-loss improvement larger than ``min_delta`` stop the run (None: never stop early).
    ``torch_compile`` compiles the training forward pass on CUDA (ignored on CPU, where it is
    slower than eager for models this small). ``checkpoint_dir`` enables per-epoch checkpoints
    and resuming (see the module docstring).

    ``ranks`` trains data-parallel: every rank takes its share of each (global, ``batch_size``-row)
    batch and gradients are averaged, so steps and effective batch match a single process; only
    rank 0 reads and writes checkpoints (the state it resumes from is broadcast to the others).
    """
    import torch

    started = time.perf_counter()
    if epochs < 1:
        raise TrainingError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise TrainingError(f"learning_rate must be a positive number, got {learning_rate}")
    if patience is not None and patience < 1:
        raise TrainingError(f"patience must be >= 1 or None, got {patience}")
    if not (min_delta >= 0 and math.isfinite(min_delta)):
        raise TrainingError(f"min_delta must be a finite number >= 0, got {min_delta}")
    spec = get_spec(model)
    overrides = dict(model_params or {})
    if hidden is not None:
        overrides.setdefault("hidden", hidden)
    hp = spec.params(overrides)
    dev = select_device(device)
    split = split_dataset(ds, test_fraction=test_fraction, seed=seed, val_fraction=val_fraction)
    use_bf16 = dev == "cuda" and torch.cuda.is_bf16_supported()
    use_compile = torch_compile and dev == "cuda"
    hyper: dict[str, Any] = {
        "model": spec.name,
        **params_as_dict(hp),
        "epochs": epochs,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "patience": patience,
        "min_delta": min_delta,
        "bf16": use_bf16,
        "torch_compile": use_compile,
    }
    if ranks is not None:  # a checkpoint resumes only under the world size that wrote it
        hyper["world_size"] = ranks.world_size
    # The code too: a checkpoint written by other training code (another activation, loss or
    # normalisation with the same shapes) would resume, train 0 epochs and be released as this
    # code's model.
    key = config_key(
        dataset_sha256=ds.sha256,
        hyperparameters={**hyper, "training_code": training_code_identity()},
        seed=seed,
    )

    torch.manual_seed(seed)
    n_classes = class_count(ds)
    net = spec.build(
        hp,
        n_features=ds.features.shape[1],
        n_classes=n_classes,
        mean=split.x_train.mean(axis=0),
        std=split.x_train.std(axis=0),
    ).to(dev)
    fit_net = ranks.wrap(net) if ranks is not None else net
    forward: Callable[[torch.Tensor], torch.Tensor] = (
        torch.compile(fit_net) if use_compile else fit_net
    )
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    x = torch.as_tensor(split.x_train, dtype=torch.float32, device=dev)
    y = torch.as_tensor(split.y_train, dtype=torch.int64, device=dev)
    gen = torch.Generator().manual_seed(seed)  # the shuffle order; checkpointed with the rest

    history: list[EpochRecord] = []
    best_val, best_epoch, bad_epochs, stopped = math.inf, 0, 0, False
    best_state = _cpu_state(net)
    resumed_from: int | None = None
    writes = checkpoint_dir is not None and (ranks is None or ranks.rank == 0)
    store = CheckpointStore(Path(checkpoint_dir), key) if writes and checkpoint_dir else None
    ckpt = store.latest() if store is not None else None
    if ranks is not None and checkpoint_dir is not None:
        ckpt = ranks.broadcast(ckpt)  # rank 0's checkpoint: other nodes need no shared disk
    if ckpt is not None:
        st = ckpt.state
        try:
            net.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            gen.set_state(st["rng"]["shuffle"])
            torch.set_rng_state(st["rng"]["torch"])
            if dev == "cuda" and st["rng"].get("cuda"):
                torch.cuda.set_rng_state_all(st["rng"]["cuda"])
            best_state = st["best_model"]
            best_val, best_epoch = float(st["best_val_loss"]), int(st["best_epoch"])
            bad_epochs, stopped = int(st["bad_epochs"]), bool(st["stopped"])
            history = [EpochRecord(int(e), tl, vl, va) for e, tl, vl, va in st["history"]]
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            # Same configuration, different code (a changed architecture, say): never guess.
            detail = " ".join(str(exc).split())[:300]
            raise TrainingError(
                f"checkpoint {ckpt.path} does not fit this model and trainer "
                f"({type(exc).__name__}: {detail}); remove {ckpt.path.parent} to start over"
            ) from exc
        resumed_from = ckpt.epoch
        log.info("resuming %s from epoch %d (%s)", spec.name, ckpt.epoch, ckpt.path)

    first = (resumed_from or 0) + 1
    for epoch in range(first, epochs + 1):
        if stopped:
            break
        net.train()
        order = torch.randperm(len(x), generator=gen).to(dev)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=use_bf16):
                if ranks is None:
                    loss = torch.nn.functional.cross_entropy(forward(x[idx]), y[idx])
                else:
                    # This rank's share of the batch, summed and scaled so that DDP's average
                    # over ranks is the mean over the whole batch (an empty share adds 0).
                    part = idx[ranks.rank :: ranks.world_size]
                    loss = torch.nn.functional.cross_entropy(
                        forward(x[part]), y[part], reduction="sum"
                    ) * (ranks.world_size / len(idx))
            loss.backward()
            opt.step()
            if ranks is None:
                total += float(loss.detach()) * len(idx)
            else:
                total += float(loss.detach()) * len(idx) / ranks.world_size
        if ranks is not None:
            total = ranks.all_sum(total)
        train_loss = total / len(x)
        if not math.isfinite(train_loss):
            raise TrainingError(f"training diverged at epoch {epoch} (loss {train_loss})")
        val = evaluate(net, split.x_val, split.y_val)
        record = EpochRecord(epoch, train_loss, val["log_loss"], val["accuracy"])
        history.append(record)
        if record.val_loss < best_val - min_delta:
            best_val, best_epoch, bad_epochs = record.val_loss, epoch, 0
            best_state = _cpu_state(net)
        else:
            bad_epochs += 1
        stopped = patience is not None and bad_epochs >= patience
        if ranks is not None:
            stopped = bool(ranks.broadcast(stopped))  # every rank stops at the same epoch
        if store is not None:
            store.save(
                epoch,
                {
                    "model": _cpu_state(net),
                    "optimizer": opt.state_dict(),
                    "rng": {
                        "shuffle": gen.get_state(),
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if dev == "cuda" else [],
                    },
                    "best_model": best_state,
                    "best_val_loss": best_val,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped": stopped,
                    "history": [
                        [r.epoch, r.train_loss, r.val_loss, r.val_accuracy] for r in history
                    ],
                },
            )
        log.debug(
            "epoch=%d train_loss=%.5f val_loss=%.5f val_accuracy=%.4f",
            epoch,
            train_loss,
            record.val_loss,
            record.val_accuracy,
        )
        if on_epoch is not None:
            on_epoch(record)

    if best_epoch == 0:
        # best_state is still the untrained initial model: never return it as a result.
        raise TrainingError(
            f"no epoch produced a finite validation loss in {len(history)} epoch(s) "
            f"(last: {history[-1].val_loss if history else 'none'})"
        )
    net.load_state_dict(best_state)
    net = net.to("cpu").eval()
    metrics = evaluate(net, split.x_test, split.y_test)
    last = history[-1]
    best = next(r for r in history if r.epoch == best_epoch)
    metrics.update(
        {
            "train_loss": last.train_loss,
            "val_loss": best.val_loss,
            "val_accuracy": best.val_accuracy,
            "best_epoch": float(best_epoch),
            "epochs_run": float(len(history)),
        }
    )
    params = {
        **{k: str(v) for k, v in hyper.items()},
        "seed": str(seed),
        "device": dev,
        "n_train": str(len(split.y_train)),
        "n_val": str(len(split.y_val)),
        "n_test": str(len(split.y_test)),
        "checkpoint_key": key,
    }
    return TrainResult(
        model=net,
        metrics=metrics,
        params=params,
        device=dev,
        seconds=time.perf_counter() - started,
        split=split,
        history=tuple(history),
        model_name=spec.name,
        resumed_from_epoch=resumed_from,
        stopped_early=stopped and len(history) < epochs,
        best_epoch=best_epoch,
        checkpoint_key=key,
    )
