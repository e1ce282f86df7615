// gtp.attention on CPU (SPEC 2, 3): proportional attention, the exact top-theta N^2 threshold,
// A @ V and the importance-score pieces, fused per (image, head) tile.
//
// One thread owns one (b, h) tile at a time and keeps it in a thread-local N x N buffer
// (allocated once per call per thread; 152 KiB for N = 197, in L2):
//   S = Q K^T                          BLAS gemm straight on q/k's strides (timm's qkv views)
//   row softmax of scale * S + ls      branch-free polynomial exp, vectorised by the compiler
//   tau = kk-th smallest of S          radix select on the float bits, run on a window of
//                                      buckets bracketed by a 1-in-8 sample (exact)
//   S[S < tau] = 0, column sums        one pass; diagonal and row 0 read from the tile
//   out = S V                          BLAS gemm into out's (B, N, H, dv) memory layout
// The (B, H, N, N) probabilities never reach memory. Per-head score pieces go into a small
// (B, H, n) buffer and are combined over heads at the end.
//
// Precision: float32/float16/bfloat16 inputs compute in float32 (half tiles are converted on
// load), float64 in float64, exactly like gtp_kernels/reference/attention.py. The logit scale
// is applied after the QK^T GEMM, as the reference computes scale * (q @ k^T): folding it into
// BLAS's alpha was up to ~8x less exact on integer-valued q / k with large logits (probability
// error vs float64 1.75e-5 against the reference's 2.2e-6; now 2.2e-6 both).
//
// Developer knobs (environment, read per call; not part of the API):
//   GTP_ATTENTION_SELECT=radix|nth_element|windowed_scalar   plain radix select,
//                                      std::nth_element on a copy, or the windowed select
//                                      without its AVX-512 pass (what a build without AVX-512
//                                      runs), instead of the sample-windowed radix select
//   GTP_ATTENTION_GEMM=aten            at::mm_out on from_blob views instead of the BLAS calls
//   GTP_ATTENTION_PROFILE=<file>       append per-phase thread-seconds of this call to <file>
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/attention.h"
#include "common/op_args.h"
#include "common/radix.h"

#if AT_BUILD_WITH_BLAS() && defined(__GNUC__)
// The Fortran BLAS that libtorch_cpu links and exports (MKL or OpenBLAS, LP64). Calling it
// directly costs nothing per tile; at::mm_out would go through the dispatcher 2 * B * H times.
// Weak: a torch build that does not export them still loads this library and takes the
// at::mm_out path (null symbols), as does GTP_ATTENTION_GEMM=aten.
#define GTP_FORTRAN_BLAS 1
extern "C" {
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const float* alpha,
                                  const float* a, const int* lda, const float* b,
                                  const int* ldb, const float* beta, float* c, const int* ldc);
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const double* alpha,
                                  const double* a, const int* lda, const double* b,
                                  const int* ldb, const double* beta, double* c,
                                  const int* ldc);
}
#endif

namespace gtp {
namespace {

#define OP "gtp.attention"

using attention::ScoreKind;
using attention::ScoreStrategy;

// Row-major C (m x n, ldc) = alpha * A (m x k, lda) @ op(B); op(B) = B^T with B (n x k, ldb)
// when b_trans, else B (k x n, ldb). Column-major BLAS sees C^T = op(B)^T A^T.
template <typename T>
void gemm_rowmajor(bool b_trans, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                   int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, bool use_blas) {
#ifdef GTP_FORTRAN_BLAS
  constexpr bool is_float = std::is_same_v<T, float>;
  if (use_blas && (is_float ? sgemm_ != nullptr : dgemm_ != nullptr)) {
    const char ta = b_trans ? 'T' : 'N', tb = 'N';
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda),
              ildc = static_cast<int>(ldc);
    const T beta = 0;
    if constexpr (is_float) {
      sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
    } else {
      dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
    }
    return;
  }
#endif
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto A = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opt);
  auto B = b_trans ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opt).t()
                   : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opt);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opt);
  at::mm_out(C, A, B);
  if (alpha != T(1)) C.mul_(alpha);
}

// The first digit level of every select here: key bits 20..30 (2048 bins), the CUDA kernel's
// first level too (common/radix.h).
constexpr radix::Level kLevel1 = radix::prob_level(0);

