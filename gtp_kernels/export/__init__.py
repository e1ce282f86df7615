"""Deployment of GTP-patched models: torch.export, AOTInductor packages and ONNX.

    import gtp_kernels.export as gx
    program = gx.export(model, example)                   # torch.export, dynamic batch
    gx.aoti_compile(model, example, "model.pt2")          # AOTInductor package (C++: README)
    gx.to_onnx(model, "model.onnx", example)              # standard ONNX ops, no custom ops

What the helpers do that a plain torch.export.export call would leave to the user:
- check the GTP settings first and say which one to change (selection "random",
  track_sources and the reference backend cannot be captured; see _checks.py);
- run in eval mode under torch.no_grad() (a deployed graph has no autograd);
- make the batch dimension dynamic, duplicating a batch-1 example (torch.export specialises
  dimensions of size 1, so a batch-1 example would fix the batch at 1);
- for ONNX, pass the translation of every gtp op (gtp_kernels.export.onnx) and a fixed opset.

The exported graphs call the gtp ops of the model's backend (torch.ops.gtp.* for "cpu" and
"cuda", torch.ops.gtp_triton.* for "triton"). An AOTInductor package calls them through the
dispatcher, so whoever loads it must register them first (import gtp_kernels in Python; link
libgtp_ops in C++). The ONNX file holds only standard operators.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gtp_kernels.export._checks import check_exportable

__all__ = ["OPSET", "aoti_compile", "check_exportable", "export", "to_onnx"]

OPSET = 20  # ONNX opset of to_onnx (== gtp_kernels.export.onnx.OPSET, without importing onnx)
_NAME = "gtp_kernels.export"


def _prepare(model: Any, example: torch.Tensor, dynamic_batch: bool, target: str):
    """Checks, and the (example,) tuple and dynamic_shapes to export with."""
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise TypeError(f"{_NAME}: example must be an image batch tensor (B, 3, H, W)")
    if model.training:
        raise ValueError(
            f"{_NAME}: the model is in training mode; call model.eval() before exporting "
            "(a deployed graph runs inference: no dropout, no drop path)"
        )
    cfg = getattr(model, "gtp", None)
    if cfg is not None:
        cfg.validate(model)
        check_exportable(cfg, example.device, target)
    if not dynamic_batch:
        return (example,), None
    if example.shape[0] == 1:
        example = torch.cat([example, example])
    batch = torch.export.Dim("batch", min=1)
    return (example,), ({0: batch},)


def export(
    model: Any, example: torch.Tensor, dynamic_batch: bool = True, **kwargs: Any
) -> torch.export.ExportedProgram:
    """torch.export of a (GTP-patched or plain) model on `example` (B, 3, H, W).

    dynamic_batch: the program takes any batch size >= 1 (the image size stays fixed: the
    GTP schedule and the token graph depend on it). Extra keyword arguments go to
    torch.export.export (e.g. strict=True). The program's outputs equal the eager model's.
    """
    args, dynamic_shapes = _prepare(model, example, dynamic_batch, "torch.export")
    with torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, **kwargs)


def aoti_compile(
    model: Any,
    example: torch.Tensor,
    package_path: str | os.PathLike,
    dynamic_batch: bool = True,
    **inductor_configs: Any,
) -> str:
    """Export `model` (or take an ExportedProgram as is) and compile it with AOTInductor into
    a .pt2 package at `package_path`; returns the path.

    Load it in Python with torch._inductor.aoti_load_package(path) after `import
    gtp_kernels` (which registers the gtp ops), or in C++ with
    torch::inductor::AOTIModelPackageLoader in a program linked with libgtp_ops
    (tests/cpp/aoti_run.cpp). The package holds the compiled graph and the weights, not the
    gtp kernels: it calls them by name.
    """
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        program = export(model, example, dynamic_batch)
    return torch._inductor.aoti_compile_and_package(
        program,
        package_path=os.fspath(package_path),
        inductor_configs=inductor_configs or None,
    )


def to_onnx(
    model: Any,
    path: str | os.PathLike,
    example: torch.Tensor,
    dynamic_batch: bool = True,
    **kwargs: Any,
) -> Any:
    """Export `model` to an ONNX file at `path` (opset OPSET, weights inside the file) whose
    every gtp op is translated into standard ONNX operators: it runs in ONNX Runtime (or any
    ONNX runtime) without a custom-op library. Input "images" (batch dynamic unless
    dynamic_batch=False), output "logits". Extra keyword arguments go to torch.onnx.export
    (e.g. optimize=False). Returns the torch.onnx.ONNXProgram.
    """
    from gtp_kernels.export.onnx import OPSET as onnx_opset
    from gtp_kernels.export.onnx import translation_table

    assert onnx_opset == OPSET
    args, dynamic_shapes = _prepare(model, example, dynamic_batch, "ONNX export")
    options: dict[str, Any] = dict(
        input_names=["images"],
        output_names=["logits"],
        opset_version=OPSET,
        external_data=False,
    )
    options.update(kwargs)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=translation_table(),
            **options,
        )
    program.save(os.fspath(path), external_data=options["external_data"])
    return program
