// propagate on CUDA (SPEC 4): kept image tokens absorb their propagated graph neighbours, the
// propagated tokens are removed, and the graph shrinks to the survivors.
//
// Gather form, no atomics in the result: one warp per output row, lanes over channels. A block
// owns up to kRows output rows of one image. It first builds that image's old -> new position
// map in shared memory (n int32: new_pos[keep[r]] = r, -1 for a propagated token), checking
// keep for range and duplicates on the way, and checks its share of the image's index entries
// for range (error bits go to a flag the host reads after the launch). Then per kept row the
// warp re-indexes the graph row 32 slots at a time (ballots keep the surviving slots in slot
// order) and collects the slots whose neighbour is propagated (propagate::absorbs). Rows that
// absorb nothing, and every row when alpha == 0, are a vectorised row copy; the others compute
// x_i + alpha * sum over absorbing slots, in slot order, of w * x_j, channel by channel in
// float32 (float64 for float64 x), the CPU kernel's order (common/propagate.h,
// propagate_channel), written in x's dtype. Rows are read with 16-byte vector loads when x's
// rows are aligned, else element by element.
//
// Memory: x is read once (kept rows plus the propagated rows they absorb, from L2 when several
// rows absorb the same token), the output written once; shared memory holds n int32 per block.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/op_args.h"
#include "common/propagate.h"
#include "cuda/device.cuh"
#include "cuda/launch.h"

