// Argument checks of every gtp op's entry point, shared by the CPU and the CUDA kernels so that
// a bad argument fails with the same ValueError, the same message, in the same order, on every
// backend (the reference has the same checks in Python: gtp_kernels/reference/*.py). Each check
// names the op and the argument. `device` is the device type the calling kernel runs on. Also
// the outputs both backends allocate (shapes, dtypes, memory layouts), allocated alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "common/attention.h"
#include "common/build_graph.h"
#include "common/checks.h"
#include "common/propagate.h"

namespace gtp::args {

// ------------------------------------------------------------------------------ select_tokens
inline void check_select_tokens(const at::Tensor& score, int64_t num_prop,
                                c10::DeviceType device) {
#define OP "gtp.select_tokens"
  GTP_CHECK_DIM(OP, score, "score", 2);
  TORCH_CHECK_VALUE(score.scalar_type() == at::kFloat, OP ": score must be float32, got ",
                    score.scalar_type());
  const int64_t n = score.size(1), P = num_prop;
  TORCH_CHECK_VALUE(P >= 0 && P <= n - 1, OP ": num_prop must be in [0, n - 1] = [0, ", n - 1,
                    "], got ", P);
  TORCH_CHECK_VALUE(n <= (int64_t{1} << 32), OP ": score.shape[1] must be at most 2^32, got ", n);
  GTP_CHECK_DEVICE_TYPE(OP, score, "score", device);
#undef OP
}

// -------------------------------------------------------------------------------- build_graph
inline build_graph::GraphType parse_graph(std::string_view graph) {
  if (graph == "spatial") return build_graph::GraphType::Spatial;
  if (graph == "semantic") return build_graph::GraphType::Semantic;
  if (graph == "mixed") return build_graph::GraphType::Mixed;
  TORCH_CHECK_VALUE(false, "gtp.build_graph: graph must be 'spatial', 'semantic' or 'mixed', got '",
                    graph, "'");
  return build_graph::GraphType::Mixed;
}

inline build_graph::GraphType check_build_graph(const at::Tensor& tokens, int64_t height,
                                                int64_t width, int64_t num_neighbours,
                                                c10::string_view graph, c10::DeviceType device) {
#define OP "gtp.build_graph"
  GTP_CHECK_DIM(OP, tokens, "tokens", 3);
  GTP_CHECK_FLOATING(OP, tokens, "tokens");
  const int64_t n = tokens.size(1);
  const build_graph::GraphType g = parse_graph(std::string_view(graph.data(), graph.size()));
  TORCH_CHECK_VALUE(height >= 1 && width >= 1 && height * width == n,
                    OP ": height * width must equal the number of tokens n = ", n,
                    " (tokens.shape[1]), got height=", height, ", width=", width);
  TORCH_CHECK_VALUE(num_neighbours >= 0 && num_neighbours <= n - 1,
                    OP ": num_neighbours must be in [0, n - 1] = [0, ", n - 1, "], got ",
                    num_neighbours);
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31), OP ": tokens.shape[1] must fit int32, got ", n);
  GTP_CHECK_DEVICE_TYPE(OP, tokens, "tokens", device);
#undef OP
  return g;
}

