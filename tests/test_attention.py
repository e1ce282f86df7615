"""attention: a hand-worked threshold, kernel vs reference, scores, opcheck, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOL, assert_close

import gtp_kernels.ops  # (registers the fake kernel and autograd)
from gtp_kernels._extension import extension_available, has_kernel
from gtp_kernels.reference import attention as ref_attention
from gtp_kernels.reference.attention import attention_probs, importance_score, num_masked

HAS_CPU_KERNEL = extension_available() and has_kernel("attention", "CPU")
needs_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL,
    reason="gtp_kernels._C with the attention CPU kernel is not built "
    "(python setup.py build_ext --inplace)",
)
BACKENDS = ["reference", pytest.param("cpu", marks=needs_kernel)]


def run(backend, q, k, v, log_sizes, scale, theta, num_prefix, score):
    """The op on `backend`: the reference, the compiled kernel (torch.ops.gtp, "cpu"), or any
    other backend through the public wrapper (tests/triton_ops reuse these tests)."""
    args = (q, k, v, log_sizes, scale, theta, num_prefix, score)
    if backend == "reference":
        return ref_attention(*args)
    if backend == "cpu":
        return torch.ops.gtp.attention(*args)
    return gtp_kernels.ops.attention(*args, backend=backend)


# ---------------------------------------------------------------------------------------------
# Worked by hand: N = 3, two heads. q = the logits, k = I, scale = 1, so logits = q. With v = I
# the output is the masked probability map itself.
#
# head 0 logits        probabilities (row softmax)
#   [3, 0,   1]   ->   [0.8438, 0.0420, 0.1142]
#   [2, 0,   0]   ->   [0.7870, 0.1065, 0.1065]     (two equal logits: an exact tie)
#   [0, 0.5, 3]   ->   [0.0440, 0.0725, 0.8835]
# theta = 0.5: kk = int(9 * 0.5) = 4. Sorted: 0.0420, 0.0440, 0.0725, 0.1065, 0.1065, ...
# so tau = 0.1065 (the 4th smallest). The three entries below tau are zeroed; BOTH entries
# equal to tau stay (the 5th smallest is tied with the 4th). Rows are not renormalised.
# head 1: all logits 0 -> every entry is 1/3 == tau: nothing is zeroed.
# ---------------------------------------------------------------------------------------------
HAND_LOGITS = [[[3.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.5, 3.0]], [[0.0] * 3] * 3]
HAND_KEPT = [[[1, 0, 1], [1, 1, 1], [0, 0, 1]], [[1] * 3] * 3]


def _hand_expected(num_prefix=1):
    probs = []
    for head, keep in zip(HAND_LOGITS, HAND_KEPT, strict=True):
        rows = []
        for logits, kept in zip(head, keep, strict=True):
            z = sum(math.exp(x) for x in logits)
            rows.append([math.exp(x) / z * m for x, m in zip(logits, kept, strict=True)])
        probs.append(rows)
    a = torch.tensor(probs, dtype=torch.float64)  # (H, N, N), masked
    m = num_prefix
    gamma = a.diagonal(dim1=-2, dim2=-1)[:, m:]
    psi = a.sum(dim=-2)[:, m:]
    cls = a[:, 0, m:]
    scores = {
        "mixed_max": gamma.amax(0) * psi.amax(0),
        "mixed_mean": gamma.mean(0) * psi.mean(0),
        "diag_max": gamma.amax(0),
        "diag_mean": gamma.mean(0),
        "colsum_max": psi.amax(0),
        "colsum_mean": psi.mean(0),
        "cls_max": cls.amax(0),
        "cls_mean": cls.mean(0),
        "sum_max": gamma.amax(0) + psi.amax(0),
    }
    return a, scores


@pytest.mark.parametrize("backend", BACKENDS)
def test_by_hand(backend):
    q = torch.tensor([HAND_LOGITS], dtype=torch.float32)  # (1, 2, 3, 3)
    k = torch.eye(3).expand(1, 2, 3, 3)
    v = torch.eye(3).expand(1, 2, 3, 3)
    expected, scores = _hand_expected(num_prefix=1)
    # the tie is exact in float32 too: the two 0.1065 entries come from equal logits
    assert expected[0, 1, 1] == expected[0, 1, 2]
    for name, want in scores.items():
        out, score = run(backend, q, k, v, None, 1.0, 0.5, 1, name)
        assert out.dtype == torch.float32 and score.dtype == torch.float32
        torch.testing.assert_close(out[0].double(), expected, atol=1e-6, rtol=1e-6)
        assert ((out[0] == 0) == (expected == 0)).all(), f"masked entries differ: {out[0]}"
        torch.testing.assert_close(score[0].double(), want, atol=1e-6, rtol=1e-6, msg=name)
    # by hand for the default strategy: gamma = max(0.1065, 1/3), max(0.8835, 1/3);
    # psi = max(0.1065, 1), max(0.1142 + 0.1065 + 0.8835, 1)
    _, score = run(backend, q, k, v, None, 1.0, 0.5, 1, "mixed_max")
    e = [math.exp(x) for x in (0.0, 0.5, 3.0)]
    d2 = e[2] / sum(e)
    psi2 = math.e / (math.exp(3) + 1 + math.e) + 1 / (math.exp(2) + 2) + d2
    torch.testing.assert_close(
        score[0].double(), torch.tensor([1 / 3, d2 * psi2], dtype=torch.float64)
    )
    # theta = 1 (and any theta with kk = 0, e.g. 0.95: int(9 * 0.05) = 0) masks nothing
    for theta in (1.0, 0.95):
        out, _ = run(backend, q, k, v, None, 1.0, theta, 1, "none")
        assert (out > 0).all()
    # kk = 3 (theta = 0.6: int(9 * 0.4) = 3): tau = 0.0725, two entries zeroed
    out, _ = run(backend, q, k, v, None, 1.0, 0.6, 0, "none")
    assert (out[0, 0] == 0).nonzero().tolist() == [[0, 1], [2, 0]]
    assert (out[0, 1] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sizes_by_hand(backend):
    # log_sizes shift the logits of key j: sizes (1, 2, 1) make token 1 count twice
    q = torch.zeros(1, 1, 3, 4)
    k = torch.randn(1, 1, 3, 4)
    v = torch.eye(3).expand(1, 1, 3, 3)
    log_sizes = torch.tensor([[0.0, math.log(2.0), 0.0]])
    out, score = run(backend, q, k, v, log_sizes, 0.5, 1.0, 1, "colsum_max")
    want = torch.tensor([0.25, 0.5, 0.25]).expand(3, 3)
    torch.testing.assert_close(out[0, 0], want)
    torch.testing.assert_close(score, torch.tensor([[1.5, 0.75]]))


# ---------------------------------------------------------------------------------------------
# Kernel vs reference on many shapes
# ---------------------------------------------------------------------------------------------
def timm_qkv(b, h, n, d, dtype=torch.float32, device="cpu", dv=None):
    """q, k, v as timm makes them: strided views of one (B, N, 3, H, d) projection."""
    if dv is None or dv == d:
        qkv = torch.randn(b, n, 3, h, d, device=device).to(dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    qk = torch.randn(b, n, 2, h, d, device=device).to(dtype).permute(2, 0, 3, 1, 4)
    v = torch.randn(b, n, h, dv, device=device).to(dtype).transpose(1, 2)
    return qk[0], qk[1], v


def sample_inputs(device="cpu", dtype=torch.float32):
    """(id, kwargs) pairs: odd sizes, batch > 1, timm strides, other strides, empty batch."""

    def make(b, h, n, d, *, layout="timm", ls=True, m=1, theta=0.6, score="mixed_max", dv=None):
        if layout == "timm":
            q, k, v = timm_qkv(b, h, n, d, dtype, device, dv)
        elif layout == "contiguous":
            q, k, v = (torch.randn(b, h, n, x, device=device).to(dtype) for x in (d, d, dv or d))
        elif layout == "transposed":  # last-dim stride != 1: the kernel packs the tile
            q, k, v = (
                torch.randn(b, h, x, n, device=device).to(dtype).transpose(-1, -2)
                for x in (d, d, dv or d)
            )
        else:  # "expanded": stride 0 over the batch
            q, k, v = (
                torch.randn(1, h, n, d, device=device).to(dtype).expand(b, h, n, d)
                for _ in range(3)
            )
        log_sizes = None
        if ls:
            log_sizes = (torch.rand(b, n, device=device) * 3 + 1).floor().log()  # sizes 1..3
        scale = d**-0.5 if d > 0 else 1.0
        return dict(
            q=q,
            k=k,
            v=v,
            log_sizes=log_sizes,
            scale=scale,
            sparsity=theta,
            num_prefix=m,
            score=score,
        )

    return [
        ("tiny", make(2, 3, 5, 4, m=1, theta=0.6)),
        ("n50_noprefix", make(3, 2, 50, 16, ls=False, m=0, score="diag_mean", theta=0.9)),
        ("n50_2prefix", make(2, 4, 50, 8, m=2, score="cls_mean", theta=0.3)),
        ("deit_s", make(2, 6, 197, 64, m=1, theta=0.6)),
        ("n577_b1", make(1, 2, 577, 32, m=1, theta=0.3, score="mixed_mean")),
        ("odd_d", make(3, 2, 37, 33, layout="contiguous", m=1, score="sum_max", theta=0.9)),
        ("d1", make(2, 1, 23, 1, m=0, score="colsum_max", theta=0.3)),
        ("dv_ne_d", make(2, 3, 29, 8, dv=5, m=1, score="colsum_mean")),
        ("transposed", make(2, 2, 31, 8, layout="transposed", m=2, score="cls_max")),
        ("expanded", make(3, 2, 17, 8, layout="expanded", m=1, score="diag_max")),
        ("theta1", make(2, 3, 41, 16, m=1, theta=1.0)),
        ("no_score", make(2, 3, 41, 16, m=1, score="none")),
        ("all_prefix", make(2, 2, 6, 4, m=6, score="mixed_max")),
        ("empty_batch", make(0, 3, 11, 8, m=1)),
        ("no_tokens", make(2, 3, 0, 4, m=0)),
        ("head_dim_0", make(2, 3, 5, 0, m=1)),
        ("one_token", make(2, 2, 1, 4, m=0)),
    ]


SAMPLE_IDS = [name for name, _ in sample_inputs()]


def _sample(name, dtype=torch.float32, **over):
    torch.manual_seed(sum(map(ord, name)))
    args = dict(sample_inputs("cpu", dtype))[name]
    args.update(over)
    return args


def _kernel_probs(q, k, log_sizes, scale, theta, same_dtype=False, op=None):
    """The kernel's own masked probabilities: with v = I, out = A (in the compute dtype).
    op: the kernel (default torch.ops.gtp.attention; any op with its schema).

    same_dtype: run the kernel in q's dtype (its own mask when a float16/bfloat16 kernel computes
    scores differently from the float32 one, as tensor cores do); A is then rounded to q's dtype,
    which keeps every nonzero probability nonzero."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dtype = q.dtype if same_dtype else compute
    b, h, n, _ = q.shape
    eye = torch.eye(n, dtype=dtype, device=q.device).expand(b, h, n, n)
    op = op or torch.ops.gtp.attention
    # v = columns of I, up to 256 at a time (kernels may limit dv): out = those columns of A
    cols = [
        op(q.to(dtype), k.to(dtype), eye[..., c : c + 256], log_sizes, scale, theta, 0, "none")[0]
        for c in range(0, n, 256)
    ]
    return torch.cat(cols, dim=-1).to(compute) if cols else eye.to(compute)


