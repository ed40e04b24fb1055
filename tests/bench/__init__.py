"""Tests of bench/'s pure parts: ratios, targets, argument checks, the bare server's answers.

bench/ is a directory of scripts, not a package (``python bench/run.py``), so
its modules are imported by their own names with bench/ on the path.
"""

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
