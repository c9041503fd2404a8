"""ONNX Runtime backend: the exported graph, optimised offline at ``ORT_ENABLE_EXTENDED``.

The optimised model is what serving loads, so the graph rewrites (constant folding, fusions) are
paid once at compile time instead of at every gateway start. Not ``ORT_ENABLE_ALL``: its layout
rewrites (NCHWc convolutions) are for the CPU that ran the optimiser, and ONNX Runtime documents
that a model saved with them must run on the same hardware; serving applies them itself, for the
CPU it runs on, when it loads the model (its sessions default to ``ORT_ENABLE_ALL``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ballast.errors import CompileError

ARTIFACT_NAME = "model.ort.onnx"


class OnnxRuntimeBackend:
    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, *, intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads

    def available(self) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def companion_files(self, artifact: Path) -> tuple[Path, ...]:
        """None: the optimised model is one self-contained file."""
        del artifact
        return ()

    def compile(self, onnx_path: Path, out_dir: Path, *, max_batch: int) -> Path:
        """Optimise ``onnx_path`` into ``out_dir/model.ort.onnx``.

        ``max_batch`` is accepted for the common interface; ONNX Runtime plans per call, so the
        exported graph's dynamic batch range is what bounds it.
        """
        import onnxruntime as ort

        del max_batch
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / ARTIFACT_NAME
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(out)
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.inter_op_threads
        # Severity 3 (error): warnings about the saved model's optimisations are not ours to act on.
        opts.log_severity_level = 3
        try:
            # Creating the session runs the optimiser and writes optimized_model_filepath.
            ort.InferenceSession(
                str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise CompileError(f"ONNX Runtime could not optimise {onnx_path}: {exc}") from exc
        if not out.is_file():
            raise CompileError(f"ONNX Runtime did not write the optimised model to {out}")
        return out
