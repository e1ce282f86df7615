"""Finetuning through the GTP patch: model.train() + loss.backward() on every backend, timm's
stochastic depth and dropouts kept, attention dropout rejected, and a few optimiser steps that
lower the loss."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import assert_close, single_thread

import gtp_kernels.patch as gp
from gtp_kernels._extension import has_kernel

OPS = ("attention", "build_graph", "select_tokens", "propagate")
needs_kernels = pytest.mark.skipif(
    not all(has_kernel(op, "CPU") for op in OPS), reason="gtp_kernels._C not built"
)


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _peaked(model):
    """qkv weights x4: peaked, well-conditioned attention as in a trained model (a random
    model's near-uniform attention flips the top-theta threshold under any rounding change)."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return model


def _tiny(depth=12, img_size=64, **kw):
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_patch16_224", depth=depth, img_size=img_size, num_classes=10, **kw
    )
    return _peaked(model)


@needs_kernels
def test_three_steps_lower_the_loss():
    """deit_tiny (12 blocks at 64 x 64: 16 patches, P = 1 per block) with backend "auto" (the
    compiled kernels): three SGD steps on a fixed batch of 8 lower its cross-entropy."""
    model = _tiny(drop_path_rate=0.0)
    gp.timm(model, num_prop=1, sparsity=0.7, num_neighbours=4)
    model.train()
    torch.manual_seed(1)
    x = torch.randn(8, 3, 64, 64)
    y = torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(4):  # three steps, and the loss after the third
        loss = torch.nn.functional.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[3] < losses[0] - 0.05, losses
    assert sorted(losses, reverse=True) == losses, losses


@needs_kernels
@pytest.mark.parametrize("propagation", ["graph", "none", "mean"])
@pytest.mark.parametrize("selection", ["mixed_max", "random"])
def test_parameter_grads_match_reference_backend(propagation, selection):
    """Every parameter's gradient with the compiled kernels equals the reference backend's
    (pure PyTorch autograd). Registers, no CLS token and a mean-pooled head exercise the
    prefix handling; 4 blocks at 96 x 96 (36 patches)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_medium_patch16_reg4_gap_256", depth=3, img_size=96, num_classes=5
    )
    _peaked(model).train()
    gp.timm(model, num_prop=[4, 3, 2], sparsity=0.8, num_neighbours=3, propagation=propagation,
            selection=selection)  # fmt: skip
    x = torch.randn(2, 3, 96, 96)
    grads = {}
    for backend in ("reference", "cpu"):
        model.gtp.backend = backend
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, ref in grads["reference"].items():
        assert torch.isfinite(ref).all(), name
        scale = ref.abs().max().item() + 1e-12
        assert_close(grads["cpu"][name] / scale, ref / scale, atol=2e-4, rtol=0, name=name)


def test_dropouts_and_drop_path_as_timm():
    """Training mode with drop path, proj/MLP dropout and pos_drop: with GTP off (P = 0,
    theta = 1) the patched forward and backward consume the random numbers exactly as timm
    does, so under the same seed they give timm's output."""
    model = _tiny(depth=3, drop_path_rate=0.3, drop_rate=0.2, proj_drop_rate=0.2, pos_drop_rate=0.1)
    model.train()
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(5)
    expected = model(x)
    gp.timm(model, num_prop=0, sparsity=1.0, backend="reference")
    torch.manual_seed(5)
    got = model(x)
    assert_close(got, expected, atol=2e-5, rtol=1e-4, name="train-mode output")
    torch.manual_seed(6)
    assert not torch.allclose(model(x), got)  # really stochastic
    model.eval()  # and deterministic in eval mode
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_attention_dropout_rejected_in_training():
    model = _tiny(depth=2, attn_drop_rate=0.1)
    gp.timm(model, num_prop=2)
    x = torch.randn(1, 3, 64, 64)
    model.train()
    with pytest.raises(ValueError, match=r"block 0 has attention dropout \(attn_drop p=0.1\)"):
        model(x)
    model.eval()  # attention dropout is off in eval mode: nothing to reject
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    for blk in model.blocks:
        blk.attn.attn_drop.p = 0.0
    model.train()
    model(x).sum().backward()
