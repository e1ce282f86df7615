"""ONNX translation of gtp.attention (SPEC 2, 3): MatMul, Softmax, TopK for the threshold,
Where for the mask, Gather / ReduceSum / ReduceMax for the scores.

Unlike the fused kernel, the ONNX graph materialises the (B, H, N, N) probabilities, as the
reference does. The threshold tau is the kk-th smallest of each head's N*N probabilities,
found with one TopK (see `kth_smallest` for which one and why), then entries A < tau become 0.

Non-finite values follow the project's rule as the reference does: Softmax gives a NaN row for
logits holding NaN or +inf or all -inf (ONNX Runtime does, as torch.softmax); NaN ranks above
every probability in the threshold's order, so tau is NaN only when fewer than kk entries are
non-NaN (then nothing is zeroed); `A < tau` is an IEEE comparison (NaN is never zeroed); the max
over heads propagates NaN explicitly (ONNX Runtime's ReduceMax skips it).
"""

from __future__ import annotations

import numpy as np

from gtp_kernels.export.onnx._common import (
    FLOAT,
    INF,
    INT64,
    batch_shape,
    cast,
    compute_dtype,
    const,
    if_else,
    ints,
    nan_max,
    op,
    topk,
    zeros,
)
from gtp_kernels.reference.attention import num_masked

# How the kk-th smallest of T = N*N values is found (benchmarks/bench_onnx.py --threshold
# measures each): "smallest" = max of TopK(k=kk, largest=0); "largest" = min of TopK(k=T-kk+1,
# largest=1), the same order statistic counted from the top. "auto" takes the smaller k.
THRESHOLD_METHODS = ("auto", "smallest", "largest")
_threshold_method = "auto"


def set_threshold_method(method: str) -> None:
    """Choose how later exports find the threshold (for benchmarking; results are identical)."""
    global _threshold_method
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {method!r}")
    _threshold_method = method


def kth_smallest(key, kk: int, total: int):
    """key: (B, H, T) with no NaN -> (B, H, 1), its kk-th smallest entry (1-based, duplicates
    counted). Unsorted TopK plus a reduction: ONNX Runtime then selects without sorting the k
    winners, and the order statistic is the largest of the kk smallest (= the smallest of the
    T - kk + 1 largest)."""
    method = _threshold_method
    if method == "auto":
        method = "smallest" if kk <= total - kk + 1 else "largest"
    if method == "smallest":
        values, _ = topk(key, kk, largest=False, sorted_=False)
        return op.ReduceMax(values, ints(-1), keepdims=1)
    values, _ = topk(key, total - kk + 1, largest=True, sorted_=False)
    return op.ReduceMin(values, ints(-1), keepdims=1)


def sparsify(attn, dtype, n_tok: int, sparsity: float):
    """(B, H, N, N) probabilities -> the same with every entry below the threshold set to 0.

    Cost matters here (it runs on B * H * N^2 values per block), and ONNX Runtime's Where and
    bool casts are an order of magnitude slower than its arithmetic (measured in
    benchmarks/NOTES.md), so the mask is arithmetic: for probabilities x and tau in [0, 1],
    ceil(relu(tau - x)) is 1 exactly when x < tau (the sign of a float difference is exact),
    and x * (1 - that) zeroes those entries (NaN entries stay NaN).
    """
    kk = num_masked(n_tok, sparsity)
    if kk <= 0 or n_tok == 0:
        return attn
    total = n_tok * n_tok
    flat = op.Reshape(attn, ints(0, 0, total))
    # NaN ranks above every probability: give NaN entries the key +inf (probabilities are
    # <= 1, so +inf occurs no other way). Softmax makes NaN only from non-finite inputs, so
    # that pass runs only when the maps hold a NaN (their sum is NaN).
    has_nan = op.IsNaN(op.ReduceSum(flat, keepdims=0))
    key = if_else(
        has_nan,
        lambda: op.Where(op.IsNaN(flat), const(INF, dtype), flat),
        lambda: op.Identity(flat),
    )
    tau = kth_smallest(key, kk, total)  # (B, H, 1)
    # A +inf order statistic means tau is NaN: nothing is zeroed, as with tau = 0.
    tau = op.Where(op.IsInf(tau), const(0.0, dtype), tau)
    below = op.Ceil(op.Relu(op.Sub(tau, flat)))  # 1 where flat < tau, else 0
    flat = op.Mul(flat, op.Sub(const(1.0, dtype), below))
    return op.Reshape(flat, ints(0, 0, n_tok, n_tok))


def importance_score(attn, dtype, n_tok: int, num_prefix: int, score: str):
    """(B, H, N, N) probabilities -> (B, N - M) float32 (SPEC 3; see the reference's
    importance_score for each strategy). "none" gives (B, 0)."""
    if score == "none":
        return zeros(batch_shape(attn, 0), FLOAT)
    m = num_prefix
    image = np.arange(m, n_tok)
    flat = op.Reshape(attn, ints(0, 0, n_tok * n_tok))
    gamma = op.Gather(flat, const(image * (n_tok + 1), INT64), axis=2)  # A[h, j, j]
    psi = op.Gather(op.ReduceSum(attn, ints(2), keepdims=0), const(image, INT64), axis=2)
    kind, reduce = score.split("_")

    def over_heads(x):
        return nan_max(x, dtype, 1) if reduce == "max" else op.ReduceMean(x, ints(1), keepdims=0)

    if kind == "mixed":
        result = op.Mul(over_heads(gamma), over_heads(psi))
    elif kind == "diag":
        result = over_heads(gamma)
    elif kind == "colsum":
        result = over_heads(psi)
    elif kind == "cls":
        result = over_heads(op.Gather(flat, const(image, INT64), axis=2))  # row 0: A[h, 0, j]
    else:  # sum_max
        result = op.Add(over_heads(gamma), over_heads(psi))
    return result if dtype == FLOAT else op.Cast(result, to=FLOAT)


def attention(q, k, v, log_sizes, scale: float, sparsity: float, num_prefix: int, score: str):
    """q, k: (B, H, N, d), v: (B, H, N, dv) float32/float16/bfloat16/float64; log_sizes:
    (B, N) float32 or None -> out (B, H, N, dv) in q's dtype, score (B, N - M) float32."""
    n_tok = q.shape[2]
    dtype = compute_dtype(q.dtype)
    qf, kf, vf = cast(q, dtype), cast(k, dtype), cast(v, dtype)
    logits = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), const(scale, dtype))
    if log_sizes is not None:
        logits = op.Add(logits, op.Unsqueeze(cast(log_sizes, dtype), ints(1, 2)))
    attn = sparsify(op.Softmax(logits, axis=-1), dtype, n_tok, sparsity)
    out = op.MatMul(attn, vf)
    if q.dtype != dtype:
        out = op.Cast(out, to=q.dtype)
    return out, importance_score(attn, dtype, n_tok, num_prefix, score)
