// Every gtp op schema lives here and nowhere else. Backend files (csrc/cpu/<op>.cpp,
// csrc/cuda/<op>.cu) register their own kernels with TORCH_LIBRARY_IMPL, so a build
// without a backend simply lacks that kernel. Fake (meta) kernels and autograd are
// registered from Python (gtp_kernels/ops/<op>.py).
//
// Notation (../SPEC.md): B batch, N tokens (prefix first), M = num_prefix, n = N - M image
// tokens, C channels, H heads, d head dim, W graph width (8 spatial, K semantic, 8 + K mixed).
#include <torch/library.h>

TORCH_LIBRARY(gtp, m) {
  // Token graph (SPEC 1). tokens: (B, n, C) float32/bfloat16/float16 image tokens on an
  // height x width row-major grid. graph: "spatial" | "semantic" | "mixed".
  // Returns index (B, n, W) int32, neighbours ascending then -1 padding, and weight
  // (B, n, W) float32 = 1 / sqrt(d_i d_j) (0 at padding).
  m.def(
      "build_graph(Tensor tokens, int height, int width, int num_neighbours, str graph)"
      " -> (Tensor index, Tensor weight)");

  // Token selection (SPEC 3). score: (B, n) float32. The num_prop lowest scores are
  // propagated; among equal scores the lower position is kept. Returns keep (B, n - P)
  // int64 and prop (B, P) int64, both ascending image-token positions.
  m.def("select_tokens(Tensor score, int num_prop) -> (Tensor keep, Tensor prop)");

  // Graph propagation (SPEC 4). x: (B, N, C) after the attention residual; index/weight:
  // (B, n, W) graph in current positions; keep: (B, n - P) int64 kept image positions (the
  // rest are propagated); sizes: optional (B, N) float32 token sizes. Kept image token i
  // gets x_i + alpha * sum_{p propagated, p in row i} W[i, p] x_p; prefix rows are copied.
  // Returns x (B, N - P, C), sizes (B, N - P) (or an empty tensor when sizes is None), and
  // the graph restricted to the kept tokens, re-indexed, weights unchanged.
  m.def(
      "propagate(Tensor x, Tensor index, Tensor weight, Tensor keep, float alpha, "
      "int num_prefix, Tensor? sizes) -> (Tensor x_out, Tensor sizes_out, Tensor index_out, "
      "Tensor weight_out)");

  // Attention with proportional attention, top-theta N^2 masking and importance scores
  // (SPEC 2, 3). q, k, v: (B, H, N, d); log_sizes: optional (B, N) float32 added to the
  // logits of key j; sparsity: theta, the density kept (1 = off). score: "none" or a
  // strategy name (mixed_max, mixed_mean, diag_max, diag_mean, colsum_max, colsum_mean,
  // cls_max, cls_mean, sum_max). Returns out (B, H, N, d) in q's dtype and score
  // (B, N - num_prefix) float32 ((B, 0) for "none"). Probabilities are never materialised.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? log_sizes, float scale, "
      "float sparsity, int num_prefix, str score) -> (Tensor out, Tensor score)");
}
