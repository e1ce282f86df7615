// propagate on CPU (SPEC 4): kept image tokens absorb their propagated graph neighbours, the
// propagated tokens are removed, and the graph shrinks to the survivors.
//
// One parallel pass over the output rows (batch x (prefix + kept)). Per image, a chunk first
// builds the old -> new position map (n int32 in a per-chunk buffer: new_pos[keep[r]] = r, -1
// for a propagated token), which also checks keep for range and duplicates. Then per kept row
// the graph row is re-indexed through the map and, in the same walk over its slots, the slots
// whose neighbour is propagated are counted. Rows that absorb nothing are a plain row copy
// (with P W / n absorbing slots a row on average, about half the rows at P = 8, W = 16).
// Rows absorbing one or two neighbours (nearly all others) are one fused pass over the
// channels; the rest accumulate w * x_j slot by slot into a float32 (float64 for float64 x)
// channel buffer. Every channel loop is unit-stride and vectorises; arithmetic in float32
// (float64), written in x's dtype, in the reference's order: x_i + alpha * (sum in slot
// order). Scratch memory: n int32 and C accumulators per chunk, never an n x n matrix.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/propagate.h"

namespace gtp {
namespace {

#define OP "gtp.propagate"

// Element <-> accumulator conversions written so that the channel loops vectorise (the c10
// conversions go through a scalar call per element for Half).
template <typename T>
struct Cvt {
  using acc_t = float;
  static inline float load(T v) { return static_cast<float>(v); }
  static inline T store(float v) { return static_cast<T>(v); }
};

template <>
struct Cvt<double> {
  using acc_t = double;
  static inline double load(double v) { return v; }
  static inline double store(double v) { return v; }
};

template <>
struct Cvt<c10::BFloat16> {
  using acc_t = float;
  static inline float load(c10::BFloat16 v) {
    return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
  }
  // Round to nearest even, NaN -> the canonical quiet NaN (as c10::BFloat16(float) does).
  static inline c10::BFloat16 store(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const uint16_t r = f != f ? uint16_t{0x7fc0}
                              : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return c10::BFloat16(r, c10::BFloat16::from_bits());
  }
};

// Channel loops of a kept row: ac = w * x_j (first slot) or ac += w * x_j, and
// dst = x_i + alpha * ac. Unit-stride loops the compiler vectorises for float, double and
// bfloat16 (a shift); Half has explicit F16C conversions below, the c10 one being scalar.
template <typename scalar_t, typename acc_t>
inline void accumulate(acc_t* ac, const scalar_t* xj, acc_t w, int64_t ch, bool first) {
  using C = Cvt<scalar_t>;
  if (first) {
    for (int64_t c = 0; c < ch; ++c) ac[c] = w * C::load(xj[c]);
  } else {
    for (int64_t c = 0; c < ch; ++c) ac[c] += w * C::load(xj[c]);
  }
}

template <typename scalar_t, typename acc_t>
inline void finish(scalar_t* dst, const scalar_t* xi, const acc_t* ac, acc_t alpha, int64_t ch) {
  using C = Cvt<scalar_t>;
  for (int64_t c = 0; c < ch; ++c) dst[c] = C::store(C::load(xi[c]) + alpha * ac[c]);
}

#if defined(__F16C__) && defined(__AVX__)
inline __m256 load8_half(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <>
inline void accumulate<c10::Half, float>(float* ac, const c10::Half* xj, float w, int64_t ch,
                                         bool first) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t c = 0;
  for (; c + 8 <= ch; c += 8) {
    __m256 v = _mm256_mul_ps(wv, load8_half(xj + c));
    if (!first) v = _mm256_add_ps(_mm256_loadu_ps(ac + c), v);
    _mm256_storeu_ps(ac + c, v);
  }
  for (; c < ch; ++c) ac[c] = (first ? 0.0f : ac[c]) + w * static_cast<float>(xj[c]);
}

template <>
inline void finish<c10::Half, float>(c10::Half* dst, const c10::Half* xi, const float* ac,
                                     float alpha, int64_t ch) {
  const __m256 av = _mm256_set1_ps(alpha);
  int64_t c = 0;
  for (; c + 8 <= ch; c += 8) {
    const __m256 v = _mm256_add_ps(load8_half(xi + c), _mm256_mul_ps(av, _mm256_loadu_ps(ac + c)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; c < ch; ++c) dst[c] = static_cast<c10::Half>(static_cast<float>(xi[c]) + alpha * ac[c]);
}
#endif

struct Args {
  int64_t batch, big_n, channels, prefix, n, kept, width;
  int64_t sx0, sx1;  // x strides (elements); the channel stride is 1
  double alpha;
  const int32_t* index;
  const float* weight;
  const int64_t* keep;
  const float* sizes;  // nullptr when sizes is None
  int32_t* index_out;
  float* weight_out;
  float* sizes_out;
};

// propagate::propagate_channel (one thread per channel, for a CUDA kernel) is not this
// kernel's loop order; this never-called function makes the CPU build compile it.
[[maybe_unused]] float compile_propagate_channel(const float* x, const int32_t* idx,
                                                 const float* w, const int32_t* new_pos) {
  return propagate::propagate_channel<float>(
      x, idx, w, 1, new_pos, 1, 0.5f, 0, [x](int32_t j) { return x + j; },
      [](float v) { return v; });
}

// The size of a kept row: s_i + alpha * sum over absorbing slots of w * s_j, accumulated from 0
// in slot order as the reference does; s_i itself when the row absorbs nothing or alpha = 0.
inline float propagated_size(const float* sb, int64_t i, const int32_t* idx, const float* w,
                             int64_t width, const int32_t* new_pos, int64_t n, double alpha) {
  float acc = 0.0f;
  bool any = false;
  for (int64_t s = 0; s < width; ++s) {
    const int32_t j = idx[s];
    if (!(j >= 0 && j < n && propagate::absorbs(j, new_pos))) continue;
    acc += w[s] * sb[j];
    any = true;
  }
  return any && alpha != 0.0 ? sb[i] + static_cast<float>(alpha) * acc : sb[i];
}

// One output row of a kept token: re-index its graph row and write x_i + alpha * sum (or copy).
template <typename scalar_t>
inline void kept_row(const Args& a, int64_t b, int64_t r, const int32_t* new_pos,
                     const scalar_t* xb, scalar_t* dst, float* size_dst,
                     std::vector<typename Cvt<scalar_t>::acc_t>& acc, int* err) {
  using C = Cvt<scalar_t>;
  using acc_t = typename C::acc_t;
  const int64_t ch = a.channels;
  const int64_t i = a.keep[b * a.kept + r];
  if (i < 0 || i >= a.n) {  // reported after the pass; the output is discarded
    *err |= propagate::kBadKeep;
    return;
  }
  const int32_t* idx = a.index + (b * a.n + i) * a.width;
  const float* w = a.weight + (b * a.n + i) * a.width;
  const int64_t row_out = (b * a.kept + r) * a.width;
  const int64_t absorbed = propagate::reindex_row(idx, w, a.width, new_pos, a.n,
                                                  a.index_out + row_out, a.weight_out + row_out,
                                                  err);
  if (a.sizes) {
    const float* sb = a.sizes + b * a.big_n + a.prefix;
    *size_dst = propagated_size(sb, i, idx, w, a.width, new_pos, a.n, a.alpha);
  }
  if (ch == 0) return;  // (x may be a null pointer: no row pointers, no memcpy)
  const scalar_t* xi = xb + (a.prefix + i) * a.sx1;
  if (absorbed == 0 || a.alpha == 0.0) {  // nothing to absorb, or plain pruning: a row copy
    std::memcpy(dst, xi, ch * sizeof(scalar_t));
    return;
  }
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  if constexpr (!std::is_same_v<scalar_t, c10::Half>) {
    // One or two absorbed neighbours (most absorbing rows): one fused pass over the channels,
    // no accumulator buffer; the same arithmetic in the same order as the general path.
    if (absorbed <= 2) {
      const scalar_t* xs[2] = {xi, xi};
      acc_t ws[2] = {0, 0};
      int k = 0;
      for (int64_t s = 0; s < a.width && k < 2; ++s) {
        const int32_t j = idx[s];
        if (!(j >= 0 && j < a.n && propagate::absorbs(j, new_pos))) continue;
        xs[k] = xb + (a.prefix + j) * a.sx1;
        ws[k] = static_cast<acc_t>(w[s]);
        ++k;
      }
      using C = Cvt<scalar_t>;
      const scalar_t* x0 = xs[0];
      const scalar_t* x1 = xs[1];
      const acc_t w0 = ws[0], w1 = ws[1];
      if (k == 1) {
        for (int64_t c = 0; c < ch; ++c)
          dst[c] = C::store(C::load(xi[c]) + alpha * (w0 * C::load(x0[c])));
      } else {
        for (int64_t c = 0; c < ch; ++c)
          dst[c] =
              C::store(C::load(xi[c]) + alpha * (w0 * C::load(x0[c]) + w1 * C::load(x1[c])));
      }
      return;
    }
  }
  if (acc.empty()) acc.resize(std::max<int64_t>(ch, 1));
  acc_t* ac = acc.data();
  bool first = true;
  // Slot-outer, channel-inner: each pass over the channels is a unit-stride loop the
  // compiler vectorises. Same per-channel arithmetic and order as propagate_channel.
  for (int64_t s = 0; s < a.width; ++s) {
    const int32_t j = idx[s];
    if (!(j >= 0 && j < a.n && propagate::absorbs(j, new_pos))) continue;
    const scalar_t* xj = xb + (a.prefix + j) * a.sx1;
    const acc_t wv = static_cast<acc_t>(w[s]);
    accumulate<scalar_t, acc_t>(ac, xj, wv, ch, first);
    first = false;
  }
  finish<scalar_t, acc_t>(dst, xi, ac, alpha, ch);
}

// A single parallel pass over the B * (M + R) output rows. A chunk builds the position map of
// each image it touches in its own buffer (n int32), and checks that image's keep and index
// entries at the same time; an image split between two chunks is mapped by both (n + n W
// cheap operations). One fork/join instead of two matters on a loaded machine, where every
// join can wait a scheduler slice for a descheduled thread.
template <typename scalar_t>
void propagate_rows(const Args& a, const scalar_t* x, scalar_t* out, std::atomic<int>& err) {
  const int64_t rows_out = a.prefix + a.kept;
  const int64_t ch = a.channels;
  const int64_t grain = std::max<int64_t>(1, 16384 / (ch + a.width + 1));
  at::parallel_for(0, a.batch * rows_out, grain, [&](int64_t begin, int64_t end) {
    std::vector<typename Cvt<scalar_t>::acc_t> acc;  // allocated on the first absorbing row
    std::vector<int32_t> new_pos(a.n);
    int local_err = 0;
    for (int64_t t = begin; t < end;) {
      const int64_t b = t / rows_out;
      const int64_t o_begin = t % rows_out;
      const int64_t o_end = std::min(rows_out, o_begin + (end - t));
      const scalar_t* xb = ch > 0 ? x + b * a.sx0 : x;  // C = 0: x may be null
      if (o_end > a.prefix) {
        local_err |=
            propagate::build_position_map(a.keep + b * a.kept, a.kept, a.n, new_pos.data());
        if (propagate::count_out_of_range(a.index + b * a.n * a.width, a.n * a.width, a.n))
          local_err |= propagate::kBadIndex;
      }
      for (int64_t o = o_begin; o < o_end; ++o, ++t) {
        scalar_t* dst = out + t * ch;
        if (o < a.prefix) {  // prefix tokens pass through
          if (ch > 0) std::memcpy(dst, xb + o * a.sx1, ch * sizeof(scalar_t));
          if (a.sizes) a.sizes_out[t] = a.sizes[b * a.big_n + o];
        } else {
          kept_row<scalar_t>(a, b, o - a.prefix, new_pos.data(), xb, dst,
                             a.sizes ? a.sizes_out + t : nullptr, acc, &local_err);
        }
      }
    }
    if (local_err) err.fetch_or(local_err, std::memory_order_relaxed);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> propagate_cpu(
    const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& keep,
    double alpha, int64_t num_prefix, const std::optional<at::Tensor>& sizes) {
  GTP_CHECK_DIM(OP, x, "x", 3);
  GTP_CHECK_FLOATING(OP, x, "x");
  const int64_t batch = x.size(0), big_n = x.size(1), channels = x.size(2);
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
  GTP_CHECK_DEVICE_TYPE(OP, x, "x", c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(std::isfinite(alpha), OP ": alpha must be finite, got ", alpha);

  const int64_t width = index.size(2);
  const int64_t rows_out = num_prefix + kept;
  at::Tensor x_out = at::empty({batch, rows_out, channels}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor sizes_out =
      sizes.has_value() ? at::empty({batch, rows_out}, f32) : at::empty({0}, f32);
  at::Tensor index_out = at::empty({batch, kept, width}, index.options());
  at::Tensor weight_out = at::empty({batch, kept, width}, weight.options());
  if (batch == 0) return {x_out, sizes_out, index_out, weight_out};

  // Channels must be unit-stride for the row copies; batch and token strides are free.
  const at::Tensor xc = x.stride(2) == 1 || channels <= 1 ? x : x.contiguous();
  const at::Tensor ic = index.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor kc = keep.contiguous();
  const at::Tensor sc = sizes.has_value() ? sizes->contiguous() : at::Tensor();

  Args a{};
  a.batch = batch;
  a.big_n = big_n;
  a.channels = channels;
  a.prefix = num_prefix;
  a.n = n;
  a.kept = kept;
  a.width = width;
  a.sx0 = xc.stride(0);
  a.sx1 = xc.stride(1);
  a.alpha = alpha;
  a.index = ic.data_ptr<int32_t>();
  a.weight = wc.data_ptr<float>();
  a.keep = kc.data_ptr<int64_t>();
  a.sizes = sc.defined() ? sc.data_ptr<float>() : nullptr;
  a.index_out = index_out.data_ptr<int32_t>();
  a.weight_out = weight_out.data_ptr<float>();
  a.sizes_out = sc.defined() ? sizes_out.data_ptr<float>() : nullptr;

  std::atomic<int> err{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "propagate_cpu", [&] {
    propagate_rows<scalar_t>(a, xc.data_ptr<scalar_t>(), x_out.data_ptr<scalar_t>(), err);
  });
  TORCH_CHECK_VALUE(!(err.load() & propagate::kBadKeep),
                    OP ": keep entries must be in [0, n) = [0, ", n, "), got out of range");
  TORCH_CHECK_VALUE(!(err.load() & propagate::kDupKeep),
                    OP ": keep has duplicate entries in a row");
  TORCH_CHECK_VALUE(!(err.load() & propagate::kBadIndex),
                    OP ": index entries must be in [-1, n) = [-1, ", n, "), got out of range");
  return {x_out, sizes_out, index_out, weight_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(gtp, CPU, m) { m.impl("propagate", &propagate_cpu); }

}  // namespace gtp
