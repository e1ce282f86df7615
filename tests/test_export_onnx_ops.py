"""The ONNX translation of every gtp op (gtp_kernels.export.onnx), run in ONNX Runtime, against
the reference: random inputs, exact ties, the non-finite rule, edge shapes. Each case exports a
tiny graph with a dynamic batch (about a second each)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

import gtp_kernels.ops  # noqa: F401  (registers the fake kernels torch.export needs)
from gtp_kernels import reference
from gtp_kernels._extension import extension_available

pytest.importorskip("onnxruntime")
from export_helpers import Fn, onnx_run, run, session  # noqa: E402

pytestmark = pytest.mark.skipif(
    not extension_available(), reason="torch.ops.gtp.* needs gtp_kernels._C (build it)"
)
gtp = torch.ops.gtp
NAN, INF = math.nan, math.inf
F32 = dict(atol=1e-5, rtol=1e-5)


# --- select_tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 1, 8, 36])
def test_select_tokens_random(p):
    score = torch.randn(3, 37)
    keep, prop = onnx_run(lambda s: gtp.select_tokens(s, p), score)
    k_ref, p_ref = reference.select_tokens(score, p)
    assert torch.equal(keep, k_ref) and torch.equal(prop, p_ref)


def test_select_tokens_ties_and_non_finite():
    rows = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied: the highest positions go
        [0.5, 0.2, 0.5, 0.2, 0.9, 0.5, 0.2, 0.5],
        [0.0, -0.0, 1.0, -0.0, 0.0, 2.0, 0.0, -1.0],  # -0.0 == 0.0
        [INF, NAN, 3.0e38, INF, -INF, NAN, 0.0, -INF],  # -inf < finite < +inf < NaN
        [NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN],
        [INF, INF, NAN, 1.0, INF, NAN, 1.0, -INF],
    ]
    score = torch.tensor(rows)
    for p in (1, 3, 5):
        keep, prop = onnx_run(lambda s, p=p: gtp.select_tokens(s, p), score)
        k_ref, p_ref = reference.select_tokens(score, p)
        assert keep.tolist() == k_ref.tolist(), (p, keep.tolist(), k_ref.tolist())
        assert prop.tolist() == p_ref.tolist(), (p, prop.tolist(), p_ref.tolist())


def test_select_tokens_other_batch_size():
    sess = session(Fn(lambda s: gtp.select_tokens(s, 4)), (torch.randn(2, 9),))
    for b in (1, 5):
        score = torch.randint(0, 3, (b, 9)).float()  # many ties
        keep, prop = run(sess, score)
        k_ref, p_ref = reference.select_tokens(score, 4)
        assert torch.equal(keep, k_ref) and torch.equal(prop, p_ref)


# --- attention ---------------------------------------------------------------------------


def qkv(b=2, h=3, n=37, d=16, peak=3.0, dtype=torch.float32):
    """Logits with standard deviation `peak`: peaked attention like a trained model's, so the
    threshold does not sit among near-ties that rounding order could flip."""
    q = torch.randn(b, h, n, d, dtype=dtype) * peak**0.5
    k = torch.randn(b, h, n, d, dtype=dtype) * peak**0.5
    return q, k, torch.randn(b, h, n, d, dtype=dtype)


SCORES = ("mixed_max", "mixed_mean", "diag_max", "diag_mean", "colsum_max", "colsum_mean")
SCORES += ("cls_max", "cls_mean", "sum_max", "none")


def attention_all_scores(q, k, v, log_sizes, theta, m):
    """One graph, every score strategy: out once, the scores one after another."""
    scale = q.shape[-1] ** -0.5
    scores = [s if m > 0 or not s.startswith("cls_") else "none" for s in SCORES]
    outs = [gtp.attention(q, k, v, log_sizes, scale, theta, m, s) for s in scores]
    return (outs[0][0], *(o[1] for o in outs))


def check_attention(q, k, v, log_sizes, theta, m, tol=F32):
    got = onnx_run(
        lambda q, k, v, ls: attention_all_scores(q, k, v, ls, theta, m), q, k, v, log_sizes
    )
    scale = q.shape[-1] ** -0.5
    out_ref, _ = reference.attention(q, k, v, log_sizes, scale, theta, m, "none")
    assert_close(got[0], out_ref, **tol, name="out")
    for s, score in zip(SCORES, got[1:], strict=True):
        if s.startswith("cls_") and m == 0:
            continue  # needs a CLS token: not computed by attention_all_scores either
        _, s_ref = reference.attention(q, k, v, log_sizes, scale, theta, m, s)
        assert_close(score, s_ref, **tol, name=f"score {s}")


@pytest.mark.parametrize("theta", [0.6, 1.0, 0.05])
def test_attention_random(theta):
    q, k, v = qkv()
    log_sizes = torch.rand(2, 37).mul(2).add(1).log()
    check_attention(q, k, v, log_sizes, theta, 1)


def test_attention_no_sizes_no_prefix_float64():
    q, k, v = qkv(b=2, h=2, n=20, d=8, dtype=torch.float64)
    check_attention(q, k, v, None, 0.6, 0, tol=dict(atol=1e-12, rtol=1e-12))


def test_attention_ties_uniform_and_blocks():
    # q = 0: every row uniform, every probability tied with tau, nothing is zeroed.
    q, k, v = qkv(b=2, h=2, n=12)
    q = torch.zeros_like(q)
    k[:, :, 6:] = k[:, :, :6]  # keys in pairs: tied probabilities in every row
    check_attention(q, k, v, None, 0.6, 1)
    q2, _, _ = qkv(b=2, h=2, n=12)
    check_attention(q2, k, v, None, 0.5, 1)


def test_attention_non_finite_rule():
    q, k, v = qkv(b=2, h=3, n=16, d=8)
    q[0, 0, 3, 2] = NAN  # one NaN row in head 0
    k[0, 1, :, :] = 0.0
    q[0, 1, 5, 0] = INF  # logits +-inf / NaN in row 5 of head 1
    log_sizes = torch.zeros(2, 16)
    log_sizes[1, :] = -INF  # every logit of image 1 is -inf: all rows NaN
    check_attention(q, k, v, log_sizes, 0.6, 1)
    # Image 0: fewer than kk non-NaN entries in head 2 -> tau NaN, nothing zeroed.
    q3, k3, v3 = qkv(b=1, h=2, n=10, d=4)
    q3[0, 1, :8, 0] = NAN
    check_attention(q3, k3, v3, None, 0.6, 1)


# --- build_graph -------------------------------------------------------------------------


def graph_run(tokens, h, w, kn, graph):
    return onnx_run(lambda t: gtp.build_graph(t, h, w, kn, graph), tokens)


@pytest.mark.parametrize("graph", ["spatial", "semantic", "mixed"])
@pytest.mark.parametrize("hw,kn", [((6, 6), 5), ((3, 7), 8), ((1, 2), 1)])
def test_build_graph_random(graph, hw, kn):
    h, w = hw
    tokens = torch.randn(3, h * w, 24)
    index, weight = graph_run(tokens, h, w, kn, graph)
    i_ref, w_ref = reference.build_graph(tokens, h, w, kn, graph)
    assert torch.equal(index, i_ref), graph
    assert_close(weight, w_ref, atol=0.0, rtol=0.0, name="weight")


def test_build_graph_ties_zero_tokens_and_k_zero():
    tokens = torch.randn(2, 16, 8)
    tokens[:, 8:] = tokens[:, :8]  # every token has an exact twin: tied similarities
    tokens[1, 3] = 0.0  # a zero token: similarity 0 to everything
    tokens[1, 5] *= 1e30  # finite, its square beyond float32: normalised without overflow
    for graph, kn in (("semantic", 4), ("mixed", 4), ("mixed", 0), ("semantic", 0)):
        index, weight = graph_run(tokens, 4, 4, kn, graph)
        i_ref, w_ref = reference.build_graph(tokens, 4, 4, kn, graph)
        assert torch.equal(index, i_ref), graph
        assert torch.equal(weight, w_ref), graph


def test_build_graph_large_finite_tokens_do_not_overflow():
    """Tokens near 1e30 (squares beyond float32) give the graph of the same tokens at 1."""
    tokens = torch.randn(2, 16, 8)
    scaled = tokens.clone()
    scaled[0] *= 1e30
    scaled[1, ::2] *= 3e37
    big = graph_run(scaled, 4, 4, 4, "mixed")
    small = graph_run(tokens, 4, 4, 4, "mixed")
    assert torch.equal(big[0], small[0]) and torch.equal(big[1], small[1])


def test_build_graph_non_finite_tokens():
    tokens = torch.randn(2, 16, 8)
    tokens[0, 6, 2] = NAN
    tokens[1, 9, 0] = INF
    tokens[1, 12, :] = -INF
    index, weight = graph_run(tokens, 4, 4, 3, "semantic")
    i_rule, w_rule = reference.build_graph(tokens, 4, 4, 3, "semantic")
    # NaN similarity ranks as the most similar: its own row takes the 3 lowest other indices
    assert index[0, 6].tolist() == [0, 1, 2]
    assert torch.equal(index, i_rule) and torch.equal(weight, w_rule)


# --- propagate ---------------------------------------------------------------------------


def propagate_case(b=3, h=5, w=5, m=1, c=12, p=6, kn=4, graph="mixed"):
    n = h * w
    x = torch.randn(b, m + n, c)
    index, weight = reference.build_graph(x[:, m:], h, w, kn, graph)
    keep, _ = reference.select_tokens(torch.randn(b, n), p)
    sizes = torch.rand(b, m + n) + 0.5
    return x, index, weight, keep, sizes


def assert_same(got, expected, name):
    """Non-finite entries identical (NaN where NaN, the same infinities), the rest close."""
    nan_g, nan_e = got.isnan(), expected.isnan()
    assert torch.equal(nan_g, nan_e), f"{name}: NaN positions differ"
    inf_e = expected.isinf()
    assert torch.equal(got[inf_e], expected[inf_e]) and torch.equal(got.isinf(), inf_e), name
    finite = ~(nan_e | inf_e)
    assert_close(got[finite], expected[finite], **F32, name=name)


def check_propagate(x, index, weight, keep, alpha, m, sizes):
    if sizes is None:
        got = onnx_run(
            lambda x, i, w, k: gtp.propagate(x, i, w, k, alpha, m, None), *(x, index, weight, keep)
        )
    else:
        got = onnx_run(
            lambda x, i, w, k, s: gtp.propagate(x, i, w, k, alpha, m, s),
            x,
            index,
            weight,
            keep,
            sizes,
        )
    ref = reference.propagate(x, index, weight, keep, alpha, m, sizes)
    for name, g, r in zip(("x", "sizes", "index", "weight"), got, ref, strict=True):
        if name in ("x", "sizes"):
            assert_same(g, r, name)
        else:
            assert torch.equal(g, r), name


@pytest.mark.parametrize("alpha", [0.1, 0.0])
@pytest.mark.parametrize("with_sizes", [True, False])
def test_propagate_random(alpha, with_sizes):
    x, index, weight, keep, sizes = propagate_case()
    check_propagate(x, index, weight, keep, alpha, 1, sizes if with_sizes else None)


def test_propagate_no_prefix_p_zero_semantic_unordered_keep():
    x, index, weight, keep, sizes = propagate_case(m=0, p=0, graph="semantic")
    check_propagate(x, index, weight, keep, 0.3, 0, sizes)
    x, index, weight, keep, sizes = propagate_case(m=2, p=9, graph="spatial")
    keep = keep.flip(-1)  # keep in any order: the output follows it
    check_propagate(x, index, weight, keep, 0.3, 2, sizes)


def test_propagate_non_finite():
    x, index, weight, keep, sizes = propagate_case(b=2, p=8)
    kept = set(keep[0].tolist())
    gone = [j for j in range(25) if j not in kept]
    x[0, 1 + gone[0], :3] = torch.tensor([NAN, INF, -INF])
    x[0, 1 + gone[1], 1:3] = torch.tensor([-INF, INF])  # +inf and -inf into shared rows
    x[1, 1 + keep[1, 0], 0] = NAN  # a kept token's own NaN stays in its row only
    sizes[0, 1 + gone[2]] = INF
    check_propagate(x, index, weight, keep, 0.1, 1, sizes)


def test_propagate_rows_absorbing_nothing_are_copied_bit_for_bit():
    """No x + alpha * 0: a -0.0 in a kept row that absorbs nothing stays -0.0 (fast path)."""
    x, index, weight, keep, sizes = propagate_case(b=2, p=4)
    x[:, :, :4] = -0.0
    got = onnx_run(
        lambda x, i, w, k: gtp.propagate(x, i, w, k, 0.1, 1, None), x, index, weight, keep
    )[0]
    _, absorbs_rows = _absorbing(index, keep, 25)
    for b in range(2):
        for r in range(keep.shape[1]):
            row = got[b, 1 + r, :4]
            if not absorbs_rows[b, r]:
                assert torch.signbit(row).all(), (b, r, row)
    assert torch.signbit(got[:, 0, :4]).all()  # the prefix row is copied


def _absorbing(index, keep, n):
    """(B, R) bool: kept row r has a neighbour that is propagated."""
    b = keep.shape[0]
    kept = torch.zeros(b, n, dtype=torch.bool).scatter_(1, keep, True)
    rows = index.long().gather(1, keep[:, :, None].expand(-1, -1, index.shape[2]))
    valid = rows >= 0
    gone = ~kept.gather(1, rows.clamp(min=0).flatten(1)).view_as(rows)
    return None, (valid & gone).any(-1)
