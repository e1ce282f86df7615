"""Timing helpers: allocator control, alternating rounds (host clock, or CUDA events on a GPU),
medians, markdown tables.

CPU timings of big models move by up to 15% with glibc malloc's page faults: freed large blocks
go back to the kernel (mmap / trim) and come back as fresh zeroed pages on the next forward.
`ensure_malloc_env()` re-executes the script with MALLOC_MMAP_MAX_=0 and a large
MALLOC_TRIM_THRESHOLD_ (glibc reads them only at process start), unless the user set them.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
_REEXEC_FLAG = "GTP_BENCH_REEXEC"


def ensure_malloc_env(enabled: bool = True, argv: list[str] | None = None) -> str:
    """Make sure this process runs with the steady-state glibc malloc settings.

    Returns a one-line description of the allocator setting in force, for the report. If the
    variables are missing, re-executes the current command line with them set (once); `argv`
    is that command line after the interpreter (default sys.argv; a `python -m module` run
    passes ["-m", module, *args], since sys.argv[0] is then the module's file).
    """
    if enabled and os.environ.get(_REEXEC_FLAG) != "1":
        missing = {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}
        if missing:
            env = dict(os.environ, **missing, **{_REEXEC_FLAG: "1"})
            sys.stdout.flush()
            sys.stderr.flush()
            os.execvpe(sys.executable, [sys.executable, *(argv or sys.argv)], env)
    ld = os.environ.get("LD_PRELOAD", "")
    settings = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in MALLOC_ENV)
    alloc = f"LD_PRELOAD={ld}" if ld else "glibc malloc"
    return f"{alloc}, {settings}"


def time_call(fn: Callable[[], object], iters: int = 1, device=None) -> float:
    """Seconds per call of fn, averaged over `iters` back-to-back calls. On a CUDA device the
    calls are timed on the current stream with CUDA events (the host only queues the work),
    from an idle device (synchronised first) to the end event, which is waited for."""
    if _is_cuda(device):
        import torch

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    start_s = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start_s) / iters


def _is_cuda(device) -> bool:
    """device: None (the host), "cpu" / "cuda" or a torch.device."""
    return device is not None and str(device).startswith("cuda")


def calibrate(fn: Callable[[], object], device=None, target: float = 0.02, most: int = 1000) -> int:
    """Calls per timing so that one timing lasts about `target` seconds (at least 1): on a GPU
    a single call of a small kernel is a few microseconds, below what events resolve well."""
    once = time_call(fn, 1, device)
    return max(1, min(most, round(target / max(once, 1e-9))))


def alternating(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    iters: int | dict[str, int] = 1,
    progress: bool = True,
    device=None,
) -> dict[str, list[float]]:
    """Time every fn once per round, interleaved (a, b, c, a, b, c, ...), so slow drifts of a
    shared machine hit every variant alike. Returns seconds per call, one entry per round.
    iters: calls per timing, for all fns or per name; device: as time_call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            n = iters.get(name, 1) if isinstance(iters, dict) else iters
            times[name].append(time_call(fn, n, device))
        if progress:
            done = ", ".join(f"{n} {1e3 * statistics.median(t):.1f} ms" for n, t in times.items())
            print(f"  round {r + 1}/{rounds}: median so far {done}", file=sys.stderr, flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy a set of rounds was."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m else float("nan")


SPEEDUP_HEADER = ["GMACs", "images/s", "speed-up", "ideal (GMACs)", "of ideal", "spread"]


def speedup_row(
    times: Sequence[float], base_time: float, gmacs: float, base_gmacs: float, batch: int
) -> list[str]:
    """The SPEEDUP_HEADER cells of one variant: its rounds `times` (seconds per batch)
    against the baseline's median `base_time`; the ideal speed-up is the GMAC ratio."""
    t = statistics.median(times)
    measured, ideal = base_time / t, base_gmacs / gmacs
    return [
        f"{gmacs:.2f}",
        f"{batch / t:.1f}",
        f"{measured:.3f}x",
        f"{ideal:.3f}x",
        f"{100 * measured / ideal:.0f}%",
        f"{100 * spread(times):.0f}%",
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> dict[str, str]:
    """Machine, versions and git sha for CSV output."""
    import platform
    import subprocess

    import torch

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        sha = ""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "git": sha or "unknown",
    }
