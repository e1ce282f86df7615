"""attention in Triton against the reference: the CPU tests' hand cases, sample set and bad inputs
with backend="triton"; several N, prefixes, thetas, log sizes and strides; the threshold's rank
property on the kernel's own probabilities; float16 / bfloat16 error against float64; every
configuration the launcher can pick; opcheck; repeatability."""

from __future__ import annotations

import pytest
import test_attention as ta
import torch
from helpers import assert_close
from triton_device import DEVICE

import gtp_kernels.ops as ops
import gtp_kernels.triton.attention as tattn
from gtp_kernels.reference import attention as ref_attention
from gtp_kernels.reference.attention import num_masked

OP = torch.ops.gtp_triton.attention


def _on(args: dict, device=DEVICE) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def launcher(config=None):
    """The Triton launcher with forced configuration entries, in the op's calling convention."""

    def run(q, k, v, ls, scale, theta, m, score):
        return tattn.launch_attention(q, k, v, ls, scale, theta, m, score, config=config)

    return run


# Every configuration _config can pick, by its keys, run on small problems. On a GPU the
# float32 tiles run LOOP_F32_LOGITS and the others MMA_LOGITS; under the interpreter float32
# (and bfloat16) run DOT_F32_LOGITS by default, so the loop is forced here too.
CONFIGS = {
    "mma_d64": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4),
    "mma_d128": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8),
    "mma_d256": dict(BLOCK_M=32, BLOCK_N=16, num_warps=8),
    "f32_loop": dict(BLOCK_M=32, BLOCK_N=16, LOGITS=2),
    "f32_dot": dict(BLOCK_M=32, BLOCK_N=32, LOGITS=1),
}


def test_configs_are_the_launchers():
    """CONFIGS covers what _config returns on a GPU for every dtype and head dim (the
    interpreter's own choices run in every other test here)."""
    picked = set()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for d in (1, 16, 32, 64, 80, 128, 200, 256):
            c = tattn._config(dtype, d, d, interpreter=False)
            picked.add((c["BLOCK_M"], c["BLOCK_N"], c["LOGITS"], c["num_warps"]))
    listed = {
        (c["BLOCK_M"], c["BLOCK_N"], c.get("LOGITS", 0), c.get("num_warps", 4))
        for c in CONFIGS.values()
    }
    assert picked <= listed, picked - listed


@pytest.mark.parametrize("name", ["by_hand", "log_sizes_by_hand"])
def test_hand_cases(name):
    getattr(ta, f"test_{name}")("triton")


@pytest.mark.parametrize("case", range(len(ta.BAD)))
def test_bad_inputs(case):
    with pytest.raises(ValueError, match=ta.BAD[case][1]):
        ops.attention(*ta.bad_args(case), backend="triton")


def test_float64_and_wide_heads_say_where_to_go():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="Triton backend takes q as float32, float16 or bfloat16"):
        ops.attention(q, q, q, None, 1.0, 1.0, 0, "none", backend="triton")
    q = torch.randn(1, 1, 4, 300)
    with pytest.raises(ValueError, match="head dims up to 256"):
        ops.attention(q, q, q, None, 1.0, 1.0, 0, "none", backend="triton")


# The CPU tests' sample set (odd sizes, N up to 577, batch > 1, 0 / 1 / 2 / all prefix tokens,
# every score, timm / transposed / expanded strides, empty inputs), at the theta of each sample.
@pytest.mark.parametrize("name", ta.SAMPLE_IDS)
def test_samples(name):
    ta.check_against_reference(_on(ta._sample(name)), op=OP)


@pytest.mark.parametrize("theta", [1.0, 0.9, 0.3])
@pytest.mark.parametrize("name", ["tiny", "n50_2prefix", "odd_d", "transposed", "theta1"])
def test_thetas(name, theta):
    ta.check_against_reference(_on(ta._sample(name, sparsity=theta)), op=OP)


@pytest.mark.parametrize("log_sizes", [False, True])
@pytest.mark.parametrize("n", [1, 5, 17, 65, 197, 300])
def test_token_counts(n, log_sizes):
    torch.manual_seed(n)
    q, k, v = ta.timm_qkv(2, 2, n, 32)
    ls = (torch.rand(2, n) * 3 + 1).log() if log_sizes else None
    args = dict(q=q, k=k, v=v, log_sizes=ls, scale=32**-0.5, sparsity=0.6, num_prefix=min(n, 1),
                score="mixed_max")  # fmt: skip
    ta.check_against_reference(_on(args), op=OP)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_config(config):
    """Each configuration on several tiles with partial ones at the edges. The float32 loop
    runs d steps per tile in the interpreter (slow), so it gets a small head dim: its tiles do
    not depend on d."""
    dtype = torch.float32 if "f32" in config else torch.float16
    if "loop" in config:
        d = 8
    else:
        d = {"d64": 64, "d128": 80, "d256": 160}.get(config.rsplit("_", 1)[-1], 48)
    for name, over in (("tiny", {}), ("n50_2prefix", {"sparsity": 0.6})):
        args = ta._sample(name, dtype, **over)
        b, h, n, _ = args["q"].shape
        args["q"], args["k"], args["v"] = ta.timm_qkv(b, h, n, d, dtype)
        args["scale"] = d**-0.5
        ta.check_against_reference(_on(args), same_dtype=True, op=launcher(CONFIGS[config]))


