// Per-row pieces of build_graph (SPEC 1) shared by the CPU kernel and a future CUDA kernel:
// grid neighbours, the top-K insertion with its tie rule, the sorted union, the edge weight.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace gtp::build_graph {

enum class GraphType : int { Spatial = 0, Semantic = 1, Mixed = 2 };

constexpr int kSpatialWidth = 8;

// Slots per row: 8 (spatial), K (semantic), 8 + K (mixed).
GTP_HOST_DEVICE inline int64_t graph_width(GraphType g, int64_t k) {
  return g == GraphType::Spatial ? kSpatialWidth
                                 : (g == GraphType::Semantic ? k : kSpatialWidth + k);
}

// The 8-neighbourhood of token t on a row-major height x width grid, written in ascending
// order to out[0..8). Returns how many (3 to 8 on grids of at least 2 x 2).
GTP_HOST_DEVICE inline int spatial_neighbours(int64_t t, int64_t height, int64_t width,
                                              int32_t* out) {
  const int64_t r = t / width, c = t % width;
  int count = 0;
  for (int64_t dr = -1; dr <= 1; ++dr) {
    const int64_t rr = r + dr;
    if (rr < 0 || rr >= height) continue;
    for (int64_t dc = -1; dc <= 1; ++dc) {
      const int64_t cc = c + dc;
      if (cc < 0 || cc >= width || (dr == 0 && dc == 0)) continue;
      out[count++] = static_cast<int32_t>(rr * width + cc);
    }
  }
  return count;
}

// Is candidate (s, j) more similar than (t, i)? Ties go to the lower index, which makes the
// order total and the result independent of the order candidates arrive in.
GTP_HOST_DEVICE inline bool ranks_before(float s, int32_t j, float t, int32_t i) {
  return s > t || (s == t && j < i);
}

// Top-K insertion for candidates offered in ascending j (every j larger than those held), into
// a full list score[0..k) (unfilled slots hold -inf). A tie with a held entry then always
// loses, so plain `>` decides. The caller has already checked s > score[k - 1]. No early
// exit: the position of s is data dependent, and a fixed trip count lets the compiler use
// selects instead of a loop exit that mispredicts.
GTP_HOST_DEVICE inline void topk_insert_ascending(float* score, int32_t* idx, int k, float s,
                                                  int32_t j) {
  for (int p = k - 1; p > 0; --p) {  // descending: score[p - 1] still holds its old value
    const float a = score[p - 1], b = score[p];
    const int32_t ia = idx[p - 1], ib = idx[p];
    const bool after_prev = s > a;  // s moves above position p - 1: shift it down
    const bool here = s > b;
    score[p] = after_prev ? a : (here ? s : b);
    idx[p] = after_prev ? ia : (here ? j : ib);
  }
  const bool first = s > score[0];
  score[0] = first ? s : score[0];
  idx[0] = first ? j : idx[0];
}

// Sorts v[0..count) ascending (count is small: K or 8 + K).
GTP_HOST_DEVICE inline void sort_small(int32_t* v, int count) {
  for (int a = 1; a < count; ++a) {
    const int32_t x = v[a];
    int p = a;
    while (p > 0 && v[p - 1] > x) {
      v[p] = v[p - 1];
      --p;
    }
    v[p] = x;
  }
}

// Union of two ascending lists without duplicates into out; returns its length.
GTP_HOST_DEVICE inline int merge_union(const int32_t* a, int na, const int32_t* b, int nb,
                                       int32_t* out) {
  int i = 0, j = 0, n = 0;
  while (i < na || j < nb) {
    if (j >= nb || (i < na && a[i] < b[j])) {
      out[n++] = a[i++];
    } else if (i >= na || b[j] < a[i]) {
      out[n++] = b[j++];
    } else {  // in both graphs: one edge
      out[n++] = a[i++];
      ++j;
    }
  }
  return n;
}

// Before normalising, a token is scaled by 2^-ex, where ex is the frexp exponent of its max |x|
// (max |x| = f * 2^ex, f in [0.5, 1)), so that its largest entry lies in [0.5, 1) and neither
// the sum of squares nor the norm can overflow or underflow. The factor is applied as two
// powers of two 2^e1 * 2^e2 (e1 + e2 = -ex), each representable in float32 and float64:
// ex > 0: (0, -ex), one scaling down, a single rounding (only of entries that end up
// subnormal); ex <= 0: -ex split in halves, both scalings up, exact. The result is x * 2^-ex
// correctly rounded, whichever precision computes it, so every backend gets the same bits.
GTP_HOST_DEVICE inline void pow2_split(int ex, int* e1, int* e2) {
  *e1 = ex > 0 ? 0 : (-ex) / 2;
  *e2 = -ex - *e1;
}

// W[i, j] = 1 / sqrt(d_i d_j) in float64, rounded once to float32 (the reference does the same,
// so the weights agree bit for bit).
GTP_HOST_DEVICE inline float edge_weight(int32_t di, int32_t dj) {
  return static_cast<float>(1.0 / sqrt(static_cast<double>(di) * static_cast<double>(dj)));
}

}  // namespace gtp::build_graph
