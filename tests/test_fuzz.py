"""The property fuzzer (tests/fuzz.py) in CI: a fixed seed and a bounded number of cases per op
on every backend that runs here, the regression cases it once found, and proof that its checks
catch wrong kernels.

Environment: GTP_FUZZ_SEED (default 0), GTP_FUZZ_SCALE (multiplies every case count; the
sanitizer run uses a fraction), GTP_FUZZ_TRITON_CASES (cases per op under the Triton
interpreter, which runs each kernel in Python and is slow, ~1.5 s an attention case;
default 25; 0 skips it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import fuzz
import pytest
import torch

from gtp_kernels import reference
from gtp_kernels.reference.attention import attention_probs, importance_score, num_masked
from gtp_kernels.reference.build_graph import (
    ell_from_adjacency,
    graph_width,
    normalised_tokens,
    spatial_adjacency,
)

SEED = int(os.environ.get("GTP_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("GTP_FUZZ_SCALE", "1"))
# >= 10,000 cases per run on the compiled CPU kernels, about 30 s on an idle 2-core machine
CASES = {"attention": 4000, "build_graph": 3000, "select_tokens": 2000, "propagate": 3000}
TRITON_CASES = int(os.environ.get("GTP_FUZZ_TRITON_CASES", "25"))

# Minimal failing specs the shrinker produced, kept as regression cases (op, spec). The first
# ones are what the fuzzer found and shrank on the CPU kernels before the non-finite rule
# (issue 11): a NaN head skipped by the max over heads unless it was head 0, NaN scores and
# non-finite tokens rejected by the kernel but not the reference.
REGRESSIONS: list[tuple[str, dict]] = [
    (
        "attention",
        {"b": 1, "h": 2, "n": 1, "d": 7, "dv": 1, "m": 0, "theta": 0.5, "score": "mixed_max",
         "dtype": "f32", "layout": "contiguous", "values": "randn", "spread": 1.0,
         "log_sizes": "none", "nonfinite": 1, "seed": 1887962090},
    ),
    (
        "attention",
        {"b": 1, "h": 2, "n": 2, "d": 2, "dv": 2, "m": 0, "theta": 0.5, "score": "mixed_max",
         "dtype": "f32", "layout": "contiguous", "values": "onehot", "spread": 1.0,
         "log_sizes": "none", "nonfinite": 1, "seed": 1389448285},
    ),
    (
        "build_graph",
        {"b": 1, "h": 1, "w": 2, "c": 1, "k": 1, "graph": "mixed", "dtype": "f32",
         "layout": "contiguous", "values": "randn", "nonfinite": 1, "seed": 1173337327},
    ),
    (
        "select_tokens",
        {"b": 1, "n": 3, "p": 0, "values": "int", "nonfinite": 0.3, "layout": "contiguous",
         "seed": 847745854},
    ),
]  # fmt: skip


def _report(op, backend, failures):
    lines = [f"{op} on {backend}: {len(failures)} failing case(s) (seed {SEED})"]
    for spec, small, msg in failures:
        lines += [f"  case:   {spec}", f"  shrunk: {small}", f"  {msg}"]
    lines.append("Add the shrunk spec to REGRESSIONS in tests/test_fuzz.py once it is fixed.")
    return "\n".join(lines)


@pytest.fixture
def threads():
    """Run with n intra-op threads, restored after (one thread by default: on a loaded
    machine small ops spend most of their time waking threads)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _params():
    out = []
    for op in fuzz.OPS:
        for backend in fuzz.available_backends(op):
            if backend != "triton":  # the interpreter gets its own small budget below
                out.append(pytest.param(op, backend, id=f"{op}-{backend}"))
    return out or [pytest.param(None, None, marks=pytest.mark.skip("no compiled backend"))]


@pytest.mark.parametrize("op, backend", _params())
def test_fuzz(op, backend, threads):
    threads(1)
    failures = fuzz.campaign(op, backend, max(1, int(CASES[op] * SCALE)), SEED)
    assert not failures, _report(op, backend, failures)


@pytest.mark.parametrize("op", ["attention", "build_graph", "propagate", "select_tokens"])
def test_fuzz_two_threads(op, threads):
    """The same checks with two intra-op threads (the kernels' parallel paths)."""
    backends = [b for b in fuzz.available_backends(op) if b == "cpu"]
    if not backends:
        pytest.skip("the compiled CPU kernels are not built")
    threads(2)
    failures = fuzz.campaign(op, "cpu", max(1, int(100 * SCALE)), SEED + 1)
    assert not failures, _report(op, "cpu (2 threads)", failures)