// Exact rank-r key (1-based) among the c keys of cand, all in [base, base + span): radix levels
// over the offsets key - base, 11 bits at a time from the top bit of span - 1, each level
// compacting the keys of the chosen bin in place (at most three levels). Working on offsets
// spreads keys that share their high bits (near-uniform probabilities) over many bins, so the
// histogram increments do not queue on one counter. hist: 2048 entries of scratch.
uint32_t select_offsets(uint32_t* cand, int64_t c, int64_t r, uint32_t base, uint64_t span,
                        uint32_t* hist) {
  int bits = span <= 1 ? 0 : 64 - __builtin_clzll(span - 1);  // offsets fit in `bits` bits
  while (true) {
    const int shift = std::max(bits - 11, 0);
    const uint32_t bins = static_cast<uint32_t>(((span - 1) >> shift) + 1);  // <= 2048
    std::fill(hist, hist + bins, 0u);
    for (int64_t j = 0; j < c; ++j) hist[(cand[j] - base) >> shift]++;
    const uint32_t b = radix::find_bucket(hist, bins, r);
    if (shift == 0) return base + b;
    int64_t m = 0;
    for (int64_t j = 0; j < c; ++j) {  // in place: m <= j
      const uint32_t key = cand[j];
      cand[m] = key;
      m += ((key - base) >> shift) == b;
    }
    c = m;
    base += b << shift;
    span = uint64_t{1} << shift;
    bits = shift;
  }
}

// Exact kk-th smallest (1-based, 1 <= kk <= count) of `count` non-negative floats, without
// sorting: a histogram of key bits 20..30 (the sign bit is 0) picks the bucket holding rank kk;
// the keys of that bucket are compacted and select_offsets finishes on them.
// hist: 4 * 2048 entries of scratch; cand: count + 64 entries of scratch.
float radix_select(const float* x, int64_t count, int64_t kk, uint32_t* hist, uint32_t* cand) {
  // Level 1 over all keys. Neighbouring probabilities often share a bucket; four interleaved
  // histograms keep consecutive increments of one bucket from waiting on each other.
  std::fill(hist, hist + 4 * 2048, 0u);
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    hist[kLevel1.digit(attention::prob_key(x[i]))]++;
    hist[2048 + kLevel1.digit(attention::prob_key(x[i + 1]))]++;
    hist[4096 + kLevel1.digit(attention::prob_key(x[i + 2]))]++;
    hist[6144 + kLevel1.digit(attention::prob_key(x[i + 3]))]++;
  }
  for (; i < count; ++i) hist[kLevel1.digit(attention::prob_key(x[i]))]++;
  for (int b = 0; b < 2048; ++b) hist[b] += hist[2048 + b] + hist[4096 + b] + hist[6144 + b];
  const uint32_t b1 = radix::find_bucket(hist, 2048, kk);
  // compact the keys of bucket b1 (branch free: the store always happens, the count moves on
  // a hit)
  int64_t c = 0;
  for (i = 0; i < count; ++i) {
    const uint32_t key = attention::prob_key(x[i]);
    cand[c] = key;
    c += kLevel1.digit(key) == b1;
  }
  return attention::key_prob(
      select_offsets(cand, c, kk, b1 << kLevel1.shift, uint64_t{1} << kLevel1.shift, hist));
}

