"""The CUDA kernels of every gtp op (csrc/cuda/*.cu) on a GPU: against the reference and the CPU
kernel on the CPU tests' sample sets (their sample_inputs, built on the GPU), opcheck, bad
arguments, the non-finite rule, determinism, both attention modes and engines, and the patched
DeiT-S with backend="cuda" equal to backend="reference".

Skips without a GPU or without a CUDA build; a GPU machine runs it unchanged:
    python -m pytest tests/test_cuda.py -q
and under compute-sanitizer as the README says (memcheck, racecheck, synccheck).
"""

from __future__ import annotations

import math

import pytest
import test_attention as ta
import test_build_graph as tb
import test_propagate as tp
import test_select_tokens as ts
import torch
from helpers import TOL, assert_close

import gtp_kernels.ops as ops
from gtp_kernels import reference
from gtp_kernels._extension import extension_available, has_kernel
from gtp_kernels.info import OPS
from gtp_kernels.reference.attention import attention_probs, num_masked

HAS_GPU = torch.cuda.is_available()
HAS_CUDA_KERNELS = extension_available() and all(has_kernel(op, "CUDA") for op in OPS)
pytestmark = pytest.mark.skipif(
    not (HAS_GPU and HAS_CUDA_KERNELS),
    reason="needs a CUDA GPU and a build with the CUDA kernels "
    f"(GPU: {HAS_GPU}, CUDA kernels: {HAS_CUDA_KERNELS}; see `python -m gtp_kernels.info`)",
)
DEV = "cuda"


