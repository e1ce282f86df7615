"""Build gtp_kernels._C: the torch.ops.gtp custom ops (C++ CPU kernels, CUDA kernels when a
CUDA toolchain is usable).

Decisions are printed, and can be overridden from the environment:
  GTP_BUILD_CUDA=auto|1|0   auto: build CUDA kernels when nvcc is found, torch is a CUDA build
                            and csrc/cuda holds sources. No GPU is needed to compile.
  TORCH_CUDA_ARCH_LIST      defaults to "8.0;9.0" (no card is visible at build time).
  GTP_CPU_FLAGS             extra CPU compiler flags; default "-march=native" (a source build
                            runs where it is built); set it empty for a portable build.
  GTP_DEBUG=1               -O0 -g.
  GTP_SANITIZE=<list>       build with -fsanitize=<list> (e.g. address,undefined), plus UBSan's
                            float-cast-overflow and -fno-sanitize-recover=all, at -O1 -g
                            (scripts/sanitize.sh builds such a copy out of tree and runs the
                            op tests against it).
  GTP_NO_EXTENSION=1        package only, no compiled extension (scripts/setup.sh installs the
                            package this way, then builds the extension in place with ninja so
                            that rebuilds are incremental).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[gtp_kernels build] {msg}", file=sys.stderr, flush=True)


def _cuda_home_from_nvcc():
    """The toolkit behind the nvcc on PATH. nvcc may be a wrapper script (exec /x/bin/nvcc),
    in which case torch's own guess (dirname of the wrapper) points at a folder without cudart."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):  # a wrapper: find the real nvcc it runs
        for token in head.decode(errors="ignore").split():
            token = token.strip("\"'")
            if token.endswith("/bin/nvcc") and os.path.exists(token) and token != nvcc:
                nvcc = os.path.realpath(token)
                break
    return os.path.dirname(os.path.dirname(nvcc))


def _decide_cuda():
    mode = os.environ.get("GTP_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"GTP_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False, "GTP_BUILD_CUDA=0"
    if os.environ.get("GTP_SANITIZE"):
        # ASan / UBSan instrument host code only; the CUDA kernels are checked with
        # compute-sanitizer on a GPU (README). A sanitized copy is CPU-only, which also keeps CI
        # from compiling the .cu files once more.
        if mode == "1":
            raise SystemExit("GTP_BUILD_CUDA=1 and GTP_SANITIZE: a sanitized build is CPU-only")
        return False, "GTP_SANITIZE (host sanitizers; CUDA kernels: compute-sanitizer)"
    import torch

    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    home = _cuda_home_from_nvcc()
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is not a CUDA build")
    if home is None:
        reasons.append("nvcc not found (set CUDA_HOME)")
    if mode == "auto" and not cuda_sources:
        reasons.append("csrc/cuda has no .cu sources yet")
    if reasons:
        if mode == "1":
            raise SystemExit("GTP_BUILD_CUDA=1 but " + "; ".join(reasons))
        return False, "; ".join(reasons)
    os.environ["CUDA_HOME"] = home  # must be set before torch.utils.cpp_extension is imported
    return True, f"CUDA_HOME={home}, torch CUDA {torch.version.cuda}"


# ptxas: -warn-spills and -warn-lmem-usage turn register spills and any local memory (stack
# frames, dynamically indexed local arrays, which -warn-spills alone does not see) into
# warnings, and -Werror makes those warnings fail the build: a kernel that spills does not
# ship. Host code (and nvcc's own diagnostics) with warnings as errors as well.
NVCC_STRICT = [
    "-Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror",
    "-Xcompiler=-Wall,-Werror,-Wno-unused-function",
    "--Werror=all-warnings",
]


def _nvcc_flags(opt):
    return [*opt, "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", *NVCC_STRICT]


def _extensions():
    if os.environ.get("GTP_NO_EXTENSION") == "1":
        _log("GTP_NO_EXTENSION=1: not building gtp_kernels._C")
        return [], {}
    with_cuda, why = _decide_cuda()
    from torch.utils import cpp_extension

    debug = os.environ.get("GTP_DEBUG") == "1"
    cpu_flags = os.environ.get("GTP_CPU_FLAGS", "-march=native").split()
    opt = ["-O0", "-g"] if debug else ["-O3"]
    link = ["-fopenmp"]
    sanitize = os.environ.get("GTP_SANITIZE", "")
    if sanitize:
        san = [f"-fsanitize={sanitize}", "-fsanitize=float-cast-overflow"]
        opt = ["-O1", "-g", "-fno-omit-frame-pointer", *san, "-fno-sanitize-recover=all"]
        link += san
        _log(f"sanitizers: {' '.join(san)} (load their runtimes first: scripts/sanitize.sh)")
    cxx = [*opt, "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function", *cpu_flags]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # The C++ ABI torch was built with, explicitly: recent torch no longer passes it, and a
    # host compiler whose default differs would give std::string layouts that torch's libraries
    # do not share (crashes when an error message crosses over). CMakeLists.txt does the same.
    import torch

    abi = int(torch.compiled_with_cxx11_abi())
    define_macros = [
        ("GTP_CPU_FLAGS", f'"{" ".join(cpu_flags)}"'),
        ("_GLIBCXX_USE_CXX11_ABI", str(abi)),
    ]
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = _nvcc_flags(opt)
        define_macros.append(("GTP_WITH_CUDA", "1"))
        define_macros.append(("GTP_CUDA_ARCHS", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"'))
        ext_cls = cpp_extension.CUDAExtension
        _log(f"CUDA kernels: yes ({why}; arch list {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        _log(f"CUDA kernels: no ({why})")
    _log(f"CPU flags: {' '.join(cxx)}")
    _log(f"sources: {', '.join(sources)}")
    ext = ext_cls(
        "gtp_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["gtp_kernels", "gtp_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
