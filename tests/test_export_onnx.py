"""ONNX: GTP-patched DeiT-tiny (P = 8; theta 0.6 and 1; with and without token sizes) through
gtp_kernels.export.to_onnx, run in ONNX Runtime on CPU with no custom-op library, against the
eager model: logits to float32 tolerance and the same tokens selected in every block."""

from __future__ import annotations

import pytest
import torch
from export_helpers import WithSelection, peaked_deit_tiny

import gtp_kernels.export as gx
from gtp_kernels._extension import extension_available

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.skipif(
    not extension_available(), reason="torch.ops.gtp.* needs gtp_kernels._C (build it)"
)
# Standard operators only (the ai.onnx domain); no scatter with a reduction.
ALLOWED_DOMAINS = {"", "ai.onnx"}
# Logits are O(1); ORT and torch accumulate the matmuls in different orders: float32 rounding
# amplified through 4 blocks of layer norms (measured: ~2e-6).
TOL = dict(atol=1e-4, rtol=1e-4)


def ort_session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_graph(path):
    model = onnx.load(str(path))
    assert {o.domain for o in model.opset_import} <= ALLOWED_DOMAINS | {"pkg.onnxscript.torch_lib"}
    assert any(o.domain in ALLOWED_DOMAINS and o.version == gx.OPSET for o in model.opset_import)
    nodes = list(model.graph.node)
    for f in model.functions:  # torch's library functions are inlined by the optimizer, if any
        nodes += list(f.node)
    for node in nodes:
        assert node.domain in ALLOWED_DOMAINS, f"non-standard op {node.domain}::{node.op_type}"
        if node.op_type in ("ScatterElements", "ScatterND"):
            reduction = [a.s for a in node.attribute if a.name == "reduction"]
            assert reduction in ([], [b"none"]), f"{node.op_type} with reduction {reduction}"
    return {n.op_type for n in nodes}


@pytest.mark.parametrize("theta", [0.6, 1.0])
@pytest.mark.parametrize("token_scale", [True, False])
def test_deit_tiny_in_onnx_runtime(tmp_path, theta, token_scale):
    gtp = dict(num_prop=8, sparsity=theta, token_scale=token_scale)
    model = WithSelection(peaked_deit_tiny(depth=4, img_size=112, **gtp))
    path = tmp_path / "deit_tiny_gtp.onnx"
    gx.to_onnx(model, path, torch.randn(2, 3, 112, 112), output_names=None)
    op_types = check_graph(path)
    assert {"TopK", "Softmax", "MatMul"} <= op_types
    sess = ort_session(path)
    for batch in (1, 3):  # neither is the export batch: the batch is dynamic
        x = torch.randn(batch, 3, 112, 112)
        got = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert len(got) == len(expected) == 5  # logits, then the keep of each block
        torch.testing.assert_close(torch.from_numpy(got[0]), expected[0], **TOL)
        for block, (g, e) in enumerate(zip(got[1:], expected[1:], strict=True)):
            assert torch.equal(torch.from_numpy(g), e), f"block {block}: other tokens selected"


def test_unpatched_and_options(tmp_path):
    model = peaked_deit_tiny(depth=2, patch=False)
    path = tmp_path / "deit_tiny.onnx"
    gx.to_onnx(model, path, torch.randn(1, 3, 96, 96))  # batch-1 example: still dynamic
    x = torch.randn(2, 3, 96, 96)
    (logits,) = ort_session(path).run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), **TOL)


@pytest.mark.parametrize("setting,value", [("selection", "random"), ("track_sources", True)])
def test_errors_name_the_setting(tmp_path, setting, value):
    model = peaked_deit_tiny(depth=1, num_prop=4)
    setattr(model.gtp, setting, value)
    with pytest.raises(ValueError, match=f"model.gtp.{setting}"):
        gx.to_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 96, 96))
