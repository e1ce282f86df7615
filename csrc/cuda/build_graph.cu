// build_graph on CUDA (SPEC 1): spatial / semantic / mixed token graph in ELL form.
//
// Three kernels:
//   normalise   one warp per token: E = u / max(||u||, 1e-12) in float32 into a (B, n, C)
//               scratch buffer, u = x scaled by a power of two so that no finite token
//               overflows (the CPU kernel's arithmetic, shared helpers of common/build_graph.h).
//               A token holding NaN or Inf becomes a row of NaN: its cosine similarity to every
//               token is NaN, which ranks as the most similar (the non-finite rule).
//   rows        one block per (image, R rows): the R x n similarities E_i . E_j in shared memory
//               (tiled SIMT GEMM, float32, each dot product accumulated in channel order, so two
//               identical tokens get bitwise identical similarities and an exact tie stays one),
//               then one warp per row: an exact radix select of the K-th most similar j != i
//               under the total order (order::descending_key; ties to the lower index, as the CPU
//               kernel and the reference break them), and one ascending pass over j that writes
//               the union with the grid neighbours (build_graph::spatial_neighbours) already
//               sorted by ballot prefix counts; the row's length is its out-degree.
//   weights     one thread per slot: W[i, j] = build_graph::edge_weight(d_i, d_j).
// The spatial graph (and K = 0) skips the similarities: one thread per row runs
// spatial_neighbours, as the CPU kernel does.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "common/build_graph.h"
#include "common/op_args.h"
#include "common/order.h"
#include "cuda/device.cuh"
#include "cuda/launch.h"

