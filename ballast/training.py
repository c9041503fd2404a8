"""Training and evaluation of the tabular classifier (PyTorch; CUDA when present, CPU otherwise).

Input normalisation lives inside the model as buffers, so the exported artefact takes raw
feature rows and serving needs no preprocessing code that could drift from training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ballast.data import ValidatedDataset
from ballast.errors import TrainingError

if TYPE_CHECKING:  # torch is imported lazily (3 s) so the CLI starts fast
    import torch


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class TrainResult:
    model: Any  # torch.nn.Module on CPU, eval mode
    metrics: dict[str, float]
    params: dict[str, str]
    device: str
    seconds: float
    split: Split


def split_dataset(ds: ValidatedDataset, *, test_fraction: float, seed: int) -> Split:
    """Stratified, seeded hold-out split: same seed and data give the same split."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(
        ds.features, ds.labels, test_size=test_fraction, random_state=seed, stratify=ds.labels
    )
    return Split(x_tr, y_tr, x_te, y_te)


def select_device(preference: str) -> str:
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but no CUDA device is available")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def build_mlp(
    n_features: int, hidden: int, n_classes: int, mean: np.ndarray, std: np.ndarray
) -> Any:
    import torch
    from torch import nn

    class TabularMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            # Constant features would divide by zero; treat their scale as 1.
            self.register_buffer(
                "std", torch.as_tensor(np.where(std > 1e-12, std, 1.0), dtype=torch.float32)
            )
            self.net = nn.Sequential(
                nn.Linear(n_features, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, n_classes),
            )

        mean: torch.Tensor
        std: torch.Tensor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std)

    return TabularMLP()


def evaluate(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, log-loss and ROC AUC on a held-out set (CPU, fp32)."""
    import torch
    from sklearn.metrics import roc_auc_score

    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
        loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)).item()
        prob = torch.softmax(logits, dim=1).numpy()
    pred = prob.argmax(axis=1)
    auc = float(roc_auc_score(y, prob[:, 1])) if len(np.unique(y)) == 2 else float("nan")
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


def train(
    ds: ValidatedDataset,
    *,
    hidden: int,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    device: str = "auto",
    test_fraction: float = 0.25,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the MLP with Adam; bf16 autocast on CUDA. Deterministic on CPU for a given seed."""
    import torch

    started = time.perf_counter()
    dev = select_device(device)
    split = split_dataset(ds, test_fraction=test_fraction, seed=seed)
    torch.manual_seed(seed)
    n_classes = int(max(ds.labels.max(), 1)) + 1
    mean = split.x_train.mean(axis=0)
    std = split.x_train.std(axis=0)
    model = build_mlp(ds.features.shape[1], hidden, n_classes, mean, std).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    x = torch.as_tensor(split.x_train, dtype=torch.float32, device=dev)
    y = torch.as_tensor(split.y_train, dtype=torch.int64, device=dev)
    gen = torch.Generator().manual_seed(seed)
    use_bf16 = dev == "cuda" and torch.cuda.is_bf16_supported()
    loss_value = float("nan")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen).to(dev)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=use_bf16):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        loss_value = total / len(x)
        if not np.isfinite(loss_value):
            raise TrainingError(f"training diverged at epoch {epoch + 1} (loss {loss_value})")
        if on_epoch is not None:
            on_epoch(epoch + 1, loss_value)
    model = model.to("cpu").eval()
    metrics = evaluate(model, split.x_test, split.y_test)
    metrics["train_loss"] = loss_value
    params = {
        "hidden": str(hidden),
        "epochs": str(epochs),
        "learning_rate": str(learning_rate),
        "batch_size": str(batch_size),
        "seed": str(seed),
        "device": dev,
        "bf16": str(use_bf16),
        "n_train": str(len(split.y_train)),
        "n_test": str(len(split.y_test)),
    }
    return TrainResult(model, metrics, params, dev, time.perf_counter() - started, split)
