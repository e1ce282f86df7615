"""The one non-finite rule (README "Bad inputs"): NaN / Inf tensor values never raise, they
propagate by IEEE arithmetic, and every decision made from them is deterministic and the same
on every backend. Each case checks the rule by hand on the reference, then that every compiled
backend gives identical decisions (indices equal, NaN positions equal; finite values within
the dtype's tolerance)."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close

from gtp_kernels import ops, reference
from gtp_kernels._extension import extension_available, has_kernel
from gtp_kernels.reference.attention import SCORES as ATTENTION_SCORES

NAN, INF = float("nan"), float("inf")

needs_kernel = pytest.mark.skipif(
    not (extension_available() and has_kernel("attention", "CPU")),
    reason="gtp_kernels._C is not built (python setup.py build_ext --inplace)",
)
KERNELS = [pytest.param("cpu", marks=needs_kernel)]
BACKENDS = ["reference", *KERNELS]
SCORES = [s for s in ATTENTION_SCORES if s != "none"]


def same(actual, expected, name=""):
    """Integer tensors equal; float tensors NaN at the same positions, the rest close."""
    assert actual.shape == expected.shape, name
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{name}: {actual.tolist()} != {expected.tolist()}"
        return
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), (
        f"{name}: NaN at {nan_a.nonzero().tolist()[:8]} vs {nan_e.nonzero().tolist()[:8]}"
    )
    tol = TOL.get(actual.dtype, TOL[torch.float32])
    assert_close(actual.nan_to_num(0.0), expected.nan_to_num(0.0), **tol, name=name)


def f32_bits(*words):
    """float32 tensor from raw bit patterns (NaNs of either sign and any payload)."""
    return torch.tensor(list(words), dtype=torch.int64).to(torch.int32).view(torch.float32)


# ------------------------------------------------------------------------------- attention


def attn(backend, *args):
    return ops.attention(*args, backend=backend)


def _qkv(b=2, h=3, n=9, d=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


def check_attention(backend, q, k, v, ls, scale, theta, m, score):
    """backend vs reference on the same input: NaN positions equal, the rest close."""
    got = attn(backend, q, k, v, ls, scale, theta, m, score)
    want = attn("reference", q, k, v, ls, scale, theta, m, score)
    same(got[0], want[0], f"out ({score}, theta {theta})")
    same(got[1], want[1], f"score ({score}, theta {theta})")
    return want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("theta", [1.0, 0.6, 0.3])
def test_attention_inf_key_in_one_head(backend, theta):
    """The issue's example: one +inf key entry in head 1 (not head 0). Query rows i with
    q_i[c] > 0 see logit +inf (NaN row), q_i[c] == 0 gives NaN, q_i[c] < 0 gives -inf (that
    entry 0, the row finite). The max over heads propagates NaN: diag_max is NaN exactly for
    the tokens whose head-1 row is NaN (the CPU kernel once skipped a NaN unless in head 0)."""
    q, k, v = _qkv()
    k[0, 1, 3, 2] = INF
    nan_rows = q[0, 1, :, 2] >= 0  # image 0, head 1
    for score in SCORES:
        out, sc = check_attention(backend, q, k, v, None, 0.5, theta, 1, score)
        assert torch.equal(out[0, 1].isnan().all(-1), nan_rows)
        assert not out[0, [0, 2]].isnan().any() and not out[1].isnan().any()
        if score == "diag_max":
            assert torch.equal(sc[0].isnan(), nan_rows[1:])
            assert not sc[1].isnan().any()
    # the rows that saw -inf at key 3 keep a finite row with a 0 there
    eye = torch.eye(9).expand(2, 3, 9, 9)
    a, _ = attn(backend, q, k, eye, None, 0.5, 1.0, 0, "none")
    assert (a[0, 1][~nan_rows, 3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_attention_inf_key_dtypes(backend, dtype):
    q, k, v = _qkv(dtype=dtype)
    k[0, 1, 3, 2] = INF
    for score in ("diag_max", "mixed_max", "colsum_mean"):
        check_attention(backend, q, k, v, None, 0.5, 0.6, 1, score)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_log_size(backend):
    """NaN in log_sizes[b, j] makes column j of every row NaN: the whole image is NaN (every
    head), tau is NaN (no non-NaN entry), nothing is zeroed, every score is NaN. The other image
    is untouched. This reached a float-to-int cast of NaN in the polynomial exp before."""
    q, k, v = _qkv()
    ls = torch.zeros(2, 9)
    ls[1, 4] = NAN
    for score in SCORES:
        out, sc = check_attention(backend, q, k, v, ls, 0.5, 0.6, 1, score)
        assert out[1].isnan().all() and sc[1].isnan().all()
        assert not out[0].isnan().any() and not sc[0].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_log_sizes_minus_inf(backend):
    """log size -inf for one key (size 0) gives that key probability 0, a finite map; all -inf
    for an image makes every row NaN (softmax of all -inf)."""
    q, k, v = _qkv()
    ls = torch.zeros(2, 9)
    ls[0, 5] = -INF
    ls[1] = -INF
    eye = torch.eye(9).expand(2, 3, 9, 9)
    a, _ = check_attention(backend, q, k, eye, ls, 0.5, 1.0, 0, "none")
    assert (a[0, :, :, 5] == 0).all() and not a[0].isnan().any()
    assert a[1].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_threshold_with_nan_entries(backend):
    """One NaN query row in a 5 x 5 map: 20 non-NaN entries. kk = 17 (theta 0.3): tau is the
    17th smallest finite entry, the NaN row is never zeroed. kk = 22 > 20 (theta 0.1): tau is
    NaN and `A < tau` zeroes nothing, not even the smallest finite entries."""
    q, k, _ = _qkv(b=1, h=2, n=5)
    q[0, 0, 2, 1] = NAN
    eye = torch.eye(5).expand(1, 2, 5, 5)
    clean, _ = attn("reference", q, k, eye, None, 0.5, 1.0, 0, "none")
    finite = clean[0, 0][~clean[0, 0].isnan()]
    a, _ = check_attention(backend, q, k, eye, None, 0.5, 0.3, 0, "none")
    tau = finite.sort().values[16]
    assert a[0, 0, 2].isnan().all()
    kept = a[0, 0][[0, 1, 3, 4]]
    assert torch.equal(kept == 0, clean[0, 0][[0, 1, 3, 4]] < tau)
    a, _ = check_attention(backend, q, k, eye, None, 0.5, 0.1, 0, "none")
    assert (a[0, 0][[0, 1, 3, 4]] > 0).all()  # NaN tau: nothing zeroed in head 0
    assert (a[0, 1] == 0).sum() > 0  # head 1 has no NaN: masked as usual


@needs_kernel
@pytest.mark.parametrize("method", ["radix", "nth_element", "windowed_scalar", ""])
@pytest.mark.parametrize("theta", [0.9, 0.5, 0.05])
def test_attention_select_methods_with_nan(method, theta, monkeypatch):
    """Every threshold search of the CPU kernel (N = 40: the windowed select runs) orders NaN
    above +inf and gives the reference's tau: NaN rows in one head, NaNs of both signs."""
    if method:
        monkeypatch.setenv("GTP_ATTENTION_SELECT", method)
    q, k, v = _qkv(b=2, h=2, n=40, d=8, seed=3)
    q[0, 0, ::3, 0] = NAN  # 14 NaN rows: 560 of 1600 entries
    q[1, 1, 5, :] = -NAN
    k[1, 0, 7, 1] = INF
    for score in SCORES:
        check_attention("cpu", q, k, v, None, 0.3, theta, 1, score)
    check_attention("cpu", q.double(), k.double(), v.double(), None, 0.3, theta, 1, "mixed_max")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_scale_zero_with_inf(backend):
    """scale = 0 is finite and allowed: 0 * inf = NaN logits, as the reference computes
    scale * (q @ k^T) (the kernel applies the scale after its GEMM, never as BLAS alpha)."""
    q, k, v = _qkv()
    q[0, 0, 2, 0] = INF
    out, _ = check_attention(backend, q, k, v, None, 0.0, 0.6, 1, "mixed_max")
    assert out[0, 0, 2].isnan().all() and not out[0, 0, [0, 1, 3]].isnan().any()


