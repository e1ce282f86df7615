// The project's one total order on float values and the tie rules built on it (COORDINATION.md,
// the non-finite rule): -Inf < finite < +Inf < NaN, all NaNs equal (sign and payload ignored),
// -0.0 == +0.0. Ranking ops (select_tokens, the semantic top-K of build_graph) map every value to
// a 32-bit key whose unsigned order is that order, select by key with a radix select, and break
// ties between equal keys by position. Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace gtp::order {

// Unsigned order of the keys = the total order above. Negative floats have their bits flipped
// (larger magnitude = smaller), non-negative ones get the sign bit set (above every negative).
GTP_HOST_DEVICE inline uint32_t order_key(float x) {
  if (x != x) return 0xFFFFFFFFu;  // every NaN: above +Inf (0xFF800000)
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) == 0) u = 0;  // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Key under which the most similar value ranks first (descending order of values, NaN first).
GTP_HOST_DEVICE inline uint32_t descending_key(float x) { return ~order_key(x); }

// The r-th smallest key t of a set is known, with `less` keys below it and `equal` keys equal
// to it (less < r <= less + equal). Whether an element with `key` is among the r selected ones:
// every key below t is, and need = r - less of the equal ones are. lower_first: the equal keys
// at the lowest positions are taken (eq_before = how many equal keys sit at lower positions);
// otherwise the ones at the highest positions.
GTP_HOST_DEVICE inline bool rank_selected(uint32_t key, uint32_t t, int64_t eq_before,
                                          int64_t less, int64_t equal, int64_t r,
                                          bool lower_first) {
  if (key != t) return key < t;
  const int64_t need = r - less;
  return lower_first ? eq_before < need : eq_before >= equal - need;
}

}  // namespace gtp::order
