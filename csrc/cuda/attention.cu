// gtp.attention on CUDA (SPEC 2, 3): proportional attention, the exact top-theta N^2 threshold,
// A @ V and the importance-score pieces, one thread block per (image, head) tile at a time.
//
// The (B, H, N, N) probabilities never reach global memory. A block owns one (b, h) tile; each
// warp owns 16 query rows (one m16 MMA row tile) and walks the keys 64 at a time, staged in
// shared memory by the whole block. Two exact modes, chosen per call from the device's shared
// memory:
//   resident    (N x N float32 fits: N <= ~200 on A100, ~236 on H100/H200; float32 math only)
//               pass 1: S = scale * Q K^T + log_sizes into shared memory, row maxima from the
//               MMA fragments; pass 2, per warp over its rows: e = exp(s - m) in place and
//               1 / sum(e). Probabilities are p = e * (1 / sum), computed on every read.
//   recompute   (any N): pass 1 computes each row's max and sum online (flash-attention style);
//               every later pass recomputes S tile by tile with the same instructions, so it
//               gets bitwise the same p = exp(s - m) * (1 / sum).
// Then, when kk = int(N * N * (1 - theta)) > 0: three radix passes over the tile's p (11, 11 and
// 9 bits of the float's bits, common/radix.h; counts in a 2048-bin shared histogram) give tau,
// the exact kk-th smallest p (ties kept: entries equal to tau stay). Last pass: p < tau -> 0,
// the diagonal and CLS-row pieces, column sums (per-warp partials reduced in a fixed order: no
// atomics in the result, so results are deterministic), and out = p @ V.
//
// Engines: tensor-core mma.sync m16n8k16 for float16 / bfloat16 (fp32 accumulation) with
// d <= 64 on sm_80+; P @ V multiplies P split into two halves (p = hi + lo, both in the
// input's dtype), so the product is float32-accurate (p is not rounded to float16/bfloat16).
// float32 / float64, and float16 / bfloat16 with d > 64, run an FMA engine in the same
// fragment layout (T = float64 for float64 inputs).
//
// The per-element arithmetic shared with the CPU kernel (common/attention.h, common/radix.h,
// and so exercised by the CPU tests): the threshold rank (num_masked), the probability keys
// (prob_key / key_prob), the digit levels and find_bucket, exp_nonpositive (the float32 exp of
// the softmax), and combine_score (how pieces become the score).
//
// Developer knobs (environment, read per call; not part of the API):
//   GTP_ATTENTION_CUDA_MODE=recompute   never use the resident mode
//   GTP_ATTENTION_CUDA_ENGINE=fma       the FMA engine for float16 / bfloat16 too
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "common/attention.h"
#include "common/op_args.h"
#include "common/radix.h"
#include "cuda/device.cuh"
#include "cuda/launch.h"

namespace gtp {
namespace {

#define OP "gtp.attention"

using attention::ScoreKind;
using attention::ScoreStrategy;

// 13 warps: N = 197 (a ViT at 224 px) is 13 row tiles of 16, one per warp; 416 threads leave
// 152 registers a thread.
constexpr int kMaxWarps = 13;
constexpr int kMaxThreads = 32 * kMaxWarps;
constexpr int kTileKeys = 64;     // keys staged per step
constexpr int kDvChunk = 64;      // output columns staged per final pass (8 n8 tiles)
// MMA engine: Q fragments of d <= 64 in registers (32 would spill at d = 128 under the
// 128-register budget of a 416-thread block); larger d runs the FMA engine.
constexpr int kMaxKSteps = 4;
constexpr float kHalfScale = 32768.0f;  // p * 2^15 in float16 avoids subnormals; undone at the end

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const float* ls;  // (B, N) contiguous, or nullptr
  int64_t sq[4], sk[4], sv[4];  // strides of (b, h, i, c)
  int64_t batch, heads, n_tok, d, dv, prefix, n_img;
  int d_pad;     // d rounded up to 16
  int ksteps;    // d_pad / 16
  int dv_chunks;  // max(1, ceil(dv / kChunk))
  int row_tiles, key_tiles, nwarps;
  bool resident;  // informational: the kernel's mode is its template argument
  double scale;
  int64_t kk;  // threshold rank; 0: no masking
  ScoreStrategy strategy;
  // shared memory carve-up (byte offsets) and staging strides (elements)
  uint32_t off_smap, off_kbuf, off_vbuf, off_qbuf, off_rowm, off_rowl, off_partial, off_hist,
      off_state;
  int ldk, ldv, ldq;
  void* out;     // (B, N, H, dv) memory
  void* pieces;  // (2, B, H, n_img) of T: [gamma or cls, psi]
};

// ---------------------------------------------------------------------------------------------
// Fragment layout of one warp's 16 x 16 block (rows r0 + 0..15, keys kb + 0..15), the C layout
// of two m16n8 MMA tiles, which is also the A layout of a k16 step of P @ V: element e of lane
// (g = lane / 4, t = lane % 4) is row g + 8 ((e >> 1) & 1), key 2 t + (e & 1) + 8 (e >> 2).

__device__ __forceinline__ int frag_row(int e, int g) { return g + 8 * ((e >> 1) & 1); }
__device__ __forceinline__ int frag_key(int e, int t) { return 2 * t + (e & 1) + 8 * (e >> 2); }

// ---------------------------------------------------------------------------------------------
// Tensor-core pieces (float16 / bfloat16, sm_80+)

template <typename S>
__device__ __forceinline__ uint32_t pack2(S lo, S hi) {
  uint16_t a, b;
  memcpy(&a, &lo, 2);
  memcpy(&b, &hi, 2);
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

template <typename S>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<S, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host never launches the MMA engine below compute capability 8.0
#endif
}

// p (two values of one A-fragment register) split into hi + lo in S: hi = S(x), lo = S(x - hi)
// with x = p * 2^15 for float16 (keeps small probabilities out of float16's subnormals) and
// x = p for bfloat16 (float32's exponent range). Both differences are exact in float32.
template <typename S>
__device__ __forceinline__ void split2(float p0, float p1, uint32_t& hi, uint32_t& lo) {
  const float s = std::is_same_v<S, __half> ? kHalfScale : 1.0f;
  const float x0 = p0 * s, x1 = p1 * s;
  const S h0 = cuda::Elem<S>::store(x0), h1 = cuda::Elem<S>::store(x1);
  const S l0 = cuda::Elem<S>::store(x0 - cuda::Elem<S>::load(h0));
  const S l1 = cuda::Elem<S>::store(x1 - cuda::Elem<S>::load(h1));
  hi = pack2(h0, h1);
  lo = pack2(l0, l1);
}

// ---------------------------------------------------------------------------------------------
// One tile's work. S: element type, T: compute type, kMma: tensor-core engine.

template <typename S, bool kMma, bool kRes>
struct TileWork {
  using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
  using KT = std::conditional_t<kMma, S, T>;  // staged K / V element type
  using AccT = std::conditional_t<kMma, float, T>;  // P @ V accumulators
  // Output columns per final pass: 64 (8 n8 tiles); 32 for float64, whose accumulators take
  // two registers each.
  static constexpr int kChunk = std::is_same_v<T, double> ? 32 : kDvChunk;
  static constexpr int kTiles = kChunk / 8;
  // Radix keys of a probability: the float's bits (float64: 63 bits, six digit levels).
  static constexpr bool kWide = std::is_same_v<T, double>;
  using Key = std::conditional_t<kWide, uint64_t, uint32_t>;
  static constexpr int kLevels = kWide ? radix::kProbLevels64 : radix::kProbLevels;
  static __device__ __forceinline__ radix::LevelT<Key> level_of(int lv) {
    if constexpr (kWide) {
      return radix::prob_level64(lv);
    } else {
      return radix::prob_level(lv);
    }
  }
  static __device__ __forceinline__ Key key_of(T x) {
    if constexpr (kWide) {
      return radix::prob_key64(x);
    } else {
      return attention::prob_key(x);
    }
  }
  static __device__ __forceinline__ T prob_of(Key k) {
    if constexpr (kWide) {
      return radix::key_prob64(k);
    } else {
      return attention::key_prob(k);
    }
  }