namespace gtp {
namespace {

#define OP "gtp.propagate"

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 64;  // output rows per block (8 per warp)

struct Args {
  int64_t batch, big_n, channels, prefix, n, kept, width;
  int64_t index_share;  // index entries each block checks: ceil(n * width / chunks)
  uint32_t chunks;      // blocks per image
  int64_t sx0, sx1;  // x strides (elements); the channel stride is 1
  double alpha;
  const void* x;
  void* out;
  const int32_t* index;
  const float* weight;
  const int64_t* keep;
  const float* sizes;  // nullptr when sizes is None
  int32_t* index_out;
  float* weight_out;
  float* sizes_out;
  int32_t* err;
};

// V consecutive elements, loaded and stored as one 16-byte access (V = 1: a plain element).
template <typename S, int V>
struct alignas(sizeof(S) * V) Vec {
  S v[V];
};

template <typename S, int V>
__device__ __forceinline__ Vec<S, V> load_vec(const S* p) {
  return *reinterpret_cast<const Vec<S, V>*>(p);
}

template <typename S, int V>
__device__ __forceinline__ void store_vec(S* p, const Vec<S, V>& x) {
  *reinterpret_cast<Vec<S, V>*>(p) = x;
}

// A row of `channels` elements from src to dst (lanes over vectors of V). src and dst never
// alias (x and the output are separate tensors): __restrict__ lets the unrolled loop issue its
// loads before the stores, so a warp keeps several 512-byte requests in flight.
template <typename S, int V>
__device__ __forceinline__ void copy_row(S* __restrict__ dst, const S* __restrict__ src,
                                         int64_t channels, int lane) {
#pragma unroll 4
  for (int64_t base = 0; base < channels; base += 32 * V) {
    const int64_t c = base + lane * V;
    if (c < channels) store_vec<S, V>(dst + c, load_vec<S, V>(src + c));
  }
}

// Four blocks (32 warps) per SM: enough loads in flight for a memory-bound gather, 64 registers.
template <typename S, int V>
__global__ void __launch_bounds__(kThreads, 4) propagate_kernel(Args a) {
  using acc_t = typename cuda::Elem<S>::acc_t;
  extern __shared__ int32_t new_pos[];  // a.n entries
  __shared__ int32_t slot_j[kWarps][32];
  __shared__ float slot_w[kWarps][32];

  const int tid = threadIdx.x, warp = cuda::warp_uniform(tid >> 5), lane = tid & 31;
  const unsigned below = cuda::lanes_below(lane);
  const int64_t b = blockIdx.x / a.chunks, chunk = blockIdx.x % a.chunks;  // 32-bit division
  const int64_t n = a.n, width = a.width, kept = a.kept;
  const int64_t* keep_b = a.keep + b * kept;

  // The old -> new position map of image b, and the argument checks (error bits, reported by
  // the host after the launch; bad entries are ignored below, so nothing reads out of bounds).
  for (int64_t j = tid; j < n; j += kThreads) new_pos[j] = -1;
  __syncthreads();
  int err = 0;
  for (int64_t r = tid; r < kept; r += kThreads) {
    const int64_t k = keep_b[r];
    if (k < 0 || k >= n) {
      err |= propagate::kBadKeep;
    } else if (atomicExch(&new_pos[k], static_cast<int32_t>(r)) != -1) {
      err |= propagate::kDupKeep;
    }
  }
  {  // this block's share of the image's n * width index entries
    const int64_t total = n * width;
    const int64_t lo = min(total, chunk * a.index_share), hi = min(total, lo + a.index_share);
    const int32_t* idx_b = a.index + b * total;
    for (int64_t t = lo + tid; t < hi; t += kThreads) {
      const int32_t j = idx_b[t];
      err |= (j < -1 || j >= n) ? propagate::kBadIndex : 0;
    }
  }
  if (err != 0) atomicOr(a.err, err);
  __syncthreads();

  const int64_t rows_out = a.prefix + kept;
  const int64_t o_end = min(rows_out, (chunk + 1) * kRows);
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  const float alpha_f = static_cast<float>(a.alpha);
  for (int64_t o = chunk * kRows + warp; o < o_end; o += kWarps) {  // o is warp-uniform
    const S* x_img = reinterpret_cast<const S*>(a.x) + b * a.sx0;
    S* dst = reinterpret_cast<S*>(a.out) + (b * rows_out + o) * a.channels;
    const float* sizes_b = a.sizes != nullptr ? a.sizes + b * a.big_n : nullptr;
    float* size_dst = a.sizes_out != nullptr ? a.sizes_out + b * rows_out + o : nullptr;
    if (o < a.prefix) {  // prefix tokens pass through
      copy_row<S, V>(dst, x_img + o * a.sx1, a.channels, lane);
      if (size_dst != nullptr && lane == 0) *size_dst = sizes_b[o];
      continue;
    }
    const int64_t r = o - a.prefix;
    const int64_t i = cuda::warp_uniform(keep_b[r]);
    if (i < 0 || i >= n) continue;  // reported by the flag; the output is discarded
    const int32_t* idx = a.index + (b * n + i) * width;
    const float* w = a.weight + (b * n + i) * width;
    int32_t* idx_out = a.index_out + (b * kept + r) * width;
    float* w_out = a.weight_out + (b * kept + r) * width;

    // Re-index the graph row: surviving slots compacted in slot order, their neighbour
    // replaced by its new position (what propagate::reindex_row does on the CPU); count the
    // absorbing slots and, for sizes, accumulate w * s_j over them in slot order (through the
    // warp's slot buffer).
    int64_t out_pos = 0, absorbed = 0;
    float sacc = 0.0f;
    for (int64_t sb = 0; sb < width; sb += 32) {
      const int64_t s = sb + lane;
      const bool in = s < width;
      const int32_t j = in ? idx[s] : -1;
      const float wv = in ? w[s] : 0.0f;
      const bool valid = j >= 0 && j < n;
      const int32_t q = valid ? new_pos[j] : -1;
      const bool survives = q >= 0;
      const bool absorb = valid && propagate::absorbs(j, new_pos);
      const unsigned sm = __ballot_sync(cuda::kFullMask, survives);
      const unsigned am = __ballot_sync(cuda::kFullMask, absorb);
      if (survives) {
        const int64_t p = out_pos + __popc(sm & below);
        idx_out[p] = q;
        w_out[p] = wv;
      }
      if (size_dst != nullptr) {
        if (absorb) {
          slot_j[warp][__popc(am & below)] = j;
          slot_w[warp][__popc(am & below)] = wv;
        }
        __syncwarp();
        // every lane runs the same sum (broadcast reads); lane 0 stores it
        for (int t = 0; t < __popc(am); ++t) {
          sacc += slot_w[warp][t] * sizes_b[a.prefix + slot_j[warp][t]];
        }
        __syncwarp();
      }
      out_pos += __popc(sm);
      absorbed += __popc(am);
    }
    for (int64_t base = out_pos; base < width; base += 32) {  // padding
      const int64_t t = base + lane;
      if (t < width) {
        idx_out[t] = -1;
        w_out[t] = 0.0f;
      }
    }

    const S* xi = x_img + (a.prefix + i) * a.sx1;
    if (absorbed == 0 || a.alpha == 0.0) {  // nothing to absorb, or plain pruning: a row copy
      copy_row<S, V>(dst, xi, a.channels, lane);
      if (size_dst != nullptr && lane == 0) *size_dst = sizes_b[a.prefix + i];
      continue;
    }
    if (size_dst != nullptr && lane == 0) *size_dst = sizes_b[a.prefix + i] + alpha_f * sacc;

    // Channels in groups of 32 * V; each group walks the absorbing slots again (32 at a time,
    // through the slot buffer) so that the accumulators stay in registers for any width.
    for (int64_t cg = 0; cg < a.channels; cg += 32 * V) {
      const int64_t c = cg + lane * V;
      const bool active = c < a.channels;
      acc_t acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = acc_t(0);
      for (int64_t sb = 0; sb < width; sb += 32) {
        const int64_t s = sb + lane;
        const int32_t j = s < width ? idx[s] : -1;
        const bool absorb = j >= 0 && j < n && propagate::absorbs(j, new_pos);
        const unsigned am = __ballot_sync(cuda::kFullMask, absorb);
        if (absorb) {
          slot_j[warp][__popc(am & below)] = j;
          slot_w[warp][__popc(am & below)] = w[s];
        }
        __syncwarp();
        const int count = __popc(am);
        for (int t = 0; t < count; ++t) {
          const acc_t wt = static_cast<acc_t>(slot_w[warp][t]);
          if (active) {
            const Vec<S, V> xj = load_vec<S, V>(x_img + (a.prefix + slot_j[warp][t]) * a.sx1 + c);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] += wt * cuda::Elem<S>::load(xj.v[e]);
          }
        }
        __syncwarp();
      }
      if (active) {
        const Vec<S, V> xv = load_vec<S, V>(xi + c);
        Vec<S, V> res;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          res.v[e] = cuda::Elem<S>::store(cuda::Elem<S>::load(xv.v[e]) + alpha * acc[e]);
        }
        store_vec<S, V>(dst + c, res);
      }
    }
  }
}

