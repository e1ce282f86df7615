"""build_graph: public wrapper, fake kernel and (empty) autograd of torch.ops.gtp.build_graph."""

from __future__ import annotations

import torch

from gtp_kernels import reference
from gtp_kernels._extension import extension_available
from gtp_kernels.ops._backend import resolve_backend, triton_op
from gtp_kernels.reference.build_graph import GRAPH_TYPES, graph_width


def build_graph(
    tokens: torch.Tensor,
    height: int,
    width: int,
    num_neighbours: int,
    graph: str,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token graph of the image tokens (SPEC 1), sparse ELL.

    Args:
        tokens: (B, n, C) float32/float16/bfloat16/float64 image tokens (no prefix tokens),
            row-major on a height x width grid, height * width == n.
        num_neighbours: K semantic neighbours per token, 0 <= K <= n - 1.
        graph: "spatial", "semantic" or "mixed".
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference".

    Returns:
        index (B, n, W) int32 ascending neighbours then -1; weight (B, n, W) float32
        1 / sqrt(d_i d_j), 0 at padding. W = 8, K or 8 + K. Neither carries a gradient.
    """
    which = resolve_backend("build_graph", backend, tokens.device)
    args = (tokens, height, width, num_neighbours, graph)
    if which == "compiled":
        return torch.ops.gtp.build_graph(*args)
    if which == "triton":
        return triton_op("build_graph")(*args)
    return reference.build_graph(*args)


def build_graph_fake(tokens, height, width, num_neighbours, graph):
    """Fake (meta) kernel of every op with gtp::build_graph's schema."""
    torch._check(tokens.dim() == 3, lambda: "gtp.build_graph: tokens must have 3 dimensions")
    if graph not in GRAPH_TYPES:
        raise ValueError(
            f"gtp.build_graph: graph must be 'spatial', 'semantic' or 'mixed', got {graph!r}"
        )
    b, n = tokens.shape[0], tokens.shape[1]
    torch._check(
        height * width == n,
        lambda: "gtp.build_graph: height * width must equal the number of tokens n",
    )
    torch._check(
        0 <= num_neighbours <= n - 1,
        lambda: "gtp.build_graph: num_neighbours must be in [0, n - 1]",
    )
    w = graph_width(graph, num_neighbours)
    return (
        tokens.new_empty((b, n, w), dtype=torch.int32),
        tokens.new_empty((b, n, w), dtype=torch.float32),
    )


def _build_graph_setup_context(ctx, inputs, output):
    # The graph is piecewise constant in the tokens: no gradient flows through it.
    ctx.mark_non_differentiable(*output)


def _build_graph_backward(ctx, grad_index, grad_weight):
    return None, None, None, None, None


def register_build_graph_autograd(op: str) -> None:
    """No gradient through the graph, for every op with gtp::build_graph's schema."""
    torch.library.register_autograd(
        op, _build_graph_backward, setup_context=_build_graph_setup_context
    )


if extension_available():
    torch.library.register_fake("gtp::build_graph", build_graph_fake)
    register_build_graph_autograd("gtp::build_graph")