def check_against_reference(args, same_dtype=False, op=None):
    """Kernel vs reference, robust to near-ties at the threshold.

    The kernel and the reference round the probabilities differently (~1e-7 relative), so an
    entry within rounding of tau may be masked by one and kept by the other. This reads the
    kernel's mask (v = I), checks that every disagreement with the reference's mask lies within
    rounding of the reference's tau, then compares out and score with the reference's
    probabilities under the kernel's mask. Returns the number of such flipped entries. Works on
    any device (CUDA tensors run the CUDA kernel). op: the kernel under test (default
    torch.ops.gtp.attention; any callable with its arguments, e.g. the Triton launcher).
    """
    q, k, v, ls = args["q"], args["k"], args["v"], args["log_sizes"]
    scale, theta, m, score = args["scale"], args["sparsity"], args["num_prefix"], args["score"]
    op = op or torch.ops.gtp.attention
    out, sc = op(q, k, v, ls, scale, theta, m, score)
    expected_out, expected_score = ref_attention(q, k, v, ls, scale, theta, m, score)
    assert out.shape == expected_out.shape and out.dtype == q.dtype
    assert sc.shape == expected_score.shape and sc.dtype == torch.float32
    if q.shape[0] == 0:
        return 0
    a_ref = attention_probs(q, k, ls, scale, 1.0)  # unmasked, compute dtype
    n = q.shape[2]
    kk = num_masked(n, theta)
    flips = 0
    if kk > 0:
        a_k = _kernel_probs(q, k, ls, scale, theta, same_dtype, op)
        tau = a_ref.flatten(2).kthvalue(kk, dim=-1).values[..., None, None]
        ref_kept = a_ref >= tau
        k_kept = a_k != 0
        flip = (ref_kept != k_kept) & (a_ref > 0)
        flips = int(flip.sum())
        if flips:
            rel = ((a_ref - tau).abs() / tau)[flip]
            assert rel.max() <= 1e-5, f"{flips} entries flipped, up to {rel.max():.3g} from tau"
        a_ref = a_ref * k_kept
    ref_out = (a_ref @ v.to(a_ref.dtype)).to(q.dtype)
    assert_close(out, ref_out, **TOL[q.dtype], name="out")
    ref_score = importance_score(a_ref, m, score)
    tol = dict(atol=1e-10, rtol=1e-6) if q.dtype == torch.float64 else dict(atol=1e-6, rtol=2e-5)
    assert_close(sc, ref_score, **tol, name="score")
    if flips == 0:  # same mask: the plain reference output agrees too
        assert_close(out, expected_out, **TOL[q.dtype], name="out vs reference")
        assert_close(sc, expected_score, **tol, name="score vs reference")
    return flips


