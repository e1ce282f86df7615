"""Apply GTP to model libraries. `gtp_kernels.patch.timm(model, ...)` patches a timm
VisionTransformer in place; `gtp_kernels.patch.remove(model)` undoes it.

The implementation lives in the submodule gtp_kernels.patch.timm; the package attribute `timm`
is the patch function (the submodule stays importable as sys.modules["gtp_kernels.patch.timm"]).
The submodule imports the real `timm` package with absolute imports.
"""

from gtp_kernels.patch.timm import GTPSettings, is_patched, remove
from gtp_kernels.patch.timm import timm as timm  # rebinds the name from the submodule

__all__ = ["GTPSettings", "is_patched", "remove", "timm"]
