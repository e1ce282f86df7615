"""build_graph: hand-computed graphs, properties, kernel vs reference, opcheck, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close

import gtp_kernels.ops  # noqa: F401  (registers the fake kernels and autograd)
from gtp_kernels._extension import extension_available, has_kernel
from gtp_kernels.reference import build_graph as ref_build_graph

HAS_CPU_KERNEL = extension_available() and has_kernel("build_graph", "CPU")
needs_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL,
    reason="gtp_kernels._C with the build_graph CPU kernel is not built "
    "(python setup.py build_ext --inplace)",
)
BACKENDS = ["reference", pytest.param("cpu", marks=needs_kernel)]


def run(backend, tokens, height, width, k, graph):
    """The op on `backend`: the reference, the compiled kernel (torch.ops.gtp, "cpu"), or any
    other backend through the public wrapper (tests/triton_ops reuse these tests)."""
    if backend == "reference":
        return ref_build_graph(tokens, height, width, k, graph)
    if backend == "cpu":
        return torch.ops.gtp.build_graph(tokens, height, width, k, graph)
    return gtp_kernels.ops.build_graph(tokens, height, width, k, graph, backend=backend)


def rows(index):
    """(n, W) index -> list of neighbour lists (padding dropped)."""
    return [[j for j in r if j >= 0] for r in index.tolist()]


def grid_neighbours(height, width):
    """Independent oracle: 8-neighbourhood by walking the grid."""
    out = []
    for r in range(height):
        for c in range(width):
            nb = []
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if (dr, dc) != (0, 0) and 0 <= rr < height and 0 <= cc < width:
                        nb.append(rr * width + cc)
            out.append(sorted(nb))
    return out


def inv_sqrt(v):
    return 1.0 / math.sqrt(v)


def expected_weights(neigh):
    """(n, W) weights 1/sqrt(d_i d_j) of neighbour lists, as the spec defines them."""
    deg = [len(r) for r in neigh]
    return [[1.0 / math.sqrt(deg[i] * deg[j]) for j in r] for i, r in enumerate(neigh)]


def check_weights(index, weight, neigh):
    exp = expected_weights(neigh)
    for i, r in enumerate(neigh):
        got = weight[i, : len(r)]
        assert_close(
            got, torch.tensor(exp[i], dtype=torch.float32), atol=0, rtol=0, name=f"row {i}"
        )
        assert (weight[i, len(r) :] == 0).all() and (index[i, len(r) :] == -1).all()


# ---------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_3x3_by_hand(backend):
    # 0 1 2
    # 3 4 5      corners have degree 3, edge midpoints 5, the centre 8
    # 6 7 8
    index, weight = run(backend, torch.randn(1, 9, 4), 3, 3, 0, "spatial")
    assert index.shape == (1, 9, 8) and index.dtype == torch.int32
    assert weight.shape == (1, 9, 8) and weight.dtype == torch.float32
    expected = [
        [1, 3, 4],
        [0, 2, 3, 4, 5],
        [1, 4, 5],
        [0, 1, 4, 6, 7],
        [0, 1, 2, 3, 5, 6, 7, 8],
        [1, 2, 4, 7, 8],
        [3, 4, 7],
        [3, 4, 5, 6, 8],
        [4, 5, 7],
    ]
    assert rows(index[0]) == expected
    s = inv_sqrt
    # corner 0: edges to 1, 3 (degree 5) and the centre (degree 8)
    assert_close(weight[0, 0, :3], torch.tensor([s(15), s(15), s(24)]), name="row 0")
    # centre: 4 edge midpoints (5) and 4 corners (3)
    assert_close(
        weight[0, 4],
        torch.tensor([s(24), s(40), s(24), s(40), s(40), s(24), s(40), s(24)]),
        name="row 4",
    )
    check_weights(index[0], weight[0], expected)


def _tie_tokens():
    # t0 and t1 point the same way (t1 = 2 * t0): any row sees them with EXACTLY the same
    # similarity, so the lower index must win. t2 is at 45 degrees, t3 opposite t0.
    return torch.tensor([[[1.0, 0.0], [2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_semantic_by_hand_tie_goes_to_lower_index(backend):
    # cosine similarities:  s01 = 1, s02 = s12 = 0.707, s03 = s13 = -1, s23 = -0.707
    index, weight = run(backend, _tie_tokens(), 1, 4, 1, "semantic")
    assert index.shape == (1, 4, 1)
    # row 2: t0 and t1 tie at 0.707 -> 0; row 3: t0, t1 tie at -1, t2 is -0.707 -> 2
    assert index[0, :, 0].tolist() == [1, 0, 0, 2]
    assert (weight == 1.0).all()  # every degree is K = 1

    index, weight = run(backend, _tie_tokens(), 2, 2, 2, "semantic")
    # row 0: 1 (1.0), 2 (0.707); row 1: 0, 2; row 2: 0 and 1 (tie, both fit);
    # row 3: 2 (-0.707), then 0 and 1 tie at -1 -> 0
    assert rows(index[0]) == [[1, 2], [0, 2], [0, 1], [0, 2]]
    assert (weight == 0.5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_by_hand_is_union(backend):
    # 1 x 4 grid: spatial rows {1}, {0, 2}, {1, 3}, {2}; semantic K=1 rows {1}, {0}, {0}, {2}
    index, weight = run(backend, _tie_tokens(), 1, 4, 1, "mixed")
    assert index.shape == (1, 4, 9)
    neigh = [[1], [0, 2], [0, 1, 3], [2]]  # edges in both graphs count once
    assert rows(index[0]) == neigh
    s = inv_sqrt
    assert_close(weight[0, 0, :1], torch.tensor([s(2)]))
    assert_close(weight[0, 1, :2], torch.tensor([s(2), s(6)]))
    assert_close(weight[0, 2, :3], torch.tensor([s(3), s(6), s(3)]))
    assert_close(weight[0, 3, :1], torch.tensor([s(3)]))
    # directed: 2 -> 0 is an edge, 0 -> 2 is not
    check_weights(index[0], weight[0], neigh)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(3, 5), (5, 3), (1, 7), (7, 1), (1, 1), (2, 2), (4, 6)])
def test_spatial_non_square(backend, hw):
    h, w = hw
    index, weight = run(backend, torch.randn(2, h * w, 3), h, w, 0, "spatial")
    neigh = grid_neighbours(h, w)
    for b in range(2):
        assert rows(index[b]) == neigh
        check_weights(index[b], weight[b], neigh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_zero_and_k_max(backend):
    x = torch.randn(2, 12, 5)
    index, weight = run(backend, x, 3, 4, 0, "semantic")
    assert index.shape == (2, 12, 0) and weight.shape == (2, 12, 0)
    sp = run(backend, x, 3, 4, 0, "spatial")
    mx = run(backend, x, 3, 4, 0, "mixed")
    assert torch.equal(sp[0], mx[0]) and torch.equal(sp[1], mx[1])
    # K = n - 1: every other token, ascending, weight 1 / (n - 1)
    index, weight = run(backend, x, 3, 4, 11, "semantic")
    full = [[j for j in range(12) if j != i] for i in range(12)]
    assert rows(index[0]) == full and rows(index[1]) == full
    assert (weight == torch.tensor(1 / 11, dtype=torch.float32)).all()
    index, _ = run(backend, x, 3, 4, 11, "mixed")
    assert index.shape == (2, 12, 19) and rows(index[1]) == full


# ---------------------------------------------------------------- properties


def brute_semantic(x, k):
    """Row-by-row oracle in float64 (valid on inputs without near-ties)."""
    e = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = []
    for i in range(x.shape[0]):
        sims = (e @ e[i]).tolist()
        cand = sorted((j for j in range(x.shape[0]) if j != i), key=lambda j: (-sims[j], j))
        out.append(sorted(cand[:k]))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("graph", ["spatial", "semantic", "mixed"])
def test_properties(backend, graph):
    h, w, k = 5, 7, 6
    x = torch.randn(3, h * w, 16)
    index, weight = run(backend, x, h, w, k, graph)
    spatial = grid_neighbours(h, w)
    for b in range(3):
        nb = rows(index[b])
        sem = brute_semantic(x[b], k)
        for i, r in enumerate(nb):
            assert r == sorted(set(r)), "ascending, no duplicates"
            assert i not in r, "no self loop"
            valid = index[b, i] >= 0
            assert not (valid[1:] & ~valid[:-1]).any(), "padding only at the end"
            if graph == "semantic":
                assert len(r) == k
                assert r == sem[i]
            elif graph == "spatial":
                assert r == spatial[i]
            else:
                assert r == sorted(set(spatial[i]) | set(sem[i]))
        if graph == "spatial":  # symmetric graph and weights
            for i, r in enumerate(nb):
                for s, j in enumerate(r):
                    t = nb[j].index(i)
                    assert weight[b, i, s] == weight[b, j, t]
        check_weights(index[b], weight[b], nb)


# ---------------------------------------------------------------- bad inputs
# (NaN / Inf token values are not bad inputs: tests/test_nonfinite.py)


BAD = [
    (lambda: (torch.randn(9, 4), 3, 3, 1, "mixed"), "tokens must have 3 dimensions"),
    (lambda: (torch.randn(1, 9, 4).long(), 3, 3, 1, "mixed"), "tokens must be float32"),
    (lambda: (torch.randn(1, 9, 4), 3, 4, 1, "mixed"), "height \\* width must equal"),
    (lambda: (torch.randn(1, 9, 4), 9, 0, 1, "spatial"), "height \\* width must equal"),
    (lambda: (torch.randn(1, 9, 4), 3, 3, -1, "mixed"), "num_neighbours must be in"),
    (lambda: (torch.randn(1, 9, 4), 3, 3, 9, "semantic"), "num_neighbours must be in"),
    (lambda: (torch.randn(1, 9, 4), 3, 3, 1, "knn"), "graph must be"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(backend, case):
    make, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        run(backend, *make())


# ---------------------------------------------------------------- kernel vs reference


def sample_inputs(device="cpu", dtype=torch.float32):
    """(tokens, height, width, K, graph) cases: odd sizes, B > 1, non-contiguous, empty batch,
    exact ties, row-blocked and column-tiled similarity (n > 512)."""

    def t(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    dup = t(2, 12, 9)
    dup[:, 7] = dup[:, 2]  # exact duplicates: every row sees an exact tie between 2 and 7
    dup[:, 10] = 2 * dup[:, 4]  # scaled by a power of two: the same after normalisation
    return [
        (t(2, 15, 7), 3, 5, 4, "mixed"),
        (t(3, 49, 33), 7, 7, 8, "semantic"),
        (t(2, 15, 7), 5, 3, 0, "spatial"),
        (t(1, 7, 5), 1, 7, 6, "mixed"),  # K = n - 1
        (t(2, 24, 16), 4, 6, 0, "mixed"),  # K = 0
        (t(2, 11, 10).transpose(1, 2), 2, 5, 3, "mixed"),  # non-contiguous
        (t(2, 10, 22)[:, :, ::2], 2, 5, 3, "semantic"),  # strided channels
        (t(0, 9, 4), 3, 3, 2, "mixed"),  # empty batch
        (dup, 3, 4, 3, "semantic"),
        (dup, 4, 3, 5, "mixed"),
        (t(1, 196, 64), 14, 14, 8, "mixed"),  # B = 1: row blocks
        (t(1, 576, 16), 24, 24, 8, "semantic"),  # n > 512: column tiles, running top-K
    ]


def _case_id(case):
    x, h, w, k, g = case
    return f"{tuple(x.shape)}-{h}x{w}-K{k}-{g}"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    for case in sample_inputs("cpu", dtype):
        ref_index, ref_weight = ref_build_graph(*case)
        index, weight = torch.ops.gtp.build_graph(*case)
        name = _case_id(case)
        assert_close(index, ref_index, name=f"index {name}")
        # weights come from integer degrees: identical, not just close
        assert_close(weight, ref_weight, name=f"weight {name}")


@needs_kernel
def test_opcheck():
    cases = sample_inputs()
    x = torch.randn(2, 12, 6, requires_grad=True)  # the graph carries no gradient
    cases.append((x, 3, 4, 2, "mixed"))
    for case in cases:
        torch.library.opcheck(torch.ops.gtp.build_graph.default, case)


@needs_kernel
def test_wrapper_backends():
    from gtp_kernels.ops import build_graph

    x = torch.randn(2, 35, 12, requires_grad=True)
    out = {b: build_graph(x, 5, 7, 4, "mixed", backend=b) for b in ("auto", "cpu", "reference")}
    for b in ("auto", "cpu"):
        assert torch.equal(out[b][0], out["reference"][0])
        assert torch.equal(out[b][1], out["reference"][1])
        assert not out[b][1].requires_grad
    with pytest.raises(ValueError, match="backend must be one of"):
        build_graph(x, 5, 7, 4, "mixed", backend="gpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_exact_ties(backend):
    # 3 distinct directions, each repeated 4 times (some scaled by powers of two): every row
    # has exact ties across the K-th place, all resolved by the lower index.
    base = torch.randn(3, 10)
    x = torch.stack([base[t % 3] * (2.0 ** (t % 2)) for t in range(12)])[None]
    for k in (1, 3, 5, 11):
        index, _ = run(backend, x, 3, 4, k, "semantic")
        assert rows(index[0]) == brute_semantic(x[0], k), f"K={k}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_exact_ties_large(backend):
    # n = 600 > 512: the kernel splits rows into blocks and columns into tiles, so tied
    # duplicates sit in different tiles; 5 directions -> every row's top K are exact ties.
    base = torch.randn(5, 16)
    pick = torch.randint(0, 5, (600,))
    x = (base[pick] * 2.0 ** torch.randint(0, 3, (600, 1)))[None]
    e = x[0].double() / x[0].double().norm(dim=-1, keepdim=True)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    for k in (8, 40):
        index, _ = run(backend, x, 20, 30, k, "semantic")
        # float64 oracle: a stable descending sort puts the lower index first among ties
        top = torch.sort(sim, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(index[0].long(), top.sort(dim=-1).values), f"K={k}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [0, 4])
def test_zero_tokens_tie_everywhere(backend, channels):
    # x / max(||x||, 1e-12) = 0: every similarity is 0, so each row takes the K lowest j != i
    index, weight = run(backend, torch.zeros(2, 6, channels), 2, 3, 2, "semantic")
    expected = [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]]
    assert rows(index[0]) == expected and rows(index[1]) == expected
    assert (weight == 0.5).all()


@needs_kernel
def test_kernel_matches_reference_random_shapes():
    for _ in range(60):
        h, w = (int(v) for v in torch.randint(1, 13, (2,)))
        n = h * w
        b = int(torch.randint(0, 4, (1,)))
        c = int(torch.randint(1, 40, (1,)))
        k = int(torch.randint(0, n, (1,)))
        graph = ["spatial", "semantic", "mixed"][int(torch.randint(0, 3, (1,)))]
        x = torch.randn(b, n, c)
        ref = ref_build_graph(x, h, w, k, graph)
        out = torch.ops.gtp.build_graph(x, h, w, k, graph)
        name = f"B={b} {h}x{w} C={c} K={k} {graph}"
        assert_close(out[0], ref[0], name=f"index {name}")
        assert_close(out[1], ref[1], name=f"weight {name}")
