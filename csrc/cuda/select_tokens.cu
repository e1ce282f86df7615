// select_tokens on CUDA (SPEC 3): per row, the P lowest scores are propagated, the rest kept.
//
// One warp per row. The order is (score ascending under the project's total order, NaN
// greatest; position descending), so among equal scores the higher position is propagated first
// and the lower one kept. An exact radix select over the 32-bit order keys (four 8-bit digits,
// a 256-bin histogram per warp in shared memory) finds the P-th smallest key t, how many keys
// lie below it and how many equal it; one more pass over the row, 32 positions at a time, marks
// the propagated tokens (keys below t, and the equal ones at the highest positions) and writes
// both lists already ascending by ballot prefix counts. No float arithmetic at all: the result
// equals the CPU kernel's bit for bit.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/op_args.h"
#include "common/order.h"
#include "cuda/device.cuh"
#include "cuda/launch.h"

namespace gtp {
namespace {

#define OP "gtp.select_tokens"

constexpr int kWarps = 4;  // rows per block

__global__ void __launch_bounds__(32 * kWarps, 4)
    select_tokens_kernel(const float* __restrict__ score, int64_t s0, int64_t s1, int64_t batch,
                         int64_t n, int64_t num_prop, int64_t* __restrict__ keep,
                         int64_t* __restrict__ prop) {
  __shared__ uint32_t hist[kWarps][radix::kKeyBins];
  const int warp = cuda::warp_uniform(static_cast<int>(threadIdx.x >> 5)), lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (b >= batch) return;  // whole warps only; no block-wide barrier below
  const float* row = score + b * s0;
  int64_t* krow = keep + b * (n - num_prop);
  int64_t* prow = prop + b * num_prop;

  cuda::SelectState st{0u, 0, 0, 0};
  uint32_t t = 0;
  if (num_prop > 0) {
    t = cuda::warp_radix_select(
        [&](int64_t i, uint32_t& key) {
          key = order::order_key(row[i * s1]);
          return true;
        },
        n, num_prop, hist[warp], st, lane);
  }
  int64_t nk = 0, np = 0, eq_seen = 0;
  const unsigned below = cuda::lanes_below(lane);
  for (int64_t base = 0; base < n; base += 32) {
    const int64_t i = base + lane;
    const bool valid = i < n;
    const uint32_t key = valid ? order::order_key(row[i * s1]) : 0u;
    const bool eq = valid && num_prop > 0 && key == t;
    const unsigned eq_mask = __ballot_sync(cuda::kFullMask, eq);
    const int64_t eq_before = eq_seen + __popc(eq_mask & below);
    const bool is_prop = valid && num_prop > 0 &&
                         order::rank_selected(key, t, eq_before, st.less, st.equal, num_prop,
                                              /*lower_first=*/false);
    const unsigned pm = __ballot_sync(cuda::kFullMask, is_prop);
    const unsigned km = __ballot_sync(cuda::kFullMask, valid && !is_prop);
    if (is_prop) {
      prow[np + __popc(pm & below)] = i;
    } else if (valid) {
      krow[nk + __popc(km & below)] = i;
    }
    np += __popc(pm);
    nk += __popc(km);
    eq_seen += __popc(eq_mask);
  }
}

std::tuple<at::Tensor, at::Tensor> select_tokens_cuda(const at::Tensor& score, int64_t num_prop) {
  args::check_select_tokens(score, num_prop, c10::DeviceType::CUDA);
  const int64_t B = score.size(0), n = score.size(1), P = num_prop;
  const c10::cuda::CUDAGuard guard(score.device());
  at::Tensor keep = at::empty({B, n - P}, score.options().dtype(at::kLong));
  at::Tensor prop = at::empty({B, P}, score.options().dtype(at::kLong));
  if (B == 0) return {keep, prop};

  // Any strides: the kernel reads score[b * s0 + i * s1].
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  select_tokens_kernel<<<cuda::grid_blocks(B, kWarps, OP), 32 * kWarps, 0, stream>>>(
      score.const_data_ptr<float>(), score.stride(0), score.stride(1), B, n, P,
      keep.mutable_data_ptr<int64_t>(), prop.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {keep, prop};
}

#undef OP

}  // namespace
}  // namespace gtp

TORCH_LIBRARY_IMPL(gtp, CUDA, m) { m.impl("select_tokens", &gtp::select_tokens_cuda); }
