"""The one non-finite rule (README "Bad inputs") on the Triton backend: every case of
tests/test_nonfinite.py, run with backend="triton" (which checks it against the reference)."""

from __future__ import annotations

import pytest
import test_nonfinite as tn
import torch

import gtp_kernels.triton as gt

NAN, INF = float("nan"), float("inf")
HALF = [torch.float16, torch.bfloat16]


def needs(op):
    return pytest.mark.skipif(op not in gt.OPS, reason=f"no Triton {op} kernel")


@pytest.mark.parametrize("theta", [1.0, 0.6, 0.3])
def test_attention_inf_key_in_one_head(theta):
    tn.test_attention_inf_key_in_one_head("triton", theta)


@pytest.mark.parametrize("dtype", HALF)
def test_attention_inf_key_dtypes(dtype):
    tn.test_attention_inf_key_dtypes("triton", dtype)


@pytest.mark.parametrize(
    "case",
    [
        "attention_nan_log_size",
        "attention_log_sizes_minus_inf",
        "attention_threshold_with_nan_entries",
        "attention_scale_zero_with_inf",
        "select_tokens_nan_ranks_greatest",
        "select_tokens_random_nan_vs_reference",
    ],
)
def test_case(case):
    getattr(tn, f"test_{case}")("triton")


@needs("build_graph")
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("k", [3, 40])
def test_build_graph_nonfinite_token(value, k):
    tn.test_build_graph_nonfinite_token("triton", value, k)


@needs("build_graph")
@pytest.mark.parametrize(
    "dtype, kind", [(torch.float32, "mixed"), (torch.bfloat16, "semantic")]
)  # each ~20 s in the interpreter (n = 600); test_triton_build_graph covers the dtypes
def test_build_graph_nonfinite_vs_reference(dtype, kind):
    tn.test_build_graph_nonfinite_vs_reference("triton", dtype, kind)


@needs("build_graph")
@pytest.mark.parametrize(
    "dtype, exponent",
    [(torch.float32, 100), (torch.float32, -100), (torch.float32, -140), (torch.float16, 13),
     (torch.float16, -20)],
)  # fmt: skip
def test_build_graph_finite_extremes(dtype, exponent):
    tn.test_build_graph_finite_extremes("triton", dtype, exponent)


@pytest.mark.parametrize("alpha", [NAN, INF, -INF])
def test_propagate_rejects_nonfinite_alpha(alpha):
    tn.test_propagate_rejects_nonfinite_alpha("triton", alpha)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_propagate_nonfinite_values(dtype):
    tn.test_propagate_nonfinite_values("triton", dtype)


def test_float64_is_refused_with_the_backends_that_take_it():
    """float64 is not a bad input (the other backends take it): the Triton backend says where
    it runs instead of computing it in float32."""
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='cpu', 'cuda' or 'reference' take float64"):
        gt.attention.attention(x[:, None], x[:, None], x[:, None], None, 1.0, 1.0, 0, "none")
