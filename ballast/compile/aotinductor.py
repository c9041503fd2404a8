"""AOTInductor backend: ``torch.export`` + ``torch._inductor.aoti_compile_and_package`` → ``.pt2``.

Unlike the ONNX-based backends this one compiles the PyTorch module itself (``compile_module``),
ahead of time, into a shared library packaged with its weights; ``aoti_load_package`` runs it
without Python model code. CPU packages need a C++ compiler at build time (g++; about 25–35 s
for the small models on this 2-core box), CUDA packages a CUDA toolchain (Triton).

A package only runs under the torch version that built it, on the device kind it was built for
and (on CPU) on a CPU with the instruction set it was compiled for. The build records these in
the package's own metadata (``aot_inductor.metadata``), and :class:`AOTInductorPredictor` reads
them from the archive and refuses a mismatch with a clear error before loading any code.

The batch dimension is exported dynamic (1..max_batch); the compiled code does not check the
upper bound, so the predictor splits larger inputs into chunks of ``max_batch``.

torch is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ballast.errors import CompileError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model.pt2"
META = "ballast."
#: CPU instruction-set levels, lowest first, as torch.backends.cpu.get_cpu_capability() names them.
_ISA_ORDER = ("DEFAULT", "NO AVX", "ZVECTOR", "AVX2", "AVX512")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch.export and Inductor raise Future/DeprecationWarnings about torch's own internals;
    # under `-W error` they would abort the build, and none is actionable here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _forward_arg_name(model: torch.nn.Module) -> str:
    params = list(inspect.signature(model.forward).parameters)
    if len(params) != 1:
        raise CompileError(f"forward() must take exactly one input, it takes {params}")
    return params[0]


def _isa_level(name: str) -> int:
    # "AVX512 AVX512_VNNI" → AVX512; unknown names rank lowest (never refused for being unknown).
    first = name.split()[0] if name.split() else "DEFAULT"
    return _ISA_ORDER.index(first) if first in _ISA_ORDER else 0


def read_package_metadata(path: Path) -> dict[str, str]:
    """The metadata stored in a ``.pt2`` package, read from the archive without loading code.

    Returns {} when the archive holds no metadata file where this torch version puts it (the
    predictor then relies on ``aoti_load_package`` failing for an unusable package).
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("wrapper_metadata.json")]
            if not names:
                return {}
            data = json.loads(z.read(names[0]))
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise CompileError(f"{path} is not an AOTInductor package: {exc}") from exc
    if not isinstance(data, dict):
        raise CompileError(f"{path}: package metadata is not a JSON object")
    return {str(k): str(v) for k, v in data.items()}


def compatibility_problems(
    meta: Mapping[str, str],
    *,
    torch_version: str,
    cuda_available: bool,
    cpu_capability: str,
    compute_capability: str | None = None,
) -> list[str]:
    """Why a package with ``meta`` cannot run here (empty when it can). ``compute_capability``
    is this GPU's, as AOTInductor records it (``major * 10 + minor``: "90" for an H100)."""
    problems = []
    built_with = meta.get(META + "torch_version")
    if built_with is not None and built_with != torch_version:
        problems.append(f"built with torch {built_with}, this is torch {torch_version}")
    device = meta.get("AOTI_DEVICE_KEY") or meta.get(META + "device")
    if device == "cuda" and not cuda_available:
        problems.append("built for CUDA, and no CUDA GPU is visible")
    built_cc = meta.get("AOTI_COMPUTE_CAPABILITY", "")
    if (
        device == "cuda"
        and cuda_available
        and built_cc.isdigit()
        and compute_capability is not None
        and built_cc != compute_capability
    ):
        # Its kernels are compiled for one GPU architecture (as a TensorRT engine is): refused
        # at load, not failed at the first request.
        problems.append(
            f"built for GPU compute capability {built_cc}, this GPU is {compute_capability}"
        )
    isa = meta.get("AOTI_CPU_ISA", "")
    if device == "cpu" and isa and _isa_level(isa) > _isa_level(cpu_capability):
        problems.append(f"built for CPU instruction set {isa}, this CPU offers {cpu_capability}")
    return problems


def _this_gpu_capability() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return str(major * 10 + minor)


