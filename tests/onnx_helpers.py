"""Run a function of gtp ops through torch.onnx.export (the gtp translations) and ONNX Runtime."""

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
