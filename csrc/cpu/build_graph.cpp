// build_graph on CPU (SPEC 1): spatial / semantic / mixed token graph in ELL form.
//
// Semantic part, per task (one image, one block of rb rows): the image's tokens are
// L2-normalised once into a float32 (n, C) buffer, then similarities are computed one
// rb x cb tile at a time (one GEMM each; rb <= n, cb <= 512, so a thread holds at most one
// tile, never a (B, n, n) similarity) and every row keeps a running top-K
// (csrc/common/build_graph.h). Per row and tile, a cheap lower bound on the K-th best
// (group maxima) plus a branch-free compaction leave only a handful of columns to insert.
// Columns arrive in ascending order, so a candidate that only ties the current K-th best
// loses (the lower index wins) with a plain `>`. A second pass turns out-degrees into
// weights 1 / sqrt(d_i d_j), which needs every row of the image done.
//
// Non-finite tokens raise nothing (no check, no sync on a GPU): a token holding NaN or Inf has
// NaN similarity to every other token, NaN ranks as the most similar (ties to the lower
// index), and its own row's K neighbours are the K lowest other indices. Degrees, hence
// weights, stay finite.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/build_graph.h"
#include "common/checks.h"

namespace gtp {
namespace {

#define OP "gtp.build_graph"

using build_graph::GraphType;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// A lower bound on the K-th largest of v[0..c). The columns form G interleaved groups
// (t % G); each group's maximum is one of its elements and the groups are disjoint, so at
// least K elements are >= the K-th largest group maximum, and anything below it cannot be in
// the top K. Column-wise maxima vectorise; the bound then lets most columns skip the top-K
// list. G is a template argument so that the fixed-size loops vectorise.
template <int G>
float group_max_bound(const float* v, int64_t c, int64_t k) {
  float m[G];
  std::fill(m, m + G, kNegInf);
  int64_t t = 0;
  for (; t + G <= c; t += G) {
    for (int l = 0; l < G; ++l) m[l] = v[t + l] > m[l] ? v[t + l] : m[l];  // tiles hold no NaN
  }
  for (int l = 0; t + l < c; ++l) m[l] = v[t + l] > m[l] ? v[t + l] : m[l];
  // The K-th largest with multiplicity is the largest m[a] with at least K entries >= it.
  // Counting is branch-free and vectorises; a sort or nth_element here mispredicts a lot.
  int ge[G] = {};
  for (int b = 0; b < G; ++b) {
    const float mb = m[b];
    for (int a = 0; a < G; ++a) ge[a] += mb >= m[a] ? 1 : 0;
  }
  float kth = kNegInf;
  for (int a = 0; a < G; ++a) kth = (ge[a] >= k && m[a] > kth) ? m[a] : kth;
  return kth;
}

// About 2K groups give a bound near the K-th largest at little cost; -inf (no bound) for K > 32
// (larger K goes through select_large_k).
float topk_lower_bound(const float* v, int64_t c, int64_t k) {
  if (k <= 16) return group_max_bound<32>(v, c, k);
  if (k <= 32) return group_max_bound<64>(v, c, k);
  return kNegInf;
}

// Above this K, one selection per row and tile (O(K + c)) beats insertion (O(K) per insert).
constexpr int64_t kInsertMaxK = 32;  // measured crossover: 24 to 48 on DeiT-S shapes

// Large K: merge the K best so far with this tile's c columns and keep the K best by
// (score descending, index ascending) with nth_element. Unfilled slots (-inf, -1) and the
// row's own column (-inf) sort below every finite similarity.
void select_large_k(const float* srow, int64_t c, int64_t j0, int64_t k, float* bs,
                    int32_t* bj, std::pair<float, int32_t>* buf) {
  for (int64_t p = 0; p < k; ++p) buf[p] = {bs[p], bj[p]};
  for (int64_t t = 0; t < c; ++t) buf[k + t] = {srow[t], static_cast<int32_t>(j0 + t)};
  std::nth_element(buf, buf + (k - 1), buf + k + c, [](const auto& a, const auto& b) {
    return build_graph::ranks_before(a.first, a.second, b.first, b.second);
  });
  for (int64_t p = 0; p < k; ++p) {
    bs[p] = buf[p].first;
    bj[p] = buf[p].second;
  }
}

// Writes the t in [0, c) with v[t] > thr to out, ascending; returns how many. Branch-free:
// a data-dependent branch per column mispredicts. AVX-512 compresses 16 columns at a time.
int64_t compact_above(const float* v, int64_t c, float thr, int32_t* out) {
  int64_t m = 0, t = 0;
#if defined(__AVX512F__)
  const __m512 vthr = _mm512_set1_ps(thr);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; t + 16 <= c; t += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + t), vthr, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_epi32(out + m, hit, idx);
    m += __builtin_popcount(hit);
    idx = _mm512_add_epi32(idx, step);
  }
#endif
  for (; t < c; ++t) {
    out[m] = static_cast<int32_t>(t);
    m += v[t] > thr ? 1 : 0;
  }
  return m;
}

