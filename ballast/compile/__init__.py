"""Compile a trained model for serving: ONNX export, a backend (ONNX Runtime, TensorRT or
AOTInductor), a parity check against eager PyTorch, and a side-by-side benchmark.

Plain Python with no Prefect or MLflow imports; torch, onnxruntime and tensorrt are imported inside
the functions that use them, so importing this package is cheap.
"""

from ballast.compile.aotinductor import AOTInductorBackend, AOTInductorPredictor
from ballast.compile.backends import (
    BackendName,
    CompileBackend,
    ModuleCompileBackend,
    select_backend,
)
from ballast.compile.bench import (
    BatchTiming,
    BenchReport,
    benchmark,
    benchmark_eager,
    relative_cost,
)
from ballast.compile.onnx_export import export_onnx
from ballast.compile.onnxruntime_backend import OnnxRuntimeBackend
from ballast.compile.parity import ParityReport, check_parity
from ballast.compile.pipeline import CompiledArtifact, compile_model
from ballast.compile.tensorrt import TensorRTBackend

__all__ = [
    "AOTInductorBackend",
    "AOTInductorPredictor",
    "BackendName",
    "BatchTiming",
    "BenchReport",
    "CompileBackend",
    "CompiledArtifact",
    "ModuleCompileBackend",
    "OnnxRuntimeBackend",
    "ParityReport",
    "TensorRTBackend",
    "benchmark",
    "benchmark_eager",
    "check_parity",
    "compile_model",
    "export_onnx",
    "relative_cost",
    "select_backend",
]