// ---------------------------------------------------------------------------------- propagate
inline void check_propagate(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight,
                            const at::Tensor& keep, double alpha, int64_t num_prefix,
                            const std::optional<at::Tensor>& sizes, c10::DeviceType device) {
#define OP "gtp.propagate"
  GTP_CHECK_DIM(OP, x, "x", 3);
  GTP_CHECK_FLOATING(OP, x, "x");
  const int64_t batch = x.size(0), big_n = x.size(1);
  TORCH_CHECK_VALUE(num_prefix >= 0 && num_prefix <= big_n,
                    OP ": num_prefix must be in [0, N] = [0, ", big_n, "], got ", num_prefix);
  const int64_t n = big_n - num_prefix;
  GTP_CHECK_DIM(OP, index, "index", 3);
  TORCH_CHECK_VALUE(index.scalar_type() == at::kInt, OP ": index must be int32, got ",
                    index.scalar_type());
  TORCH_CHECK_VALUE(index.size(0) == batch && index.size(1) == n,
                    OP ": index must have shape (B, N - num_prefix, W) = (", batch, ", ", n,
                    ", W), got ", index.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat, OP ": weight must be float32, got ",
                    weight.scalar_type());
  TORCH_CHECK_VALUE(weight.sizes() == index.sizes(), OP ": weight must have the shape of index ",
                    index.sizes(), ", got ", weight.sizes());
  GTP_CHECK_DIM(OP, keep, "keep", 2);
  TORCH_CHECK_VALUE(keep.scalar_type() == at::kLong, OP ": keep must be int64, got ",
                    keep.scalar_type());
  const int64_t kept = keep.size(1);
  TORCH_CHECK_VALUE(keep.size(0) == batch && kept <= n && (n == 0 || kept >= 1),
                    OP ": keep must have shape (B, n - P) with B = ", batch,
                    " and 1 <= n - P <= n = ", n, ", got ", keep.sizes());
  if (sizes.has_value()) {
    TORCH_CHECK_VALUE(sizes->scalar_type() == at::kFloat, OP ": sizes must be float32, got ",
                      sizes->scalar_type());
    TORCH_CHECK_VALUE(sizes->dim() == 2 && sizes->size(0) == batch && sizes->size(1) == big_n,
                      OP ": sizes must have shape (B, N) = (", batch, ", ", big_n, "), got ",
                      sizes->sizes());
  }
  GTP_CHECK_SAME_DEVICE(OP, x, "x", index, "index");
  GTP_CHECK_SAME_DEVICE(OP, x, "x", weight, "weight");
  GTP_CHECK_SAME_DEVICE(OP, x, "x", keep, "keep");
  if (sizes.has_value()) GTP_CHECK_SAME_DEVICE(OP, x, "x", (*sizes), "sizes");
  GTP_CHECK_DEVICE_TYPE(OP, x, "x", device);
  TORCH_CHECK_VALUE(std::isfinite(alpha), OP ": alpha must be finite, got ", alpha);
#undef OP
}

// propagate's outputs: x (B, M + R, C) in x's dtype, sizes (B, M + R) float32 or an empty (0,)
// tensor, the re-indexed graph (B, R, W) int32 / float32.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_outputs(
    const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& keep,
    int64_t num_prefix, bool with_sizes) {
  const int64_t batch = x.size(0), channels = x.size(2), kept = keep.size(1);
  const int64_t width = index.size(2), rows_out = num_prefix + kept;
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty({batch, rows_out, channels}, x.options()),
          with_sizes ? at::empty({batch, rows_out}, f32) : at::empty({0}, f32),
          at::empty({batch, kept, width}, index.options()),
          at::empty({batch, kept, width}, weight.options())};
}

// The index-argument errors a propagate kernel found (bits of common/propagate.h), raised after
// its pass, in the same order on every backend.
inline void raise_propagate_errors(int err, int64_t n) {
#define OP "gtp.propagate"
  TORCH_CHECK_VALUE(!(err & propagate::kBadKeep),
                    OP ": keep entries must be in [0, n) = [0, ", n, "), got out of range");
  TORCH_CHECK_VALUE(!(err & propagate::kDupKeep), OP ": keep has duplicate entries in a row");
  TORCH_CHECK_VALUE(!(err & propagate::kBadIndex),
                    OP ": index entries must be in [-1, n) = [-1, ", n, "), got out of range");
#undef OP
}

// ---------------------------------------------------------------------------------- attention
inline attention::ScoreStrategy parse_score(const std::string& s) {
  using attention::ScoreKind;
  static const struct {
    const char* name;
    ScoreKind kind;
    bool mean;
  } table[] = {
      {"none", ScoreKind::kNone, false},       {"mixed_max", ScoreKind::kMixed, false},
      {"mixed_mean", ScoreKind::kMixed, true}, {"diag_max", ScoreKind::kDiag, false},
      {"diag_mean", ScoreKind::kDiag, true},   {"colsum_max", ScoreKind::kColsum, false},
      {"colsum_mean", ScoreKind::kColsum, true}, {"cls_max", ScoreKind::kCls, false},
      {"cls_mean", ScoreKind::kCls, true},     {"sum_max", ScoreKind::kSum, false},
  };
  for (const auto& e : table) {
    if (s == e.name) return attention::ScoreStrategy{e.kind, e.mean};
  }
  TORCH_CHECK_VALUE(false, "gtp.attention: score must be one of none, mixed_max, mixed_mean, ",
                    "diag_max, diag_mean, colsum_max, colsum_mean, cls_max, cls_mean, sum_max; ",
                    "got '", s, "'");
  return {};
}

