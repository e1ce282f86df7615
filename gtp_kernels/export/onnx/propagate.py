"""ONNX translation of gtp.propagate (SPEC 4): gathers, one small MatMul, no scatter reduction.

The kernel scatters each propagated token into its kept neighbours; ONNX (and TensorRT) have no
scatter-add, and a per-slot gather of neighbour rows costs W full passes over (B, R, C). The
translation uses that only P tokens are propagated: with xp (B, P, C) the propagated tokens and
coef (B, R, P) the weight of the slot of kept row r that points at propagated token p (0 where
there is none),

    x_out[r] = x[keep[r]] + alpha * (coef @ xp)[r]      (a (R x P) @ (P x C) MatMul per image)

coef is built by comparing each kept row's W neighbour slots with the P propagated positions.

Non-finite values (the project's rule): in `coef @ xp` a 0 coefficient times a NaN / Inf token
would give NaN in rows that never absorb that token, so the MatMul runs on the finite part of
xp, and the rows that absorb a NaN / +inf / -inf entry get it as IEEE addition would (NaN, or
+-inf, or NaN for +inf plus -inf), counted with a second MatMul of 0/1 hit flags. A kept row that
absorbs nothing is copied unchanged (no x + alpha * 0). The one difference left: a non-finite
edge *weight* (build_graph never makes one) times a 0 entry of the finite part gives NaN where
the reference gives +-inf for an infinite token. The position map uses ScatterElements without
a reduction (a plain scatter of distinct positions, in ONNX and TensorRT alike). Index ranges
cannot be asserted in ONNX: ONNX Runtime's Gather ops reject out-of-range indices at run time.
"""

from __future__ import annotations

import numpy as np

from gtp_kernels.export.onnx._common import (
    BOOL,
    FLOAT,
    INF,
    INT32,
    INT64,
    NAN,
    any_over,
    any_value,
    batch_shape,
    cast,
    compute_dtype,
    const,
    gather_rows,
    if_else,
    ints,
    is_finite,
    op,
    topk,
    zeros,
)


def is_finite_not(x):
    """Elementwise bool: x is NaN or +-Inf."""
    return op.Or(op.IsNaN(x), op.IsInf(x))


def _absorbed(xp, coef, hit, dtype):
    """sum_p coef[r, p] * xp[p] over the propagated tokens each kept row absorbs, with IEEE
    results for non-finite xp. xp: (B, P, C), coef / hit: (B, R, P) -> (B, R, C)."""
    zero = const(0.0, dtype)
    acc = op.MatMul(coef, op.Where(is_finite(xp), xp, zero))
    flags = op.Concat(
        op.Cast(op.IsNaN(xp), to=dtype),
        op.Cast(op.IsInf(xp, detect_negative=0), to=dtype),
        op.Cast(op.IsInf(xp, detect_positive=0), to=dtype),
        axis=-1,
    )
    counts = op.Greater(op.MatMul(hit, flags), zero)  # (B, R, 3C): any NaN / +inf / -inf
    nan_in, pos_in, neg_in = op.Split(counts, num_outputs=3, axis=-1)
    nan_out = op.Or(nan_in, op.And(pos_in, neg_in))
    acc = op.Where(neg_in, const(-INF, dtype), acc)
    acc = op.Where(pos_in, const(INF, dtype), acc)
    return op.Where(nan_out, const(NAN, dtype), acc)