def _cpu(x):
    """Tensors (in lists, tuples, dicts) to the CPU; other values unchanged."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def _same(got, want, name):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, name=f"{name}[{i}]")


# ---------------------------------------------------------------------------- select_tokens


def test_select_tokens_samples():
    for score, p in ts.sample_inputs(DEV):
        got = torch.ops.gtp.select_tokens(score, p)
        assert got[0].device == score.device and got[1].device == score.device
        _same(_cpu(got), _cpu(reference.select_tokens(score, p)), f"vs reference P={p}")
        _same(_cpu(got), torch.ops.gtp.select_tokens(score.cpu(), p), f"vs cpu P={p}")
        torch.library.opcheck(torch.ops.gtp.select_tokens.default, (score, p))


def test_select_tokens_ties_and_infinities():
    gen = torch.Generator().manual_seed(5)
    for _ in range(100):
        b = int(torch.randint(1, 5, (1,), generator=gen))
        n = int(torch.randint(1, 700, (1,), generator=gen))
        score = torch.randint(-3, 4, (b, n), generator=gen).float()
        score[score == 3] = float("inf")
        score[score == -3] = float("-inf")
        score = score * torch.where(torch.rand(b, n, generator=gen) < 0.5, -1.0, 1.0)
        p = int(torch.randint(0, n, (1,), generator=gen))
        got = torch.ops.gtp.select_tokens(score.to(DEV), p)
        _same(_cpu(got), torch.ops.gtp.select_tokens(score, p), f"n={n} P={p}")


def test_select_tokens_nan_ranks_greatest():
    # The non-finite rule: NaN scores rank above +inf, so they are kept first; equal NaNs
    # (any sign or payload) tie and the lower position is kept.
    nan = float("nan")
    score = torch.tensor([[0.5, nan, -nan, float("inf"), 0.1, nan]], device=DEV)
    keep, prop = torch.ops.gtp.select_tokens(score, 3)
    # ascending: 0.1 (4), 0.5 (0), +inf (3), then the three NaNs, which are all kept
    assert prop.tolist() == [[0, 3, 4]] and keep.tolist() == [[1, 2, 5]]
    _same(_cpu((keep, prop)), _cpu(reference.select_tokens(score, 3)), "vs reference")


def test_select_tokens_bad_inputs():
    for make, msg in ts.BAD:
        score, p = make()
        if "NaN" in msg:  # the non-finite rule: NaN no longer raises (see the test above)
            continue
        with pytest.raises(ValueError, match=msg):
            torch.ops.gtp.select_tokens(score.to(DEV), p)


# ------------------------------------------------------------------------------ build_graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_build_graph_samples(dtype):
    for case in tb.sample_inputs(DEV, dtype):
        name = tb._case_id(case)
        index, weight = torch.ops.gtp.build_graph(*case)
        r_index, r_weight = reference.build_graph(*case)
        assert_close(index.cpu(), r_index.cpu(), name=f"index vs reference {name}")
        assert_close(weight.cpu(), r_weight.cpu(), name=f"weight vs reference {name}")
        c_index, c_weight = torch.ops.gtp.build_graph(*_cpu(case))
        assert_close(index.cpu(), c_index, name=f"index vs cpu {name}")
        assert_close(weight.cpu(), c_weight, name=f"weight vs cpu {name}")


def test_build_graph_opcheck():
    for case in tb.sample_inputs(DEV):
        torch.library.opcheck(torch.ops.gtp.build_graph.default, case)


def test_build_graph_random_shapes_and_exact_ties():
    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        h, w = (int(v) for v in torch.randint(1, 30, (2,), generator=gen))
        n = h * w
        b = int(torch.randint(1, 3, (1,), generator=gen))
        c = int(torch.randint(1, 70, (1,), generator=gen))
        k = int(torch.randint(0, n, (1,), generator=gen))
        graph = ["spatial", "semantic", "mixed"][int(torch.randint(0, 3, (1,), generator=gen))]
        x = torch.randn(b, n, c, generator=gen)
        if n > 4:  # exact duplicates and power-of-two multiples: exact ties across the K-th place
            x[:, 1] = x[:, 0]
            x[:, n - 1] = 4 * x[:, 0]
        got = torch.ops.gtp.build_graph(x.to(DEV), h, w, k, graph)
        want = reference.build_graph(x, h, w, k, graph)
        name = f"B={b} {h}x{w} C={c} K={k} {graph}"
        assert_close(got[0].cpu(), want[0], name=f"index {name}")
        assert_close(got[1].cpu(), want[1], name=f"weight {name}")


def test_build_graph_large_n_uses_fewer_rows_per_block():
    # n = 2304 (48 x 48): 32 rows of 2304 similarities exceed 48 KiB of shared memory.
    x = torch.randn(1, 2304, 24, device=DEV)
    got = torch.ops.gtp.build_graph(x, 48, 48, 8, "mixed")
    want = reference.build_graph(x, 48, 48, 8, "mixed")
    assert_close(got[0].cpu(), want[0].cpu(), name="index")
    assert_close(got[1].cpu(), want[1].cpu(), name="weight")


def test_build_graph_nonfinite_token_is_most_similar_to_all():
    # A token with a NaN or Inf entry has NaN similarity to every token: it is every other
    # token's first semantic neighbour (ties between two such tokens: the lower index), and it
    # takes the K lowest indices itself. Weights stay finite.
    x = torch.randn(2, 16, 8, device=DEV)
    x[0, 5, 3] = float("nan")
    x[1, 9, 0] = float("inf")
    index, weight = torch.ops.gtp.build_graph(x, 4, 4, 3, "semantic")
    assert torch.isfinite(weight).all()
    rows0 = index[0].tolist()
    assert all(5 in row for i, row in enumerate(rows0) if i != 5)
    assert rows0[5] == [0, 1, 2]
    want = reference.build_graph(x, 4, 4, 3, "semantic")
    assert_close(index.cpu(), want[0].cpu(), name="index vs reference")
    assert_close(weight.cpu(), want[1].cpu(), name="weight vs reference")


def test_build_graph_no_overflow_in_normalisation():
    x = torch.randn(1, 9, 16, device=DEV)
    for scale, dtype in ((1e30, torch.float32), (1e200, torch.float64)):
        big = (x.double() * scale).to(dtype)
        got = torch.ops.gtp.build_graph(big, 3, 3, 2, "semantic")
        want = torch.ops.gtp.build_graph(x, 3, 3, 2, "semantic")
        assert_close(got[0].cpu(), want[0].cpu(), name=f"index at scale {scale}")


def test_build_graph_bad_inputs():
    for make, msg in tb.BAD:
        args = make()
        if "NaN" in msg:  # the non-finite rule: NaN no longer raises
            continue
        args = (args[0].to(DEV), *args[1:])
        with pytest.raises(ValueError, match=msg):
            torch.ops.gtp.build_graph(*args)


# -------------------------------------------------------------------------------- propagate


def _propagate_tol(dtype):
    return (
        TOL[dtype]
        if dtype in (torch.float64, torch.bfloat16, torch.float16)
        else TOL[torch.float32]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(tp.SAMPLES))
def test_propagate_samples(name, dtype):
    args = dict(tp.sample_inputs(DEV, dtype))[name]
    got = torch.ops.gtp.propagate(*args)
    assert got[0].is_contiguous()
    tp._compare(_cpu(got), _cpu(reference.propagate(*args)), _propagate_tol(dtype), name)
    tp._compare(_cpu(got), torch.ops.gtp.propagate(*_cpu(args)), _propagate_tol(dtype), name)


@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_propagate_strided_x_on_device(layout, dtype):
    """x views made on the GPU (a CPU view moved with .to() would arrive contiguous): the scalar
    path (rows not 16-byte aligned) and the copy of a channel-strided x."""
    b, m, n, c, w, p = 2, 1, 12, 40, 10, 4
    args = tp.make_case(b, m, n, c, w, p, dtype=dtype, device=DEV, seed=11)
    big = torch.randn(2 * b, 2 * (m + n), c + 1, device=DEV).to(dtype)
    if layout == "strided":
        x = big[::2, ::2, :c]
    elif layout == "transposed":
        x = torch.randn(b, c, m + n, device=DEV).to(dtype).transpose(1, 2)
    else:  # one element in: no row is 16-byte aligned
        x = big.flatten()[1 : 1 + b * (m + n) * c].view(b, m + n, c)
    args[0] = x
    got = torch.ops.gtp.propagate(*args)
    tp._compare(_cpu(got), _cpu(reference.propagate(*args)), _propagate_tol(dtype), layout)


@pytest.mark.parametrize("name", list(tp.SAMPLES))
def test_propagate_opcheck(name):
    args = dict(tp.sample_inputs(DEV))[name]
    args[0] = args[0].detach().requires_grad_(args[0].numel() > 0)
    torch.library.opcheck(torch.ops.gtp.propagate, args)


@pytest.mark.parametrize("case", list(tp._bad_cases()))
def test_propagate_bad_inputs(case):
    make, match = tp._bad_cases()[case]
    args = _to_device(make())
    with pytest.raises(ValueError, match=f"gtp.propagate: {match}"):
        torch.ops.gtp.propagate(*args)


def _to_device(args):
    return [
        a.to(DEV) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args
    ]


def test_propagate_backward_matches_reference():
    x, index, weight, keep, alpha, m, sizes = tp.sample_inputs(DEV)[0][1]
    grads = []
    for backend in ("cuda", "reference"):
        xr = x.detach().requires_grad_()
        out = ops.propagate(xr, index, weight, keep, alpha, m, sizes, backend=backend)
        grads.append(torch.autograd.grad(out[0].sum(), xr)[0])
    assert_close(grads[0].cpu(), grads[1].cpu(), **TOL[torch.float32], name="dx")


def test_propagate_in_a_cuda_graph():
    """The error-flag read is skipped while a stream is captured (no synchronisation allowed);
    the captured graph replays the same result."""
    args = dict(tp.sample_inputs(DEV))["wide_c_vector_tail"]
    want = torch.ops.gtp.propagate(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.gtp.propagate(*args)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.gtp.propagate(*args)
    graph.replay()
    torch.cuda.synchronize()
    tp._compare(_cpu(got), _cpu(want), {}, "graph replay")


def test_propagate_nonfinite_values_propagate():
    x, index, weight, keep, alpha, m, sizes = dict(tp.sample_inputs(DEV))["grid3x3_cls"]
    x = x.clone()
    x[0, 2, 1] = float("nan")
    x[1, 3, 0] = float("inf")
    got = torch.ops.gtp.propagate(x, index, weight, keep, alpha, m, sizes)
    want = reference.propagate(x, index, weight, keep, alpha, m, sizes)
    tp._compare(_cpu(got), _cpu(want), TOL[torch.float32], "non-finite x")


# -------------------------------------------------------------------------------- attention


def _attn_sample(name, dtype=torch.float32, **over):
    torch.manual_seed(sum(map(ord, name)))
    args = dict(ta.sample_inputs(DEV, dtype))[name]
    args.update(over)
    return args


def _check(args):
    return ta.check_against_reference(args, same_dtype=True)


@pytest.mark.parametrize("theta", [1.0, 0.9, 0.6, 0.3])
@pytest.mark.parametrize("name", ta.SAMPLE_IDS)
def test_attention_samples(name, theta):
    args = _attn_sample(name, sparsity=theta)
    flips = _check(args)
    assert flips <= max(1, args["q"].shape[0] * args["q"].shape[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "n50_2prefix", "deit_s", "transposed", "dv_ne_d"])
def test_attention_dtypes(name, dtype):
    _check(_attn_sample(name, dtype))


# Both modes (the N x N map resident in shared memory, or recomputed) and both engines (tensor
# cores, FMA) on the same inputs: every combination against the reference.
MODES = [
    pytest.param({}, id="default"),
    pytest.param({"GTP_ATTENTION_CUDA_MODE": "recompute"}, id="recompute"),
    pytest.param({"GTP_ATTENTION_CUDA_ENGINE": "fma"}, id="fma"),
    pytest.param(
        {"GTP_ATTENTION_CUDA_MODE": "recompute", "GTP_ATTENTION_CUDA_ENGINE": "fma"},
        id="recompute_fma",
    ),
]


@pytest.mark.parametrize("env", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "deit_s", "odd_d", "d1", "dv_ne_d", "all_prefix"])
def test_attention_modes_and_engines(name, dtype, env, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for theta in (1.0, 0.6):
        _check(_attn_sample(name, dtype, sparsity=theta))


@pytest.mark.parametrize("d", [16, 48, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_head_dims(d, dtype):
    # d <= 64 runs on tensor cores, larger d on the FMA engine
    q, k, v = ta.timm_qkv(2, 3, 67, d, dtype, DEV)
    args = dict(
        q=q, k=k, v=v, log_sizes=None, scale=d**-0.5, sparsity=0.6, num_prefix=1, score="mixed_max"
    )
    _check(args)


@pytest.mark.parametrize("dv", [0, 7, 64, 65, 150])
def test_attention_value_widths(dv):
    # several 64-column chunks of out (the partial column sums are written in the last one)
    q, k, v = ta.timm_qkv(2, 2, 50, 32, torch.float16, DEV, dv=dv)
    for score in ("mixed_max", "colsum_mean", "cls_max"):
        _check(
            dict(q=q, k=k, v=v, log_sizes=None, scale=0.2, sparsity=0.6, num_prefix=1, score=score)
        )


@pytest.mark.parametrize("n", [197, 240, 577])
def test_attention_sizes_around_the_resident_limit(n):
    # N = 197: resident on A100 and H100; 240: resident only where 227 KiB are available;
    # 577: recompute everywhere
    torch.manual_seed(n)
    q, k, v = ta.timm_qkv(1, 3, n, 64, torch.float16, DEV)
    ls = (torch.rand(1, n, device=DEV) * 3 + 1).floor().log()
    _check(
        dict(
            q=q, k=k, v=v, log_sizes=ls, scale=0.125, sparsity=0.6, num_prefix=1, score="mixed_max"
        )
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_error_vs_float64(dtype):
    """out error of the kernel at most ~2x that of the reference run in the same dtype, both
    against float64 (theta = 1: no threshold decision). P @ V multiplies p split into two halves,
    so p is not rounded to the input's dtype."""
    args = _attn_sample("deit_s", dtype, sparsity=1.0)
    out, _ = torch.ops.gtp.attention(*args.values())
    ref, _ = reference.attention(*args.values())
    a64 = dict(args, q=args["q"].double(), k=args["k"].double(), v=args["v"].double())
    exact, _ = reference.attention(*a64.values())
    err_k = (out.double() - exact).abs().max().item()
    err_r = (ref.double() - exact).abs().max().item()
    assert err_k <= 2 * err_r + 1e-6, f"kernel error {err_k:.3g}, reference error {err_r:.3g}"


