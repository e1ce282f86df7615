"""gtp.attention: public wrapper, fake kernel and (refusing) autograd.

Inference op. Calling it on tensors that require grad is allowed (a pretrained timm model run
without torch.no_grad() produces such q/k/v) and the outputs carry a grad_fn, but
backward raises a RuntimeError that says to use backend="reference", which is differentiable.
Failing only in backward keeps plain inference working while never returning wrong gradients.
"""

from __future__ import annotations

import torch

from gtp_kernels._extension import extension_available
from gtp_kernels.ops._backend import resolve_backend
from gtp_kernels.reference import attention as _reference
from gtp_kernels.reference.attention import SCORES, check_attention_args

__all__ = ["SCORES", "attention"]

_OP = "attention"


def _out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, dv) with (B, N, H, dv) memory, as the kernel returns it."""
    b, h, n, _ = q.shape
    return q.new_empty((b, n, h, v.shape[-1])).permute(0, 2, 1, 3)


if extension_available():

    @torch.library.register_fake("gtp::attention")
    def _attention_fake(q, k, v, log_sizes, scale, sparsity, num_prefix, score):
        check_attention_args(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
        cols = 0 if score == "none" else q.shape[2] - num_prefix
        return _out_like(q, v), q.new_empty((q.shape[0], cols), dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        pass

    def _backward(ctx, grad_out, grad_score):
        raise RuntimeError(
            "gtp.attention: the compiled kernel is inference only and has no backward; "
            "call gtp_kernels.ops.attention(..., backend='reference') (pure PyTorch, "
            "differentiable) when you need gradients"
        )

    torch.library.register_autograd("gtp::attention", _backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sizes: torch.Tensor | None,
    scale: float,
    sparsity: float,
    num_prefix: int,
    score: str,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with proportional attention, top-theta N^2 masking and importance scores.

    Args:
        q, k: (B, H, N, d) float32/float16/bfloat16/float64, any strides (timm's views of its
            qkv projection are read in place by the CPU kernel).
        v: (B, H, N, dv), q's dtype.
        log_sizes: (B, N) float32 log token sizes added to the logits of key j, or None.
        scale: logit scale (d ** -0.5 in a ViT).
        sparsity: theta in (0, 1], the density kept; 1 = no masking. The threshold is the
            kk-th smallest probability of each (image, head), kk = int(N * N * (1 - theta));
            entries below it become 0, rows are not renormalised.
        num_prefix: M, prefix tokens (CLS, registers) that get no score.
        score: "none" or one of mixed_max, mixed_mean, diag_max, diag_mean, colsum_max,
            colsum_mean, cls_max, cls_mean, sum_max (SPEC 3).
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference".

    Returns:
        out: (B, H, N, dv) in q's dtype. The compiled kernel returns it with (B, N, H, dv)
            memory, so out.transpose(1, 2).reshape(B, N, H * dv) costs no copy.
        score: (B, N - M) float32 ((B, 0) for "none").
    """
    check_attention_args(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
    if resolve_backend(_OP, backend, q.device) == "reference":
        return _reference(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
    return torch.ops.gtp.attention(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
