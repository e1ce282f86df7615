"""ONNX translation of gtp.build_graph (SPEC 1): a dense (B, n, n) adjacency, then the ELL rows
with one TopK, as the reference builds them.

- Spatial: the 8-neighbourhood depends only on the grid, so it is a constant of the graph.
- Semantic: cosine similarities of the normalised tokens (MatMul), the K largest of each row
  with TopK (ties: the lower index, as ONNX TopK breaks them). Marked into the adjacency by
  comparing the K indices with 0..n-1 (no scatter).
- ELL: each row's neighbours ascending = the W smallest of where(adj, j, n) (TopK); degrees are
  row sums; weights 1 / sqrt(d_i d_j) in float64, rounded once to float32, as the reference.

Non-finite tokens (the project's rule): a token holding NaN or Inf has NaN similarity to every
token and NaN ranks as the most similar. Here that rank is given directly: such entries get the
key +inf, above every cosine similarity, and ties among them go to the lower index. Finite
tokens are scaled by their largest |x| (in float64) before the norm, so they never overflow.
"""

from __future__ import annotations

import numpy as np

from gtp_kernels.export.onnx._common import (
    BOOL,
    DOUBLE,
    FLOAT,
    INF,
    INT32,
    INT64,
    any_over,
    batch_shape,
    const,
    ints,
    is_finite,
    op,
    topk,
    zeros,
)
from gtp_kernels.reference.build_graph import graph_width, spatial_adjacency


def normalised_tokens(tokens):
    """(B, n, C) -> (B, n, C) float32 unit rows (zero rows stay 0): u = x / max_c |x_c| in
    float64, rounded to float32, then u / max(||u||, 1e-12)."""
    xd = op.Cast(tokens, to=DOUBLE)
    peak = op.ReduceMax(op.Abs(xd), ints(-1), keepdims=1)
    peak = op.Where(op.Greater(peak, const(0.0, DOUBLE)), peak, const(1.0, DOUBLE))
    u = op.Cast(op.Div(xd, peak), to=FLOAT)
    norm = op.Sqrt(op.ReduceSum(op.Mul(u, u), ints(-1), keepdims=1))
    return op.Div(u, op.Max(norm, const(1e-12, FLOAT)))


def semantic_adjacency(tokens, n: int, num_neighbours: int):
    """(B, n, C) -> (B, n, n) bool: row i marks its K most similar tokens j != i."""
    e = normalised_tokens(tokens)
    sim = op.MatMul(e, op.Transpose(e, perm=[0, 2, 1]))
    finite = op.ReduceMin(op.Cast(is_finite(op.Cast(tokens, to=DOUBLE)), to=INT32), ints(-1))
    bad = op.Not(op.Cast(finite, to=BOOL))  # (B, n, 1): the token holds NaN or Inf
    pair_bad = op.Or(bad, op.Transpose(bad, perm=[0, 2, 1]))
    key = op.Where(pair_bad, const(INF, FLOAT), sim)
    key = op.Where(const(np.eye(n, dtype=bool), BOOL), const(-INF, FLOAT), key)  # never itself
    _, nbr = topk(key, num_neighbours, largest=True, sorted_=False)  # (B, n, K)
    hits = op.Equal(op.Unsqueeze(nbr, ints(-1)), const(np.arange(n), INT64))  # (B, n, K, n)
    return any_over(hits, 2)


def ell_from_adjacency(adj, n: int, width_slots: int):
    """(B, n, n) bool -> index (B, n, W) int32 ascending then -1, weight (B, n, W) float32."""
    key = op.Where(adj, const(np.arange(n), INT64), const(n, INT64))  # non-edges sort last
    taken = min(width_slots, n)
    key, _ = topk(key, taken, largest=False, sorted_=True)
    if taken < width_slots:  # W > n (a tiny grid): pad with "no edge"
        pad = op.Expand(const(n, INT64), batch_shape(adj, n, width_slots - taken))
        key = op.Concat(key, pad, axis=2)
    valid = op.Less(key, const(n, INT64))
    index = op.Where(valid, key, const(-1, INT64))
    deg = op.ReduceSum(op.Cast(adj, to=DOUBLE), ints(-1), keepdims=0)  # (B, n)
    slots = op.Reshape(op.Max(index, const(0, INT64)), ints(0, n * width_slots))
    deg_j = op.Reshape(op.GatherElements(deg, slots, axis=1), ints(0, n, width_slots))
    w = op.Div(const(1.0, DOUBLE), op.Sqrt(op.Mul(op.Unsqueeze(deg, ints(2)), deg_j)))
    weight = op.Where(valid, op.Cast(w, to=FLOAT), const(0.0, FLOAT))
    return op.Cast(index, to=INT32), weight


def build_graph(tokens, height: int, width: int, num_neighbours: int, graph: str):
    """tokens: (B, n, C) image tokens on a height x width grid -> index (B, n, W) int32,
    weight (B, n, W) float32 (W = 8, K or 8 + K)."""
    n = tokens.shape[1]
    w_slots = graph_width(graph, num_neighbours)
    if w_slots == 0:  # a semantic graph with K = 0 has no slots
        return (
            zeros(batch_shape(tokens, n, 0), INT32),
            zeros(batch_shape(tokens, n, 0), FLOAT),
        )
    adj = None
    if graph in ("spatial", "mixed"):
        spatial = spatial_adjacency(height, width).numpy()
        adj = op.Expand(const(spatial[None], BOOL), batch_shape(tokens, n, n))
    if graph in ("semantic", "mixed") and num_neighbours > 0:
        semantic = semantic_adjacency(tokens, n, num_neighbours)
        adj = semantic if adj is None else op.Or(adj, semantic)
    return ell_from_adjacency(adj, n, w_slots)
