"""gtp.propagate: public wrapper, fake kernel and autograd of torch.ops.gtp.propagate.

The op is linear in x and sizes, so its backward is the transposed gather-scatter: the
gradient of an output row goes back to its kept token, and alpha * weight times it to every
propagated token in that token's graph row. index, weight and keep get no gradient.
"""

from __future__ import annotations

import torch

from gtp_kernels._extension import extension_available
from gtp_kernels.ops._backend import resolve_backend, triton_op
from gtp_kernels.reference import propagate as _reference
from gtp_kernels.reference.propagate import check_propagate_args

__all__ = ["propagate"]


def _absorbing_slots(index: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, n: int):
    """For the kept rows: each slot's neighbour (B, R, W) int64 (0 where unused) and its weight
    where that neighbour is propagated into the row, else 0 (B, R, W) float32."""
    b, kept = keep.shape
    width = index.shape[2]
    new_pos = torch.full((b, n), -1, dtype=torch.int64, device=index.device)
    new_pos.scatter_(1, keep, torch.arange(kept, device=index.device).expand(b, kept))
    rows = keep.unsqueeze(-1).expand(-1, -1, width)
    nbr = index.long().gather(1, rows)
    w = weight.gather(1, rows)
    valid = nbr >= 0
    nbr = nbr.clamp(min=0)
    absorbs = valid & (new_pos.gather(1, nbr.flatten(1)).view_as(nbr) < 0)
    return nbr, torch.where(absorbs, w, 0.0)


def _propagate_backward_rows(grad, nbr, coef, keep, alpha, num_prefix, big_n):
    """grad: (B, M + R, C) -> (B, N, C), the transpose of the forward's gather-accumulate."""
    b, _, c = grad.shape
    n = big_n - num_prefix
    out = grad.new_zeros((b, big_n, c))
    out[:, :num_prefix] = grad[:, :num_prefix]
    g_img = grad[:, num_prefix:]
    img = out[:, num_prefix:]  # a view: the scatters below write into out
    img.scatter_add_(1, keep.unsqueeze(-1).expand(-1, -1, c), g_img)
    if alpha != 0 and n > 0:
        for s in range(nbr.shape[2]):  # one scatter per slot: memory O(B R C)
            src = (alpha * coef[:, :, s, None]).to(grad.dtype) * g_img
            img.scatter_add_(1, nbr[:, :, s, None].expand(-1, -1, c), src)
    return out


def propagate_fake(x, index, weight, keep, alpha, num_prefix, sizes):
    """Fake (meta) kernel of every op with gtp::propagate's schema."""
    check_propagate_args(x, index, weight, keep, alpha, num_prefix, sizes, values=False)
    b, _, c = x.shape
    rows = num_prefix + keep.shape[1]
    f32 = torch.float32
    return (
        x.new_empty((b, rows, c)),
        x.new_empty((b, rows) if sizes is not None else (0,), dtype=f32),
        index.new_empty((b, keep.shape[1], index.shape[2])),
        weight.new_empty((b, keep.shape[1], index.shape[2])),
    )


def _setup_context(ctx, inputs, output):
    x, index, weight, keep, alpha, num_prefix, sizes = inputs
    ctx.save_for_backward(index, weight, keep)
    ctx.alpha = alpha
    ctx.num_prefix = num_prefix
    ctx.big_n = x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.has_sizes = sizes is not None


def _backward(ctx, grad_x, grad_sizes, grad_index, grad_weight):
    index, weight, keep = ctx.saved_tensors
    n = ctx.big_n - ctx.num_prefix
    nbr, coef = _absorbing_slots(index, weight, keep, n)
    dx = dsizes = None
    args = (nbr, coef, keep, ctx.alpha, ctx.num_prefix, ctx.big_n)
    if ctx.needs_input_grad[0] and grad_x is not None:
        compute = torch.float64 if ctx.x_dtype == torch.float64 else torch.float32
        dx = _propagate_backward_rows(grad_x.to(compute), *args).to(ctx.x_dtype)
    if ctx.has_sizes and ctx.needs_input_grad[6] and grad_sizes is not None:
        dsizes = _propagate_backward_rows(grad_sizes.unsqueeze(-1), *args).squeeze(-1)
    return dx, None, None, None, None, None, dsizes


def register_propagate_autograd(op: str) -> None:
    """The transposed gather-scatter backward, for every op with gtp::propagate's schema."""
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


if extension_available():
    torch.library.register_fake("gtp::propagate", propagate_fake)
    register_propagate_autograd("gtp::propagate")


def propagate(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    alpha: float,
    num_prefix: int,
    sizes: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Propagate the removed image tokens into their kept graph neighbours (SPEC 4).

    Args:
        x: (B, N, C) float32/float16/bfloat16/float64, any strides; M = num_prefix prefix
            tokens first, then n = N - M image tokens.
        index: (B, n, W) int32 neighbours (image positions), -1 for an empty slot.
        weight: (B, n, W) float32 edge weights.
        keep: (B, n - P) int64 distinct kept image positions, in output order (1 <= n - P when
            n >= 1); every other image token is propagated and removed.
        alpha: propagation magnitude (0: plain pruning), finite.
        num_prefix: M, prefix tokens copied unchanged.
        sizes: optional (B, N) float32 token sizes, propagated like x.
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference".

    Returns:
        x_out (B, M + n - P, C) in x's dtype (accumulated in float32, float64 for float64 x),
        sizes_out (B, M + n - P) float32 or an empty (0,) tensor when sizes is None, and the
        graph restricted to the kept tokens: index_out (B, n - P, W) int32 in new positions,
        compacted and -1 padded, weight_out (B, n - P, W) float32 (0 at padding). x_out and
        sizes_out are differentiable with respect to x and sizes on every backend.
    """
    which = resolve_backend("propagate", backend, x.device)
    args = (x, index, weight, keep, float(alpha), int(num_prefix), sizes)
    if which == "compiled":
        return torch.ops.gtp.propagate(*args)
    if which == "triton":
        return triton_op("propagate")(*args)
    return _reference(*args)