  const Params& p;
  unsigned char* smem;
  int warp, lane, g, t;
  int64_t b, h;
  const S* qb;
  const S* kb;
  const S* vb;
  const float* lsb;

  // Q fragments of the warp's current row tile (MMA engine only).
  uint32_t qa[kMaxKSteps][4];

  __device__ TileWork(const Params& params, unsigned char* sm, int64_t tile)
      : p(params), smem(sm) {
    warp = cuda::warp_uniform(static_cast<int>(threadIdx.x >> 5));
    lane = threadIdx.x & 31;
    g = lane >> 2;
    t = lane & 3;
    b = tile / p.heads;
    h = tile % p.heads;
    qb = static_cast<const S*>(p.q) + b * p.sq[0] + h * p.sq[1];
    kb = static_cast<const S*>(p.k) + b * p.sk[0] + h * p.sk[1];
    vb = static_cast<const S*>(p.v) + b * p.sv[0] + h * p.sv[1];
    lsb = p.ls != nullptr ? p.ls + b * p.n_tok : nullptr;
  }

  __device__ __forceinline__ T* smap() const { return reinterpret_cast<T*>(smem + p.off_smap); }
  __device__ __forceinline__ KT* kbuf() const { return reinterpret_cast<KT*>(smem + p.off_kbuf); }
  __device__ __forceinline__ KT* vbuf() const { return reinterpret_cast<KT*>(smem + p.off_vbuf); }
  __device__ __forceinline__ T* qbuf() const { return reinterpret_cast<T*>(smem + p.off_qbuf); }
  __device__ __forceinline__ T* rowm() const { return reinterpret_cast<T*>(smem + p.off_rowm); }
  __device__ __forceinline__ T* rowl() const { return reinterpret_cast<T*>(smem + p.off_rowl); }
  __device__ __forceinline__ T* partial() const {
    return reinterpret_cast<T*>(smem + p.off_partial);
  }
  // Column partials of warp w: resident, the first row of its first-round tile in the map.
  __device__ __forceinline__ T* partial_row(int w) const {
    return kRes ? smap() + w * 16 * static_cast<int>(p.n_tok)
                : partial() + w * static_cast<int>(p.n_tok);
  }
  __device__ __forceinline__ uint32_t* hist() const {
    return reinterpret_cast<uint32_t*>(smem + p.off_hist);
  }
  __device__ __forceinline__ cuda::SelectState* state() const {
    return reinterpret_cast<cuda::SelectState*>(smem + p.off_state);
  }
  __device__ __forceinline__ uint32_t* scan_scratch() const {
    return reinterpret_cast<uint32_t*>(smem + p.off_state + sizeof(cuda::SelectState));
  }

  __device__ __forceinline__ T load_q(int i, int c) const {
    return i < p.n_tok && c < p.d
               ? static_cast<T>(cuda::Elem<S>::load(qb[i * p.sq[2] + c * p.sq[3]]))
               : T(0);
  }

  // --- staging (whole block) -----------------------------------------------------------------

