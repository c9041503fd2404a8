"""Collect this folder only where TensorRT can run: ``tensorrt`` imports and torch sees a GPU.

The project allows no suite that is skipped by default, so instead of ``importorskip`` (which
would list every test here as skipped on CPU machines) the whole folder is left out of
collection. On a CPU machine ``pytest tests/tensorrt`` therefore collects nothing (exit code 5);
on a TensorRT machine run ``pytest -m tensorrt``.
"""

from __future__ import annotations

import importlib.util


def _tensorrt_can_run() -> bool:
    # find_spec first: on machines without tensorrt this costs nothing (no torch import).
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
        import torch
    except Exception:  # a broken install counts as absent
        return False
    return bool(torch.cuda.is_available())


collect_ignore_glob = [] if _tensorrt_can_run() else ["test_*.py"]
