"""What a GTP-patched model needs before torch.export, AOTInductor or ONNX can take it.

Kept free of heavy imports: the patched forward calls `check_exportable` while torch.export
traces it, so users who call torch.export.export / torch.onnx.export themselves get the same
clear errors as the helpers in gtp_kernels.export.
"""

from __future__ import annotations

from typing import Any

import torch

from gtp_kernels.ops._backend import resolve_backend

OPS = ("build_graph", "attention", "select_tokens", "propagate")
_NAME = "gtp_kernels.export"


def check_exportable(cfg: Any, device: torch.device, target: str = "torch.export") -> None:
    """Raise a ValueError naming the GTP setting to change when `cfg` (a model's GTPSettings)
    cannot be captured by `target` on `device`. A backend that cannot be used at all raises
    resolve_backend's error (which says how to build the missing kernel)."""
    if cfg.selection == "random":
        raise ValueError(
            f"{_NAME}: selection='random' draws its scores from a torch.Generator created in "
            f"the forward, which {target} cannot capture; set model.gtp.selection to a score "
            "such as 'mixed_max'"
        )
    if cfg.track_sources:
        raise ValueError(
            f"{_NAME}: track_sources=True stores a side output (model.gtp.last_sources) that "
            f"{target} cannot capture; set model.gtp.track_sources = False (it is a "
            "visualisation aid)"
        )
    for op in OPS:
        if resolve_backend(op, cfg.backend, device) == "reference":
            raise ValueError(
                f"{_NAME}: model.gtp.backend={cfg.backend!r} runs the pure-PyTorch reference "
                f"of gtp.{op} on {device.type}; its argument checks read tensor values (a "
                f"data-dependent branch {target} cannot capture) and it is not a single op that "
                "a deployment runtime can replace. Set model.gtp.backend = 'cpu' (CPU), or "
                "'cuda' / 'triton' on a GPU, with the compiled extension built "
                "(`python setup.py build_ext --inplace`; see `python -m gtp_kernels.info`)"
            )
