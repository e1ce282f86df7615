"""Compile every Triton kernel, in every configuration its launcher picks for the problems below,
ahead of time for sm_80 and sm_90, and report registers, stack, shared memory and warps. No GPU
needed (triton.compile to a cubin, then `cuobjdump --dump-resource-usage`).

    python benchmarks/triton_resources.py            # print the table
    python benchmarks/triton_resources.py --check    # fail on spills or local memory (STACK or
                                                     # LOCAL > 0), or shared memory above the
                                                     # A100's 163 KB per block
    python benchmarks/triton_resources.py --write    # regenerate the table in NOTES.md

Which kernels and configurations: each launcher (gtp_kernels/triton/<op>.py) is called on meta
tensors of each problem's shapes inside gtp_kernels.triton._common.recording(), which collects
the launches instead of running them: the same code that picks the tiles on a GPU. The problems
are the patched models' calls: DeiT-S / DeiT-B / ViT-L/16 at 224 px and ViT-B/16 at 384 px
(N = 577), batch 256, in float32, float16 and bfloat16, at the token count of every block
(P = 8 tokens fewer per block); attention also with head dims 32, 80 and 128, theta 0.6 and 1,
score "mixed_max" and "none", with and without log sizes.

What is compiled: the exact specialization Triton's JIT would compile for that launch on a GPU
(it types the arguments with Triton's own binder: integers equal to 1 become constants, integers
and pointers divisible by 16 get the divisibility attribute; meta tensors report data pointers
at offset 0 of an aligned allocation, as the CUDA caching allocator gives). Identical
(kernel, signature, constants, attributes, warps, stages) are compiled once; a table row is the
worst case over the launches it stands for.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

# The gate compiles for real GPUs: under the Triton interpreter the kernels would be
# interpreted functions, which do not compile. Drop the switch before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gtp_kernels.info import OPS as ALL_OPS  # noqa: E402

NOTES = os.path.join(ROOT, "benchmarks", "NOTES.md")
BEGIN, END = "<!-- triton-resources:begin -->", "<!-- triton-resources:end -->"
ARCHS = (80, 90)
A100_SHARED = 163 * 1024  # the most shared memory a block may take on sm_80 (A100)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_TAG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """A patched ViT's shapes: every block's gtp calls at batch `batch`."""

    name: str
    channels: int  # C
    heads: int  # H
    grid: int  # the patch grid's side: grid^2 image tokens
    depth: int  # blocks; block l sees N - l * num_prop tokens
    attention_only: bool = False  # head-dim variants: only attention's configuration changes
    batch: int = 256
    prefix: int = 1  # M: the CLS token
    num_prop: int = 8  # P
    num_neighbours: int = 8  # K of the mixed graph

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid * self.grid

    def token_counts(self) -> list[int]:
        """N at every block, prefix included."""
        return [self.tokens - layer * self.num_prop for layer in range(self.depth)]


PROBLEMS = (
    Problem("DeiT-S", channels=384, heads=6, grid=14, depth=12),
    Problem("DeiT-B", channels=768, heads=12, grid=14, depth=12),
    Problem("ViT-L/16", channels=1024, heads=16, grid=14, depth=24),
    Problem("ViT-B/16 384px", channels=768, heads=12, grid=24, depth=12),
    Problem("d=32", channels=384, heads=12, grid=14, depth=12, attention_only=True),
    Problem("d=80", channels=1280, heads=16, grid=14, depth=12, attention_only=True),
    Problem("d=128", channels=1024, heads=8, grid=14, depth=12, attention_only=True),
)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


# A builder yields the argument tuples the patched model passes to torch.ops.gtp.<op> for one
# problem and dtype (gtp_kernels/patch/timm.py: gtp_block and _propagate), as meta tensors.


def attention_args(p: Problem, dtype: torch.dtype):
    b, h, d = p.batch, p.heads, p.head_dim
    for n in p.token_counts():
        # timm's q, k, v: strided views of one (B, N, 3, H, d) projection
        q, k, v = _meta(b, n, 3, h, d, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
        for log_sizes in (None, _meta(b, n)):
            for theta in (0.6, 1.0):
                for score in ("mixed_max", "none"):
                    yield q, k, v, log_sizes, d**-0.5, theta, p.prefix, score


def build_graph_args(p: Problem, dtype: torch.dtype):
    # once per forward, on the image tokens of the first block's input
    x = _meta(p.batch, p.tokens, p.channels, dtype=dtype)
    yield x[:, p.prefix :], p.grid, p.grid, p.num_neighbours, "mixed"


def select_tokens_args(p: Problem, dtype: torch.dtype):
    del dtype  # the score is float32 whatever the model's dtype
    for n in p.token_counts():
        yield _meta(p.batch, n - p.prefix), p.num_prop


def propagate_args(p: Problem, dtype: torch.dtype):
    b, m, width = p.batch, p.prefix, 8 + p.num_neighbours
    for n in p.token_counts():
        image = n - m
        index = _meta(b, image, width, dtype=torch.int32)
        weight = _meta(b, image, width)
        keep = _meta(b, image - p.num_prop, dtype=torch.int64)
        x = _meta(b, n, p.channels, dtype=dtype)
        for sizes in (None, _meta(b, n)):
            yield x, index, weight, keep, 0.1, m, sizes


BUILDERS = {
    "attention": attention_args,
    "build_graph": build_graph_args,
    "select_tokens": select_tokens_args,
    "propagate": propagate_args,
}


# ------------------------------------------------------------------------------- launches


@dataclasses.dataclass
class Config:
    """One distinct compilation: the launches (and problems) that need it, and its results."""

    op: str
    launch: object  # gtp_kernels.triton._common.Launch, the first one seen
    dtype: str
    problems: list[str] = dataclasses.field(default_factory=list)
    usage: dict = dataclasses.field(default_factory=dict)  # arch -> resources

    @property
    def kernel(self) -> str:
        return f"{self.op}.{self.launch.kernel.fn.__name__}"

    @property
    def label(self) -> str:
        """The launcher's choices: the dtype, its constexprs, None arguments, stages."""
        parts = [self.dtype]
        for name, value in sorted(self.launch.constexprs.items()):
            value = getattr(value, "value", value)  # a module-level tl.constexpr
            if isinstance(value, bool):
                value = int(value)
            elif isinstance(value, float):
                value = f"{value:g}"
            parts.append(f"{name}={value}")
        args = dict(zip(self.launch.kernel.arg_names, self.launch.args, strict=False))
        parts += [f"{name}=None" for name, value in args.items() if value is None]
        parts.append(f"stages={self.launch.num_stages}")
        return " ".join(parts)


