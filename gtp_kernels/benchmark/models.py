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


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model runs and in which dtype."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _candidates(device: torch.device) -> list[str]:
    # Triton on CPU tensors runs only under the interpreter, far too slow for a whole model:
    # never a default there (ask for it with --backends triton).
    return ["cpu"] if device.type == "cpu" else [device.type, "triton"]


def missing_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """{backend: why it is not a default on `device`} for the device's compiled kernels and,
    on CUDA, Triton: the first op it cannot run, and why."""
    from gtp_kernels.benchmark.devices import providers

    device = torch.device(device)
    why_not = {}
    for backend in _candidates(device):
        for op in OPS:
            _, missing = providers(op, device, (backend,))
            if backend in missing:
                why_not[backend] = missing[backend]
                break
    return why_not


def default_backends(device: torch.device | str = "cpu") -> list[str]:
    """reference, and every backend that has a kernel for every op on `device` tensors: the
    device's compiled kernels (cpu / cuda) and, on CUDA, triton."""
    missing = missing_backends(device)
    return ["reference"] + [b for b in _candidates(torch.device(device)) if b not in missing]


def model_and_input(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The unpatched timm model (eval, seeded random weights unless --pretrained) and a seeded
    random input batch of its image size, on args.device in args.dtype (when the script has
    add_device_arguments; else CPU, float32)."""
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    if getattr(args, "depth", None):
        kwargs["depth"] = args.depth
    base = timm.create_model(args.model, pretrained=args.pretrained, **kwargs).eval()
    x = torch.randn(args.batch, 3, *base.patch_embed.img_size)
    device = torch.device(getattr(args, "device", "cpu"))
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    return base.to(device, dtype), x.to(device, dtype)


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
