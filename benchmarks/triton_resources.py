"""Compile every Triton kernel, in every configuration its launcher picks for the problems below,
ahead of time for sm_80 and sm_90, and report registers, stack, shared memory and warps. No GPU
needed (triton.compile to a cubin, then `cuobjdump --dump-resource-usage`).

The launchers tell which kernels and configurations they would start: they are called on meta
tensors of each problem's shapes inside gtp_kernels.triton._common.recording(), which collects
the launches instead of running them (the same code path that picks the blocks on a GPU).

    python benchmarks/triton_resources.py            # print the table
    python benchmarks/triton_resources.py --check    # fail on spills (STACK > 0), local memory
                                                     # or shared memory above the A100's 163 KB
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gtp_kernels.triton._common import Launch  # noqa: E402

ARCHS = (80, 90)
A100_SHARED = 163 * 1024  # the most dynamic shared memory a block may take on sm_80 (A100)

_POINTER = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.bool: "*i1",
}


def signature(launch: Launch) -> tuple[dict, dict]:
    """(signature, constexprs) for triton.compile from the launch's arguments: tensors become
    pointers of their dtype, ints i32 (i64 beyond), floats fp32, None a constexpr."""
    import triton.language as tl

    names = launch.kernel.arg_names
    sig, const = {}, {}
    positional = dict(zip(names, launch.args, strict=False))
    for name in names:
        if name in launch.constexprs:
            sig[name] = "constexpr"
            const[name] = launch.constexprs[name]
            continue
        value = positional[name]
        if isinstance(value, torch.Tensor):
            sig[name] = _POINTER[value.dtype]
        elif value is None:
            sig[name] = "constexpr"
            const[name] = None
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif isinstance(value, tl.dtype):
            sig[name] = "constexpr"
            const[name] = value
        else:
            raise TypeError(f"{launch.kernel.__name__}: cannot type argument {name}={value!r}")
    return sig, const


@functools.cache
def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def specialized_source(launch: Launch, arch: int):
    """The ASTSource that launching `launch` compiles for sm_<arch>: the JIT's own binder
    specializes the arguments as a launch does (pointers 16-byte aligned, integers divisible by
    16 or equal to 1, unless the kernel says do_not_specialize), so that the compiler can prove
    the same alignments and pick the same layouts and vector widths as at run time. Works on
    meta tensors (their data pointer is 0: aligned)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, sig, const, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for sm_<arch>, specialized as the launch would be (specialized_source):
    {REG, STACK, SHARED, LOCAL, warps}."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(
        specialized_source(launch, arch),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            for field in line.split():
                key, _, value = field.partition(":")
                if value.isdigit():
                    usage[key] = int(value)
    return {
        "REG": usage.get("REG", 0),
        "STACK": usage.get("STACK", 0),
        "LOCAL": usage.get("LOCAL", 0),
        # Triton's shared memory is dynamic: the compiler's own figure, not cuobjdump's
        "SHARED": int(compiled.metadata.shared),
        "warps": launch.num_warps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    del args
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
