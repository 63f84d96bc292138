#!/usr/bin/env python3
"""Benchmark the fused Conv2d+ReLU+MaxPool2d op against stock PyTorch.

    python python/benchmark.py --quick
    python python/benchmark.py --json bench.json --png bench.png --markdown bench.md

The implementation is the package fmnist_ext.benchmark (so the installed console command
`fmnist-benchmark` runs the same code); `--help` lists the options. Install
the package first (pip install --no-build-isolation .): this script imports
the installed fmnist_ext, with its compiled kernels.
"""

import sys
from pathlib import Path

try:
    from fmnist_ext.benchmark.cli import main
except ImportError as exc:  # pragma: no cover - message for a missing install
    sys.exit(
        f"python/benchmark.py: cannot import fmnist_ext ({exc}); install it with "
        "`pip install --no-build-isolation .` from the repository root"
    )

if __name__ == "__main__":
    # The repository this script lives in, for the commit recorded in the JSON.
    sys.exit(main(repo_dir=Path(__file__).resolve().parent.parent))
