"""propagate in Triton against the reference: the CPU tests' hand cases, properties, samples
and bad inputs; fresh random inputs over N, batch, prefix tokens, sizes, alpha and x layouts;
float16 / bfloat16 error against float64; the non-finite rule; opcheck and autograd; bitwise
repeatability; every block configuration the launcher can pick; the launches it records."""

from __future__ import annotations

import pytest
import test_nonfinite as tn
import test_propagate as tp
import torch
from helpers import TOL, assert_close
from triton_device import DEVICE

from gtp_kernels import ops, reference
from gtp_kernels.triton import propagate as kernel
from gtp_kernels.triton._common import recording

NAN, INF = float("nan"), float("inf")
LOW = [torch.float16, torch.bfloat16]


def on_device(args):
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


def run_triton(*args):
    """The Triton op through the public wrapper on DEVICE, outputs back on the CPU."""
    return tuple(t.cpu() for t in ops.propagate(*on_device(args), backend="triton"))


def check_against_reference(args, name):
    """x_out within the dtype's tolerance of the reference run in the same dtype; sizes_out
    within float32's; the graph exactly. For float16 / bfloat16 also: the kernel's error
    against a float64 run is at most twice the reference's."""
    got = run_triton(*args)
    want = reference.propagate(*args)
    dtype = args[0].dtype
    assert got[0].dtype == dtype and got[0].is_contiguous(), name
    tp._compare(got, want, TOL[dtype], name)
    if dtype in LOW and want[0].numel():
        exact = reference.propagate(args[0].double(), *args[1:])[0]
        err_k = (got[0].double() - exact).abs().max().item()
        err_r = (want[0].double() - exact).abs().max().item()
        assert err_k <= 2 * err_r + 1e-12, f"{name}: kernel error {err_k} > 2 x {err_r}"
    return got


# ------------------------------------------------------------------ the CPU tests, reused


def test_hand_worked():
    tp.test_hand_worked("triton")


def test_properties():
    tp.test_no_propagation_is_identity("triton")
    tp.test_alpha_zero_is_pruning("triton")
    for name in ("grid3x3_cls", "no_prefix_unsorted_keep", "keep_one"):
        tp.test_graph_is_restriction("triton", name)
    tp.test_sizes_stay_positive("triton")


@pytest.mark.parametrize("case", list(tp._bad_cases()))
def test_bad_inputs(case):
    tp.test_bad_inputs("triton", case)


def test_rejects_float64():
    args = tp._sample("grid3x3_cls", torch.float64)
    with pytest.raises(ValueError, match="the Triton backend takes x as float32, float16 or"):
        run_triton(*args)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_samples(dtype):
    for name, args in tp.sample_inputs("cpu", dtype):
        check_against_reference(args, f"{name}/{dtype}")


# Each opcheck traces the op and its autograd formula (aot_dispatch_dynamic, a few seconds a
# sample): the samples that cover prefix / no prefix, sizes / none and the zero-sized cases.
OPCHECK = (
    "grid3x3_cls",
    "no_prefix_unsorted_keep",
    "prefix_only",
    "zero_channels",
    "zero_width_graph",
    "empty_batch_no_sizes",
)


def test_opcheck():
    samples = dict(tp.sample_inputs(DEVICE))
    for name in OPCHECK:
        args = samples[name]
        args[0] = args[0].detach().requires_grad_(args[0].numel() > 0)
        if args[6] is not None:
            args[6] = args[6].detach().requires_grad_(args[6].numel() > 0)
        torch.library.opcheck(torch.ops.gtp_triton.propagate.default, args)
    args = tp._sample("strided_x_odd_c", torch.bfloat16)
    torch.library.opcheck(torch.ops.gtp_triton.propagate.default, on_device(args))


def test_torch_compile_fullgraph():
    args = on_device(tp._sample("grid3x3_cls"))
    fn = torch.compile(
        lambda *a: ops.propagate(*a, backend="triton"), fullgraph=True, backend="aot_eager"
    )
    got = tuple(t.cpu() for t in fn(*args))
    tp._compare(got, reference.propagate(*tp._sample("grid3x3_cls")), TOL[torch.float32], "c")


def test_twice_equals_reference_composition():
    args = tp._sample("wide_c_vector_tail")

    def two_steps(fn):
        x1, s1, i1, w1 = fn(*args)
        keep2 = tp.random_keep(args[0].shape[0], args[3].shape[1], 4, gen=torch.Generator())
        return fn(x1, i1, w1, keep2, args[4], args[5], s1)

    tp._compare(two_steps(run_triton), two_steps(reference.propagate), TOL[torch.float32], "twice")


