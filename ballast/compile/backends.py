"""The compile-backend seam: one protocol, and the choice between ONNX Runtime and TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from ballast.errors import CompileError

BackendName = Literal["auto", "onnxruntime", "tensorrt"]


@runtime_checkable
class CompileBackend(Protocol):
    """Turns an exported ONNX file into a deployable artefact that ``load_predictor`` opens."""

    name: str

    @property
    def precision(self) -> str:
        """The numeric precision the artefact computes in ("fp32" or "fp16")."""
        ...

    def available(self) -> bool:
        """Whether this backend can compile and run on this machine."""
        ...

    def compile(self, onnx_path: Path, out_dir: Path, *, max_batch: int) -> Path:
        """Build the artefact from ``onnx_path`` into ``out_dir``; returns its path."""
        ...


def select_backend(requested: BackendName = "auto", *, intra_op_threads: int = 1) -> CompileBackend:
    """The backend for ``requested``.

    ``auto`` picks TensorRT where ``import tensorrt`` works and a CUDA GPU is visible, else ONNX
    Runtime. Asking for ``tensorrt`` where it cannot run raises :class:`CompileError` saying why.
    """
    from ballast.compile.onnxruntime_backend import OnnxRuntimeBackend
    from ballast.compile.tensorrt import TensorRTBackend

    if requested == "onnxruntime":
        return OnnxRuntimeBackend(intra_op_threads=intra_op_threads)
    if requested == "tensorrt":
        trt = TensorRTBackend()
        reason = trt.unavailable_reason()
        if reason is not None:
            raise CompileError(f"backend 'tensorrt' was requested but cannot run here: {reason}")
        return trt
    if requested == "auto":
        trt = TensorRTBackend()
        if trt.available():
            return trt
        return OnnxRuntimeBackend(intra_op_threads=intra_op_threads)
    raise CompileError(f"unknown compile backend {requested!r}")
