"""Translations of every gtp op into standard ONNX operators (opset `OPSET`), for
torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table()).

One module per op, each a plain function with the op's schema that records ONNX nodes
(onnxscript tracing). The graph they produce runs in any ONNX runtime without a custom-op
library: MatMul, Softmax, TopK, Gather / GatherND / GatherElements, Where, ReduceMax / Sum /
Min / Mean, Equal / Less, Concat, Expand and one ScatterElements without a reduction. What
each translation keeps of the project's tie and non-finite rules, and the one place it cannot,
is said in that module's docstring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gtp_kernels.export.onnx._common import OPSET
from gtp_kernels.export.onnx.attention import attention
from gtp_kernels.export.onnx.build_graph import build_graph
from gtp_kernels.export.onnx.propagate import propagate
from gtp_kernels.export.onnx.select_tokens import select_tokens

TRANSLATIONS: dict[str, Callable] = {
    "attention": attention,
    "build_graph": build_graph,
    "propagate": propagate,
    "select_tokens": select_tokens,
}

# Namespaces whose ops share the gtp schemas: the C++ ops (CPU / CUDA kernels) and the Triton
# ops, which are registered in their own namespace (COORDINATION.md, "Dispatch").
NAMESPACES = ("gtp", "gtp_triton")


def translation_table() -> dict[Callable, Callable]:
    """{torch.ops.<namespace>.<op>.default: translation} for every gtp op registered now."""
    table: dict[Callable, Callable] = {}
    for namespace in NAMESPACES:
        for name, fn in TRANSLATIONS.items():
            try:
                packet = getattr(getattr(torch.ops, namespace), name)
            except (AttributeError, RuntimeError):  # not registered in this process
                continue
            table[packet.default] = fn
    return table


__all__ = ["OPSET", "TRANSLATIONS", "translation_table"]