def test_attention_exact_threshold_with_many_ties():
    """Integer logits: few distinct probabilities, thousands of exact ties at tau. Every entry
    equal to tau stays; the zeroed set is exactly {p < tau} of the kernel's own probabilities
    (float32 / float64 outputs hold p exactly: v = I; resident N = 50, 197, recompute N = 300)."""
    torch.manual_seed(4)
    for n, dtype in (
        (50, torch.float32),
        (197, torch.float32),
        (300, torch.float32),
        (300, torch.float64),
    ):
        q = torch.randint(-2, 3, (1, 2, n, 16), device=DEV).to(dtype)
        k = torch.randint(-2, 3, (1, 2, n, 16), device=DEV).to(dtype)
        for theta in (0.9, 0.6, 0.3, 1e-9):
            a = ta._kernel_probs(q, k, None, 0.5, 1.0)  # unmasked
            m = ta._kernel_probs(q, k, None, 0.5, theta)
            kk = num_masked(n, theta)
            tau = a.flatten(2).kthvalue(kk, dim=-1).values[..., None, None]
            assert torch.equal(m != 0, a >= tau), (n, theta)
            assert torch.equal(m[m != 0], a[m != 0]), "kept entries must be unchanged"


def test_attention_deterministic():
    args = _attn_sample("deit_s", torch.float16)
    first = torch.ops.gtp.attention(*args.values())
    for _ in range(3):
        again = torch.ops.gtp.attention(*args.values())
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_attention_nonfinite_rule():
    """A row whose logits hold NaN or +Inf, or are all -Inf, is NaN in the whole row; tau is the
    kk-th smallest under NaN-greatest, and NaN entries are never zeroed."""
    q, k, v = ta.timm_qkv(1, 2, 20, 8, torch.float32, DEV)
    q = q.clone()
    q[0, 0, 3, 0] = float("nan")  # row 3 of head 0: NaN logits
    q[0, 1, 5, 0] = float("inf")  # row 5 of head 1: +-Inf logits
    ls = torch.zeros(1, 20, device=DEV)
    for theta in (1.0, 0.6, 0.01):
        args = (q, k, v, ls, 0.5, theta, 1, "mixed_max")
        out, score = torch.ops.gtp.attention(*args)
        r_out, r_score = reference.attention(*args)
        assert torch.isnan(out[0, 0, 3]).all() and torch.isnan(out[0, 1, 5]).all()
        assert_close(out.cpu(), r_out.cpu(), **TOL[torch.float32], name=f"out theta={theta}")
        assert_close(score.cpu(), r_score.cpu(), atol=1e-6, rtol=2e-5, name="score")
    all_neg_inf = torch.full((1, 20), float("-inf"), device=DEV)
    out, _ = torch.ops.gtp.attention(q, k, v, all_neg_inf, 0.5, 0.6, 1, "none")
    assert torch.isnan(out).all()


