"""TensorRT backend (build an engine from the exported ONNX) and its runtime predictor.

UNTESTED HERE. TensorRT cannot be installed on the project's machines (its library wheels are not
reachable from their package index, and the lent GPU machine's image has no TensorRT), so this
module is written against the documented TensorRT 10/11 Python API and has never run. Its tests
live in ``tests/tensorrt`` and are collected only where ``import tensorrt`` works and torch sees a
CUDA GPU; elsewhere that folder is left out of collection (nothing shows as skipped).

API notes that shaped the code:
- TensorRT 10 made explicit batch the only mode: ``create_network(0)``.
- FP16 uses ``BuilderFlag.FP16`` where it exists (TensorRT 10) on GPUs of compute capability 7.0
  or higher (``platform_has_fast_fp16`` is deprecated since 10.5, which says to ask CUDA instead).
  TensorRT 11 removed that flag: networks are strongly typed and follow the ONNX types, so an FP32
  export builds an FP32 engine there.
- For FP32 the TF32 flag is cleared where it exists: TF32 keeps 10 mantissa bits and would fail
  the FP32 parity tolerance.
- An engine only runs under the TensorRT version and GPU architecture that built it, so a JSON
  sidecar records both and :class:`TensorRTPredictor` refuses a mismatch before deserialising.

``tensorrt`` and ``torch`` are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ballast.errors import CompileError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENGINE_NAME = "model.engine"
SIDECAR_SUFFIX = ".json"  # model.engine -> model.engine.json
WORKSPACE_BYTES = 1 << 30
OPT_BATCH = 64
MIN_MAJOR_VERSION = 10
FP16_MIN_COMPUTE_CAPABILITY = (7, 0)


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def _cuda_device() -> tuple[str, str]:
    """(compute capability "major.minor", device name) of the current CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}", torch.cuda.get_device_name()


def _default_timing_cache(trt_version: str, compute_capability: str) -> Path:
    # Per version and architecture: a cache from another one is rejected by the builder anyway.
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (
        Path(base) / "ballast" / "tensorrt" / f"timing-{trt_version}-sm{compute_capability}.cache"
    )


@functools.lru_cache(maxsize=1)
def _trt_logger() -> Any:
    """One logger for the process (TensorRT keeps a reference), routed to Python logging."""
    import tensorrt as trt

    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.ERROR,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,
        sev.VERBOSE: logging.DEBUG,
    }

    class _Bridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return _Bridge()


def compatibility_problems(
    sidecar: dict[str, Any], *, trt_version: str, compute_capability: str
) -> list[str]:
    """Why an engine described by ``sidecar`` cannot run here (empty when it can)."""
    problems = []
    if sidecar.get("tensorrt_version") != trt_version:
        problems.append(
            f"built with TensorRT {sidecar.get('tensorrt_version')}, this is TensorRT {trt_version}"
        )
    if sidecar.get("compute_capability") != compute_capability:
        problems.append(
            f"built for compute capability {sidecar.get('compute_capability')}, "
            f"this GPU is {compute_capability}"
        )
    return problems


