"""Thin wrapper kept for old instructions: the serving benchmark is ``ballast bench serving``.

.venv/bin/python benchmarks/gateway_bench.py [ARGS...]   # same as: ballast bench serving ARGS
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a script from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ballast.bench.serving import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