  // Keys [k0, k0 + 64) of K into kbuf (zeros past N and past d).
  __device__ __forceinline__ void stage_k(int k0) const {
    KT* buf = kbuf();
    for (int r = warp; r < kTileKeys; r += p.nwarps) {
      const int j = k0 + r;
      for (int c0 = 0; c0 < p.d_pad; c0 += 32) {
        const int c = c0 + lane;
        if (c < p.d_pad) {
          const KT v =
              j < p.n_tok && c < p.d ? to_kt(kb[j * p.sk[2] + c * p.sk[3]]) : KT(zero_kt());
          buf[r * p.ldk + c] = v;
        }
      }
    }
  }

  // Keys [k0, k0 + 64), columns [c0, c0 + 64) of V into vbuf: transposed (column-major, one
  // row per output column) for the MMA engine's B fragments, row-major for the FMA engine.
  __device__ __forceinline__ void stage_v(int k0, int c0) const {
    KT* buf = vbuf();
    for (int r = warp; r < kTileKeys; r += p.nwarps) {
      const int j = k0 + r;
      for (int cc = 0; cc < kChunk; cc += 32) {
        const int c = cc + lane;
        const int col = c0 + c;
        const KT v = j < p.n_tok && col < p.dv ? to_kt(vb[j * p.sv[2] + col * p.sv[3]])
                                               : KT(zero_kt());
        if constexpr (kMma) {
          buf[c * p.ldv + r] = v;
        } else {
          buf[r * p.ldv + c] = v;
        }
      }
    }
  }

  static __device__ __forceinline__ KT zero_kt() {
    if constexpr (kMma) {
      return cuda::Elem<S>::store(0.0f);
    } else {
      return T(0);
    }
  }
  static __device__ __forceinline__ KT to_kt(S x) {
    if constexpr (kMma) {
      return x;
    } else {
      return static_cast<T>(cuda::Elem<S>::load(x));
    }
  }

  // Q rows of row tile rt: MMA fragments into registers, or the FMA engine's per-warp buffer.
  __device__ __forceinline__ void load_q_tile(int rt) {
    const int r0 = rt * 16;
    if constexpr (kMma) {
#pragma unroll
      for (int ks = 0; ks < kMaxKSteps; ++ks) {
        if (ks < p.ksteps) {
          const int c = ks * 16 + 2 * t;
          const int ra = r0 + g, rb = r0 + g + 8;
          qa[ks][0] = pack2(q_elem(ra, c), q_elem(ra, c + 1));
          qa[ks][1] = pack2(q_elem(rb, c), q_elem(rb, c + 1));
          qa[ks][2] = pack2(q_elem(ra, c + 8), q_elem(ra, c + 9));
          qa[ks][3] = pack2(q_elem(rb, c + 8), q_elem(rb, c + 9));
        }
      }
    } else {
      T* buf = qbuf() + warp * 16 * p.ldq;
      for (int r = 0; r < 16; ++r) {
        for (int c0 = 0; c0 < p.d_pad; c0 += 32) {
          const int c = c0 + lane;
          if (c < p.d_pad) buf[r * p.ldq + c] = load_q(r0 + r, c);
        }
      }
      __syncwarp();
    }
  }

  __device__ __forceinline__ S q_elem(int i, int c) const {
    return i < p.n_tok && c < p.d ? qb[i * p.sq[2] + c * p.sq[3]] : cuda::Elem<S>::store(0.0f);
  }

  // --- S = scale * Q K^T + log_sizes for one 16 x 16 block (keys kl .. kl + 15 of kbuf) -------

  __device__ __forceinline__ void scores(int kl, int k0, T (&s)[8]) const {
    T dot[8];
    if constexpr (kMma) {
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      const KT* buf = kbuf();
#pragma unroll
      for (int ks = 0; ks < kMaxKSteps; ++ks) {
        if (ks < p.ksteps) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const KT* row = buf + (kl + nt * 8 + g) * p.ldk + ks * 16 + 2 * t;
            const uint32_t b0 = *reinterpret_cast<const uint32_t*>(row);
            const uint32_t b1 = *reinterpret_cast<const uint32_t*>(row + 8);
            mma16816<S>(acc[nt], qa[ks], b0, b1);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) dot[e] = acc[e >> 2][e & 3];
    } else {
      const T* qw = qbuf() + warp * 16 * p.ldq;
      const T* buf = kbuf();
#pragma unroll
      for (int e = 0; e < 8; ++e) dot[e] = T(0);
      for (int c = 0; c < p.d_pad; ++c) {
        const T qa0 = qw[g * p.ldq + c], qb0 = qw[(g + 8) * p.ldq + c];
#pragma unroll
        for (int e = 0; e < 8; e += 2) {  // e and e + 1: the same row, neighbouring keys
          const T k0v = buf[(kl + frag_key(e, t)) * p.ldk + c];
          const T k1v = buf[(kl + frag_key(e + 1, t)) * p.ldk + c];
          const T qv = (e >> 1) & 1 ? qb0 : qa0;
          dot[e] = fma(qv, k0v, dot[e]);
          dot[e + 1] = fma(qv, k1v, dot[e + 1]);
        }
      }
    }
    // scale * (q . k) + log_sizes[j]: a multiply and an add, each rounded (no FMA), as the
    // reference and the CPU kernel compute the logits after the GEMM. Without log sizes the add
    // is of +0.0 (it only turns a -0.0 logit into +0.0), branch free: a select here spilled on
    // sm_80.
    const T scale = static_cast<T>(p.scale);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int j = k0 + kl + frag_key(e, t);
      const T lsj = lsb != nullptr && j < p.n_tok ? static_cast<T>(lsb[j]) : T(0);
      s[e] = add_rn(mul_rn(dot[e], scale), lsj);
    }
  }