def _rank_property(q, k, ls, scale, theta, config=None):
    """The kernel's masked map A (v = I) is where(P < tau, 0, P) for its own unmasked map P
    (theta = 1) and tau its kk-th smallest entry: count(P < tau) < kk <= count(P <= tau)."""
    run = launcher(config)
    b, h, n, _ = q.shape
    eye = torch.eye(n, device=q.device).expand(b, h, n, n)
    p, _ = run(q, k, eye, ls, scale, 1.0, 0, "none")
    a, _ = run(q, k, eye, ls, scale, theta, 0, "none")
    kk = num_masked(n, theta)
    flat = p.flatten(2)
    tau = flat.kthvalue(kk, dim=-1, keepdim=True).values
    below = (flat < tau).sum(-1)
    at_most = (flat <= tau).sum(-1)
    assert (below < kk).all() and (kk <= at_most).all()
    expected = torch.where(flat < tau, 0.0, flat).view_as(p)
    assert torch.equal(a, expected), "the mask is not where(P < tau, 0, P) of the kernel's P"


@pytest.mark.parametrize("config", [None, "f32_loop"])
@pytest.mark.parametrize("theta", [0.9, 0.6, 0.3])
def test_threshold_rank_property(theta, config):
    torch.manual_seed(7)
    n, d = (70, 16) if config is None else (45, 8)  # the float32 loop is slow in numpy
    q, k, _ = ta.timm_qkv(2, 2, n, d, device=DEVICE)
    ls = (torch.rand(2, n, device=DEVICE) * 3 + 1).log()
    _rank_property(q * 3, k, ls, 0.25, theta, CONFIGS.get(config))


def test_threshold_all_equal_and_one_hot():
    n = 40
    # q = k = 0: every probability is 1/N, all tied with tau; nothing is masked
    z = torch.zeros(1, 2, n, 8, device=DEVICE)
    _rank_property(z, z, None, 1.0, 0.3)
    eye = torch.eye(n, device=DEVICE).expand(1, 2, n, n)
    a, _ = OP(z, z, eye, None, 1.0, 0.3, 0, "none")
    # every entry the same value (exact ties, none masked), 1/N to the rounding of a GPU's
    # division (not necessarily torch's bits for 1/N)
    assert torch.equal(a, torch.full_like(a, a.flatten()[0].item()))
    assert abs(a.flatten()[0].item() - 1.0 / n) <= 2e-7
    # one-hot rows: logits 0 except a huge one per row; the map is 0/1 with exact ties
    q = torch.eye(n, device=DEVICE)[None, None] * 200.0
    k = torch.eye(n, device=DEVICE)[None, None].expand(1, 1, n, n)
    _rank_property(q, k, None, 1.0, 0.6)
    a, _ = OP(q, k, eye[:, :1], None, 1.0, 0.6, 0, "none")
    assert torch.equal(a[0, 0], torch.eye(n, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_error_vs_float64(dtype):
    """float16 / bfloat16: error at most twice that of the reference run in the same dtype, both
    against a float64 run (theta = 1: no threshold decision can differ)."""
    args = _on(ta._sample("deit_s", dtype, sparsity=1.0))
    out, _ = ops.attention(*args.values(), backend="triton")
    ref, _ = ref_attention(*args.values())
    a64 = dict(args, q=args["q"].double(), k=args["k"].double(), v=args["v"].double())
    exact, _ = ref_attention(*a64.values())
    err_k = (out.double() - exact).abs().max().item()
    err_r = (ref.double() - exact).abs().max().item()
    assert err_k <= 2 * err_r, f"kernel error {err_k:.3g}, reference error {err_r:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "n50_2prefix", "dv_ne_d"])
def test_half_vs_reference(name, dtype):
    ta.check_against_reference(_on(ta._sample(name, dtype)), same_dtype=True, op=OP)


@pytest.mark.parametrize(
    "name", ["tiny", "n50_2prefix", "transposed", "dv_ne_d", "no_score", "all_prefix"]
)
def test_opcheck(name):
    torch.library.opcheck(OP.default, tuple(_on(ta._sample(name)).values()))


def test_output_layout_and_repeatability():
    args = tuple(_on(ta._sample("n50_2prefix")).values())
    first = OP(*args)
    assert first[0].transpose(1, 2).is_contiguous()  # (B, N, H, dv) memory, as the CPU kernel
    for _ in range(2):
        again = OP(*args)
        assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_gradient_through_the_triton_op():
    """The Triton op has the gtp:: op's backward (mask held constant)."""
    args = ta._sample("tiny")
    q, k, v = (args[n].detach().clone().to(DEVICE).requires_grad_() for n in ("q", "k", "v"))
    rest = _on({n: args[n] for n in ("log_sizes", "scale", "sparsity", "num_prefix", "score")})
    out, score = ops.attention(q, k, v, *rest.values(), backend="triton")
    (out.sum() + score.sum()).backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out2, score2 = ref_attention(q2, k2, v2, *rest.values())
    (out2.sum() + score2.sum()).backward()
    for got, want, name in (
        (q.grad, q2.grad, "dq"),
        (k.grad, k2.grad, "dk"),
        (v.grad, v2.grad, "dv"),
    ):
        assert_close(got, want, atol=1e-4, rtol=1e-4, name=name)
