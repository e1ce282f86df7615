"""What the end-to-end benchmark and the profile share: the model options, the seeded model and
input, and the GTP-patched copies to compare with it."""

from __future__ import annotations

import argparse
import copy

import torch

from gtp_kernels.info import OPS


def add_model_arguments(p: argparse.ArgumentParser, batch: int) -> None:
    """The options that say which model runs, on what input, with which GTP settings."""
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--img-size", type=int, default=None, help="input side (default: model's)")
    p.add_argument("--depth", type=int, default=None, help="blocks (default: model's; smoke tests)")
    p.add_argument("--num-prop", type=int, default=8, help="tokens propagated per block (P)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--neighbours", type=int, default=8, help="semantic neighbours K")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--pretrained", action="store_true", help="load timm weights (needs network)")
    p.add_argument("--no-malloc-env", action="store_true", help="leave glibc malloc as it is")
    p.add_argument("--seed", type=int, default=0)


def default_backends() -> list[str]:
    """reference, and cpu when this build has a CPU kernel for every op."""
    from gtp_kernels._extension import has_kernel

    backends = ["reference"]
    if all(has_kernel(op, "CPU") for op in OPS):
        backends.append("cpu")
    return backends


def model_and_input(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The unpatched timm model (eval, seeded random weights unless --pretrained) and a seeded
    random input batch of its image size."""
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    if getattr(args, "depth", None):
        kwargs["depth"] = args.depth
    base = timm.create_model(args.model, pretrained=args.pretrained, **kwargs).eval()
    x = torch.randn(args.batch, 3, *base.patch_embed.img_size)
    return base, x


def patched_copy(
    base: torch.nn.Module, args: argparse.Namespace, sparsity: float, backend: str
) -> torch.nn.Module:
    """A GTP-patched deep copy of `base` with the settings of `args`."""
    import gtp_kernels.patch

    return gtp_kernels.patch.timm(
        copy.deepcopy(base),
        num_prop=args.num_prop,
        sparsity=sparsity,
        alpha=args.alpha,
        num_neighbours=args.neighbours,
        backend=backend,
    )
