// GTP_HOST_DEVICE marks per-row helpers that a CPU kernel and a CUDA kernel share.
#pragma once

#if defined(__CUDACC__)
#define GTP_HOST_DEVICE __host__ __device__
#else
#define GTP_HOST_DEVICE
#endif
