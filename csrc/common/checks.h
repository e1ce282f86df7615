// Argument checks shared by every kernel entry point. Each names the op and the argument,
// so a user sees "gtp.propagate: index must be int32, got Long" rather than a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace gtp {

// TORCH_CHECK_VALUE raises ValueError in Python, as the reference's checks do, so a bad argument
// gives the same exception type on every backend.
#define GTP_CHECK_DIM(op, t, name, d)                                                           \
  TORCH_CHECK_VALUE((t).dim() == (d), op ": " name " must have ", d, " dimensions, got shape ", \
                    (t).sizes())

#define GTP_CHECK_DTYPE(op, t, name, dt)                                                    \
  TORCH_CHECK_VALUE((t).scalar_type() == (dt), op ": " name " must be ", c10::toString(dt), \
                    ", got ", (t).scalar_type())

#define GTP_CHECK_FLOATING(op, t, name)                                                         \
  TORCH_CHECK_VALUE((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||        \
                        (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble, \
                    op ": " name " must be float32, float16, bfloat16 or float64, got ",        \
                    (t).scalar_type())

#define GTP_CHECK_SAME_DEVICE(op, a, aname, b, bname)                                         \
  TORCH_CHECK_VALUE((a).device() == (b).device(),                                             \
                    op ": " bname " must be on the same device as " aname " (", (a).device(), \
                    "), got ", (b).device())

#define GTP_CHECK_DEVICE_TYPE(op, t, name, dev_type)                                            \
  TORCH_CHECK_VALUE((t).device().type() == (dev_type), op ": " name " must be on ", (dev_type), \
                    ", got ", (t).device())

}  // namespace gtp
