"""Random shapes against the stock sequence (property-based), on every device."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from op_helpers import assert_matches_stock, cpu_and_cuda, make_case


@pytest.mark.parametrize("device", cpu_and_cuda())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 3),
    cin=st.integers(1, 4),
    cout=st.integers(1, 9),
    h=st.integers(1, 16),
    w=st.integers(1, 30),
    kh=st.integers(1, 6),
    kw=st.integers(1, 10),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    pool=st.integers(1, 4),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_random_shapes_match_stock(device, n, cin, cout, h, w, kh, kw, ph, pw, pool, bias, dtype):
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    assume(oh >= pool and ow >= pool)
    x, wt, b = make_case(n, cin, h, w, cout, (kh, kw), dtype=dtype, bias=bias, device=device)
    assert_matches_stock(x, wt, b, (ph, pw), pool, dtype)