  static __device__ __forceinline__ T mul_rn(T a, T b) {
    if constexpr (std::is_same_v<T, double>) {
      return __dmul_rn(a, b);
    } else {
      return __fmul_rn(a, b);
    }
  }
  static __device__ __forceinline__ T add_rn(T a, T b) {
    if constexpr (std::is_same_v<T, double>) {
      return __dadd_rn(a, b);
    } else {
      return __fadd_rn(a, b);
    }
  }

  static __device__ __forceinline__ T exp_nonpos(T x) {
    if constexpr (std::is_same_v<T, double>) {
      return exp(x);
    } else {
      return attention::exp_nonpositive(x);
    }
  }

  // Walks the keys 64 at a time: the whole block stages them (K when stage_keys, V's columns
  // [c0, c0 + kChunk) when stage_values; every thread reaches every barrier), then a warp with
  // rows calls body(kl, k0) for each 16-key step below N.
  template <typename Body>
  __device__ __forceinline__ void over_keys(bool has_rows, bool stage_keys, bool stage_values,
                                            int c0, Body&& body) {
    const int N = static_cast<int>(p.n_tok);
    for (int kt = 0; kt < p.key_tiles; ++kt) {
      const int k0 = kt * kTileKeys;
      __syncthreads();
      if (stage_keys) stage_k(k0);
      if (stage_values) stage_v(k0, c0);
      __syncthreads();
      if (!has_rows) continue;
      for (int kl = 0; kl < kTileKeys && k0 + kl < N; kl += 16) body(kl, k0);
    }
  }

  // --- pass 1 -----------------------------------------------------------------------------------

  // Resident: S into the shared map, row maxima, then e = exp(s - m) in place and 1 / sum.
  __device__ __forceinline__ void resident_softmax() {
    const int rounds = (p.row_tiles + p.nwarps - 1) / p.nwarps;
    for (int round = 0; round < rounds; ++round) resident_rows(round * p.nwarps + warp);
  }

