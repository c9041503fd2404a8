"""Moved to ``ballast bench data`` (ballast/bench/data.py): decrypt throughput beside one-shot
AESGCM and a plain file read, peak RSS at 10 MiB / 1 GiB / 5 GiB, and validation throughput.
This wrapper forwards its arguments, e.g. ``.venv/bin/python benchmarks/crypto_bench.py --quick``.
"""

from __future__ import annotations

import sys

from ballast.bench.data import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
