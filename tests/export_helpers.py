"""Helpers of the export tests: run gtp ops through torch.onnx.export (the gtp translations) and
ONNX Runtime; a peaked, seeded DeiT-tiny; a wrapper that also returns the selected tokens."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from gtp_kernels.export import OPSET
from gtp_kernels.export.onnx import translation_table


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def session(model, args, dynamic_batch: bool = True) -> ort.InferenceSession:
    """Export `model(*args)` (batch dimension 0 of every input dynamic) and open it in ORT."""
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        # forward(*args): one entry, a tuple; None arguments (optional tensors) get None.
        dynamic = (tuple(None if a is None else {0: batch} for a in args),)
    with torch.no_grad():
        program = torch.onnx.export(
            model.eval(),
            tuple(args),
            dynamo=True,
            dynamic_shapes=dynamic,
            custom_translation_table=translation_table(),
            opset_version=OPSET,
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(
        program.model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


def run(sess: ort.InferenceSession, *args) -> list[torch.Tensor]:
    tensors = [a for a in args if a is not None]  # None (an optional tensor) is no input
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: np.ascontiguousarray(a.numpy()) for n, a in zip(names, tensors, strict=True)}
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feeds)]


def onnx_run(fn, *args, dynamic_batch: bool = True) -> list[torch.Tensor]:
    """fn(*args) (tensors in, a tensor or tuple out) exported with the gtp translations and run
    in ONNX Runtime on the same args."""
    return run(session(Fn(fn), args, dynamic_batch), *args)


def peaked_deit_tiny(
    depth: int = 3, img_size: int = 96, patch: bool = True, **gtp
) -> torch.nn.Module:
    """Seeded DeiT-tiny (depth-reduced, small images) with qkv weights x4, so its attention is
    peaked like a trained model's and no near-ties sit at the threshold or the selection
    boundary; GTP-patched with the settings `gtp` (backend "cpu" unless given) when patch."""
    import timm

    import gtp_kernels.patch

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=depth, img_size=img_size).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4)
    if patch:
        gtp_kernels.patch.timm(model, **{"backend": "cpu", **gtp})
    return model


class WithSelection(torch.nn.Module):
    """model(x) followed by the kept positions of every GTP block (B, n_l - P) int64, as extra
    outputs, so exported graphs can be checked for selecting the same tokens. It records the
    calls to gtp_kernels.ops.select_tokens made while the forward runs (traced by export)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.keeps: list[torch.Tensor] = []
        self.train(model.training)

    def forward(self, x):
        import gtp_kernels.ops as ops

        real = ops.select_tokens
        self.keeps = []

        def recording(score, num_prop, backend="auto"):
            keep, prop = real(score, num_prop, backend=backend)
            self.keeps.append(keep)
            return keep, prop

        ops.select_tokens = recording
        try:
            logits = self.model(x)
        finally:
            ops.select_tokens = real
        return (logits, *self.keeps)