# ---------------------------------------------------------------------------- select_tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_tokens_nan_ranks_greatest(backend):
    nan_pos, nan_neg, nan_payload = 0x7FC00000, 0xFFC00000, 0x7F800001  # signalling payload
    score = f32_bits(nan_pos, 0x3F800000, nan_neg, 0xFF800000, 0x7F800000, nan_payload)
    # values: [nan, 1, -nan, -inf, +inf, nan']; order: -inf(3) < 1(1) < +inf(4) < the NaNs,
    # all equal, the lower position kept
    for p, keep, prop in [
        (3, [0, 2, 5], [1, 3, 4]),
        (4, [0, 2], [1, 3, 4, 5]),
        (5, [0], [1, 2, 3, 4, 5]),
    ]:
        k, q = ops.select_tokens(score[None], p, backend=backend)
        assert k.tolist() == [keep] and q.tolist() == [prop], (p, k.tolist(), q.tolist())


@pytest.mark.parametrize("backend", KERNELS)
def test_select_tokens_random_nan_vs_reference(backend):
    g = torch.Generator().manual_seed(0)
    score = torch.randint(-3, 4, (16, 57), generator=g).float()  # many exact ties
    score[torch.rand(score.shape, generator=g) < 0.2] = NAN
    score[torch.rand(score.shape, generator=g) < 0.1] = -NAN
    score[torch.rand(score.shape, generator=g) < 0.05] = INF
    score[3] = NAN  # an all-NaN row
    for p in (0, 1, 10, 40, 56):
        got = ops.select_tokens(score, p, backend=backend)
        want = ops.select_tokens(score, p, backend="reference")
        same(got[0], want[0], f"keep P={p}")
        same(got[1], want[1], f"prop P={p}")


