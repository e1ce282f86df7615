// Host-side helpers of the CUDA entry points: device limits (cached per device), the error flag
// of kernels that validate index arguments, dtype dispatch to CUDA's own element types.
//
// Only light torch headers (ATen/core, c10/cuda): ATen/ATen.h and ATen/cuda/CUDAContext.h
// would be parsed three times per .cu file (host pass + one device pass per architecture) and
// dominate the build time on CI's two cores.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>

namespace gtp::cuda {

constexpr int kMaxDevices = 64;

// A device attribute, cached per device (queried once; the atomics make concurrent first
// calls from several threads well defined).
inline int device_attribute(cudaDeviceAttr attr, int slot, int device) {
  static std::array<std::array<std::atomic<int>, kMaxDevices>, 3> cache{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "gtp: CUDA device index ", device,
              " out of range");
  std::atomic<int>& c = cache[slot][device];
  int v = c.load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
    c.store(v, std::memory_order_relaxed);
  }
  return v;
}

// Shared memory a block may opt in to (227 KiB on H100/H200, 163 KiB on A100).
inline int max_shared_optin(int device) {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 0, device);
}

inline int num_sms(int device) {
  return device_attribute(cudaDevAttrMultiProcessorCount, 1, device);
}

inline int compute_major(int device) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor, 2, device);
}

// Reads the int32 error flag that a kernel raised bits in: one device -> host copy and a stream
// synchronisation, the price of reporting out-of-range index arguments with the same ValueError
// as the CPU kernel. While the stream is being captured into a CUDA graph a synchronisation is
// not allowed: then 0 is returned and the check is skipped (the kernels ignore bad entries, so
// the result is still memory safe, just not reported).
inline int read_error_flag(const int32_t* flag, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return 0;
  int32_t host = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&host, flag, sizeof host, cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

// Lets `kernel` use `bytes` of dynamic shared memory. Above the default 48 KiB (static shared
// memory included) a block must opt in, up to the device's limit; beyond that the input is too
// large for this kernel on this GPU, which is said with the op's name and what needs the memory.
template <typename Kernel>
void allow_dynamic_shared(Kernel kernel, size_t bytes, int device, const char* op,
                          const char* what) {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t total = bytes + attr.sharedSizeBytes;
  if (total <= 48 * 1024) return;
  const size_t limit = static_cast<size_t>(max_shared_optin(device));
  TORCH_CHECK_VALUE(total <= limit, op, ": ", what, " needs ", total,
                    " bytes of shared memory per block; this GPU allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// Blocks for `items` work items at `per_block` a block, checked against the grid limit.
inline unsigned grid_blocks(int64_t items, int64_t per_block, const char* op) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= 0x7FFFFFFF, op, ": input too large for one launch (", items, " items)");
  return static_cast<unsigned>(blocks);
}

// Calls fn(T{}) with T the CUDA element type of `dtype` (float, double, __half,
// __nv_bfloat16); c10::Half / c10::BFloat16 have the same bits, so data pointers are
// reinterpreted.
template <typename Fn>
void dispatch_floating(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kDouble:
      fn(double{});
      break;
    case at::kHalf:
      fn(__half{});
      break;
    case at::kBFloat16:
      fn(__nv_bfloat16{});
      break;
    default:
      TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", dtype);
  }
}

template <typename T>
const T* data_as(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data_as(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

}  // namespace gtp::cuda
