"""Reference attention (SPEC 2, 3): proportional attention, top-theta N^2 sparsification, A @ V
and the importance score of every image token, in plain PyTorch.

The oracle for torch.ops.gtp.attention. It materialises the (B, H, N, N) probabilities (the
kernel never does) and finds the threshold with torch.kthvalue over each flattened N x N map,
which is also how the authors' code does it.

Precision: float16 / bfloat16 inputs are computed in float32 (q, k, v are upcast first) and out
is cast back to q's dtype; float32 inputs are computed in float32 and float64 in float64. The
score is always returned as float32. The compiled kernel follows the same rules.
Non-finite values (the project's one rule, the same on every backend): q, k, v and log_sizes
are not checked (a check would need a device sync); NaN / Inf propagate by IEEE arithmetic and
every decision made from them is deterministic:
- a row whose logits hold NaN or +inf, or are all -inf, is NaN in the whole row (torch.softmax);
- tau is the kk-th smallest probability under -inf < finite < +inf < NaN (kth_smallest), so
  tau is NaN only when fewer than kk entries of the map are non-NaN;
- an entry is zeroed iff `A < tau` (IEEE): NaN entries are never zeroed, a NaN tau zeroes
  nothing;
- the scores propagate NaN: sums and means by arithmetic, the max over heads as torch.amax does
  (any NaN head gives NaN).
"""

from __future__ import annotations

import math

import torch

from gtp_kernels.reference._checks import (
    FLOATING,
    check_dim,
    check_dtype,
    check_in_range,
    check_same_device,
    fail,
)

_OP = "gtp.attention"

SCORES = (
    "none",
    "mixed_max",
    "mixed_mean",
    "diag_max",
    "diag_mean",
    "colsum_max",
    "colsum_mean",
    "cls_max",
    "cls_mean",
    "sum_max",
)


