// Per-row pieces of propagate (SPEC 4) shared by the CPU kernel and a future CUDA kernel:
// the graph-row re-index/compaction through the old -> new position map, the test for a slot
// whose neighbour is propagated into the row, and the per-channel weighted gather-accumulate.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace gtp::propagate {

// Bits of the per-call error flag, raised by the kernels and turned into a named error after.
constexpr int kBadIndex = 1;  // an index entry outside [-1, n)
constexpr int kBadKeep = 2;   // a keep entry outside [0, n)
constexpr int kDupKeep = 4;   // a keep entry twice in a row

// Fill the old -> new position map of one image: new_pos[keep[r]] = r, -1 for the propagated
// tokens. new_pos has n entries. Returns 0 or the error bits above (then new_pos is partial).
GTP_HOST_DEVICE inline int build_position_map(const int64_t* keep, int64_t kept, int64_t n,
                                              int32_t* new_pos) {
  for (int64_t j = 0; j < n; ++j) new_pos[j] = -1;
  int err = 0;
  for (int64_t r = 0; r < kept; ++r) {
    const int64_t k = keep[r];
    if (k < 0 || k >= n) {
      err |= kBadKeep;
      continue;
    }
    if (new_pos[k] >= 0) err |= kDupKeep;
    new_pos[k] = static_cast<int32_t>(r);
  }
  return err;
}

// How many of the `count` index entries lie outside [-1, n). One unsigned compare each and an
// integer sum, so the loop vectorises.
GTP_HOST_DEVICE inline int64_t count_out_of_range(const int32_t* idx, int64_t count, int64_t n) {
  const uint64_t limit = static_cast<uint64_t>(n);
  int64_t bad = 0;
  for (int64_t t = 0; t < count; ++t)
    bad += static_cast<uint64_t>(static_cast<int64_t>(idx[t]) + 1) > limit ? 1 : 0;
  return bad;
}

// Whether slot neighbour j (already range-checked) is propagated into the row.
GTP_HOST_DEVICE inline bool absorbs(int32_t j, const int32_t* new_pos) {
  return j >= 0 && new_pos[j] < 0;
}

// Re-index one graph row of `width` slots: slots whose neighbour is kept are compacted to the
// front, in slot order, with the neighbour replaced by its new position and the weight copied;
// the rest of the output row is -1 / 0. Returns the number of slots whose neighbour is
// propagated into this row; sets kBadIndex in *err for entries outside [-1, n), which are
// then ignored (the caller raises an error after the pass).
GTP_HOST_DEVICE inline int64_t reindex_row(const int32_t* idx, const float* w, int64_t width,
                                           const int32_t* new_pos, int64_t n, int32_t* idx_out,
                                           float* w_out, int* err) {
  // Branch-free: every slot is written at the current output position, which only advances
  // past a surviving one (out <= s, so writes stay in the row and later ones overwrite).
  // Which slots survive is data-dependent and mispredicts a branchy loop. Needs n >= 1, which
  // holds whenever a kept row exists.
  int64_t out = 0;
  int64_t absorbed = 0;
  int bad = 0;
  for (int64_t s = 0; s < width; ++s) {
    const int32_t j = idx[s];
    const bool valid = j >= 0 && j < n;
    bad |= (j < -1 || j >= n) ? 1 : 0;
    const int32_t q = valid ? new_pos[valid ? j : 0] : -1;
    idx_out[out] = q;
    w_out[out] = w[s];
    out += q >= 0 ? 1 : 0;
    absorbed += (valid && q < 0) ? 1 : 0;
  }
  for (; out < width; ++out) {
    idx_out[out] = -1;
    w_out[out] = 0.0f;
  }
  if (bad) *err |= kBadIndex;
  return absorbed;
}

// One channel of a kept row: x_i + alpha * sum over absorbing slots of w * x_j, accumulated in
// acc_t in slot order (the reference's order). `row(j)` returns a pointer to image token j;
// Load converts a stored element to acc_t. A CUDA kernel calls this with one thread per
// channel; the CPU kernel runs the same arithmetic slot-outer, channel-inner to vectorise.
template <typename acc_t, typename scalar_t, typename RowFn, typename Load>
GTP_HOST_DEVICE inline acc_t propagate_channel(const scalar_t* xi, const int32_t* idx,
                                               const float* w, int64_t width,
                                               const int32_t* new_pos, int64_t n, acc_t alpha,
                                               int64_t c, RowFn row, Load load) {
  acc_t acc = 0;
  for (int64_t s = 0; s < width; ++s) {
    const int32_t j = idx[s];
    if (j < 0 || j >= n || new_pos[j] >= 0) continue;
    acc += static_cast<acc_t>(w[s]) * load(row(j)[c]);
  }
  return load(xi[c]) + alpha * acc;
}

}  // namespace gtp::propagate