@pytest.mark.parametrize(
    "name",
    ["tiny", "n50_2prefix", "transposed", "dv_ne_d", "no_score", "empty_batch", "all_prefix"],
)
def test_attention_opcheck(name):
    args = _attn_sample(name)
    if name == "empty_batch":
        args.update({t: torch.randn(args[t].shape, device=DEV) for t in ("q", "k", "v")})
    torch.library.opcheck(torch.ops.gtp.attention, tuple(args.values()))


def test_attention_vs_cpu_kernel():
    """Where the CUDA and the CPU kernel mask the same entries, out and score agree; entries
    masked by only one of them lie within rounding of tau."""
    for name in ("tiny", "deit_s", "n577_b1", "odd_d", "transposed"):
        args = _attn_sample(name)
        q, k, ls = args["q"], args["k"], args["log_sizes"]
        theta, scale = args["sparsity"], args["scale"]
        a_cuda = ta._kernel_probs(q, k, ls, scale, theta).cpu()
        a_cpu = ta._kernel_probs(q.cpu(), k.cpu(), _cpu(ls), scale, theta)
        out_g, score_g = torch.ops.gtp.attention(*args.values())
        out_c, score_c = torch.ops.gtp.attention(*_cpu(tuple(args.values())))
        if torch.equal(a_cuda != 0, a_cpu != 0):
            assert_close(out_g.cpu(), out_c, **TOL[torch.float32], name=f"{name} out")
            assert_close(score_g.cpu(), score_c, atol=1e-6, rtol=2e-5, name=f"{name} score")
        else:
            a = attention_probs(q.cpu(), k.cpu(), _cpu(ls), scale, 1.0)
            tau = a.flatten(2).kthvalue(num_masked(q.shape[2], theta), dim=-1).values
            diff = (a_cuda != 0) != (a_cpu != 0)
            rel = ((a - tau[..., None, None]).abs() / tau[..., None, None])[diff]
            assert rel.max() <= 1e-5, f"{name}: masks differ far from tau ({rel.max():.3g})"


