// Per-element arithmetic of gtp.attention that a CPU and a CUDA kernel share: the threshold
// rank, the order-preserving float key of the radix select, a branch-free exp for the softmax,
// and the combination of per-head score pieces into one importance score (SPEC 2, 3).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace gtp::attention {

// Which per-head pieces a strategy reads, and how heads are combined (max or mean).
enum class ScoreKind : int { kNone = 0, kMixed, kDiag, kColsum, kCls, kSum };

struct ScoreStrategy {
  ScoreKind kind = ScoreKind::kNone;
  bool mean = false;  // mean over heads (else max)

  GTP_HOST_DEVICE bool needs_gamma() const {
    return kind == ScoreKind::kMixed || kind == ScoreKind::kDiag || kind == ScoreKind::kSum;
  }
  GTP_HOST_DEVICE bool needs_psi() const {
    return kind == ScoreKind::kMixed || kind == ScoreKind::kColsum || kind == ScoreKind::kSum;
  }
  GTP_HOST_DEVICE bool needs_cls() const { return kind == ScoreKind::kCls; }
};

// kk = int(N * N * (1 - theta)) in double precision, exactly as Python computes
// int(N * N * (1.0 - theta)): the 1-based rank of the threshold among the N*N probabilities of
// one head. 0 means nothing is masked.
GTP_HOST_DEVICE inline int64_t num_masked(int64_t num_tokens, double sparsity) {
  return static_cast<int64_t>(static_cast<double>(num_tokens * num_tokens) * (1.0 - sparsity));
}

// Radix key of a probability. For x >= 0 the IEEE bit pattern orders like the value, so the
// kk-th smallest key is the kk-th smallest probability. The sign bit is cleared so that a stray
// -0.0 or negative NaN cannot index outside the top-level histogram (softmax outputs are >= +0).
// Every NaN (any sign or payload) then keys above +inf (0x7f800000), so the order is the one of
// less_nan_last: when the kk-th key is a NaN key, fewer than kk entries are non-NaN, tau is
// NaN whatever its payload, and `A < tau` zeroes nothing.
GTP_HOST_DEVICE inline uint32_t prob_key(float p) {
  uint32_t u;
  memcpy(&u, &p, sizeof u);
  return u & 0x7fffffffu;
}

GTP_HOST_DEVICE inline float key_prob(uint32_t u) {
  float p;
  memcpy(&p, &u, sizeof p);
  return p;
}

// exp(x) for x <= 0 (the softmax after subtracting the row max), within ~2 ulp: Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2 / 2, and the Cephes degree-6 polynomial for exp(r).
// Branch free (selects only), so a loop over a row vectorises. Results below the smallest
// normal float (x < -87.34) flush to 0, where a libm exp returns a subnormal: a difference of
// less than 1.2e-38 in a probability. x = -inf gives 0; x = NaN gives NaN (a row holding NaN
// or +inf logits, or only -inf ones, becomes NaN, as torch.softmax makes it).
//
// 2^n is built from the bits of the rounding sum t = 1.5 * 2^23 + n, not by a float-to-int
// cast: the low mantissa bits of t hold n in two's complement, so (bits(t) + 127) << 23 is the
// float 2^n for -126 <= n <= 0 (the high bits shift out). That is unsigned integer arithmetic,
// defined for every input; a cast of NaN to int would be undefined behaviour (UBSan's
// float-cast-overflow), and for NaN x the garbage 2^n only multiplies a NaN.
GTP_HOST_DEVICE inline float exp_nonpositive(float x) {
  const float lo = -87.33654475f;  // ln(2^-126)
  const float xc = x < lo ? lo : x;
  // round(xc / ln2) by the 1.5 * 2^23 trick (exact for |n| < 2^22, no call to rint)
  const float t = xc * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = fmaf(n, -0.693359375f, xc);  // ln2 split hi/lo: n * hi is exact
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float y = fmaf(p * r, r, r) + 1.0f;
  uint32_t bits;
  memcpy(&bits, &t, sizeof bits);
  bits = (bits + 127u) << 23;  // 2^n
  float two_n;
  memcpy(&two_n, &bits, sizeof two_n);
  return x < lo ? 0.0f : y * two_n;
}

// Total order of the ranking decisions (the threshold's kk-th smallest, top-K, token
// selection): -inf < finite < +inf < NaN, all NaNs equal, as torch.sort / kthvalue / topk
// order them. `a` comes strictly before `b`:
template <typename T>
GTP_HOST_DEVICE inline bool less_nan_last(T a, T b) {
  return a < b || (b != b && a == a);
}

// Importance score of one image token from its per-head pieces: gamma (diagonal A[h, j, j]),
// psi (column sum of A[h, :, j]) and cls (A[h, 0, j]), each read at ptr[h * stride] for
// h < heads (heads >= 1). Unused pieces may be null.
// The max over heads propagates NaN (torch.amax does: one NaN head gives NaN), whichever head
// holds it; the mean propagates it by arithmetic.
template <typename T>
GTP_HOST_DEVICE inline T reduce_heads(const T* x, int64_t heads, int64_t stride, bool mean) {
  T r = x[0];
  for (int64_t h = 1; h < heads; ++h) {
    const T v = x[h * stride];
    r = mean ? r + v : ((v > r || v != v) ? v : r);  // r NaN: neither holds, r stays NaN
  }
  return mean ? r / static_cast<T>(heads) : r;
}

template <typename T>
GTP_HOST_DEVICE inline T combine_score(ScoreStrategy s, const T* gamma, const T* psi,
                                       const T* cls, int64_t heads, int64_t stride) {
  switch (s.kind) {
    case ScoreKind::kMixed:
      return reduce_heads(gamma, heads, stride, s.mean) * reduce_heads(psi, heads, stride, s.mean);
    case ScoreKind::kDiag:
      return reduce_heads(gamma, heads, stride, s.mean);
    case ScoreKind::kColsum:
      return reduce_heads(psi, heads, stride, s.mean);
    case ScoreKind::kCls:
      return reduce_heads(cls, heads, stride, s.mean);
    case ScoreKind::kSum:
      return reduce_heads(gamma, heads, stride, false) + reduce_heads(psi, heads, stride, false);
    default:
      return T(0);
  }
}

}  // namespace gtp::attention