// One pass over the tile for the windowed select: counts the keys below lo_key (returned in
// `below`) and compacts the keys in [lo_key, hi_key) into cand (count + 64 entries); returns
// how many. Branch free (in and out of the window alternate unpredictably): the store always
// happens, the count moves on a hit. simd: the AVX-512 version (compress stores), when built.
int64_t compact_window(const float* x, int64_t count, uint32_t lo_key, uint64_t hi_key,
                       uint32_t* cand, int64_t& below, bool simd) {
  int64_t i = 0, c = 0;
  below = 0;
#if defined(__AVX512F__)
  if (simd) {
    const __m512i sign_off = _mm512_set1_epi32(0x7fffffff);
    const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo_key));
    const __m512i vhi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(hi_key)));
    // Two output streams (the first half of cand and from offset count / 2 + 32 on), so the
    // two compactions per step do not wait on each other's running count; joined after.
    uint32_t* cand_b = cand + count / 2 + 32;
    int64_t cb = 0;
    for (; i + 32 <= count; i += 32) {
      const __m512i k0 = _mm512_and_si512(_mm512_loadu_si512(x + i), sign_off);
      const __m512i k1 = _mm512_and_si512(_mm512_loadu_si512(x + i + 16), sign_off);
      const __mmask16 lt0 = _mm512_cmplt_epu32_mask(k0, vlo);
      const __mmask16 lt1 = _mm512_cmplt_epu32_mask(k1, vlo);
      const __mmask16 in0 = _mm512_mask_cmplt_epu32_mask(static_cast<__mmask16>(~lt0), k0, vhi);
      const __mmask16 in1 = _mm512_mask_cmplt_epu32_mask(static_cast<__mmask16>(~lt1), k1, vhi);
      _mm512_storeu_si512(cand + c, _mm512_maskz_compress_epi32(in0, k0));  // 16 slack
      _mm512_storeu_si512(cand_b + cb, _mm512_maskz_compress_epi32(in1, k1));
      below += __builtin_popcount(static_cast<unsigned>(lt0)) +
               __builtin_popcount(static_cast<unsigned>(lt1));
      c += __builtin_popcount(static_cast<unsigned>(in0));
      cb += __builtin_popcount(static_cast<unsigned>(in1));
    }
    std::memmove(cand + c, cand_b, cb * sizeof(uint32_t));
    c += cb;
  }
#else
  (void)simd;
#endif
  // One unsigned compare for "inside": keys below lo_key wrap to values >= 2^31 > span. (Two
  // compares joined by && compile to a branch, mispredicted on every other key.)
  const uint64_t span = hi_key - lo_key;
  for (; i < count; ++i) {
    const uint32_t key = attention::prob_key(x[i]);
    below += key < lo_key;
    cand[c] = key;
    c += static_cast<uint32_t>(key - lo_key) < span;
  }
  return c;
}

// The same exact result, faster on large maps: a strided sample (1 key in 8) brackets rank kk
// by a window of keys, one pass (compact_window) counts the keys below the window and compacts
// the keys inside it, and select_offsets finishes on the window only. The bracket is the sample
// ranks +-4 sigma around the estimate, first as level-1 buckets (bits 20..30); when those
// buckets hold many more samples than the bracket needs (near-uniform probabilities share
// their high bits: a random-initialised ViT's attention puts almost every entry of a tile in
// one or two buckets), a histogram of the sampled offsets inside them narrows it to 1/2048 of
// their span. Falls back to radix_select when the window misses rank kk (rare).
// samp: count / 8 + 8 entries of scratch.
float select_kth(const float* x, int64_t count, int64_t kk, uint32_t* hist, uint32_t* cand,
                 uint32_t* samp, bool simd) {
  constexpr int64_t kStep = 8;
  if (count >= 64 * kStep) {
    std::fill(hist, hist + 4 * 2048, 0u);  // four interleaved histograms, as in radix_select
    int64_t ns = 0, i = 0;
    for (; i + 4 * kStep <= count; i += 4 * kStep, ns += 4) {
      for (int u = 0; u < 4; ++u) samp[ns + u] = attention::prob_key(x[i + u * kStep]);
      hist[kLevel1.digit(samp[ns])]++;
      hist[2048 + kLevel1.digit(samp[ns + 1])]++;
      hist[4096 + kLevel1.digit(samp[ns + 2])]++;
      hist[6144 + kLevel1.digit(samp[ns + 3])]++;
    }
    for (; i < count; i += kStep, ++ns) {
      samp[ns] = attention::prob_key(x[i]);
      hist[kLevel1.digit(samp[ns])]++;
    }
    for (int b = 0; b < 2048; ++b) hist[b] += hist[2048 + b] + hist[4096 + b] + hist[6144 + b];
    const double p = static_cast<double>(kk) / static_cast<double>(count);
    const double est = p * static_cast<double>(ns);
    const double margin = 4.0 * std::sqrt(static_cast<double>(ns) * p * (1.0 - p)) + 2.0;
    const int64_t lo_rank = std::max<int64_t>(1, static_cast<int64_t>(est - margin));
    const int64_t hi_rank = std::min<int64_t>(ns, static_cast<int64_t>(est + margin) + 1);
    int64_t r_lo = lo_rank, r_hi = hi_rank;
    const uint32_t b_lo = radix::find_bucket(hist, 2048, r_lo);
    const uint32_t b_hi = radix::find_bucket(hist, 2048, r_hi);
    uint32_t lo_key = b_lo << kLevel1.shift;
    uint64_t hi_key = uint64_t{b_hi + 1} << kLevel1.shift;  // window [lo_key, hi_key)
    int64_t in_buckets = 0;
    for (uint32_t b = b_lo; b <= b_hi; ++b) in_buckets += hist[b];
    if (in_buckets > 2 * (hi_rank - lo_rank + 1)) {
      const uint64_t span = hi_key - lo_key;
      const int shift = 64 - __builtin_clzll(span - 1) - 11;  // span >= 2^20: shift >= 9
      const uint32_t bins = static_cast<uint32_t>(((span - 1) >> shift) + 1);
      uint32_t* fine = hist + 2048;  // tables 1..3 are free after the merge
      // Compact the sampled offsets inside the buckets first (branch free: in and out
      // alternate unpredictably; off wraps to a large value below lo_key), then histogram
      // them: counting the outside ones too would queue them all on one counter.
      int64_t m = 0;
      for (int64_t j = 0; j < ns; ++j) {
        const uint32_t off = samp[j] - lo_key;
        samp[m] = off;
        m += off < span;
      }
      std::fill(fine, fine + bins, 0u);
      for (int64_t j = 0; j < m; ++j) fine[samp[j] >> shift]++;
      // r_lo and r_hi are already the ranks inside b_lo and b_hi; make both relative to lo_key
      const int64_t below_hi = in_buckets - hist[b_hi];
      int64_t f_lo = r_lo, f_hi = r_hi + below_hi;
      const uint32_t s_lo = radix::find_bucket(fine, bins, f_lo);
      const uint32_t s_hi = radix::find_bucket(fine, bins, f_hi);
      hi_key = lo_key + (uint64_t{s_hi + 1} << shift);
      lo_key += s_lo << shift;
    }
    int64_t below = 0;
    const int64_t c = compact_window(x, count, lo_key, hi_key, cand, below, simd);
    if (below < kk && kk <= below + c) {
      return attention::key_prob(
          select_offsets(cand, c, kk - below, lo_key, hi_key - lo_key, hist));
    }
  }
  return radix_select(x, count, kk, hist, cand);
}

