// select_tokens on CPU (SPEC 3): per row, the P lowest scores are propagated, the rest kept.
//
// Order: (score ascending, position descending), so among equal scores the higher position is
// propagated first and the lower one kept. Scores rank -inf < finite < +inf < NaN (all NaNs
// equal, as torch.sort orders them): NaN scores are kept first, and no score is rejected. One nth_element per row (on packed integer keys)
// finds the P-th token of that order; a linear scan then writes both lists already ascending.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/checks.h"

namespace gtp {
namespace {

#define OP "gtp.select_tokens"

// Ascending keys <=> (score ascending, position descending). -0.0 is folded into +0.0 (they
// compare equal as floats), every NaN into one positive quiet NaN (whose key is above +inf's);
// the float's bits are mapped so that unsigned order = float order.
inline uint64_t sort_key(float score, int64_t position) {
  uint32_t bits;
  const float s = score + 0.0f;  // -0.0 -> +0.0
  std::memcpy(&bits, &s, sizeof(bits));
  bits = s != s ? 0x7fc00000u : bits;
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(position));
}

std::tuple<at::Tensor, at::Tensor> select_tokens_cpu(const at::Tensor& score, int64_t num_prop) {
  GTP_CHECK_DIM(OP, score, "score", 2);
  TORCH_CHECK_VALUE(score.scalar_type() == at::kFloat, OP ": score must be float32, got ",
                    score.scalar_type());
  const int64_t B = score.size(0), n = score.size(1), P = num_prop;
  TORCH_CHECK_VALUE(P >= 0 && P <= n - 1, OP ": num_prop must be in [0, n - 1] = [0, ", n - 1,
                    "], got ", P);
  TORCH_CHECK_VALUE(n <= (int64_t{1} << 32), OP ": score.shape[1] must be at most 2^32, got ", n);
  at::Tensor keep = at::empty({B, n - P}, score.options().dtype(at::kLong));
  at::Tensor prop = at::empty({B, P}, score.options().dtype(at::kLong));
  if (B == 0) return {keep, prop};

  const at::Tensor s = score.contiguous();
  const float* sp = s.const_data_ptr<float>();
  int64_t* kp = keep.data_ptr<int64_t>();
  int64_t* pp = prop.data_ptr<int64_t>();

  // A row costs O(n); threads only pay off from ~1e5 scores (a DeiT batch of 64 x 196 runs in
  // tens of microseconds on one core, less than a parallel region's wake-up on a busy machine).
  at::parallel_for(0, B, std::max<int64_t>(1, 131072 / n), [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(n);
    for (int64_t b = begin; b < end; ++b) {
      const float* row = sp + b * n;
      int64_t* krow = kp + b * (n - P);
      int64_t* prow = pp + b * P;
      if (P == 0) {
        std::iota(krow, krow + n, int64_t{0});
        continue;
      }
      // One integer key per token orders (score ascending, position descending): the
      // order-preserving bits of the score above the complemented position. Integer keys
      // make nth_element cheaper than a comparator that reads the scores indirectly.
      for (int64_t i = 0; i < n; ++i) keys[i] = sort_key(row[i], i);
      std::nth_element(keys.begin(), keys.begin() + (P - 1), keys.end());
      const uint64_t last = keys[P - 1];  // the P-th token propagated
      int64_t nk = 0, np = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (sort_key(row[i], i) <= last) {
          prow[np++] = i;
        } else {
          krow[nk++] = i;
        }
      }
    }
  });
  return {keep, prop};
}

#undef OP

}  // namespace
}  // namespace gtp

TORCH_LIBRARY_IMPL(gtp, CPU, m) { m.impl("select_tokens", &gtp::select_tokens_cpu); }
