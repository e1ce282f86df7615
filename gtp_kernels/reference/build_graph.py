"""Reference token graph (SPEC 1): spatial, semantic or mixed, stored sparse (ELL).

The oracle for torch.ops.gtp.build_graph. It builds a dense (B, n, n) adjacency internally
(readable, obviously correct); only the sparse (B, n, W) graph leaves the function.
"""

from __future__ import annotations

import torch

from gtp_kernels.reference._checks import FLOATING, check_dim, check_dtype, check_in_range, fail

GRAPH_TYPES = ("spatial", "semantic", "mixed")
SPATIAL_WIDTH = 8  # at most 8 grid neighbours

_OP = "gtp.build_graph"


def graph_width(graph: str, num_neighbours: int) -> int:
    """Slots per row W: 8 (spatial), K (semantic), 8 + K (mixed)."""
    if graph == "spatial":
        return SPATIAL_WIDTH
    if graph == "semantic":
        return num_neighbours
    return SPATIAL_WIDTH + num_neighbours


def check_build_graph_args(
    tokens: torch.Tensor, height: int, width: int, num_neighbours: int, graph: str
) -> None:
    """Same checks, same messages as the C++ kernel (the errors name the argument)."""
    check_dim(_OP, tokens, "tokens", 3)
    check_dtype(_OP, tokens, "tokens", *FLOATING)
    n = tokens.shape[1]
    if graph not in GRAPH_TYPES:
        fail(_OP, f"graph must be 'spatial', 'semantic' or 'mixed', got {graph!r}")
    if height < 1 or width < 1 or height * width != n:
        fail(
            _OP,
            f"height * width must equal the number of tokens n = {n} (tokens.shape[1]), "
            f"got height={height}, width={width}",
        )
    check_in_range(_OP, "num_neighbours", num_neighbours, 0, n - 1, "[0, n - 1]")


def spatial_adjacency(height: int, width: int, device=None) -> torch.Tensor:
    """(n, n) bool 8-neighbourhood of a row-major height x width grid, no self loops."""
    t = torch.arange(height * width, device=device)
    row, col = t // width, t % width
    near = ((row[:, None] - row[None, :]).abs() <= 1) & ((col[:, None] - col[None, :]).abs() <= 1)
    return near & (t[:, None] != t[None, :])


