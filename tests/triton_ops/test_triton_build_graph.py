"""build_graph in Triton against the reference: the CPU tests' hand cases, properties, sample
set and bad inputs; fresh random inputs of every graph type (n from 1 to 576, every dtype and
layout, exact ties, one-hot, NaN / Inf, huge and subnormal tokens) checked by tests/fuzz.py's
checker; every launcher configuration; opcheck; bitwise repeatability.

Differences from the reference are only those tests/fuzz.py accepts: a neighbour whose
float64 similarity lies within float32 rounding of the row's K-th largest (the kernel sums
each dot product in channel order, the reference's GEMM in its own order), never an exact tie
won by the higher index."""

from __future__ import annotations

import fuzz
import pytest
import test_build_graph as tg
import test_nonfinite as tn
import torch
from triton_device import DEVICE

import gtp_kernels.ops as ops
from gtp_kernels.reference import build_graph as ref_build_graph
from gtp_kernels.triton import build_graph as tbg
from gtp_kernels.triton._common import recording

GRAPHS = ("spatial", "semantic", "mixed")
NAN, INF = float("nan"), float("inf")


def _on_device(fn):
    """Run a CPU test function with its tensors made on DEVICE."""
    before = torch.get_default_device()
    torch.set_default_device(DEVICE)
    try:
        fn()
    finally:
        torch.set_default_device(before)


def to_device(t: torch.Tensor) -> torch.Tensor:
    """t on DEVICE with the same strides (Tensor.to makes a sliced view contiguous)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE)
    return out.copy_(t)


def triton_graph(tokens, height, width, k, graph):
    return ops.build_graph(tokens, height, width, k, graph, backend="triton")


def check(tokens, height, width, k, graph):
    """The Triton graph of this case against the reference, by tests/fuzz.py's checker (which
    builds its case from a spec: here it is handed ours)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fuzz, "build_build_graph", lambda spec: (tokens, height, width, k, graph))
        fuzz.check_build_graph({}, "triton")


def spec(h, w, c, k, graph, b=2, dtype="f32", layout="contiguous", values="randn", seed=0):
    """A tests/fuzz.py build_graph case."""
    return dict(b=b, h=h, w=w, c=c, k=k, graph=graph, dtype=dtype, layout=layout,
                values=values, nonfinite=0, seed=seed)  # fmt: skip


def check_spec(case: dict):
    tokens, *rest = fuzz.build_build_graph(case)
    check(to_device(tokens), *rest)


# ------------------------------------------------------------- the CPU tests, on Triton


def test_by_hand():
    _on_device(lambda: tg.test_spatial_3x3_by_hand("triton"))
    _on_device(lambda: tg.test_semantic_by_hand_tie_goes_to_lower_index("triton"))
    _on_device(lambda: tg.test_mixed_by_hand_is_union("triton"))


@pytest.mark.parametrize("hw", [(3, 5), (5, 3), (1, 7), (7, 1), (1, 1), (2, 2), (4, 6)])
def test_spatial_non_square(hw):
    _on_device(lambda: tg.test_spatial_non_square("triton", hw))


def test_k_zero_and_k_max():
    _on_device(lambda: tg.test_k_zero_and_k_max("triton"))


@pytest.mark.parametrize("graph", GRAPHS)
def test_properties(graph):
    _on_device(lambda: tg.test_properties("triton", graph))


def test_exact_ties_go_to_the_lower_index():
    _on_device(lambda: tg.test_many_exact_ties("triton"))
    _on_device(lambda: tg.test_many_exact_ties_large("triton"))  # n = 600: 10 x 10 tiles


@pytest.mark.parametrize("channels", [0, 4])
def test_zero_tokens_tie_everywhere(channels):
    _on_device(lambda: tg.test_zero_tokens_tie_everywhere("triton", channels))


@pytest.mark.parametrize("case", range(len(tg.BAD)))
def test_bad_inputs(case):
    make, msg = tg.BAD[case]
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in make()]
    with pytest.raises(ValueError, match=msg):
        triton_graph(*args)


