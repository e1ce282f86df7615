"""Analytic cost (multiply-accumulates) of a timm ViT, patched with GTP or not (SPEC 5).

Per image and block, with N tokens entering the block and N' = N - P (+ 1 for 'mean'
propagation) leaving it:

    linear layers of the attention  N * sum(in * out)   (qkv + proj = 4 N C^2; + N C^2 if gated)
    attention matmuls               2 * N^2 * C_attn    (Q K^T and A V)
    MLP linear layers               N' * sum(in * out)  (2 * mlp_ratio * N' * C^2 for timm's Mlp)

plus the patch embedding (n0 * C * in_chans * p^2) and the classifier head(s) (C * classes, per
head; the distilled DeiT has two). The linear sizes are read from the model's own modules, so
gated attention, GLU MLPs and attn_head_dim are counted as built.

Not counted (as in the paper's and fvcore's convention): layer norms, softmax, GELU, biases,
residual adds, position embedding, the top-theta threshold and the score reductions. GTP's own
work is left out by default; `include_gtp=True` adds the cosine-similarity matmul of the
semantic / mixed graph (n0^2 * C, once) and an upper bound of the propagation (every kept
token gathering all W graph slots: (n - P) * W * C per block with P > 0).

Measured with this module (224 x 224, 1000 classes, P = 8 in every block, 'graph' propagation):

    deit_small_patch16_224: 4.599 GMACs unpatched, 3.416 with GTP (-25.7%)
    deit_base_patch16_224: 17.564 GMACs unpatched, 13.104 with GTP (-25.4%)

These are the expected 4.60 / 3.42 and 17.56 / 13.10 (SPEC 5 rounds DeiT-B to 17.6 / 13.1 and the
DeiT-S saving to -26%; no other difference). The 197 tokens include the CLS token in every
count; the head is C * classes (0.4 / 0.8 MMACs), the patch embedding 196 * C * 768 (58 / 116
MMACs). The same convention reproduces the GMACs column of the paper's DeiT-B table: P = 4 ->
15.32, P = 8 -> 13.10, P = 14 -> 9.82 (paper: 15.3, 13.1, 9.8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gtp_kernels.schedule import expand

__all__ = ["gmacs", "macs", "token_counts"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _grid(model: Any, img_size: int | Sequence[int] | None) -> tuple[int, int]:
    pe = model.patch_embed
    if img_size is None:
        h, w = pe.grid_size
        return int(h), int(w)
    hw = _pair(img_size)
    if hasattr(pe, "dynamic_feat_size"):
        h, w = pe.dynamic_feat_size(hw)
        return int(h), int(w)
    ph, pw = _pair(pe.patch_size)
    return hw[0] // ph, hw[1] // pw


def _linear_macs(module: nn.Module) -> int:
    """MACs per token of every nn.Linear inside `module` (weights only, no bias)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _settings(model: Any, num_prop: Any, propagation: str | None) -> tuple[list[int], str]:
    depth = len(model.blocks)
    gtp = getattr(model, "gtp", None)
    if num_prop is None:
        num_prop = gtp.num_prop if gtp is not None else 0
    if propagation is None:
        propagation = gtp.propagation if gtp is not None else "graph"
    props = expand(num_prop, depth)
    if len(props) != depth:
        raise ValueError(f"gmacs: num_prop has {len(props)} entries, the model {depth} blocks")
    return props, propagation


def token_counts(
    model: Any,
    img_size: int | Sequence[int] | None = None,
    *,
    num_prop: int | Sequence[int] | None = None,
    propagation: str | None = None,
) -> list[tuple[int, int]]:
    """(tokens entering, tokens leaving) every block, prefix tokens included.

    num_prop / propagation default to `model.gtp` for a patched model, else no propagation.
    Raises ValueError when a block would propagate more image tokens than it has minus one.
    """
    props, propagation = _settings(model, num_prop, propagation)
    h, w = _grid(model, img_size)
    m = int(model.num_prefix_tokens)
    n_tok = m + h * w
    counts = []
    for i, p in enumerate(props):
        if p > n_tok - m - 1:
            raise ValueError(
                f"gmacs: num_prop={p} at block {i} is too large for {n_tok - m} image tokens"
            )
        out = n_tok - p + (1 if propagation == "mean" and p > 0 else 0)
        counts.append((n_tok, out))
        n_tok = out
    return counts


def macs(
    model: Any,
    img_size: int | Sequence[int] | None = None,
    *,
    num_prop: int | Sequence[int] | None = None,
    propagation: str | None = None,
    include_gtp: bool = False,
) -> dict[str, int]:
    """MACs per image by part: 'patch_embed', 'attn_linear', 'attn_matmul', 'mlp', 'head',
    'gtp_graph' and 'gtp_propagate' (0 unless include_gtp) and 'total'. Arguments as in
    `gmacs`."""
    pool = getattr(model, "global_pool", "token")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"gmacs: global_pool={pool!r} (attention pooling) is not supported")
    proj = getattr(model.patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError("gmacs: needs a patch embedding with a Conv2d `proj` (timm PatchEmbed)")
    h, w = _grid(model, img_size)
    n0 = h * w
    kh, kw = proj.kernel_size
    keys = (
        "patch_embed",
        "attn_linear",
        "attn_matmul",
        "mlp",
        "head",
        "gtp_graph",
        "gtp_propagate",
    )
    parts = dict.fromkeys(keys, 0)
    parts["patch_embed"] = n0 * proj.out_channels * (proj.in_channels // proj.groups) * kh * kw
    counts = token_counts(model, img_size, num_prop=num_prop, propagation=propagation)
    gtp = getattr(model, "gtp", None)
    graph = gtp.graph if gtp is not None else "mixed"
    k = gtp.num_neighbours if gtp is not None else 8
    width = {"spatial": 8, "semantic": k, "mixed": 8 + k}.get(graph, 8 + k)
    m = int(model.num_prefix_tokens)
    for blk, (n_in, n_out) in zip(model.blocks, counts, strict=True):
        attn = blk.attn
        c_attn = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        parts["attn_linear"] += n_in * _linear_macs(attn)
        parts["attn_matmul"] += 2 * n_in * n_in * c_attn
        parts["mlp"] += n_out * _linear_macs(blk.mlp)
        if include_gtp and n_out != n_in:
            parts["gtp_propagate"] += (n_out - m) * width * model.embed_dim
    if include_gtp and any(n_out != n_in for n_in, n_out in counts) and graph != "spatial":
        parts["gtp_graph"] += n0 * n0 * model.embed_dim
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            parts["head"] += _linear_macs(head)
    parts["total"] = sum(parts.values())
    return parts


def gmacs(
    model: Any,
    img_size: int | Sequence[int] | None = None,
    *,
    num_prop: int | Sequence[int] | None = None,
    propagation: str | None = None,
    include_gtp: bool = False,
) -> float:
    """GMACs (1e9 multiply-accumulates) per image of a timm ViT, patched with GTP or not.

    Args:
        model: a timm VisionTransformer; patched models use `model.gtp` (num_prop, propagation).
        img_size: input size (int or (h, w)); default the model's configured size.
        num_prop / propagation: override the model's settings (an unpatched model has none);
            num_prop in any form of gtp_kernels.schedule (int, per-block list, (r, inflect)).
        include_gtp: also count GTP's own matmul-like work (graph similarity, propagation).
    FLOPs as counted by torch.utils.flop_counter are 2 * MACs.
    """
    with torch.no_grad():
        total = macs(
            model, img_size, num_prop=num_prop, propagation=propagation, include_gtp=include_gtp
        )["total"]
    return total / 1e9
