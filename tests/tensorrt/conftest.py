"""Collect this folder only where TensorRT can run: ``tensorrt`` imports and torch sees a GPU.

The project allows no suite that is skipped by default, so instead of ``importorskip`` (which
would list every test here as skipped on CPU machines) the whole folder is left out of
collection. On a CPU machine ``pytest tests/tensorrt`` therefore collects nothing (exit code 5);
on a TensorRT machine run ``pytest -m tensorrt``.
"""

from __future__ import annotations

from tests.hardware import tensorrt_can_run

collect_ignore_glob = [] if tensorrt_can_run() else ["test_*.py"]