# ------------------------------------------------------------------------------ build_graph


def graph(backend, tokens, h, w, k, kind):
    return ops.build_graph(tokens, h, w, k, kind, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("k", [3, 40])  # top-K insertion and the large-K selection
def test_build_graph_nonfinite_token(backend, value, k):
    """Token 17 of image 1 holds a NaN / Inf entry: its similarity to every token is NaN and
    ranks as the most similar, so every other row of image 1 links to 17, and row 17 links to
    the K lowest other indices. Image 0 is unaffected. Weights stay finite."""
    x = torch.randn(2, 50, 6)
    x[1, 17, 2] = value
    index, weight = graph(backend, x, 5, 10, k, "semantic")
    rows = index[1].tolist()
    for i, r in enumerate(rows):
        if i != 17:
            assert 17 in r, (i, r)
    assert rows[17] == [j for j in range(50) if j != 17][:k]
    clean = x.clone()
    clean[1] = 0
    assert torch.equal(index[0], graph(backend, clean, 5, 10, k, "semantic")[0][0])
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["semantic", "mixed"])
def test_build_graph_nonfinite_vs_reference(backend, dtype, kind):
    """Several bad tokens (NaN, +-Inf; ties between them go to the lower index) in images of
    n = 35 and n = 600 (the kernel then tiles the similarity columns), K below and above 32."""
    g = torch.Generator().manual_seed(1)
    for n, h, w in ((35, 5, 7), (600, 20, 30)):
        x = torch.randn(3, n, 5, generator=g).to(dtype)
        x[0, 4, 0], x[0, 9, 1], x[0, n - 1, 4] = NAN, INF, -INF
        x[2, :, 3] = NAN  # every token bad: all similarities NaN, every row the K lowest
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel stride != 1
        for k in (1, 8, 33):
            got = graph(backend, x, h, w, k, kind)
            want = graph("reference", x, h, w, k, kind)
            same(got[0], want[0], f"index n={n} K={k}")
            same(got[1], want[1], f"weight n={n} K={k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, exponent",
    [
        (torch.float32, 100),  # |x| ~ 1e30: the sum of squares overflows float32
        (torch.float32, -100),  # |x| ~ 1e-30: the squares underflow
        (torch.float64, 600),  # beyond float32's range
        (torch.float64, -600),
        (torch.float64, -1060),  # float64 subnormal tokens
        (torch.float32, -140),  # float32 subnormal tokens
        (torch.float16, 13),  # near float16's max
        (torch.float16, -20),  # float16 subnormal tokens
    ],
)
def test_build_graph_finite_extremes(backend, dtype, exponent):
    """Cosine similarity does not depend on a token's scale: tokens times 2^e (exact) give the
    same graph as the tokens themselves, bit for bit, at the edges of every dtype's range."""
    x = torch.randn(2, 35, 8).to(dtype)
    x[:, 3] = x[:, 11]  # an exact tie
    x[:, 20] = 0.0  # a zero token: similarity 0 to every token
    big = x * 2.0**exponent
    if exponent < 0:  # what the (possibly subnormal, rounded) tokens represent, exactly
        x = big * 2.0 ** (-exponent // 2) * 2.0 ** (-exponent // 2)
    assert torch.isfinite(big).all() and big.dtype == dtype
    for kind in ("semantic", "mixed"):
        for k in (4, 34):
            want = graph("reference", x, 5, 7, k, kind)
            got = graph(backend, big, 5, 7, k, kind)
            same(got[0], want[0], f"index {kind} K={k}")
            same(got[1], want[1], f"weight {kind} K={k}")


# -------------------------------------------------------------------------------- propagate


def _graph_case(b=2, m=1, n=12, c=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, m + n, c, generator=g).to(dtype)
    index, weight = reference.build_graph(x[:, m:].float(), 3, 4, 3, "mixed")
    keep = torch.stack([torch.randperm(n, generator=g)[: n - 4].sort().values for _ in range(b)])
    sizes = torch.rand(b, m + n, generator=g) + 1
    return x, index, weight, keep, sizes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [NAN, INF, -INF])