def propagate(x, index, weight, keep, alpha: float, num_prefix: int, sizes):
    """x: (B, N, C), index / weight: (B, n, W) int32 / float32, keep: (B, R) int64 ->
    x_out (B, M + R, C), sizes_out (B, M + R) or (0,), index_out (B, R, W) int32,
    weight_out (B, R, W) float32."""
    big_n = x.shape[1]
    m = num_prefix
    n = big_n - m
    kept = keep.shape[1]
    width = index.shape[2]
    num_prop = n - kept

    # Old image position -> new position, -1 for a propagated token.
    new_pos = op.ScatterElements(
        op.Expand(const(-1, INT64), batch_shape(keep, n)),
        keep,
        op.Expand(const(np.arange(kept)[None], INT64), op.Shape(keep)),
        axis=1,
    )
    rows_index = gather_rows(op.Cast(index, to=INT64), keep)  # (B, R, W)
    rows_weight = gather_rows(weight, keep)
    valid = op.GreaterOrEqual(rows_index, const(0, INT64))
    nbr = op.Max(rows_index, const(0, INT64))
    nbr_new = op.GatherElements(new_pos, op.Reshape(nbr, ints(0, kept * width)), axis=1)
    nbr_new = op.Reshape(nbr_new, ints(0, kept, width))
    is_kept = op.GreaterOrEqual(nbr_new, const(0, INT64))
    survives = op.And(valid, is_kept)
    absorbs = op.And(valid, op.Not(is_kept))

    mixing = alpha != 0 and num_prop > 0 and width > 0
    if mixing:
        # The propagated positions (any order), and each kept row's weight for each of them.
        _, prop = topk(op.Cast(op.Less(new_pos, const(0, INT64)), to=FLOAT), num_prop, largest=True)
        hits = op.And(
            op.Equal(op.Unsqueeze(nbr, ints(-1)), op.Unsqueeze(prop, ints(1, 2))),
            op.Unsqueeze(absorbs, ints(-1)),
        )  # (B, R, W, P)
        gets = any_over(absorbs, 2, keepdims=1)  # (B, R, 1): the row absorbs something

    def summarise(t, dtype):
        # t: (B, N, C) in `dtype` -> (B, M + R, C): the prefix rows and the kept rows, one
        # gather, then what the kept rows absorb.
        rows = op.Concat(
            op.Expand(const(np.arange(m)[None], INT64), batch_shape(keep, m)),
            op.Add(keep, const(m, INT64)),
            axis=1,
        )
        out = gather_rows(t, rows)
        if not mixing:
            return out
        img = op.Slice(t, ints(m), ints(big_n), ints(1))
        xp = gather_rows(img, prop)  # (B, P, C), the propagated tokens
        hit = op.Cast(hits, to=dtype)
        w = rows_weight if dtype == FLOAT else op.Cast(rows_weight, to=dtype)
        coef = op.ReduceSum(op.Mul(hit, op.Unsqueeze(w, ints(-1))), ints(2), keepdims=0)
        hit = op.ReduceMax(hit, ints(2), keepdims=0)  # (B, R, P) 0/1

        def finite():
            # out - (alpha coef) @ (-xp): a row that absorbs nothing has an all-zero
            # coefficient row, whose product is +0 (the MatMul accumulates from +0, and ONNX
            # Runtime folds the positive scalar alpha into it), and x - (+0) is x bit for bit
            # (-0.0 included), so no Where is needed to copy such rows unchanged. The sign sits
            # on xp, not on a scalar, so no fusion can turn that +0 into -0 (tested).
            scaled = op.Concat(zeros(batch_shape(keep, m, num_prop), dtype), coef, axis=1)
            scaled = op.Mul(scaled, const(abs(alpha), dtype))
            return op.Sub(out, op.MatMul(scaled, op.Neg(xp) if alpha > 0 else xp))

        def non_finite():
            # Exact IEEE results for NaN / Inf tokens (see _absorbed), rows that absorb
            # nothing copied with a Where.
            acc = _absorbed(xp, coef, hit, dtype)
            mixed = op.Add(gather_rows(img, keep), op.Mul(const(alpha, dtype), acc))
            kept = op.Where(gets, mixed, gather_rows(img, keep))
            return op.Concat(op.Slice(t, ints(0), ints(m), ints(1)), kept, axis=1)

        return if_else(op.Not(any_value(xp, is_finite_not)), finite, non_finite)

    dtype = compute_dtype(x.dtype)
    x_out = summarise(cast(x, dtype), dtype)
    if x.dtype != dtype:
        x_out = op.Cast(x_out, to=x.dtype)
    if sizes is not None:
        sizes_out = op.Squeeze(summarise(op.Unsqueeze(sizes, ints(-1)), FLOAT), ints(-1))
    else:
        sizes_out = zeros(ints(0), FLOAT)

    if width == 0:
        return x_out, sizes_out, op.Cast(rows_index, to=INT32), rows_weight
    # Compact the surviving slots to the front of each row, in slot order: the slots sorted
    # by (dropped, slot) are the W smallest of where(survives, s, W + s).
    slot = const(np.arange(width), INT64)
    order_key = op.Where(survives, slot, op.Add(slot, const(width, INT64)))
    _, order = topk(order_key, width, largest=False)
    survives = op.GatherElements(op.Cast(survives, to=INT32), order, axis=2)
    survives = op.Cast(survives, to=BOOL)
    index_out = op.GatherElements(nbr_new, order, axis=2)
    index_out = op.Where(survives, index_out, const(-1, INT64))
    weight_out = op.GatherElements(rows_weight, order, axis=2)
    weight_out = op.Where(survives, weight_out, const(0.0, FLOAT))
    return x_out, sizes_out, op.Cast(index_out, to=INT32), weight_out
