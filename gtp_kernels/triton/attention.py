"""attention in Triton (SPEC 2, 3): proportional attention, the exact top-theta N^2 threshold per
(image, head), masking, A @ V and the importance scores, never writing the (B, H, N, N)
probabilities to global memory.

Four kernels, every one over (BLOCK_M query rows) x (BLOCK_N keys) tiles of one (image, head):

1. `_attention_stats_kernel`, a program per (query block, image x head): the row maximum m and
   the row sum l of exp(s - m) over all keys, online (s = scale * q.k + log_sizes[key]).
2. `_attention_threshold_kernel`, a program per (image, head), only when kk > 0: the exact
   kk-th smallest of the tile's N^2 float32 probabilities p = exp(s - m) / l, by a radix select
   over their bits: p is in [0, 1], so its float32 pattern has the top two bits clear and five
   passes of 6-bit digits (a 64-bin tl.histogram per pass, exact integer counts, restricted
   to the entries matching the digits found so far) find the key of the kk-th smallest. NaN
   probabilities get the largest key (-inf < finite < +inf < NaN, as torch.kthvalue orders
   them); tau is NaN only if the kk-th smallest is NaN.
3. `_attention_out_kernel`, a program per (query block, image x head): p again, A = p with the
   entries p < tau zeroed (entries equal to tau stay, rows are not renormalised), out = A @ v,
   and the score pieces of its rows: the diagonal A[i, i], row 0 (CLS) and the column sums of
   its query block (partial sums: no atomics).
4. `_attention_score_kernel`, a program per (image, block of image tokens): the column sums
   over the query blocks in a fixed order, and the pieces combined over heads into the score
   (csrc/common/attention.h's combine_score: the max over heads propagates NaN).

Every pass computes s and p with the same helper, the same tile shapes and the same warps, so
the threshold is the exact kk-th smallest of the very probabilities that are masked (the kernel's
own float32 values, not the reference's; they agree to float32 rounding).

Precision: the logits accumulate in float32 (tensor-core MMA with float32 accumulation for
float16 / bfloat16 q, k; float32 fused multiply-adds for float32 inputs, never TF32).
A @ v for float16 / bfloat16 v splits A into two halves in v's dtype (hi + lo, with float16 A
scaled by 2^15 first so that small probabilities stay normal), two MMAs: float32-accurate
probabilities times v, the error of the reference that upcasts to float32. float32 A @ v runs
as three TF32 products (tf32x3, ~2^-21 relative; see PV_PRECISION). The Triton interpreter
computes bfloat16 dots wrongly (GPU_NOTES.md), so under the interpreter bfloat16 tiles are
upcast and multiplied in float32 (same values: bf16 products are exact in float32).

Non-finite values follow the project's rule (the reference's docstring): a row whose logits
hold NaN or +inf, or are all -inf, is NaN in the whole row; NaN entries are never zeroed and a
NaN tau zeroes nothing; the scores propagate NaN (the max over heads as torch.amax).
Deterministic: no atomics, every reduction in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gtp_kernels.ops.attention import attention_fake, out_like, register_autograd
from gtp_kernels.reference.attention import check_attention_args, num_masked
from gtp_kernels.triton._common import (
    INTERPRETER,
    check_device,
    check_dtype,
    launch,
    nan_max,
    next_pow2,
    qualified,
    recording_launches,
    register,
    store_cast,
)

_OP = "attention"
MAX_HEAD_DIM = 256
NAN_KEY = tl.constexpr(0x3FFFFFFF)  # above every probability's bits (1.0 is 0x3F800000)
# The threshold's digits: RADIX_LEVELS digits of RADIX_BITS cover the 30 bits of a probability's
# key. Few bins, more passes: Triton's histogram costs about (log2(bins) ballots + bins / 32
# popcounts) per element and thread, so 1024 bins (32 a lane) made each pass ~10x the cost of
# recomputing the tile's probabilities (measured on an H200: the threshold kernel took 6.8 ms
# for DeiT-B batch 256 fp16 with three 10-bit passes, the whole theta = 1 op 0.55 ms); 64 bins
# (two a lane) cost a few operations an element.
RADIX_BITS = tl.constexpr(6)
NUM_BINS = tl.constexpr(64)
RADIX_LEVELS = tl.constexpr(5)
# How the logits are computed (_logits, and A @ v in _attention_out_kernel): the LOGITS value of
# a configuration (ints for the launcher, the same values as constexprs for the kernels).
MMA, DOT_F32, LOOP_F32 = 0, 1, 2
MMA_LOGITS = tl.constexpr(MMA)
DOT_F32_LOGITS = tl.constexpr(DOT_F32)
LOOP_F32_LOGITS = tl.constexpr(LOOP_F32)
# float32 A @ v: three TF32 tensor-core products (hi*hi + hi*lo + lo*hi), float32-accurate
# to ~2^-21 relative. A float32 dot on FMA units ("ieee") spilled 8-16 B in some JIT
# specializations of every tile tried. The interpreter ignores the setting (numpy float32).
PV_PRECISION = tl.constexpr("tf32x3")
FP16_SCALE = 32768.0  # 2^15: float16 A * 2^15 <= 32768 stays normal down to A ~ 2^-29

# Score strategies: what the combine kernel computes (KIND) and over heads (MEAN).
_KINDS = {"mixed": 0, "diag": 1, "colsum": 2, "cls": 3, "sum": 4}


@triton.jit
def _logits(
    q,
    q_base,
    k_base,
    ls_base,
    offs_m,
    offs_n,
    n_tok,
    d,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    stride_ln,
    scale,
    HAS_LS: tl.constexpr,
    LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """s = scale * q k^T + log_sizes[key] for a (BLOCK_M, BLOCK_N) tile in float32; keys past N
    are -inf.

    q: the (BLOCK_M, BLOCK_D) query tile as loaded. LOGITS picks how the product runs:
    - MMA_LOGITS: tl.dot in q's dtype (float16 / bfloat16 tensor cores, float32 accumulation);
    - DOT_F32_LOGITS: tl.dot of float32 tiles (input_precision "ieee", never TF32). What the
      Triton interpreter runs for float32 and bfloat16 (its bfloat16 dot is wrong).
    - LOOP_F32_LOGITS: a loop of rank-1 updates over d, one fused multiply-add per entry and
      step, in the tile's own layout. What a GPU runs for float32: Triton's float32 tl.dot on
      FMA units keeps K-long operand rows per thread and spilled in every tile configuration
      tried (the threshold kernel with its histogram worst, 4 KB of stack), while this needs
      the tile and two vectors. The interpreter runs it ~10x slower than a dot, so CI runs it
      on small cases (tests force it through `config`).
    """
    kmask_n = offs_n < n_tok
    if LOGITS == LOOP_F32_LOGITS:
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        qmask_m = offs_m < n_tok
        for c in range(0, d):
            qc = tl.load(q_base + offs_m * stride_qn + c * stride_qd, mask=qmask_m, other=0.0)
            kc = tl.load(k_base + offs_n * stride_kn + c * stride_kd, mask=kmask_n, other=0.0)
            s += qc.to(tl.float32)[:, None] * kc.to(tl.float32)[None, :]
    else:
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=kmask_n[:, None] & (offs_d[None, :] < d),
            other=0.0,
        )
        if LOGITS == DOT_F32_LOGITS:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
    s = s * scale  # after the product, as the reference (mm, then scale)
    if HAS_LS:
        ls = tl.load(ls_base + offs_n * stride_ln, mask=offs_n < n_tok, other=0.0)
        s = s + ls[None, :]
    return tl.where(offs_n[None, :] < n_tok, s, float("-inf"))


@triton.jit
def _probs(s, m, row_sum):
    """p = exp(s - m) / l with m, l the row statistics of _attention_stats_kernel."""
    return tl.exp(s - m[:, None]) / row_sum[:, None]


@triton.jit
def _load_q(q_base, offs_m, offs_d, n_tok, d, stride_qn, stride_qd):
    """The query tile for tensor-core dots (float32 dots read their own chunks in _logits, and
    the compiler drops this load as unused)."""
    qmask = (offs_m[:, None] < n_tok) & (offs_d[None, :] < d)
    return tl.load(
        q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=qmask, other=0.0
    )


@triton.jit
def _attention_stats_kernel(
    q_ptr,
    k_ptr,
    ls_ptr,
    m_ptr,
    l_ptr,
    n_tok,
    d,
    heads,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_lb,
    stride_ln,
    scale,
    HAS_LS: tl.constexpr,
    LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row max m and row sum l of exp(s - m) of one query block, (B * H, N) float32 each."""
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = _load_q(q_base, offs_m, offs_d, n_tok, d, stride_qn, stride_qd)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    ls_base = ls_ptr + b * stride_lb  # a stand-in tensor, never read, without log sizes
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_tok, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _logits(
            q, q_base, k_base, ls_base, offs_m, offs_n, n_tok, d, stride_qn, stride_qd,
            stride_kn, stride_kd, stride_ln, scale, HAS_LS, LOGITS, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        # A NaN logit makes the row max NaN (tl.max would skip it), hence the row NaN.
        has_nan = tl.max((s != s).to(tl.int32), axis=1) > 0
        m_new = tl.where(has_nan | (m_i != m_i), float("nan"), tl.maximum(m_i, tl.max(s, axis=1)))
        # Rows that are all -inf so far subtract 0 instead (exp(-inf - -inf) would be NaN).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), axis=1)
        m_i = m_new
    rows = bh * n_tok + offs_m
    tl.store(m_ptr + rows, m_i, mask=offs_m < n_tok)
    tl.store(l_ptr + rows, l_i, mask=offs_m < n_tok)


@triton.jit
def _attention_threshold_kernel(
    q_ptr,
    k_ptr,
    ls_ptr,
    m_ptr,
    l_ptr,
    tau_ptr,
    n_tok,
    d,
    heads,
    kk,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_lb,
    stride_ln,
    scale,
    HAS_LS: tl.constexpr,
    LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """tau of one (image, head): the kk-th smallest (1-based) of its N x N probabilities."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // heads
    h = bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    ls_base = ls_ptr + b * stride_lb  # a stand-in tensor, never read, without log sizes
    prefix = 0  # the digits of tau's key found so far
    rank = kk  # tau's rank among the keys that match them
    # A loop, not unrolled: one copy of the tile code keeps the kernel small for ptxas. At the
    # first level every key matches (keys < 2^30, prefix 0).
    for level in range(0, RADIX_LEVELS):
        shift = (RADIX_LEVELS - 1 - level) * RADIX_BITS
        hist = tl.zeros([NUM_BINS], tl.int32)
        for qstart in range(0, n_tok, BLOCK_M):
            offs_m = qstart + tl.arange(0, BLOCK_M)
            q = _load_q(q_base, offs_m, offs_d, n_tok, d, stride_qn, stride_qd)
            m = tl.load(m_ptr + bh * n_tok + offs_m, mask=offs_m < n_tok, other=0.0)
            row_sum = tl.load(l_ptr + bh * n_tok + offs_m, mask=offs_m < n_tok, other=1.0)
            for kstart in range(0, n_tok, BLOCK_N):
                offs_n = kstart + tl.arange(0, BLOCK_N)
                s = _logits(
                    q, q_base, k_base, ls_base, offs_m, offs_n, n_tok, d, stride_qn, stride_qd,
                    stride_kn, stride_kd, stride_ln, scale, HAS_LS, LOGITS, BLOCK_M, BLOCK_N,
                    BLOCK_D,
                )  # fmt: skip
                p = _probs(s, m, row_sum)
                key = tl.where(p != p, NAN_KEY, p.to(tl.int32, bitcast=True))
                valid = (offs_m[:, None] < n_tok) & (offs_n[None, :] < n_tok)
                valid = valid & ((key >> (shift + RADIX_BITS)) == prefix)
                digit = (key >> shift) & (NUM_BINS - 1)
                hist += tl.histogram(
                    tl.reshape(digit, [BLOCK_M * BLOCK_N]),
                    NUM_BINS,
                    mask=tl.reshape(valid, [BLOCK_M * BLOCK_N]),
                )
        cum = tl.cumsum(hist, axis=0)
        bucket = tl.sum((cum < rank).to(tl.int32), axis=0)  # the first bin reaching rank
        rank -= tl.max(tl.where(cum < rank, cum, 0), axis=0)
        prefix = prefix * NUM_BINS + bucket
    tau = tl.where(prefix == NAN_KEY, float("nan"), prefix.to(tl.float32, bitcast=True))
    tl.store(tau_ptr + bh, tau)


@triton.jit
def _attention_out_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ls_ptr,
    m_ptr,
    l_ptr,
    tau_ptr,
    out_ptr,
    diag_ptr,
    cls_ptr,
    col_ptr,
    n_tok,
    d,
    dv,
    heads,
    num_qblocks,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_lb,
    stride_ln,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    scale,
    HAS_LS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    LOGITS: tl.constexpr,
    SPLIT_PV: tl.constexpr,
    PV_SCALE: tl.constexpr,
    NEED_DIAG: tl.constexpr,
    NEED_COL: tl.constexpr,
    NEED_CLS: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """out = A @ v for one query block, and its score pieces (diagonal, CLS row, column sums)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n_tok
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = _load_q(q_base, offs_m, offs_d, n_tok, d, stride_qn, stride_qd)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    ls_base = ls_ptr + b * stride_lb  # a stand-in tensor, never read, without log sizes
    m = tl.load(m_ptr + bh * n_tok + offs_m, mask=row_ok, other=0.0)
    row_sum = tl.load(l_ptr + bh * n_tok + offs_m, mask=row_ok, other=1.0)
    if HAS_MASK:
        tau = tl.load(tau_ptr + bh)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    diag = tl.zeros([BLOCK_M], tl.float32)
    for kstart in range(0, n_tok, BLOCK_N):
        offs_n = kstart + tl.arange(0, BLOCK_N)
        s = _logits(
            q, q_base, k_base, ls_base, offs_m, offs_n, n_tok, d, stride_qn, stride_qd,
            stride_kn, stride_kd, stride_ln, scale, HAS_LS, LOGITS, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        a = _probs(s, m, row_sum)
        if HAS_MASK:
            a = tl.where(a < tau, 0.0, a)  # IEEE: NaN entries and a NaN tau zero nothing
        # Padding rows and keys leave every sum (a NaN row would reach padding keys too).
        a = tl.where(row_ok[:, None] & (offs_n[None, :] < n_tok), a, 0.0)
        vmask = (offs_n[:, None] < n_tok) & (offs_dv[None, :] < dv)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, mask=vmask)
        if SPLIT_PV:
            # a = hi + lo in v's dtype: two MMAs carry ~2x the mantissa of one.
            a_scaled = a * PV_SCALE
            hi = a_scaled.to(v.dtype)
            lo = (a_scaled - hi.to(tl.float32)).to(v.dtype)
            acc += tl.dot(hi, v)
            acc += tl.dot(lo, v)
        else:
            acc += tl.dot(a, v.to(tl.float32), input_precision=PV_PRECISION)
        if NEED_DIAG:
            on_diag = offs_m[:, None] == offs_n[None, :]
            diag += tl.sum(tl.where(on_diag, a, 0.0), axis=1)
        if NEED_COL:
            col = tl.sum(a, axis=0)
            tl.store(col_ptr + (bh * num_qblocks + qb) * n_tok + offs_n, col, mask=offs_n < n_tok)
        if NEED_CLS:
            if qb == 0:
                row0 = tl.sum(tl.where(offs_m[:, None] == 0, a, 0.0), axis=0)
                tl.store(cls_ptr + bh * n_tok + offs_n, row0, mask=offs_n < n_tok)
    if SPLIT_PV:
        acc = acc * (1.0 / PV_SCALE)
    out_ptrs = (
        out_ptr
        + b * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_on
        + offs_dv[None, :] * stride_od
    )
    store_cast(out_ptrs, acc, row_ok[:, None] & (offs_dv[None, :] < dv), OUT_BF16)
    if NEED_DIAG:
        tl.store(diag_ptr + bh * n_tok + offs_m, diag, mask=row_ok)


@triton.jit
def _reduce_heads(x, r, first, MEAN: tl.constexpr):
    """One step of the max or sum over heads (csrc/common/attention.h's reduce_heads)."""
    if MEAN:
        return tl.where(first, x, r + x)
    return tl.where(first, x, nan_max(r, x))


@triton.jit
def _attention_score_kernel(
    diag_ptr,
    cls_ptr,
    col_ptr,
    score_ptr,
    n_tok,
    num_prefix,
    heads,
    num_qblocks,
    KIND: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """score[b, j - M] for a block of image tokens j, from the per-head pieces."""
    jb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = num_prefix + jb * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_tok
    gamma = tl.zeros([BLOCK], tl.float32)
    psi = tl.zeros([BLOCK], tl.float32)
    c = tl.zeros([BLOCK], tl.float32)
    for h in range(0, heads):
        bh = b * heads + h
        first = h == 0
        if KIND != 2 and KIND != 3:  # mixed, diag, sum: the diagonal
            g = tl.load(diag_ptr + bh * n_tok + offs, mask=ok, other=0.0)
            gamma = _reduce_heads(g, gamma, first, MEAN)
        if KIND == 0 or KIND == 2 or KIND == 4:  # mixed, colsum, sum: the column sums
            col = tl.zeros([BLOCK], tl.float32)
            for qb in range(0, num_qblocks):
                col += tl.load(col_ptr + (bh * num_qblocks + qb) * n_tok + offs, mask=ok, other=0.0)
            psi = _reduce_heads(col, psi, first, MEAN)
        if KIND == 3:
            x = tl.load(cls_ptr + bh * n_tok + offs, mask=ok, other=0.0)
            c = _reduce_heads(x, c, first, MEAN)
    if MEAN:
        gamma = gamma / heads
        psi = psi / heads
        c = c / heads
    if KIND == 0:
        result = gamma * psi
    elif KIND == 1:
        result = gamma
    elif KIND == 2:
        result = psi
    elif KIND == 3:
        result = c
    else:
        result = gamma + psi
    tl.store(score_ptr + b * (n_tok - num_prefix) + (offs - num_prefix), result, mask=ok)


def _config(dtype: torch.dtype, d: int, dv: int, interpreter: bool = INTERPRETER) -> dict:
    """Tiles, warps and the way logits are computed for a problem, on a GPU or under the
    interpreter. benchmarks/triton_resources.py compiles every GPU configuration for sm_80 /
    sm_90 and CI fails on a spill; tests run each one through `config`."""
    block_d = next_pow2(d, 16)
    block_dv = next_pow2(dv, 16)
    widest = max(block_d, block_dv)
    if interpreter:
        # numpy runs a tile op in about the same time for any tile size: large tiles make the
        # CPU tests fast. The GPU configurations below run in tests through `config`.
        logits = MMA if dtype == torch.float16 else DOT_F32  # its bfloat16 dot is wrong
        block_m, block_n, warps = 128, 128, 4
    elif dtype == torch.float32:
        # Every GPU configuration has zero spills on sm_80 and sm_90
        # (benchmarks/triton_resources.py --check, in CI).
        logits = LOOP_F32
        block_m, block_n, warps = 32, 16, 4
    else:
        logits = MMA
        if widest <= 64:
            block_m, block_n, warps = 64, 32, 4
        elif widest <= 128:
            block_m, block_n, warps = 32, 32, 8
        else:
            block_m, block_n, warps = 32, 16, 8
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": block_d,
        "BLOCK_DV": block_dv,
        "LOGITS": logits,
        "num_warps": warps,
    }


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sizes: torch.Tensor | None,
    scale: float,
    sparsity: float,
    num_prefix: int,
    score: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.gtp_triton.attention: `launch_attention` with the launcher's own tiles."""
    return launch_attention(q, k, v, log_sizes, scale, sparsity, num_prefix, score)


def launch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_sizes: torch.Tensor | None,
    scale: float,
    sparsity: float,
    num_prefix: int,
    score: str,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with proportional attention, top-theta N^2 masking and importance scores, as
    gtp::attention.

    Args:
        q, k: (B, H, N, d) float32 / float16 / bfloat16, any strides (timm's qkv views).
        v: (B, H, N, dv), q's dtype. d, dv <= 256.
        log_sizes: (B, N) float32 or None. scale, sparsity (theta), num_prefix, score: as
            gtp_kernels.ops.attention.
        config: entries that replace _config's choice (BLOCK_M, BLOCK_N, LOGITS, num_warps;
            tests use it to run every configuration the launcher can pick).

    Returns:
        out (B, H, N, dv) in q's dtype with (B, N, H, dv) memory; score (B, N - M) float32
        ((B, 0) for "none").
    """
    check_attention_args(q, k, v, log_sizes, scale, sparsity, num_prefix, score)
    check_dtype(_OP, q, "q")
    if not recording_launches():
        check_device(_OP, q)
    b, heads, n_tok, d = q.shape
    dv = v.shape[-1]
    for name, dim in (("q", d), ("v", dv)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(
                f"gtp.{_OP}: the Triton backend takes head dims up to {MAX_HEAD_DIM}, got "
                f"{name}.shape[-1] = {dim} (backend='cpu', 'cuda' or 'reference' take any)"
            )
    out = out_like(q, v)
    cols = 0 if score == "none" else n_tok - num_prefix
    result = torch.empty((b, cols), dtype=torch.float32, device=q.device)
    if b == 0 or n_tok == 0:
        return out, result

    cfg = dict(_config(q.dtype, d, dv), **(config or {}))
    block_m = cfg["BLOCK_M"]
    num_qblocks = triton.cdiv(n_tok, block_m)
    kk = num_masked(n_tok, sparsity)
    kind, _, reduce = score.partition("_")
    dev = q.device
    f32 = torch.float32
    stats = torch.empty((2, b * heads, n_tok), dtype=f32, device=dev)  # m, l
    tau = torch.empty((b * heads,), dtype=f32, device=dev)
    need_diag = kind in ("mixed", "diag", "sum")
    need_col = kind in ("mixed", "colsum", "sum")
    need_cls = kind == "cls"
    diag = torch.empty((b * heads, n_tok) if need_diag else (0,), dtype=f32, device=dev)
    cls_row = torch.empty((b * heads, n_tok) if need_cls else (0,), dtype=f32, device=dev)
    col = torch.empty((b * heads, num_qblocks, n_tok) if need_col else (0,), dtype=f32, device=dev)

    has_ls = log_sizes is not None
    ls_strides = (log_sizes.stride(0), log_sizes.stride(1)) if has_ls else (0, 0)
    # Without log sizes the kernels get a stand-in pointer (never read: HAS_LS is False), not
    # None: triton 3.6 cannot pass None on to a @triton.jit helper.
    ls_arg = log_sizes if has_ls else stats
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
    tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
    common = dict(HAS_LS=has_ls, LOGITS=cfg["LOGITS"], num_warps=cfg["num_warps"], **tiles)
    grid_rows = (num_qblocks, b * heads)

    launch(
        _attention_stats_kernel, grid_rows,
        q, k, ls_arg, stats[0], stats[1], n_tok, d, heads, *q_strides, *k_strides,
        *ls_strides, float(scale), **common,
    )  # fmt: skip
    if kk > 0:
        launch(
            _attention_threshold_kernel, (b * heads,),
            q, k, ls_arg, stats[0], stats[1], tau, n_tok, d, heads, kk, *q_strides,
            *k_strides, *ls_strides, float(scale), **common,
        )  # fmt: skip
    launch(
        _attention_out_kernel, grid_rows,
        q, k, v, ls_arg, stats[0], stats[1], tau, out, diag, cls_row, col, n_tok, d, dv,
        heads, num_qblocks, *q_strides, *k_strides, *v_strides, *ls_strides, *out.stride(),
        float(scale), HAS_MASK=kk > 0, SPLIT_PV=cfg["LOGITS"] == MMA,
        PV_SCALE=FP16_SCALE if q.dtype == torch.float16 else 1.0, NEED_DIAG=need_diag,
        NEED_COL=need_col, NEED_CLS=need_cls, OUT_BF16=q.dtype == torch.bfloat16,
        BLOCK_DV=cfg["BLOCK_DV"], **common,
    )  # fmt: skip
    if cols > 0:
        block = min(next_pow2(cols, 16), 256)
        launch(
            _attention_score_kernel, (triton.cdiv(cols, block), b),
            diag, cls_row, col, result, n_tok, num_prefix, heads, num_qblocks,
            KIND=_KINDS[kind], MEAN=reduce == "mean", BLOCK=block,
        )  # fmt: skip
    return out, result


register(_OP, attention, attention_fake, dtype_arg="q")
register_autograd(qualified(_OP))
