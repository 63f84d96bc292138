"""Timing: torch.utils.benchmark measurements, interleaved across implementations.

Times are medians of Timer.blocked_autorange measurements (which synchronize
CUDA); the implementations of one row are interleaved in rounds, in the same
process on the same tensors, so slow drifts of the machine hit all of them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import benchmark as tbench

ROUNDS = 3  # interleaving rounds per row (each impl measured once per round)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (for one-line reasons in the report)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line[:limit]


def timer(run: Callable[[], Any], label: str, threads: int) -> tbench.Timer:
    return tbench.Timer(stmt="run()", globals={"run": run}, label=label, num_threads=threads)


def summarise(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "iqr_s": q[2] - q[0],
        "min_s": times[0],
        "n_measurements": len(times),
    }


def time_interleaved(
    runs: dict[str, Callable[[], Any]],
    min_run_time: float,
    threads: int,
    rounds: int = ROUNDS,
    label: str = "",
) -> dict[str, dict]:
    """Median per-call time of each callable, measured in `rounds` rounds that
    visit every callable once (order rotated each round) with
    Timer.blocked_autorange(min_run_time / rounds)."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round = min_run_time / rounds
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            m = timer(runs[name], f"{label} {name}", threads).blocked_autorange(min_run_time=per_round)
            times[name].extend(m.times)
    return {n: summarise(t) for n, t in times.items()}
