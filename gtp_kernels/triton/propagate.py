"""propagate in Triton (SPEC 4): kept image tokens absorb their propagated graph neighbours, the
propagated tokens are removed and the graph shrinks to the survivors.

Two launches, no atomics, deterministic (every output element is written by one program, every
sum runs in slot order, the reference's order):

1. `_position_map_kernel`, a program per (image, chunk of 1024 index entries): checks its
   chunk of the image's index entries (in [-1, n)); chunk 0 also builds the image's old -> new
   position map new_pos[b, keep[b, r]] = r (-1 for a propagated token; B n int32) and checks
   keep (entries in [0, n) and distinct: of two rows that wrote the same entry, the one whose
   write was lost reads the other's position back). One flag per program.
2. `_propagate_kernel`, the gather form: a program owns ROWS output rows, flattened over the
   batch, prefix rows included. It loads the graph rows of its kept tokens as one
   [ROWS, BLOCK_W] tile, looks their neighbours up in the map, writes the re-indexed graph rows
   (surviving slots compacted in slot order by a cumsum over the tile, -1 / 0 padding) and
   ranks the absorbing slots (a valid neighbour that is not kept) of each row. Then, channel
   block by channel block, it loops over the absorbing slots only (the t-th of every row at
   step t, as many steps as the most any row of the tile has; P W / n = 0.65 absorbing slots
   a row on average for DeiT at P = 8, W = 16), gathers w * x[neighbour] into a float32
   accumulator and writes x_i + alpha * acc, rounded once to x's dtype. A row that absorbs
   nothing (a prefix row, a kept row whose neighbours all survive, every row when alpha == 0)
   stores the x_i it loaded: a bit-for-bit copy. sizes go the same way, once a program.

Memory: x is read once (kept and prefix rows, plus the absorbed propagated rows, which the
programs of one image share through L2), x_out written once, the graph rows of the kept tokens
read and written once; on top, the position map (B n int32, written and read) and one more
read of index (the checks). benchmarks/notes_triton_propagate.md counts the bytes against the
floor.

Bad entries in index or keep never make a kernel read out of bounds (they are masked like empty
slots); the host reads the flags once after both launches and, if one is set, raises the
reference's ValueError (its checks name the entry). Not in three cases, where the host must not
read device data: inside `recording()` (meta tensors), while torch.compile traces, and during
CUDA graph capture. Then bad entries give unspecified values in the outputs but no error."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl

from gtp_kernels.ops.propagate import propagate_fake, register_propagate_autograd
from gtp_kernels.reference.propagate import check_propagate_args
from gtp_kernels.triton._common import (
    check_device,
    check_dtype,
    is_bf16,
    launch,
    next_pow2,
    qualified,
    recording_launches,
    register,
    round_bf16,
)

_OP = "propagate"


@triton.jit
def _build_position_map(keep_b, new_pos_b, n, kept, BLOCK: tl.constexpr):
    """new_pos_b[:n] = -1, then new_pos_b[keep_b[r]] = r. Returns 1 when a keep entry is
    outside [0, n) (not written) or repeated, else 0."""
    offs0 = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        tl.store(new_pos_b + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < n)
    # The barriers order the program's global writes and reads (the -1 fill, the scatter, the
    # read-back) across its threads, as __syncthreads does.
    tl.debug_barrier()
    bad = 0
    for start in range(0, kept, BLOCK):
        r = start + offs0
        k = tl.load(keep_b + r, mask=r < kept, other=0)
        ok = (k >= 0) & (k < n)
        bad |= tl.max(((r < kept) & ~ok).to(tl.int32), axis=0)
        tl.store(new_pos_b + k, r.to(tl.int32), mask=(r < kept) & ok)
    tl.debug_barrier()
    for start in range(0, kept, BLOCK):
        r = start + offs0
        k = tl.load(keep_b + r, mask=r < kept, other=0)
        ok = (r < kept) & (k >= 0) & (k < n)
        q = tl.load(new_pos_b + k, mask=ok, other=0)
        bad |= tl.max((ok & (q != r)).to(tl.int32), axis=0)  # a duplicate lost its write
    return bad


@triton.jit
def _position_map_kernel(
    keep_ptr,
    index_ptr,
    new_pos_ptr,
    bad_ptr,
    n,
    kept,
    entries,
    chunks,
    BLOCK: tl.constexpr,
):
    """Image b = program 0, chunk c = program 1 of `chunks`: bad[b, c] = 1 when one of the
    image's index entries [c BLOCK, (c + 1) BLOCK) is outside [-1, n), else 0. Chunk 0 also
    builds new_pos[b, :] from keep[b, :] and sets its flag for a bad keep row.
    keep: (B, kept) int64, index: (B, entries = n W) int32, new_pos: (B, n), all contiguous."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    j = tl.load(index_ptr + b * entries + offs, mask=offs < entries, other=0)
    bad = tl.max(((j < -1) | (j >= n)).to(tl.int32), axis=0)
    if chunk == 0:
        bad |= _build_position_map(keep_ptr + b * kept, new_pos_ptr + b * n, n, kept, BLOCK)
    tl.store(bad_ptr + b * chunks + chunk, bad)


