"""select_tokens in Triton against the reference: the CPU tests' hand cases, properties, sample
set and bad inputs, random ties with signed zeros, infinities and NaN, opcheck."""

from __future__ import annotations

import pytest
import test_select_tokens as ts
import torch
from triton_device import DEVICE

import gtp_kernels.ops as ops
from gtp_kernels.reference import select_tokens as ref_select_tokens


def _on_device(fn):
    """Run a CPU test function of test_select_tokens with its tensors made on DEVICE."""
    before = torch.get_default_device()
    torch.set_default_device(DEVICE)
    try:
        fn()
    finally:
        torch.set_default_device(before)


def test_by_hand():
    _on_device(lambda: ts.test_by_hand("triton"))


def test_p_zero_and_p_max():
    _on_device(lambda: ts.test_p_zero_and_p_max("triton"))


def test_properties():
    _on_device(lambda: ts.test_properties("triton"))


@pytest.mark.parametrize("case", range(len(ts.BAD)))
def test_bad_inputs(case):
    make, msg = ts.BAD[case]
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in make()]
    with pytest.raises(ValueError, match=msg):
        ops.select_tokens(*args, backend="triton")


def test_samples_and_opcheck():
    for score, p in ts.sample_inputs(DEVICE):
        got = ops.select_tokens(score, p, backend="triton")
        want = ref_select_tokens(score, p)
        assert got[0].device == score.device
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (score.shape, p)
        torch.library.opcheck(torch.ops.gtp_triton.select_tokens.default, (score, p))


def test_random_ties_and_non_finite():
    gen = torch.Generator().manual_seed(3)
    for _ in range(60):
        b = int(torch.randint(1, 4, (1,), generator=gen))
        n = int(torch.randint(1, 1500, (1,), generator=gen))  # past one 1024-wide block
        score = torch.randint(-3, 5, (b, n), generator=gen).float()
        score[score == 3] = float("inf")
        score[score == -3] = float("-inf")
        score[score == 4] = float("nan")
        score = score * torch.where(torch.rand(b, n, generator=gen) < 0.5, -1.0, 1.0)
        p = int(torch.randint(0, n, (1,), generator=gen))
        got = ops.select_tokens(score.to(DEVICE), p, backend="triton")
        want = ref_select_tokens(score, p)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), (n, p)
