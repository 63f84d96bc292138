"""`python -m fmnist_ext.info`: which kernels run on which device, and why.

`--check` also runs the fused operator against the stock sequence on every
visible device (fmnist_ext/selfcheck.py) and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import cli


@cli.guarded("fmnist_ext.info")  # `info --check | head -1`: a closed stdout pipe exits 141 quietly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_ext.info",
        description="Print which fmnist_ext kernels are active per device (compiled CPU / "
        "compiled CUDA / pure-PyTorch reference) and the torch versions involved.",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument(
        "--check",
        action="store_true",
        help="also run a short battery of the fused operator against the stock conv2d -> relu -> "
        "max_pool2d sequence (output and all gradients, float32 and float64) on cpu and every "
        "visible CUDA device; print a verdict per device; exit 1 on any mismatch",
    )
    args = parser.parse_args(argv)
    if args.json and args.check:
        parser.exit(2, f"{parser.prog}: error: argument --check: not allowed with --json\n")

    import fmnist_ext
    from fmnist_ext import cli
    from fmnist_ext.op import _library  # LIBRARY_PATH: the op layer has no public name for it

    cli.refuse_bad_cpu_isa(parser)
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
    built = status["built_against_torch"]
    if built:
        built = f"torch {built} headers, for torch >= {status['minimum_torch']} (stable ABI)"
    print(f"  built against: {built or 'torch (not built)'}")
    print(f"  running:       torch {status['running_torch']}")
    if status["compiled_library_loaded"]:
        print(f"  library:       {_library.LIBRARY_PATH}")
    if status["not_loaded_reason"]:
        print(f"  compiled library not loaded: {status['not_loaded_reason']}")
    if args.check:
        return run_check()
    return 0


def run_check(devices: list[str] | None = None) -> int:
    """Print one verdict per device; 0 when every device agrees with stock."""
    from fmnist_ext import selfcheck

    print("check: fused vs stock (output, grad_input, grad_weight, grad_bias; relative to magnitude)")
    reports = [selfcheck.check_device(dev) for dev in (devices or selfcheck.available_devices())]
    for report in reports:
        print(f"  {report.summary()}", flush=True)
    bad = [r.device for r in reports if not r.ok]
    if bad:
        print(
            f"check FAILED on {', '.join(bad)}: the fused kernels disagree with stock there; "
            f"use --kernels stock for training on {'it' if len(bad) == 1 else 'them'}"
        )
        return 1
    print("check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
