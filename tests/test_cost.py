"""gtp_kernels.cost: the SPEC 5 numbers, and agreement with torch.utils.flop_counter."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import gtp_kernels.patch as gp
from gtp_kernels.cost import gmacs, macs, token_counts


def _meta(name: str, **kw):
    with torch.device("meta"):  # shapes only: no memory, no init time
        return timm.create_model(name, **kw)


@pytest.mark.parametrize(
    "name, base, p8",
    [("deit_small_patch16_224", 4.60, 3.42), ("deit_base_patch16_224", 17.56, 13.10)],
)
def test_spec_numbers(name, base, p8):
    model = _meta(name)
    assert round(gmacs(model), 2) == base
    assert round(gmacs(model, num_prop=8), 2) == p8
    gp.timm(model, num_prop=8)
    assert round(gmacs(model), 2) == p8  # a patched model counts with its own settings
    model.gtp.num_prop = 0
    assert round(gmacs(model), 2) == base


def test_breakdown_deit_small():
    parts = macs(_meta("deit_small_patch16_224"))
    c, n = 384, 197
    assert parts["attn_linear"] == 12 * 4 * n * c * c
    assert parts["attn_matmul"] == 12 * 2 * n * n * c
    assert parts["mlp"] == 12 * 2 * 4 * n * c * c
    assert parts["patch_embed"] == 196 * c * 3 * 16 * 16
    assert parts["head"] == c * 1000
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_token_counts_mean_and_lists():
    model = _meta("deit_small_patch16_224", depth=3)
    assert token_counts(model, num_prop=[4, 0, 2]) == [(197, 193), (193, 193), (193, 191)]
    counts = token_counts(model, num_prop=[4, 0, 2], propagation="mean")
    assert counts == [(197, 194), (194, 194), (194, 193)]
    assert token_counts(model, img_size=(96, 128)) == [(49, 49)] * 3
    with pytest.raises(ValueError, match="num_prop=100 at block 1"):
        token_counts(model, num_prop=[100, 100, 0])
    with pytest.raises(ValueError, match="3 blocks"):
        gmacs(model, num_prop=[1, 2])


def test_distilled_head_and_gated_attention_counted():
    deit = _meta("deit_small_distilled_patch16_224", depth=1)
    assert macs(deit)["head"] == 2 * 384 * 1000
    plain = _meta("deit_small_patch16_224", depth=1, num_classes=10)
    assert token_counts(deit)[0][0] == token_counts(plain)[0][0] + 1


def _flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_medium_patch16_reg4_gap_256"])
def test_matches_flop_counter(name):
    """FLOPs counted by torch (convolution, addmm, bmm; it ignores softmax, norms and
    elementwise ops, like the analytic count) are 2 x our MACs. Unpatched: timm's non-fused
    attention (FlopCounterMode has no rule for CPU scaled_dot_product_attention). Patched: the
    reference backend, whose attention is two matmuls; the spatial graph needs no matmul, the
    mixed graph adds the n0^2 C cosine-similarity matmul (include_gtp's 'gtp_graph'). The
    counts agree exactly (tolerance 0)."""
    torch.manual_seed(0)
    model = timm.create_model(name, depth=3, img_size=96).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(1, 3, 96, 96)
    assert _flops(model, x) == 2 * macs(model)["total"]

    gp.timm(model, num_prop=[5, 3, 4], backend="reference", graph="spatial")
    assert _flops(model, x) == 2 * macs(model)["total"]
    model.gtp.propagation = "mean"
    assert _flops(model, x) == 2 * macs(model)["total"]

    model.gtp.propagation = "graph"
    model.gtp.graph = "mixed"
    parts = macs(model, include_gtp=True)
    assert parts["gtp_graph"] == 36 * 36 * model.embed_dim
    # the counter sees the similarity matmul, not the propagation's gathers
    assert _flops(model, x) == 2 * (macs(model)["total"] + parts["gtp_graph"])


def test_non_square_img_size():
    model = _meta("vit_small_patch16_224", depth=2)
    g = gmacs(model, img_size=(224, 160))
    n, c = 1 + 14 * 10, 384
    per_block = 12 * n * c * c + 2 * n * n * c
    expected = 2 * per_block + 140 * c * 768 + c * 1000
    assert g == pytest.approx(expected / 1e9, rel=1e-12)