@needs_kernel
@pytest.mark.parametrize("theta", [1.0, 0.9, 0.6, 0.3])
@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_kernel_vs_reference(name, theta):
    args = _sample(name, sparsity=theta)
    flips = check_against_reference(args)
    # near-ties are rare on random inputs: at most a handful of entries per (b, h)
    assert flips <= max(1, args["q"].shape[0] * args["q"].shape[1])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "n50_2prefix", "deit_s", "transposed", "dv_ne_d"])
def test_kernel_vs_reference_dtypes(name, dtype):
    check_against_reference(_sample(name, dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_error_vs_float64(dtype):
    """fp16/bf16 error of the kernel at most ~2x that of the reference run in the same dtype,
    both against a float64 run (theta = 1, so no threshold decision differs)."""
    args = _sample("deit_s", dtype, sparsity=1.0)
    out, _ = torch.ops.gtp.attention(*args.values())
    ref, _ = ref_attention(*args.values())
    a64 = dict(args, q=args["q"].double(), k=args["k"].double(), v=args["v"].double())
    exact, _ = ref_attention(*a64.values())
    err_k = (out.double() - exact).abs().max().item()
    err_r = (ref.double() - exact).abs().max().item()
    assert err_k <= 2 * err_r + 1e-6, f"kernel error {err_k:.3g}, reference error {err_r:.3g}"


@needs_kernel
@pytest.mark.parametrize("log_sizes", [False, True])
@pytest.mark.parametrize("theta", [1.0, 0.6])
def test_lowest_three_tokens_match_reference(theta, log_sizes):
    """The 3 tokens GTP would propagate (lowest mixed_max score) are the reference's."""
    torch.manual_seed(1)
    b, h, n, d = 4, 6, 197, 64
    q, k, v = timm_qkv(b, h, n, d)
    ls = (torch.rand(b, n) * 3 + 1).log() if log_sizes else None
    _, s_k = torch.ops.gtp.attention(q, k, v, ls, d**-0.5, theta, 1, "mixed_max")
    _, s_r = ref_attention(q, k, v, ls, d**-0.5, theta, 1, "mixed_max")
    low_k = s_k.topk(3, dim=-1, largest=False).indices.sort(-1).values
    low_r = s_r.topk(3, dim=-1, largest=False).indices.sort(-1).values
    assert torch.equal(low_k, low_r), f"{low_k.tolist()} != {low_r.tolist()}"


@needs_kernel
@pytest.mark.parametrize("n", [5, 50, 197, 577])
def test_radix_select_equals_nth_element(n, monkeypatch):
    """The windowed select (with and without its AVX-512 pass) and the plain radix select find
    exactly the value std::nth_element finds: bitwise equal outputs, also with many exact ties
    (integer logits: few distinct values per row) and with kk = N * N - 1 (theta 1e-9)."""
    torch.manual_seed(n)
    h = 2 if n == 577 else 3
    q = torch.randint(-2, 3, (1, h, n, 4)).float()
    k = torch.randint(-2, 3, (1, h, n, 4)).float()
    v = torch.randn(1, h, n, 8)
    for theta in (0.9, 0.6, 0.3, 1e-9):
        args = (q, k, v, None, 0.5, theta, 1, "mixed_max")
        o_win, s_win = torch.ops.gtp.attention(*args)  # default: sample-windowed radix
        for method in ("radix", "nth_element", "windowed_scalar"):
            monkeypatch.setenv("GTP_ATTENTION_SELECT", method)
            o, s = torch.ops.gtp.attention(*args)
            assert torch.equal(o_win, o) and torch.equal(s_win, s), method
        monkeypatch.delenv("GTP_ATTENTION_SELECT")
        check_against_reference(
            dict(
                zip(
                    ["q", "k", "v", "log_sizes", "scale", "sparsity", "num_prefix", "score"],
                    args,
                    strict=True,
                )
            )
        )


@needs_kernel
@pytest.mark.parametrize("n", [197, 577])
@pytest.mark.parametrize("spread", [0.02, 0.3, 1.0])
def test_windowed_select_near_uniform(n, spread, monkeypatch):
    """Near-uniform attention (small logits, as in a random-initialised ViT) puts almost every
    probability of a tile into one or two level-1 buckets; the windowed select then narrows its
    bracket with the sampled offsets (spread 0.02, 0.3) instead of taking whole buckets (1.0).
    All exact: bitwise equal to std::nth_element."""
    torch.manual_seed(n)
    q = torch.randn(2, 2, n, 16) * spread
    k = torch.randn(2, 2, n, 16) * spread
    v = torch.randn(2, 2, n, 8)
    for theta in (0.9, 0.6, 0.3):
        args = (q, k, v, torch.randn(2, n) * 0.1, 0.25, theta, 1, "mixed_max")
        o_win, s_win = torch.ops.gtp.attention(*args)
        for method in ("nth_element", "windowed_scalar"):
            monkeypatch.setenv("GTP_ATTENTION_SELECT", method)
            o, s = torch.ops.gtp.attention(*args)
            assert torch.equal(o_win, o) and torch.equal(s_win, s), (method, theta)
        monkeypatch.delenv("GTP_ATTENTION_SELECT")


@needs_kernel
def test_select_window_missed(monkeypatch):
    """The windowed select samples 1 probability in 8 (flat index). Here every sampled entry is
    tiny (key columns j % 8 == 0 get logits ~ -20), so the sample's bracket misses rank kk and
    the kernel must fall back to the full radix select: still exact."""
    n = 64
    q = torch.ones(1, 2, n, 1)
    k = torch.randn(1, 2, n, 1)
    k[:, :, ::8] = -20.0
    v = torch.randn(1, 2, n, 5)
    for theta in (0.9, 0.6, 0.3):
        args = (q, k, v, None, 1.0, theta, 0, "colsum_max")
        o_win, s_win = torch.ops.gtp.attention(*args)
        monkeypatch.setenv("GTP_ATTENTION_SELECT", "nth_element")
        o_nth, s_nth = torch.ops.gtp.attention(*args)
        monkeypatch.delenv("GTP_ATTENTION_SELECT")
        assert torch.equal(o_win, o_nth) and torch.equal(s_win, s_nth)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_aten_gemm_fallback(dtype, monkeypatch):
    """The at::mm_out path (taken when torch exports no Fortran BLAS) matches the reference."""
    monkeypatch.setenv("GTP_ATTENTION_GEMM", "aten")
    for name in ("deit_s", "transposed", "dv_ne_d"):
        check_against_reference(_sample(name, dtype))


@needs_kernel
def test_uniform_rows_nothing_masked():
    # q = 0: every probability is exactly 1/N == tau, so no entry is below the threshold
    q = torch.zeros(2, 2, 13, 4)
    k = torch.randn(2, 2, 13, 4)
    v = torch.randn(2, 2, 13, 4)
    out, _ = torch.ops.gtp.attention(q, k, v, None, 1.0, 0.3, 1, "none")
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(v))


@needs_kernel
def test_output_layout_and_empty():
    q, k, v = timm_qkv(2, 6, 19, 8)
    out, score = torch.ops.gtp.attention(q, k, v, None, 0.3, 0.6, 1, "mixed_max")
    # (B, H, N, d) with (B, N, H, d) memory: timm's transpose(1, 2).reshape is free
    assert out.transpose(1, 2).is_contiguous()
    assert score.shape == (2, 18)
    q, k, v = timm_qkv(0, 6, 19, 8)
    out, score = torch.ops.gtp.attention(q, k, v, None, 0.3, 0.6, 1, "mixed_max")
    assert out.shape == (0, 6, 19, 8) and score.shape == (0, 18)
    out, score = torch.ops.gtp.attention(q, k, v, None, 0.3, 0.6, 1, "none")
    assert score.shape == (0, 0)


@needs_kernel
@pytest.mark.parametrize(
    "name",
    ["tiny", "n50_2prefix", "transposed", "dv_ne_d", "no_score", "empty_batch", "all_prefix"],
)
def test_opcheck(name):
    args = _sample(name)
    if name == "empty_batch":  # opcheck's own input cloning fails on empty strided views
        args.update({t: torch.randn(args[t].shape) for t in ("q", "k", "v")})
    torch.library.opcheck(torch.ops.gtp.attention, tuple(args.values()))


def test_wrapper_backends():
    import gtp_kernels.ops as ops

    args = tuple(_sample("tiny").values())
    out_r, s_r = ops.attention(*args, backend="reference")
    out_a, s_a = ops.attention(*args)  # auto: the kernel when built, else the reference
    torch.testing.assert_close(out_a, out_r)
    torch.testing.assert_close(s_a, s_r)
    with pytest.raises(RuntimeError, match="needs tensors on cuda"):
        ops.attention(*args, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.attention(*args, backend="gpu")


BAD = [
    (dict(q=torch.randn(2, 3, 4)), "q must have 4 dimensions"),
    (dict(k=torch.randn(2, 2, 5, 3)), "k must have the shape of q"),
    (dict(v=torch.randn(2, 2, 4, 4)), "v must have shape"),
    (dict(q=torch.randint(0, 3, (2, 2, 5, 4))), "q must be float32, float16, bfloat16 or float64"),
    (dict(k=torch.randn(2, 2, 5, 4).half()), "k must have the dtype of q"),
    (dict(v=torch.randn(2, 2, 5, 4).double()), "v must have the dtype of q"),
    (
        dict(q=torch.randn(2, 0, 5, 4), k=torch.randn(2, 0, 5, 4), v=torch.randn(2, 0, 5, 4)),
        "at least one head",
    ),
    (dict(log_sizes=torch.zeros(2, 4)), r"log_sizes must have shape \(B, N\)"),
    (dict(log_sizes=torch.zeros(2, 5).double()), "log_sizes must be float32"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(theta=0.0), r"sparsity \(theta\) must be in \(0, 1\]"),
    (dict(theta=1.5), r"sparsity \(theta\) must be in \(0, 1\]"),
    (dict(theta=-0.1), r"sparsity \(theta\) must be in \(0, 1\]"),
    (dict(theta=float("nan")), r"sparsity \(theta\) must be in \(0, 1\]"),
    (dict(num_prefix=-1), r"num_prefix must be in \[0, N\]"),
    (dict(num_prefix=6), r"num_prefix must be in \[0, N\]"),
    (dict(score="max"), "score must be one of"),
    (dict(score="cls_max", num_prefix=0), "needs a CLS token"),
    (dict(score="cls_mean", num_prefix=0), "needs a CLS token"),
]


def bad_args(case, device="cpu"):
    """The arguments of BAD[case]: valid ones with the case's bad ones in, on `device`."""
    over, _ = BAD[case]
    args = dict(
        q=torch.randn(2, 2, 5, 4),
        k=torch.randn(2, 2, 5, 4),
        v=torch.randn(2, 2, 5, 4),
        log_sizes=None,
        scale=0.5,
        theta=0.7,
        num_prefix=1,
        score="mixed_max",
    )
    args.update(over)
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args.values()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(backend, case):
    with pytest.raises(ValueError, match=BAD[case][1]):
        run(backend, *bad_args(case))
