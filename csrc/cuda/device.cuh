// Warp-collective code (shuffles, ballots, __syncwarp) only follows loops whose trip count is
// the same on every lane (`for (base = 0; base < n; base += 32) { i = base + lane; if (i < n)`)
// and branches on values the compiler knows to be warp-uniform (warp_uniform below): otherwise
// the sm_80 compiler cannot prove the warp converged and calls out-of-line sync routines, whose
// calling convention then spills registers (the build fails on spills).
//
// Every kernel states __launch_bounds__(threads, min_blocks): given only the block size, the
// CUDA 13 ptxas aims at full occupancy (2048 threads per SM, so 32 registers a thread) and
// spills to get there.
//
// Device-side building blocks of the gtp CUDA kernels: element conversions, deterministic warp
// reductions, the shared-memory histogram counter of the radix selects and the warp / block
// steps that turn a histogram into the digit holding a rank. No torch header here: the kernels'
// device code compiles against the CUDA toolkit alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/radix.h"

namespace gtp::cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Element <-> accumulator conversions (torch builds define __CUDA_NO_HALF_CONVERSIONS__, so
// every conversion is spelled out). float16 / bfloat16 / float32 accumulate in float32, float64
// in float64, as the CPU kernels and the reference do.
template <typename S>
struct Elem;

template <>
struct Elem<float> {
  using acc_t = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Elem<double> {
  using acc_t = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Elem<__half> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// max that propagates NaN (torch.amax / the softmax of a row holding NaN): NaN if either is.
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return a != a ? a : (b != b ? b : (b > a ? b : a));
}

// Butterfly (xor) reductions: every lane ends with the same, bitwise identical value, since each
// step adds the same two partial sums on both lanes (IEEE addition is commutative). The order is
// fixed, so results do not depend on timing.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_nan_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Inclusive prefix sum over the lanes of a warp.
__device__ __forceinline__ uint32_t warp_inclusive_scan(uint32_t v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t u = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

// Lane 0's value on every lane. Also tells the compiler the value is warp-uniform (its
// divergence analysis treats a shuffle from a constant lane so), which keeps branches on a warp
// index or on a row loaded by every lane from making later warp collectives "maybe divergent"
// (the out-of-line sync routines of the comment at the top of this file).
template <typename T>
__device__ __forceinline__ T warp_uniform(T v) {
  return __shfl_sync(kFullMask, v, 0);
}

__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

// Counts keys into a shared-memory histogram. Runs of equal digits on one thread are added with
// one atomic: the keys a thread visits in a row are often neighbours in a map of near-equal
// values (the near-uniform attention of an untrained ViT puts almost every probability into one
// bin), where one atomic per key would serialise the whole warp on one counter. Integer counts:
// the result does not depend on the order of the atomics.
struct RunCounter {
  uint32_t* hist;
  uint32_t bin = 0;
  uint32_t count = 0;
  __device__ explicit RunCounter(uint32_t* h) : hist(h) {}
  __device__ __forceinline__ void add(uint32_t b) {
    if (b != bin) {
      flush();
      bin = b;
    }
    ++count;
  }
  __device__ __forceinline__ void flush() {
    if (count != 0) atomicAdd(hist + bin, count);
    count = 0;
  }
};

// Where a radix select stands: the key bits fixed so far, the wanted rank among the keys that
// match them (1-based), how many keys lie below that prefix (less), and after the last level
// how many keys equal the selected one (equal).
struct SelectState {
  uint64_t prefix;  // 32-bit keys use the low half
  int64_t rank;
  int64_t less;
  int64_t equal;
};

// Warp-level step: hist holds `bins` (<= 256) counts; every lane returns the bin holding
// st.rank and updates st (rank inside the bin, keys below it added to less, equal = the bin's
// count). Lane l owns bins [8 l, 8 l + 8): an exclusive scan of the per-lane sums finds the
// owner, which runs the shared find_bucket on its eight bins.
__device__ __forceinline__ uint32_t warp_take_bucket(const uint32_t* hist, uint32_t bins,
                                                     const radix::Level& level, SelectState& st,
                                                     int lane) {
  const uint32_t per = (bins + 31) / 32;
  const uint32_t lo = min(bins, per * lane), hi = min(bins, lo + per);
  uint32_t s = 0;
  for (uint32_t u = 0; u < per; ++u) s += lo + u < hi ? hist[lo + u] : 0u;
  const uint32_t incl = warp_inclusive_scan(s, lane);
  const int64_t excl = static_cast<int64_t>(incl - s);
  const bool owner = excl < st.rank && st.rank <= static_cast<int64_t>(incl);
  const unsigned who = __ballot_sync(kFullMask, owner);
  const int src = who ? __ffs(who) - 1 : 31;
  uint32_t bucket = 0, count = 0;
  int64_t rank = st.rank;
  if (lane == src) {
    rank -= excl;
    bucket = lo + radix::find_bucket(hist + lo, hi - lo, rank);
    count = hist[bucket];
  }
  bucket = __shfl_sync(kFullMask, bucket, src);
  count = __shfl_sync(kFullMask, count, src);
  const int64_t new_rank = __shfl_sync(kFullMask, rank, src);
  st.less += st.rank - new_rank;
  st.rank = new_rank;
  st.equal = count;
  st.prefix |= static_cast<uint64_t>(bucket) << level.shift;
  return bucket;
}

// Block-level step, the same for up to 2048 bins and 32- or 64-bit keys (all threads of the
// block call it; blockDim.x a multiple of 32). scratch: 32 uint32 for the warp totals. The
// owner thread updates *st, which every thread reads after the closing barrier.
template <typename Key>
__device__ __forceinline__ void block_take_bucket(const uint32_t* hist, uint32_t bins,
                                                  const radix::LevelT<Key>& level,
                                                  SelectState* st, uint32_t* scratch) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nthreads = blockDim.x, nwarps = nthreads >> 5;
  const uint32_t per = (bins + nthreads - 1) / nthreads;
  const uint32_t lo = min(bins, per * tid), hi = min(bins, lo + per);
  uint32_t s = 0;
  for (uint32_t b = lo; b < hi; ++b) s += hist[b];
  const uint32_t incl_w = warp_inclusive_scan(s, lane);
  if (lane == 31) scratch[warp] = incl_w;
  const int64_t rank = st->rank;  // read before the barrier; the owner rewrites it after
  __syncthreads();
  uint32_t before = 0;
  for (int w = 0; w < warp && w < nwarps; ++w) before += scratch[w];
  const int64_t excl = static_cast<int64_t>(before + incl_w - s);
  const int64_t incl = static_cast<int64_t>(before + incl_w);
  if (excl < rank && rank <= incl) {  // exactly one thread
    int64_t r = rank - excl;
    const uint32_t bucket = lo + radix::find_bucket(hist + lo, hi - lo, r);
    st->less += rank - r;
    st->rank = r;
    st->equal = hist[bucket];
    st->prefix |= static_cast<uint64_t>(bucket) << level.shift;
  }
  __syncthreads();
}

// Exact r-th smallest (1-based) of the 32-bit order keys key_of(i) for i in [0, count) whose
// key_of returns true, by one warp (hist: 256 uint32 of this warp's shared memory). Returns the
// key; st.less and st.equal say how many keys lie below / equal it. Requires 1 <= r <= the
// number of keys. Four passes over the keys (8-bit digits).
template <typename KeyOf>
__device__ uint32_t warp_radix_select(KeyOf key_of, int64_t count, int64_t r, uint32_t* hist,
                                      SelectState& st, int lane) {
  st = SelectState{0u, r, 0, 0};
  for (int lv = 0; lv < radix::kKeyLevels; ++lv) {
    const radix::Level level = radix::key_level(lv);
    for (uint32_t b = 0; b < radix::kKeyBins; b += 32) hist[b + lane] = 0;
    __syncwarp();
    RunCounter counter(hist);
    for (int64_t base = 0; base < count; base += 32) {
      const int64_t i = base + lane;
      uint32_t key;
      if (i < count && key_of(i, key) && level.matches(key, static_cast<uint32_t>(st.prefix))) {
        counter.add(level.digit(key));
      }
    }
    counter.flush();
    __syncwarp();
    warp_take_bucket(hist, radix::kKeyBins, level, st, lane);
    __syncwarp();  // hist is cleared by the next level
  }
  return static_cast<uint32_t>(st.prefix);
}

}  // namespace gtp::cuda
