"""gtp.propagate: hand-worked cases, kernel vs reference, opcheck, gradients, properties."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close

from gtp_kernels import ops, reference
from gtp_kernels._extension import extension_available

needs_ext = pytest.mark.skipif(
    not extension_available(),
    reason="gtp_kernels._C is not built (python setup.py build_ext --inplace)",
)
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=needs_ext),
]


def _compiled(*args):
    return torch.ops.gtp.propagate(*args)


def run(backend, *args):
    """ops.propagate(*args, backend=backend). tests/triton_ops reuses the tests below with
    backend="triton"; its conftest sends those calls to the Triton test device."""
    return ops.propagate(*args, backend=backend)


def _hand_case(keep):
    """1 prefix + 4 image tokens on a 2x2 grid (every token sees the other three), C = 2,
    one padding slot per row."""
    x = torch.tensor([[[100.0, -100.0], [1.0, 0.0], [0.0, 2.0], [4.0, 0.0], [0.0, 8.0]]])
    index = torch.tensor(
        [[[1, 2, 3, -1], [0, 2, 3, -1], [0, 1, 3, -1], [0, 1, 2, -1]]], dtype=torch.int32
    )
    weight = torch.tensor(
        [
            [
                [0.5, 0.25, 0.125, 0.0],
                [0.3, 0.3, 0.3, 0.0],
                [0.2, 0.2, 0.2, 0.0],
                [0.75, 0.25, 1.0, 0.0],
            ]
        ]
    )
    sizes = torch.ones(1, 5)
    return x, index, weight, torch.tensor([keep]), sizes


def _check_hand_ascending(fn):
    # Keep image tokens 0 and 3, propagate 1 and 2, alpha = 0.5.
    x, index, weight, keep, sizes = _hand_case([0, 3])
    x_out, s_out, i_out, w_out = fn(x, index, weight, keep, 0.5, 1, sizes)
    # token 0: x0 + 0.5 * (0.5 * x1 + 0.25 * x2) = [1, 0] + 0.5 * [1, 1]
    # token 3: x3 + 0.5 * (0.25 * x1 + 1.0 * x2) = [0, 8] + 0.5 * [4, 0.5]
    assert_close(x_out, torch.tensor([[[100.0, -100.0], [1.5, 0.5], [2.0, 8.25]]]), name="x")
    # sizes: 1 + 0.5 * (0.5 + 0.25), 1 + 0.5 * (0.25 + 1.0)
    assert_close(s_out, torch.tensor([[1.0, 1.375, 1.625]]), name="sizes")
    # row 0 keeps only its edge to token 3 (new position 1), row 3 only the edge to token 0.
    assert_close(i_out, torch.tensor([[[1, -1, -1, -1], [0, -1, -1, -1]]], dtype=torch.int32))
    assert_close(w_out, torch.tensor([[[0.125, 0, 0, 0], [0.75, 0, 0, 0]]]), name="weight")


def _check_hand_reordered(fn):
    # keep = [3, 0]: outputs follow keep's order, and the graph uses the new positions.
    x, index, weight, keep, sizes = _hand_case([3, 0])
    x_out, s_out, i_out, w_out = fn(x, index, weight, keep, 0.5, 1, sizes)
    assert_close(x_out, torch.tensor([[[100.0, -100.0], [2.0, 8.25], [1.5, 0.5]]]), name="x")
    assert_close(s_out, torch.tensor([[1.0, 1.625, 1.375]]), name="sizes")
    assert_close(i_out, torch.tensor([[[1, -1, -1, -1], [0, -1, -1, -1]]], dtype=torch.int32))
    assert_close(w_out, torch.tensor([[[0.75, 0, 0, 0], [0.125, 0, 0, 0]]]), name="weight")


def test_hand_worked_reference():
    _check_hand_ascending(reference.propagate)
    _check_hand_reordered(reference.propagate)


def test_hand_worked_reference_no_sizes():
    x, index, weight, keep, _ = _hand_case([0, 3])
    x_out, s_out, _, _ = reference.propagate(x, index, weight, keep, 0.5, 1, None)
    assert s_out.shape == (0,) and s_out.dtype == torch.float32
    assert_close(x_out, torch.tensor([[[100.0, -100.0], [1.5, 0.5], [2.0, 8.25]]]), name="x")


def test_reference_differentiable():
    x, index, weight, keep, sizes = _hand_case([0, 3])
    x = x.double().requires_grad_()
    sizes = sizes.requires_grad_()
    out = reference.propagate(x, index, weight, keep, 0.5, 1, sizes)
    (out[0].sum() + out[1].sum()).backward()
    # token 1 feeds token 0 with 0.5 * 0.5 and token 3 with 0.5 * 0.25.
    assert_close(x.grad[0, 2], torch.tensor([0.375, 0.375], dtype=torch.float64), name="dx")
    assert_close(sizes.grad, torch.tensor([[1.0, 1.0, 0.375, 0.625, 1.0]]), name="dsizes")


def test_reference_rejects_bad_keep():
    x, index, weight, _, sizes = _hand_case([0, 3])
    with pytest.raises(ValueError, match="keep has duplicate"):
        reference.propagate(x, index, weight, torch.tensor([[0, 0]]), 0.5, 1, sizes)
    with pytest.raises(ValueError, match="keep entries must be in"):
        reference.propagate(x, index, weight, torch.tensor([[0, 4]]), 0.5, 1, sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked(backend):
    def fn(*args):
        return run(backend, *args)

    _check_hand_ascending(fn)
    _check_hand_reordered(fn)


# ---------------------------------------------------------------------------------------------
# Samples


def random_graph(b, n, width, *, gen, fill=0.7):
    """ELL graph: each row holds up to `width` distinct neighbours j != i (about fill * width),
    ascending, then -1 padding; positive weights, 0 at padding."""
    index = torch.full((b, n, width), -1, dtype=torch.int32)
    weight = torch.zeros(b, n, width)
    for bi in range(b):
        for i in range(n):
            cand = torch.tensor([j for j in range(n) if j != i], dtype=torch.int64)
            cnt = min(len(cand), int(torch.randint(0, width + 1, (1,), generator=gen)))
            cnt = min(cnt, max(1, round(fill * width))) if len(cand) else 0
            pick = cand[torch.randperm(len(cand), generator=gen)[:cnt]].sort().values
            index[bi, i, :cnt] = pick.to(torch.int32)
            weight[bi, i, :cnt] = 0.05 + torch.rand(cnt, generator=gen)
    return index, weight


def random_keep(b, n, num_prop, *, gen, ascending=True):
    rows = []
    for _ in range(b):
        k = torch.randperm(n, generator=gen)[: n - num_prop]
        rows.append(k.sort().values if ascending else k)
    return torch.stack(rows) if rows else torch.empty(0, n - num_prop, dtype=torch.int64)


def make_case(
    b,
    m,
    n,
    c,
    width,
    num_prop,
    *,
    alpha=0.4,
    sizes=True,
    ascending=True,
    layout="contiguous",
    dtype=torch.float32,
    device="cpu",
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    big_n = m + n
    if layout == "transposed":  # token stride 1, channel stride N: copied by the kernel
        x = torch.randn(b, c, big_n, generator=gen).transpose(1, 2)
    elif layout == "strided":  # every other token and batch of a bigger tensor
        x = torch.randn(2 * b, 2 * big_n, c, generator=gen)[::2, ::2]
    else:
        x = torch.randn(b, big_n, c, generator=gen)
    index, weight = random_graph(b, n, width, gen=gen)
    keep = random_keep(b, n, num_prop, gen=gen, ascending=ascending)
    s = 0.5 + torch.rand(b, big_n, generator=gen) if sizes else None
    x = x.to(device=device, dtype=dtype)
    return [
        x,
        index.to(device),
        weight.to(device),
        keep.to(device),
        alpha,
        m,
        None if s is None else s.to(device),
    ]


SAMPLES = {
    # name: (B, M, n, C, W, P, options)
    "grid3x3_cls": (2, 1, 9, 5, 8, 3, {}),
    "no_prefix_unsorted_keep": (3, 0, 13, 7, 16, 5, {"sizes": False, "ascending": False}),
    "two_prefix_transposed_x": (2, 2, 11, 33, 12, 4, {"layout": "transposed"}),
    "strided_x_odd_c": (2, 1, 10, 17, 6, 3, {"layout": "strided"}),
    "wide_c_vector_tail": (2, 1, 16, 129, 16, 6, {"alpha": 0.9}),
    "keep_one": (2, 1, 6, 4, 16, 5, {}),
    "no_propagation": (2, 1, 6, 9, 5, 0, {}),
    "alpha_zero": (2, 1, 8, 6, 8, 3, {"alpha": 0.0}),
    "negative_alpha": (2, 1, 8, 6, 8, 3, {"alpha": -0.3}),
    "prefix_only": (2, 3, 0, 4, 4, 0, {}),
    "zero_channels": (2, 1, 6, 0, 4, 2, {}),
    "zero_width_graph": (2, 1, 6, 3, 0, 2, {}),
    "single_image_token": (1, 0, 1, 3, 2, 0, {}),
    "empty_batch": (0, 1, 4, 5, 8, 1, {}),
    "empty_batch_no_sizes": (0, 0, 4, 5, 8, 1, {"sizes": False}),
}


def sample_inputs(device="cpu", dtype=torch.float32):
    """(name, args) of torch.ops.gtp.propagate for every sample."""
    out = []
    for seed, (name, (b, m, n, c, w, p, opt)) in enumerate(SAMPLES.items()):
        out.append(
            (name, make_case(b, m, n, c, w, p, dtype=dtype, device=device, seed=seed, **opt))
        )
    return out


def _names():
    return list(SAMPLES)


def _sample(name, dtype=torch.float32):
    return dict(sample_inputs("cpu", dtype))[name]


# ---------------------------------------------------------------------------------------------
# Kernel vs reference


def _compare(got, want, tol, name):
    """x_out within `tol`; sizes_out (always float32) within float32 tolerance; the graph
    exactly (it is only copied and re-indexed)."""
    tols = (tol, TOL[torch.float32], {}, {})
    names = ("x_out", "sizes_out", "index_out", "weight_out")
    for g, e, t, what in zip(got, want, tols, names, strict=True):
        assert_close(g, e, **t, name=f"{name}/{what}")


@needs_ext
@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference(name, dtype):
    args = _sample(name, dtype)
    got = _compiled(*args)
    want = reference.propagate(*args)
    assert got[0].is_contiguous()
    _compare(got, want, TOL[dtype] if dtype == torch.float64 else TOL[torch.float32], name)


@needs_ext
@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_low_precision(name, dtype):
    # Both accumulate in float32 and round once to x's dtype, so they agree to within one
    # rounding of the output (TOL[dtype] is a few ulps); and the kernel's error against a
    # float64 run on the same (rounded) inputs is at most twice the reference's own.
    args = _sample(name, dtype)
    got = _compiled(*args)
    want = reference.propagate(*args)
    _compare(got, want, TOL[dtype], name)
    exact = reference.propagate(args[0].double(), *args[1:])[0]
    if exact.numel():
        err_k = (got[0].double() - exact).abs().max().item()
        err_r = (want[0].double() - exact).abs().max().item()
        assert err_k <= 2 * err_r + 1e-12, f"{name}: kernel error {err_k} > 2 x {err_r}"


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration, AOT dispatch


@needs_ext
@pytest.mark.parametrize("name", _names())
def test_opcheck(name):
    args = _sample(name)
    args[0] = args[0].detach().requires_grad_(args[0].numel() > 0)
    if args[6] is not None:
        args[6] = args[6].detach().requires_grad_(args[6].numel() > 0)
    torch.library.opcheck(torch.ops.gtp.propagate, args)


@needs_ext
def test_opcheck_float64_no_grad():
    torch.library.opcheck(torch.ops.gtp.propagate, _sample("grid3x3_cls", torch.float64))


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["grid3x3_cls", "two_prefix_transposed_x", "no_propagation"])
def test_gradcheck_x(backend, name):
    x, index, weight, keep, alpha, m, sizes = _sample(name, torch.float64)
    x = x.detach().requires_grad_()
    torch.autograd.gradcheck(
        lambda x_: ops.propagate(x_, index, weight, keep, alpha, m, sizes, backend=backend)[0],
        (x,),
        fast_mode=x.numel() > 200,  # the full Jacobian of the larger sample is slow
    )


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_sizes(backend):
    # sizes are float32 by contract: the op is linear, so central differences are exact up to
    # float32 rounding of outputs around 1 (~1e-7 / eps).
    x, index, weight, keep, alpha, m, sizes = _sample("grid3x3_cls", torch.float64)
    sizes = sizes.detach().requires_grad_()
    torch.autograd.gradcheck(
        lambda s_: ops.propagate(x, index, weight, keep, alpha, m, s_, backend=backend)[1],
        (sizes,),
        eps=1e-2,
        atol=1e-3,
        rtol=1e-3,
    )


@needs_ext
@pytest.mark.parametrize("name", ["grid3x3_cls", "strided_x_odd_c", "wide_c_vector_tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(name, dtype):
    x, index, weight, keep, alpha, m, sizes = _sample(name, dtype)
    grads = []
    for backend in ("cpu", "reference"):
        xr = x.detach().requires_grad_()
        sr = sizes.detach().requires_grad_()
        out = ops.propagate(xr, index, weight, keep, alpha, m, sr, backend=backend)
        gen = torch.Generator().manual_seed(1)
        gx = torch.randn(out[0].shape, generator=gen).to(dtype)
        gs = torch.randn(out[1].shape, generator=gen)
        grads.append(torch.autograd.grad((out[0], out[1]), (xr, sr), (gx, gs)))
    tol = TOL[dtype]
    assert_close(grads[0][0], grads[1][0], **tol, name="dx")
    assert_close(grads[0][1], grads[1][1], **TOL[torch.float32], name="dsizes")


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_propagation_is_identity(backend):
    x, index, weight, _, _, m, sizes = _sample("no_propagation")
    keep = torch.arange(index.shape[1]).expand(x.shape[0], -1)
    out = run(backend, x, index, weight, keep, 0.7, m, sizes)
    assert_close(out[0], x, name="x")
    assert_close(out[1], sizes, name="sizes")
    assert_close(out[2], index, name="index")
    assert_close(out[3], weight, name="weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_is_pruning(backend):
    x, index, weight, keep, _, m, sizes = _sample("grid3x3_cls")
    x = x.clone()
    x[:, m:][~torch.zeros(x.shape[0], x.shape[1] - m, dtype=torch.bool).scatter_(1, keep, True)] = (
        float("inf")  # propagated tokens: alpha = 0 must not even compute 0 * inf
    )
    out = run(backend, x, index, weight, keep, 0.0, m, sizes)
    rows = torch.cat([torch.arange(m).expand(x.shape[0], -1), keep + m], dim=1)
    want_x = x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    assert_close(out[0], want_x, name="x")
    assert_close(out[1], sizes.gather(1, rows), name="sizes")


def _dense(index, weight, n):
    """(B, n, n) dense weights of an ELL graph (tests only, small n)."""
    b = index.shape[0]
    dense = torch.zeros(b, n, n, dtype=torch.float64)
    valid = index >= 0
    bi, i, s = valid.nonzero(as_tuple=True)
    dense[bi, i, index[bi, i, s].long()] = weight[bi, i, s].double()
    return dense


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["grid3x3_cls", "no_prefix_unsorted_keep", "keep_one"])
def test_graph_is_restriction(backend, name):
    x, index, weight, keep, alpha, m, sizes = _sample(name)
    n = index.shape[1]
    _, _, idx_out, w_out = run(backend, x, index, weight, keep, alpha, m, sizes)
    full = _dense(index, weight, n)
    rows = keep.unsqueeze(-1)
    want = full.gather(1, rows.expand(-1, -1, n)).gather(
        2, rows.transpose(1, 2).expand(-1, keep.shape[1], -1)
    )
    assert_close(_dense(idx_out, w_out, keep.shape[1]), want, name="restricted graph")
    # compacted: valid slots first, then only padding
    valid = idx_out >= 0
    assert bool((valid.int().diff(dim=-1) <= 0).all())
    assert bool((w_out[~valid] == 0).all())


@needs_ext
def test_twice_equals_reference_composition():
    x, index, weight, keep, alpha, m, sizes = _sample("wide_c_vector_tail")
    gen = torch.Generator().manual_seed(3)

    def two_steps(fn):
        x1, s1, i1, w1 = fn(x, index, weight, keep, alpha, m, sizes)
        keep2 = random_keep(x.shape[0], keep.shape[1], 4, gen=torch.Generator().manual_seed(7))
        return fn(x1, i1, w1, keep2, alpha, m, s1)

    del gen
    got = two_steps(_compiled)
    want = two_steps(reference.propagate)
    _compare(got, want, TOL[torch.float32], "twice")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sizes_stay_positive(backend):
    x, index, weight, keep, alpha, m, sizes = _sample("wide_c_vector_tail")
    _, s_out, _, _ = run(backend, x, index, weight, keep, alpha, m, sizes)
    assert bool((s_out > 0).all())
    # and never shrink: kept tokens only gain mass
    rows = torch.cat([torch.arange(m).expand(x.shape[0], -1), keep + m], dim=1)
    assert bool((s_out >= sizes.gather(1, rows)).all())


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _bad_cases():
    def base():
        return _sample("grid3x3_cls")

    def with_(i, v):
        def make():
            a = base()
            a[i] = v(a) if callable(v) else v
            return a

        return make

    bad_index = base()[1].clone()
    bad_index[0, 0, 0] = 9
    neg_index = base()[1].clone()
    neg_index[1, 2, 0] = -2
    return {
        "x_dim": (with_(0, lambda a: a[0][0]), "x must have 3 dimensions"),
        "x_dtype": (with_(0, lambda a: a[0].int()), "x must be float32"),
        "index_dtype": (with_(1, lambda a: a[1].long()), "index must be"),
        "index_shape": (with_(1, lambda a: a[1][:, :-1]), "index must have shape"),
        "index_range_high": (with_(1, bad_index), r"index entries must be in \[-1, n\)"),
        "index_range_low": (with_(1, neg_index), r"index entries must be in \[-1, n\)"),
        "weight_dtype": (with_(2, lambda a: a[2].double()), "weight must be"),
        "weight_shape": (with_(2, lambda a: a[2][..., :-1]), "weight must have the shape"),
        "keep_dtype": (with_(3, lambda a: a[3].int()), "keep must be"),
        "keep_too_long": (
            with_(3, lambda a: torch.arange(10).expand(2, -1)),
            "keep must have shape",
        ),
        "keep_empty": (with_(3, lambda a: a[3][:, :0]), "keep must have shape"),
        "keep_range": (with_(3, lambda a: a[3] + 9), r"keep entries must be in \[0, n\)"),
        "keep_negative": (with_(3, lambda a: a[3] - 9), r"keep entries must be in \[0, n\)"),
        "keep_duplicate": (with_(3, lambda a: torch.zeros_like(a[3])), "keep has duplicate"),
        "alpha_nan": (with_(4, float("nan")), "alpha must be finite, got nan"),
        "alpha_inf": (with_(4, float("inf")), "alpha must be finite, got inf"),
        "alpha_neg_inf": (with_(4, float("-inf")), "alpha must be finite, got -inf"),
        "num_prefix_negative": (with_(5, -1), r"num_prefix must be in \[0, N\]"),
        "num_prefix_too_big": (with_(5, 11), r"num_prefix must be in \[0, N\]"),
        "sizes_dtype": (with_(6, lambda a: a[6].double()), "sizes must be float32"),
        "sizes_shape": (with_(6, lambda a: a[6][:, :-1]), "sizes must have shape"),
        "meta_keep": (with_(3, lambda a: a[3].to("meta")), "keep must be on the same device"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs(backend, case):
    make, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=f"gtp.propagate: {match}"):
        run(backend, *make())
