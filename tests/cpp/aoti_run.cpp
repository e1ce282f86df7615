// gtp_aoti_run: runs an AOTInductor package (.pt2) of a GTP-patched model from C++, without
// Python, on an image batch read from a .npy file, and writes the logits as .npy.
//
//   gtp_aoti_run model.pt2 images.npy logits.npy
//
// What a C++ deployment needs (README, "Deployment"): the .pt2 holds the compiled graph and the
// weights, but not the gtp kernels. The graph calls gtp::attention, gtp::propagate, ... by name
// through the dispatcher, so the op library must be loaded and registered BEFORE the package is
// loaded. Here libgtp_ops is linked with --no-as-needed: its static TORCH_LIBRARY blocks run at
// program start. The AOTI loader itself (torch::inductor::AOTIModelPackageLoader) is in
// libtorch_cpu. (A program that dlopen()s its op libraries must do so before constructing the
// loader.)
//
// .npy: version 1.0-3.0, little-endian float32 ('<f4'), C order, any rank. Exit code 0 on
// success, 1 with a message on stderr otherwise.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr char kMagic[] = "\x93NUMPY";

// The value of `key` in a .npy header dict ({'descr': '<f4', 'fortran_order': False, ...}).
std::string header_field(const std::string& header, const std::string& key) {
  auto pos = header.find("'" + key + "'");
  if (pos == std::string::npos) throw std::runtime_error(".npy header has no '" + key + "'");
  pos = header.find(':', pos);
  auto start = header.find_first_not_of(' ', pos + 1);
  auto end = header[start] == '(' ? header.find(')', start) + 1 : header.find(',', start);
  return header.substr(start, end - start);
}

at::Tensor read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[6];
  in.read(magic, 6);
  if (!in || std::memcmp(magic, kMagic, 6) != 0) throw std::runtime_error(path + " is not .npy");
  unsigned char version[2];
  in.read(reinterpret_cast<char*>(version), 2);
  uint32_t header_len = 0;
  unsigned char len_bytes[4] = {0, 0, 0, 0};
  in.read(reinterpret_cast<char*>(len_bytes), version[0] == 1 ? 2 : 4);
  for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (!in) throw std::runtime_error(path + ": truncated .npy header");
  if (header_field(header, "descr") != "'<f4'")
    throw std::runtime_error(path + ": expected float32 ('<f4'), got " +
                             header_field(header, "descr"));
  if (header_field(header, "fortran_order") != "False")
    throw std::runtime_error(path + ": Fortran-order arrays are not supported");
  std::vector<int64_t> shape;
  std::string dims = header_field(header, "shape");
  std::stringstream ss(dims.substr(1, dims.size() - 2));
  for (std::string d; std::getline(ss, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(d));
  at::Tensor t = at::empty(shape, at::kFloat);
  in.read(reinterpret_cast<char*>(t.data_ptr<float>()),
          static_cast<std::streamsize>(t.numel() * sizeof(float)));
  if (!in) throw std::runtime_error(path + ": fewer values than the shape says");
  return t;
}

void write_npy(const std::string& path, const at::Tensor& tensor) {
  at::Tensor t = tensor.to(at::kFloat).contiguous();
  std::string shape = "(";  // Python tuple syntax: (), (5,), (2, 3)
  for (int64_t i = 0; i < t.dim(); ++i) shape += (i ? ", " : "") + std::to_string(t.size(i));
  shape += t.dim() == 1 ? ",)" : ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  // Version 1.0: magic + 2 version bytes + 2 length bytes + header, padded to 64 bytes with
  // spaces and ended by a newline.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  out.write(kMagic, 6);
  const char version[2] = {1, 0};
  out.write(version, 2);
  const uint16_t len = static_cast<uint16_t>(header.size());
  const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(t.data_ptr<float>()),
            static_cast<std::streamsize>(t.numel() * sizeof(float)));
  if (!out) throw std::runtime_error("writing " + path + " failed");
}

// Fails early, with the fix, when the gtp ops are not registered in this process.
void require_gtp_ops() {
  for (const char* op : {"gtp::attention", "gtp::build_graph", "gtp::select_tokens",
                         "gtp::propagate"}) {
    if (!c10::Dispatcher::singleton().findSchema({op, ""}).has_value())
      throw std::runtime_error(std::string(op) +
                               " is not registered: link libgtp_ops (or dlopen it) before "
                               "loading a package of a GTP-patched model");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s model.pt2 images.npy logits.npy\n", argv[0]);
    return 1;
  }
  try {
    require_gtp_ops();
    c10::InferenceMode inference;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    at::Tensor images = read_npy(argv[2]);
    std::vector<at::Tensor> outputs = loader.run({images});
    if (outputs.size() != 1)
      throw std::runtime_error("expected one output (logits), got " +
                               std::to_string(outputs.size()));
    write_npy(argv[3], outputs[0]);
    std::printf("gtp_aoti_run: %s -> logits %s written to %s\n", argv[2],
                c10::str(outputs[0].sizes()).c_str(), argv[3]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gtp_aoti_run: %s\n", e.what());
    return 1;
  }
  return 0;
}
