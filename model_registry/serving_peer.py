"""MLflow's own model format, for benchmarking `mlflow models serve` as a peer (mlflow stays here)."""

from __future__ import annotations

from pathlib import Path


def save_onnx_as_mlflow_model(onnx_path: Path, dst: Path) -> Path:
    """Save an ONNX file as an MLflow ONNX-flavour model folder that `mlflow models serve` reads."""
    import mlflow.onnx
    import onnx

    mlflow.onnx.save_model(onnx.load(str(onnx_path)), str(dst))
    return dst