  __device__ __forceinline__ void resident_rows(int rt) {
    T* map = smap();
    const int N = static_cast<int>(p.n_tok);
    const bool has_rows = rt < p.row_tiles;
    const int r0 = rt * 16;
    if (has_rows) load_q_tile(rt);
    T m0 = -INFINITY, m1 = -INFINITY;  // rows g and g + 8
    over_keys(has_rows, true, false, 0, [&](int kl, int k0) {
      T s[8];
      scores(kl, k0, s);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int i = r0 + frag_row(e, g), j = k0 + kl + frag_key(e, t);
        if (i < N && j < N) {
          map[i * N + j] = s[e];
          if ((e >> 1) & 1) {
            m1 = cuda::nan_max(m1, s[e]);
          } else {
            m0 = cuda::nan_max(m0, s[e]);
          }
        }
      }
    });
    if (!has_rows) return;
    T m[2] = {m0, m1};
#pragma unroll
    for (int u = 0; u < 2; ++u) {  // the four lanes of a quad hold the same two rows
      m[u] = cuda::nan_max(m[u], __shfl_xor_sync(cuda::kFullMask, m[u], 1));
      m[u] = cuda::nan_max(m[u], __shfl_xor_sync(cuda::kFullMask, m[u], 2));
    }
    if (t == 0) {
      if (r0 + g < N) rowm()[r0 + g] = m[0];
      if (r0 + g + 8 < N) rowm()[r0 + g + 8] = m[1];
    }
    __syncwarp();
    for (int rr = 0; rr < 16; ++rr) {
      const int i = r0 + rr;
      if (i >= N) break;  // warp-uniform
      const T mi = rowm()[i];
      T sum = 0;
      for (int base = 0; base < N; base += 32) {
        const int j = base + lane;
        if (j < N) {
          const T e = exp_nonpos(map[i * N + j] - mi);
          map[i * N + j] = e;
          sum += e;
        }
      }
      sum = cuda::warp_sum(sum);
      if (lane == 0) rowl()[i] = T(1) / sum;
    }
  }

  // Recompute: each row's max and sum online, per lane over its columns, merged over the quad.
  __device__ __forceinline__ void recompute_softmax() {
    const int N = static_cast<int>(p.n_tok);
    const int rounds = (p.row_tiles + p.nwarps - 1) / p.nwarps;
    for (int round = 0; round < rounds; ++round) {
      const int rt = round * p.nwarps + warp;
      const bool has_rows = rt < p.row_tiles;
      const int r0 = rt * 16;
      if (has_rows) load_q_tile(rt);
      T m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
      over_keys(has_rows, true, false, 0, [&](int kl, int k0) {
        T s[8];
        scores(kl, k0, s);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          T tmax = -INFINITY;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (((e >> 1) & 1) == u && k0 + kl + frag_key(e, t) < N) {
              tmax = cuda::nan_max(tmax, s[e]);
            }
          }
          online_update(m[u], l[u], tmax, s, u, k0 + kl);
        }
      });
      if (!has_rows) continue;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
          const T mo = __shfl_xor_sync(cuda::kFullMask, m[u], o);
          const T lo = __shfl_xor_sync(cuda::kFullMask, l[u], o);
          merge_stats(m[u], l[u], mo, lo);
        }
      }
      if (t == 0) {
        for (int u = 0; u < 2; ++u) {
          const int i = r0 + g + 8 * u;
          if (i < N) {
            rowm()[i] = m[u];
            rowl()[i] = T(1) / l[u];
          }
        }
      }
    }
  }

  // Folds this lane's four values of row u (keys kbase + frag_key) into its running (m, l).
  // A running max of -inf (only -inf seen so far) adds nothing: exp(-inf - -inf) would be NaN.
  __device__ __forceinline__ void online_update(T& m, T& l, T tmax, const T (&s)[8], int u,
                                                int kbase) const {
    const T mn = cuda::nan_max(m, tmax);
    if (mn == -INFINITY) return;
    T add = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (((e >> 1) & 1) == u && kbase + frag_key(e, t) < p.n_tok) add += exp_nonpos(s[e] - mn);
    }
    l = (m == -INFINITY ? T(0) : l * exp_nonpos(m - mn)) + add;
    m = mn;
  }

  // Merges another lane's (mo, lo) of the same row into (m, l).
  static __device__ __forceinline__ void merge_stats(T& m, T& l, T mo, T lo) {
    const T mn = cuda::nan_max(m, mo);
    if (mn == -INFINITY) return;  // both saw only -inf: l stays 0
    const T a = m == -INFINITY ? T(0) : l * exp_nonpos(m - mn);
    const T c = mo == -INFINITY ? T(0) : lo * exp_nonpos(mo - mn);
    l = a + c;
    m = mn;
  }

  // --- probabilities of a 16 x 16 block -----------------------------------------------------

  // p of the block (rows r0.., keys k0 + kl..), 0 outside the N x N map. Resident: read from
  // the map; recompute: from freshly computed scores and the row statistics.
  __device__ __forceinline__ void probs(int kl, int r0, int k0, T (&pv)[8]) const {
    const int N = static_cast<int>(p.n_tok);
    if (kRes) {
      const T* map = smap();
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int i = r0 + frag_row(e, g), j = k0 + kl + frag_key(e, t);
        pv[e] = i < N && j < N ? map[i * N + j] * rowl()[i] : T(0);
      }
    } else {
      T s[8];
      scores(kl, k0, s);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int i = r0 + frag_row(e, g), j = k0 + kl + frag_key(e, t);
        pv[e] = i < N && j < N ? exp_nonpos(s[e] - rowm()[i]) * rowl()[i] : T(0);
      }
    }
  }

  // --- threshold: one radix level over every p of the tile ----------------------------------

  __device__ __forceinline__ void count_level(const radix::LevelT<Key>& level, Key prefix) {
    const int N = static_cast<int>(p.n_tok);
    cuda::RunCounter counter(hist());
    if (kRes) {
      const T* map = smap();
      for (int i = warp; i < N; i += p.nwarps) {
        const T inv = rowl()[i];
        for (int base = 0; base < N; base += 32) {
          const int j = base + lane;
          if (j < N) {
            const Key key = key_of(map[i * N + j] * inv);
            if (level.matches(key, prefix)) counter.add(level.digit(key));
          }
        }
      }
    } else {
      const int rounds = (p.row_tiles + p.nwarps - 1) / p.nwarps;
      for (int round = 0; round < rounds; ++round) {
        const int rt = round * p.nwarps + warp;
        const bool has_rows = rt < p.row_tiles;
        const int r0 = rt * 16;
        if (has_rows) load_q_tile(rt);
        over_keys(has_rows, true, false, 0, [&](int kl, int k0) {
          T pv[8];
          probs(kl, r0, k0, pv);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int i = r0 + frag_row(e, g), j = k0 + kl + frag_key(e, t);
            if (i < N && j < N) {
              const Key key = key_of(pv[e]);
              if (level.matches(key, prefix)) counter.add(level.digit(key));
            }
          }
        });
      }
    }
    counter.flush();
  }

  // tau: the exact kk-th smallest p of the tile (under the order of the float bits; NaN keys
  // sort above every number). NaN when the kk-th key is a NaN (fewer than kk numbers).
  __device__ __forceinline__ T threshold() {
    cuda::SelectState* st = state();
    if (threadIdx.x == 0) *st = cuda::SelectState{0u, p.kk, 0, 0};
    for (int lv = 0; lv < kLevels; ++lv) {
      const radix::LevelT<Key> level = level_of(lv);
      __syncthreads();  // st written; hist free (previous level done)
      for (uint32_t bin = threadIdx.x; bin < level.bins(); bin += blockDim.x) hist()[bin] = 0;
      __syncthreads();
      count_level(level, static_cast<Key>(st->prefix));
      __syncthreads();
      cuda::block_take_bucket(hist(), level.bins(), level, st, scan_scratch());
    }
    return prob_of(static_cast<Key>(st->prefix));
  }

  // --- last pass: mask, pieces, column sums, P @ V ------------------------------------------

  // Adds this block's masked p to the warp's column partials and records the diagonal / CLS
  // pieces. Column sums over the 16 rows: each lane adds its two rows, then a butterfly over the
  // eight lanes of one column (xor 4, 8, 16); lanes 0..3 store. A warp accumulates its partials
  // over its row tiles (rounds) in one row: in resident mode the first row of its first-round
  // tile in the map (already read by then: the last pass reads only the warp's own rows, and
  // that row only in the first round), otherwise a row of the partial buffer.
  __device__ __forceinline__ void pieces_and_partials(const T (&pv)[8], int r0, int kbase,
                                                      bool first_round) {
    const int N = static_cast<int>(p.n_tok), M = static_cast<int>(p.prefix);
    const ScoreStrategy& sg = p.strategy;
    if (sg.kind == ScoreKind::kNone) return;
    T* first = static_cast<T*>(p.pieces) + (b * p.heads + h) * p.n_img;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int i = r0 + frag_row(e, g), j = kbase + frag_key(e, t);
      if (i < N && j < N && j >= M) {
        if (sg.needs_gamma() && i == j) first[j - M] = pv[e];
        if (sg.needs_cls() && i == 0) first[j - M] = pv[e];
      }
    }
    if (!sg.needs_psi()) return;
    T col[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {  // columns 2t + (u & 1) + 8 (u >> 1): elements e and e + 2
      const int e = (u & 1) + 4 * (u >> 1);
      col[u] = pv[e] + pv[e + 2];
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) col[u] += __shfl_xor_sync(cuda::kFullMask, col[u], o);
    }
    __syncwarp();  // resident: every lane has read its map values before row r0 is overwritten
    if (g == 0) {
      T* dst = partial_row(warp);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = kbase + 2 * t + (u & 1) + 8 * (u >> 1);
        if (j < N) dst[j] = first_round ? col[u] : dst[j] + col[u];
      }
    }
    __syncwarp();
  }

  // out[16 rows, 64 columns of the chunk] += p (16 keys) @ V (16 keys of vbuf at kl).
  __device__ __forceinline__ void pv_step(const T (&pv)[8], int kl, int nct,
                                          AccT (&acc)[kTiles][4]) const {
    const KT* buf = vbuf();
    if constexpr (kMma) {
      uint32_t hi[4], lo[4];
      split2<S>(pv[0], pv[1], hi[0], lo[0]);
      split2<S>(pv[2], pv[3], hi[1], lo[1]);
      split2<S>(pv[4], pv[5], hi[2], lo[2]);
      split2<S>(pv[6], pv[7], hi[3], lo[3]);
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        if (nt < nct) {
          const KT* col = buf + (nt * 8 + g) * p.ldv + kl + 2 * t;
          const uint32_t b0 = *reinterpret_cast<const uint32_t*>(col);
          const uint32_t b1 = *reinterpret_cast<const uint32_t*>(col + 8);
          mma16816<S>(acc[nt], hi, b0, b1);
          mma16816<S>(acc[nt], lo, b0, b1);
        }
      }
    } else {
      // Gather the quad's p of rows g and g + 8 for all 16 keys (lane t holds keys 2t, 2t + 1,
      // 2t + 8, 2t + 9), then FMA against V's rows.
      const int quad = lane & ~3;
#pragma unroll
      for (int kk = 0; kk < 16; ++kk) {
        const int src = quad | ((kk & 7) >> 1);
        const int ea = (kk & 1) + 4 * (kk >> 3);  // element of row g holding key kk
        const T pa = __shfl_sync(cuda::kFullMask, pv[ea], src);
        const T pb = __shfl_sync(cuda::kFullMask, pv[ea + 2], src);
        const T* vrow = buf + (kl + kk) * p.ldv + 2 * t;
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          if (nt < nct) {
            const T v0 = vrow[nt * 8], v1 = vrow[nt * 8 + 1];
            acc[nt][0] = fma(pa, v0, acc[nt][0]);
            acc[nt][1] = fma(pa, v1, acc[nt][1]);
            acc[nt][2] = fma(pb, v0, acc[nt][2]);
            acc[nt][3] = fma(pb, v1, acc[nt][3]);
          }
        }
      }
    }
  }

  __device__ __forceinline__ void final_pass(T tau, bool mask) {
    const int rounds = (p.row_tiles + p.nwarps - 1) / p.nwarps;
    S* out = static_cast<S*>(p.out);
    for (int chunk = 0; chunk < p.dv_chunks; ++chunk) {
      const bool last = chunk + 1 == p.dv_chunks;
      const int c0 = chunk * kChunk;
      const int cols = static_cast<int>(p.dv - c0 < kChunk ? p.dv - c0 : kChunk);  // >= 0
      const int nct = (cols + 7) / 8;  // n8 tiles
      for (int round = 0; round < rounds; ++round) {
        const int rt = round * p.nwarps + warp;
        const bool has_rows = rt < p.row_tiles;
        const int r0 = rt * 16;
        if (has_rows && !kRes) load_q_tile(rt);
        AccT acc[kTiles][4];
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
          for (int u = 0; u < 4; ++u) acc[nt][u] = AccT(0);
        }
        over_keys(has_rows, !kRes, nct > 0, c0, [&](int kl, int k0) {
          T pv[8];
          probs(kl, r0, k0, pv);
          if (mask) {
#pragma unroll
            for (int e = 0; e < 8; ++e) pv[e] = pv[e] < tau ? T(0) : pv[e];
          }
          if (last) pieces_and_partials(pv, r0, k0 + kl, round == 0);
          if (nct > 0) pv_step(pv, kl, nct, acc);
        });
        if (has_rows && nct > 0) store_out(out, r0, c0, nct, acc);
      }
    }
  }

  __device__ __forceinline__ void store_out(S* out, int r0, int c0, int nct,
                                            const AccT (&acc)[kTiles][4]) const {
    const int N = static_cast<int>(p.n_tok);
    const int64_t H = p.heads, dv = p.dv;
    const float undo = std::is_same_v<S, __half> ? 1.0f / kHalfScale : 1.0f;
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      if (nt >= nct) continue;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = r0 + g + 8 * (u >> 1), c = c0 + nt * 8 + 2 * t + (u & 1);
        if (i < N && c < dv) {
          const T v = kMma ? static_cast<T>(acc[nt][u] * undo) : static_cast<T>(acc[nt][u]);
          out[((b * N + i) * H + h) * dv + c] = cuda::Elem<S>::store(v);
        }
      }
    }
  }

  // psi: column sums of the masked p over all rows, from the per-warp partials in warp order.
  __device__ __forceinline__ void write_psi() const {
    if (!p.strategy.needs_psi()) return;
    const int N = static_cast<int>(p.n_tok), M = static_cast<int>(p.prefix);
    T* second = static_cast<T*>(p.pieces) + (p.batch * p.heads + b * p.heads + h) * p.n_img;
    const int parts = min(p.nwarps, p.row_tiles);  // row tiles of the first round
    for (int j = M + static_cast<int>(threadIdx.x); j < N; j += blockDim.x) {
      T s = 0;
      for (int w = 0; w < parts; ++w) s += partial_row(w)[j];
      second[j - M] = s;
    }
  }

  // L2 prefetch of another tile's q, k, v rows (one instruction per 128-byte line), so that the
  // block's next tile loads from L2 while this one computes.
  __device__ __forceinline__ void prefetch_tile(int64_t tile) const {
    if (tile >= p.batch * p.heads) return;
    const int64_t bb = tile / p.heads, hh = tile % p.heads;
    const auto rows = [&](const void* base, const int64_t* st, int64_t cols) {
      if (st[3] != 1) return;  // only rows with unit column stride are prefetched
      const S* ptr0 = static_cast<const S*>(base) + bb * st[0] + hh * st[1];
      const int64_t lines = (cols * static_cast<int64_t>(sizeof(S)) + 127) / 128;
      for (int64_t x = threadIdx.x; x < p.n_tok * lines; x += blockDim.x) {
        const S* ptr = ptr0 + (x / lines) * st[2] + (x % lines) * (128 / sizeof(S));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
      }
    };
    rows(p.q, p.sq, p.d);
    rows(p.k, p.sk, p.d);
    rows(p.v, p.sv, p.dv);
  }
};