def test_attention_backward_matches_reference():
    """The op's autograd (gtp_kernels/ops/attention.py, device independent) on CUDA tensors."""
    q, k, v = (t.detach().clone().requires_grad_() for t in ta.timm_qkv(2, 3, 29, 16, device=DEV))
    grads = []
    for backend in ("cuda", "reference"):
        for t in (q, k, v):
            t.grad = None
        out, score = ops.attention(q, k, v, None, 0.25, 0.6, 1, "mixed_max", backend=backend)
        (out.square().sum() + score.sum()).backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for name, g, r in zip("qkv", *grads, strict=True):
        assert_close(g.cpu(), r.cpu(), atol=1e-4, rtol=1e-4, name=f"d{name}")


@pytest.mark.parametrize("case", range(len(ta.BAD)))
def test_attention_bad_inputs(case):
    with pytest.raises(ValueError, match=ta.BAD[case][1]):
        torch.ops.gtp.attention(*ta.bad_args(case, DEV))


def test_attention_inputs_on_two_devices_fail_clearly():
    q, k, v = ta.timm_qkv(1, 2, 9, 4, device=DEV)
    with pytest.raises(ValueError, match="k must be on the same device as q"):
        torch.ops.gtp.attention(q, k.cpu(), v, None, 0.5, 0.6, 1, "mixed_max")


