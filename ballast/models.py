"""Model specs: named model factories with typed hyperparameters.

Every model takes raw float32 rows ``[batch, features]`` and returns logits ``[batch, classes]``;
input normalisation (per-feature mean and std of the training rows) lives inside the model as
buffers, so exported and compiled artefacts need no preprocessing code that could drift from
training. The image model reshapes its flat rows internally for the same reason.

Hyperparameters are frozen dataclasses (not pydantic) on purpose: ``benchmarks/gpu_check.py``
imports this module on a GPU machine that has torch, numpy and scikit-learn but not pydantic.
torch is imported inside the factories, so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ballast.errors import TrainingError

if TYPE_CHECKING:
    from torch import nn

TABULAR_MLP = "tabular-mlp"
SMALL_CNN = "small-cnn"


def _positive(owner: str, **values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainingError(f"{owner}.{key} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class MLPParams:
    """``layers`` hidden layers of ``hidden`` units with ReLU, then a linear head."""

    hidden: int = 64
    layers: int = 2

    def __post_init__(self) -> None:
        _positive("tabular-mlp", hidden=self.hidden, layers=self.layers)


@dataclass(frozen=True)
class CNNParams:
    """Two 3×3 convolutions (``channels``, ``2*channels``), 2×2 max-pool, ``hidden`` dense units.

    Input rows are ``side * side`` pixels of one channel.
    """

    channels: int = 16
    hidden: int = 64
    side: int = 8

    def __post_init__(self) -> None:
        _positive("small-cnn", channels=self.channels, hidden=self.hidden, side=self.side)
        if self.side % 2:
            raise TrainingError(f"small-cnn.side must be even (2×2 pooling), got {self.side}")


ModelParams = MLPParams | CNNParams


def _coerce(owner: str, field: dataclasses.Field[Any], value: Any) -> int:
    # Every hyperparameter is an int today; flow parameters and CLI flags may arrive as text.
    if isinstance(value, bool):
        raise TrainingError(f"{owner}.{field.name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TrainingError(f"{owner}.{field.name} must be an integer, got {value!r}")


def _normalisation(mean: np.ndarray, std: np.ndarray) -> tuple[Any, Any]:
    import torch

    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    # Constant features (an always-blank pixel, say) would divide by zero; their scale is 1.
    safe_std = np.where(std > 1e-12, std, 1.0)
    return (
        torch.as_tensor(mean, dtype=torch.float32),
        torch.as_tensor(safe_std, dtype=torch.float32),
    )


def _build_mlp(
    p: ModelParams, n_features: int, n_classes: int, mean: np.ndarray, std: np.ndarray
) -> nn.Module:
    import torch
    from torch import nn

    assert isinstance(p, MLPParams)  # ModelSpec.build checked it; this narrows the type
    hidden, depth = p.hidden, p.layers
    mean_t, std_t = _normalisation(mean, std)

    class TabularMLP(nn.Module):
        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", mean_t)
            self.register_buffer("std", std_t)
            layers: list[nn.Module] = []
            width = n_features
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            layers.append(nn.Linear(width, n_classes))
            self.net = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std)

    return TabularMLP()


def _build_cnn(
    p: ModelParams, n_features: int, n_classes: int, mean: np.ndarray, std: np.ndarray
) -> nn.Module:
    import torch
    from torch import nn

    assert isinstance(p, CNNParams)  # ModelSpec.build checked it; this narrows the type
    if n_features != p.side * p.side:
        raise TrainingError(
            f"small-cnn takes {p.side}×{p.side} = {p.side * p.side} pixel features per row, "
            f"the dataset has {n_features}"
        )
    mean_t, std_t = _normalisation(mean, std)
    side, c, hidden = p.side, p.channels, p.hidden

    class SmallCNN(nn.Module):
        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", mean_t)
            self.register_buffer("std", std_t)
            self.features = nn.Sequential(
                nn.Conv2d(1, c, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c, 2 * c, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(2 * c * (side // 2) ** 2, hidden),
                nn.ReLU(),
                nn.Linear(hidden, n_classes),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Flat rows in, so the serving contract stays [batch, features] → logits.
            images = ((x - self.mean) / self.std).unflatten(1, (1, side, side))
            return self.head(self.features(images))

    return SmallCNN()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params_type: type[MLPParams] | type[CNNParams]
    description: str
    #: The bundled dataset this model is meant for (``ballast.datasets_extra.bundled_dataset``).
    default_dataset: str
    factory: Callable[[ModelParams, int, int, np.ndarray, np.ndarray], nn.Module]

    def params(self, overrides: Mapping[str, Any] | None = None) -> ModelParams:
        """Typed hyperparameters: the defaults with ``overrides`` applied and checked."""
        fields = {f.name: f for f in dataclasses.fields(self.params_type)}
        unknown = sorted(set(overrides or {}) - set(fields))
        if unknown:
            raise TrainingError(
                f"{self.name} has no hyperparameter(s) {unknown}; it takes {sorted(fields)}"
            )
        values = {k: _coerce(self.name, fields[k], v) for k, v in (overrides or {}).items()}
        return self.params_type(**values)

    def build(
        self,
        params: ModelParams,
        *,
        n_features: int,
        n_classes: int,
        mean: np.ndarray,
        std: np.ndarray,
    ) -> nn.Module:
        """A fresh model (weights from torch's global RNG: seed it first for reproducibility)."""
        if not isinstance(params, self.params_type):
            raise TrainingError(
                f"{self.name} takes {self.params_type.__name__}, got {type(params).__name__}"
            )
        if n_classes < 2:
            raise TrainingError(f"a classifier needs at least 2 classes, got {n_classes}")
        if np.shape(mean) != (n_features,) or np.shape(std) != (n_features,):
            raise TrainingError(
                f"normalisation statistics must have {n_features} entries, got "
                f"{np.shape(mean)} and {np.shape(std)}"
            )
        return self.factory(params, n_features, n_classes, mean, std)


MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        TABULAR_MLP: ModelSpec(
            name=TABULAR_MLP,
            params_type=MLPParams,
            description="MLP for tabular rows (breast-cancer by default)",
            default_dataset="breast-cancer",
            factory=_build_mlp,
        ),
        SMALL_CNN: ModelSpec(
            name=SMALL_CNN,
            params_type=CNNParams,
            description="small CNN for 8×8 one-channel images given as flat rows (digits)",
            default_dataset="digits",
            factory=_build_cnn,
        ),
    }
)


def get_spec(name: str) -> ModelSpec:
    """The spec named ``name``; an unknown name is a :class:`TrainingError` listing the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise TrainingError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None


def params_as_dict(params: ModelParams) -> dict[str, int]:
    return dataclasses.asdict(params)