GraphType parse_graph(std::string_view graph) {
  if (graph == "spatial") return GraphType::Spatial;
  if (graph == "semantic") return GraphType::Semantic;
  if (graph == "mixed") return GraphType::Mixed;
  TORCH_CHECK_VALUE(false, OP ": graph must be 'spatial', 'semantic' or 'mixed', got '", graph,
                    "'");
}

// One token, L2-normalised in float32 as the reference does: u / max(||u||, 1e-12) of the exact
// power-of-two scaling u = x * 2^-ex of build_graph::pow2_split (max |u| in [0.5, 1)), so that
// no finite token overflows or underflows (float32 near 1e30, float64 beyond float32's range,
// subnormal tokens); for tokens in float32's normal range the scaling changes no bit of the
// result, and the clamp only acts on a zero token, which stays 0. Returns false, with e
// unspecified, when the token holds a NaN or an infinity: its similarities are then NaN.
//
// Float32 / float16 / bfloat16 tokens (float values): three vectorised passes, as without the
// scaling: convert + max |x|; the sum of squares of x in float64 over 8 independent lanes (no
// float value overflows or underflows there), times 2^-2ex (exact) for that of u; scale +
// divide. Float64 tokens are scaled in float64 before their one rounding to float32.
// frexp's exponent of a finite float m > 0 and the floats / doubles 2^k, from the bits: the libm
// calls cost as much as a pass over a token (one token takes three).
inline int frexp_exponent(float m) {
  const uint32_t bits = std::bit_cast<uint32_t>(m);
  const int biased = static_cast<int>(bits >> 23);
  return biased != 0 ? biased - 126 : -117 - __builtin_clz(bits);  // subnormal: from the top bit
}

inline float pow2f(int k) {  // k in [-149, 127]
  return k >= -126 ? std::bit_cast<float>(static_cast<uint32_t>(k + 127) << 23)
                   : std::bit_cast<float>(uint32_t{1} << (k + 149));
}

inline double pow2d(int k) {  // k in [-1022, 1023]
  return std::bit_cast<double>(static_cast<uint64_t>(k + 1023) << 52);
}

template <typename scalar_t>
bool normalise_row(const scalar_t* x, int64_t stride_c, int64_t C, float* e) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {};
  auto sum_lanes = [&acc] {
    double sumsq = 0.0;
    for (int l = 0; l < kLanes; ++l) sumsq += acc[l];
    return sumsq;
  };
  int ex = 0, e1 = 0, e2 = 0;
  double sumsq = 0.0;
  float s1 = 1.0f, s2 = 1.0f;  // the float path's scale, applied in the divide pass
  if constexpr (std::is_same_v<scalar_t, double>) {
    double mx = 0.0;
#pragma omp simd reduction(max : mx)
    for (int64_t c = 0; c < C; ++c) {
      const double a = std::fabs(x[c * stride_c]);
      mx = a > mx ? a : mx;  // skips NaN: the sum of squares below catches it
    }
    if (!(mx <= std::numeric_limits<double>::max())) return false;  // an infinity
    if (mx > 0.0) std::frexp(mx, &ex);
    build_graph::pow2_split(ex, &e1, &e2);
    const double d1 = std::ldexp(1.0, e1), d2 = std::ldexp(1.0, e2);
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float u = static_cast<float>(x[(c + l) * stride_c] * d1 * d2);
        e[c + l] = u;
        acc[l] += static_cast<double>(u) * u;
      }
    }
    for (; c < C; ++c) {
      const float u = static_cast<float>(x[c * stride_c] * d1 * d2);
      e[c] = u;
      acc[0] += static_cast<double>(u) * u;
    }
    sumsq = sum_lanes();
  } else {
    float mx = 0.0f;
    if (stride_c == 1) {
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < C; ++c) {
        e[c] = static_cast<float>(x[c]);
        const float a = std::fabs(e[c]);
        mx = a > mx ? a : mx;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        e[c] = static_cast<float>(x[c * stride_c]);
        const float a = std::fabs(e[c]);
        mx = a > mx ? a : mx;
      }
    }
    if (!(mx <= std::numeric_limits<float>::max())) return false;  // an infinity
    if (mx > 0.0f) ex = frexp_exponent(mx);
    build_graph::pow2_split(ex, &e1, &e2);
    s1 = pow2f(e1);
    s2 = pow2f(e2);
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(e[c + l]) * e[c + l];
    }
    for (; c < C; ++c) acc[0] += static_cast<double>(e[c]) * e[c];
    // ||u||^2 = 2^-2ex ||x||^2 exactly (float64 holds every float's square); the squares of
    // the entries of u that round (subnormal ones) are far below an ulp of the sum.
    sumsq = sum_lanes() * pow2d(-2 * ex);
  }
  if (sumsq != sumsq) return false;  // a NaN
  // Divide, as the reference does: x * (1 / ||x||) is cheaper but off by an ulp, which breaks
  // exact ties such as C = 1 tokens (x / |x| = +-1 exactly, x * (1 / |x|) not always).
  const float denom = std::max(static_cast<float>(std::sqrt(sumsq)), 1e-12f);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) e[c] = (e[c] * s1 * s2) / denom;
  return true;
}

