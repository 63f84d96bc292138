"""A direct call of the backward op with saved indices the forward never makes.

Rule (shared by the CPU and CUDA kernels): an index outside the pool window
contributes no gradient, exactly like the "no gradient" marker pool*pool, and
nothing is read or written outside a buffer. Before this rule the CPU kernels
read their offset table with the bad index and wrote grad_input far out of
bounds (a segfault), so the calls run in a child process: a crash is a failed
test, not a dead test session. The child checks every CPU ISA build.
"""

import json
import os
import subprocess
import sys
import textwrap

from conftest import requires_compiled_cpu, supported_cpu_isas

CHILD = textwrap.dedent(
    """
    import json, os, sys, torch, fmnist_ext
    bwd = torch.ops.fmnist_ext._conv_relu_maxpool2d_backward
    results = []
    for isa in sys.argv[1].split(","):
        os.environ["FMNIST_CPU_ISA"] = isa
        for pool, size, bad_values in ((2, 28, [5, 17, 200, 255]), (16, 40, [-1, -2**31, 2**31 - 1, 256, 257, 100000])):
            torch.manual_seed(0)
            x = torch.randn(3, 2, size, size)
            w = torch.randn(4, 2, 5, 5)
            out, idx = torch.ops.fmnist_ext.conv_relu_maxpool2d(x, w, None, [1, 1], pool)
            g = torch.randn_like(out)
            for bad in bad_values:
                corrupt = idx.clone()
                flat = corrupt.view(-1)
                hit = torch.arange(0, flat.numel(), 3)  # every third window, first and last included
                hit = torch.cat([hit, torch.tensor([flat.numel() - 1])])
                flat[hit] = torch.tensor(bad, dtype=torch.int64).to(flat.dtype) if idx.dtype == torch.int32 else bad
                expected_idx = idx.clone()
                expected_idx.view(-1)[hit] = pool * pool  # "no gradient"
                got = bwd(g, x, w, corrupt, [1, 1], pool, [True, True, True])
                want = bwd(g, x, w, expected_idx, [1, 1], pool, [True, True, True])
                same = all(torch.equal(a, b) for a, b in zip(got, want))
                results.append({"isa": isa, "pool": pool, "bad": bad, "same": same,
                                "stored": int(flat[hit[0]])})
    print(json.dumps(results))
    """
)


@requires_compiled_cpu
def test_out_of_window_indices_pass_no_gradient_on_every_isa():
    isas = supported_cpu_isas()
    env = {k: v for k, v in os.environ.items() if k != "FMNIST_CPU_ISA"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(isas)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"child died with {out.returncode}: {out.stderr[-2000:]}"
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == len(isas) * 10
    for r in results:
        assert r["same"], r
    # The int32 case really stored the negative / huge values it claims to test.
    stored = {r["stored"] for r in results if r["pool"] == 16}
    assert {-1, -(2**31), 2**31 - 1} <= stored
