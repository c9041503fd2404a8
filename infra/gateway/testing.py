"""Small ONNX artefacts for the gateway's tests and benchmark (torch is imported only when called)."""

from __future__ import annotations

from pathlib import Path

from ballast.hashing import sha256_file
from ballast.serving import Fault, VersionSpec


def build_mlp_onnx(
    path: Path,
    *,
    seed: int,
    n_features: int = 30,
    hidden: tuple[int, ...] = (16,),
    classes: int = 2,
) -> Path:
    """Export a seeded ``Linear/ReLU`` MLP with a dynamic batch axis to ``path`` (about 3 s)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*layers)

        # The exporter keys dynamic shapes by this argument's name.
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    model = Net().eval()
    x = torch.randn(4, n_features)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
        input_names=["input"],
        output_names=["logits"],
        external_data=False,
        verbose=False,  # the exporter's progress lines are noise in test and bench output
    )
    return path


def spec_for(path: Path, version: str, *, fault: Fault | None = None) -> VersionSpec:
    """A VersionSpec for an artefact on disk, with its real sha256."""
    return VersionSpec(
        version=version, artifact_path=str(path), sha256=sha256_file(path), fault=fault
    )
