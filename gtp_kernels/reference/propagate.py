"""Reference graph propagation (SPEC 4): kept tokens absorb their propagated neighbours, the
propagated tokens are removed and the graph shrinks to the survivors."""

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

_OP = "gtp.propagate"


def check_propagate_args(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    alpha: float,
    num_prefix: int,
    sizes: torch.Tensor | None,
    *,
    values: bool = True,
) -> None:
    """Same checks, same messages as the C++ kernel (the errors name the argument).

    values=False skips the checks that read tensor data (index and keep entries), for fake
    tensors and torch.compile tracing. alpha is a host scalar: always checked, no sync."""
    check_dim(_OP, x, "x", 3)
    check_dtype(_OP, x, "x", *FLOATING)
    b, big_n, _ = x.shape
    check_in_range(_OP, "num_prefix", num_prefix, 0, big_n, "[0, N]")
    n = big_n - num_prefix
    check_dim(_OP, index, "index", 3)
    check_dtype(_OP, index, "index", torch.int32)
    if index.shape[0] != b or index.shape[1] != n:
        fail(
            _OP,
            f"index must have shape (B, N - num_prefix, W) = ({b}, {n}, W), "
            f"got {list(index.shape)}",
        )
    check_dtype(_OP, weight, "weight", torch.float32)
    if weight.shape != index.shape:
        fail(
            _OP,
            f"weight must have the shape of index {list(index.shape)}, got {list(weight.shape)}",
        )
    check_dim(_OP, keep, "keep", 2)
    check_dtype(_OP, keep, "keep", torch.int64)
    if keep.shape[0] != b or keep.shape[1] > n or (n >= 1 and keep.shape[1] < 1):
        fail(
            _OP,
            f"keep must have shape (B, n - P) with B = {b} and 1 <= n - P <= n = {n}, "
            f"got {list(keep.shape)}",
        )
    if sizes is not None:
        check_dtype(_OP, sizes, "sizes", torch.float32)
        if tuple(sizes.shape) != (b, big_n):
            fail(_OP, f"sizes must have shape (B, N) = ({b}, {big_n}), got {list(sizes.shape)}")
    check_same_device(_OP, x, "x", index=index, weight=weight, keep=keep, sizes=sizes)
    if not math.isfinite(alpha):
        fail(_OP, f"alpha must be finite, got {alpha}")
    if not values:
        return
    if index.numel() > 0 and bool(((index < -1) | (index >= n)).any()):
        fail(_OP, f"index entries must be in [-1, n) = [-1, {n}), got out of range")
    if keep.numel() > 0:
        if bool(((keep < 0) | (keep >= n)).any()):
            fail(_OP, f"keep entries must be in [0, n) = [0, {n}), got out of range")
        if bool((keep.sort(dim=1).values.diff(dim=1) == 0).any()):
            fail(_OP, "keep has duplicate entries in a row")