def _launch_dtype(launch) -> str:
    """The floating-point dtype of the first floating tensor argument (the model's dtype)."""
    for arg in launch.args:
        if isinstance(arg, torch.Tensor) and arg.dtype in _DTYPE_TAG:
            return _DTYPE_TAG[arg.dtype]
    return "-"


@functools.cache
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def specialization(launch, arch: int) -> tuple[dict, dict, dict, dict]:
    """(options, signature, constexprs, attrs) that Triton's JIT compiles for this launch on an
    sm_<arch> GPU: its own binder and argument packing (triton.runtime.jit, as JITFunction.run
    uses them), so that the gate compiles exactly what a GPU would run."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = _backend(arch)
    kwargs = dict(
        launch.constexprs,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        debug=kernel.debug or knobs.runtime.debug,
        instrumentation_mode=knobs.compilation.instrumentation_mode,
    )
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, spec, options)


def _key(launch) -> tuple:
    """What makes two launches one compilation: the kernel and its specialization for every
    architecture (signature, constants, attributes, options such as warps and stages)."""
    specs = []
    for arch in ARCHS:
        options, signature, constexprs, attrs = specialization(launch, arch)
        specs.append(
            (
                repr(sorted(signature.items())),
                repr(sorted(constexprs.items(), key=repr)),
                repr(sorted(attrs.items(), key=repr)),
                repr(sorted(options.__dict__.items())),
            )
        )
    return (launch.kernel.fn.__module__, launch.kernel.fn.__name__, tuple(specs))


def record(ops: list[str]) -> dict[tuple, Config]:
    """Call every op's launcher on every problem's meta tensors; the distinct compilations."""
    from gtp_kernels.triton._common import recording

    configs: dict[tuple, Config] = {}
    for op in ops:
        launcher = getattr(importlib.import_module(f"gtp_kernels.triton.{op}"), op)
        for problem in PROBLEMS:
            if problem.attention_only and op != "attention":
                continue
            for dtype in DTYPES:
                for args in BUILDERS[op](problem, dtype):
                    with recording() as launches:
                        launcher(*args)
                    for launch in launches:
                        key = _key(launch)
                        cfg = configs.setdefault(key, Config(op, launch, _launch_dtype(launch)))
                        if problem.name not in cfg.problems:
                            cfg.problems.append(problem.name)
    return configs


# ------------------------------------------------------------------------------- compiling


@functools.cache
def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_launch(launch, arch: int) -> dict:
    """Compile one launch for sm_<arch>: {REG, STACK, LOCAL, SHARED, warps}."""
    import triton
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs = specialization(launch, arch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=_backend(arch).target, options=options.__dict__)
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
        # Triton's shared memory is dynamic (the compiler's figure) plus any static (cuobjdump)
        "SHARED": int(compiled.metadata.shared) + usage.get("SHARED", 0),
        "warps": compiled.metadata.num_warps,
    }


_JOBS: list[tuple] = []  # (launch, arch), read by the forked workers


def _compile_job(i: int) -> dict:
    launch, arch = _JOBS[i]
    return compile_launch(launch, arch)


def compile_all(configs: dict[tuple, Config], processes: int) -> None:
    """Compile every configuration for every architecture, `processes` at a time. Workers are
    forked after the launchers were recorded, so they share the recorded kernels."""
    _JOBS[:] = [(cfg.launch, arch) for cfg in configs.values() for arch in ARCHS]
    targets = [(cfg, arch) for cfg in configs.values() for arch in ARCHS]
    if processes <= 1:
        results = [_compile_job(i) for i in range(len(_JOBS))]
    else:
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            results = list(pool.map(_compile_job, range(len(_JOBS))))
    for (cfg, arch), usage in zip(targets, results, strict=True):
        cfg.usage[arch] = usage


# ---------------------------------------------------------------------------------- report


def table(configs: dict[tuple, Config]) -> str:
    """One row per (kernel, launcher choices, arch): the worst case over its specializations."""
    rows: dict[tuple, dict] = {}
    for cfg in configs.values():
        for arch, usage in cfg.usage.items():
            row = rows.setdefault(
                (cfg.kernel, cfg.label, arch), {"problems": [], "usage": dict(usage)}
            )
            row["problems"] += [p for p in cfg.problems if p not in row["problems"]]
            for field in ("REG", "STACK", "SHARED", "LOCAL"):
                row["usage"][field] = max(row["usage"][field], usage[field])
    order = {p.name: i for i, p in enumerate(PROBLEMS)}
    lines = [
        "| kernel | config | problems | arch | REG | STACK | SHARED (B) | warps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, label, arch), row in sorted(rows.items(), key=lambda kv: _natural(kv[0])):
        u = row["usage"]
        problems = ", ".join(sorted(row["problems"], key=order.__getitem__))
        lines.append(
            f"| `{kernel}` | {label} | {problems} | sm_{arch} | {u['REG']} | {u['STACK']} | "
            f"{u['SHARED']} | {u['warps']} |"
        )
    return "\n".join(lines)


def _natural(key: tuple) -> tuple:
    """Sort key that orders the numbers inside strings by value (BLOCK=64 before BLOCK=128)."""
    return tuple(
        tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(part))) for part in key
    )


def offenders(configs: dict[tuple, Config]) -> list[str]:
    """Every compilation with stack or local memory, or more shared memory than an A100 has."""
    bad = []
    for cfg in configs.values():
        for arch, u in sorted(cfg.usage.items()):
            why = []
            if u["STACK"] or u["LOCAL"]:
                why.append(f"stack {u['STACK']} B, local {u['LOCAL']} B (spills or local arrays)")
            if u["SHARED"] > A100_SHARED:
                why.append(f"shared {u['SHARED']} B > {A100_SHARED} B (the A100's limit)")
            if why:
                bad.append(
                    f"{cfg.kernel} [{cfg.label}] sm_{arch} ({', '.join(cfg.problems)}): "
                    + "; ".join(why)
                )
    return bad


def write_notes(text: str) -> None:
    with open(NOTES) as f:
        notes = f.read()
    if BEGIN not in notes or END not in notes:
        raise SystemExit(f"{NOTES} has no {BEGIN} ... {END} markers to write the table between")
    block = f"{BEGIN}\n{text}\n{END}"
    notes = notes[: notes.index(BEGIN)] + block + notes[notes.index(END) + len(END) :]
    with open(NOTES, "w") as f:
        f.write(notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 on any offender (see above)")
    p.add_argument("--write", action="store_true", help="regenerate the table in NOTES.md")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--ops", nargs="+", default=None, help="only these ops (default: all)")
    args = p.parse_args(argv)
    start = time.perf_counter()

    import triton

    import gtp_kernels.triton as gt

    if gt.INTERPRETER:  # imported before this script could turn the interpreter off
        raise SystemExit("gtp_kernels.triton was imported under TRITON_INTERPRET=1")
    ops = [op for op in ALL_OPS if args.ops is None or op in args.ops]
    failed = False
    for op in ops:
        if op not in gt.OPS:
            print(f"# {op}: no Triton kernel yet (not in gtp_kernels.triton.OPS); not compiled")
    missing = [op for op in gt.OPS if op in ops and op not in BUILDERS]
    for op in missing:
        print(f"# {op}: in gtp_kernels.triton.OPS but no input builder here (add one to BUILDERS)")
        failed = True
    ops = [op for op in ops if op in gt.OPS and op in BUILDERS]

    configs = record(ops)
    recorded = time.perf_counter() - start
    compile_all(configs, args.jobs)
    text = table(configs)
    print(text)
    print(
        f"\n# {len(configs)} configurations x {len(ARCHS)} architectures compiled with triton "
        f"{triton.__version__} in {time.perf_counter() - start:.1f} s ({recorded:.1f} s "
        f"recording launches, {args.jobs} compile processes)"
    )
    if args.write:
        write_notes(text)
        print(f"# written to {NOTES}", file=sys.stderr)
    bad = offenders(configs)
    for line in bad:
        print(f"OFFENDER: {line}", file=sys.stderr)
    if args.check and (bad or failed):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
