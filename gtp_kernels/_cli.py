"""What the command-line tools (gtp-eval, gtp-vis) share: the timm model options and how a
model is made from them (with errors a user can act on), the preprocessing options, and the
GTP setting options.

The conventions are timm's validate.py: `-m/--model`, `--pretrained` (implied when no
`--checkpoint` is given), `--checkpoint` (a state dict, timm's train.py checkpoints included),
`--num-classes`, `--img-size`, `--crop-pct`, `--interpolation`, `--mean`, `--std`.
Preprocessing always comes from the model's own pretrained config
(timm.data.resolve_model_data_config), never from its name.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

GTP_OPTIONS = ("num_prop", "sparsity", "alpha", "num_neighbours", "graph", "selection")
GTP_OPTIONS += ("propagation", "backend")


class CLIError(Exception):
    """A user error: printed as 'prog: error: message', exit status 2 (as argparse does)."""


def run_main(prog: str, main: Callable[[Sequence[str] | None], Any], argv=None) -> Any:
    """Call main(argv); a CLIError becomes a one-line message and exit status 2."""
    try:
        return main(argv)
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------ arguments


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (as timm's validate.py)")
    g.add_argument("-m", "--model", required=True, metavar="NAME", help="timm model name")
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="load timm's pretrained weights (downloaded from the Hugging Face Hub, then "
        "cached); implied when no --checkpoint is given, as in timm's validate.py",
    )
    g.add_argument(
        "--pretrained-path",
        default=None,
        metavar="FILE",
        help="load this local file as the pretrained weights, with timm's adaptation "
        "(classifier, position embedding resampled to --img-size), as timm's train.py does",
    )
    g.add_argument("--checkpoint", default="", metavar="PATH", help="state dict to load")
    g.add_argument("--use-ema", action="store_true", help="the checkpoint's EMA weights")
    g.add_argument("--num-classes", type=int, default=None, help="classifier outputs")
    g.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="N",
        help="input size (default: the model's pretrained config); the model is built for it",
    )
    g.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:1, cpu, ... (default: cuda when available, else cpu)",
    )


def add_preprocessing_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (default: the model's pretrained config)")
    g.add_argument("--crop-pct", type=float, default=None, help="center crop fraction")
    g.add_argument("--crop-mode", default=None, help="center, squash or border")
    g.add_argument("--interpolation", default=None, help="bicubic, bilinear, ...")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar="M")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar="S")


def parse_num_prop(text: str) -> int | tuple:
    """'8' -> 8; '8,8,6' -> (8, 8, 6) one per block; '8,-0.5' -> (8, -0.5), ToMe's
    (r, inflect) (told apart by the float)."""
    parts = [t.strip() for t in text.split(",")]
    try:
        if len(parts) == 1:
            return int(parts[0])
        if len(parts) == 2 and "." in parts[1]:
            return int(parts[0]), float(parts[1])
        return tuple(int(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an int (8), one int per block (8,8,6) or ToMe's r,inflect "
            "with a float inflect (8,-0.5)"
        ) from None


def format_num_prop(num_prop: Any) -> str:
    """The inverse of parse_num_prop (the form a results file holds)."""
    if isinstance(num_prop, (list, tuple)):
        return ",".join(str(v) for v in num_prop)
    return str(num_prop)


def add_gtp_arguments(p: argparse.ArgumentParser, many: bool) -> None:
    """The GTP settings; with many=True each takes several values (a grid)."""
    from gtp_kernels import ops
    from gtp_kernels.patch.timm import GRAPHS, PROPAGATIONS, SELECTIONS

    n = "+" if many else None
    each = " (several values: one row per combination)" if many else ""
    g = p.add_argument_group("GTP settings" + each)
    g.add_argument(
        "--num-prop",
        type=parse_num_prop,
        nargs=n,
        default=None,
        metavar="P",
        help="tokens propagated per block: 8, or one per block 8,8,6,..., or ToMe's "
        "r,inflect 8,-0.5 (default 8 unless --gmacs-reduction is given)",
    )
    g.add_argument(
        "--gmacs-reduction",
        type=float,
        nargs=n,
        default=None,
        metavar="R",
        help="instead of P: the fraction of GMACs to save, e.g. 0.26 "
        "(gtp_kernels.schedule.for_budget)",
    )
    g.add_argument("--sparsity", type=float, nargs=n, default=[0.6] if many else 0.6,
                   metavar="THETA", help="attention density kept, in (0, 1]; 1 = off")  # fmt: skip
    g.add_argument("--alpha", type=float, nargs=n, default=[0.1] if many else 0.1,
                   help="propagation magnitude")  # fmt: skip
    g.add_argument("--num-neighbours", type=int, nargs=n, default=[8] if many else 8,
                   metavar="K", help="semantic neighbours per token")  # fmt: skip
    g.add_argument("--graph", nargs=n, choices=GRAPHS, default=["mixed"] if many else "mixed")
    g.add_argument("--selection", nargs=n, choices=SELECTIONS,
                   default=["mixed_max"] if many else "mixed_max")  # fmt: skip
    g.add_argument("--propagation", nargs=n, choices=PROPAGATIONS,
                   default=["graph"] if many else "graph")  # fmt: skip
    g.add_argument("--backend", nargs=n, choices=ops.BACKENDS,
                   default=["auto"] if many else "auto")  # fmt: skip


# ------------------------------------------------------------------------------ the model


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here (use --device cpu)")
    return device


def _model_kwargs(args: argparse.Namespace) -> dict:
    kw: dict[str, Any] = {}
    if args.num_classes is not None:
        kw["num_classes"] = args.num_classes
    if args.img_size is not None:
        kw["img_size"] = args.img_size
    return kw


def probe_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model of --model on the meta device (shapes and pretrained config, no weights, no
    download), checked to be a ViT that GTP supports: every check that needs only shapes
    (settings, checkpoint keys, preprocessing) runs on it before any weight is made."""
    import timm

    from gtp_kernels.patch.timm import _check_model

    name = args.model
    if not timm.is_model(name):
        raise CLIError(
            f"unknown model {name!r} (timm.list_models('*vit*') lists the timm model names)"
        )
    kw = _model_kwargs(args)
    with torch.device("meta"):
        try:
            _check_model(timm.create_model(name))
        except (TypeError, ValueError) as exc:
            raise CLIError(f"model {name} is not supported by GTP: {exc}") from None
        try:
            return timm.create_model(name, **kw).eval()
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            raise CLIError(f"cannot create {name} with {kw}: {exc}") from None


