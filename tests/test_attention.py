"""attention: a hand-worked threshold, kernel vs reference, scores, opcheck, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from gtp_kernels._extension import extension_available, has_kernel
from gtp_kernels.reference import attention as ref_attention

HAS_CPU_KERNEL = extension_available() and has_kernel("attention", "CPU")
needs_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL,
    reason="gtp_kernels._C with the attention CPU kernel is not built "
    "(python setup.py build_ext --inplace)",
)
BACKENDS = ["reference", pytest.param("cpu", marks=needs_kernel)]


def run(backend, q, k, v, log_sizes, scale, theta, num_prefix, score):
    if backend == "reference":
        return ref_attention(q, k, v, log_sizes, scale, theta, num_prefix, score)
    return torch.ops.gtp.attention(q, k, v, log_sizes, scale, theta, num_prefix, score)


# ---------------------------------------------------------------------------------------------
# Worked by hand: N = 3, two heads. q = the logits, k = I, scale = 1, so logits = q. With v = I
# the output is the masked probability map itself.
#
# head 0 logits        probabilities (row softmax)
#   [3, 0,   1]   ->   [0.8438, 0.0420, 0.1142]
#   [2, 0,   0]   ->   [0.7870, 0.1065, 0.1065]     (two equal logits: an exact tie)
#   [0, 0.5, 3]   ->   [0.0440, 0.0725, 0.8835]
# theta = 0.5: kk = int(9 * 0.5) = 4. Sorted: 0.0420, 0.0440, 0.0725, 0.1065, 0.1065, ...
# so tau = 0.1065 (the 4th smallest). The three entries below tau are zeroed; BOTH entries
# equal to tau stay (the 5th smallest is tied with the 4th). Rows are not renormalised.
# head 1: all logits 0 -> every entry is 1/3 == tau: nothing is zeroed.
# ---------------------------------------------------------------------------------------------
HAND_LOGITS = [[[3.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.5, 3.0]], [[0.0] * 3] * 3]
HAND_KEPT = [[[1, 0, 1], [1, 1, 1], [0, 0, 1]], [[1] * 3] * 3]


def _hand_expected(num_prefix=1):
    probs = []
    for head, keep in zip(HAND_LOGITS, HAND_KEPT, strict=True):
        rows = []
        for logits, kept in zip(head, keep, strict=True):
            z = sum(math.exp(x) for x in logits)
            rows.append([math.exp(x) / z * m for x, m in zip(logits, kept, strict=True)])
        probs.append(rows)
    a = torch.tensor(probs, dtype=torch.float64)  # (H, N, N), masked
    m = num_prefix
    gamma = a.diagonal(dim1=-2, dim2=-1)[:, m:]
    psi = a.sum(dim=-2)[:, m:]
    cls = a[:, 0, m:]
    scores = {
        "mixed_max": gamma.amax(0) * psi.amax(0),
        "mixed_mean": gamma.mean(0) * psi.mean(0),
        "diag_max": gamma.amax(0),
        "diag_mean": gamma.mean(0),
        "colsum_max": psi.amax(0),
        "colsum_mean": psi.mean(0),
        "cls_max": cls.amax(0),
        "cls_mean": cls.mean(0),
        "sum_max": gamma.amax(0) + psi.amax(0),
    }
    return a, scores


@pytest.mark.parametrize("backend", BACKENDS)
def test_by_hand(backend):
    q = torch.tensor([HAND_LOGITS], dtype=torch.float32)  # (1, 2, 3, 3)
    k = torch.eye(3).expand(1, 2, 3, 3)
    v = torch.eye(3).expand(1, 2, 3, 3)
    expected, scores = _hand_expected(num_prefix=1)
    # the tie is exact in float32 too: the two 0.1065 entries come from equal logits
    assert expected[0, 1, 1] == expected[0, 1, 2]
    for name, want in scores.items():
        out, score = run(backend, q, k, v, None, 1.0, 0.5, 1, name)
        assert out.dtype == torch.float32 and score.dtype == torch.float32
        torch.testing.assert_close(out[0].double(), expected, atol=1e-6, rtol=1e-6)
        assert ((out[0] == 0) == (expected == 0)).all(), f"masked entries differ: {out[0]}"
        torch.testing.assert_close(score[0].double(), want, atol=1e-6, rtol=1e-6, msg=name)
    # by hand for the default strategy: gamma = max(0.1065, 1/3), max(0.8835, 1/3);
    # psi = max(0.1065, 1), max(0.1142 + 0.1065 + 0.8835, 1)
    _, score = run(backend, q, k, v, None, 1.0, 0.5, 1, "mixed_max")
    e = [math.exp(x) for x in (0.0, 0.5, 3.0)]
    d2 = e[2] / sum(e)
    psi2 = math.e / (math.exp(3) + 1 + math.e) + 1 / (math.exp(2) + 2) + d2
    torch.testing.assert_close(
        score[0].double(), torch.tensor([1 / 3, d2 * psi2], dtype=torch.float64)
    )
    # theta = 1 (and any theta with kk = 0, e.g. 0.95: int(9 * 0.05) = 0) masks nothing
    for theta in (1.0, 0.95):
        out, _ = run(backend, q, k, v, None, 1.0, theta, 1, "none")
        assert (out > 0).all()
    # kk = 3 (theta = 0.6: int(9 * 0.4) = 3): tau = 0.0725, two entries zeroed
    out, _ = run(backend, q, k, v, None, 1.0, 0.6, 0, "none")
    assert (out[0, 0] == 0).nonzero().tolist() == [[0, 1], [2, 0]]
    assert (out[0, 1] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sizes_by_hand(backend):
    # log_sizes shift the logits of key j: sizes (1, 2, 1) make token 1 count twice
    q = torch.zeros(1, 1, 3, 4)
    k = torch.randn(1, 1, 3, 4)
    v = torch.eye(3).expand(1, 1, 3, 3)
    log_sizes = torch.tensor([[0.0, math.log(2.0), 0.0]])
    out, score = run(backend, q, k, v, log_sizes, 0.5, 1.0, 1, "colsum_max")
    want = torch.tensor([0.25, 0.5, 0.25]).expand(3, 3)
    torch.testing.assert_close(out[0, 0], want)
    torch.testing.assert_close(score, torch.tensor([[1.5, 0.75]]))


BAD = [
    (dict(q=torch.randn(2, 3, 4)), "q must have 4 dimensions"),
    (dict(k=torch.randn(2, 2, 5, 3)), "k must have the shape of q"),
    (dict(v=torch.randn(2, 2, 4, 4)), "v must have shape"),
    (dict(q=torch.randint(0, 3, (2, 2, 5, 4))), "q must be float32, float16, bfloat16 or float64"),
    (dict(k=torch.randn(2, 2, 5, 4).half()), "k must have the dtype of q"),
    (dict(v=torch.randn(2, 2, 5, 4).double()), "v must have the dtype of q"),
    (
        dict(q=torch.randn(2, 0, 5, 4), k=torch.randn(2, 0, 5, 4), v=torch.randn(2, 0, 5, 4)),
        "at least one head",
    ),
    (dict(log_sizes=torch.zeros(2, 4)), r"log_sizes must have shape \(B, N\)"),
    (dict(log_sizes=torch.zeros(2, 5).double()), "log_sizes must be float32"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(theta=0.0), r"sparsity \(theta\) must be in \(0, 1\]"),
    (dict(theta=1.5), r"sparsity \(theta\) must be in \(0, 1\]"),
    (dict(theta=-0.1), r"sparsity \(theta\) must be in \(0, 1\]"),
    (dict(theta=float("nan")), r"sparsity \(theta\) must be in \(0, 1\]"),
    (dict(num_prefix=-1), r"num_prefix must be in \[0, N\]"),
    (dict(num_prefix=6), r"num_prefix must be in \[0, N\]"),
    (dict(score="max"), "score must be one of"),
    (dict(score="cls_max", num_prefix=0), "needs a CLS token"),
    (dict(score="cls_mean", num_prefix=0), "needs a CLS token"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(backend, case):
    over, msg = BAD[case]
    args = dict(
        q=torch.randn(2, 2, 5, 4),
        k=torch.randn(2, 2, 5, 4),
        v=torch.randn(2, 2, 5, 4),
        log_sizes=None,
        scale=0.5,
        theta=0.7,
        num_prefix=1,
        score="mixed_max",
    )
    args.update(over)
    with pytest.raises((RuntimeError, ValueError), match=msg):
        run(backend, *args.values())
