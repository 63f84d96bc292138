"""A direct call of the backward op with saved indices the forward never makes.

Rule (shared by the CPU and CUDA kernels): an index outside the pool window
contributes no gradient, exactly like the "no gradient" marker pool*pool, and
nothing is read or written outside a buffer. Before this rule the CPU kernels
read their offset table with the bad index and wrote grad_input far out of
bounds (a segfault), so the calls run in a child process: a crash is a failed
test, not a dead test session (on cuda, a dead CUDA context). On cpu the child
checks every CPU ISA build.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from op_helpers import cpu_and_cuda, supported_cpu_isas

CHILD = textwrap.dedent(
    """
    import json, os, sys, torch, fmnist_ext
    bwd = torch.ops.fmnist_ext._conv_relu_maxpool2d_backward
    device, isas = sys.argv[1], sys.argv[2].split(",")
    # (pool, input shape, weight shape, padding, dtype, bad values)
    scenarios = [
        (2, (3, 2, 28, 28), (4, 2, 5, 5), 1, torch.float32, [5, 17, 200, 255]),
        (16, (3, 2, 40, 40), (4, 2, 5, 5), 1, torch.float32, [-1, -2**31, 2**31 - 1, 256, 257, 100000]),
        (2, (3, 6, 12, 12), (4, 6, 3, 3), 0, torch.float64, [255, 5]),
        (16, (3, 2, 20, 19), (4, 2, 3, 3), 0, torch.float64, [-1, 2**31 - 1]),
    ]
    results = []
    for isa in isas:
        if isa:
            os.environ["FMNIST_CPU_ISA"] = isa
        for pool, xs, ws, pad, dtype, bad_values in scenarios:
            torch.manual_seed(0)
            x = torch.randn(xs, dtype=dtype).to(device)
            w = torch.randn(ws, dtype=dtype).to(device)
            out, idx = torch.ops.fmnist_ext.conv_relu_maxpool2d(x, w, None, [pad, pad], pool)
            g = torch.randn_like(out)
            for bad in bad_values:
                corrupt = idx.clone()
                flat = corrupt.view(-1)
                hit = torch.arange(0, flat.numel(), 3, device=device)  # every third window, first and last included
                hit = torch.cat([hit, torch.tensor([flat.numel() - 1], device=device)])
                if idx.dtype == torch.int32:
                    flat[hit] = torch.tensor(bad, dtype=torch.int64).to(flat.device, flat.dtype)
                else:
                    flat[hit] = bad
                expected_idx = idx.clone()
                expected_idx.view(-1)[hit] = pool * pool  # "no gradient"
                got = bwd(g, x, w, corrupt, [pad, pad], pool, [True, True, True])
                want = bwd(g, x, w, expected_idx, [pad, pad], pool, [True, True, True])
                same = all(torch.equal(a, b) for a, b in zip(got, want))
                results.append({"isa": isa, "pool": pool, "bad": bad, "same": same,
                                "stored": int(flat[hit[0]])})
    if device == "cuda":
        torch.cuda.synchronize()  # an illegal access surfaces here at the latest
    print(json.dumps(results))
    """
)
SCENARIO_BAD_VALUES = 4 + 6 + 2 + 2


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_out_of_window_indices_pass_no_gradient(device):
    isas = supported_cpu_isas() if device == "cpu" else [""]
    env = {k: v for k, v in os.environ.items() if k != "FMNIST_CPU_ISA"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, device, ",".join(isas)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stderr[-2000:]}"
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == len(isas) * SCENARIO_BAD_VALUES
    for r in results:
        assert r["same"], r
    # The int32 case really stored the negative / huge values it claims to test.
    stored = {r["stored"] for r in results if r["pool"] == 16}
    assert {-1, -(2**31), 2**31 - 1} <= stored
