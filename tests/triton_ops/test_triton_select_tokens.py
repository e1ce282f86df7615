"""select_tokens in Triton against the reference: the CPU tests' hand cases, properties, sample
set and bad inputs, random ties with signed zeros, infinities and NaN, opcheck."""

from __future__ import annotations

import pytest
import test_select_tokens as ts
import torch
from triton_device import DEVICE

import gtp_kernels.ops as ops
from gtp_kernels.reference import select_tokens as ref_select_tokens


def test_by_hand():
    ts.test_by_hand("triton")


def test_p_zero_and_p_max():
    ts.test_p_zero_and_p_max("triton")


def test_properties():
    ts.test_properties("triton")


@pytest.mark.parametrize("case", range(len(ts.BAD)))
def test_bad_inputs(case):
    make, msg = ts.BAD[case]
    with pytest.raises(ValueError, match=msg):
        ops.select_tokens(*make(), backend="triton")


def test_samples_and_opcheck():
    for score, p in ts.sample_inputs(DEVICE):
        got = torch.ops.gtp_triton.select_tokens(score, p)
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
        got = ops.select_tokens(score, p, backend="triton")
        want = ref_select_tokens(score, p)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (n, p)
