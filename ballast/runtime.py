"""Runtimes that execute a compiled artefact: the seam between compile backends and serving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np


class Predictor(Protocol):
    """Runs a compiled model: float32 ``[batch, features]`` in, float32 logits ``[batch, classes]`` out."""

    backend: str

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class OnnxRuntimePredictor:
    backend = "onnxruntime"

    def __init__(self, path: Path, *, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # The artefact is already optimised offline; threads are set explicitly because ORT's
        # default takes every core, which starves the server's event loop on small machines.
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._outputs = [self._session.get_outputs()[0].name]
        shape = self._session.get_inputs()[0].shape
        self.n_features: int | None = shape[1] if isinstance(shape[1], int) else None
        # The session's compiled binding, called directly. ``InferenceSession.run`` first checks
        # the feed in Python (its names, graph capture, OrtValue ownership, then a GPU provider
        # fallback): about 1 us per call on the benchmark VM (benchmarks/ort_call.py), a ninth
        # of a 2-row call of the benchmark's MLP. Here the feed is always one float32 array
        # under the model's only input name on the CPU provider, so none of it applies. Falls
        # back to the public call if a release renames the binding.
        run = getattr(getattr(self._session, "_sess", None), "run", None)
        self._direct: Callable[..., list[np.ndarray]] | None = run if callable(run) else None

    def predict(self, x: np.ndarray) -> np.ndarray:
        feed = {self._input: np.ascontiguousarray(x, dtype=np.float32)}
        if self._direct is not None:
            out = self._direct(self._outputs, feed, None)
        else:
            out = self._session.run(self._outputs, feed)
        return np.asarray(out[0], dtype=np.float32)


def companion_files(path: Path, backend: str) -> tuple[Path, ...]:
    """The files beside ``path`` that ``load_predictor`` reads too (the compile backends'
    ``companion_files``, without building a backend): TensorRT's sidecar, else none."""
    if backend == "tensorrt":
        from ballast.compile.tensorrt import sidecar_path

        return (sidecar_path(Path(path)),)
    return ()


def load_predictor(path: Path, backend: str, *, intra_op_threads: int = 1) -> Predictor:
    """Open a compiled artefact with the runtime for ``backend``."""
    if backend == "onnxruntime":
        return OnnxRuntimePredictor(path, intra_op_threads=intra_op_threads)
    if backend == "tensorrt":
        from ballast.compile.tensorrt import TensorRTPredictor

        return TensorRTPredictor(path)
    if backend == "aotinductor":
        # CPU packages run on torch's intra-op pool: the serving process sets its size once
        # (torch.set_num_threads); loading a package leaves it alone.
        from ballast.compile.aotinductor import AOTInductorPredictor

        return AOTInductorPredictor(path)
    raise ValueError(f"unknown backend {backend!r}")
