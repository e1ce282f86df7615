"""gtp.propagate: hand-worked cases, kernel vs reference, opcheck, gradients, properties."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from gtp_kernels import reference


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
