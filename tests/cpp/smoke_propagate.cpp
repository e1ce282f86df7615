// Loads libgtp_ops (linked, registrations run at load) and calls gtp::propagate through the
// dispatcher on a case worked by hand. Exit code 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>

int main() {
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("gtp::propagate", "")
                .typed<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, int64_t, const std::optional<at::Tensor>&)>();

  // One prefix token and two image tokens that point at each other with weight 0.5.
  // Keeping image token 0 and propagating token 1 with alpha 0.5: 1 + 0.5 * 0.5 * 2 = 1.5.
  auto x = at::tensor({10.f, 1.f, 2.f}).reshape({1, 3, 1});
  auto index = at::tensor({1, 0}, at::kInt).reshape({1, 2, 1});
  auto weight = at::tensor({0.5f, 0.5f}).reshape({1, 2, 1});
  auto keep = at::tensor({0}, at::kLong).reshape({1, 1});
  auto sizes = at::ones({1, 3});
  auto [x_out, s_out, i_out, w_out] = op.call(x, index, weight, keep, 0.5, 1, sizes);

  bool ok = x_out.sizes() == at::IntArrayRef({1, 2, 1}) &&
            std::fabs(x_out[0][0][0].item<float>() - 10.f) < 1e-6f &&
            std::fabs(x_out[0][1][0].item<float>() - 1.5f) < 1e-6f &&
            std::fabs(s_out[0][1].item<float>() - 1.25f) < 1e-6f &&
            i_out.sizes() == at::IntArrayRef({1, 1, 1}) && i_out[0][0][0].item<int>() == -1;
  std::printf("gtp::propagate smoke test: %s\n", ok ? "ok" : "FAILED");
  if (!ok) {
    std::printf("x_out=%s\nsizes_out=%s\nindex_out=%s\n", x_out.toString().c_str(),
                s_out.toString().c_str(), i_out.toString().c_str());
  }
  return ok ? 0 : 1;
}
