// build_graph on CPU (SPEC 1): spatial / semantic / mixed token graph in ELL form.
//
// The semantic part never holds an n x n similarity matrix. Per task (one image, one block of
// rb rows) the image's tokens are L2-normalised once into a float32 (n, C) buffer, then
// similarities are computed tile by tile (rb x cb, one GEMM each) and every row keeps a running
// top-K (csrc/common/build_graph.h). Columns arrive in ascending order, so a candidate that
// only ties the current K-th best loses (the lower index wins) without further work.
// A second pass turns out-degrees into weights 1 / sqrt(d_i d_j), which needs every row done.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string_view>
#include <vector>

#include "common/build_graph.h"
#include "common/checks.h"

namespace gtp {
namespace {

#define OP "gtp.build_graph"

using build_graph::GraphType;

constexpr int64_t kChunk = 32;  // columns tested at once against the running K-th best

// Whether any of v[0..kChunk) exceeds thr. A fixed trip count and an integer sum so that the
// compiler turns it into a few vector compares (a bool `any |=` loop stays scalar).
inline bool any_above(const float* v, float thr) {
  int hits = 0;
  for (int64_t t = 0; t < kChunk; ++t) hits += v[t] > thr ? 1 : 0;
  return hits != 0;
}

GraphType parse_graph(std::string_view graph) {
  if (graph == "spatial") return GraphType::Spatial;
  if (graph == "semantic") return GraphType::Semantic;
  if (graph == "mixed") return GraphType::Mixed;
  TORCH_CHECK(false, OP ": graph must be 'spatial', 'semantic' or 'mixed', got '", graph, "'");
}

// One token, L2-normalised in float32 as the reference does: x / max(||x||, 1e-12). The sum
// of squares runs in float64 (no overflow) over 8 independent lanes so that it vectorises.
// Returns false when the token holds a NaN or an infinity.
template <typename scalar_t>
bool normalise_row(const scalar_t* x, int64_t stride_c, int64_t C, float* e) {
  if (stride_c == 1) {
    for (int64_t c = 0; c < C; ++c) e[c] = static_cast<float>(x[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) e[c] = static_cast<float>(x[c * stride_c]);
  }
  constexpr int kLanes = 8;
  double acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(e[c + l]) * e[c + l];
  }
  for (; c < C; ++c) acc[0] += static_cast<double>(e[c]) * e[c];
  double sumsq = 0.0;
  for (int l = 0; l < kLanes; ++l) sumsq += acc[l];
  if (!std::isfinite(sumsq)) return false;
  const float denom = std::max(static_cast<float>(std::sqrt(sumsq)), 1e-12f);
  for (c = 0; c < C; ++c) e[c] /= denom;
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
    build_graph::sort_small(sem, k);
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
                   GraphType g, int32_t* index, int32_t* deg, int64_t slots,
                   std::atomic<bool>& bad_value) {
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
    const float* tp = tile.const_data_ptr<float>();
    std::vector<float> best_s(rb * k);
    std::vector<int32_t> best_j(rb * k);
    std::vector<int> count(rb);
    int64_t cur = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * rb;
      const int64_t r = std::min(rb, n - i0);
      if (b != cur) {  // consecutive tasks of one thread mostly share the image
        bool ok = true;
        for (int64_t i = 0; i < n; ++i) ok &= normalise_row(x + b * sb + i * sn, sc, C, ep + i * C);
        if (!ok) bad_value = true;
        cur = b;
      }
      std::fill(count.begin(), count.end(), 0);
      for (int64_t j0 = 0; j0 < n; j0 += cb) {
        const int64_t c = std::min(cb, n - j0);
        at::Tensor s = tile.narrow(0, 0, r * c).view({r, c});
        at::mm_out(s, e.narrow(0, i0, r), e.narrow(0, j0, c).t());
        for (int64_t q = 0; q < r; ++q) {
          const int64_t i = i0 + q;
          const float* srow = tp + q * c;
          float* bs = best_s.data() + q * k;
          int32_t* bj = best_j.data() + q * k;
          int cnt = count[q];
          // A candidate must beat the K-th best strictly: on a tie the K-th has the lower
          // index (columns arrive ascending). Chunks with no such value are skipped with one
          // vectorised compare, which is the common case once the list is full.
          float thr = cnt == k ? bs[k - 1] : -std::numeric_limits<float>::infinity();
          for (int64_t t0 = 0; t0 < c; t0 += kChunk) {
            const int64_t te = std::min(c, t0 + kChunk);
            if (te - t0 == kChunk && !any_above(srow + t0, thr)) continue;
            for (int64_t t = t0; t < te; ++t) {
              const float v = srow[t];
              const int64_t j = j0 + t;
              if (!(v > thr) || j == i) continue;
              cnt = build_graph::topk_insert_ascending(bs, bj, cnt, static_cast<int>(k), v,
                                                       static_cast<int32_t>(j));
              if (cnt == k) thr = bs[k - 1];
            }
          }
          count[q] = cnt;
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
  TORCH_CHECK(height >= 1 && width >= 1 && height * width == n,
              OP ": height * width must equal the number of tokens n = ", n,
              " (tokens.shape[1]), got height=", height, ", width=", width);
  TORCH_CHECK(num_neighbours >= 0 && num_neighbours <= n - 1,
              OP ": num_neighbours must be in [0, n - 1] = [0, ", n - 1, "], got ",
              num_neighbours);
  TORCH_CHECK(n < (int64_t{1} << 31), OP ": tokens.shape[1] must fit int32, got ", n);
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
    std::atomic<bool> bad_value{false};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), OP, [&] {
      semantic_rows<scalar_t>(tokens, height, width, k, g, idx, deg, slots, bad_value);
    });
    TORCH_CHECK(!bad_value.load(), OP ": tokens contains NaN or Inf");
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