class AOTInductorBackend:
    """Compiles the eager module for ``device`` ("cpu", "cuda", or "auto": CUDA when present)."""

    name = "aotinductor"
    precision = "fp32"

    def __init__(self, *, device: str = "auto") -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise CompileError(f"aotinductor device must be auto, cpu or cuda, got {device!r}")
        self._device = device

    @property
    def device(self) -> str:
        if self._device != "auto":
            return self._device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot build here, or None when it can."""
        try:
            import torch
            import torch._inductor  # the AOTInductor entry points live here
        except Exception as exc:
            return f"torch's inductor does not import ({type(exc).__name__}: {exc})"
        if self.device == "cuda" and not torch.cuda.is_available():
            return "device 'cuda' requested but no CUDA GPU is visible"
        if self.device == "cpu":
            from torch._inductor import config

            cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
            if cxx and shutil.which(str(cxx)) is None:
                return f"no C++ compiler {cxx!r} on PATH (AOTInductor builds C++ for CPU)"
        return None

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def companion_files(self, artifact: Path) -> tuple[Path, ...]:
        """None: the ``.pt2`` package holds its code, weights and metadata."""
        del artifact
        return ()

    def compile_module(
        self, model: torch.nn.Module, example: np.ndarray, out_dir: Path, *, max_batch: int
    ) -> Path:
        """Export ``model`` (a copy on this backend's device, eval mode) and build
        ``out_dir/model.pt2``. The caller's model is not modified."""
        import torch
        from torch._inductor import aoti_compile_and_package

        reason = self.unavailable_reason()
        if reason is not None:
            raise CompileError(f"cannot build an AOTInductor package: {reason}")
        example = np.asarray(example, dtype=np.float32)
        if example.ndim != 2 or example.shape[0] < 1:
            raise CompileError(f"example must be [batch, features], got shape {example.shape}")
        if max_batch < 2:
            raise CompileError(f"max_batch must be >= 2 for a dynamic batch, got {max_batch}")
        # A batch of 1 would let torch.export specialise the batch dimension to 1.
        rows = np.repeat(example, 2, axis=0) if example.shape[0] < 2 else example
        # Never more rows than max_batch: a trace of 8 under a batch range ending below 8 is a
        # constraint violation (BALLAST_BENCH_BATCHES='[1,4]'), as in onnx_export.
        rows = rows[: min(len(rows), 8, max_batch)]
        device = self.device
        target = copy.deepcopy(model).to(device).eval()
        arg = _forward_arg_name(target)
        x = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        meta = {
            META + "torch_version": torch.__version__,
            META + "device": device,
            META + "n_features": str(int(example.shape[1])),
            META + "max_batch": str(max_batch),
            META + "precision": self.precision,
        }
        # Older torch releases lack the metadata option: the package then carries only
        # AOTInductor's own keys and the predictor skips the checks it cannot make.
        has_meta = hasattr(torch._inductor.config.aot_inductor, "metadata")
        configs = {"aot_inductor.metadata": meta} if has_meta else {}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / ARTIFACT_NAME
        # Build into a temporary folder, then rename: a failed build leaves no half package.
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".aoti-") as tmp:
            staged = Path(tmp) / ARTIFACT_NAME
            try:
                with _quiet(), torch.no_grad():
                    program = torch.export.export(target, (x,), dynamic_shapes={arg: {0: batch}})
                    aoti_compile_and_package(
                        program, package_path=str(staged), inductor_configs=configs
                    )
            except Exception as exc:
                raise CompileError(
                    f"AOTInductor build failed: {type(exc).__name__}: {str(exc)[:500]}"
                ) from exc
            if not staged.is_file():
                raise CompileError(f"AOTInductor did not write {staged}")
            os.replace(staged, final)
        log.debug("AOTInductor package %s (%d bytes, %s)", final, final.stat().st_size, device)
        return final


class AOTInductorPredictor:
    """Runs a ``.pt2`` package: float32 numpy ``[batch, features]`` in, float32 logits out.

    CPU kernels run on torch's intra-op thread pool (``torch.set_num_threads`` is process-wide:
    the caller sets it, as the benchmark does; loading a package does not change it).
    """

    backend = "aotinductor"

    def __init__(self, path: Path) -> None:
        import torch
        from torch._inductor import aoti_load_package

        path = Path(path)
        if not path.is_file():
            raise CompileError(f"AOTInductor package not found: {path}")
        meta = read_package_metadata(path)
        problems = compatibility_problems(
            meta,
            torch_version=torch.__version__,
            cuda_available=torch.cuda.is_available(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            compute_capability=_this_gpu_capability(),
        )
        if problems:
            raise CompileError(f"package {path} cannot run here: " + "; ".join(problems))
        try:
            with _quiet():
                self._runner: Any = aoti_load_package(str(path))
        except Exception as exc:
            raise CompileError(f"could not load AOTInductor package {path}: {exc}") from exc
        meta = {**meta, **{str(k): str(v) for k, v in self._runner.get_metadata().items()}}
        device = meta.get(META + "device") or meta.get("AOTI_DEVICE_KEY") or "cpu"
        self.device = device  # "cpu" or "cuda": where inputs go and the work runs
        self._device = torch.device(device)
        self.n_features: int | None = (
            int(meta[META + "n_features"]) if META + "n_features" in meta else None
        )
        self.max_batch = int(meta.get(META + "max_batch", "4096"))
        self.precision = meta.get(META + "precision", "fp32")
        self.metadata = meta

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or (self.n_features is not None and x.shape[1] != self.n_features):
            # The compiled code would fail in C++ with a message about matrix shapes.
            raise ValueError(f"expected [batch, {self.n_features}] input, got {x.shape}")
        chunks = [x[i : i + self.max_batch] for i in range(0, len(x), self.max_batch)]
        return np.concatenate([self._run(c) for c in chunks], axis=0)

    def run_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Run on a tensor already on the package's device (no copies, no checks, no chunking):
        for callers that keep data on the GPU, such as ``benchmarks/gpu_check.py``."""
        out: torch.Tensor = self._runner(x)
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self._runner(torch.from_numpy(x).to(self._device))
            return np.asarray(out.float().cpu().numpy(), dtype=np.float32)
