// The Python module gtp_kernels._C. Importing it runs the static TORCH_LIBRARY
// registrations of every linked source; it also reports how it was built.
#include <torch/extension.h>

#ifndef GTP_CPU_FLAGS
#define GTP_CPU_FLAGS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef GTP_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = GTP_CUDA_ARCHS;  // TORCH_CUDA_ARCH_LIST the kernels were compiled for
#else
  info["cuda"] = false;
#endif
  info["cpu_flags"] = GTP_CPU_FLAGS;
  info["torch_version"] = TORCH_VERSION;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gtp_kernels compiled ops: registered as torch.ops.gtp.*";
  m.def("build_info", &build_info, "How this extension was built (dict).");
}
