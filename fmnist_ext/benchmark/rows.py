"""One benchmark row: every implementation of one block, batch size and pass,
checked against stock (gate.py), then timed interleaved (timing.py).

Every figure a row holds is a time measured in this run or a ratio of such
times; stock is always measured, as the baseline of the ratios.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .blocks import BLOCKS, PASSES, BlockSpec
from .compile_cache import CompileState, compile_stock
from .gate import check_implementation
from .impls import Impl, as_float64, make_inputs, pass_runner, stock_block
from .render import fmt_ms
from .timing import ROUNDS, first_line, sync, time_interleaved


def bench_row(
    block: BlockSpec,
    batch: int,
    pass_name: str,
    impls: dict[str, Impl | None],
    device: torch.device,
    threads: int,
    min_run_time: float,
    peaks: dict | None,
    compile_state: CompileState | None = None,
    rounds: int = ROUNDS,
) -> list[dict]:
    """One row: every implementation of `impls` (name -> callable; None for
    "compile", built here) checked against stock on the same inputs, then the
    ones that pass timed interleaved. Returns one record per implementation.
    Stock is always measured (it is the baseline of the ratios)."""
    compile_state = compile_state or CompileState()
    inp = make_inputs(block, batch, device)
    expected = pass_runner(stock_block, inp, pass_name)()
    # The same in float64: the yardstick for the gate (compare_results).
    exact = pass_runner(stock_block, as_float64(inp), pass_name)()
    sync(device)
    records: dict[str, dict] = {}
    runs: dict[str, Callable[[], Any]] = {}
    order = ["stock"] + [n for n in impls if n != "stock"]
    flops = block.flops(batch, pass_name)
    nbytes = block.bytes_moved(batch, pass_name, inp.x.element_size())
    for name in order:
        rec = {
            "block": block.index,
            "batch": batch,
            "pass": pass_name,
            "impl": name,
            "status": "ok",
            "reason": None,
            "flops": flops,
            "bytes": nbytes,
        }
        records[name] = rec
        fn = stock_block if name == "stock" else impls[name]
        if name == "compile" and fn is None:
            rec["compile_s"] = None
            if compile_state.failed_reason is not None:
                rec.update(status="skipped", reason=f"torch.compile unavailable: {compile_state.failed_reason}")
                continue
            try:
                fn, rec["compile_s"] = compile_stock(inp, pass_name)
            except Exception as exc:
                compile_state.failed_reason = f"{type(exc).__name__}: {first_line(exc)}"
                rec.update(status="skipped", reason=f"torch.compile failed: {compile_state.failed_reason}")
                continue
        check = check_implementation(fn, inp, pass_name, expected, exact=exact)
        rec["check"] = check.to_json()
        if not check.ok:
            rec.update(status="refused", reason=check.reason)
            continue
        runs[name] = pass_runner(fn, inp, pass_name)
    label = f"block {block.index} B={batch} {pass_name}"
    timings = time_interleaved(runs, min_run_time, threads, rounds, label)
    stock_s = timings["stock"]["median_s"] if "stock" in timings else None
    for name, t in timings.items():
        rec = records[name]
        rec.update(t)
        s = t["median_s"]
        rec["speedup_vs_stock"] = (stock_s / s) if stock_s else None
        rec["gflops"] = flops / s / 1e9
        rec["gbps"] = nbytes / s / 1e9
        if peaks:
            rec["frac_peak_flops"] = rec["gflops"] / peaks["sgemm"]["gflops"]
            rec["frac_peak_bw"] = rec["gbps"] / peaks["copy"]["gbps"]
    del inp, expected, runs
    return [records[n] for n in order]


def bench_rows(blocks, batch_sizes, impl_fns, device, threads, min_run_time, peaks, compile_state, rows, log):
    """Every row of `blocks` x `batch_sizes` x PASSES, appended to `rows` as it
    is measured (so the rows done survive a failure), one progress line each."""
    for bi in blocks:
        for batch in batch_sizes:
            for ps in PASSES:
                t0 = time.perf_counter()
                recs = bench_row(BLOCKS[bi], batch, ps, impl_fns, device, threads, min_run_time, peaks, compile_state)
                rows.extend(recs)
                summary = ", ".join(
                    f"{r['impl']} {fmt_ms(r.get('median_s'))} ms"
                    if r["status"] == "ok"
                    else f"{r['impl']} {r['status'].upper()}"
                    for r in recs
                )
                log(f"  block {bi} B={batch} {ps}: {summary} ({time.perf_counter() - t0:.1f} s)")