def create_model(
    args: argparse.Namespace, probe: torch.nn.Module, state: dict | None = None
) -> torch.nn.Module:
    """The real model of --model in eval mode on the CPU: timm's pretrained weights (--pretrained,
    implied without --checkpoint as in timm's validate.py; --pretrained-path for a local file),
    then `state` (from checkpoint_state) when given. CLIError when the weights cannot be had."""
    import timm

    name = args.model
    kw = _model_kwargs(args)
    path = args.pretrained_path
    if path is not None and not os.path.isfile(path):
        raise CLIError(f"--pretrained-path {path}: no such file")
    pretrained = bool(args.pretrained or path or not args.checkpoint)
    if path is not None:
        kw["pretrained_cfg_overlay"] = dict(file=path)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kw)
    except (OSError, RuntimeError, ConnectionError) as exc:  # hub errors are OSErrors
        if not pretrained:
            raise
        cfg = probe.pretrained_cfg or {}
        where = path or cfg.get("hf_hub_id") or cfg.get("url") or "(no source in its config)"
        raise CLIError(
            f"could not load the pretrained weights of {name} from {where}: "
            f"{type(exc).__name__}: {_first_line(exc)}. Offline? Download them once where "
            "there is a network (timm caches them under ~/.cache/huggingface; HF_HUB_OFFLINE=1 "
            "then reads the cache), or give a local file with --pretrained-path FILE or "
            "--checkpoint FILE"
        ) from None
    if state is not None:
        model.load_state_dict(state, strict=True)
    elif args.checkpoint:  # a .npz / .npy file: timm's own loader
        from timm.models import load_checkpoint

        load_checkpoint(model, args.checkpoint)
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def checkpoint_state(args: argparse.Namespace, probe: torch.nn.Module) -> dict | None:
    """The --checkpoint state dict (timm checkpoint formats: plain, 'state_dict', 'model', EMA,
    DDP or torch.compile prefixes), checked to fit the model's keys and shapes, with a message
    that says what does not fit and what to pass. None without --checkpoint (and for .npz /
    .npy files, which timm loads itself)."""
    from timm.models import load_state_dict

    path = args.checkpoint
    if not path:
        return None
    if not os.path.isfile(path):
        raise CLIError(f"--checkpoint {path}: no such file")
    if path.endswith((".npz", ".npy")):  # big_vision / JAX files
        return None
    try:
        state = load_state_dict(path, use_ema=args.use_ema)
    except Exception as exc:  # any unreadable file: say which and why
        raise CLIError(
            f"--checkpoint {path}: cannot read a state dict: {type(exc).__name__}: "
            f"{_first_line(exc)} (save one with torch.save(model.state_dict(), path))"
        ) from None
    own = probe.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return state
    parts = []
    if missing:
        parts.append(f"missing keys {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        mismatch = [f"{k}: checkpoint {a}, model {b}" for k, a, b in shapes]
        parts.append(f"shape mismatches {_few(mismatch)}")
    hints = []
    names = {k for k, _, _ in shapes}
    if any(k.startswith("head.") for k in names):
        classes = next(a[0] for k, a, _ in shapes if k.startswith("head."))
        hints.append(f"the checkpoint has {classes} classes: pass --num-classes {classes}")
    if "pos_embed" in names:
        hints.append(
            "the checkpoint was trained at another input size: build the model at that "
            "--img-size, or load it with --pretrained-path to resample the position embedding"
        )
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise CLIError(f"--checkpoint {path} does not fit {args.model}: " + "; ".join(parts) + hint)


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def data_config(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """timm's preprocessing config of the model (its pretrained config, the test size when it
    has one), with the command line's overrides."""
    from timm.data import resolve_model_data_config

    over = {
        "img_size": args.img_size,
        "crop_pct": args.crop_pct,
        "crop_mode": args.crop_mode,
        "interpolation": args.interpolation,
        "mean": tuple(args.mean) if args.mean else None,
        "std": tuple(args.std) if args.std else None,
    }
    cfg = resolve_model_data_config(
        model, args={k: v for k, v in over.items() if v is not None}, use_test_size=True
    )
    pe = model.patch_embed
    size = tuple(cfg["input_size"][1:])
    if tuple(pe.img_size) != size and not getattr(pe, "dynamic_img_size", False):
        raise CLIError(
            f"{args.model} is built for {tuple(pe.img_size)} inputs but its config asks for "
            f"{size}; pass --img-size {size[-1]}"
        )
    return cfg


def gtp_settings(model: torch.nn.Module, settings: dict, img_size: Sequence[int]) -> dict:
    """Check one combination of GTP settings against the model (ValueError -> CLIError)
    and turn a gmacs_reduction into its num_prop schedule. Returns patch.timm's kwargs."""
    from gtp_kernels import schedule
    from gtp_kernels.cost import token_counts
    from gtp_kernels.patch.timm import GTPSettings

    kw = dict(settings)
    reduction = kw.pop("gmacs_reduction", None)
    try:
        if reduction is not None:
            kw["num_prop"] = schedule.for_budget(
                model, reduction, tuple(img_size), propagation=kw["propagation"]
            )
        if isinstance(kw["num_prop"], list):
            kw["num_prop"] = tuple(kw["num_prop"])
        GTPSettings(**kw).validate(model)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    try:
        token_counts(model, tuple(img_size), num_prop=kw["num_prop"])
    except ValueError as exc:
        reason = str(exc).removeprefix("gmacs: ")
        raise CLIError(
            f"num_prop {format_num_prop(kw['num_prop'])} does not fit "
            f"{img_size[0]} x {img_size[1]} inputs: {reason}"
        ) from None
    return kw
