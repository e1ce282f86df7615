"""select_tokens: public wrapper and fake kernel of torch.ops.gtp.select_tokens."""

from __future__ import annotations

import torch

from gtp_kernels import reference
from gtp_kernels._extension import extension_available
from gtp_kernels.ops._backend import resolve_backend, triton_op


def select_tokens(
    score: torch.Tensor, num_prop: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept and propagated image tokens by importance score (SPEC 3).

    Args:
        score: (B, n) float32; ranks -inf < finite < +inf < NaN (NaN scores are kept first).
        num_prop: P tokens propagated per row, 0 <= P <= n - 1.
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference".

    Returns:
        keep (B, n - P) int64 and prop (B, P) int64, both ascending positions. The P lowest
        scores are propagated; among equal scores the lower position is kept.
    """
    which = resolve_backend("select_tokens", backend, score.device)
    if which == "compiled":
        return torch.ops.gtp.select_tokens(score, num_prop)
    if which == "triton":
        return triton_op("select_tokens")(score, num_prop)
    return reference.select_tokens(score, num_prop)


def select_tokens_fake(score, num_prop):
    """Fake (meta) kernel of every op with gtp::select_tokens' schema."""
    torch._check(score.dim() == 2, lambda: "gtp.select_tokens: score must have 2 dimensions")
    b, n = score.shape
    torch._check(
        0 <= num_prop <= n - 1, lambda: "gtp.select_tokens: num_prop must be in [0, n - 1]"
    )
    return (
        score.new_empty((b, n - num_prop), dtype=torch.int64),
        score.new_empty((b, num_prop), dtype=torch.int64),
    )


if extension_available():
    torch.library.register_fake("gtp::select_tokens", select_tokens_fake)
