// Digit logic of the exact radix selects (the attention threshold, the ranking of select_tokens
// and of the semantic top-K), shared by the CPU and CUDA kernels. A select fixes the key's
// digits from the most significant one down: at each level it counts the keys that match the
// digits fixed so far by their next digit (a histogram), and find_bucket picks the digit that
// holds the wanted rank. After the last level every bit is fixed: the key is the r-th smallest.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace gtp::radix {

// One digit level: the digit is bits [shift, shift + bits) of the key (uint32_t or uint64_t).
template <typename Key>
struct LevelT {
  int shift;
  int bits;
  GTP_HOST_DEVICE constexpr uint32_t bins() const { return 1u << bits; }
  GTP_HOST_DEVICE constexpr uint32_t digit(Key key) const {
    return static_cast<uint32_t>(key >> shift) & ((1u << bits) - 1u);
  }
  // Whether key agrees with `prefix` on every bit above this level (the digits fixed so far).
  GTP_HOST_DEVICE constexpr bool matches(Key key, Key prefix) const {
    return (static_cast<uint64_t>(key ^ prefix) >> (shift + bits)) == 0;
  }
};
using Level = LevelT<uint32_t>;
using Level64 = LevelT<uint64_t>;

// Probability keys (attention::prob_key: non-negative floats, sign bit 0): 31 bits as 11 + 11 + 9,
// three levels of at most 2048 bins. The first level is the CPU select's level 1 (bits 20..30).
constexpr int kProbLevels = 3;
GTP_HOST_DEVICE constexpr Level prob_level(int level) {
  return level == 0 ? Level{20, 11} : (level == 1 ? Level{9, 11} : Level{0, 9});
}
constexpr uint32_t kProbMaxBins = 2048;

// float64 probabilities: the 63 bits of the sign-cleared double as 11 + 11 + 11 + 10 + 10 + 10.
constexpr int kProbLevels64 = 6;
GTP_HOST_DEVICE constexpr Level64 prob_level64(int level) {
  // shifts 52, 41, 30, 20, 10, 0 (arithmetic, not a table: a table indexed by a loop variable
  // would be a local-memory array on the GPU)
  return level < 3 ? Level64{52 - 11 * level, 11} : Level64{20 - 10 * (level - 3), 10};
}

GTP_HOST_DEVICE inline uint64_t prob_key64(double p) {
  uint64_t u;
  memcpy(&u, &p, sizeof u);
  return u & 0x7FFFFFFFFFFFFFFFull;  // a stray -0.0 or negative NaN sorts as its magnitude
}

GTP_HOST_DEVICE inline double key_prob64(uint64_t u) {
  double p;
  memcpy(&p, &u, sizeof p);
  return p;
}

// Order keys (order::order_key, all 32 bits): four levels of 8 bits, 256 bins.
constexpr int kKeyLevels = 4;
GTP_HOST_DEVICE constexpr Level key_level(int level) { return Level{24 - 8 * level, 8}; }
constexpr uint32_t kKeyBins = 256;

// Rank `rank` (1-based) inside a histogram of `bins` counts: returns the bin that holds it and
// turns rank into the rank inside that bin. If rank exceeds the total, returns the last bin.
template <typename Count>
GTP_HOST_DEVICE inline uint32_t find_bucket(const Count* hist, uint32_t bins, int64_t& rank) {
  int64_t below = 0;
  uint32_t b = 0;
  for (; b + 1 < bins && below + static_cast<int64_t>(hist[b]) < rank; ++b) {
    below += static_cast<int64_t>(hist[b]);
  }
  rank -= below;
  return b;
}

}  // namespace gtp::radix