template <typename S, int V>
void launch(const Args& a, size_t smem, int device, cudaStream_t stream) {
  const auto kernel = propagate_kernel<S, V>;
  cuda::allow_dynamic_shared(kernel, smem, device, OP, "the position map of n image tokens");
  const int64_t blocks = a.batch * a.chunks;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_cuda(
    const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& keep,
    double alpha, int64_t num_prefix, const std::optional<at::Tensor>& sizes) {
  args::check_propagate(x, index, weight, keep, alpha, num_prefix, sizes, c10::DeviceType::CUDA);
  const int64_t batch = x.size(0), big_n = x.size(1), channels = x.size(2);
  const int64_t n = big_n - num_prefix, kept = keep.size(1);
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), OP ": N - num_prefix must fit int32, got ", n);

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t width = index.size(2);
  const int64_t rows_out = num_prefix + kept;
  auto [x_out, sizes_out, index_out, weight_out] =
      args::propagate_outputs(x, index, weight, keep, num_prefix, sizes.has_value());
  if (batch == 0 || rows_out == 0) return {x_out, sizes_out, index_out, weight_out};

  // Channels must be unit-stride (rows are copied and read as vectors); batch and token strides
  // are free.
  const at::Tensor xc = x.stride(2) == 1 || channels <= 1 ? x : x.contiguous();
  const at::Tensor ic = index.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor kc = keep.contiguous();
  const at::Tensor sc = sizes.has_value() ? sizes->contiguous() : at::Tensor();
  at::Tensor err = at::empty({1}, x.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(err.mutable_data_ptr(), 0, sizeof(int32_t), stream));

  Args a{};
  a.batch = batch;
  a.big_n = big_n;
  a.channels = channels;
  a.prefix = num_prefix;
  a.n = n;
  a.kept = kept;
  a.width = width;
  const int64_t chunks = (rows_out + kRows - 1) / kRows;
  TORCH_CHECK(batch * chunks <= 0x7FFFFFFF, OP ": B * (N - P) too large for one launch");
  a.chunks = static_cast<uint32_t>(chunks);
  a.index_share = (n * width + chunks - 1) / chunks;
  a.sx0 = xc.stride(0);
  a.sx1 = xc.stride(1);
  a.alpha = alpha;
  a.x = xc.const_data_ptr();
  a.out = x_out.mutable_data_ptr();
  a.index = ic.const_data_ptr<int32_t>();
  a.weight = wc.const_data_ptr<float>();
  a.keep = kc.const_data_ptr<int64_t>();
  a.sizes = sc.defined() ? sc.const_data_ptr<float>() : nullptr;
  a.index_out = index_out.mutable_data_ptr<int32_t>();
  a.weight_out = weight_out.mutable_data_ptr<float>();
  a.sizes_out = sc.defined() ? sizes_out.mutable_data_ptr<float>() : nullptr;
  a.err = err.mutable_data_ptr<int32_t>();

  const size_t smem = static_cast<size_t>(n) * sizeof(int32_t);
  const int device = x.get_device();
  cuda::dispatch_floating(x.scalar_type(), OP, [&](auto tag) {
    using S = decltype(tag);
    constexpr int kVec = 16 / static_cast<int>(sizeof(S));
    const bool vec = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && a.sx0 % kVec == 0 &&
                     a.sx1 % kVec == 0 && channels % kVec == 0;
    if (vec) {
      launch<S, kVec>(a, smem, device, stream);
    } else {
      launch<S, 1>(a, smem, device, stream);
    }
  });
  const int bad = cuda::read_error_flag(a.err, stream);
  args::raise_propagate_errors(bad, n);
  return {x_out, sizes_out, index_out, weight_out};
}

#undef OP

}  // namespace
}  // namespace gtp

TORCH_LIBRARY_IMPL(gtp, CUDA, m) { m.impl("propagate", &gtp::propagate_cuda); }