def read_sidecar(engine_path: Path) -> dict[str, Any]:
    path = sidecar_path(engine_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CompileError(f"engine sidecar missing: {path}") from exc
    except json.JSONDecodeError as exc:
        raise CompileError(f"engine sidecar {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CompileError(f"engine sidecar {path} is not a JSON object")
    return data


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self,
        *,
        fp16: bool = True,
        timing_cache: Path | None = None,
        workspace_bytes: int = WORKSPACE_BYTES,
        opt_batch: int = OPT_BATCH,
    ) -> None:
        self.fp16 = fp16
        self.timing_cache = timing_cache
        self.workspace_bytes = workspace_bytes
        self.opt_batch = opt_batch

    def unavailable_reason(self) -> str | None:
        """Why TensorRT cannot build here, or None when it can."""
        try:
            import tensorrt as trt
        except Exception as exc:  # ImportError, or a broken install failing to load its libraries
            return f"`import tensorrt` failed ({type(exc).__name__}: {exc})"
        major = int(str(trt.__version__).split(".")[0])
        if major < MIN_MAJOR_VERSION:
            return f"TensorRT {trt.__version__} is older than {MIN_MAJOR_VERSION}.0"
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None

    @property
    def precision(self) -> str:
        if not self.fp16 or not self.available():
            return "fp32"
        import tensorrt as trt
        import torch

        has_flag = getattr(trt.BuilderFlag, "FP16", None) is not None
        fast = torch.cuda.get_device_capability() >= FP16_MIN_COMPUTE_CAPABILITY
        return "fp16" if has_flag and fast else "fp32"

    def companion_files(self, artifact: Path) -> tuple[Path, ...]:
        """The sidecar :class:`TensorRTPredictor` reads before it loads ``artifact``: it must be
        registered (and signed) with the engine. Pure: needs no TensorRT."""
        return (sidecar_path(Path(artifact)),)

    def compile(self, onnx_path: Path, out_dir: Path, *, max_batch: int) -> Path:
        """Build ``out_dir/model.engine`` and its sidecar ``model.engine.json``."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise CompileError(f"cannot build a TensorRT engine: {reason}")
        import tensorrt as trt

        if max_batch < 1:
            raise CompileError(f"max_batch must be >= 1, got {max_batch}")
        logger = _trt_logger()
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch: the only mode since TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CompileError(f"TensorRT could not parse {onnx_path}: {errors}")
        if network.num_inputs != 1 or network.num_outputs != 1:
            raise CompileError("expected one input and one output in the ONNX graph")
        inp, out = network.get_input(0), network.get_output(0)
        if len(inp.shape) != 2 or int(inp.shape[1]) < 1:
            raise CompileError(f"expected input [batch, features], got {tuple(inp.shape)}")
        n_features = int(inp.shape[1])

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        precision = self.precision
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            tf32 = getattr(trt.BuilderFlag, "TF32", None)
            if tf32 is not None:
                config.clear_flag(tf32)

        opt = min(self.opt_batch, max_batch)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (1, n_features), (opt, n_features), (max_batch, n_features))
        config.add_optimization_profile(profile)

        compute_capability, device_name = _cuda_device()
        cache_path = self.timing_cache or _default_timing_cache(trt.__version__, compute_capability)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        if cache is None:
            # A corrupt blob gives no cache (trtexec checks the same); passing None on would be
            # a TypeError on this and every later build, the bad file staying where it is.
            log.warning("timing cache %s is unreadable; starting a new one", cache_path)
            cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not match this build; starting a new one", cache_path)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise CompileError("TensorRT failed to build the engine (see the TensorRT log lines)")

        out_dir.mkdir(parents=True, exist_ok=True)
        engine_path = out_dir / ENGINE_NAME
        sidecar = {
            "tensorrt_version": trt.__version__,
            "compute_capability": compute_capability,
            "device_name": device_name,
            "precision": precision,
            "input_name": inp.name,
            "output_name": out.name,
            "n_features": n_features,
            "min_batch": 1,
            "opt_batch": opt,
            "max_batch": max_batch,
        }
        # The old engine goes first, then the sidecar, the engine last, each by rename: a failure
        # in between leaves no engine (refused at load), never an engine beside another build's
        # sidecar.
        engine_path.unlink(missing_ok=True)
        _replace_with(
            sidecar_path(engine_path), (json.dumps(sidecar, indent=2) + "\n").encode("utf-8")
        )
        _replace_with(engine_path, bytes(serialized))
        _save_timing_cache(cache_path, bytes(config.get_timing_cache().serialize()))
        return engine_path


def _replace_with(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save_timing_cache(cache_path: Path, data: bytes) -> None:
    """Keep the timing cache for the next build, best effort: it only saves build time, so a
    folder that cannot be written (a read-only home) or another build saving at the same
    moment (each writes its own temp file) never fails a built engine."""
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _replace_with(cache_path, data)
    except OSError as exc:
        log.warning("timing cache %s not saved: %s", cache_path, exc)


class TensorRTPredictor:
    """Runs a serialised engine on the current CUDA device; batches above max_batch are split."""

    backend = "tensorrt"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        sidecar = read_sidecar(path)
        try:
            import tensorrt as trt
            import torch
        except Exception as exc:
            raise CompileError(f"cannot load a TensorRT engine: {exc}") from exc
        if not torch.cuda.is_available():
            raise CompileError("cannot load a TensorRT engine: no CUDA GPU is visible")
        compute_capability, _ = _cuda_device()
        problems = compatibility_problems(
            sidecar, trt_version=trt.__version__, compute_capability=compute_capability
        )
        if problems:
            raise CompileError(f"engine {path} cannot run here: " + "; ".join(problems))

        self._runtime = trt.Runtime(_trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise CompileError(f"TensorRT could not deserialise {path}")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CompileError(f"expected one input and one output tensor, got {names}")
        self._input, self._output = inputs[0], outputs[0]
        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16}
        dtypes = [self._engine.get_tensor_dtype(n) for n in (self._input, self._output)]
        if any(d not in to_torch for d in dtypes):
            raise CompileError(f"{path}: engine I/O types {dtypes} are not float32 or float16")
        self._in_dtype, self._out_dtype = (to_torch[d] for d in dtypes)
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self._device)
        # An execution context is not safe to drive from two threads at once.
        self._lock = threading.Lock()
        self.n_features: int | None = int(sidecar["n_features"])
        self.max_batch = int(sidecar["max_batch"])
        self.precision = str(sidecar.get("precision", "fp32"))

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected [batch, {self.n_features}] input, got {x.shape}")
        chunks = [x[i : i + self.max_batch] for i in range(0, len(x), self.max_batch)]
        return np.concatenate([self._run(c) for c in chunks], axis=0)

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with self._lock, torch.cuda.stream(self._stream):
            inp = torch.from_numpy(x).to(self._device).to(self._in_dtype)
            if not self._context.set_input_shape(self._input, tuple(inp.shape)):
                # Outside the engine's optimisation profile (a sidecar that disagrees with it):
                # said here, not as a negative dimension in torch.empty below.
                raise CompileError(
                    f"TensorRT refused input shape {tuple(inp.shape)} (profile up to "
                    f"{self.max_batch} rows)"
                )
            out: torch.Tensor = torch.empty(
                tuple(self._context.get_tensor_shape(self._output)),
                dtype=self._out_dtype,
                device=self._device,
            )
            self._context.set_tensor_address(self._input, inp.data_ptr())
            self._context.set_tensor_address(self._output, out.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise CompileError("TensorRT execution failed (see the TensorRT log lines)")
            self._stream.synchronize()
            return out.float().cpu().numpy()
