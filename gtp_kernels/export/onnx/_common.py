"""Building blocks shared by the ONNX translations of the gtp ops (standard ONNX operators only).

Every translation is a plain Python function that the torch exporter calls while it records ONNX
nodes (onnxscript's tracing mode): tensor arguments arrive as symbolic values whose shapes are
known except for the dynamic batch dimension, and int / float / str arguments arrive as Python
values, so everything that depends only on them (the threshold's rank, the spatial graph, the
number of kept tokens) is computed here, once, and becomes a constant of the graph. Shapes that
contain the batch are built at run time from `Shape` (or with Reshape's 0 = "copy this
dimension"), so one file serves every batch size.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnxscript
from onnxscript import opset20 as op
from torch.onnx._internal.exporter import _building, _core

OPSET = 20  # the default of torch.onnx.export in torch 2.14; every operator used here is in it

FLOAT = ir.DataType.FLOAT
DOUBLE = ir.DataType.DOUBLE
INT64 = ir.DataType.INT64
INT32 = ir.DataType.INT32
BOOL = ir.DataType.BOOL

INF = math.inf
NAN = math.nan


def const(value, dtype) -> object:
    """A constant tensor of the given ONNX dtype (numpy scalar or array in, Constant node out)."""
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype.numpy())))


def ints(*values: int) -> object:
    """A 1-D int64 constant (shapes, axes, TopK's k)."""
    return const(list(values), INT64)


def zeros(shape, dtype) -> object:
    """A zero tensor of a run-time shape (e.g. (B, 0) outputs)."""
    return op.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, dtype=dtype.numpy())))


def compute_dtype(dtype) -> ir.DataType:
    """The dtype the ops compute in: float64 for float64 inputs, float32 for the rest (float32,
    float16, bfloat16), as the reference and the kernels do."""
    return DOUBLE if dtype == DOUBLE else FLOAT


def cast(x, dtype):
    """Cast unless x is known to have the dtype already (graph inputs know theirs; the values
    recorded inside a translation do not, so code passes their dtype along explicitly)."""
    return x if x.dtype == dtype else op.Cast(x, to=dtype)


def batch_shape(x, *rest: int):
    """The 1-D shape (B, *rest) with B = x.shape[0] read at run time."""
    b = op.Shape(x, start=0, end=1)
    return op.Concat(b, ints(*rest), axis=0) if rest else b


def is_finite(x):
    """Elementwise: neither NaN nor +-Inf (ONNX has IsNaN and IsInf, no IsFinite)."""
    return op.Not(op.Or(op.IsNaN(x), op.IsInf(x)))


def any_over(mask, axis: int, keepdims: int = 0):
    """Logical OR of a bool tensor along one axis."""
    return op.Cast(op.ReduceMax(op.Cast(mask, to=INT32), ints(axis), keepdims=keepdims), to=BOOL)


def nan_max(x, dtype, axis: int, keepdims: int = 0):
    """ReduceMax that propagates NaN like torch.amax (any NaN gives NaN). ONNX Runtime's
    ReduceMax skips NaN (measured: max(1, NaN, 2) = 2), so NaN is restored explicitly."""
    m = op.ReduceMax(x, ints(axis), keepdims=keepdims)
    nan = const(NAN, dtype)
    return op.Where(any_over(op.IsNaN(x), axis, keepdims), nan, m)


def gather_rows(t, rows):
    """t: (B, n, C), rows: (B, R) int64 -> (B, R, C), t[b, rows[b, r], :]."""
    return op.GatherND(t, op.Unsqueeze(rows, ints(-1)), batch_dims=1)


def topk(x, k: int, *, largest: bool, sorted_: bool = True):
    """TopK along the last axis with a Python k. ONNX breaks ties by the lower index, which
    every tie rule here builds on (checked in tests/test_export_onnx.py)."""
    return op.TopK(x, ints(k), axis=-1, largest=int(largest), sorted=int(sorted_))


def sort_ascending(idx, k: int):
    """The k entries of an int64 tensor (..., k) sorted ascending (TopK on the values)."""
    values, _ = topk(idx, k, largest=False)
    return values


def if_else(cond, then_fn, else_fn):
    """ONNX If: the value of then_fn() where the scalar bool `cond` holds, else of else_fn().
    Only the branch taken runs, so a rare case (non-finite values) can have an exact but slow
    path without slowing down the common one. Each branch is recorded into its own subgraph
    (reading outer values is allowed in ONNX), with the recorder torch's exporter uses for
    the main graph (a private class of torch 2.14's exporter, the only way to record a
    subgraph from a custom translation)."""

    def record(fn, name):
        sub = _building.OpRecorder(_core.current_tracer.opset, {})  # own constants
        with onnxscript.evaluator.default_as(sub):
            out = fn()
        return ir.Graph((), [out], nodes=sub.nodes, name=name)

    return op.If(cond, then_branch=record(then_fn, "then"), else_branch=record(else_fn, "else"))


def any_value(x, predicate) -> object:
    """Scalar bool: predicate (an elementwise op returning bool) holds anywhere in x."""
    return op.Cast(op.ReduceMax(op.Cast(predicate(x), to=INT32), keepdims=0), to=BOOL)