def test_fuzz_triton_interpreter():
    """Triton kernels under TRITON_INTERPRET=1 (set before triton is imported, hence a fresh
    process), on the ops that have one; the backend list comes from the op wrappers' own
    backend resolution in that process."""
    if TRITON_CASES == 0:
        pytest.skip("GTP_FUZZ_TRITON_CASES=0")
    try:
        import gtp_kernels.triton  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"gtp_kernels.triton is not available here ({exc})")
    code = (
        "import sys; sys.path.insert(0, 'tests'); import fuzz; "
        "ops = [o for o in fuzz.OPS if 'triton' in fuzz.available_backends(o)]; "
        "print('triton ops:', ops); "
        f"sys.exit(fuzz.main(['--cases', '{max(1, int(TRITON_CASES * SCALE))}', "
        f"'--seed', '{SEED}', '--backend', 'triton'] + sum([['--op', o] for o in ops], [])) "
        "if ops else 0)"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)


@pytest.mark.parametrize("case", range(len(REGRESSIONS)))
def test_regressions(case, threads):
    op, spec = REGRESSIONS[case]
    backends = fuzz.available_backends(op)
    if not backends:
        pytest.skip(f"no compiled backend for {op}")
    for backend in backends:
        for n in (1, 2):
            threads(n)
            msg = fuzz.fails(op, spec, backend)
            assert msg is None, f"{op} on {backend}, {n} thread(s): {msg}\n{spec}"


# --------------------------------------------------------------- the checks catch wrong kernels


def _mutant_attention_mask_le(q, k, v, ls, scale, theta, m, score):
    """Zeroes A <= tau instead of A < tau (the entries tied with the threshold go wrong)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    a = attention_probs(q, k, ls, scale, 1.0)
    b, h, n, _ = a.shape
    kk = num_masked(n, theta)
    if kk > 0 and a.numel():
        flat = a.reshape(b, h, n * n)
        tau = flat.sort(dim=-1).values[..., kk - 1 : kk]
        a = torch.where(flat <= tau, 0.0, flat).reshape(a.shape)
    return (a @ v.to(compute)).to(q.dtype), importance_score(a, m, score)


def _mutant_attention_nan_max(q, k, v, ls, scale, theta, m, score):
    """The max over heads skips NaN (the CPU kernel's bug before the non-finite rule)."""
    out, _ = reference.attention(q, k, v, ls, scale, theta, m, score)
    a = attention_probs(q, k, ls, scale, theta)
    return out, importance_score(a.nan_to_num(-1.0), m, score)


def _mutant_select_high_kept(score, p):
    """Among equal scores keeps the higher position."""
    order = torch.sort(score, dim=-1, stable=True).indices
    return order[:, p:].sort(-1).values, order[:, :p].sort(-1).values


def _mutant_graph_tie_high(tokens, h, w, k, graph):
    """Semantic ties go to the higher index."""
    b, n, _ = tokens.shape
    adj = spatial_adjacency(h, w).expand(b, n, n).clone()
    if graph != "spatial":
        e = normalised_tokens(tokens)
        sim = (e @ e.transpose(1, 2)).nan_to_num(float("inf"))
        sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        order = torch.sort(sim.flip(-1), dim=-1, descending=True, stable=True).indices
        sem = torch.zeros(b, n, n, dtype=torch.bool).scatter_(-1, (n - 1) - order[..., :k], True)
        adj = sem if graph == "semantic" else adj | sem
    return ell_from_adjacency(adj, graph_width(graph, k))


def _mutant_propagate_skip_slot(x, index, weight, keep, alpha, m, sizes):
    """x and sizes ignore the first slot of every graph row (the graph outputs are right)."""
    skipped = weight.clone()
    skipped[..., :1] = 0
    x_out, s_out, _, _ = reference.propagate(x, index, skipped, keep, alpha, m, sizes)
    return (x_out, s_out) + reference.propagate(x, index, weight, keep, alpha, m, sizes)[2:]


MUTANTS = {
    "attention": [_mutant_attention_mask_le, _mutant_attention_nan_max],
    "select_tokens": [_mutant_select_high_kept],
    "build_graph": [_mutant_graph_tie_high],
    "propagate": [_mutant_propagate_skip_slot],
}


@pytest.mark.parametrize(
    "op, mutant",
    [(op, f) for op, fs in MUTANTS.items() for f in fs],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_fuzzer_catches(op, mutant, monkeypatch, threads):
    """A deliberately wrong kernel fails within a few hundred cases, and the failure shrinks to
    a small case (one image)."""
    threads(1)
    monkeypatch.setitem(fuzz.EXTRA_BACKENDS, "mutant", {op: mutant})
    failures = fuzz.campaign(op, "mutant", 400, SEED)
    assert failures, f"{mutant.__name__} passed 400 cases"
    spec, small, msg = failures[0]
    assert fuzz.fails(op, small, "mutant"), "the shrunk case does not fail"
    assert small.get("b", 1) <= 1, small