template <typename S, bool kMma, bool kRes>
__global__ void __launch_bounds__(kMaxThreads, 1) attention_kernel(Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t tiles = p.batch * p.heads;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    TileWork<S, kMma, kRes> w(p, smem, tile);
    w.prefetch_tile(tile + gridDim.x);
    if constexpr (kRes) {
      w.resident_softmax();
    } else {
      w.recompute_softmax();
    }
    __syncthreads();
    using T = typename TileWork<S, kMma, kRes>::T;
    T tau = T(0);
    const bool mask = p.kk > 0;
    if (mask) tau = w.threshold();
    w.final_pass(tau, mask);
    __syncthreads();
    w.write_psi();
    __syncthreads();  // the next tile reuses every buffer
  }
}

// Pieces -> score: one thread per (image, image token), attention::combine_score over heads.
template <typename T>
__global__ void __launch_bounds__(256, 4)
    combine_kernel(const T* __restrict__ pieces, int64_t batch, int64_t heads, int64_t n_img,
                   ScoreStrategy strategy, float* __restrict__ score) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (x >= batch * n_img) return;
  const int64_t b = x / n_img, j = x % n_img;
  const T* first = pieces + b * heads * n_img + j;
  const T* second = first + batch * heads * n_img;
  score[x] = static_cast<float>(
      attention::combine_score<T>(strategy, first, second, first, heads, n_img));
}