// The kk-th smallest under -inf < finite < +inf < NaN (plain `<` is no strict weak order once a
// NaN is present, and nth_element would then return anything).
template <typename T>
T nth_select(const T* x, int64_t count, int64_t kk, T* copy) {
  std::copy(x, x + count, copy);
  std::nth_element(copy, copy + (kk - 1), copy + count, attention::less_nan_last<T>);
  return copy[kk - 1];
}

// Row softmax of scale * S (n x n) + log_sizes[j], in place, S = Q K^T. The scale is applied
// here, after the GEMM, as the reference does (scale * (q @ k^T)): folding it into the GEMM's
// alpha lets BLAS pre-scale an operand, which costs exactness on integer-valued q / k (up to
// ~8x the reference's error against float64 at large logits, measured) and turns
// scale = 0 with an infinite q or k into 0 instead of the reference's 0 * inf = NaN. Here it
// is one multiply in a pass that runs anyway. `omp simd` lets the compiler vectorise the max
// and sum reductions (it may reassociate them; the sum is then a tree over lanes). A row with
// NaN or +inf logits, or only -inf ones, becomes NaN (exp_nonpositive(NaN) is NaN), as in
// torch.softmax.
inline void softmax_rows(float* S, int64_t n, float scale, const float* ls) {
  for (int64_t i = 0; i < n; ++i) {
    float* row = S + i * n;
    float m = -std::numeric_limits<float>::infinity();
    if (ls != nullptr) {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) {
        row[j] = row[j] * scale + ls[j];
        m = row[j] > m ? row[j] : m;  // (std::max defeats the simd reduction)
      }
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) {
        row[j] *= scale;
        m = row[j] > m ? row[j] : m;
      }
    }
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      const float e = attention::exp_nonpositive(row[j] - m);
      row[j] = e;
      s += e;
    }
    const float inv = 1.0f / s;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
}

inline void softmax_rows(double* S, int64_t n, double scale, const float* ls) {
  for (int64_t i = 0; i < n; ++i) {
    double* row = S + i * n;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      row[j] *= scale;
      if (ls != nullptr) row[j] += static_cast<double>(ls[j]);
      m = std::max(m, row[j]);
    }
    double s = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] - m);
      s += row[j];
    }
    for (int64_t j = 0; j < n; ++j) row[j] /= s;
  }
}

