"""build_graph in Triton (SPEC 1): the spatial / semantic / mixed token graph in ELL form.

Kernels, in launch order (a semantic or mixed graph with K > 0 runs the first three and the
last; the spatial graph and K = 0 run _spatial_rows_kernel and _weights_kernel):
  _normalise_kernel   E^T (B, C, n) float32, the unit tokens as columns: each token scaled by a
                      power of two so that no finite token overflows, then divided by its norm,
                      as the reference does (reference.build_graph.normalised_tokens;
                      csrc/common/build_graph.h pow2_split). A token holding NaN or Inf becomes
                      a column of NaN.
  _similarity_kernel  S (B, n, ld) float32 = E E^T, one TILE x TILE tile per program, only the
                      tiles on and above the diagonal: a tile (i, j) is also stored transposed
                      as (j, i). Half the arithmetic of the full product.
  _select_kernel      BLOCK_R rows of S per program: each row's K-th most similar key by an
                      exact search, ties to the lower index, the union with the grid
                      neighbours for a mixed graph, written in ascending order by a prefix sum,
                      -1 padded; the row's out-degree into a (B, n) scratch.
  _spatial_rows_kernel  the 8-neighbourhood from the grid alone, and degrees.
  _weights_kernel     W[i, j] = 1 / sqrt(d_i d_j) in float64, rounded once to float32.

Similarities. S[i, j] = E_i . E_j is accumulated one channel at a time in channel order, by
explicit outer products (a fused multiply-add per channel on a GPU), not with tl.dot: every
(i, j) then goes through the same operations in the same order, so two identical tokens get
bitwise identical similarities and an exact tie stays exact, whichever tile or place in it they
fall in (and the transposed store is exact too: a * b == b * a). tl.dot cannot promise that:
under the Triton interpreter it is numpy's BLAS matmul, which rounds a column differently by
its position in the tile (measured: duplicated columns of a 16 x 256 product differ in the last
bit), and with float32 inputs a GPU would run it on the same FMA units (input_precision="ieee";
TF32 is not float32-accurate). It is the CUDA kernel's arithmetic (csrc/cuda/build_graph.cu,
fmaf in channel order).

Why two kernels for S and the selection. The product wants each thread to hold many rows of one
column (the rows' values are broadcast through shared memory once per channel); the selection
wants each warp to own whole rows (its row sums are then shuffles within the warp). Triton
derives a tile's layout from its loads, so one kernel gets one of the two: fused, either the
product reloads every column value once per row held (36 loads per 32 FMAs, measured in the
PTX) or every bisection step sums 32 rows across 8 warps through shared memory (200-255
registers, spills). Split, each kernel gets its layout from its own loads, and S costs one
write and one read of B n ld float32 (DeiT-B at batch 256: 42 MB each way), against a product
halved by symmetry.

Selection. A row's keys (gtp_kernels.triton._common.order_key: -inf < finite < +inf < NaN, so
a token holding NaN or Inf, whose similarities are NaN, ranks as the most similar) are held in
registers and searched for the K-th largest, t: for K <= 16 by removing the row maximum K
times, else bit by bit from the top (32 steps of a compare and a row count). Every key above t
is taken, then the keys equal to t at the lowest columns (a prefix count), so ties go to the
lower index. The row's own column and the padding never count. Exact, no atomics,
deterministic.

Limits. n <= MAX_SEMANTIC_TOKENS = 1024 (a 32 x 32 grid: ViT at 512 px with 16-pixel patches)
for a semantic or mixed graph with K > 0, since a row of S lives in registers; larger grids
raise a ValueError naming tokens.shape[1]. The spatial graph takes any n, every graph any C.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

from gtp_kernels.ops.build_graph import build_graph_fake, register_build_graph_autograd
from gtp_kernels.reference.build_graph import check_build_graph_args, graph_width
from gtp_kernels.triton._common import (
    check_device,
    check_dtype,
    launch,
    next_pow2,
    order_key,
    qualified,
    recording_launches,
    register,
)

_OP = "build_graph"

MAX_SEMANTIC_TOKENS = 1024
TILE = 64  # similarities per program: a TILE x TILE tile of S
_INT32_MIN = tl.constexpr(-2147483648)
_EXTRACT_MAX_K = tl.constexpr(16)  # the select kernel's K-th key: extraction up to here
_INF = tl.constexpr(float("inf"))

# The kernels do not specialize their shape integers (Triton's default specializes integers on
# 1 and on multiples of 16): nothing gains from it, and each value would compile anew.


# ---------------------------------------------------------------------------------- normalise


@triton.jit
def _pow2_f32(k):
    """2.0 ** k as float32 for integer k in [-149, 127] (subnormal below -126), from the bits."""
    normal = (tl.maximum(k + 127, 0) << 23).to(tl.float32, bitcast=True)
    subnormal = (1 << tl.minimum(tl.maximum(k + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(k >= -126, normal, subnormal)


@triton.jit
def _pow2_f64(k):
    """2.0 ** k as float64 for integer k in [-1022, 1023], from the bits."""
    return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit(do_not_specialize=["n", "channels"])
def _normalise_kernel(
    x_ptr,
    et_ptr,
    n,
    channels,
    stride_b,
    stride_n,
    stride_c,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """E^T[b, :, t] = u / max(||u||, 1e-12) with u = x[b, t] * 2^-ex, max |u| in [0.5, 1)
    (ex: the frexp exponent of max |x|; the scaling is exact for normal results and rounds
    once otherwise, as the reference's float64 product rounded to float32). ||u||^2 is the
    float64 sum of squares of x (exact squares of float32 values) times 2^-2ex. A token holding
    NaN or Inf gets NaN."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK_T)
    b = (pid // blocks).to(tl.int64)
    toks = (pid % blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < n
    x_tok = x_ptr + b * stride_b + toks.to(tl.int64) * stride_n
    et_img = et_ptr + b * channels * n

    # Pass 1: max |x| over the finite entries, whether any entry is NaN / Inf, sum of squares.
    peak = tl.zeros([BLOCK_T], dtype=tl.float32)
    bad = tl.zeros([BLOCK_T], dtype=tl.int32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float64)
    for c0 in range(0, channels, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        mask = tok_ok[:, None] & (ch < channels)[None, :]
        ptrs = x_tok[:, None] + ch.to(tl.int64)[None, :] * stride_c
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # upcast right after the load
        a = tl.abs(v)
        finite = a < _INF  # false for +-inf and NaN
        bad = tl.maximum(bad, tl.max((~finite).to(tl.int32), axis=1))
        peak = tl.maximum(peak, tl.max(tl.where(finite, a, 0.0), axis=1))
        v64 = v.to(tl.float64)
        sumsq += tl.sum(v64 * v64, axis=1)

    # frexp exponent of peak (peak = f * 2^ex, f in [0.5, 1)): from the float's exponent bits,
    # a subnormal peak first scaled up by 2^64 (exact). A zero token keeps ex = 0.
    tiny = peak < 1.1754943508222875e-38  # below float32's smallest normal
    scaled = peak * tl.where(tiny, 18446744073709551616.0, 1.0)
    ex = ((scaled.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126 - tl.where(tiny, 64, 0)
    ex = tl.where(peak > 0.0, ex, 0)
    # 2^-ex as two factors, each a float32 (csrc/common/build_graph.h, pow2_split)
    e1 = tl.where(ex > 0, 0, (-ex) // 2)
    s1 = _pow2_f32(e1)
    s2 = _pow2_f32(-ex - e1)
    norm = tl.sqrt(sumsq * _pow2_f64(-2 * ex)).to(tl.float32)  # sqrt.rn.f64, one rounding
    denom = tl.where(bad != 0, 1.0, tl.maximum(norm, 1e-12))  # a bad token's is unused

    # Pass 2: scale, divide (correctly rounded, as the reference: x / |x| = +-1 exactly).
    for c0 in range(0, channels, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        mask = tok_ok[:, None] & (ch < channels)[None, :]
        ptrs = x_tok[:, None] + ch.to(tl.int64)[None, :] * stride_c
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        u = v * s1[:, None] * s2[:, None]
        e = tl.math.div_rn(u, tl.broadcast_to(denom[:, None], u.shape))
        e = tl.where(bad[:, None] != 0, float("nan"), e)  # (no NaN global: triton's JIT
        # compares globals by ==, and NaN != NaN reads as 'changed since compiled')
        tl.store(et_img + ch.to(tl.int64)[None, :] * n + toks[:, None], e, mask=mask)


# --------------------------------------------------------------------------------- similarity


@triton.jit(do_not_specialize=["n", "channels"])
def _similarity_kernel(et_ptr, sim_ptr, n, channels, ld, TILE: tl.constexpr):
    """Tile (ti, tj), ti <= tj, of S = E E^T of image b: S[b, i, j] for i in tile ti and j in
    tile tj, and (ti < tj) the same values at S[b, j, i]. S rows have stride ld >= n. The grid
    is image-major, so an image's tiles run together and its E^T is read from memory once."""
    tiles = tl.cdiv(n, TILE)
    pid = tl.program_id(0)
    b = (pid // (tiles * tiles)).to(tl.int64)
    ti = pid // tiles % tiles
    tj = pid % tiles
    if tj >= ti:
        rows = ti * TILE + tl.arange(0, TILE)
        cols = tj * TILE + tl.arange(0, TILE)
        # One channel at a time in channel order (see the module docstring). Channel c + 1's
        # values are loaded while channel c's products are summed, so that a load is in flight
        # during the FMAs (the values reach every thread through shared memory, and ptxas
        # moves no load across that barrier).
        sim = tl.zeros([TILE, TILE], dtype=tl.float32)
        et_c = et_ptr + b * channels * n  # channel c's row of E^T: a 64-bit pointer
        a = tl.load(et_c + rows, mask=rows < n, other=0.0)
        e = tl.load(et_c + cols, mask=cols < n, other=0.0)
        for c in range(1, channels + 1):
            et_c += n
            a_next = tl.load(et_c + rows, mask=(rows < n) & (c < channels), other=0.0)
            e_next = tl.load(et_c + cols, mask=(cols < n) & (c < channels), other=0.0)
            sim += a[:, None] * e[None, :]
            a, e = a_next, e_next
        sim_img = sim_ptr + b * n * ld
        tl.store(sim_img + rows[:, None] * ld + cols[None, :], sim,
                 mask=(rows < n)[:, None] & (cols < n)[None, :])  # fmt: skip
        if tj > ti:
            tl.store(sim_img + cols[None, :] * ld + rows[:, None], sim,
                     mask=(rows < n)[:, None] & (cols < n)[None, :])  # fmt: skip


# ------------------------------------------------------------------------------------- select


@triton.jit
def _count(mask):
    """[R, BLOCK_N] bool -> [R] int32: how many are true in each row. Counted in float32 (exact
    up to 2^24): LLVM rewrites an integer sum of booleans into a popcount of the booleans packed
    into an integer, which the NVPTX backend builds in local memory (a stack frame on sm_90)."""
    return tl.sum(tl.where(mask, 1.0, 0.0), axis=1).to(tl.int32)


@triton.jit
def _kth_key_by_bisection(key, k):
    """[R, BLOCK_N] keys -> [R]: the K-th largest of each row, bit by bit from the top (the sign
    bit first: the keys are signed), 32 steps of a compare and a row count."""
    t = tl.where(_count(key >= 0) >= k, 0, _INT32_MIN)
    for step in range(31):
        trial = t | (1 << (30 - step))
        t = tl.where(_count(key >= trial[:, None]) >= k, trial, t)
    return t


@triton.jit
def _kth_key_by_extraction(key, k):
    """[R, BLOCK_N] keys -> [R]: the K-th largest of each row by removing the row's maximum,
    with all its copies, until K keys are gone: K steps of a row max and a row count. In the
    sm_90 code of a 16 x 256 block a step is 312 instructions and a bisection step 227, so this
    is the cheaper search up to K = 23 (8 steps for the default K = 8, instead of 32)."""
    t = tl.max(key, axis=1)
    left = tl.zeros_like(t) + k
    for _ in range(k):
        top = tl.max(key, axis=1)
        copies = key == top[:, None]
        t = tl.where(left > 0, top, t)
        left -= _count(copies)
        key = tl.where(copies, _INT32_MIN, key)
    return t


# ld stays specialized: it is a multiple of 16, which lets the compiler vectorise the row loads
# (and lay the tile out as 4 columns a thread, warps on rows).
@triton.jit(do_not_specialize=["n", "height", "width", "num_neighbours", "slots"])
def _select_kernel(
    sim_ptr,
    index_ptr,
    deg_ptr,
    n,
    ld,
    height,
    width,
    num_neighbours,
    slots,
    MIXED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows of image b: their K most similar tokens (ties to the lower index; united with the
    grid neighbours when MIXED), ascending, -1 padded, and degrees."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK_R)
    b = (pid // blocks).to(tl.int64)
    rows = (pid % blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n
    # candidates: j < n, j != i; INT32_MIN (below order_key(-inf)) elsewhere, so that no count
    # below includes the row's own column or the padding
    cand = row_ok[:, None] & (cols < n)[None, :] & (rows[:, None] != cols[None, :])
    row_ptr = sim_ptr + (b * n + rows.to(tl.int64)) * ld
    s = tl.load(row_ptr[:, None] + cols[None, :], mask=cand, other=0.0)
    key = tl.where(cand, order_key(s), _INT32_MIN)

    # t: each row's K-th largest key, counting copies (the largest value with at least K keys
    # >= t). (A row past n has no candidate: its t is INT32_MIN and nothing of it is taken.)
    if num_neighbours <= _EXTRACT_MAX_K:
        t = _kth_key_by_extraction(key, num_neighbours)
    else:
        t = _kth_key_by_bisection(key, num_neighbours)

    # Every key above t, then the keys equal to t at the lowest columns: ties to the lower index.
    # (A candidate is a key above INT32_MIN: no mask tile stays live through the search.)
    cand = key > _INT32_MIN
    above = key > t[:, None]
    tied = cand & (key == t[:, None])
    need = num_neighbours - _count(above)
    take = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= need[:, None]))
    if MIXED:  # edges in both graphs count once
        dr = rows[:, None] // width - cols[None, :] // width
        dc = rows[:, None] % width - cols[None, :] % width
        take = take | (cand & (dr <= 1) & (dr >= -1) & (dc <= 1) & (dc >= -1))

    # The row's neighbours in ascending order: slot = how many are taken at lower columns.
    slot = tl.cumsum(take.to(tl.int32), axis=1) - 1
    deg = _count(take)
    out = index_ptr + (b * n + rows.to(tl.int64)) * slots
    # (slot < slots always holds; the bound keeps the store inside the row by construction)
    tl.store(out[:, None] + slot, cols[None, :], mask=take & (slot < slots))
    # -1 padding: a mixed row has at least K neighbours, so at most 8 slots stay empty.
    pad = deg[:, None] + tl.arange(0, 8)[None, :]
    tl.store(out[:, None] + pad, -1, mask=row_ok[:, None] & (pad < slots))
    tl.store(deg_ptr + b * n + rows, deg, mask=row_ok)


# ----------------------------------------------------------------------------- spatial rows


@triton.jit(do_not_specialize=["total_rows", "n", "height", "width"])
def _spatial_rows_kernel(
    index_ptr,
    deg_ptr,
    total_rows,
    n,
    height,
    width,
    BLOCK_R: tl.constexpr,
):
    """Rows of the spatial graph (8 slots): the 8-neighbourhood on the row-major grid, in
    ascending order (the 3 x 3 offsets taken row by row), -1 padded, and degrees."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < total_rows
    i = (rows % n).to(tl.int32)
    r = i // width
    c = i % width
    off = tl.arange(0, 16)  # the 9 offsets of a 3 x 3 window, padded to 16
    rr = r[:, None] + off[None, :] // 3 - 1
    cc = c[:, None] + off[None, :] % 3 - 1
    near = (off < 9) & (off != 4)
    near = near[None, :] & (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
    taken = near.to(tl.int32)
    slot = tl.cumsum(taken, axis=1) - 1
    deg = tl.sum(taken, axis=1)
    out = index_ptr + rows * 8
    tl.store(out[:, None] + slot, rr * width + cc, mask=near & row_ok[:, None])
    pad = deg[:, None] + tl.arange(0, 8)[None, :]
    tl.store(out[:, None] + pad, -1, mask=row_ok[:, None] & (pad < 8))
    tl.store(deg_ptr + rows, deg, mask=row_ok)


# ---------------------------------------------------------------------------------- weights


@triton.jit(do_not_specialize=["total", "n", "slots"])
def _weights_kernel(index_ptr, deg_ptr, weight_ptr, total, n, slots, BLOCK: tl.constexpr):
    """weight = 1 / sqrt(d_i d_j) in float64 (exact product of integers, IEEE sqrt and
    division), rounded once to float32 as the reference does; 0 at padding."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    j = tl.load(index_ptr + offs, mask=ok, other=-1)
    row = offs // slots  # b * n + i
    d_i = tl.load(deg_ptr + row, mask=ok, other=1)
    d_j = tl.load(deg_ptr + (row - row % n) + j, mask=ok & (j >= 0), other=1)
    d = tl.maximum(d_i * d_j, 1).to(tl.float64)  # exact; padding (unused) clamped to 1
    w = (1.0 / tl.sqrt(d)).to(tl.float32)
    tl.store(weight_ptr + offs, tl.where(j >= 0, w, 0.0), mask=ok)


# --------------------------------------------------------------------------------- launcher


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Blocks of _select_kernel: BLOCK_R rows per program, BLOCK_N >= n columns, num_warps."""

    block_r: int
    block_n: int
    num_warps: int


# Per row width BLOCK_N: each thread holds 32 keys (BLOCK_R * BLOCK_N / (32 * num_warps)),
# which with the search's state compiles without spills on sm_80 and sm_90 (benchmarks/
# notes_triton_build_graph.md). The row load puts 32 lanes x 4 columns on a row and the
# remaining warps on rows, so up to 128 columns a row's sums stay within a warp.
_SELECT_CONFIGS = {
    32: SelectConfig(block_r=32, block_n=32, num_warps=1),
    64: SelectConfig(block_r=32, block_n=64, num_warps=2),
    128: SelectConfig(block_r=32, block_n=128, num_warps=4),
    256: SelectConfig(block_r=16, block_n=256, num_warps=4),
    512: SelectConfig(block_r=8, block_n=512, num_warps=4),
    1024: SelectConfig(block_r=8, block_n=1024, num_warps=8),
}
SELECT_CONFIGS = tuple(_SELECT_CONFIGS.values())


def select_config(n: int) -> SelectConfig:
    """The configuration the launcher picks for n image tokens (semantic or mixed graph)."""
    block_n = next_pow2(n, 32)
    if block_n > MAX_SEMANTIC_TOKENS:
        raise ValueError(
            f"gtp.{_OP}: the Triton backend builds semantic and mixed graphs of at most "
            f"{MAX_SEMANTIC_TOKENS} image tokens (a row of similarities is held in registers), "
            f"got tokens.shape[1] = {n}; use backend='cpu', 'cuda' or 'reference'"
        )
    return _SELECT_CONFIGS[block_n]


_forced: SelectConfig | None = None


@contextlib.contextmanager
def forced_select_config(config: SelectConfig):
    """Make the launcher use `config` (its block_n may exceed next_pow2(n): padding columns
    are masked), so that tests can run every configuration on small problems."""
    global _forced
    saved, _forced = _forced, config
    try:
        yield
    finally:
        _forced = saved


_NORMALISE_BLOCKS = dict(BLOCK_T=32, BLOCK_C=64)
_SIMILARITY_WARPS = 2
_SPATIAL_BLOCK_R = 128
_WEIGHTS_BLOCK = 1024


def _semantic_rows(tokens, height, width, k, graph, index, deg):
    """index and deg of a semantic or mixed graph (K > 0): normalise, similarities, select."""
    b, n, channels = tokens.shape
    config = select_config(n) if _forced is None else _forced
    if config.block_n < n:
        raise ValueError(f"gtp.{_OP}: {config} holds fewer than n = {n} columns")
    dev = tokens.device
    if channels == 0:
        # Zero-channel tokens: every similarity is 0. One zero channel gives exactly that and
        # keeps every pointer valid.
        et = torch.zeros((b, 1, n), dtype=torch.float32, device=dev)
    else:
        et = torch.empty((b, channels, n), dtype=torch.float32, device=dev)
        launch(
            _normalise_kernel,
            (b * triton.cdiv(n, _NORMALISE_BLOCKS["BLOCK_T"]),),
            tokens,
            et,
            n,
            channels,
            tokens.stride(0),
            tokens.stride(1),
            tokens.stride(2),
            **_NORMALISE_BLOCKS,
        )
    ld = triton.cdiv(n, 16) * 16  # S's row stride: aligned rows for the select kernel
    sim = torch.empty((b, n, ld), dtype=torch.float32, device=dev)
    tiles = triton.cdiv(n, TILE)
    launch(
        _similarity_kernel,
        (b * tiles * tiles,),
        et,
        sim,
        n,
        et.shape[1],
        ld,
        num_warps=_SIMILARITY_WARPS,
        TILE=TILE,
    )
    launch(
        _select_kernel,
        (b * triton.cdiv(n, config.block_r),),
        sim,
        index,
        deg,
        n,
        ld,
        height,
        width,
        k,
        index.shape[2],
        num_warps=config.num_warps,
        MIXED=graph == "mixed",
        BLOCK_R=config.block_r,
        BLOCK_N=config.block_n,
    )


def build_graph(
    tokens: torch.Tensor, height: int, width: int, num_neighbours: int, graph: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token graph of the image tokens (SPEC 1), as gtp::build_graph.

    Args:
        tokens: (B, n, C) float32 / float16 / bfloat16 image tokens, any strides, on a
            height x width row-major grid (height * width == n). A token holding NaN or Inf
            has NaN similarity to every token, which ranks as the most similar.
        num_neighbours: K, 0 <= K <= n - 1 (n <= 1024 for a semantic or mixed graph, K > 0).
        graph: "spatial", "semantic" or "mixed".

    Returns:
        index (B, n, W) int32: row i's neighbours ascending, then -1; W = 8, K or 8 + K.
        weight (B, n, W) float32: 1 / sqrt(d_i d_j) of the out-degrees, 0 at padding.
    """
    check_build_graph_args(tokens, height, width, num_neighbours, graph)
    check_dtype(_OP, tokens, "tokens")
    if not recording_launches():
        check_device(_OP, tokens)
    b, n, _ = tokens.shape
    slots = graph_width(graph, num_neighbours)
    dev = tokens.device
    index = torch.empty((b, n, slots), dtype=torch.int32, device=dev)
    weight = torch.empty((b, n, slots), dtype=torch.float32, device=dev)
    if b == 0 or slots == 0:
        return index, weight
    deg = torch.empty((b, n), dtype=torch.int32, device=dev)
    if graph == "spatial" or num_neighbours == 0:
        launch(
            _spatial_rows_kernel,
            (triton.cdiv(b * n, _SPATIAL_BLOCK_R),),
            index,
            deg,
            b * n,
            n,
            height,
            width,
            BLOCK_R=_SPATIAL_BLOCK_R,
        )
    else:
        _semantic_rows(tokens, height, width, num_neighbours, graph, index, deg)
    total = b * n * slots
    launch(
        _weights_kernel,
        (triton.cdiv(total, _WEIGHTS_BLOCK),),
        index,
        deg,
        weight,
        total,
        n,
        slots,
        BLOCK=_WEIGHTS_BLOCK,
    )
    return index, weight


register(_OP, build_graph, build_graph_fake, dtype_arg="tokens")
register_build_graph_autograd(qualified(_OP))
