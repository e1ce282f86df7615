"""Pictures of what GTP kept: the patches each remaining token absorbed, and the block at which
each patch was propagated, drawn over the model's input.

    gtp-vis dog.jpg -m deit_small_patch16_224 --num-prop 8 --out vis.png

    import gtp_kernels.patch, gtp_kernels.visualize as vis
    gtp_kernels.patch.timm(model, num_prop=8, track_sources=True)
    model(x)                                      # x: (1, 3, H, W), the preprocessed image
    groups = vis.make_visualization(img, model.gtp.last_sources[0], grid)
    blocks = vis.propagation_map(img, model.gtp.last_propagated_at[0], grid, len(model.blocks))

`make_visualization` follows ToMe's (tome/vis.py): every original patch goes to the remaining
token that absorbed the most of it (the largest entry of its column of `last_sources`); each
such group is filled with the mean colour of its pixels and outlined in the group's own colour.
Unlike ToMe's merging, GTP's propagation can absorb a patch into nobody (a pruned patch, or a
propagated one whose graph neighbours were all removed): those pixels are black.
`propagation_map` colours every propagated patch by its block (dark blue: first block, yellow:
last; the legend of `block_legend`) and shows the patches still there at the end as they are.

Images are (H, W, 3) uint8 numpy arrays or PIL images of the model's input (after resize and
crop); patches are the (h, w) grid over them, patch (i, j) covering rows i*H//h .. (i+1)*H//h.
Only numpy and Pillow are needed.
"""

from __future__ import annotations

import argparse
import colorsys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from gtp_kernels import _cli

__all__ = [
    "block_colours",
    "block_legend",
    "compose",
    "group_colours",
    "make_visualization",
    "owners",
    "propagation_map",
]

PROG = "gtp-vis"
DROPPED = np.zeros(3, dtype=np.uint8)  # patches absorbed by no remaining token
# Anchors of matplotlib's viridis (0, 1/4, 1/2, 3/4, 1), interpolated linearly.
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def _as_array(img: Any) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{PROG}: img must be (H, W, 3) uint8 or a PIL image, got {img.shape}")
    return img


