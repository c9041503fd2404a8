"""The compile-backend seam: the protocols, and the choice between ONNX Runtime, TensorRT and
AOTInductor.

ONNX Runtime and TensorRT build from the exported ONNX file (:class:`CompileBackend`);
AOTInductor builds from the PyTorch module itself (:class:`ModuleCompileBackend`). The pipeline
exports ONNX either way (it is registered with every version).

An artefact may need files beside it to load (TensorRT's ``model.engine.json`` sidecar): the
backend names them (``companion_files``), the pipeline records them on the
:class:`~ballast.compile.pipeline.CompiledArtifact`, and registration copies, hashes and signs
them with the artefact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from ballast.errors import CompileError

if TYPE_CHECKING:
    import numpy as np
    import torch

BackendName = Literal["auto", "onnxruntime", "tensorrt", "aotinductor"]


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

    def companion_files(self, artifact: Path) -> tuple[Path, ...]:
        """The files ``compile`` wrote beside ``artifact`` that loading it needs (may be ())."""
        ...


@runtime_checkable
class ModuleCompileBackend(Protocol):
    """Turns the eager PyTorch module into a deployable artefact that ``load_predictor`` opens."""

    name: str

    @property
    def precision(self) -> str: ...

    def available(self) -> bool: ...

    def compile_module(
        self, model: torch.nn.Module, example: np.ndarray, out_dir: Path, *, max_batch: int
    ) -> Path:
        """Build the artefact for ``model`` (``example``: float32 rows) into ``out_dir``."""
        ...

    def companion_files(self, artifact: Path) -> tuple[Path, ...]:
        """The files ``compile_module`` wrote beside ``artifact`` that loading it needs."""
        ...


def select_backend(
    requested: BackendName = "auto", *, intra_op_threads: int = 1
) -> CompileBackend | ModuleCompileBackend:
    """The backend for ``requested``.

    ``auto`` picks TensorRT where ``import tensorrt`` works and a CUDA GPU is visible, else ONNX
    Runtime. Asking for ``tensorrt`` or ``aotinductor`` where it cannot run raises
    :class:`CompileError` saying why. AOTInductor targets CUDA when a GPU is visible, else CPU.
    """
    from ballast.compile.aotinductor import AOTInductorBackend
    from ballast.compile.onnxruntime_backend import OnnxRuntimeBackend
    from ballast.compile.tensorrt import TensorRTBackend

    if requested == "aotinductor":
        aoti = AOTInductorBackend()
        why = aoti.unavailable_reason()
        if why is not None:
            raise CompileError(f"backend 'aotinductor' was requested but cannot run here: {why}")
        return aoti
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
