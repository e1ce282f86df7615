"""The timm patch with backend="triton": DeiT-tiny at 224 px selects the same tokens and gives the
same logits as backend="reference"; torch.compile(fullgraph=True) traces it into one graph."""

from __future__ import annotations

import pytest
import torch
from export_helpers import peaked_deit_tiny
from helpers import assert_close
from triton_device import DEVICE

import gtp_kernels.triton as gt

pytestmark = pytest.mark.skipif(
    set(gt.OPS) != {"attention", "build_graph", "propagate", "select_tokens"},
    reason=f"the patch needs a Triton kernel for every op (have {gt.OPS})",
)


@pytest.mark.parametrize("sparsity", [0.6, 1.0])
def test_deit_tiny_224_equals_reference(sparsity):
    """Batch 2, P = 8 in every block, qkv weights x4 (peaked attention like a trained model's,
    so no near-tie sits at the threshold or the selection boundary): the same tokens are
    propagated in every block (track_sources records which patch each token holds) and the
    logits agree to float32 rounding."""
    model = peaked_deit_tiny(depth=12, img_size=224, num_prop=8, sparsity=sparsity)
    model.gtp.track_sources = True
    model.to(DEVICE)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            model.gtp.backend = backend
            out[backend] = (model(x), model.gtp.last_sources)
    # last_sources[b, t, p]: how much of patch p token t holds; the same nonzero pattern is the
    # same tokens kept and absorbed (the weights themselves round differently on a GPU's FMA)
    src_t, src_r = out["triton"][1], out["reference"][1]
    assert torch.equal(src_t != 0, src_r != 0), "different tokens kept"
    assert_close(src_t, src_r, atol=1e-5, rtol=1e-5, name="sources")
    assert_close(out["triton"][0], out["reference"][0], atol=1e-4, rtol=1e-4, name="logits")


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = peaked_deit_tiny(depth=2, img_size=64, num_prop=3, sparsity=0.7, backend="triton")
    model.gtp.num_neighbours = 3
    model.to(DEVICE)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = model(x)
        got = compiled(x)
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="compiled")