def test_backward_matches_reference():
    x, index, weight, keep, alpha, m, sizes = tp._sample("strided_x_odd_c")
    grads = []
    for backend in ("triton", "reference"):
        xr = x.detach().requires_grad_()
        sr = sizes.detach().requires_grad_()
        out = tp.run(backend, xr, index, weight, keep, alpha, m, sr)
        gen = torch.Generator().manual_seed(1)
        gx = torch.randn(out[0].shape, generator=gen)
        gs = torch.randn(out[1].shape, generator=gen)
        grads.append(torch.autograd.grad((out[0], out[1]), (xr, sr), (gx, gs)))
    assert_close(grads[0][0], grads[1][0], **TOL[torch.float32], name="dx")
    assert_close(grads[0][1], grads[1][1], **TOL[torch.float32], name="dsizes")


# ------------------------------------------------------------------- fresh random inputs

# (B, M, N, C, W, P, options): N = 1, 5, 17, 65, 197 and 300 (past 256), 0 / 1 / 2 prefix
# tokens, with and without sizes, alpha 0 and not, contiguous / strided / transposed x.
RANDOM = {
    "n1_single_token": (3, 0, 1, 7, 4, 0, {}),
    "n1_prefix_only": (2, 1, 1, 6, 4, 0, {"sizes": False}),
    "n5_strided": (2, 1, 5, 9, 8, 2, {"layout": "strided", "alpha": 0.5}),
    "n17_transposed_alpha0": (2, 2, 17, 33, 8, 5, {"layout": "transposed", "alpha": 0.0}),
    "n65_unsorted_keep": (3, 1, 65, 48, 16, 8, {"ascending": False, "alpha": -0.7}),
    "n197_deit_channels": (2, 1, 197, 384, 16, 8, {"layout": "strided"}),
    "n300_no_sizes": (2, 0, 300, 40, 24, 37, {"sizes": False, "alpha": 0.25}),
    "empty_batch": (0, 1, 197, 64, 16, 8, {}),
}


def random_case(name, dtype=torch.float32):
    b, m, big_n, c, w, p, opt = RANDOM[name]
    seed = 100 + list(RANDOM).index(name)
    return tp.make_case(b, m, big_n - m, c, w, p, dtype=dtype, seed=seed, **opt)


@pytest.mark.parametrize("name", list(RANDOM))
def test_random(name):
    check_against_reference(random_case(name), name)


@pytest.mark.parametrize("dtype", LOW)
def test_random_low_precision(dtype):
    for name in ("n65_unsorted_keep", "n197_deit_channels"):
        check_against_reference(random_case(name, dtype), f"{name}/{dtype}")


def test_every_config():
    """Every channel block with every graph tile width (ROWS from 16 down to 1, 1 to 4 warps;
    tiles of at least 8 slots, see choose_config).
    C = 40 is a whole number of blocks for none of them (a tail block each); 2 * (2 + 9)
    output rows are a multiple of no ROWS above 2."""
    for width in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        args = tp.make_case(2, 2, 12, 40, width, 3, layout="strided", seed=width)
        for block_c in kernel.BLOCK_CS:
            with kernel.force_block_c(block_c):
                cfg = kernel.choose_config(40, width)
                check_against_reference(args, str(cfg))
            assert cfg.block_c == block_c and cfg.block_w == max(8, width)


def test_more_tokens_than_a_map_block():
    """n > MAP_BLOCK: the position map's fill, scatter and read-back loops take two steps and
    the index checks three chunks; a bad entry is found wherever it is (in the second block of
    keep, in the last chunk of index, in a propagated row no output reads)."""
    gen = torch.Generator().manual_seed(5)
    b, m, n, c, w, p = 2, 1, kernel.MAP_BLOCK + 76, 3, 2, 40
    x = torch.randn(b, m + n, c, generator=gen)
    index = torch.randint(-1, n, (b, n, w), generator=gen, dtype=torch.int32)
    weight = torch.rand(b, n, w, generator=gen)
    # token n - 1 is propagated in both images
    keep = torch.stack([torch.randperm(n - 1, generator=gen)[: n - p] for _ in range(b)])
    sizes = torch.rand(b, m + n, generator=gen) + 0.5
    check_against_reference([x, index, weight, keep, 0.3, m, sizes], "n > MAP_BLOCK")

    dup = keep.clone()
    dup[1, -1] = dup[1, 0]
    with pytest.raises(ValueError, match="gtp.propagate: keep has duplicate entries"):
        run_triton(x, index, weight, dup, 0.3, m, sizes)
    bad = index.clone()
    bad[1, n - 1, w - 1] = n
    with pytest.raises(ValueError, match=r"gtp.propagate: index entries must be in \[-1, n\)"):
        run_triton(x, bad, weight, keep, 0.3, m, sizes)


