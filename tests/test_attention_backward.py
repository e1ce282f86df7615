"""gtp.attention backward: gradcheck in float64, agreement with the reference's autograd (the
top-theta mask held constant), every score strategy, half precision, opcheck with gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, single_thread
from test_attention import needs_kernel, timm_qkv

import gtp_kernels.ops as ops
from gtp_kernels.reference import attention as ref_attention
from gtp_kernels.reference.attention import SCORES

pytestmark = needs_kernel
one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _inputs(b, h, n, d, *, dtype=torch.float64, dv=None, sizes=True, seed=0):
    """q, k, v as timm's strided views (peaked attention: logits spread over a few units),
    log_sizes of token sizes in [1, 3), all requiring grad."""
    torch.manual_seed(seed)
    q, k, v = (t.detach().to(dtype) for t in timm_qkv(b, h, n, d, dv=dv))
    q = q * 2.0
    ls = (torch.rand(b, n, dtype=torch.float64) * 2 + 1).log().float() if sizes else None
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if ls is not None:
        leaves.append(ls.requires_grad_())
    return q, k, v, ls, leaves


CASES = [
    # (b, h, n, d, dv, num_prefix, theta, score)
    (2, 2, 7, 4, None, 1, 0.6, "mixed_max"),
    (1, 3, 9, 3, 5, 2, 0.3, "cls_mean"),
    (2, 1, 6, 4, None, 0, 1.0, "sum_max"),
    (1, 2, 8, 2, None, 1, 0.8, "none"),
]


@pytest.mark.parametrize("b, h, n, d, dv, m, theta, score", CASES)
def test_gradcheck_float64(b, h, n, d, dv, m, theta, score):
    """Finite differences of the compiled kernel against its backward. The mask is piecewise
    constant, so away from ties (random inputs) finite differences see it as constant too."""
    q, k, v, ls, _ = _inputs(b, h, n, d, dv=dv)
    # log_sizes is float32 by the op's contract; gradcheck it through a float64 leaf
    ls64 = ls.detach().double().requires_grad_()

    def fn(q, k, v, ls64):
        out, s = ops.attention(q, k, v, ls64.float(), d**-0.5, theta, m, score, backend="cpu")
        return out, s.double()

    # The score and log_sizes are float32 by the op's contract (log_sizes is checked through a
    # float64 leaf), so the finite differences through them need a larger step.
    assert torch.autograd.gradcheck(fn, (q, k, v, ls64), eps=1e-3, atol=2e-3, rtol=1e-3)
    # out with respect to q, k, v at float64 precision
    assert torch.autograd.gradcheck(
        lambda q, k, v: fn(q, k, v, ls64.detach())[0], (q, k, v), eps=1e-6, atol=1e-6
    )


def _grads(backend, score, theta, m, dtype, dv=None):
    q, k, v, ls, leaves = _inputs(2, 3, 11, 8, dtype=dtype, dv=dv, seed=1)
    out, s = ops.attention(q, k, v, ls, 8**-0.5, theta, m, score, backend=backend)
    torch.manual_seed(7)
    g_out = torch.randn(out.shape, dtype=out.dtype)  # randn_like would follow the strides
    g_s = torch.randn(s.shape, dtype=s.dtype)
    outs = [(t, g) for t, g in ((out, g_out), (s, g_s)) if t.requires_grad]
    grads = torch.autograd.grad([t for t, _ in outs], leaves, [g for _, g in outs])
    return out, s, grads


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_matches_reference_autograd(score, theta):
    """Every input's gradient equals what autograd gives for the reference (float64: to
    rounding; float32: a few ulps of the magnitudes)."""
    m = 0 if score in ("none", "diag_mean", "colsum_mean") else 1
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        ref = _grads("reference", score, theta, m, dtype)
        got = _grads("cpu", score, theta, m, dtype)
        assert_close(got[0], ref[0], atol=tol, rtol=tol, name=f"{score} out")
        for name, a, e in zip(("dq", "dk", "dv", "dlog_sizes"), got[2], ref[2], strict=True):
            assert_close(a, e, atol=tol, rtol=tol, name=f"{score} theta={theta} {dtype} {name}")


def test_mask_is_constant():
    """Masked entries are constants: with v = I the output is the masked map A itself, and the
    sum of its masked (zero) entries has zero gradient in q and k, however the inputs move."""
    q, k, _, _, _ = _inputs(1, 1, 6, 4, sizes=False, seed=3)
    eye = torch.eye(6, dtype=torch.float64)[None, None]
    a, _ = ops.attention(q, k, eye, None, 0.5, 0.5, 0, "none", backend="cpu")
    masked = (a == 0).double()
    assert 0 < masked.sum() < 36
    dq, dk = torch.autograd.grad((a * masked).sum(), (q, k), retain_graph=True)
    assert dq.abs().max() == 0 and dk.abs().max() == 0
    dq, dk = torch.autograd.grad((a * (1 - masked)).sum(), (q, k))  # the kept ones do move
    assert dq.abs().max() > 0 and dk.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backward(dtype):
    """Half inputs: gradients in the input dtype, computed in float32, close to float32's."""
    ref = _grads("cpu", "mixed_max", 0.6, 1, torch.float32)
    got = _grads("cpu", "mixed_max", 0.6, 1, dtype)
    for name, a, e in zip(("dq", "dk", "dv", "dlog_sizes"), got[2], ref[2], strict=True):
        want_dtype = torch.float32 if name == "dlog_sizes" else dtype
        assert a.dtype == want_dtype, name
        err = (a.float() - e).abs().max() / e.abs().max()
        assert err < 5e-2, f"{name}: relative error {err:.3g}"