// ---------------------------------------------------------------------------------------------
// host

constexpr size_t align16(size_t x) { return (x + 15) / 16 * 16; }

// Shared memory carve-up of one launch. Resident: the map, then one staging region that holds
// K tiles (pass 1), the histogram (threshold) and V tiles (last pass) in turn. Recompute: K and
// V staging and the histogram side by side (the passes recompute scores while they count), and
// the per-warp column partials.
struct Plan {
  bool resident = false;
  int nwarps = 1;
  size_t smem = 0;
};

template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename S, bool kMma>
size_t carve(Params& p, bool resident, int nwarps) {
  using T = compute_t<S>;
  const size_t kt = kMma ? sizeof(S) : sizeof(T);
  p.ldk = kMma ? p.d_pad + 8 : p.d_pad + 1;
  p.ldv = kMma ? kTileKeys + 8 : kDvChunk + 1;
  p.ldq = p.d_pad + 1;
  const size_t N = static_cast<size_t>(p.n_tok);
  const size_t kbuf = align16(kTileKeys * p.ldk * kt);
  const size_t vbuf = align16((kMma ? kDvChunk : kTileKeys) * p.ldv * kt);
  const size_t hist = align16(radix::kProbMaxBins * sizeof(uint32_t));
  const size_t qbuf = kMma ? 0 : align16(static_cast<size_t>(nwarps) * 16 * p.ldq * sizeof(T));
  const size_t rows = align16(N * sizeof(T));
  const size_t state = align16(sizeof(cuda::SelectState) + 32 * sizeof(uint32_t));
  size_t off = 0;
  p.off_smap = 0;
  if (resident) {
    off = align16(N * N * sizeof(T));
    p.off_kbuf = p.off_vbuf = p.off_hist = static_cast<uint32_t>(off);
    off += std::max({kbuf, vbuf, hist});
    p.off_partial = 0;  // the partials live in the map
  } else {
    p.off_kbuf = static_cast<uint32_t>(off);
    off += kbuf;
    p.off_vbuf = static_cast<uint32_t>(off);
    off += vbuf;
    p.off_hist = static_cast<uint32_t>(off);
    off += hist;
  }
  p.off_qbuf = static_cast<uint32_t>(off);
  off += qbuf;
  p.off_rowm = static_cast<uint32_t>(off);
  off += rows;
  p.off_rowl = static_cast<uint32_t>(off);
  off += rows;
  if (!resident) {
    p.off_partial = static_cast<uint32_t>(off);
    off += align16(static_cast<size_t>(nwarps) * N * sizeof(T));
  }
  p.off_state = static_cast<uint32_t>(off);
  off += state;
  return off;
}