def _patch_of_pixel(shape: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(H, W) int: the row-major patch index of every pixel."""
    (big_h, big_w), (h, w) = shape, grid
    rows = np.arange(big_h) * h // big_h
    cols = np.arange(big_w) * w // big_w
    return rows[:, None] * w + cols[None, :]


def owners(sources: torch.Tensor) -> np.ndarray:
    """(n0,) int64: for every original patch, the remaining token (row of `sources`, (n, n0))
    that holds the largest share of it, or -1 when no token holds any. Ties: the lower row."""
    s = sources.detach().float().cpu()
    if s.dim() != 2:
        raise ValueError(f"{PROG}: sources must be (tokens, patches), got {tuple(s.shape)}")
    best, row = s.max(dim=0)
    return torch.where(best > 0, row, -1).numpy().astype(np.int64)


def group_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct outline colours: hues spaced by the golden ratio, bright."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = [colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in hues]
    return np.round(np.array(rgb, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


def block_colours(depth: int) -> np.ndarray:
    """(depth, 3) uint8: block 0 dark blue ... block depth-1 yellow (viridis)."""
    t = np.linspace(0.0, 1.0, depth) if depth > 1 else np.zeros(1)
    pos = t * (len(_VIRIDIS) - 1)
    lo = np.minimum(pos.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (pos - lo)[:, None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return np.round(rgb).astype(np.uint8)


def _interior(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with the 4-neighbourhood (outside the image counts as outside the mask),
    as scipy.ndimage.binary_erosion's default, which ToMe uses."""
    m = np.pad(mask, 1, constant_values=False)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def make_visualization(
    img: Any, sources: torch.Tensor, grid: tuple[int, int], colours: np.ndarray | None = None
) -> Image.Image:
    """ToMe-style picture of the remaining tokens: each token's patches (see `owners`) filled
    with their mean colour and outlined in the token's colour (`group_colours`, or `colours`
    (n, 3) uint8); patches no token holds are black. sources: (n, n0) with n0 = h * w."""
    pixels = _as_array(img)
    h, w = grid
    if sources.shape[-1] != h * w:
        raise ValueError(
            f"{PROG}: sources have {sources.shape[-1]} patches, the grid {h} x {w} has {h * w}"
        )
    owner = owners(sources)
    patch = _patch_of_pixel(pixels.shape[:2], grid)
    who = owner[patch]  # (H, W) token of every pixel, -1 for none
    if colours is None:
        colours = group_colours(sources.shape[0])
    out = np.empty_like(pixels)
    out[:] = DROPPED
    for token in np.unique(who[who >= 0]):
        mask = who == token
        mean = np.round(pixels[mask].astype(np.float64).mean(axis=0)).astype(np.uint8)
        inner = _interior(mask)
        out[inner] = mean
        out[mask & ~inner] = colours[token]
    return Image.fromarray(out)


def propagation_map(
    img: Any, propagated_at: torch.Tensor, grid: tuple[int, int], depth: int
) -> Image.Image:
    """Every patch propagated after block l in block_colours(depth)[l]; patches whose token is
    still there at the end (-1) as in the image. propagated_at: (n0,) int, n0 = h * w."""
    pixels = _as_array(img)
    at = propagated_at.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if at.size != grid[0] * grid[1]:
        raise ValueError(f"{PROG}: propagated_at has {at.size} patches, the grid {grid}")
    if at.size and at.max() >= depth:
        raise ValueError(f"{PROG}: propagated_at has block {at.max()} >= depth {depth}")
    colours = block_colours(depth)
    per_pixel = at[_patch_of_pixel(pixels.shape[:2], grid)]
    out = pixels.copy()
    gone = per_pixel >= 0
    out[gone] = colours[per_pixel[gone]]
    return Image.fromarray(out)


def block_legend(depth: int, width: int, height: int = 14) -> Image.Image:
    """A strip of the block colours, block 0 at the left, numbered where there is room."""
    colours = block_colours(depth)
    strip = np.zeros((height, width, 3), dtype=np.uint8)
    edges = np.arange(depth + 1) * width // depth
    for i in range(depth):
        strip[:, edges[i] : edges[i + 1]] = colours[i]
    legend = Image.fromarray(strip)
    draw = ImageDraw.Draw(legend)
    for i in range(depth):
        if edges[i + 1] - edges[i] >= 12:
            light = colours[i].astype(int).sum() > 380
            draw.text((edges[i] + 2, 1), str(i), fill=(0, 0, 0) if light else (255, 255, 255))
    return legend


TITLE, MARGIN = 16, 6  # pixels above each panel for its title; around and between panels


def compose(panels: Sequence[tuple[str, Image.Image]], footer: Image.Image | None = None):
    """Panels side by side on white, each under its title, an optional footer under the last
    panel. Panel k's top-left corner is (MARGIN + TITLE, MARGIN + k * (W + MARGIN))."""
    w, h = panels[0][1].size
    width = MARGIN + len(panels) * (w + MARGIN)
    height = MARGIN + TITLE + h + MARGIN + (footer.size[1] + MARGIN if footer else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (title, panel) in enumerate(panels):
        x = MARGIN + k * (w + MARGIN)
        draw.text((x, MARGIN + 2), title, fill=(0, 0, 0))
        canvas.paste(panel, (x, MARGIN + TITLE))
    if footer is not None:
        canvas.paste(
            footer, (MARGIN + (len(panels) - 1) * (w + MARGIN), MARGIN + TITLE + h + MARGIN)
        )
    return canvas


# ------------------------------------------------------------------------------ gtp-vis


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Draw what GTP keeps of an image: the input, the patches every remaining "
        "token absorbed (ToMe-style), and the block at which each patch was propagated.",
    )
    p.add_argument("image", metavar="IMAGE", help="an image file (PNG, JPEG, ...)")
    p.add_argument("--out", default="vis.png", help="output PNG (default vis.png)")
    _cli.add_model_arguments(p)
    _cli.add_preprocessing_arguments(p)
    _cli.add_gtp_arguments(p, many=False)
    return p


def render(argv: Sequence[str] | None = None) -> dict:
    """Run gtp-vis; returns what it drew (for tests): the panels and the model's outputs."""
    import gtp_kernels.patch as gp
    from gtp_kernels.cost import _grid, gmacs

    args = build_parser().parse_args(argv)
    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as exc:
        raise _cli.CLIError(f"cannot read image {args.image}: {exc}") from None
    device = _cli.resolve_device(args.device)
    probe = _cli.probe_model(args)
    state = _cli.checkpoint_state(args, probe)
    cfg = _cli.data_config(probe, args)
    combo = {name: getattr(args, name) for name in _cli.GTP_OPTIONS}
    if args.gmacs_reduction is not None:
        if args.num_prop is not None:
            raise _cli.CLIError("give --num-prop or --gmacs-reduction, not both")
        del combo["num_prop"]
        combo["gmacs_reduction"] = args.gmacs_reduction
    elif combo["num_prop"] is None:
        combo["num_prop"] = 8
    settings = _cli.gtp_settings(probe, combo, cfg["input_size"][1:])

    from timm.data import create_transform

    x = create_transform(**cfg, is_training=False)(image)[None]
    model = _cli.create_model(args, probe, state).to(device)
    gp.timm(model, **settings, track_sources=True)
    with torch.inference_mode():
        logits = model(x.to(device))
    # The picture is of the model's input: undo the normalisation (exact up to float rounding)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    pixels = (x[0] * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    grid = _grid(model, tuple(x.shape[-2:]))
    depth = len(model.blocks)
    sources = model.gtp.last_sources[0].cpu()
    at = model.gtp.last_propagated_at[0].cpu()
    groups = make_visualization(pixels, sources, grid)
    blocks = propagation_map(pixels, at, grid, depth)
    size = (x.shape[-1], x.shape[-2])
    canvas = compose(
        [
            ("input", Image.fromarray(pixels)),
            (f"{sources.shape[0]} tokens left", groups),
            (f"propagated at block 0..{depth - 1}", blocks),
        ],  # fmt: skip
        footer=block_legend(depth, size[0]),
    )
    canvas.save(args.out)
    g, base = gmacs(model, tuple(x.shape[-2:])), gmacs(model, tuple(x.shape[-2:]), num_prop=0)
    top = logits[0].float().softmax(-1).topk(min(5, logits.shape[-1]))
    print(
        f"{PROG}: {args.out}: {sources.shape[0]} of {grid[0] * grid[1]} image tokens left, "
        f"{g:.3f} GMACs ({base:.3f} unpatched); top classes "
        + ", ".join(
            f"{i} ({p:.2f})" for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
    )
    return dict(
        canvas=canvas, input=pixels, groups=groups, blocks=blocks, sources=sources,
        propagated_at=at, grid=grid, depth=depth,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    _cli.run_main(PROG, render, argv)


if __name__ == "__main__":
    main()
