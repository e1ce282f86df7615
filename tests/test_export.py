"""torch.export of GTP-patched timm models (gtp_kernels.export.export): dynamic batch, outputs
equal to eager, and the clear errors for what cannot be exported."""

from __future__ import annotations

import pytest
import torch
from export_helpers import WithSelection, peaked_deit_tiny

import gtp_kernels.export as gx
from gtp_kernels._extension import extension_available, has_kernel

pytestmark = pytest.mark.skipif(
    not extension_available(), reason="torch.ops.gtp.* needs gtp_kernels._C (build it)"
)
GPU = torch.cuda.is_available()


@pytest.mark.parametrize("theta,token_scale", [(0.6, True), (1.0, False)])
def test_export_dynamic_batch_equals_eager(theta, token_scale):
    model = WithSelection(peaked_deit_tiny(num_prop=8, sparsity=theta, token_scale=token_scale))
    program = gx.export(model, torch.randn(2, 3, 96, 96))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"gtp.attention.default", "gtp.propagate.default"} <= ops
    run = program.module()
    for batch in (1, 3, 5):
        x = torch.randn(batch, 3, 96, 96)
        with torch.no_grad():
            got, expected = run(x), model(x)
        assert len(got) == len(expected) == 4  # logits + the keep of each of the 3 blocks
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)  # the same kernels in the same order: bit for bit


def test_export_batch_one_example_and_static():
    model = peaked_deit_tiny(num_prop=4)
    program = gx.export(model, torch.randn(1, 3, 96, 96))  # duplicated: batch stays dynamic
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
    static = gx.export(model, torch.randn(2, 3, 96, 96), dynamic_batch=False)
    with pytest.raises(Exception, match="shape|size|batch|dim"):
        static.module()(x)


def test_export_unpatched_model():
    model = peaked_deit_tiny(patch=False)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(gx.export(model, x[:2]).module()(x), model(x))


@pytest.mark.parametrize(
    "setting,value,match",
    [
        ("selection", "random", "selection='random'.*model.gtp.selection"),
        ("track_sources", True, "track_sources=True.*model.gtp.track_sources = False"),
        ("backend", "reference", "backend='reference'.*model.gtp.backend = 'cpu'"),
    ],
)
def test_errors_name_the_setting(setting, value, match):
    model = peaked_deit_tiny(depth=1, num_prop=4)
    setattr(model.gtp, setting, value)
    x = torch.randn(2, 3, 96, 96)
    with pytest.raises(ValueError, match=match):
        gx.export(model, x)
    # The same error when torch.export is called directly (the patched forward checks).
    with pytest.raises(Exception, match=match), torch.no_grad():
        torch.export.export(model, (x,))


def test_error_training_mode_and_reference_fallback(monkeypatch):
    model = peaked_deit_tiny(depth=1, num_prop=4)
    with pytest.raises(ValueError, match="model.eval()"):
        gx.export(model.train(), torch.randn(2, 3, 96, 96))
    model.eval()
    # backend "auto" without a compiled kernel falls back to the reference: said clearly.
    import gtp_kernels.ops._backend as backend

    monkeypatch.setattr(backend, "has_kernel", lambda op, key: False)
    model.gtp.backend = "auto"
    with pytest.raises(ValueError, match="backend='auto' runs the pure-PyTorch reference"):
        gx.export(model, torch.randn(2, 3, 96, 96))


@pytest.mark.skipif(not GPU, reason="needs a CUDA device (runs unchanged on a GPU machine)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_export_gpu_backends(backend):
    """The GPU backends export the same way; the graph calls their ops."""
    model = peaked_deit_tiny(num_prop=8, backend=backend).cuda()
    if backend == "cuda" and not has_kernel("attention", "CUDA"):
        pytest.skip("this build has no CUDA kernels")
    x = torch.randn(3, 3, 96, 96, device="cuda")
    program = gx.export(model, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=0, rtol=0)