def test_config_choice():
    # the fewest padded channels: DeiT-S and DeiT-B rows split into whole blocks
    config = kernel.Config
    assert kernel.choose_config(384, 16) == config(rows=8, block_c=128, block_w=16, num_warps=4)
    assert kernel.choose_config(768, 16) == config(rows=4, block_c=256, block_w=16, num_warps=4)
    assert kernel.choose_config(192, 32) == config(rows=4, block_c=64, block_w=32, num_warps=1)
    assert kernel.choose_config(5, 0) == config(rows=16, block_c=32, block_w=8, num_warps=2)


def test_repeatable_bitwise():
    args = random_case("n65_unsorted_keep", torch.bfloat16)
    first = run_triton(*args)
    for again in (run_triton(*args), run_triton(*args)):
        for a, e in zip(again, first, strict=True):
            assert torch.equal(a.view(torch.uint8), e.view(torch.uint8))


# ------------------------------------------------------------------------ non-finite rule


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_nonfinite_values(dtype):
    """NaN / Inf in x, sizes and weight propagate by arithmetic as in the reference (same NaN
    positions); a kept row that absorbs nothing is copied bit for bit (-0.0 and NaN too)."""
    x, index, weight, keep, sizes = tn._graph_case(dtype=dtype)
    x[0, 1 + 2, 1] = NAN
    x[0, 1 + 5, :] = INF
    x[1, 1 + 7, 0] = -INF
    x[1, 1:, 4] = -0.0
    x[0, 0, 3] = NAN  # a prefix token
    sizes[0, 1 + 2] = NAN
    sizes[1, 1 + 7] = -INF
    weight[1, 3, 0] = INF
    weight[0, :, 1] = NAN
    weight[1, :, 2] = -0.0
    got = run_triton(x, index, weight, keep, 0.25, 1, sizes)
    want = reference.propagate(x, index, weight, keep, 0.25, 1, sizes)
    for a, e, name in zip(got, want, ("x", "sizes", "index", "weight"), strict=True):
        tn.same(a, e, name)
    new_pos = torch.full((2, 12), -1)
    new_pos.scatter_(1, keep, torch.arange(8).expand(2, 8))
    copied = 0
    for b in range(2):
        for r, i in enumerate(keep[b].tolist()):
            if all(new_pos[b, j] >= 0 for j in index[b, i].tolist() if j >= 0):
                src, dst = x[b, 1 + i], got[0][b, 1 + r]
                assert torch.equal(src.view(torch.uint8), dst.view(torch.uint8)), (b, i)
                copied += 1
    assert copied > 0
    assert torch.equal(got[0][0, 0].view(torch.uint8), x[0, 0].view(torch.uint8))


# ------------------------------------------------------------------------------ launches


def _meta_args(b, big_n, c, m=1, p=8, w=16, dtype=torch.float16):
    n = big_n - m
    return (
        torch.empty(b, big_n, c, dtype=dtype, device="meta"),
        torch.empty(b, n, w, dtype=torch.int32, device="meta"),
        torch.empty(b, n, w, device="meta"),
        torch.empty(b, n - p, dtype=torch.int64, device="meta"),
        0.1,
        m,
        torch.empty(b, big_n, device="meta"),
    )


@pytest.mark.parametrize("channels, block_c", [(384, 128), (768, 256)])
def test_records_launches(channels, block_c):
    """DeiT-S / DeiT-B at batch 256: the position map, then the gather, on meta tensors (no
    data read, no checks read back)."""
    with recording() as rec:
        out = kernel.propagate(*_meta_args(256, 197, channels))
    assert [launch.kernel for launch in rec] == [
        kernel._position_map_kernel,
        kernel._propagate_kernel,
    ]
    assert rec[1].constexprs["BLOCK_C"] == block_c and rec[1].constexprs["BLOCK_W"] == 16
    assert rec[1].grid == (-(-256 * 189 // rec[1].constexprs["ROWS"]),)
    assert out[0].shape == (256, 189, channels) and out[2].shape == (256, 188, 16)


def test_too_wide_a_graph():
    args = tp.make_case(1, 1, 4, 3, kernel.MAX_WIDTH + 1, 1)
    with pytest.raises(ValueError, match="at most 256 slots a row"):
        run_triton(*args)


def test_too_many_rows():
    with recording(), pytest.raises(ValueError, match="at most .* output rows"):
        kernel.propagate(*_meta_args(1 << 22, 600, 1, p=0))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture():
    """Captured without reading the check flags back (the host cannot during capture)."""
    args = on_device(random_case("n197_deit_channels", torch.float16))
    want = ops.propagate(*args, backend="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.propagate(*args, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(out, want, strict=True):
        assert torch.equal(a, e)