def check_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sizes: torch.Tensor | None,
    scale: float,
    sparsity: float,
    num_prefix: int,
    score: str,
) -> None:
    """Same checks, same messages as the C++ kernel (the errors name the argument)."""
    check_dim(_OP, q, "q", 4, " (B, H, N, d)")
    if k.shape != q.shape:
        fail(_OP, f"k must have the shape of q {list(q.shape)}, got shape {list(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        fail(
            _OP,
            f"v must have shape (B, H, N, dv) with (B, H, N) = {list(q.shape[:3])} of q, "
            f"got shape {list(v.shape)}",
        )
    check_dtype(_OP, q, "q", *FLOATING)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            fail(_OP, f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    check_same_device(_OP, q, "q", k=k, v=v, log_sizes=log_sizes)
    b, h, n_tok, _ = q.shape
    if h < 1:
        fail(_OP, f"q must have at least one head, got shape {list(q.shape)}")
    if log_sizes is not None:
        if tuple(log_sizes.shape) != (b, n_tok):
            fail(
                _OP,
                f"log_sizes must have shape (B, N) = {[b, n_tok]}, got shape "
                f"{list(log_sizes.shape)}",
            )
        check_dtype(_OP, log_sizes, "log_sizes", torch.float32)
    if not math.isfinite(scale):
        fail(_OP, f"scale must be finite, got {scale}")
    if not (0.0 < sparsity <= 1.0):  # also rejects NaN
        fail(_OP, f"sparsity (theta) must be in (0, 1], got {sparsity}")
    check_in_range(_OP, "num_prefix", num_prefix, 0, n_tok, "[0, N]")
    if score not in SCORES:
        fail(_OP, f"score must be one of {', '.join(SCORES)}; got {score!r}")
    if score.startswith("cls_") and num_prefix < 1:
        fail(_OP, f"score {score!r} needs a CLS token (num_prefix >= 1), got num_prefix 0")


def num_masked(num_tokens: int, sparsity: float) -> int:
    """kk = int(N * N * (1 - theta)) in double precision: the rank (1-based) of the threshold
    among the N*N probabilities of one head. 0 means no masking."""
    return int(num_tokens * num_tokens * (1.0 - float(sparsity)))


def kth_smallest(flat: torch.Tensor, kk: int) -> torch.Tensor:
    """The kk-th smallest entry (1-based) along the last dim, keepdim, under
    -inf < finite < +inf < NaN. NaNs are made one canonical (positive) NaN first: torch.kthvalue
    on CUDA ranks a NaN with the sign bit set below every number (it compares bit patterns),
    on the CPU above them; the rule is the CPU's on every device."""
    flat = torch.where(flat.isnan(), float("nan"), flat)
    return flat.kthvalue(kk, dim=-1, keepdim=True).values


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    log_sizes: torch.Tensor | None,
    scale: float,
    sparsity: float,
) -> torch.Tensor:
    """The sparsified attention probabilities (B, H, N, N) in the compute dtype (float32 for
    float32/float16/bfloat16 inputs, float64 for float64).

    logits[i, j] = scale * q_i . k_j + log_sizes[b, j]; A = softmax over j. When
    kk = int(N * N * (1 - theta)) > 0, tau is the kk-th smallest (1-based) entry of the whole
    N x N map of each (b, h); entries A < tau become 0, entries equal to tau stay, and rows are
    not renormalised.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(compute), k.to(compute)
    logits = scale * (qf @ kf.transpose(-1, -2))
    if log_sizes is not None:
        logits = logits + log_sizes.to(compute)[:, None, None, :]
    attn = logits.softmax(dim=-1)
    b, h, n_tok, _ = attn.shape
    kk = num_masked(n_tok, sparsity)
    if kk > 0 and attn.numel() > 0:
        flat = attn.reshape(b, h, n_tok * n_tok)
        tau = kth_smallest(flat, kk)  # (B, H, 1)
        attn = torch.where(flat < tau, torch.zeros_like(flat), flat).reshape(attn.shape)
    return attn


def importance_score(attn: torch.Tensor, num_prefix: int, score: str) -> torch.Tensor:
    """Importance (B, n) float32 of the image tokens j = M..N-1 from probabilities (B, H, N, N).

    gamma_j = A[h, j, j] (diagonal), psi_j = sum over all rows i of A[h, i, j] (column sum,
    prefix rows included), cls_j = A[h, 0, j]; combined over heads as the strategy says:
    mixed_max = max_h gamma * max_h psi, mixed_mean = mean_h gamma * mean_h psi,
    diag_*/colsum_*/cls_* = max/mean_h of gamma/psi/cls, sum_max = max_h gamma + max_h psi.
    "none" gives a (B, 0) tensor.
    """
    b = attn.shape[0]
    if score == "none":
        return torch.zeros(b, 0, dtype=torch.float32, device=attn.device)
    m = num_prefix
    gamma = attn.diagonal(dim1=-2, dim2=-1)[:, :, m:]  # (B, H, n)
    psi = attn.sum(dim=-2)[:, :, m:]
    kind, reduce = score.split("_")

    def over_heads(x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=1) if reduce == "max" else x.mean(dim=1)

    if kind == "mixed":
        result = over_heads(gamma) * over_heads(psi)
    elif kind == "diag":
        result = over_heads(gamma)
    elif kind == "colsum":
        result = over_heads(psi)
    elif kind == "cls":
        result = over_heads(attn[:, :, 0, m:])
    else:  # sum_max
        result = over_heads(gamma) + over_heads(psi)
    return result.to(torch.float32)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sizes: torch.Tensor | None,
    scale: float,
    sparsity: float,
    num_prefix: int,
    score: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with proportional attention, top-theta N^2 masking and importance scores.

    Args:
        q, k: (B, H, N, d) float32/float16/bfloat16/float64, any strides (timm passes views of
            its qkv projection).
        v: (B, H, N, dv), q's dtype (dv is d in a ViT; any dv is accepted).
        log_sizes: (B, N) float32 log token sizes added to the logits of key j, or None.
        scale: logit scale (d ** -0.5 in a ViT), finite.
        sparsity: theta in (0, 1], the density kept; 1 disables masking.
        num_prefix: M in [0, N], prefix tokens (CLS, registers) that get no score.
        score: "none" or a strategy (see SCORES / importance_score).

    Returns:
        out: (B, H, N, dv) in q's dtype, the masked probabilities times v.
        score: (B, N - M) float32 importance of the image tokens ((B, 0) for "none").
    """
    check_attention_args(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
    attn = attention_probs(q, k, log_sizes, scale, sparsity)
    out = (attn @ v.to(attn.dtype)).to(q.dtype)
    return out, importance_score(attn, num_prefix, score)
