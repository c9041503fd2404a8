"""Small ONNX artefacts for the gateway's tests and benchmark.

The MLP (:func:`ballast.bench.onnx_mlp.build_mlp_onnx`) is written with ``onnx.helper``
(MatMul/Add/Relu, weights drawn from a seeded NumPy generator with PyTorch's default ``Linear``
scale), not exported from torch: a test module that needs two models then pays about 0.3 s
instead of torch's import and export (5-8 s).
"""

from __future__ import annotations

from pathlib import Path

from ballast.bench.onnx_mlp import build_mlp_onnx
from ballast.hashing import sha256_file
from ballast.serving import Fault, VersionSpec

__all__ = ["build_mlp_onnx", "spec_for"]


def spec_for(path: Path, version: str, *, fault: Fault | None = None) -> VersionSpec:
    """A VersionSpec for an artefact on disk, with its real sha256."""
    return VersionSpec(
        version=version, artifact_path=str(path), sha256=sha256_file(path), fault=fault
    )
