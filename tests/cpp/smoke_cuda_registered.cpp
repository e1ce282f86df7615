// Loads libgtp_ops built with CUDA kernels (registrations run at load) and checks that every gtp
// op has a kernel for the CUDA dispatch key. No GPU needed. Exit code 0 on success.
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

int main() {
  bool ok = true;
  for (const char* op : {"gtp::build_graph", "gtp::select_tokens", "gtp::propagate",
                         "gtp::attention"}) {
    const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, "");
    const bool cuda = handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA);
    std::printf("%s CUDA kernel: %s\n", op, cuda ? "yes" : "MISSING");
    ok = ok && cuda;
  }
  return ok ? 0 : 1;
}