// Row i's final neighbour list (spatial, semantic or their union; ascending) into the ELL
// row, -1 padded. Returns the out-degree.
int32_t write_row(GraphType g, int64_t i, int64_t height, int64_t width, int32_t* sem, int k,
                  int32_t* row, int64_t slots) {
  int32_t spatial[build_graph::kSpatialWidth];
  int ns = 0;
  if (g != GraphType::Semantic) ns = build_graph::spatial_neighbours(i, height, width, spatial);
  int count = 0;
  if (g == GraphType::Spatial || k == 0) {
    std::copy(spatial, spatial + ns, row);
    count = ns;
  } else {
    if (k > kInsertMaxK) {
      std::sort(sem, sem + k);
    } else {
      build_graph::sort_small(sem, k);
    }
    if (g == GraphType::Semantic) {
      std::copy(sem, sem + k, row);
      count = k;
    } else {
      count = build_graph::merge_union(spatial, ns, sem, k, row);
    }
  }
  std::fill(row + count, row + slots, -1);
  return count;
}

// Rows per task and columns per similarity tile. Whole images when there are enough of them
// to keep every thread busy; otherwise row blocks so that small batches still parallelise.
void choose_tiles(int64_t batch, int64_t n, int64_t* rb, int64_t* cb) {
  *cb = std::min<int64_t>(n, 512);
  int64_t rows = n <= 512 ? n : 128;
  const int64_t want_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  while (rows > 32 && batch * ((n + rows - 1) / rows) < want_tasks) rows = (rows + 1) / 2;
  *rb = rows;
}

