"""Registers, shared memory, stack and local memory of every CUDA kernel in the built extension.

Reads the cubins inside gtp_kernels/_C*.so with `cuobjdump --dump-resource-usage` (the CUDA
toolkit's, or the copy the triton package ships), so it needs no GPU:

    python benchmarks/cuda_resources.py            # print the table
    python benchmarks/cuda_resources.py --write    # regenerate it in benchmarks/NOTES.md
    python benchmarks/cuda_resources.py --check    # fail if any kernel has stack or local memory

SHARED is static shared memory; the kernels that size theirs at launch (attention,
build_graph's rows, propagate) get dynamic shared memory on top, listed in NOTES.md.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES = os.path.join(ROOT, "benchmarks", "NOTES.md")
BEGIN, END = "<!-- cuda-resources:begin -->", "<!-- cuda-resources:end -->"


def find_cuobjdump() -> str:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump")]
    candidates.append(shutil.which("cuobjdump") or "")
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        )
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("cuobjdump not found: set CUDA_HOME or install triton (it ships one)")


def find_extension() -> str:
    found = sorted(glob.glob(os.path.join(ROOT, "gtp_kernels", "_C*.so")))
    if not found:
        raise SystemExit("gtp_kernels/_C*.so not built (python setup.py build_ext --inplace)")
    return found[0]


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run(
        [cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    short = []
    for name in out:
        name = name.replace("gtp::(anonymous namespace)::", "").replace("gtp::", "")
        name = re.sub(r"^void ", "", name)
        name = re.sub(r"\((.*)\)$", "", name)  # parameter list
        short.append(name)
    return short


def resource_usage(so: str) -> list[dict]:
    """One dict per (kernel, architecture): name, arch, source, REG, STACK, SHARED, LOCAL."""
    text = subprocess.run(
        [find_cuobjdump(), "--dump-resource-usage", so], capture_output=True, text=True, check=True
    ).stdout
    rows, arch, source, fn = [], None, None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("identifier = "):
            source = os.path.basename(line.split("=", 1)[1].strip())
        elif line.startswith("Function "):
            fn = line[len("Function ") :].rstrip(":")
        elif fn is not None and line.startswith("REG:"):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append(
                dict(
                    mangled=fn,
                    arch=arch,
                    source=source,
                    **{k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")},
                )
            )
            fn = None
    for row, name in zip(rows, demangle([r["mangled"] for r in rows]), strict=True):
        row["name"] = name
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| source | kernel | arch | registers | stack (B) | static shared (B) | local (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["source"], r["name"], r["arch"])):
        lines.append(
            f"| {r['source']} | `{r['name']}` | {r['arch']} | {r['REG']} | {r['STACK']} | "
            f"{r['SHARED']} | {r['LOCAL']} |"
        )
    return "\n".join(lines)


def write_notes(text: str) -> None:
    with open(NOTES) as f:
        notes = f.read()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in notes and END in notes:
        notes = notes[: notes.index(BEGIN)] + block + notes[notes.index(END) + len(END) :]
    else:
        notes = notes.rstrip("\n") + "\n\n" + block + "\n"
    with open(NOTES, "w") as f:
        f.write(notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--write", action="store_true", help="regenerate the table in NOTES.md")
    p.add_argument("--check", action="store_true", help="fail on any stack or local memory")
    p.add_argument("--so", default=None, help="extension to read (default: gtp_kernels/_C*.so)")
    args = p.parse_args(argv)
    rows = resource_usage(args.so or find_extension())
    if not rows:
        print("no CUDA kernels in the extension (a CPU-only build)", file=sys.stderr)
        return 1 if args.check else 0
    text = table(rows)
    print(text)
    if args.write:
        write_notes(text)
        print(f"written to {NOTES}", file=sys.stderr)
    bad = [r for r in rows if r["STACK"] or r["LOCAL"]]
    if args.check and bad:
        for r in bad:
            print(
                f"{r['name']} ({r['arch']}): stack {r['STACK']}, local {r['LOCAL']}",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