namespace gtp {
namespace {

#define OP "gtp.build_graph"

using build_graph::GraphType;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxRows = 32;  // similarity rows per block
constexpr int kTileCols = 64;
constexpr int kTileC = 32;          // channels per GEMM step
constexpr int kLd = kTileC + 1;     // shared row stride (no bank conflicts down a column)
constexpr int kOutPerThread = kMaxRows * kTileCols / kThreads;  // 8

// ---------------------------------------------------------------------------------------------
// normalise: one warp per token

// The token u = x * 2^-ex (build_graph::pow2_split, max |u| in [0.5, 1)) divided by
// max(||u||, 1e-12): the CPU kernel's arithmetic (csrc/cpu/build_graph.cpp, normalise_row) and
// the reference's, so no finite token overflows or underflows. Float32 / float16 / bfloat16
// tokens are scaled in float32 (powers of two: exact for normal results), ||u||^2 is the float64
// sum of squares of x times 2^-2ex; float64 tokens are scaled in float64 and rounded once.
// A token holding NaN or Inf becomes a row of NaN.
template <typename S>
__global__ void __launch_bounds__(kThreads, 4)
    normalise_kernel(const S* __restrict__ x, int64_t sb, int64_t sn, int64_t sc, int64_t batch,
                     int64_t n, int64_t channels, float* __restrict__ e) {
  constexpr bool kWide = std::is_same_v<S, double>;
  using V = std::conditional_t<kWide, double, float>;  // the token's values
  const int lane = threadIdx.x & 31;
  const int64_t t = cuda::warp_uniform(
      static_cast<int64_t>(blockIdx.x) * kWarps + static_cast<int64_t>(threadIdx.x >> 5));
  if (t >= batch * n) return;
  const S* row = x + (t / n) * sb + (t % n) * sn;
  float* out = e + t * channels;
  const auto value = [&](int64_t c) { return static_cast<V>(cuda::Elem<S>::load(row[c * sc])); };
  // Pass 1: max |x| (NaN skipped, as fmax does) and whether any entry is NaN.
  V mx = 0;
  bool nan = false;
  for (int64_t base = 0; base < channels; base += 32) {
    const int64_t c = base + lane;
    if (c < channels) {
      const V v = value(c);
      nan = nan || v != v;
      mx = fmax(mx, fabs(v));
    }
  }
  nan = __any_sync(cuda::kFullMask, nan);
  mx = cuda::warp_nan_max(mx);
  const bool bad = nan || !(mx <= std::numeric_limits<V>::max());  // NaN or an infinity
  int ex = 0, e1 = 0, e2 = 0;
  if (!bad && mx > 0) {
    if constexpr (kWide) {
      frexp(mx, &ex);
    } else {
      ex = build_graph::frexp_exponent(mx);
    }
  }
  build_graph::pow2_split(ex, &e1, &e2);
  // Pass 2: ||u||^2 in float64.
  double sumsq = 0.0;
  for (int64_t base = 0; base < channels; base += 32) {
    const int64_t c = base + lane;
    if (c < channels) {
      if constexpr (kWide) {
        const double u = static_cast<float>(value(c) * ldexp(1.0, e1) * ldexp(1.0, e2));
        sumsq += u * u;
      } else {
        const double v = value(c);
        sumsq += v * v;
      }
    }
  }
  sumsq = cuda::warp_sum(sumsq);
  if constexpr (!kWide) sumsq *= build_graph::pow2d(-2 * ex);
  const float denom = build_graph::norm_divisor(sumsq);
  // Pass 3: scale and divide, as the reference does (x * (1 / ||x||) is off by an ulp and would
  // break exact ties such as C = 1 tokens, where x / |x| = +-1 exactly).
  const float s1 = build_graph::pow2f(e1), s2 = build_graph::pow2f(e2);
  for (int64_t base = 0; base < channels; base += 32) {
    const int64_t c = base + lane;
    if (c < channels) {
      float u;
      if constexpr (kWide) {
        u = static_cast<float>(value(c) * ldexp(1.0, e1) * ldexp(1.0, e2));
      } else {
        u = __fmul_rn(__fmul_rn(value(c), s1), s2);
      }
      out[c] = bad ? __int_as_float(0x7FC00000) : __fdiv_rn(u, denom);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// rows: similarities, top-K, union, degrees

struct RowsArgs {
  const float* e;  // (B, n, C) normalised
  int64_t n, channels, height, width, k, slots;
  int rows;        // R, rows per block (<= kMaxRows)
  int blocks_per_image;
  bool mixed;
  int32_t* index;  // (B, n, slots)
  int32_t* deg;    // (B, n)
};

__global__ void __launch_bounds__(kThreads, 2) rows_kernel(RowsArgs a) {
  extern __shared__ float smem[];
  const int64_t n = a.n, C = a.channels;
  const int R = a.rows;
  float* sim = smem;                        // R x n
  float* as = sim + static_cast<int64_t>(R) * n;  // R x kLd
  float* bs = as + R * kLd;                 // kTileCols x kLd
  int32_t* spatial = reinterpret_cast<int32_t*>(bs + kTileCols * kLd);  // kWarps x 8
  uint32_t* hist = reinterpret_cast<uint32_t*>(spatial + kWarps * 8);  // kWarps x 256

  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = cuda::warp_uniform(tid >> 5);
  const int64_t b = blockIdx.x / a.blocks_per_image;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x % a.blocks_per_image) * R;
  const float* eb = a.e + b * n * C;

  // Similarities of rows i0 .. i0 + R - 1 with every token. Thread tid computes outputs
  // (row tid / 64 + 4 u, column tid % 64) of each R x 64 tile, u < R * 64 / kThreads.
  const int col = tid % kTileCols, row0 = tid / kTileCols;
  const int outs = (R * kTileCols + kThreads - 1) / kThreads;
  for (int64_t j0 = 0; j0 < n; j0 += kTileCols) {
    float acc[kOutPerThread];
#pragma unroll
    for (int u = 0; u < kOutPerThread; ++u) acc[u] = 0.0f;
    for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
      __syncthreads();  // the previous step's tiles are consumed
      for (int t = tid; t < R * kTileC; t += kThreads) {
        const int r = t / kTileC, c = t % kTileC;
        const int64_t i = i0 + r;
        as[r * kLd + c] = i < n && c0 + c < C ? eb[i * C + c0 + c] : 0.0f;
      }
      for (int t = tid; t < kTileCols * kTileC; t += kThreads) {
        const int r = t / kTileC, c = t % kTileC;
        const int64_t j = j0 + r;
        bs[r * kLd + c] = j < n && c0 + c < C ? eb[j * C + c0 + c] : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int c = 0; c < kTileC; ++c) {
        const float bv = bs[col * kLd + c];
#pragma unroll
        for (int u = 0; u < kOutPerThread; ++u) {
          if (u < outs) acc[u] = fmaf(as[(row0 + 4 * u) * kLd + c], bv, acc[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kOutPerThread; ++u) {
      const int r = row0 + 4 * u;
      const int64_t j = j0 + col;
      if (u < outs && r < R && j < n) sim[r * n + j] = acc[u];
    }
  }
  __syncthreads();

  // One warp per row: the K most similar j != i, then the sorted union with the grid
  // neighbours, written straight into the ELL row.
  const unsigned below = cuda::lanes_below(lane);
  for (int r = warp; r < R; r += kWarps) {
    const int64_t i = i0 + r;
    if (i >= n) break;  // warp-uniform
    const float* srow = sim + static_cast<int64_t>(r) * n;
    cuda::SelectState st;
    const uint32_t t = cuda::warp_radix_select(
        [&](int64_t j, uint32_t& key) {
          key = order::descending_key(srow[j]);
          return j != i;
        },
        n, a.k, hist + warp * radix::kKeyBins, st, lane);
    int ns = 0;  // lane 0 writes the grid neighbours to the warp's list; all lanes read it
    if (a.mixed) {
      if (lane == 0) ns = build_graph::spatial_neighbours(i, a.height, a.width, spatial + warp * 8);
      ns = cuda::warp_uniform(ns);
      __syncwarp();
    }
    int32_t* out = a.index + (b * n + i) * a.slots;
    int64_t count = 0, eq_seen = 0;
    for (int64_t base = 0; base < n; base += 32) {
      const int64_t j = base + lane;
      const bool valid = j < n && j != i;
      const uint32_t key = valid ? order::descending_key(srow[j]) : 0u;
      const bool eq = valid && key == t;
      const unsigned eq_mask = __ballot_sync(cuda::kFullMask, eq);
      const int64_t eq_before = eq_seen + __popc(eq_mask & below);
      bool take = valid && order::rank_selected(key, t, eq_before, st.less, st.equal, a.k,
                                                /*lower_first=*/true);
      for (int s = 0; s < ns; ++s) take = take || (valid && spatial[warp * 8 + s] == j);
      const unsigned m = __ballot_sync(cuda::kFullMask, take);
      if (take) out[count + __popc(m & below)] = static_cast<int32_t>(j);
      count += __popc(m);
      eq_seen += __popc(eq_mask);
    }
    for (int64_t base = count; base < a.slots; base += 32) {
      if (base + lane < a.slots) out[base + lane] = -1;
    }
    if (lane == 0) a.deg[b * n + i] = static_cast<int32_t>(count);
    __syncwarp();  // the warp's spatial list and histogram are reused by its next row
  }
}

// ---------------------------------------------------------------------------------------------
// spatial graph (and K = 0): one thread per row

__global__ void __launch_bounds__(kThreads, 4)
    spatial_kernel(int64_t rows, int64_t n, int64_t height, int64_t width, int64_t slots,
                   int32_t* __restrict__ index, int32_t* __restrict__ deg) {
  const int64_t bi = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (bi >= rows) return;
  int32_t* row = index + bi * slots;
  const int count = build_graph::spatial_neighbours(bi % n, height, width, row);
  for (int64_t s = count; s < slots; ++s) row[s] = -1;
  deg[bi] = count;
}

// ---------------------------------------------------------------------------------------------
// weights: one thread per slot

__global__ void __launch_bounds__(kThreads, 4)
    weights_kernel(int64_t total, int64_t n, int64_t slots, const int32_t* __restrict__ index,
                   const int32_t* __restrict__ deg, float* __restrict__ weight) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= total) return;
  const int64_t bi = t / slots;
  const int32_t j = index[t];
  const int32_t* deg_b = deg + (bi / n) * n;
  weight[t] = j >= 0 ? build_graph::edge_weight(deg[bi], deg_b[j]) : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// host

size_t rows_smem(int rows, int64_t n) {
  return sizeof(float) * (static_cast<size_t>(rows) * n + rows * kLd + kTileCols * kLd) +
         sizeof(int32_t) * kWarps * 8 + sizeof(uint32_t) * kWarps * radix::kKeyBins;
}

unsigned grid_for(int64_t items, int64_t per_block) {
  return cuda::grid_blocks(items, per_block, OP);
}

std::tuple<at::Tensor, at::Tensor> build_graph_cuda(const at::Tensor& tokens, int64_t height,
                                                    int64_t width, int64_t num_neighbours,
                                                    c10::string_view graph) {
  const GraphType g = args::check_build_graph(tokens, height, width, num_neighbours, graph,
                                              c10::DeviceType::CUDA);
  const int64_t B = tokens.size(0), n = tokens.size(1), C = tokens.size(2);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t k = num_neighbours;
  const int64_t slots = build_graph::graph_width(g, k);
  at::Tensor index = at::empty({B, n, slots}, tokens.options().dtype(at::kInt));
  at::Tensor weight = at::empty({B, n, slots}, tokens.options().dtype(at::kFloat));
  if (B == 0 || slots == 0) return {index, weight};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = tokens.get_device();
  at::Tensor deg = at::empty({B, n}, tokens.options().dtype(at::kInt));
  int32_t* idx = index.mutable_data_ptr<int32_t>();
  int32_t* dg = deg.mutable_data_ptr<int32_t>();

  if (g == GraphType::Spatial || k == 0) {
    spatial_kernel<<<grid_for(B * n, kThreads), kThreads, 0, stream>>>(B * n, n, height, width,
                                                                       slots, idx, dg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    at::Tensor e = at::empty({B, n, C}, tokens.options().dtype(at::kFloat));
    cuda::dispatch_floating(tokens.scalar_type(), OP, [&](auto tag) {
      using S = decltype(tag);
      normalise_kernel<S><<<grid_for(B * n, kWarps), kThreads, 0, stream>>>(
          cuda::data_as<S>(tokens), tokens.stride(0), tokens.stride(1), tokens.stride(2), B, n,
          C, e.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // As many rows per block as shared memory allows (up to 32): each block reads all n
    // tokens' E once per row block.
    const size_t limit = static_cast<size_t>(cuda::max_shared_optin(device));
    int rows = kMaxRows;
    while (rows > 1 && rows_smem(rows, n) > limit) rows /= 2;
    RowsArgs a{};
    a.e = e.const_data_ptr<float>();
    a.n = n;
    a.channels = C;
    a.height = height;
    a.width = width;
    a.k = k;
    a.slots = slots;
    a.rows = rows;
    a.blocks_per_image = static_cast<int>((n + rows - 1) / rows);
    a.mixed = g == GraphType::Mixed;
    a.index = idx;
    a.deg = dg;
    const size_t smem = rows_smem(rows, n);
    cuda::allow_dynamic_shared(rows_kernel, smem, device, OP,
                               "one row of n similarities (semantic graph)");
    rows_kernel<<<grid_for(B * a.blocks_per_image, 1), kThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  weights_kernel<<<grid_for(B * n * slots, kThreads), kThreads, 0, stream>>>(
      B * n * slots, n, slots, idx, dg, weight.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index, weight};
}

#undef OP

}  // namespace
}  // namespace gtp

TORCH_LIBRARY_IMPL(gtp, CUDA, m) { m.impl("build_graph", &gtp::build_graph_cuda); }
