#!/usr/bin/env python3
"""Benchmark the fused Conv2d+ReLU+MaxPool2d op against stock PyTorch and torch.compile.

    python python/benchmark.py --quick
    python python/benchmark.py --json bench.json --png bench.png --markdown bench.md

The same as `python -m fmnist_ext.benchmark` and `fmnist-benchmark` (`--help` lists
the options), with this checkout's commit recorded. It imports the installed
fmnist_ext, with its compiled kernels: `pip install --no-build-isolation .` first.
"""

import sys
from pathlib import Path

try:
    from fmnist_ext.benchmark.__main__ import main
except ImportError as exc:  # pragma: no cover - message for a missing install
    sys.exit(
        f"python/benchmark.py: cannot import fmnist_ext ({exc}); install it with `pip install --no-build-isolation .`"
    )

if __name__ == "__main__":
    sys.exit(main(repo_dir=Path(__file__).resolve().parent.parent))