def test_limits():
    """float64 tokens (the kernels compute in float32) and semantic graphs of more than 1024
    tokens (a row of similarities lives in registers) raise errors naming the argument; the
    spatial graph takes any n."""
    x = torch.randn(2, 12, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="takes tokens as float32, float16 or bfloat16"):
        triton_graph(x, 3, 4, 2, "mixed")
    x = torch.randn(1, 1025, 2, device=DEVICE)
    for graph in ("semantic", "mixed"):
        with pytest.raises(ValueError, match=r"at most 1024 image tokens.*tokens.shape\[1\]"):
            triton_graph(x, 25, 41, 3, graph)
    x = torch.randn(1, 2000, 2, device=DEVICE)
    index, _ = triton_graph(x, 40, 50, 0, "mixed")  # K = 0: the spatial graph
    assert torch.equal(index, ref_build_graph(x, 40, 50, 0, "mixed")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_samples(dtype):
    """tests/test_build_graph.py's sample set: odd sizes, B > 1, non-contiguous and strided
    tokens, empty batch, exact duplicates, K = 0 and K = n - 1, n = 196 and n = 576 (those
    two in float32 only: 15 s a dtype under the interpreter)."""
    for case in tg.sample_inputs(DEVICE, dtype):
        if dtype != torch.float32 and case[0].shape[1] > 100:
            continue
        index, weight = triton_graph(*case)
        ref_index, _ = ref_build_graph(*case)
        assert index.shape == ref_index.shape and index.device == case[0].device
        assert index.dtype == torch.int32 and weight.dtype == torch.float32
        check(*case)


def test_opcheck():
    cases = [c for c in tg.sample_inputs(DEVICE) if c[0].shape[1] < 20]
    x = torch.randn(2, 12, 6, device=DEVICE, requires_grad=True)  # no gradient through it
    cases.append((x, 3, 4, 2, "mixed"))
    for case in cases:
        torch.library.opcheck(torch.ops.gtp_triton.build_graph.default, case)


# ------------------------------------------------------------------- fresh random inputs


@pytest.mark.parametrize(
    "h, w, c, ks, batch, layout",
    [
        (1, 1, 4, [0], 3, "contiguous"),  # n = 1
        (1, 5, 7, [0, 1, 2, 4], 3, "transposed"),  # n = 5
        (17, 1, 9, [0, 3, 16], 2, "strided"),  # n = 17
        (5, 13, 24, [1, 8, 64], 2, "transposed"),  # n = 65
        (14, 14, 40, [8, 195], 2, "strided"),  # n = 196 (DeiT at 224 px)
    ],
)
@pytest.mark.parametrize("graph", GRAPHS)
def test_random_vs_reference(h, w, c, ks, batch, layout, graph):
    for k in ks:
        check_spec(spec(h, w, c, k, graph, b=batch, layout=layout, seed=h * w + k))


def test_random_vs_reference_576():
    """n = 576 (ViT at 384 px): the 1024-column configuration (the semantic graph at this n
    is in test_samples; K = n - 1 at n = 196 above)."""
    check_spec(spec(24, 24, 12, 8, "mixed", b=1, layout="strided", seed=1))


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_dtypes(dtype):
    for graph in ("semantic", "mixed"):
        check_spec(spec(7, 9, 33, 6, graph, b=2, dtype=dtype, layout="transposed", seed=3))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_duplicates_exact_ties(dtype):
    """Tokens that are copies of others, some scaled by powers of two (identical after
    normalisation): in every row they tie exactly, and the lower index wins, as a float64
    oracle with a stable sort says. 5 directions, so every top K is decided by such ties."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(5, 24, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 5, (1, 196), generator=g)
    scale = 2.0 ** torch.randint(-2, 3, (1, 196, 1), generator=g)
    x = (base[pick] * scale).to(fuzz.DTYPES[dtype])
    e = x.double() / x.double().norm(dim=-1, keepdim=True)
    sim = e @ e.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(-2.0)
    for k in (1, 8, 50):
        index, _ = triton_graph(to_device(x), 14, 14, k, "semantic")
        top = torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., :k]
        assert torch.equal(index.cpu().long(), top.sort(dim=-1).values), f"K={k}"


@pytest.mark.parametrize("values", ["onehot", "int", "duplicates"])
def test_exact_arithmetic_and_ties(values):
    """One-hot and small-integer tokens, and exact copies: ties decided on exact values."""
    for graph in ("semantic", "mixed"):
        check_spec(spec(6, 7, 5, 9, graph, b=2, values=values, seed=4))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_extreme_scales(dtype):
    """Tokens scaled to the edges of the dtype's range (|x| ~ 2^100 in float32: the sum of
    squares overflows float32; ~ 2^-100: it underflows)."""
    for seed in (6, 7):  # the spec scales up or down depending on the seed
        check_spec(spec(5, 7, 8, 4, "mixed", dtype=dtype, values="extreme", seed=seed))


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_token(value):
    """tests/test_nonfinite.py's rule: a token holding NaN or Inf has NaN similarity to every
    token, which ranks as the most similar; its own row takes the K lowest indices."""
    for k in (3, 40):
        _on_device(lambda k=k: tn.test_build_graph_nonfinite_token("triton", value, k))


def test_nonfinite_vs_reference():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 196, 6, generator=g)
    x[0, 4, 0], x[0, 9, 1], x[0, 195, 4] = NAN, INF, -INF
    x[1, 100:110, 2] = NAN
    x[2, :, 3] = NAN  # every token bad: every row the K lowest
    for graph in ("semantic", "mixed"):
        check(to_device(x), 14, 14, 8, graph)


@pytest.mark.parametrize(
    "dtype, exponent",
    [
        (torch.float32, 100),
        (torch.float32, -100),
        (torch.float32, -140),
        (torch.float16, 13),
        (torch.float16, -20),
    ],  # fmt: skip
)
def test_finite_extremes_bitwise(dtype, exponent):
    """tests/test_nonfinite.py: tokens times 2^e (huge, tiny, subnormal) give the graph of the
    unscaled tokens, bit for bit."""
    _on_device(lambda: tn.test_build_graph_finite_extremes("triton", dtype, exponent))


def test_empty_batch():
    x = torch.randn(0, 12, 5, device=DEVICE)
    for graph in GRAPHS:
        index, weight = triton_graph(x, 3, 4, 3, graph)
        w = tbg.graph_width(graph, 3)
        assert index.shape == (0, 12, w) and weight.shape == (0, 12, w)


# ---------------------------------------------------------------- configurations, bits


def test_every_select_config():
    """Every configuration the launcher can pick gives the same bits on one problem (the
    similarities do not depend on it and the selection is exact), a graph the reference
    accepts, with either search for the K-th key (extraction up to K = 16, bisection above);
    and the launcher picks from that list."""
    x = to_device(torch.randn(2, 32, 9).transpose(1, 2).contiguous().transpose(1, 2))
    for graph, k in (("mixed", 5), ("semantic", 16), ("semantic", 17)):
        want = triton_graph(x, 4, 8, k, graph)
        check(x, 4, 8, k, graph)
        for config in tbg.SELECT_CONFIGS:
            with tbg.forced_select_config(config):
                got = triton_graph(x, 4, 8, k, graph)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (config, k)
    for n in (2, 33, 64, 65, 196, 257, 576, 1024):
        assert tbg.select_config(n) in tbg.SELECT_CONFIGS and tbg.select_config(n).block_n >= n
    with tbg.forced_select_config(tbg.SELECT_CONFIGS[0]), pytest.raises(ValueError, match="fewer"):
        triton_graph(torch.randn(1, 49, 3, device=DEVICE), 7, 7, 2, "mixed")


def test_bitwise_repeatable():
    x = torch.randn(2, 196, 24, device=DEVICE)
    first = triton_graph(x, 14, 14, 8, "mixed")
    second = triton_graph(x, 14, 14, 8, "mixed")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_recording_launches():
    """The compile gate's view (benchmarks/triton_resources.py): on meta tensors the launcher
    records its launches and runs nothing."""
    x = torch.empty(256, 196, 384, dtype=torch.float16, device="meta")
    with recording() as launches:
        tbg.build_graph(x, 14, 14, 8, "mixed")
    names = [launch.kernel.__name__ for launch in launches]
    assert names == ["_normalise_kernel", "_similarity_kernel", "_select_kernel", "_weights_kernel"]
    assert launches[2].constexprs["BLOCK_N"] == 256
    with recording() as launches:
        tbg.build_graph(x, 14, 14, 0, "mixed")
    assert [launch.kernel.__name__ for launch in launches] == [
        "_spatial_rows_kernel",
        "_weights_kernel",
    ]