// (rows x cols) tile of a strided tensor to a dense row-major T buffer.
template <typename scalar_t, typename T>
void pack_tile(const scalar_t* src, int64_t rows, int64_t cols, int64_t s_row, int64_t s_col,
               T* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) {
      dst[i * cols + c] = static_cast<T>(src[i * s_row + c * s_col]);
    }
  }
}

// Can a BLAS operand be read in place: T elements, unit column stride, row stride >= cols?
template <typename scalar_t, typename T>
bool blas_ready(const at::Tensor& t, int64_t cols) {
  return std::is_same_v<scalar_t, T> && t.stride(3) == 1 &&
         t.stride(2) >= std::max<int64_t>(cols, 1);
}

// How the threshold is found (all exact, same result): the sample-windowed radix select (the
// default; its one full pass with AVX-512 when built with it), the same with the portable pass,
// the plain 3-level radix select, or std::nth_element on a copy (reference timing).
enum class Select { kWindowed, kWindowedScalar, kRadix, kNthElement };

enum Phase { kPack, kQK, kSoftmax, kSelect, kMask, kAV, kNumPhases };

struct Profile {
  bool on = false;
  double secs[kNumPhases] = {};
};

using Clock = std::chrono::steady_clock;

template <typename scalar_t, typename T>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const float* ls_ptr, double scale, int64_t kk, int64_t num_prefix,
                      ScoreStrategy strategy, Select select, bool use_blas, at::Tensor& out,
                      at::Tensor& pieces, Profile& profile) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3), dv = v.size(3);
  const int64_t n_img = N - num_prefix, NN = N * N;
  const bool direct_q = blas_ready<scalar_t, T>(q, d), direct_k = blas_ready<scalar_t, T>(k, d),
             direct_v = blas_ready<scalar_t, T>(v, dv);
  const bool direct_out = std::is_same_v<scalar_t, T>;  // out: (B, N, H, dv) memory
  const bool radix = std::is_same_v<T, float> && select != Select::kNthElement;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  T* piece_ptr = strategy.kind == ScoreKind::kNone ? nullptr : pieces.mutable_data_ptr<T>();
  const int64_t piece_stride = B * H * n_img;  // pieces: (2, B, H, n): [first, second]
  const T tscale = static_cast<T>(scale);

  std::vector<double> thread_secs(profile.on ? kNumPhases * at::get_num_threads() : 0, 0.0);

  // Tiles are handed out one at a time from a shared counter: on a machine shared with other
  // work a descheduled thread then delays the call by one tile, not by its whole static chunk.
  // Each thread still allocates its scratch once. Results do not depend on the schedule, nor
  // on the thread count: the BLAS calls always run single-threaded, inside the parallel region
  // (MKL does not nest). A lone tile (B * H == 1) therefore still gets a region of two threads
  // when two are allowed, the second finding no tile: called outside any region, MKL would
  // thread the GEMM itself and round differently than with one thread (1 ulp, measured).
  const int64_t num_tiles = B * H;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(num_tiles, 2));
  std::atomic<int64_t> next_tile{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    int64_t tile = next_tile.fetch_add(1);
    if (tile >= num_tiles) return;  // (before allocating scratch)
    // Thread-local scratch, once per call per thread.
    std::unique_ptr<T[]> S(new T[NN]);
    std::unique_ptr<T[]> colsum(new T[N]);
    std::unique_ptr<T[]> qbuf(direct_q ? nullptr : new T[N * d]);
    std::unique_ptr<T[]> kbuf(direct_k ? nullptr : new T[N * d]);
    std::unique_ptr<T[]> vbuf(direct_v ? nullptr : new T[N * dv]);
    std::unique_ptr<T[]> obuf(direct_out ? nullptr : new T[N * dv]);
    std::unique_ptr<uint32_t[]> hist(kk > 0 && radix ? new uint32_t[4 * 2048] : nullptr);
    std::unique_ptr<uint32_t[]> cand(kk > 0 && radix ? new uint32_t[NN + 64] : nullptr);
    std::unique_ptr<uint32_t[]> samp(kk > 0 && radix ? new uint32_t[NN / 8 + 8] : nullptr);
    std::unique_ptr<T[]> copy(kk > 0 && !radix ? new T[NN] : nullptr);
    double* secs = profile.on ? thread_secs.data() + kNumPhases * at::get_thread_num() : nullptr;
    auto t_last = Clock::now();
    auto tick = [&](Phase p) {
      if (secs == nullptr) return;
      const auto now = Clock::now();
      secs[p] += std::chrono::duration<double>(now - t_last).count();
      t_last = now;
    };

    for (; tile < num_tiles; tile = next_tile.fetch_add(1)) {
      const int64_t b = tile / H, h = tile % H;
      // d = 0 or dv = 0: those tensors hold no element and their data pointer may be null, so
      // no offset is applied to it (UB on a null pointer); nothing reads through it then.
      const scalar_t* qt = d > 0 ? qp + b * q.stride(0) + h * q.stride(1) : qp;
      const scalar_t* kt = d > 0 ? kp + b * k.stride(0) + h * k.stride(1) : kp;
      const scalar_t* vt = dv > 0 ? vp + b * v.stride(0) + h * v.stride(1) : vp;
      tick(kPack);
      const T *Q, *K, *V;
      int64_t ldq, ldk, ldv;
      if (direct_q) {
        Q = reinterpret_cast<const T*>(qt), ldq = q.stride(2);
      } else {
        pack_tile(qt, N, d, q.stride(2), q.stride(3), qbuf.get());
        Q = qbuf.get(), ldq = std::max<int64_t>(d, 1);
      }
      if (direct_k) {
        K = reinterpret_cast<const T*>(kt), ldk = k.stride(2);
      } else {
        pack_tile(kt, N, d, k.stride(2), k.stride(3), kbuf.get());
        K = kbuf.get(), ldk = std::max<int64_t>(d, 1);
      }
      if (direct_v) {
        V = reinterpret_cast<const T*>(vt), ldv = v.stride(2);
      } else {
        pack_tile(vt, N, dv, v.stride(2), v.stride(3), vbuf.get());
        V = vbuf.get(), ldv = std::max<int64_t>(dv, 1);
      }
      tick(kPack);

      T* s = S.get();
      if (d > 0) {
        gemm_rowmajor<T>(true, N, N, d, T(1), Q, ldq, K, ldk, s, N, use_blas);
      } else {
        std::fill(s, s + NN, T(0));
      }
      tick(kQK);
      softmax_rows(s, N, tscale, ls_ptr == nullptr ? nullptr : ls_ptr + b * N);
      tick(kSoftmax);

      if (kk > 0) {
        T tau;
        if constexpr (std::is_same_v<T, float>) {
          tau = !radix                     ? nth_select(s, NN, kk, copy.get())
                : select == Select::kRadix ? radix_select(s, NN, kk, hist.get(), cand.get())
                                           : select_kth(s, NN, kk, hist.get(), cand.get(),
                                                        samp.get(), select == Select::kWindowed);
        } else {
          tau = nth_select(s, NN, kk, copy.get());
        }
        tick(kSelect);
        if (strategy.needs_psi()) {
          std::fill(colsum.get(), colsum.get() + N, T(0));
          T* cs = colsum.get();
          for (int64_t i = 0; i < N; ++i) {
            T* row = s + i * N;
            for (int64_t j = 0; j < N; ++j) {
              const T a = row[j] < tau ? T(0) : row[j];
              row[j] = a;
              cs[j] += a;
            }
          }
        } else {
          for (int64_t e = 0; e < NN; ++e) s[e] = s[e] < tau ? T(0) : s[e];
        }
      } else if (strategy.needs_psi()) {
        std::fill(colsum.get(), colsum.get() + N, T(0));
        T* cs = colsum.get();
        for (int64_t i = 0; i < N; ++i) {
          const T* row = s + i * N;
          for (int64_t j = 0; j < N; ++j) cs[j] += row[j];
        }
      }
      if (piece_ptr != nullptr) {
        // first piece: gamma (diag) or cls (row 0); second: psi (column sums)
        T* first = piece_ptr + tile * n_img;
        T* second = piece_ptr + piece_stride + tile * n_img;
        for (int64_t j = 0; j < n_img; ++j) {
          const int64_t c = num_prefix + j;
          if (strategy.needs_gamma()) first[j] = s[c * N + c];
          if (strategy.needs_cls()) first[j] = s[c];
          if (strategy.needs_psi()) second[j] = colsum[c];
        }
      }
      tick(kMask);

      // out[b, :, h, :] is an (N x dv) row-major block with row stride H * dv
      if (dv > 0) {
        if constexpr (std::is_same_v<scalar_t, T>) {
          gemm_rowmajor<T>(false, N, dv, N, T(1), s, N, V, ldv, op + b * N * H * dv + h * dv,
                           H * dv, use_blas);
        } else {
          gemm_rowmajor<T>(false, N, dv, N, T(1), s, N, V, ldv, obuf.get(), dv, use_blas);
          scalar_t* o = op + b * N * H * dv + h * dv;
          for (int64_t i = 0; i < N; ++i) {
            for (int64_t c = 0; c < dv; ++c) {
              o[i * H * dv + c] = static_cast<scalar_t>(obuf[i * dv + c]);
            }
          }
        }
      }
      tick(kAV);
    }
  });

  if (profile.on) {
    for (size_t t = 0; t < thread_secs.size(); ++t) profile.secs[t % kNumPhases] += thread_secs[t];
  }
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v,
                                                  const std::optional<at::Tensor>& log_sizes,
                                                  double scale, double sparsity,
                                                  int64_t num_prefix, c10::string_view score) {
  const ScoreStrategy strategy = args::check_attention(q, k, v, log_sizes, scale, sparsity,
                                                       num_prefix, score, c10::DeviceType::CPU);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const float* ls_ptr = nullptr;
  at::Tensor ls;
  if (log_sizes.has_value()) {
    ls = log_sizes->contiguous();
    ls_ptr = ls.const_data_ptr<float>();
  }
  const int64_t n_img = N - num_prefix;
  auto [out, score_out] = args::attention_outputs(q, v, num_prefix, strategy);
  if (B == 0 || N == 0) return {out, score_out};
  const int64_t kk = attention::num_masked(N, sparsity);
  const char* sel_env = std::getenv("GTP_ATTENTION_SELECT");
  const std::string sel = sel_env == nullptr ? "" : sel_env;
  const Select select = sel == "nth_element"       ? Select::kNthElement
                        : sel == "radix"           ? Select::kRadix
                        : sel == "windowed_scalar" ? Select::kWindowedScalar
                                                   : Select::kWindowed;
  const char* gemm_env = std::getenv("GTP_ATTENTION_GEMM");
  const bool use_blas = gemm_env == nullptr || std::string(gemm_env) != "aten";
  const char* prof_env = std::getenv("GTP_ATTENTION_PROFILE");
  Profile profile;
  profile.on = prof_env != nullptr && prof_env[0] != '\0';

  const bool is_double = q.scalar_type() == at::kDouble;
  const auto acc = is_double ? at::kDouble : at::kFloat;
  at::Tensor pieces;
  if (strategy.kind != ScoreKind::kNone) {
    pieces = at::empty({2, B, H, n_img}, q.options().dtype(acc));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gtp.attention", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attention_kernel<scalar_t, T>(q, k, v, ls_ptr, scale, kk, num_prefix, strategy, select,
                                  use_blas, out, pieces, profile);
    if (strategy.kind != ScoreKind::kNone) {
      const T* first = pieces.const_data_ptr<T>();
      const T* second = first + B * H * n_img;
      float* so = score_out.mutable_data_ptr<float>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t j = 0; j < n_img; ++j) {
            const int64_t off = b * H * n_img + j;
            so[b * n_img + j] = static_cast<float>(attention::combine_score<T>(
                strategy, first + off, second + off, first + off, H, n_img));
          }
        }
      });
    }
  });

  if (profile.on) {
    if (FILE* f = std::fopen(prof_env, "a")) {
      std::fprintf(f, "pack=%.6g qk=%.6g softmax=%.6g select=%.6g mask_scores=%.6g av=%.6g\n",
                   profile.secs[kPack], profile.secs[kQK], profile.secs[kSoftmax],
                   profile.secs[kSelect], profile.secs[kMask], profile.secs[kAV]);
      std::fclose(f);
    }
  }
  return {out, score_out};
}

#undef OP

}  // namespace
}  // namespace gtp

TORCH_LIBRARY_IMPL(gtp, CPU, m) { m.impl("attention", &gtp::attention_cpu); }
