"""gtp.attention: public wrapper, fake kernel and autograd.

The backward (for finetuning through the patch) treats the top-theta mask as a constant, as the
authors' training does: the threshold tau is a rank statistic, piecewise constant in the inputs,
so the gradient flows through the kept probabilities only. That is also exactly what autograd
gives for the reference (torch.where(A < tau, 0, A) passes no gradient to tau). The kernel never
stores the (B, H, N, N) probabilities, so the backward recomputes them (and tau) from the saved
q, k and log_sizes with the reference's softmax, in the compute dtype (float32 for float32 /
float16 / bfloat16, float64 for float64). Where the kernel's and the recomputed probability of
an entry sit within rounding of tau, the two may disagree on whether it is masked; that entry is
about tau in size, so its gradient contribution is too.

`setup_context` and `backward` are module-level and depend only on the op's schema
(q, k, v, log_sizes, scale, sparsity, num_prefix, score) -> (out, score), so every op with that
schema (the compiled gtp::attention here, a Triton op elsewhere) registers the same autograd
with `register_autograd("<namespace>::attention")`.
"""

from __future__ import annotations

import torch

from gtp_kernels._extension import extension_available
from gtp_kernels.ops._backend import resolve_backend, triton_op
from gtp_kernels.reference import attention as _reference
from gtp_kernels.reference.attention import (
    SCORES,
    attention_probs,
    check_attention_args,
    importance_score,
    kth_smallest,
    num_masked,
)

__all__ = [
    "SCORES",
    "attention",
    "attention_fake",
    "out_like",
    "backward",
    "register_autograd",
    "setup_context",
]

_OP = "attention"


def out_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, dv) with (B, N, H, dv) memory, as the kernel returns it."""
    b, h, n, _ = q.shape
    return q.new_empty((b, n, h, v.shape[-1])).permute(0, 2, 1, 3)


def setup_context(ctx, inputs, output) -> None:
    """Save what `backward` recomputes the probabilities from (no (B, H, N, N) tensor)."""
    q, k, v, log_sizes, scale, sparsity, num_prefix, score = inputs
    ctx.save_for_backward(q, k, v, log_sizes)
    ctx.scale = float(scale)
    ctx.sparsity = float(sparsity)
    ctx.num_prefix = int(num_prefix)
    ctx.score = score


def _probs_and_mask(q, k, log_sizes, scale, sparsity):
    """Unmasked probabilities P and masked A = P where P >= tau (else 0), (B, H, N, N) in the
    compute dtype. tau as in the forward: the kk-th smallest entry of each (b, h) map."""
    probs = attention_probs(q, k, log_sizes, scale, 1.0)  # the reference softmax, no masking
    b, h, n, _ = probs.shape
    kk = num_masked(n, sparsity)
    if kk == 0 or probs.numel() == 0:
        return probs, probs
    flat = probs.reshape(b, h, n * n)
    tau = kth_smallest(flat, kk)
    return probs, torch.where(flat < tau, 0.0, flat).reshape(probs.shape)


def backward(ctx, grad_out, grad_score):
    """Gradients of (out, score) -> (q, k, v, log_sizes), the mask held constant.

    With logits z = scale * q k^T + log_sizes, P = softmax(z), A = P * mask, out = A v:
        dv = A^T dout,  dA = dout v^T + (the score's gradient, through importance_score),
        dz = A * dA - P * rowsum(A * dA)      (softmax backward of dP = dA * mask),
        dq = scale * dz k,  dk = scale * dz^T q,  dlog_sizes[b, j] = sum over h, i of dz.
    """
    q, k, v, log_sizes = ctx.saved_tensors
    need_q, need_k, need_v, need_ls = ctx.needs_input_grad[:4]
    has_score = grad_score is not None and grad_score.numel() > 0 and ctx.score != "none"
    if not (need_q or need_k or need_v or need_ls) or (grad_out is None and not has_score):
        return None, None, None, None, None, None, None, None
    probs, attn = _probs_and_mask(q, k, log_sizes, ctx.scale, ctx.sparsity)
    compute = attn.dtype
    d_attn = torch.zeros_like(attn)
    dv = None
    if grad_out is not None:
        g = grad_out.to(compute)
        d_attn = g @ v.to(compute).transpose(-1, -2)
        if need_v:
            dv = (attn.transpose(-1, -2) @ g).to(v.dtype)
    if has_score:
        # The score is a few reductions of A (diagonal, column sums, max / mean over heads):
        # its vector-Jacobian product is taken from the reference definition itself, so the
        # tie rule of the max over heads (an even split, as torch.amax) is the same.
        with torch.enable_grad():
            a = attn.detach().requires_grad_()
            s = importance_score(a, ctx.num_prefix, ctx.score)
            (d_score,) = torch.autograd.grad(s, a, grad_score.to(s.dtype))
        d_attn = d_attn + d_score
    dq = dk = d_ls = None
    if need_q or need_k or need_ls:
        ad = attn * d_attn
        d_logits = ad - probs * ad.sum(dim=-1, keepdim=True)
        if need_q:
            dq = (ctx.scale * (d_logits @ k.to(compute))).to(q.dtype)
        if need_k:
            dk = (ctx.scale * (d_logits.transpose(-1, -2) @ q.to(compute))).to(k.dtype)
        if need_ls and log_sizes is not None:
            d_ls = d_logits.sum(dim=(1, 2)).to(log_sizes.dtype)
    return dq, dk, dv, d_ls, None, None, None, None


def register_autograd(op) -> None:
    """Give an op with gtp::attention's schema this backward (e.g. "gtp_triton::attention")."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)


def attention_fake(q, k, v, log_sizes, scale, sparsity, num_prefix, score):
    """Fake (meta) kernel of every op with gtp::attention's schema."""
    check_attention_args(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
    cols = 0 if score == "none" else q.shape[2] - num_prefix
    return out_like(q, v), q.new_empty((q.shape[0], cols), dtype=torch.float32)


if extension_available():
    torch.library.register_fake("gtp::attention", attention_fake)
    register_autograd("gtp::attention")


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
        Both are differentiable with respect to q, k, v and log_sizes on every backend, the
        top-theta mask held constant (see the module docstring).
    """
    check_attention_args(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
    which = resolve_backend(_OP, backend, q.device)
    args = (q, k, v, log_sizes, scale, sparsity, num_prefix, score)
    if which == "compiled":
        return torch.ops.gtp.attention(*args)
    if which == "triton":
        return triton_op(_OP)(*args)
    return _reference(*args)