def _gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t: (B, n, C), rows: (B, R) int64 -> t[b, rows[b, r], :] as (B, R, C)."""
    return t.gather(1, rows.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def propagate(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    alpha: float,
    num_prefix: int,
    sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Propagate the removed image tokens into their kept graph neighbours.

    Args:
        x: (B, N, C) float32/float16/bfloat16/float64 tokens, the M = num_prefix prefix tokens
            first, then n = N - M image tokens.
        index: (B, n, W) int32 graph neighbours of each image token (image positions), -1 for
            an empty slot.
        weight: (B, n, W) float32 edge weights (ignored at empty slots).
        keep: (B, n - P) int64 distinct image positions that survive, in output order; every
            other image token is propagated and removed. 1 <= n - P when n >= 1.
        alpha: propagation magnitude (0: plain pruning), finite (NaN / Inf raise ValueError).
        num_prefix: M prefix tokens, copied unchanged, 0 <= M <= N.
        sizes: optional (B, N) float32 token sizes, propagated like x.

    Returns:
        x_out: (B, M + n - P, C) in x's dtype: the prefix tokens, then for each r
            x[M + i] + alpha * sum over slots s of row i = keep[r] whose neighbour j is not
            kept of weight[i, s] * x[M + j]. Computed in float32 (float64 for float64 x). A
            kept row that absorbs nothing is x[M + i] copied (bit for bit). NaN / Inf values
            in x, sizes or weight propagate by this arithmetic; nothing is rejected.
        sizes_out: (B, M + n - P) float32, the same for sizes; an empty (0,) tensor when
            sizes is None.
        index_out: (B, n - P, W) int32: row keep[r] restricted to kept neighbours, each
            replaced by its position in keep, compacted in slot order, -1 padded.
        weight_out: (B, n - P, W) float32: the weights of those slots, 0 at padding.
    """
    # The entry checks read tensor data; under torch.compile they would break the graph.
    values = not torch.compiler.is_compiling()
    check_propagate_args(x, index, weight, keep, alpha, num_prefix, sizes, values=values)
    b, big_n, _ = x.shape
    n = big_n - num_prefix
    kept = keep.shape[1]
    width = index.shape[2]

    # Old image position -> new position (-1: propagated). A length-n map per image.
    new_pos = torch.full((b, n), -1, dtype=torch.int64, device=x.device)
    order = torch.arange(kept, device=x.device).expand(b, kept)
    new_pos.scatter_(1, keep, order)

    # The rows of the kept tokens, and what each slot's neighbour becomes.
    rows_index = index.long().gather(1, keep.unsqueeze(-1).expand(-1, -1, width))  # (B, R, W)
    rows_weight = weight.gather(1, keep.unsqueeze(-1).expand(-1, -1, width))
    valid = rows_index >= 0
    nbr = rows_index.clamp(min=0)
    nbr_new = new_pos.gather(1, nbr.flatten(1)).view_as(nbr)
    survives = valid & (nbr_new >= 0)  # slot kept in the graph
    absorbs = valid & (nbr_new < 0)  # slot whose neighbour is propagated into this row

    def summarise(t: torch.Tensor) -> torch.Tensor:
        # t: (B, N, C) -> (B, M + R, C) in the compute dtype.
        img = t[:, num_prefix:]
        out = _gather_rows(img, keep)
        if alpha == 0:  # plain pruning: nothing is added (not even 0 * inf)
            return torch.cat([t[:, :num_prefix], out], dim=1)
        acc = torch.zeros(b, kept, t.shape[-1], dtype=t.dtype, device=t.device)
        for s in range(width):  # slot by slot: memory O(B R C), no (B, R, W, C) temporary
            contrib = rows_weight[:, :, s, None].to(t.dtype) * _gather_rows(img, nbr[:, :, s])
            acc = acc + torch.where(absorbs[:, :, s, None], contrib, 0)
        # A row that absorbs nothing is copied: no x + alpha * 0 (which turns -0.0 into +0.0).
        gets = absorbs.any(dim=-1, keepdim=True)  # (B, R, 1)
        return torch.cat([t[:, :num_prefix], torch.where(gets, out + alpha * acc, out)], dim=1)

    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_out = summarise(x.to(compute)).to(x.dtype)
    if sizes is not None:
        sizes_out = summarise(sizes.unsqueeze(-1)).squeeze(-1)
    else:
        sizes_out = torch.empty(0, dtype=torch.float32, device=x.device)

    # Compact the surviving slots to the front of each row, keeping their order.
    slot_order = torch.sort((~survives).to(torch.int8), dim=-1, stable=True).indices
    survives = survives.gather(-1, slot_order)
    index_out = torch.where(survives, nbr_new.gather(-1, slot_order), -1).to(torch.int32)
    weight_out = torch.where(survives, rows_weight.gather(-1, slot_order), 0.0)
    return x_out, sizes_out, index_out.contiguous(), weight_out.contiguous()
