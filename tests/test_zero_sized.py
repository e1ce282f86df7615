"""Zero-sized inputs on every op and backend: B = 0, no image tokens (n = 0, every token a
prefix), C = 0 channels, head dims d = 0 / dv = 0, P = 0, K = 0, graph rows without slots
(W = 0) and kept rows whose slots are all empty. Each gives outputs of the right shape equal to
the reference's, and no error. scripts/sanitize.sh runs this file under ASan + UBSan, which is
where a memcpy / pointer offset on the null data pointer of an empty tensor would show."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close

from gtp_kernels import ops
from gtp_kernels._extension import extension_available

needs_ext = pytest.mark.skipif(not extension_available(), reason="gtp_kernels._C is not built")
KERNELS = [pytest.param("cpu", marks=needs_ext)]


def equal(got, want):
    """Same shapes and dtypes; integer outputs equal, floats within the dtype's rounding (the
    kernels contract multiply-adds into FMAs where the reference rounds twice)."""
    for a, e in zip(got, want, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        if a.is_floating_point():
            assert_close(a, e, **TOL[a.dtype])
        else:
            assert torch.equal(a, e), (a, e)


ATTENTION = {  # (B, H, N, d, dv, num_prefix, theta)
    "B0": (0, 2, 5, 4, 4, 1, 0.6),
    "N0": (2, 2, 0, 4, 4, 0, 0.6),
    "n0_all_prefix": (2, 2, 3, 4, 4, 3, 0.6),
    "d0": (2, 3, 5, 0, 4, 1, 0.6),
    "dv0": (2, 3, 5, 4, 0, 1, 0.6),
    "d0_dv0": (2, 1, 5, 0, 0, 1, 0.3),
    "N1": (3, 2, 1, 4, 4, 0, 0.3),
}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", list(ATTENTION))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_attention(backend, case, dtype):
    b, h, n, d, dv, m, theta = ATTENTION[case]
    q, k = (torch.randn(b, h, n, d).to(dtype) for _ in range(2))
    v = torch.randn(b, h, n, dv).to(dtype)
    ls = torch.zeros(b, n)
    for score in ("none", "mixed_max", "colsum_mean"):
        for log_sizes in (None, ls):
            args = (q, k, v, log_sizes, 0.5, theta, m, score)
            got = ops.attention(*args, backend=backend)
            want = ops.attention(*args, backend="reference")
            assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])


BUILD_GRAPH = {  # (B, h, w, C, K)
    "B0": (0, 3, 3, 4, 2),
    "C0": (2, 3, 3, 0, 2),
    "K0": (2, 3, 3, 4, 0),
    "n1": (2, 1, 1, 4, 0),
    "C0_K_max": (1, 2, 3, 0, 5),
}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", list(BUILD_GRAPH))
@pytest.mark.parametrize("graph", ["spatial", "semantic", "mixed"])
def test_build_graph(backend, case, graph):
    b, hh, ww, c, kk = BUILD_GRAPH[case]
    tokens = torch.randn(b, hh * ww, c)
    equal(
        ops.build_graph(tokens, hh, ww, kk, graph, backend=backend),
        ops.build_graph(tokens, hh, ww, kk, graph, backend="reference"),
    )


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape, p", [((0, 5), 2), ((3, 1), 0), ((3, 6), 0), ((0, 1), 0)])
def test_select_tokens(backend, shape, p):
    score = torch.randn(shape)
    equal(
        ops.select_tokens(score, p, backend=backend),
        ops.select_tokens(score, p, backend="reference"),
    )


def _propagate_case(b, m, n, c, width, kept, *, empty_rows=False):
    x = torch.randn(b, m + n, c)
    index = torch.randint(-1, max(n, 1), (b, n, width), dtype=torch.int32)
    if empty_rows:
        index[:, ::2] = -1  # kept rows with no neighbour in any slot
    weight = torch.rand(b, n, width)
    keep = torch.zeros(b, kept, dtype=torch.int64)
    for i in range(b):
        keep[i] = torch.randperm(n)[:kept].sort().values
    sizes = torch.rand(b, m + n) + 1
    return x, index, weight, keep, sizes


PROPAGATE = {  # (B, M, n, C, W, kept)
    "B0": (0, 1, 6, 3, 4, 4),
    "C0": (2, 1, 6, 0, 4, 3),
    "C0_no_prefix": (2, 0, 6, 0, 4, 3),
    "n0": (2, 3, 0, 4, 4, 0),
    "n0_C0": (2, 2, 0, 0, 3, 0),
    "W0": (2, 1, 6, 3, 0, 3),
    "P0": (2, 1, 6, 3, 4, 6),
    "C0_W0": (2, 1, 5, 0, 0, 2),
}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", list(PROPAGATE))
@pytest.mark.parametrize("empty_rows", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_propagate(backend, case, empty_rows, dtype):
    x, index, weight, keep, sizes = _propagate_case(*PROPAGATE[case], empty_rows=empty_rows)
    x = x.to(dtype)
    for alpha in (0.0, 0.3):
        for s in (None, sizes):
            args = (x, index, weight, keep, alpha, PROPAGATE[case][1], s)
            equal(ops.propagate(*args, backend=backend), ops.propagate(*args, backend="reference"))