def normalised_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, n, C) any floating dtype -> (B, n, C) float32 unit rows E^ (zero rows stay 0).

    Overflow-free for every finite token: first u = x * 2^-E with max_c |u_c| in [0.5, 1)
    (E: the frexp exponent of max_c |x_c|), computed exactly in float64 and rounded once to
    float32 (so float32 tokens near 1e30, float64 tokens beyond float32's range and subnormal
    tokens normalise correctly); then u / max(||u||, 1e-12) in float32 (the clamp only acts on
    a zero token, which stays 0). For tokens in float32's normal range the power-of-two scaling
    changes no bit, so this is x / ||x||. 2^-E is applied as two factors 2^e1 * 2^e2, each in
    range (E > 0: e1 = 0; else -E split in halves), as csrc/common/build_graph.h's pow2_split.
    Rows of tokens holding NaN or Inf are NaN.
    """
    xd = tokens.double()
    if xd.shape[-1] == 0:
        return tokens.float()
    peak = xd.abs().amax(dim=-1, keepdim=True)  # NaN / inf for a non-finite token
    finite = torch.isfinite(peak)
    _, ex = torch.frexp(torch.where(finite & (peak > 0), peak, 1.0))  # peak = f * 2^ex
    e1 = torch.where(ex > 0, 0, torch.div(-ex, 2, rounding_mode="floor"))
    one = torch.ones_like(peak)
    u = (xd * torch.ldexp(one, e1) * torch.ldexp(one, -ex - e1)).float()
    u = torch.where(finite, u, float("nan"))
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def semantic_adjacency(tokens: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """(B, n, n) bool: row i marks its K most cosine-similar tokens j != i (ties: lower j).

    S = E^ E^T in float32 (normalised_tokens). A token holding NaN or Inf has NaN similarity
    to every token (set explicitly, not left to the matmul), and NaN ranks as the most similar
    (-inf < finite < +inf < NaN, as torch.sort orders it); its own row then links to the K
    lowest other indices.

    Ties are decided on the computed float32 similarities: among equal values the lower index
    wins, on every backend. Mathematically equal similarities of different tokens (duplicates)
    can come out an ulp apart, because a BLAS GEMM rounds a dot product differently depending
    on the column's place in its kernel (measured: identical unit vectors as columns 3 and 5 of
    a 7 x 7 product differ in the last bit); such near-ties may go either way, as any rounding
    difference may. Ties are exact, hence always to the lower index, where the arithmetic is
    exact (one-hot tokens, C = 1) and among non-finite tokens.
    """
    b, n, _ = tokens.shape
    e = normalised_tokens(tokens)
    sim = e @ e.transpose(1, 2)
    bad = e.isnan().any(dim=-1)  # (B, n)
    sim = torch.where(bad[:, :, None] | bad[:, None, :], float("nan"), sim)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # never its own neighbour
    # A stable descending sort keeps equal similarities in ascending j: lower j wins the tie
    # (NaN first, then +inf, ..., then -inf: the rule's order).
    order = torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., :num_neighbours]
    adj = torch.zeros(b, n, n, dtype=torch.bool, device=tokens.device)
    adj.scatter_(-1, order, True)
    return adj


def ell_from_adjacency(adj: torch.Tensor, width_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, n, n) bool adjacency -> ELL (index (B, n, W) int32, weight (B, n, W) float32).

    Neighbours in ascending j, then -1 / 0 padding. weight = 1 / sqrt(d_i d_j) with d the row
    sums (out-degrees), computed in float64 and rounded once to float32.
    """
    b, n, _ = adj.shape
    pos = torch.arange(n, device=adj.device)
    key = torch.where(adj, pos, n)  # non-edges sort after every edge
    key = key.sort(dim=-1).values[..., :width_slots]
    if key.shape[-1] < width_slots:  # W > n (e.g. spatial graph of a tiny grid)
        key = torch.nn.functional.pad(key, (0, width_slots - key.shape[-1]), value=n)
    valid = key < n
    index = torch.where(valid, key, -1)
    deg = adj.sum(dim=-1).to(torch.float64)  # (B, n)
    deg_j = torch.gather(deg, 1, index.clamp_min(0).reshape(b, -1)).reshape(b, n, width_slots)
    w = (1.0 / torch.sqrt(deg[:, :, None] * deg_j)).to(torch.float32)
    weight = torch.where(valid, w, torch.zeros((), dtype=torch.float32, device=adj.device))
    return index.to(torch.int32), weight


def build_graph(
    tokens: torch.Tensor, height: int, width: int, num_neighbours: int, graph: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token graph of the image tokens (SPEC 1).

    Args:
        tokens: (B, n, C) float32/float16/bfloat16/float64 image tokens (no prefix tokens) on a
            height x width grid in row-major order (token t at row t // width, col t % width).
            Any values: a token holding NaN or Inf is not rejected; it has NaN similarity to
            every token, which ranks as the most similar (semantic_adjacency). The weights
            depend only on degrees and stay finite.
        height, width: grid size, height * width == n.
        num_neighbours: K, semantic neighbours per token, 0 <= K <= n - 1.
        graph: "spatial" (8-neighbourhood), "semantic" (K most cosine-similar tokens, ties to
            the lower index) or "mixed" (union; an edge in both counts once).

    Returns:
        index: (B, n, W) int32, row i's neighbours in ascending order then -1 padding;
            W = 8 (spatial), K (semantic), 8 + K (mixed).
        weight: (B, n, W) float32, 1 / sqrt(d_i d_j) with d the out-degrees; 0 at padding.
    """
    check_build_graph_args(tokens, height, width, num_neighbours, graph)
    b, n, _ = tokens.shape
    w_slots = graph_width(graph, num_neighbours)
    dev = tokens.device
    if b == 0:
        return (
            torch.empty(0, n, w_slots, dtype=torch.int32, device=dev),
            torch.empty(0, n, w_slots, dtype=torch.float32, device=dev),
        )
    adj = torch.zeros(b, n, n, dtype=torch.bool, device=dev)
    if graph in ("spatial", "mixed"):
        adj |= spatial_adjacency(height, width, dev)
    if graph in ("semantic", "mixed"):
        adj |= semantic_adjacency(tokens, num_neighbours)
    return ell_from_adjacency(adj, w_slots)
