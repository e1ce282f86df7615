"""Per-block num_prop schedules: ToMe's (r, inflect) form, and a GMAC budget.

    import gtp_kernels.patch, gtp_kernels.schedule
    gtp_kernels.schedule.for_budget(model, 0.26)  # DeiT-S: [8] * 8 + [9] * 4, 3.400 GMACs
    gtp_kernels.patch.timm(model, gmacs_reduction=0.26)     # the same, in one line
    gtp_kernels.patch.timm(model, num_prop=(8, -0.5))       # ToMe's (r, inflect) form

num_prop takes three forms everywhere (patch, GTPSettings, gtp_kernels.cost, gtp-eval):
an int for every block, one int per block, or ToMe's (r, inflect) pair, told apart by its
second entry being a float: (8, -0.5), (8, 0.0). ToMe users know this form from
`tome.utils.parse_r`; the same formula is used here (see `inflected`).

`python -m gtp_kernels.schedule [MODEL ...] --reductions 0.1 0.26` prints the schedules of
budgets as a table (the README's).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["expand", "for_budget", "inflected", "is_inflected"]

_NAME = "gtp_kernels.schedule"


def is_inflected(num_prop: Any) -> bool:
    """Whether num_prop is ToMe's (r, inflect) pair: an int, then a float (not an int)."""
    return (
        isinstance(num_prop, (tuple, list))
        and len(num_prop) == 2
        and isinstance(num_prop[0], numbers.Integral)
        and not isinstance(num_prop[0], bool)
        and isinstance(num_prop[1], float)
    )


def inflected(r: int, inflect: float, depth: int) -> list[int]:
    """ToMe's schedule: `r` tokens a block on average, trending down (inflect -1: from 2r to
    0), constant (0) or up (+1: from 0 to 2r), linearly over the blocks, rounded down as ToMe's
    parse_r rounds (so the total can be slightly under depth * r)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise ValueError(f"{_NAME}: r of (r, inflect) must be an int >= 0, got {r!r}")
    if not -1.0 <= inflect <= 1.0:  # also rejects NaN
        raise ValueError(f"{_NAME}: inflect of (r, inflect) must be in [-1, 1], got {inflect!r}")
    if depth == 1:
        return [int(r)]
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1)
    return [int(lo + step * i) for i in range(depth)]


def expand(num_prop: Any, depth: int) -> list[int]:
    """num_prop in any of its forms -> one int per block (the length is not checked here)."""
    if isinstance(num_prop, numbers.Integral):
        return [int(num_prop)] * depth
    if is_inflected(num_prop):
        return inflected(int(num_prop[0]), float(num_prop[1]), depth)
    return [int(p) for p in num_prop]


def _spread(total: int, depth: int) -> list[int]:
    """`total` tokens over `depth` blocks as evenly as possible; the blocks that take one more
    are the last ones, where a token saves the least, so the GMACs move in the finest steps."""
    base, extra = divmod(total, depth)
    return [base + (1 if i >= depth - extra else 0) for i in range(depth)]


def for_budget(
    model: Any,
    gmacs_reduction: float,
    img_size: int | Sequence[int] | None = None,
    *,
    propagation: str | None = None,
) -> list[int]:
    """The per-block num_prop whose GMACs (gtp_kernels.cost) come closest to
    (1 - gmacs_reduction) x the unpatched model's without exceeding it.

    The schedules searched are the near-constant ones (the paper's constant P, with the
    remainder on the last blocks): T tokens in all, T // depth per block and one more in the
    last T % depth blocks. Every token added lowers the GMACs, so the answer is the smallest T
    that meets the budget; no block may propagate more tokens than it has (minus one).

    Args:
        model: a timm VisionTransformer, patched or not (only its shapes are read: a model on
            the meta device works).
        gmacs_reduction: the fraction of the unpatched GMACs to save, in [0, 1).
        img_size: input size (int or (h, w)); default the model's configured size.
        propagation: "graph" / "none" / "mean" ('mean' keeps one token more per block);
            default the model's own setting when patched, else "graph".

    Raises ValueError when the budget cannot be met (more than the model can save).
    """
    from gtp_kernels.cost import macs  # cost imports this module

    r = gmacs_reduction
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
        raise ValueError(f"{_NAME}: gmacs_reduction must be in [0, 1), got {r!r}")
    depth = len(model.blocks)

    def total_macs(tokens: int) -> int | None:
        try:
            kw = dict(num_prop=_spread(tokens, depth), propagation=propagation)
            return macs(model, img_size, **kw)["total"]
        except ValueError:  # some block would propagate more tokens than it has
            return None

    base = total_macs(0)
    target = (1.0 - r) * base
    # Largest valid total: validity is monotone in T (every block's P only grows with T).
    lo, hi = 0, 1
    while total_macs(hi) is not None:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_macs(mid) is not None else (lo, mid)
    most = lo
    if total_macs(most) > target:
        best = 1.0 - total_macs(most) / base
        raise ValueError(
            f"{_NAME}: gmacs_reduction={r:g} cannot be met: this model saves at most "
            f"{best:.3f} of its GMACs at this input size (schedule {_spread(most, depth)})"
        )
    lo, hi = -1, most  # total_macs(hi) <= target < total_macs(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if total_macs(mid) <= target else (mid, hi)
    return _spread(hi, depth)


def budget_table(models: Sequence[str], reductions: Sequence[float], img_size=None) -> str:
    """Markdown table of for_budget's schedules for timm models (built on the meta device)."""
    import timm
    import torch

    from gtp_kernels.cost import gmacs

    lines = [
        "| model | gmacs_reduction | num_prop per block | GMACs (unpatched) | saved |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        with torch.device("meta"):
            model = timm.create_model(name)
        base = gmacs(model, img_size)
        for r in reductions:
            props = for_budget(model, r, img_size)
            g = gmacs(model, img_size, num_prop=props)
            p = ", ".join(str(v) for v in props)
            lines.append(f"| {name} | {r:g} | {p} | {g:.3f} ({base:.3f}) | {1 - g / base:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m gtp_kernels.schedule",
        description="The num_prop schedule of a GMAC budget (gmacs_reduction) for timm ViTs.",
    )
    p.add_argument("models", nargs="*", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    p.add_argument(
        "--reductions", type=float, nargs="+", default=[0.1, 0.2, 0.25, 0.26, 0.3, 0.4, 0.5]
    )
    p.add_argument("--img-size", type=int, default=None)
    args = p.parse_args(argv)
    print(budget_table(args.models, args.reductions, args.img_size))


if __name__ == "__main__":
    main()
