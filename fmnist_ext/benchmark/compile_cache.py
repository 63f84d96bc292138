"""torch.compile for the benchmark: cold compiles, one static graph per row.

The reported compile time must be a cold compile, not a hit in a cache an
earlier run left behind: inductor's FX-graph cache and AOTAutograd's cache
are turned off, and the run gets a fresh inductor (and triton) cache
directory unless the user chose one. A one-time start-up compile is
measured separately (init_s) so the first row is not charged for imports
and toolchain checks. The whole-model workers use disable_compile_caches too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..op._torch_internals import default_inductor_cache_dir, disable_compile_caches
from .impls import RowInputs, pass_runner, stock_block
from .timing import first_line, sync


@dataclass
class CompileState:
    """torch.compile availability across rows: after the first failure the
    remaining rows are skipped with that reason."""

    failed_reason: str | None = None


def prepare_compile(device: torch.device, state: CompileState) -> dict:
    """Before the first row: point inductor (and triton) at a fresh cache
    directory for this run, unless the user chose one, so compile times are
    not hits in caches left by earlier runs; then compile a trivial function
    once, so that one-time start-up (imports, toolchain checks) is reported as
    `init_s` and not charged to the first row. A failure here skips compile
    for every row, with the reason."""
    info: dict[str, Any] = {"caches": disable_compile_caches()}
    user_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    default_dir = default_inductor_cache_dir()  # importing torch._dynamo sets the variable to it
    if user_dir is not None and default_dir is not None and os.path.abspath(user_dir) == os.path.abspath(default_dir):
        user_dir = None
    if user_dir is None:
        d = tempfile.mkdtemp(prefix="fmnist-bench-inductor-")
        info.update(fresh_cache_dir=True, _dir=d, _previous=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
        if "TRITON_CACHE_DIR" not in os.environ:
            os.environ["TRITON_CACHE_DIR"] = os.path.join(d, "triton")
            info["_triton"] = True
    else:
        info.update(fresh_cache_dir=False, cache_dir=os.environ["TORCHINDUCTOR_CACHE_DIR"])
    try:
        torch.compiler.reset()
        t = torch.randn(8, device=device)
        t0 = time.perf_counter()
        torch.compile(lambda v: torch.relu(v * 2.0) + 1.0, dynamic=False)(t)
        sync(device)
        info["init_s"] = time.perf_counter() - t0
    except Exception as exc:
        state.failed_reason = f"{type(exc).__name__}: {first_line(exc)}"
        info["failed"] = state.failed_reason
    return info


def restore_compile_cache_dir(info: dict) -> None:
    if info.get("_previous") is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = info["_previous"]
    if info.get("_triton"):
        os.environ.pop("TRITON_CACHE_DIR", None)
    shutil.rmtree(info["_dir"], ignore_errors=True)


def compile_stock(inp: RowInputs, pass_name: str):
    """torch.compile the stock sequence for this row and call it once for
    `pass_name`; return (the compiled function, compile_s) or raise. Dynamo is
    reset so every row compiles its own static graph."""
    disable_compile_caches()
    torch.compiler.reset()
    compiled = torch.compile(stock_block, dynamic=False)
    run = pass_runner(compiled, inp, pass_name)
    t0 = time.perf_counter()
    run()  # first call traces and compiles (forward, and backward for the bwd passes)
    sync(inp.x.device)
    compile_s = time.perf_counter() - t0
    return compiled, compile_s
