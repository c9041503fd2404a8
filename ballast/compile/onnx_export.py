"""Export an eager PyTorch model to one self-contained ONNX file with a dynamic batch dimension."""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ballast.errors import CompileError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: The largest batch the exported graph accepts (torch.export checks the range at export time).
MAX_EXPORT_BATCH = 4096


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The dynamo exporter logs a WARNING per missing optional torchvision op on every export, and
    # torch's own internals raise Future/DeprecationWarnings about torch APIs (not ours) while it
    # runs; none of it is actionable here, and under `-W error` a warning would abort the export.
    logger = logging.getLogger("torch.onnx")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(old)


def _forward_arg_name(model: torch.nn.Module) -> str:
    # dynamic_shapes is keyed by the name of forward()'s argument, whatever the model calls it.
    params = list(inspect.signature(model.forward).parameters)
    if len(params) != 1:
        raise CompileError(f"forward() must take exactly one input, it takes {params}")
    return params[0]


def export_onnx(
    model: torch.nn.Module,
    example: np.ndarray,
    path: Path,
    *,
    max_batch: int = MAX_EXPORT_BATCH,
) -> Path:
    """Export ``model`` (eval mode, on CPU) to ``path`` as a single ONNX file.

    ``example`` is float32 ``[batch, n_features]``; only its feature count and dtype matter, as the
    batch dimension is exported dynamic (``1..max_batch``). The input is named ``input`` and the
    output ``logits``. The caller's model is not modified: a CPU copy is exported when it lives on
    another device, and its train/eval mode is restored afterwards.
    """
    import torch

    example = np.asarray(example, dtype=np.float32)
    if example.ndim != 2 or example.shape[0] < 1:
        raise CompileError(f"example must be [batch, features], got shape {example.shape}")
    if not 1 <= max_batch <= MAX_EXPORT_BATCH:
        raise CompileError(f"max_batch must be within 1..{MAX_EXPORT_BATCH}, got {max_batch}")
    # A batch of 1 would let torch.export specialise the batch dim to the constant 1.
    if example.shape[0] < 2:
        example = np.repeat(example, 2, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    target = model if on_cpu else copy.deepcopy(model).to("cpu")
    was_training = target.training
    target.eval()
    arg = _forward_arg_name(target)
    # The traced example must fit the dynamic range (8 rows with max_batch=2 was a constraint
    # violation: `ballast bench compile --batches 1`), and the range must admit its 2 rows.
    dim_max = max(max_batch, 2)
    traced = example[: min(len(example), 8, dim_max)]
    batch = torch.export.Dim("batch", min=1, max=dim_max)
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                target,
                (torch.from_numpy(traced.copy()),),
                str(path),
                dynamo=True,
                dynamic_shapes={arg: {0: batch}},
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                external_data=False,
                optimize=True,
                verbose=False,  # else the exporter prints its progress to stdout
            )
    except Exception as exc:
        raise CompileError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        target.train(was_training)
    log.debug("exported ONNX to %s (%d bytes)", path, path.stat().st_size)
    return path