@triton.jit
def _absorbed_slot(t, absorbs, rank, j, w_bits):
    """The t-th absorbing slot of each row of the graph tile, in slot order: its neighbour and
    its weight (picked through the weight's bits, so exactly: -0.0 and NaN payloads kept)."""
    pick = absorbs & (rank == t)
    j_t = tl.sum(tl.where(pick, j, 0), axis=1)
    w_t = tl.sum(tl.where(pick, w_bits, 0), axis=1).to(tl.float32, bitcast=True)
    return j_t, w_t


@triton.jit
def _propagate_kernel(
    x_ptr,
    index_ptr,
    weight_ptr,
    keep_ptr,
    new_pos_ptr,
    sizes_ptr,
    out_ptr,
    sizes_out_ptr,
    index_out_ptr,
    weight_out_ptr,
    alpha,
    total_rows,
    rows_out,
    num_prefix,
    big_n,
    n,
    kept,
    width,
    channels,
    stride_xb,
    stride_xn,
    HAS_SIZES: tl.constexpr,
    IS_BF16: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Output rows [program * ROWS, + ROWS) of the (B, M + kept) output flattened over the
    batch. x: (B, N, C) with unit channel stride; index, weight: (B, n, width), keep:
    (B, kept), new_pos: (B, n), sizes: (B, N), all contiguous; the outputs contiguous."""
    o_flat = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = o_flat < total_rows
    b = (o_flat // rows_out).to(tl.int64)
    o = o_flat % rows_out
    is_kept = live & (o >= num_prefix)
    r = o - num_prefix  # the kept row (where is_kept)
    i = tl.load(keep_ptr + b * kept + r, mask=is_kept, other=0)
    good = is_kept & (i >= 0) & (i < n)  # a bad keep entry is flagged; its row is not read
    src = tl.where(is_kept, num_prefix + i, o)  # the token each output row starts from
    readable = live & (good | ~is_kept)
    x_rows = x_ptr + b * stride_xb  # + token * stride_xn + channel

    # The graph rows of the kept tokens, and what each slot's neighbour became.
    slots = tl.arange(0, BLOCK_W)
    in_row = good[:, None] & (slots[None, :] < width)
    row_slot = (b * n + i)[:, None] * width + slots[None, :]
    j = tl.load(index_ptr + row_slot, mask=in_row, other=-1)
    w = tl.load(weight_ptr + row_slot, mask=in_row, other=0.0)
    valid = (j >= 0) & (j < n)  # an entry outside [-1, n) is flagged and counts as empty
    q = tl.load(new_pos_ptr + b[:, None] * n + j, mask=valid, other=-1)
    survives = q >= 0
    absorbs = valid & (q < 0) & (alpha != 0.0)  # alpha == 0: plain pruning, nothing added
    rank = tl.cumsum(absorbs.to(tl.int32), axis=1) - 1  # slot order among the absorbing ones
    count = tl.sum(absorbs.to(tl.int32), axis=1)
    steps = tl.max(count, axis=0)
    gets = count > 0
    w_bits = w.to(tl.int32, bitcast=True)

    # The graph row restricted to kept neighbours: surviving slots compacted to the front in
    # slot order, neighbours renamed to their new positions, -1 / 0 after them.
    dest = tl.cumsum(survives.to(tl.int32), axis=1) - 1
    kept_count = tl.sum(survives.to(tl.int32), axis=1)
    out_row = (b * kept + r)[:, None] * width
    tl.store(index_out_ptr + out_row + dest, q, mask=survives)
    tl.store(weight_out_ptr + out_row + dest, w, mask=survives)
    pad = is_kept[:, None] & (slots[None, :] < width) & (slots[None, :] >= kept_count[:, None])
    tl.store(index_out_ptr + out_row + slots[None, :], -1, mask=pad)
    tl.store(weight_out_ptr + out_row + slots[None, :], 0.0, mask=pad)

    # Every sum below runs over the absorbing slots in slot order, the t-th absorbing slot of
    # every row at step t; rows with fewer add 0, as the reference's
    # acc + where(absorbs, w * x_j, 0) does.
    if HAS_SIZES:
        s_rows = sizes_ptr + b * big_n
        s_acc = tl.zeros([ROWS], dtype=tl.float32)
        for t in range(0, steps):
            j_t, w_t = _absorbed_slot(t, absorbs, rank, j, w_bits)
            takes = count > t
            s_t = tl.load(s_rows + num_prefix + j_t, mask=takes, other=0.0)
            s_acc += tl.where(takes, w_t * s_t, 0.0)
        s_i = tl.load(s_rows + src, mask=readable, other=0.0)
        tl.store(sizes_out_ptr + o_flat, tl.where(gets, s_i + alpha * s_acc, s_i), mask=live)

    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols[None, :] < channels
        xi = tl.load(
            x_rows[:, None] + src[:, None] * stride_xn + cols, mask=readable[:, None] & cmask
        )
        acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        for t in range(0, steps):
            j_t, w_t = _absorbed_slot(t, absorbs, rank, j, w_bits)
            takes = count > t
            x_t = tl.load(
                x_rows[:, None] + (num_prefix + j_t).to(tl.int64)[:, None] * stride_xn + cols,
                mask=takes[:, None] & cmask,
                other=0.0,
            )
            acc += tl.where(takes[:, None], w_t[:, None] * x_t.to(tl.float32), 0.0)
        res = xi.to(tl.float32) + alpha * acc
        if IS_BF16:
            res = round_bf16(res)  # the interpreter's cast truncates; see _common.round_bf16
        # Rows that absorb nothing store the loaded x_i: a bit-for-bit copy.
        out = tl.where(gets[:, None], res.to(xi.dtype), xi)
        out_ptrs = out_ptr + o_flat.to(tl.int64)[:, None] * channels + cols
        tl.store(out_ptrs, out, mask=live[:, None] & cmask)


# ------------------------------------------------------------------------------- launcher


@dataclasses.dataclass(frozen=True)
class Config:
    """A program of _propagate_kernel: ROWS output rows, their graph rows as one
    [ROWS, BLOCK_W] tile, their channels in blocks of BLOCK_C, on num_warps warps."""

    rows: int
    block_c: int
    block_w: int
    num_warps: int


# Channel blocks, so that DeiT's C = 384 and 768 split into whole blocks (3 x 128, 3 x 256).
BLOCK_CS = (256, 128, 64, 32)
# Tiles of a program: at most 1024 x elements and 128 graph slots, at least 8 x elements a
# thread (one 16-byte vector of float16) on 1 to 4 warps. Larger tiles, or threads with fewer
# elements (ptxas then spills a register to reach full occupancy), spill on sm_80 or sm_90 in
# some configs (benchmarks/notes_triton_propagate.md).
X_TILE = 1024
GRAPH_TILE = 128
X_PER_THREAD = 8
MAP_BLOCK = 1024  # index entries a program of _position_map_kernel checks (8 a thread)
# Graph slots a row (8 + K for the mixed graph): a row's slots are one tile, which spills on
# sm_80 beyond 256 (512 slots: 8 bytes of stack).
MAX_WIDTH = 256

# Output rows are numbered in int32 (row * ROWS + offset never overflows below this).
_MAX_ROWS = 2**31 - 1 - X_TILE // min(BLOCK_CS)

_forced_block_c: int | None = None


def choose_config(channels: int, width: int) -> Config:
    """BLOCK_C: the fewest padded channels (ceil(C / BLOCK_C) BLOCK_C), on a tie the wider
    block (each row's channels in fewer pieces); ROWS: as many as both tiles allow; warps: as
    many as keep 8 x elements a thread."""
    # At least 8 slots: triton 3.6 fails to compile the slot scans (tl.cumsum along a row) of
    # 1-, 2- and 4-slot tiles in some specializations (an assertion in ScanOpToLLVM).
    block_w = next_pow2(width, 8)
    block_c = _forced_block_c or min(BLOCK_CS, key=lambda bc: (triton.cdiv(channels, bc) * bc, -bc))
    rows = max(1, min(X_TILE // block_c, GRAPH_TILE // block_w))
    warps = max(1, rows * block_c // (32 * X_PER_THREAD))
    return Config(rows=rows, block_c=block_c, block_w=block_w, num_warps=warps)


@contextlib.contextmanager
def force_block_c(block_c: int):
    """Make the launcher take channel blocks of `block_c` whatever C (tests of every config)."""
    global _forced_block_c
    assert block_c in BLOCK_CS, block_c
    saved, _forced_block_c = _forced_block_c, block_c
    try:
        yield
    finally:
        _forced_block_c = saved


def _host_may_read(x: torch.Tensor) -> bool:
    """Whether the launcher may read the error flags back (a device-to-host sync)."""
    if recording_launches() or torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def propagate(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    alpha: float,
    num_prefix: int,
    sizes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Propagate the removed image tokens into their kept graph neighbours (SPEC 4), as
    gtp::propagate (gtp_kernels/reference/propagate.py is the definition).

    Args:
        x: (B, N, C) float32 / float16 / bfloat16, any strides (copied first when the channel
            stride is not 1); M = num_prefix prefix tokens, then n = N - M image tokens.
        index: (B, n, W) int32 neighbours, -1 for an empty slot. weight: (B, n, W) float32.
        keep: (B, n - P) int64 distinct kept image positions, in output order.
        alpha: finite; 0 is plain pruning. num_prefix: M, 0 <= M <= N.
        sizes: optional (B, N) float32 token sizes, propagated like x.

    Returns:
        x_out (B, M + n - P, C) in x's dtype (accumulated in float32, rounded once; rows that
        absorb nothing copied bit for bit), sizes_out (B, M + n - P) float32 or an empty (0,)
        tensor when sizes is None, index_out (B, n - P, W) int32 and weight_out (B, n - P, W)
        float32: the graph restricted to the kept tokens, compacted, -1 / 0 padded.

    Raises the reference's ValueError for every bad argument. The checks of index and keep
    entries run in the first kernel and are read back once after both launches; they are
    skipped (no error, unspecified outputs for bad entries) while recording launches, while
    torch.compile traces and during CUDA graph capture, where the host cannot read the device.
    """
    check_propagate_args(x, index, weight, keep, alpha, num_prefix, sizes, values=False)
    check_dtype(_OP, x, "x")
    if not recording_launches():
        check_device(_OP, x)
    b, big_n, channels = x.shape
    n = big_n - num_prefix
    kept = keep.shape[1]
    width = index.shape[2]
    rows_out = num_prefix + kept
    x_out, sizes_out, index_out, weight_out = propagate_fake(
        x, index, weight, keep, alpha, num_prefix, sizes
    )
    if b == 0 or rows_out == 0:
        return x_out, sizes_out, index_out, weight_out

    if width > MAX_WIDTH:
        raise ValueError(
            f"gtp.{_OP}: the Triton kernel takes index with at most {MAX_WIDTH} slots a row "
            f"(W = 8 + K), got {width}; backend='cpu', 'cuda' or 'reference' take any W"
        )
    if b * rows_out > _MAX_ROWS:
        raise ValueError(
            f"gtp.{_OP}: the Triton kernel takes at most {_MAX_ROWS} output rows "
            f"B * (num_prefix + kept), got {b * rows_out}"
        )
    if x.stride(2) != 1 and channels > 1:
        x = x.contiguous()  # rows are read as vectors; batch and token strides are free
    index = index.contiguous()
    weight = weight.contiguous()
    keep = keep.contiguous()
    sizes = sizes.contiguous() if sizes is not None else None
    # Image tokens: the position map and the entry checks (none to map or check when n == 0,
    # then every output row is a prefix row).
    new_pos = torch.empty((b, n), dtype=torch.int32, device=x.device)
    chunks = max(1, triton.cdiv(n * width, MAP_BLOCK))
    bad = torch.empty((b, chunks), dtype=torch.int32, device=x.device)
    if n > 0:
        grid = (b, chunks)
        launch(
            _position_map_kernel,
            grid,
            keep,
            index,
            new_pos,
            bad,
            n,
            kept,
            n * width,
            chunks,
            BLOCK=MAP_BLOCK,
        )

    cfg = choose_config(channels, width)
    launch(
        _propagate_kernel,
        (triton.cdiv(b * rows_out, cfg.rows),),
        x,
        index,
        weight,
        keep,
        new_pos,
        sizes,
        x_out,
        sizes_out,
        index_out,
        weight_out,
        float(alpha),
        b * rows_out,
        rows_out,
        num_prefix,
        big_n,
        n,
        kept,
        width,
        channels,
        x.stride(0),
        x.stride(1),
        num_warps=cfg.num_warps,
        num_stages=1,
        HAS_SIZES=sizes is not None,
        IS_BF16=is_bf16(x),
        ROWS=cfg.rows,
        BLOCK_C=cfg.block_c,
        BLOCK_W=cfg.block_w,
    )
    if n > 0 and _host_may_read(x) and bool(bad.any()):
        # The flags only say that an entry is bad; the reference's checks say which, in the
        # words (and order) of every other backend.
        check_propagate_args(x, index, weight, keep, alpha, num_prefix, sizes)
        raise RuntimeError(
            "gtp.propagate: the Triton checks flagged an entry the reference accepts"
        )
    return x_out, sizes_out, index_out, weight_out


register(_OP, propagate, propagate_fake, dtype_arg="x")
register_propagate_autograd(qualified(_OP))
