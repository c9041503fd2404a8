"""What this machine can run, for the conftests that leave whole folders out of collection
(the project allows no suite skipped by default). Cheap where the answer is no."""

from __future__ import annotations

import importlib.util


def cuda_visible() -> bool:
    """torch imports and sees a CUDA GPU (a broken install counts as absent)."""
    if importlib.util.find_spec("torch") is None:
        return False
    try:
        import torch
    except Exception:
        return False
    return bool(torch.cuda.is_available())


def tensorrt_can_run() -> bool:
    """``tensorrt`` imports and a CUDA GPU is visible."""
    # find_spec first: on machines without tensorrt this costs nothing (no torch import).
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return cuda_visible()
