"""select_tokens: hand cases with ties, properties, kernel vs reference, opcheck, bad inputs."""

from __future__ import annotations

import pytest
import torch

import gtp_kernels.ops  # (registers the fake kernels and autograd)
from gtp_kernels._extension import extension_available, has_kernel
from gtp_kernels.reference import select_tokens as ref_select_tokens

HAS_CPU_KERNEL = extension_available() and has_kernel("select_tokens", "CPU")
needs_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL,
    reason="gtp_kernels._C with the select_tokens CPU kernel is not built "
    "(python setup.py build_ext --inplace)",
)
BACKENDS = ["reference", pytest.param("cpu", marks=needs_kernel)]


def run(backend, score, p):
    """The op on `backend`: the reference, the compiled kernel (torch.ops.gtp, "cpu"), or any
    other backend through the public wrapper (tests/triton_ops reuse these tests)."""
    if backend == "reference":
        return ref_select_tokens(score, p)
    if backend == "cpu":
        return torch.ops.gtp.select_tokens(score, p)
    return gtp_kernels.ops.select_tokens(score, p, backend=backend)


def check(backend, score, p, keep, prop):
    k, q = run(backend, torch.tensor(score, dtype=torch.float32), p)
    assert k.dtype == torch.int64 and q.dtype == torch.int64
    assert k.tolist() == keep, f"keep {k.tolist()} != {keep}"
    assert q.tolist() == prop, f"prop {q.tolist()} != {prop}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_by_hand(backend):
    check(backend, [[3.0, 1.0, 2.0, 1.5, 5.0]], 2, [[0, 2, 4]], [[1, 3]])
    # ties: the lower position is kept, so the higher one is propagated first
    check(backend, [[1.0, 1.0, 1.0, 1.0]], 1, [[0, 1, 2]], [[3]])
    check(backend, [[1.0, 1.0, 1.0, 1.0]], 3, [[0]], [[1, 2, 3]])
    # 0.2 x2 go, then one of the three 0.5s: the highest position (5)
    check(backend, [[0.5, 0.2, 0.5, 0.2, 0.9, 0.5]], 3, [[0, 2, 4]], [[1, 3, 5]])
    # -0.0 == 0.0 is a tie; infinities order normally
    check(backend, [[0.0, -0.0, 1.0]], 1, [[0, 2]], [[1]])
    check(backend, [[float("inf"), 0.0, float("-inf"), 2.0]], 2, [[0, 3]], [[1, 2]])
    # rows are independent
    check(
        backend,
        [[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 2.0, 0.0]],
        2,
        [[0, 1], [1, 2]],
        [[2, 3], [0, 3]],
    )
    check(backend, [[1.0, 2.0, 2.0, 0.0]], 3, [[1]], [[0, 2, 3]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_zero_and_p_max(backend):
    score = torch.randn(3, 7)
    keep, prop = run(backend, score, 0)
    assert torch.equal(keep, torch.arange(7).expand(3, 7)) and prop.shape == (3, 0)
    keep, prop = run(backend, score, 6)
    assert torch.equal(keep[:, 0], score.argmax(-1)) and prop.shape == (3, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend):
    score = torch.randint(0, 5, (6, 33)).float()  # many ties
    for p in (0, 1, 8, 16, 32):
        keep, prop = run(backend, score, p)
        assert keep.shape == (6, 33 - p) and prop.shape == (6, p)
        both = torch.cat([keep, prop], 1).sort(-1).values
        assert torch.equal(both, torch.arange(33).expand(6, 33)), "a partition of 0..n-1"
        assert (keep.diff(dim=-1) > 0).all() and (prop.diff(dim=-1) > 0).all()
        if 0 < p:
            ks = score.gather(1, keep)
            ps = score.gather(1, prop)
            assert (ps.amax(-1) <= ks.amin(-1)).all(), "every propagated score <= every kept"
            # on a tie between a kept and a propagated token the kept one has the lower position
            for b in range(6):
                tie = ps[b].max()
                kept_tie = keep[b][ks[b] == tie]
                prop_tie = prop[b][ps[b] == tie]
                if len(kept_tie):
                    assert kept_tie.max() < prop_tie.min()


BAD = [
    (lambda: (torch.randn(7), 1), "score must have 2 dimensions"),
    (lambda: (torch.randn(2, 7).double(), 1), "score must be float32"),
    (lambda: (torch.randn(2, 7), -1), "num_prop must be in"),
    (lambda: (torch.randn(2, 7), 7), "num_prop must be in"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(backend, case):
    make, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        run(backend, *make())


def sample_inputs(device="cpu", dtype=torch.float32):
    """(score, P) cases: odd sizes, B > 1, ties, non-contiguous, empty batch."""
    ties = torch.randint(0, 4, (5, 37), device=device).to(dtype)
    return [
        (torch.randn(3, 11, device=device).to(dtype), 4),
        (torch.randn(4, 196, device=device).to(dtype), 8),
        (ties, 18),
        (ties, 0),
        (ties, 36),
        (torch.randn(13, 6, device=device).to(dtype).t(), 5),  # non-contiguous (6, 13)
        (torch.randn(3, 40, device=device).to(dtype)[:, ::2], 7),  # strided
        (torch.randn(0, 9, device=device).to(dtype), 3),  # empty batch
        (torch.zeros(2, 1, device=device).to(dtype), 0),  # n = 1
    ]


@needs_kernel
def test_kernel_matches_reference():
    for score, p in sample_inputs():
        rk, rp = ref_select_tokens(score, p)
        k, q = torch.ops.gtp.select_tokens(score, p)
        assert torch.equal(k, rk), f"keep {tuple(score.shape)} P={p}"
        assert torch.equal(q, rp), f"prop {tuple(score.shape)} P={p}"


@needs_kernel
def test_opcheck():
    for score, p in sample_inputs():
        torch.library.opcheck(torch.ops.gtp.select_tokens.default, (score, p))


@needs_kernel
def test_wrapper_backends():
    from gtp_kernels.ops import select_tokens

    score = torch.randint(0, 3, (4, 25)).float()
    ref = select_tokens(score, 9, backend="reference")
    for b in ("auto", "cpu"):
        out = select_tokens(score, 9, backend=b)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@needs_kernel
def test_kernel_matches_reference_fuzz_ties():
    # small integer scores with +-0.0 and +-inf: ties everywhere, both signs of zero
    for _ in range(200):
        b = int(torch.randint(1, 5, (1,)))
        n = int(torch.randint(1, 60, (1,)))
        score = torch.randint(-3, 4, (b, n)).float()
        score[score == 3] = float("inf")
        score[score == -3] = float("-inf")
        score = score * torch.where(torch.rand(b, n) < 0.5, -1.0, 1.0)
        p = int(torch.randint(0, n, (1,)))
        k, q = torch.ops.gtp.select_tokens(score, p)
        rk, rq = ref_select_tokens(score, p)
        assert torch.equal(k, rk) and torch.equal(q, rq), (score, p)
