"""Reference token selection (SPEC 3): the P lowest scores are propagated, the rest kept."""

from __future__ import annotations

import torch

from gtp_kernels.reference._checks import check_dim, check_dtype, check_in_range

_OP = "gtp.select_tokens"


def check_select_tokens_args(score: torch.Tensor, num_prop: int) -> None:
    """Same checks, same messages as the C++ kernel (the errors name the argument)."""
    check_dim(_OP, score, "score", 2)
    check_dtype(_OP, score, "score", torch.float32)
    n = score.shape[1]
    check_in_range(_OP, "num_prop", num_prop, 0, n - 1, "[0, n - 1]")


def select_tokens(score: torch.Tensor, num_prop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split image tokens into kept and propagated ones by importance score.

    Args:
        score: (B, n) float32 importance of each image token. Any values: they rank
            -inf < finite < +inf < NaN (all NaNs equal, -0.0 == +0.0), as torch.sort orders
            them, so NaN scores are kept first; nothing is rejected (no device sync).
        num_prop: P, tokens to propagate, 0 <= P <= n - 1.

    Returns:
        keep: (B, n - P) int64, ascending positions of the kept tokens.
        prop: (B, P) int64, ascending positions of the P lowest-scoring tokens. Among equal
            scores the lower position is kept, i.e. the order is (score, -position).
    """
    check_select_tokens_args(score, num_prop)
    b, n = score.shape
    # One canonical NaN: torch.sort on CUDA ranks a NaN with the sign bit set below every number
    # (on the CPU above them, the rule's order); the order is then the same on every device.
    score = torch.where(score.isnan(), float("nan"), score)
    # Stable ascending sort of the reversed row: equal scores come out highest position first,
    # so the P first entries are the P lowest scores with ties going to the higher position.
    # torch.sort puts NaN after +inf and keeps NaNs in their (stable) order: the rule above.
    order = torch.sort(score.flip(-1), dim=-1, stable=True).indices
    order = (n - 1) - order
    prop = order[:, :num_prop].sort(dim=-1).values
    keep = order[:, num_prop:].sort(dim=-1).values
    return keep.contiguous(), prop.contiguous()
