"""`python -m fmnist_ext.info`: which kernels run on which device, and why."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_ext.info",
        description="Print which fmnist_ext kernels are active per device (compiled CPU / "
        "compiled CUDA / pure-PyTorch reference) and the torch versions involved.",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)

    import fmnist_ext

    status = fmnist_ext.kernels_status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    cpu = status["cpu"] + (f" ({status['cpu_isa']})" if status["cpu_isa"] else "")
    print(f"fmnist_ext {fmnist_ext.__version__}")
    print(f"  cpu kernels:   {cpu}")
    cuda = status["cuda"]
    if not status["cuda_available"]:
        cuda += " (no CUDA device visible)"
    print(f"  cuda kernels:  {cuda}")
    print(f"  built against: torch {status['built_against_torch'] or '(not built)'}")
    print(f"  running:       torch {status['running_torch']}")
    from fmnist_ext import _library

    if _library.LOADED:
        print(f"  library:       {_library.LIBRARY_PATH}")
    if status["not_loaded_reason"]:
        print(f"  compiled library not loaded: {status['not_loaded_reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
