"""Determinism of the CPU kernels: outputs bit for bit identical across repeated calls and
across torch.set_num_threads(1) and (2), for every op, on shapes that take every parallel path
(many tiles / rows per thread, a single attention tile, chunked rows), every dtype family and
non-finite values. Bitwise: compared as integers, so -0.0 and NaN payloads count too."""

from __future__ import annotations

import pytest
import torch

from gtp_kernels import ops, reference
from gtp_kernels._extension import extension_available

pytestmark = pytest.mark.skipif(not extension_available(), reason="gtp_kernels._C is not built")

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(_INT_VIEW[t.element_size()]) if t.is_floating_point() else t


def assert_bitwise(a, b, what):
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape and torch.equal(bits(x), bits(y)), what


def _qkv(b, h, n, d, dv=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(b * 1000 + n)
    if dv is None:
        qkv = torch.randn(b, n, 3, h, d, generator=g).to(dtype) * 2
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return [torch.randn(b, h, n, x, generator=g).to(dtype) for x in (d, d, dv)]


def _attention_cases():
    q, k, v = _qkv(1, 1, 6, 64, 85)
    q2, k2, v2 = _qkv(3, 2, 50, 16, 16, torch.float64)
    qn, kn, vn = _qkv(2, 3, 40, 8)
    kn = kn.clone()
    kn[0, 1, 3, 2] = float("inf")
    return {
        "deit_s_b4": (*_qkv(4, 6, 197, 64), torch.rand(4, 197).log(), 0.125, 0.6, 1, "mixed_max"),
        "single_tile_n6_dv85": (q, k, v, None, 0.125, 0.6, 1, "mixed_max"),
        "single_tile_n197": (*_qkv(1, 1, 197, 64), None, 0.125, 0.6, 1, "colsum_mean"),
        "float64": (q2, k2, v2, None, 0.25, 0.3, 2, "cls_max"),
        "bfloat16": (*_qkv(2, 4, 65, 16, dtype=torch.bfloat16), None, 0.25, 0.9, 1, "sum_max"),
        "nonfinite": (qn, kn, vn, None, 0.35, 0.6, 1, "diag_max"),
    }


def _build_graph_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 196, 384, generator=g)
    x[1, 7, 3] = float("nan")
    return {
        "deit_s_b4": (x, 14, 14, 8, "mixed"),
        "b1_row_blocks": (torch.randn(1, 196, 64, generator=g), 14, 14, 8, "mixed"),
        "n600_large_k": (torch.randn(2, 600, 16, generator=g), 20, 30, 40, "semantic"),
        "float16": (torch.randn(3, 64, 32, generator=g).half(), 8, 8, 5, "mixed"),
    }


def _select_tokens_cases():
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(-3, 4, (2048, 196), generator=g).float()  # several chunks
    ties[::5, ::7] = float("nan")
    return {"deit_s_b64": (torch.randn(64, 196, generator=g), 8), "chunked_ties": (ties, 40)}


def _propagate_cases():
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (b, m, n, c, dtype) in {
        "deit_s_b16": (16, 1, 196, 384, torch.float32),
        "bfloat16": (4, 1, 196, 64, torch.bfloat16),
        "float16_c0": (3, 2, 64, 0, torch.float16),
    }.items():
        x = torch.randn(b, m + n, c, generator=g).to(dtype)
        side = int(n**0.5)
        index, weight = reference.build_graph(x[:, m:].float(), side, n // side, 8, "mixed")
        keep = torch.stack([torch.randperm(n, generator=g)[: n - 8] for _ in range(b)])
        out[name] = (x, index, weight, keep, 0.3, m, torch.rand(b, m + n, generator=g) + 1)
    return out


CASES = {
    "attention": _attention_cases,
    "build_graph": _build_graph_cases,
    "select_tokens": _select_tokens_cases,
    "propagate": _propagate_cases,
}


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _gpu_backends(op):
    """(backend, device) of every GPU backend that runs here (none on a CPU-only machine)."""
    if not torch.cuda.is_available():
        return []
    from fuzz import available_backends

    return [(b, "cuda") for b in available_backends(op, "cuda")]


def test_gpu_bitwise_across_calls():
    """GPU backends (per-(image, head) / per-row programs without atomics): repeated calls are
    bit for bit identical on every case above. Runs unchanged on a machine with a GPU; skips
    without one."""
    runs = [(op, b, d) for op in CASES for b, d in _gpu_backends(op)]
    if not runs:
        pytest.skip("no GPU backend runs here")
    for op, backend, device in runs:
        fn = getattr(ops, op)
        for name, args in CASES[op]().items():
            args = _to(args, device)
            first = fn(*args, backend=backend)
            for _ in range(2):
                assert_bitwise(fn(*args, backend=backend), first, f"{op}/{name} on {backend}")


@pytest.mark.parametrize("op, name", [(op, name) for op, make in CASES.items() for name in make()])
def test_bitwise_across_calls_and_threads(op, name):
    args = CASES[op]()[name]
    fn = getattr(ops, op)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = fn(*args, backend="cpu")
        for _ in range(2):
            assert_bitwise(fn(*args, backend="cpu"), first, f"{op}/{name}: repeated call")
        torch.set_num_threads(1)
        assert_bitwise(fn(*args, backend="cpu"), first, f"{op}/{name}: 1 vs 2 threads")
    finally:
        torch.set_num_threads(before)