template <typename scalar_t>
void semantic_rows(const at::Tensor& tokens, int64_t height, int64_t width, int64_t k,
                   GraphType g, int32_t* index, int32_t* deg, int64_t slots) {
  const int64_t B = tokens.size(0), n = tokens.size(1), C = tokens.size(2);
  const int64_t sb = tokens.stride(0), sn = tokens.stride(1), sc = tokens.stride(2);
  const scalar_t* x = tokens.const_data_ptr<scalar_t>();
  int64_t rb, cb;
  choose_tiles(B, n, &rb, &cb);
  const int64_t blocks = (n + rb - 1) / rb;
  const auto fopt = at::TensorOptions().dtype(at::kFloat);

  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor e = at::empty({n, C}, fopt);  // this image's normalised tokens
    at::Tensor tile = at::empty({rb * cb}, fopt);
    float* ep = e.data_ptr<float>();
    float* tp = tile.data_ptr<float>();
    std::vector<float> best_s(rb * k);
    std::vector<int32_t> best_j(rb * k);
    std::vector<int32_t> cand_buf(cb);
    std::vector<std::pair<float, int32_t>> pairs(k > kInsertMaxK ? k + cb : 0);
    std::vector<char> bad(n);  // token holds NaN / Inf
    int32_t* cand = cand_buf.data();
    int64_t cur = -1;
    bool cur_bad = false;  // the image has such a token
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * rb;
      const int64_t r = std::min(rb, n - i0);
      if (b != cur) {  // consecutive tasks of one thread mostly share the image
        cur_bad = false;
        for (int64_t i = 0; i < n; ++i) {
          float* ei = ep + i * C;
          // C = 0: a zero token (similarity 0 to every token); tokens may then be a null
          // pointer, which takes no offset
          bad[i] = C > 0 && !normalise_row(x + b * sb + i * sn, sc, C, ei);
          if (bad[i]) std::fill(ei, ei + C, 0.0f);  // its similarities are set below
          cur_bad |= bad[i] != 0;
        }
        cur = b;
      }
      // Unfilled slots hold -inf: every finite similarity beats them, so the first K
      // candidates fill the list through the same insertion as the rest.
      std::fill(best_s.begin(), best_s.end(), kNegInf);
      std::fill(best_j.begin(), best_j.end(), -1);
      for (int64_t j0 = 0; j0 < n; j0 += cb) {
        const int64_t c = std::min(cb, n - j0);
        at::Tensor s = tile.narrow(0, 0, r * c).view({r, c});
        at::mm_out(s, e.narrow(0, i0, r), e.narrow(0, j0, c).t());
        for (int64_t q = 0; q < r; ++q) {
          const int64_t i = i0 + q;
          float* srow = tp + q * c;
          if (cur_bad) {
            // A token with NaN / Inf has NaN similarity to every token, and NaN ranks as the
            // most similar: +inf here (finite unit vectors give |s| <= ~1, never +inf), so
            // the orderings below need no NaN case and ties still go to the lower index.
            // Set explicitly rather than left to the GEMM's NaN propagation.
            constexpr float kInf = std::numeric_limits<float>::infinity();
            if (bad[i]) {
              std::fill(srow, srow + c, kInf);
            } else {
              for (int64_t t = 0; t < c; ++t) srow[t] = bad[j0 + t] ? kInf : srow[t];
            }
          }
          if (i >= j0 && i < j0 + c) srow[i - j0] = kNegInf;  // never its own neighbour
          float* bs = best_s.data() + q * k;
          int32_t* bj = best_j.data() + q * k;
          if (k > kInsertMaxK) {
            select_large_k(srow, c, j0, k, bs, bj, pairs.data());
            continue;
          }
          // A candidate must beat the K-th best strictly (on a tie the K-th has the lower
          // index: columns arrive ascending) and reach this tile's lower bound (v >= lb, i.e.
          // v > lb_below).
          const float lb_below = std::nextafter(topk_lower_bound(srow, c, k), kNegInf);
          float thr = std::max(bs[k - 1], lb_below);
          // Branch-free compaction of the columns that pass (a data-dependent branch per
          // column mispredicts), then the few survivors go through the top-K list in order.
          const int64_t m = compact_above(srow, c, thr, cand);
          for (int64_t p = 0; p < m; ++p) {
            const float v = srow[cand[p]];
            if (!(v > thr)) continue;
            build_graph::topk_insert_ascending(bs, bj, static_cast<int>(k), v,
                                               static_cast<int32_t>(j0 + cand[p]));
            thr = std::max(bs[k - 1], lb_below);
          }
        }
      }
      for (int64_t q = 0; q < r; ++q) {
        const int64_t i = i0 + q;
        deg[b * n + i] = write_row(g, i, height, width, best_j.data() + q * k,
                                   static_cast<int>(k), index + (b * n + i) * slots, slots);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> build_graph_cpu(const at::Tensor& tokens, int64_t height,
                                                   int64_t width, int64_t num_neighbours,
                                                   c10::string_view graph) {
  GTP_CHECK_DIM(OP, tokens, "tokens", 3);
  GTP_CHECK_FLOATING(OP, tokens, "tokens");
  const int64_t B = tokens.size(0), n = tokens.size(1);
  const GraphType g = parse_graph(std::string_view(graph.data(), graph.size()));
  TORCH_CHECK_VALUE(height >= 1 && width >= 1 && height * width == n,
                    OP ": height * width must equal the number of tokens n = ", n,
                    " (tokens.shape[1]), got height=", height, ", width=", width);
  TORCH_CHECK_VALUE(num_neighbours >= 0 && num_neighbours <= n - 1,
                    OP ": num_neighbours must be in [0, n - 1] = [0, ", n - 1, "], got ",
                    num_neighbours);
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), OP ": tokens.shape[1] must fit int32, got ", n);
  const int64_t k = num_neighbours;
  const int64_t slots = build_graph::graph_width(g, k);
  at::Tensor index = at::empty({B, n, slots}, tokens.options().dtype(at::kInt));
  at::Tensor weight = at::empty({B, n, slots}, tokens.options().dtype(at::kFloat));
  if (B == 0 || slots == 0) return {index, weight};

  at::Tensor deg_t = at::empty({B, n}, tokens.options().dtype(at::kInt));
  int32_t* idx = index.data_ptr<int32_t>();
  int32_t* deg = deg_t.data_ptr<int32_t>();

  if (g == GraphType::Spatial || k == 0) {
    at::parallel_for(0, B * n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        deg[bi] = write_row(GraphType::Spatial, bi % n, height, width, nullptr, 0,
                            idx + bi * slots, slots);
      }
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), OP, [&] {
      semantic_rows<scalar_t>(tokens, height, width, k, g, idx, deg, slots);
    });
  }

  float* w = weight.data_ptr<float>();
  at::parallel_for(0, B * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      const int32_t* row = idx + bi * slots;
      const int32_t* deg_b = deg + (bi / n) * n;
      for (int64_t s = 0; s < slots; ++s) {
        w[bi * slots + s] = row[s] >= 0 ? build_graph::edge_weight(deg[bi], deg_b[row[s]]) : 0.f;
      }
    }
  });
  return {index, weight};
}

#undef OP

}  // namespace
}  // namespace gtp

TORCH_LIBRARY_IMPL(gtp, CPU, m) { m.impl("build_graph", &gtp::build_graph_cpu); }
