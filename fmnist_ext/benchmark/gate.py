"""The correctness gate: an implementation is timed only if it matches stock.

Before any timing, each implementation's output (and, for the backward
passes, its gradients) is compared with stock on the very inputs that are
then timed; one that does not match is not timed and its row reads
``REFUSED: <why>``. The whole-model workers (model_worker.py) use the same
comparison for the model's loss, gradients and logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .impls import RESULT_NAMES, Impl, RowInputs, pass_runner, stock_block
from .timing import first_line, sync

# Correctness gate (float32; float64 would allow tighter): |impl - stock| <=
# ATOL_SCALE * max|stock| + RTOL * |stock|, elementwise, for the output and
# every gradient.
RTOL = 1e-4
ATOL_SCALE = 1e-4
STOCK_ERROR_FACTOR = 4.0  # with a float64 reference: "about as accurate as stock"


@dataclass
class CheckResult:
    ok: bool
    reason: str | None = None
    max_rel_err: dict[str, float] = field(default_factory=dict)  # max|diff| / max|stock| per tensor

    def to_json(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "max_rel_err": self.max_rel_err}


def compare_results(
    got: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    names: Sequence[str],
    rtol: float = RTOL,
    atol_scale: float = ATOL_SCALE,
    exact: Sequence[torch.Tensor] | None = None,
) -> CheckResult:
    """Elementwise |got - want| <= atol_scale * max|want| + rtol * |want| for each tensor.

    With `exact` (the stock sequence computed in float64 on the same inputs),
    both are compared with it instead, and an implementation passes when it is
    about as accurate as stock: |got - exact| <= max(atol_scale * max|exact|,
    STOCK_ERROR_FACTOR * max|want - exact|) + rtol * |exact|. Large batches
    sum hundreds of thousands of float32 terms into each weight gradient, so
    two correct implementations that add in different orders differ by more
    than a fixed tolerance; stock's own error is the yardstick there.
    """
    errs: dict[str, float] = {}
    if len(got) != len(want):
        return CheckResult(False, f"returned {len(got)} tensors, expected {len(want)}")
    for name, a, r in zip(names, got, want):
        if not isinstance(a, torch.Tensor):
            return CheckResult(False, f"{name} is {type(a).__name__}, not a tensor", errs)
        if a.shape != r.shape:
            return CheckResult(False, f"{name} has shape {tuple(a.shape)}, stock {tuple(r.shape)}", errs)
        if a.dtype != r.dtype:
            return CheckResult(False, f"{name} has dtype {a.dtype}, stock {r.dtype}", errs)
        a = a.detach().double()
        r = r.detach().double()
        if not torch.isfinite(a).all():
            return CheckResult(False, f"{name} has non-finite values", errs)
        what = "stock"
        atol = atol_scale * (r.abs().max().item() if r.numel() else 0.0)
        if exact is not None:
            e = exact[len(errs)].detach().double().to(r.device)
            stock_err = (r - e).abs().max().item() if r.numel() else 0.0
            atol = max(atol_scale * (e.abs().max().item() if e.numel() else 0.0), STOCK_ERROR_FACTOR * stock_err)
            r, what = e, "the float64 reference"
        scale = r.abs().max().item() if r.numel() else 0.0
        diff = (a - r).abs()
        max_diff = diff.max().item() if diff.numel() else 0.0
        errs[name] = max_diff / scale if scale > 0 else max_diff
        bad = diff > (atol + rtol * r.abs())
        n_bad = int(bad.sum().item())
        if n_bad:
            return CheckResult(
                False,
                f"{name} differs from {what} at {n_bad}/{r.numel()} elements "
                f"(max |diff| {max_diff:.3g}, max |ref| {scale:.3g}, rtol {rtol:g}, atol {atol:.3g})",
                errs,
            )
    return CheckResult(True, None, errs)


def check_implementation(
    fn: Impl,
    inp: RowInputs,
    pass_name: str,
    expected: Sequence[torch.Tensor] | None = None,
    rtol: float = RTOL,
    atol_scale: float = ATOL_SCALE,
    exact: Sequence[torch.Tensor] | None = None,
) -> CheckResult:
    """Run `fn` for `pass_name` on `inp` and compare output (and gradients)
    with the stock sequence on the same inputs (and, given `exact`, with its
    float64 result; see compare_results). Exceptions count as failures."""
    if expected is None:
        expected = pass_runner(stock_block, inp, pass_name)()
    try:
        got = pass_runner(fn, inp, pass_name)()
    except Exception as exc:
        return CheckResult(False, f"raised {type(exc).__name__}: {first_line(exc)}")
    sync(inp.x.device)
    return compare_results(got, expected, RESULT_NAMES[pass_name], rtol, atol_scale, exact)
