"""The warp-level counter of the execution harness (tests/cuda_emulation,
counter.h) and scripts/cuda_cost.py, which turns its counts into estimated
H200 times. No GPU needed: the counter runs tiny kernels with known bank
conflicts and coalescing (count_selftest.cpp) on CPU threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cuda_emulation"))
import driver  # noqa: E402

# count_selftest.cpp runs each kernel on 3 blocks of 2 warps: 6 warp requests.
REQUESTS = 6
# (kernel, shared wavefronts per warp request, global sectors per request)
EXPECTED = [
    ("shared_stride2", 2, 4),  # 2-way bank conflict; the coalesced float store: 4 sectors
    ("shared_stride1", 1, 4),
    ("shared_broadcast", 1, 4),
    ("shared_stride32", 32, 4),
    ("shared_double", 2, 8),  # 256 bytes: 2 wavefronts; the double store: 8 sectors
    ("shared_float4", 4, 4),  # 512 bytes through load_vec: 4 wavefronts
    ("shared_float4_broadcast", 1, 4),
    ("global_coalesced", 1, 4),
    ("global_stride32", 1, 32),
]


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    exe = driver.build_counter(tmp_path_factory.mktemp("counter"), driver.HERE / "count_selftest.cpp")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        name, *kvs = line.split()
        out[name] = {k: int(v) for k, v in (kv.split("=") for kv in kvs)}
    return out


@pytest.mark.parametrize(("kernel", "wavefronts", "sectors"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_counter_wavefronts_and_sectors(selftest, kernel, wavefronts, sectors):
    c = selftest[kernel]
    assert (c["blocks"], c["warps"]) == (3, 6)
    assert c["shared_requests"] == REQUESTS, c
    assert c["shared_wavefronts"] == REQUESTS * wavefronts, c
    assert c["global_requests"] == REQUESTS, c
    assert c["global_sectors"] == REQUESTS * sectors, c
    assert c["barriers"] == 0, c


def test_counter_groups_a_warps_requests_by_instruction(selftest):
    # Even lanes run a load the odd ones skip; then all lanes run the next.
    # A warp runs them as two requests, each of one instruction: grouping the
    # i-th access of every lane would put the odd lanes' second load into the
    # even lanes' first request (12 sectors and 32 wavefronts per warp here).
    g = selftest["global_divergent"]  # in[t] (16 lanes), in[32 + t]: 4 + 4 sectors
    assert (g["global_requests"], g["global_sectors"]) == (2 * REQUESTS, 8 * REQUESTS), g
    s = selftest["shared_divergent"]  # bank 0 x 16 words, then bank 1 x 32 words
    assert (s["shared_requests"], s["shared_wavefronts"]) == (2 * REQUESTS, 48 * REQUESTS), s


def test_counter_distinct_dram_sectors_and_barriers(selftest):
    # 3 blocks store the same 64 floats (256 bytes = 8 sectors) ...
    assert selftest["shared_stride1"]["dram_write_sectors"] == 8
    # ... and read in[32 t], t < 64: every 32-byte sector once per t.
    assert selftest["global_stride32"]["dram_read_sectors"] == 64
    assert selftest["barriers"]["barriers"] == 2 * 6  # two __syncthreads per warp


def test_cuda_cost_script_writes_the_table_and_json(tmp_path):
    out = tmp_path / "cost.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cuda_cost.py"), "--batches", "6,12", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "fused/stock" in r.stdout
    data = json.loads(out.read_text())
    for batch in ("6", "12"):
        assert data["totals"][batch]["fused_us"] > 0
        assert data["totals"][batch]["stock_us"] > 0
    kernels = {(row["batch"], row["block"], row["kernel"].split("<")[0]) for row in data["fused"]}
    for batch in (6, 12):
        assert (batch, "block1", "forward_tiled_kernel") in kernels
        assert (batch, "block2", "forward_tiled_kernel") in kernels
        assert (batch, "block2", "backward_input_patch_kernel") in kernels
        assert (batch, "block2", "backward_weight_dense_kernel") in kernels
        assert (batch, "block2", "reduce_partials_kernel") in kernels
    # Block 1's input needs no gradient: no grad_input kernel, as in training.
    assert not any(k[1] == "block1" and k[2].startswith("backward_input") for k in kernels)
    for row in data["fused"]:
        assert row["shared_wavefronts"] >= row["shared_ideal_wavefronts"]
        assert row["time_us"] > 0