def test_score_only_and_unused_outputs():
    """Gradient of the score alone (out unused), and of out alone (score unused)."""
    for use in ("score", "out"):
        q, k, v, ls, leaves = _inputs(2, 2, 7, 4, seed=4)
        r_out, r_s = ref_attention(q, k, v, ls, 0.5, 0.6, 1, "mixed_mean")
        c_out, c_s = ops.attention(q, k, v, ls, 0.5, 0.6, 1, "mixed_mean", backend="cpu")
        ref = torch.autograd.grad(
            (r_s if use == "score" else r_out).sum(), leaves, allow_unused=True
        )
        got = torch.autograd.grad(
            (c_s if use == "score" else c_out).sum(), leaves, allow_unused=True
        )
        for a, e, t in zip(got, ref, leaves, strict=True):
            zeros = torch.zeros_like(t)  # v does not reach the score
            a, e = (zeros if a is None else a), (zeros if e is None else e)
            assert_close(a, e, atol=1e-10, rtol=1e-10, name=use)


def test_opcheck_with_gradients():
    """Autograd registration, and the backward under AOT dispatch (torch.compile's path)."""
    q, k, v, ls, _ = _inputs(2, 2, 9, 4, dtype=torch.float32, seed=5)
    torch.library.opcheck(torch.ops.gtp.attention, (q, k, v, ls, 0.5, 0.6, 1, "mixed_max"))


def test_register_autograd_for_another_op():
    """The same backward serves any op with gtp::attention's schema (as the Triton op does)."""
    lib = torch.library.Library("gtp_test_bwd", "DEF")
    lib.define(
        "attention(Tensor q, Tensor k, Tensor v, Tensor? log_sizes, float scale, float sparsity,"
        " int num_prefix, str score) -> (Tensor, Tensor)"
    )
    lib.impl("attention", ref_attention_detached, "CompositeExplicitAutograd")
    from gtp_kernels.ops.attention import register_autograd

    register_autograd("gtp_test_bwd::attention")
    q, k, v, ls, leaves = _inputs(1, 2, 6, 4, seed=6)
    out, s = torch.ops.gtp_test_bwd.attention(q, k, v, ls, 0.5, 0.7, 1, "diag_max")
    r_out, r_s = ref_attention(q, k, v, ls, 0.5, 0.7, 1, "diag_max")
    got = torch.autograd.grad(out.sum() + s.sum(), leaves)
    ref = torch.autograd.grad(r_out.sum() + r_s.sum(), leaves)
    for a, e in zip(got, ref, strict=True):
        assert_close(a, e, atol=1e-10, rtol=1e-10, name="registered op")


def ref_attention_detached(q, k, v, log_sizes, scale, sparsity, num_prefix, score):
    with torch.no_grad():
        out, s = ref_attention(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
    return out.clone(), s.clone()