template <typename S, bool kMma, bool kRes>
void launch_kernel(Params& p, size_t smem, int device, cudaStream_t stream) {
  const auto kernel = attention_kernel<S, kMma, kRes>;
  cuda::allow_dynamic_shared(kernel, smem, device, OP,
                             "one (image, head) tile (row statistics, column partials and staged "
                             "keys)");
  const int threads = 32 * p.nwarps;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  TORCH_CHECK(per_sm >= 1, OP ": the kernel does not fit on this GPU (", threads, " threads, ",
              smem, " bytes of shared memory)");
  // Persistent blocks: each loops over tiles, prefetching its next tile's q, k, v into L2.
  const int64_t tiles = p.batch * p.heads;
  const int64_t grid =
      std::min<int64_t>(tiles, static_cast<int64_t>(per_sm) * cuda::num_sms(device));
  kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Resident mode when the tile's float32 map fits the device's shared memory (and is allowed),
// else recompute with as many warps (up to 13) as shared memory allows. kResidentOk: whether
// this engine has a resident kernel (float32 compute on tensor cores or FMA for float32).
template <typename S, bool kMma, bool kResidentOk>
void launch(Params& p, int device, cudaStream_t stream, bool allow_resident) {
  constexpr int chunk = TileWork<S, kMma, false>::kChunk;
  p.dv_chunks = static_cast<int>(std::max<int64_t>(1, (p.dv + chunk - 1) / chunk));
  const size_t limit = static_cast<size_t>(cuda::max_shared_optin(device));
  const int warps = std::min(kMaxWarps, p.row_tiles);
  if constexpr (kResidentOk) {
    if (allow_resident && carve<S, kMma>(p, true, warps) <= limit) {
      p.resident = true;
      p.nwarps = warps;
      launch_kernel<S, kMma, true>(p, carve<S, kMma>(p, true, warps), device, stream);
      return;
    }
  }
  int nw = warps;
  while (nw > 1 && carve<S, kMma>(p, false, nw) > limit) nw /= 2;
  p.resident = false;
  p.nwarps = nw;
  launch_kernel<S, kMma, false>(p, carve<S, kMma>(p, false, nw), device, stream);
}

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v,
                                                   const std::optional<at::Tensor>& log_sizes,
                                                   double scale, double sparsity,
                                                   int64_t num_prefix, c10::string_view score) {
  const ScoreStrategy strategy = args::check_attention(q, k, v, log_sizes, scale, sparsity,
                                                       num_prefix, score, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), dv = v.size(3);
  const int64_t n_img = N - num_prefix;
  auto [out, score_out] = args::attention_outputs(q, v, num_prefix, strategy);
  if (B == 0 || N == 0) return {out, score_out};
  TORCH_CHECK_VALUE(N <= (int64_t{1} << 20), OP ": N must be at most 2^20 tokens, got ", N);
  const bool is_double = q.scalar_type() == at::kDouble;
  at::Tensor pieces;
  if (strategy.kind != ScoreKind::kNone) {
    pieces = at::empty({2, B, H, n_img}, q.options().dtype(is_double ? at::kDouble : at::kFloat));
  }
  at::Tensor ls;
  if (log_sizes.has_value()) ls = log_sizes->contiguous();

  Params p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.ls = ls.defined() ? ls.const_data_ptr<float>() : nullptr;
  for (int a = 0; a < 4; ++a) {
    p.sq[a] = q.stride(a);
    p.sk[a] = k.stride(a);
    p.sv[a] = v.stride(a);
  }
  p.batch = B;
  p.heads = H;
  p.n_tok = N;
  p.d = d;
  p.dv = dv;
  p.prefix = num_prefix;
  p.n_img = n_img;
  p.d_pad = static_cast<int>((d + 15) / 16 * 16);
  p.ksteps = p.d_pad / 16;
  p.row_tiles = static_cast<int>((N + 15) / 16);
  p.key_tiles = static_cast<int>((N + kTileKeys - 1) / kTileKeys);
  p.scale = scale;
  p.kk = attention::num_masked(N, sparsity);
  p.strategy = strategy;
  p.out = out.mutable_data_ptr();
  p.pieces = pieces.defined() ? pieces.mutable_data_ptr() : nullptr;

  const int device = q.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool allow_resident = !env_is("GTP_ATTENTION_CUDA_MODE", "recompute");
  // Tensor cores for float16 / bfloat16 when d fits the register-resident Q fragments and the
  // GPU has bfloat16 MMA (sm_80+); otherwise the FMA engine, equally exact.
  const bool mma = p.ksteps <= kMaxKSteps && cuda::compute_major(device) >= 8 &&
                   !env_is("GTP_ATTENTION_CUDA_ENGINE", "fma");
  // The FMA fallback of float16 / bfloat16 (d > 64 or sm < 80) always recomputes: one kernel
  // fewer to compile for a rare case; float64 probabilities (8 bytes) never fit resident.
  switch (q.scalar_type()) {
    case at::kHalf:
      mma ? launch<__half, true, true>(p, device, stream, allow_resident)
          : launch<__half, false, false>(p, device, stream, allow_resident);
      break;
    case at::kBFloat16:
      mma ? launch<__nv_bfloat16, true, true>(p, device, stream, allow_resident)
          : launch<__nv_bfloat16, false, false>(p, device, stream, allow_resident);
      break;
    case at::kFloat:
      launch<float, false, true>(p, device, stream, allow_resident);
      break;
    default:
      launch<double, false, false>(p, device, stream, allow_resident);
      break;
  }

  if (strategy.kind != ScoreKind::kNone && n_img > 0) {
    const unsigned blocks = cuda::grid_blocks(B * n_img, 256, OP);
    float* so = score_out.mutable_data_ptr<float>();
    if (is_double) {
      combine_kernel<double><<<blocks, 256, 0, stream>>>(pieces.const_data_ptr<double>(), B, H,
                                                         n_img, strategy, so);
    } else {
      combine_kernel<float><<<blocks, 256, 0, stream>>>(pieces.const_data_ptr<float>(), B, H,
                                                        n_img, strategy, so);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, score_out};
}

#undef OP

}  // namespace
}  // namespace gtp

TORCH_LIBRARY_IMPL(gtp, CUDA, m) { m.impl("attention", &gtp::attention_cuda); }
