"""ONNX translation of gtp.select_tokens (SPEC 3): two TopKs, no sort with a stability flag.

The order is the reference's: a score ranks by value under -inf < finite < +inf < NaN (all NaNs
equal), and among equal scores the lower position is kept. ONNX TopK does not define where NaN
goes, so the ranking runs on a float64 key that puts every value where the rule wants it, with
room to spare: float32 values are exact in float64, float32 +inf becomes 1e300 (above every
float32 number), NaN becomes float64 +inf (above that). TopK breaks ties by the lower index:
- keep = the n - P largest keys (ties: lower position first, i.e. kept);
- prop = the P smallest keys of the row read backwards (ties: the higher position first, i.e.
  propagated), mapped back. Both follow one strict order (key, then position), so the two
  sets are complements, as the reference's one sort gives them.
"""

from __future__ import annotations

import numpy as np

from gtp_kernels.export.onnx._common import (
    DOUBLE,
    INF,
    INT64,
    batch_shape,
    const,
    op,
    sort_ascending,
    topk,
    zeros,
)


def rank_key(score):
    """(B, n) float32 -> float64 key whose plain order is the rule's total order."""
    key = op.Cast(score, to=DOUBLE)
    key = op.Where(op.IsInf(key, detect_negative=0), const(1e300, DOUBLE), key)
    return op.Where(op.IsNaN(key), const(INF, DOUBLE), key)


def select_tokens(score, num_prop: int):
    """score: (B, n) float32, 0 <= num_prop <= n - 1 -> keep (B, n - P) int64, prop (B, P)
    int64, both ascending."""
    n = score.shape[1]
    p = int(num_prop)
    if p == 0:  # everything is kept
        keep = op.Expand(const(np.arange(n)[None], INT64), batch_shape(score, n))
        prop = zeros(batch_shape(score, 0), INT64)
        return keep, prop
    key = rank_key(score)
    _, keep = topk(key, n - p, largest=True, sorted_=False)
    backwards = op.Gather(key, const(np.arange(n - 1, -1, -1), INT64), axis=1)
    _, prop_back = topk(backwards, p, largest=False, sorted_=False)
    prop = op.Sub(const(n - 1, INT64), prop_back)
    return sort_ascending(keep, n - p), sort_ascending(prop, p)


__all__ = ["rank_key", "select_tokens"]
