"""Property fuzzer: every op on every backend that runs here, against the reference.

Each case is a small dict (a "spec": shapes, settings, dtype, layout, value mode, seed) from
which `build_<op>` makes the inputs deterministically, so a case is reproducible from its spec
alone and can be shrunk by editing it. `check_<op>` runs one backend and raises AssertionError
when it is wrong. Legitimate differences from the reference (float rounding that flips a
comparison) are recognised by the kernel's own invariants, never by skipping:

- attention: the kernel's own unmasked probabilities P (read back with v = I) must be close to
  the reference's with the same NaN positions, and its masked map must be EXACTLY
  where(P < tau, 0, P) with tau the kk-th smallest entry of P under -inf < finite < inf < NaN
  (count(P < tau) < kk <= count(P <= tau)); out and score must then match the reference
  formulas applied to that map, and select_tokens on its scores must give the reference's
  selection of the same scores.
- build_graph: rows may differ from the reference's only in neighbours whose float64 cosine
  similarity lies within float32 rounding of the row's K-th largest, never between tokens whose
  normalised vectors are identical (an exact tie, where the lower index must win), and the
  weights must be 1 / sqrt(d_i d_j) of the kernel's own degrees.
- select_tokens and propagate make no rounding-dependent decision: equal to the reference
  (integers exactly, floats within the dtype's rounding, NaN at the same positions).

A failing case is shrunk (`shrink`) to a minimal spec, which goes into REGRESSIONS in
tests/test_fuzz.py. Run it by hand for long campaigns:

    python tests/fuzz.py --cases 25000 --seed 7 [--op attention] [--backend cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import time
from collections.abc import Callable

import torch

from gtp_kernels import ops, reference
from gtp_kernels.reference.attention import SCORES, attention_probs, importance_score, num_masked
from gtp_kernels.reference.build_graph import normalised_tokens, spatial_adjacency

OPS = ("attention", "build_graph", "select_tokens", "propagate")
DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16}
# Rounding of a kernel vs the reference in the same dtype (floats computed in float32, or
# float64 for float64 inputs; float16 / bfloat16 outputs are rounded from those).
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
NAN, INF = float("nan"), float("inf")


def available_backends(op: str, device: str = "cpu") -> list[str]:
    """The non-reference backends that can run `op` on `device` here, asked of the op wrappers'
    own backend resolution (gtp_kernels.ops.resolve_backend): cpu when the extension is built,
    triton when its kernel exists and runs (under TRITON_INTERPRET=1 on CPU tensors)."""
    found = []
    for backend in ("cpu", "cuda", "triton"):
        try:
            ops.resolve_backend(op, backend, torch.device(device))
        except (RuntimeError, ValueError, ImportError):
            continue
        found.append(backend)
    return found


# Extra backends by name, {backend: {op: function(*args)}}: how tests/test_fuzz.py plants
# deliberately wrong kernels to show that the checks catch them.
EXTRA_BACKENDS: dict[str, dict[str, Callable]] = {}


def call(op: str, backend: str, *args):
    """op(*args) on `backend` (an EXTRA_BACKENDS entry, or through the public wrappers)."""
    if backend in EXTRA_BACKENDS:
        return EXTRA_BACKENDS[backend].get(op, getattr(reference, op))(*args)
    return getattr(ops, op)(*args, backend=backend)


# Inputs a backend documents it does not take (it raises a clear error instead): such cases
# are counted and reported by the campaign, not run on that backend. The Triton kernels take
# float32 / float16 / bfloat16 (gtp_kernels.triton); float64 stays on cpu and reference.
UNSUPPORTED: dict[str, Callable[[str, dict], bool]] = {
    "triton": lambda op, spec: spec.get("dtype") == "f64",
}


def supported(op: str, spec: dict, backend: str) -> bool:
    rule = UNSUPPORTED.get(backend)
    return rule is None or not rule(op, spec)


@functools.cache
def _runs(op: str, backend: str) -> bool:
    return backend in available_backends(op)


# ------------------------------------------------------------------------------------ helpers


def _gen(spec: dict) -> torch.Generator:
    return torch.Generator().manual_seed(spec["seed"])


def relayout(t: torch.Tensor, mode: str) -> torch.Tensor:
    """The same values in other strides: contiguous, last two dims stored transposed, or the
    last dim at stride 2."""
    if mode == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if mode == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        view = wide[..., 1::2]
        view.copy_(t)
        return view
    return t.contiguous()


def _inject(t: torch.Tensor, g: torch.Generator, count: int) -> torch.Tensor:
    """A copy of t with `count` entries set to NaN, -NaN, +inf or -inf."""
    t = t.clone()
    if t.numel() == 0:
        return t
    flat = t.view(-1)
    picks = torch.randint(0, t.numel(), (count,), generator=g)
    kinds = torch.randint(0, 4, (count,), generator=g)
    for p, k in zip(picks.tolist(), kinds.tolist(), strict=True):
        flat[p] = (NAN, -NAN, INF, -INF)[k]
    return t


def same_nan(a: torch.Tensor, e: torch.Tensor, name: str) -> None:
    assert torch.equal(a.isnan(), e.isnan()), (
        f"{name}: NaN at {a.isnan().nonzero().tolist()[:6]}, "
        f"expected at {e.isnan().nonzero().tolist()[:6]}"
    )


def close(a: torch.Tensor, e: torch.Tensor, name: str, atol: float, rtol: float) -> None:
    """Same shape and dtype, NaN at the same positions, +-inf equal, the rest within tolerance."""
    assert a.shape == e.shape, f"{name}: shape {list(a.shape)} != {list(e.shape)}"
    assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
    if not a.is_floating_point():
        assert torch.equal(a, e), f"{name}: {a.tolist()} != {e.tolist()}"
        return
    same_nan(a, e, name)
    a64, e64 = a.double().nan_to_num(0.0), e.double().nan_to_num(0.0)
    inf = a64.isinf() | e64.isinf()
    assert torch.equal(a64[inf], e64[inf]), f"{name}: infinities differ"
    bad = (a64 - e64).abs() > atol + rtol * e64.abs()
    bad &= ~inf
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol {atol:g}, "
            f"rtol {rtol:g}), first at {i}: {a64[i].item()!r} vs {e64[i].item()!r}"
        )


def _nan_last_sorted(x: torch.Tensor) -> torch.Tensor:
    return x.sort(dim=-1).values  # torch.sort: -inf < finite < +inf < NaN


# ---------------------------------------------------------------------------------- attention


def spec_attention(r: random.Random) -> dict:
    n = r.choice([0, 1, 2, 3, 5, 8, 13, 24, 31]) if r.random() < 0.9 else r.randint(23, 70)
    m = r.randint(0, n) if r.random() < 0.3 else min(n, r.randint(0, 2))
    score = r.choice(SCORES)
    if score.startswith("cls_") and m == 0:
        score = "mixed_max"
    d = r.choice([0, 1, 2, 4, 8, 16]) if r.random() < 0.95 else 0
    return dict(
        b=0 if r.random() < 0.05 else r.randint(1, 3),
        h=r.randint(1, 4),
        n=n,
        d=d,
        dv=d if r.random() < 0.6 else r.choice([0, 1, 3, 7]),
        m=m,
        theta=r.choice([1.0, 0.95, 0.9, 0.6, 0.5, 0.3, 0.1, 1e-9, round(r.random(), 4) or 0.5]),
        score=score,
        dtype=r.choice(["f32", "f32", "f64", "f16", "bf16"]),
        layout=r.choice(["timm", "contiguous", "transposed", "strided", "expanded"]),
        values=r.choice(["randn", "randn", "int", "uniform", "onehot", "huge", "tiny"]),
        spread=r.choice([0.02, 0.3, 1.0, 3.0]),
        log_sizes=r.choice(["none", "sizes", "randn", "minus_inf"]),
        nonfinite=r.choice([0, 0, 0, 0, 1, 3]),
        seed=r.randrange(2**31),
    )


def build_attention(spec: dict):
    g = _gen(spec)
    b, h, n, d, dv = spec["b"], spec["h"], spec["n"], spec["d"], spec["dv"]
    dtype = DTYPES[spec["dtype"]]
    scale = d**-0.5 if d > 0 else 1.0
    mode = spec["values"]
    if mode == "int":
        q = torch.randint(-2, 3, (b, h, n, d), generator=g).double()
        k = torch.randint(-2, 3, (b, h, n, d), generator=g).double()
        scale = 0.5
    else:
        q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * spec["spread"]
        k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * spec["spread"]
        if mode == "uniform":
            q.zero_()  # every probability exactly 1/N: all ties
        elif mode == "onehot":  # each query row points at one key: probabilities ~1 and ~0
            perm = torch.randperm(max(n, 1), generator=g)[:n]
            q = 30.0 * k[:, :, perm] / k.norm(dim=-1, keepdim=True).clamp_min(1e-3)[:, :, perm]
            scale = 1.0
        elif mode == "huge":
            scale = 300.0 / max(spec["spread"], 1e-3)
        elif mode == "tiny":
            scale = 1e-7
    v = torch.randn(b, h, n, dv, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if spec["nonfinite"]:
        q = _inject(q, g, spec["nonfinite"])
        k = _inject(k, g, spec["nonfinite"])
    layout = spec["layout"]
    if layout == "timm" and d == dv and b * h * n > 0:
        qkv = torch.stack([q, k, v], dim=0).permute(1, 3, 0, 2, 4).contiguous()  # (B,N,3,H,d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "expanded" and b > 0:
        q, k, v = (t[:1].expand_as(t) for t in (q, k, v))
    elif layout in ("transposed", "strided"):
        q, k, v = (relayout(t, layout) for t in (q, k, v))
    ls_mode = spec["log_sizes"]
    log_sizes = None
    if ls_mode != "none":
        if ls_mode == "sizes":
            log_sizes = torch.randint(1, 4, (b, n), generator=g).float().log()
        else:
            log_sizes = torch.randn(b, n, generator=g) * 0.3
        if ls_mode == "minus_inf" and n > 0:  # size-0 keys; sometimes a whole image
            log_sizes[torch.rand(b, n, generator=g) < 0.2] = -INF
        if spec["nonfinite"] and log_sizes.numel() and torch.rand(1, generator=g).item() < 0.3:
            log_sizes = _inject(log_sizes, g, 1)
    return q, k, v, log_sizes, scale, spec["theta"], spec["m"], spec["score"]


def check_attention(spec: dict, backend: str) -> None:
    q, k, v, ls, scale, theta, m, score = build_attention(spec)
    out, sc = call("attention", backend, q, k, v, ls, scale, theta, m, score)
    ref_out, ref_sc = reference.attention(q, k, v, ls, scale, theta, m, score)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype, "out shape / dtype"
    assert sc.shape == ref_sc.shape and sc.dtype == torch.float32, "score shape / dtype"
    b, h, n, _ = q.shape
    if b * n == 0:
        return
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # The kernel's own probabilities: with v = I the output is the (masked) map. Half inputs
    # run on float32 copies, which is what the kernel converts them to (same tile, same GEMM).
    qc, kc = (t.to(compute) if q.dtype != compute else t for t in (q, k))
    if q.dtype != compute:
        qc, kc = qc.contiguous(), kc.contiguous()
    eye = torch.eye(n, dtype=compute).expand(b, h, n, n)
    p_k, _ = call("attention", backend, qc, kc, eye, ls, scale, 1.0, 0, "none")
    a_k, _ = call("attention", backend, qc, kc, eye, ls, scale, theta, 0, "none")
    p_ref = attention_probs(q, k, ls, scale, 1.0)
    # probabilities close to the reference's; the logits' rounding grows with their size
    logits = p_ref.new_tensor(0.0)
    if q.shape[-1] > 0 and q.numel():
        lg = scale * (q.to(compute) @ k.to(compute).transpose(-1, -2))
        lg = lg[lg.isfinite()]
        logits = lg.abs().max() if lg.numel() else logits
    eps = torch.finfo(compute).eps
    atol, rtol = TOL[compute]
    close(p_k, p_ref, "probabilities", atol, rtol + 64 * eps * float(logits))
    # the mask is exactly the one of the kernel's own probabilities
    kk = num_masked(n, theta)
    flat = p_k.reshape(b, h, n * n)
    if kk > 0:
        tau = _nan_last_sorted(flat)[..., kk - 1 : kk]
        want = torch.where(flat < tau, torch.zeros_like(flat), flat).reshape(p_k.shape)
    else:
        want = p_k
    same_nan(a_k, want, "masked map")
    assert torch.equal(a_k.nan_to_num(0.0), want.nan_to_num(0.0)), (
        f"masked map is not where(P < tau, 0, P) of the kernel's own P (kk={kk}): "
        f"{int((a_k.nan_to_num(0) != want.nan_to_num(0)).sum())} entries differ"
    )
    # out and score: the reference formulas applied to the kernel's own map
    o_atol, o_rtol = TOL[q.dtype]
    mass = a_k.nan_to_num(0.0).abs().sum(-1, keepdim=True).amax().clamp_min(1.0).item()
    close(out, (a_k @ v.to(compute)).to(q.dtype), "out", o_atol * mass, o_rtol)
    s_tol = (1e-12, 1e-10) if compute == torch.float64 else (1e-6, 2e-5)
    close(sc, importance_score(a_k, m, score), "score", *s_tol)
    if sc.shape[1] > 1:  # ties in the kernel's own scores: the selection rule on them
        p = sc.shape[1] // 3
        sel = backend if backend in EXTRA_BACKENDS or _runs("select_tokens", backend) else "auto"
        close(
            torch.stack(call("select_tokens", sel, sc, p)),
            torch.stack(reference.select_tokens(sc, p)),
            "select_tokens of the kernel's scores",
            0,
            0,
        )


# -------------------------------------------------------------------------------- build_graph


def spec_build_graph(r: random.Random) -> dict:
    if r.random() < 0.01:
        hh, ww = 23, 23  # n = 529 > 512: the kernel tiles the similarity columns
    else:
        hh, ww = r.randint(1, 8), r.randint(1, 8)
    n = hh * ww
    k = 0 if n == 1 or r.random() < 0.05 else r.randint(1, min(n - 1, 9))
    if n > 1 and r.random() < 0.15:
        k = r.randint(1, n - 1)  # large K (above 32: the kernel's selection path)
    return dict(
        b=0 if r.random() < 0.04 else r.randint(1, 3),
        h=hh,
        w=ww,
        c=0 if r.random() < 0.03 else r.choice([1, 2, 3, 5, 8, 16]),
        k=k,
        graph=r.choice(["spatial", "semantic", "mixed", "mixed"]),
        dtype=r.choice(["f32", "f32", "f64", "f16", "bf16"]),
        layout=r.choice(["contiguous", "transposed", "strided"]),
        values=r.choice(["randn", "randn", "int", "duplicates", "onehot", "extreme"]),
        nonfinite=r.choice([0, 0, 0, 0, 1, 3]),
        seed=r.randrange(2**31),
    )


def build_build_graph(spec: dict):
    g = _gen(spec)
    b, n, c = spec["b"], spec["h"] * spec["w"], spec["c"]
    dtype = DTYPES[spec["dtype"]]
    mode = spec["values"]
    if mode == "int":
        x = torch.randint(-2, 3, (b, n, c), generator=g).double()
    elif mode == "onehot":
        x = torch.zeros(b, n, c, dtype=torch.float64)
        if c > 0:
            x.scatter_(2, torch.randint(0, c, (b, n, 1), generator=g), 1.0)
    else:
        x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    if mode == "duplicates" and n > 1:  # exact ties: copies, also scaled by powers of two
        src = torch.randint(0, n, (n,), generator=g)
        pick = torch.rand(n, generator=g) < 0.4
        scale = 2.0 ** torch.randint(-3, 4, (n,), generator=g).double()
        x[:, pick] = x[:, src[pick]] * scale[pick, None]
    x = x.to(dtype)
    if mode == "extreme":  # exact power-of-two scaling to the edges of the dtype's range
        e = {torch.float32: 100, torch.float64: 600, torch.float16: 10, torch.bfloat16: 100}[dtype]
        x = x * 2.0 ** (e if torch.rand(1, generator=g).item() < 0.5 else -e)
    if spec["nonfinite"]:
        x = _inject(x, g, spec["nonfinite"])
    x = relayout(x, spec["layout"])
    return x, spec["h"], spec["w"], spec["k"], spec["graph"]


def check_build_graph(spec: dict, backend: str) -> None:
    tokens, hh, ww, k, kind = build_build_graph(spec)
    idx, wt = call("build_graph", backend, tokens, hh, ww, k, kind)
    ridx, rwt = reference.build_graph(tokens, hh, ww, k, kind)
    assert idx.shape == ridx.shape and idx.dtype == torch.int32 and wt.dtype == torch.float32
    if torch.equal(idx, ridx) and torch.equal(wt, rwt):
        return
    b, n, slots = idx.shape
    # weights: 1 / sqrt(d_i d_j) of the kernel's own degrees, bit for bit
    deg = (idx >= 0).sum(-1).double()
    dj = torch.gather(deg, 1, idx.clamp_min(0).long().reshape(b, -1)).reshape(b, n, slots)
    w_own = torch.where(idx >= 0, (1.0 / torch.sqrt(deg[:, :, None] * dj)).float(), 0.0)
    assert torch.equal(wt, w_own), "weights are not 1/sqrt(d_i d_j) of the kernel's own graph"
    assert kind != "spatial", "the spatial graph differs from the reference"
    e = normalised_tokens(tokens)  # float32 unit rows, NaN rows for non-finite tokens
    bad = e.isnan().any(-1)
    ed = e.double()
    sim = (ed[:, :, None, :] * ed[:, None, :, :]).sum(-1)  # the same sum order for every pair
    sim = torch.where(bad[:, :, None] | bad[:, None, :], INF, sim)  # NaN ranks most similar
    spatial = spatial_adjacency(hh, ww) & (kind == "mixed")  # fixed part of a mixed row
    c = tokens.shape[-1]
    tol = 1e-6 + 3e-7 * c
    for bi in range(b):
        for i in range(n):
            got = {j for j in idx[bi, i].tolist() if j >= 0}
            want = {j for j in ridx[bi, i].tolist() if j >= 0}
            if got == want:
                continue
            row = sim[bi, i].clone()
            row[i] = -INF
            kth = row.sort(descending=True).values[k - 1].item()
            for j in got ^ want:
                assert not spatial[i, j], f"row {i}: spatial neighbour {j} differs"
                s = row[j].item()
                near = s == kth or abs(s - kth) <= tol
                assert near, f"image {bi} row {i}: neighbour {j} (sim {s}) not near the K-th {kth}"
            # Exact ties in the kernel's own similarities: the lower index must win. They are
            # exact where every backend computes them exactly: +inf for non-finite tokens, and
            # images whose unit vectors hold only -1, 0, 1 (one-hot tokens, C = 1), where every
            # product and sum is exact. (Identical tokens in general are no exact tie: a BLAS
            # GEMM rounds a dot product differently by the column's position, by an ulp.)
            exact = bool(((e[bi] == 0) | (e[bi].abs() == 1) | e[bi].isnan()).all())
            for j in got - {x for x in got if spatial[i, x]}:
                for jj in range(j):
                    if jj == i or jj in got:
                        continue
                    both_bad = bool(bad[bi, j] and bad[bi, jj])
                    tie = both_bad or (exact and row[j].item() == row[jj].item())
                    assert not tie, f"image {bi} row {i}: {j} chosen over its exact tie {jj}"


# ------------------------------------------------------------------------------ select_tokens


def spec_select_tokens(r: random.Random) -> dict:
    n = r.choice([1, 2, 3, 7, 16, 50, 197]) if r.random() < 0.95 else r.randint(200, 600)
    return dict(
        b=0 if r.random() < 0.05 else r.randint(1, 5),
        n=n,
        p=r.randint(0, n - 1) if r.random() < 0.7 else r.choice([0, n - 1]),
        values=r.choice(["randn", "int", "int", "equal", "signed_zero"]),
        nonfinite=r.choice([0, 0, 0.05, 0.3, 1.0]),
        layout=r.choice(["contiguous", "transposed", "strided"]),
        seed=r.randrange(2**31),
    )


def build_select_tokens(spec: dict):
    g = _gen(spec)
    b, n = spec["b"], spec["n"]
    mode = spec["values"]
    if mode == "int":
        s = torch.randint(-3, 4, (b, n), generator=g).float()
    elif mode == "equal":
        s = torch.full((b, n), 0.25)
    elif mode == "signed_zero":
        s = torch.where(torch.rand(b, n, generator=g) < 0.5, 0.0, -0.0)
    else:
        s = torch.randn(b, n, generator=g)
    if spec["nonfinite"]:
        pick = torch.rand(b, n, generator=g) < spec["nonfinite"]
        vals = torch.tensor([NAN, -NAN, INF, -INF])[torch.randint(0, 4, (b, n), generator=g)]
        s = torch.where(pick, vals, s)
        if s.numel():  # NaNs with other payloads (quiet and signalling bit patterns)
            payload = torch.tensor([0x7FC00001, 0xFFC12345, 0x7F800001], dtype=torch.int64)
            bits = payload[torch.randint(0, 3, (b, n), generator=g)].to(torch.int32)
            odd = torch.rand(b, n, generator=g) < spec["nonfinite"] / 4
            s = torch.where(odd, bits.view(torch.float32), s)
    if spec["layout"] == "transposed":
        s = s.t().contiguous().t()
    elif spec["layout"] == "strided":
        s = relayout(s, "strided")
    return s, spec["p"]


def check_select_tokens(spec: dict, backend: str) -> None:
    score, p = build_select_tokens(spec)
    keep, prop = call("select_tokens", backend, score, p)
    rkeep, rprop = reference.select_tokens(score, p)
    close(keep, rkeep, "keep", 0, 0)
    close(prop, rprop, "prop", 0, 0)


# ---------------------------------------------------------------------------------- propagate


def spec_propagate(r: random.Random) -> dict:
    n = r.choice([0, 1, 2, 5, 9, 16, 30])
    return dict(
        b=0 if r.random() < 0.05 else r.randint(1, 3),
        m=r.randint(0, 3),
        n=n,
        c=r.choice([0, 1, 3, 8, 17, 33]),
        width=r.choice([0, 1, 3, 8, 16]),
        kept=0 if n == 0 else r.randint(1, n),
        graph=r.choice(["random", "built"]),
        ordered=r.random() < 0.6,
        alpha=r.choice([0.0, 0.1, 0.4, -0.3, 2.5]) if r.random() < 0.98 else r.choice([NAN, INF]),
        sizes=r.random() < 0.7,
        dtype=r.choice(["f32", "f32", "f64", "f16", "bf16"]),
        layout=r.choice(["contiguous", "transposed", "strided"]),
        nonfinite=r.choice([0, 0, 0, 1, 4]),
        seed=r.randrange(2**31),
    )


def build_propagate(spec: dict):
    g = _gen(spec)
    b, m, n, c, width = spec["b"], spec["m"], spec["n"], spec["c"], spec["width"]
    dtype = DTYPES[spec["dtype"]]
    x = torch.randn(b, m + n, c, generator=g).to(dtype)
    if spec["graph"] == "built" and n > 0 and width > 0:
        ww = next(d for d in range(int(math.isqrt(n)), 0, -1) if n % d == 0)
        k = min(n - 1, max(width - 8, 0))
        kind = "mixed" if k > 0 else "spatial"
        index, weight = reference.build_graph(x[:, m:].float(), n // ww, ww, k, kind)
        index, weight = index[..., :width].contiguous(), weight[..., :width].contiguous()
        if index.shape[-1] < width:
            pad = width - index.shape[-1]
            index = torch.nn.functional.pad(index, (0, pad), value=-1)
            weight = torch.nn.functional.pad(weight, (0, pad))
    else:
        index = torch.randint(-1, max(n, 1), (b, n, width), generator=g, dtype=torch.int32)
        weight = torch.rand(b, n, width, generator=g)
    keep = torch.zeros(b, spec["kept"], dtype=torch.int64)
    for i in range(b):
        sel = torch.randperm(n, generator=g)[: spec["kept"]]
        keep[i] = sel.sort().values if spec["ordered"] else sel
    sizes = torch.rand(b, m + n, generator=g) + 0.5 if spec["sizes"] else None
    if spec["nonfinite"]:
        x = _inject(x, g, spec["nonfinite"])
        weight = _inject(weight, g, 1) if torch.rand(1, generator=g).item() < 0.3 else weight
        if sizes is not None:
            sizes = _inject(sizes, g, 1)
    x = relayout(x, spec["layout"])
    return x, index, weight, keep, spec["alpha"], m, sizes


def check_propagate(spec: dict, backend: str) -> None:
    args = build_propagate(spec)
    got = call("propagate", backend, *args)
    want = reference.propagate(*args)
    dtype = args[0].dtype
    for a, e, name, tol in zip(
        got,
        want,
        ("x_out", "sizes_out", "index_out", "weight_out"),
        (TOL[dtype], TOL[torch.float32], (0, 0), (0, 0)),
        strict=True,
    ):
        close(a, e, name, *tol)


# ------------------------------------------------------------------------------- the campaign

SPECS: dict[str, Callable[[random.Random], dict]] = {
    "attention": spec_attention,
    "build_graph": spec_build_graph,
    "select_tokens": spec_select_tokens,
    "propagate": spec_propagate,
}
CHECKS: dict[str, Callable[[dict, str], None]] = {
    "attention": check_attention,
    "build_graph": check_build_graph,
    "select_tokens": check_select_tokens,
    "propagate": check_propagate,
}
# smallest value of each spec field the shrinker tries (fields not listed are only reset to
# their "plain" value below)
_MINIMAL = {"b": 1, "h": 1, "n": 1, "d": 1, "dv": 1, "m": 0, "c": 1, "width": 1, "k": 1,
            "kept": 1, "p": 0, "nonfinite": 0, "w": 1}  # fmt: skip
_PLAIN = {"layout": "contiguous", "values": "randn", "dtype": "f32", "log_sizes": "none",
          "graph": "random", "score": "mixed_max", "ordered": True, "sizes": False,
          "theta": 0.5, "alpha": 0.1, "spread": 1.0}  # fmt: skip


def fails(op: str, spec: dict, backend: str) -> str | None:
    """The failure message of this case, or None when it passes. Argument errors raised by
    both the backend and the reference (a shrunk spec can become invalid) count as passing."""
    try:
        CHECKS[op](spec, backend)
    except AssertionError as exc:
        return f"{type(exc).__name__}: {exc}"
    except (ValueError, RuntimeError) as exc:
        try:  # an invalid spec: the reference must reject it the same way
            CHECKS[op](spec, "reference")
        except (ValueError, RuntimeError) as ref_exc:
            if type(ref_exc) is type(exc) and str(ref_exc) == str(exc):
                return None
        return f"{type(exc).__name__}: {exc}"
    return None


def shrink(op: str, spec: dict, backend: str, budget: int = 300) -> dict:
    """A smaller spec that still fails: greedy passes over the fields (integers halved, then
    decremented towards their minimum; modes reset to plain) until nothing smaller fails."""
    best = dict(spec)
    tries = 0
    improved = True
    while improved and tries < budget:
        improved = False
        for key, value in list(best.items()):
            candidates = []
            if key in _MINIMAL and isinstance(value, int) and not isinstance(value, bool):
                lo = _MINIMAL[key]
                candidates = sorted({lo, (value + lo) // 2, value - 1} - {value})
                candidates = [c for c in candidates if lo <= c < value]
            elif key in _PLAIN and value != _PLAIN[key]:
                candidates = [_PLAIN[key]]
            for cand in candidates:
                trial = dict(best, **{key: cand})
                _fix(op, trial)
                tries += 1
                if trial != best and supported(op, trial, backend) and fails(op, trial, backend):
                    best, improved = trial, True
                    break
    return best


def _fix(op: str, spec: dict) -> None:
    """Keep a shrunk spec valid (K, P, prefix, kept within their ranges)."""
    if op == "build_graph":
        spec["k"] = min(spec["k"], spec["h"] * spec["w"] - 1)
    elif op == "select_tokens":
        spec["p"] = min(spec["p"], spec["n"] - 1)
    elif op == "attention":
        spec["m"] = min(spec["m"], spec["n"])
        if spec["score"].startswith("cls_") and spec["m"] == 0:
            spec["score"] = "mixed_max"
    elif op == "propagate":
        spec["kept"] = min(spec["kept"], spec["n"]) if spec["n"] else 0
        spec["kept"] = max(spec["kept"], 1) if spec["n"] else 0


def campaign(op: str, backend: str, cases: int, seed: int) -> list[tuple[dict, dict, str]]:
    """Run `cases` random cases; return (case, shrunk case, message) for every failure (at most
    three). Cases the backend does not support (UNSUPPORTED) count as run and are not checked."""
    r = random.Random(f"{seed}-{op}")  # the same cases for every backend
    failures = []
    for _ in range(cases):
        spec = SPECS[op](r)
        if not supported(op, spec, backend):
            continue
        msg = fails(op, spec, backend)
        if msg:
            small = shrink(op, spec, backend)
            failures.append((spec, small, fails(op, small, backend) or msg))
            if len(failures) >= 3:
                break
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", type=int, default=1000, help="cases per op and backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--op", choices=OPS, action="append")
    p.add_argument("--backend", action="append", help="default: every available one")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bad = 0
    for op in args.op or OPS:
        for backend in args.backend or available_backends(op):
            start = time.perf_counter()
            failures = campaign(op, backend, args.cases, args.seed)
            took = time.perf_counter() - start
            print(
                f"{op:14s} {backend:7s} {args.cases} cases, {len(failures)} failing, {took:.1f} s"
            )
            for spec, small, msg in failures:
                bad += 1
                print(f"  case   {spec}\n  shrunk {small}\n  {msg}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
