"""Thin launcher for the GEMM benchmark; the logic lives in :mod:`qlin.bench`.

PYTHONPATH=. python3 benchmarks/bench_gemm.py [--quick] [--dynamic] [--deadline-s 470] [--out DIR]

Writes <out>/<tag>.json (rows + meta: summary, peaks, per-case phase timings), <tag>.md and <tag>.png;
<out> defaults to $OUT, else benchmarks/results.  `--help` lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlin.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