# ------------------------------------------------------------------- wrappers and the patch


def test_backend_cuda_and_auto():
    score = torch.randint(0, 3, (4, 25), device=DEV).float()
    for backend in ("auto", "cuda"):
        got = ops.select_tokens(score, 9, backend=backend)
        want = ops.select_tokens(score, 9, backend="reference")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(RuntimeError, match="needs tensors on cuda"):
        ops.select_tokens(score.cpu(), 9, backend="cuda")


def test_info_reports_cuda_kernels():
    from gtp_kernels.info import collect

    kernels = collect()["kernels"]
    assert all(kernels[op]["CUDA"] for op in OPS)


def _deit_small(scale_qkv=4.0):
    """DeiT-S with seeded random weights, qkv scaled so that attention is peaked (as in a trained
    model) and the top-theta threshold does not sit among near-ties."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(scale_qkv)
    return model.to(DEV)


@pytest.mark.parametrize("sparsity", [1.0, 0.6])
def test_patched_deit_small_cuda_equals_reference(sparsity):
    import gtp_kernels.patch as gp

    model = _deit_small()
    x = torch.randn(2, 3, 224, 224, device=DEV)
    gp.timm(model, num_prop=8, sparsity=sparsity, track_sources=True)
    out = {}
    with torch.no_grad():
        for backend in ("reference", "cuda"):
            model.gtp.backend = backend
            out[backend] = (model(x), model.gtp.last_sources)
    assert_close(
        out["cuda"][1].cpu(), out["reference"][1].cpu(), atol=1e-5, rtol=1e-5, name="sources"
    )
    assert_close(
        out["cuda"][0].cpu(), out["reference"][0].cpu(), atol=1e-4, rtol=1e-4, name="logits"
    )
    with torch.no_grad():
        model.gtp.backend = "auto"  # CUDA tensors: the compiled CUDA kernels
        assert_close(model(x).cpu(), out["cuda"][0].cpu(), name="auto")


def test_patched_deit_small_half_runs():
    import gtp_kernels.patch as gp

    model = _deit_small().half()
    x = torch.randn(4, 3, 224, 224, device=DEV).half()
    gp.timm(model, num_prop=8, sparsity=0.6, backend="cuda")
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (4, 1000) and torch.isfinite(logits).all()
    assert math.isfinite(float(logits.float().abs().max()))