def test_propagate_rejects_nonfinite_alpha(backend, alpha):
    x, index, weight, keep, sizes = _graph_case()
    with pytest.raises(ValueError, match=f"gtp.propagate: alpha must be finite, got {alpha}"):
        ops.propagate(x, index, weight, keep, alpha, 1, sizes, backend=backend)


@needs_kernel
def test_propagate_fake_rejects_nonfinite_alpha():
    """The fake kernel (torch.compile, meta tensors) checks the host scalar alpha too."""
    args = [t.to("meta") for t in _graph_case()]
    with pytest.raises(ValueError, match="alpha must be finite"):
        torch.ops.gtp.propagate(*args[:4], INF, 1, args[4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_propagate_nonfinite_values(backend, dtype):
    """NaN / Inf in x, sizes and weight propagate by arithmetic (same NaN positions on every
    backend); a kept row that absorbs nothing is copied bit for bit (-0.0 and NaN included)."""
    x, index, weight, keep, sizes = _graph_case(dtype=dtype)
    x[0, 1 + 2, 1] = NAN
    x[0, 1 + 5, :] = INF
    x[1, 1 + 7, 0] = -INF
    x[1, 1:, 4] = -0.0
    sizes[0, 1 + 2] = NAN
    weight[1, 3, 0] = INF
    got = ops.propagate(x, index, weight, keep, 0.25, 1, sizes, backend=backend)
    want = ops.propagate(x, index, weight, keep, 0.25, 1, sizes, backend="reference")
    for a, e, name in zip(got, want, ("x", "sizes", "index", "weight"), strict=True):
        same(a, e, name)
    # rows that absorb nothing: exact copies of their input row
    new_pos = torch.full((2, 12), -1)
    new_pos.scatter_(1, keep, torch.arange(8).expand(2, 8))
    for b in range(2):
        for r, i in enumerate(keep[b].tolist()):
            nbr = [j for j in index[b, i].tolist() if j >= 0]
            if all(new_pos[b, j] >= 0 for j in nbr):
                src, dst = x[b, 1 + i], got[0][b, 1 + r]
                assert torch.equal(src.view(torch.uint8), dst.view(torch.uint8)) or (
                    src.isnan().any() and torch.equal(src.isnan(), dst.isnan())
                ), (b, i)


# ------------------------------------------------------------------------- patched timm model


@pytest.mark.parametrize("where", ["input", "block"])
def test_patched_model_nan_mid_network(where):
    """What the timm patch docstring promises: a NaN in one image (in the input, or appearing
    inside block 1 as an fp16 overflow would) gives that image NaN logits and no error; the
    other image's logits equal those of a batch without the NaN; every backend gives the same."""
    import timm

    import gtp_kernels.patch as gp

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=3, img_size=64, num_classes=5)
    gp.timm(model.eval(), num_prop=3, sparsity=0.6)
    x = torch.randn(2, 3, 64, 64)
    bad = x.clone()
    hook = None
    if where == "input":
        bad[0, :, 10:20, 30:40] = NAN
    else:

        def poison(module, args, out):
            if poison.on:
                out = out.clone()
                out[0, 5, 7] = INF
            return out

        poison.on = False
        hook = model.blocks[1].mlp.fc2.register_forward_hook(poison)
    backends = ["reference"] + (["cpu"] if extension_available() else [])

    def logits(inp):
        out = {}
        for backend in backends:
            model.gtp.backend = backend
            out[backend] = model(inp)
        return out

    with torch.inference_mode():
        clean = logits(x)
        if hook is not None:
            poison.on = True
        got = logits(bad)
    for b in backends:
        assert got[b][0].isnan().all(), b
        assert_close(got[b][1], clean[b][1], atol=1e-5, rtol=1e-5, name=b)
        same(got[b], got["reference"], b)
