"""Collect this folder only where torch sees a CUDA GPU.

The project allows no suite that is skipped by default, so on a machine without a GPU the whole
folder is left out of collection (as ``tests/tensorrt`` is): ``pytest tests/gpu`` then collects
nothing (exit code 5). On a GPU machine run ``pytest -m gpu tests/gpu``;
``benchmarks/device_check.sh`` runs it with the GPU figures.
"""

from __future__ import annotations

from tests.hardware import cuda_visible

collect_ignore_glob = [] if cuda_visible() else ["test_*.py"]