inline attention::ScoreStrategy check_attention(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v,
                                                const std::optional<at::Tensor>& log_sizes,
                                                double scale, double sparsity,
                                                int64_t num_prefix, c10::string_view score,
                                                c10::DeviceType device) {
#define OP "gtp.attention"
  TORCH_CHECK_VALUE(q.dim() == 4, OP ": q must have 4 dimensions (B, H, N, d), got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), OP ": k must have the shape of q ", q.sizes(),
                    ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4 && v.sizes().slice(0, 3) == q.sizes().slice(0, 3),
                    OP ": v must have shape (B, H, N, dv) with (B, H, N) = ", q.sizes().slice(0, 3),
                    " of q, got shape ", v.sizes());
  GTP_CHECK_FLOATING(OP, q, "q");
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type(), OP ": k must have the dtype of q (",
                    q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK_VALUE(v.scalar_type() == q.scalar_type(), OP ": v must have the dtype of q (",
                    q.scalar_type(), "), got ", v.scalar_type());
  GTP_CHECK_DEVICE_TYPE(OP, q, "q", device);
  GTP_CHECK_SAME_DEVICE(OP, q, "q", k, "k");
  GTP_CHECK_SAME_DEVICE(OP, q, "q", v, "v");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  TORCH_CHECK_VALUE(H >= 1, OP ": q must have at least one head, got shape ", q.sizes());
  if (log_sizes.has_value()) {
    const at::Tensor& ls = *log_sizes;
    TORCH_CHECK_VALUE(ls.dim() == 2 && ls.size(0) == B && ls.size(1) == N,
                      OP ": log_sizes must have shape (B, N) = [", B, ", ", N, "], got shape ",
                      ls.sizes());
    TORCH_CHECK_VALUE(ls.scalar_type() == at::kFloat, OP ": log_sizes must be float32, got ",
                      ls.scalar_type());
    GTP_CHECK_SAME_DEVICE(OP, q, "q", ls, "log_sizes");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), OP ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(sparsity > 0.0 && sparsity <= 1.0,
                    OP ": sparsity (theta) must be in (0, 1], got ", sparsity);
  TORCH_CHECK_VALUE(num_prefix >= 0 && num_prefix <= N, OP ": num_prefix must be in [0, N] = [0, ",
                    N, "], got ", num_prefix);
  const attention::ScoreStrategy strategy = parse_score(std::string(score));
  TORCH_CHECK_VALUE(!strategy.needs_cls() || num_prefix >= 1, OP ": score '", score,
                    "' needs a CLS token (num_prefix >= 1), got num_prefix 0");
#undef OP
  return strategy;
}

// attention's outputs: out (B, H, N, dv) in q's dtype with (B, N, H, dv) memory (timm's next
// step, out.transpose(1, 2).reshape(B, N, H * dv), is then a free view) and score (B, N - M)
// float32 ((B, 0) for "none"). With no (image, head) tile to compute (B = 0 or N = 0) the score
// is already final: zeros.
inline std::tuple<at::Tensor, at::Tensor> attention_outputs(const at::Tensor& q,
                                                            const at::Tensor& v,
                                                            int64_t num_prefix,
                                                            attention::ScoreStrategy strategy) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), dv = v.size(3);
  at::Tensor out = at::empty({B, N, H, dv}, q.options()).permute({0, 2, 1, 3});
  const int64_t cols = strategy.kind == attention::ScoreKind::kNone ? 0 : N - num_prefix;
  at::Tensor score = at::empty({B, cols}, q.options().dtype(at::kFloat));
  if ((B == 0 || N == 0) && score.numel() > 0) score.zero_();
  return {out, score};
}

}  // namespace gtp::args
