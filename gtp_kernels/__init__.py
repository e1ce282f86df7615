"""gtp_kernels: Graph-based Token Propagation (GTP-ViT) for timm Vision Transformers.

`gtp_kernels.reference` is the pure-PyTorch definition of every op; `gtp_kernels.ops` holds the
public op wrappers (`backend="auto" | "cpu" | "reference"`); `gtp_kernels.patch.timm(model)`
applies GTP to a timm VisionTransformer. Importing never queries a GPU.
"""

from gtp_kernels._extension import extension_available, extension_error

__version__ = "0.1.0"
__all__ = ["__version__", "extension_available", "extension_error"]
