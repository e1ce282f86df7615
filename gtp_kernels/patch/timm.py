"""Apply GTP (SPEC "Where GTP plugs into a ViT") to a timm VisionTransformer instance, in place.

    import gtp_kernels.patch
    gtp_kernels.patch.timm(model, num_prop=8, sparsity=0.6, alpha=0.1)
    model.gtp.num_prop = 6          # settings can be changed later (checked at every forward)
    gtp_kernels.patch.remove(model) # back to the original class and forward

How: like ToMe, the instance's class is swapped for a subclass (created once per timm class)
whose `forward_features` runs patch_embed / _pos_embed / patch_drop / norm_pre unchanged, builds
the token graph once, then runs every block with the gtp ops (attention with proportional
attention, top-theta sparsity and the importance score, select_tokens, propagate) instead of
timm's Block.forward. The blocks' own modules (norm1, qkv, q/k norm, gate, attn.norm, proj,
proj_drop, ls1/ls2, drop_path1/2, norm2, mlp) are called as they are, so LayerScale, q/k norm,
scale norm, gated attention and stochastic depth are kept. `forward` and `forward_head`
(pooling, fc_norm, head, the distilled head) are timm's. Nothing is registered on the model:
`model.gtp` is a plain dataclass, so the state_dict is unchanged.

Training (finetuning through the patch) works on every backend: the attention op has a
backward (the top-theta mask held constant), propagate is linear in the tokens, and the graph
and the selection are constants. Drop path, proj_drop, the MLP's dropout and pos_drop run as in
timm (the same modules in the same order, so the same random numbers). Attention dropout
(attn.attn_drop with p > 0) cannot be applied inside the fused attention: in training mode it
raises a ValueError instead of being ignored (in eval mode it is off anyway; pretrained ViTs use
p = 0). Not supported: attn_mask / is_causal (rejected), gradient checkpointing.
forward_intermediates and other timm entry points run the unpatched blocks.

NaN / Inf mid-network (e.g. a float16 overflow inside a block): the patched forward behaves as
the unpatched model does, with no error and no device sync. The ops never check tensor values;
NaN propagates by arithmetic, so the images it reaches get NaN logits (a NaN key makes its whole
attention head NaN), while the other images of the batch are unaffected (every op works per
image). Every decision stays deterministic and is the same on every backend: a NaN importance
score ranks greatest, so those tokens are kept rather than propagated (equal scores: the lower
position is kept), a NaN probability is never masked, and a token with NaN / Inf in the graph
input has NaN similarity, ranked as the most similar. Settings are still checked (ValueError
naming the setting), and so are the ops' arguments (README, "Bad inputs").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from gtp_kernels import ops, schedule

__all__ = ["GTPSettings", "SELECTIONS", "timm", "remove", "is_patched"]

from gtp_kernels.reference.attention import SCORES as _ATTENTION_SCORES  # noqa: E402

GRAPHS = ("spatial", "semantic", "mixed")
# The attention op's score strategies (one list, in the reference), plus seeded random.
SELECTIONS = (*(s for s in _ATTENTION_SCORES if s != "none"), "random")
PROPAGATIONS = ("graph", "none", "mean")
POOLS = ("token", "avg", "avgmax", "max", "")
_NAME = "gtp_kernels.patch.timm"


@dataclasses.dataclass
class GTPSettings:
    """GTP settings of a patched model (`model.gtp`); change them freely between forwards.

    num_prop: P, tokens propagated after each block: an int for every block, a sequence of
        one int per block (0 = off for that block), or ToMe's (r, inflect) pair with a float
        inflect, e.g. (8, -0.5) (gtp_kernels.schedule.inflected).
    sparsity: theta in (0, 1], the attention density kept (1 = no masking).
    alpha: propagation magnitude >= 0 (only used by propagation="graph").
    num_neighbours: K semantic neighbours per token (graph "semantic" / "mixed").
    graph: "mixed" | "spatial" | "semantic".
    selection: importance score (SPEC 3) or "random". "random" draws the scores from a
        torch.Generator on the input's device seeded with `seed` at the start of every
        forward, used by the blocks in order: the same input size always drops the same
        positions, and no attention scores are computed.
    propagation: "graph" (x_i += alpha * sum W[i, p] x_p), "none" (plain pruning, alpha = 0),
        "mean" (prune, then append one token = mean of the pruned tokens, size = sum of their
        sizes, with an empty graph row).
    token_scale: proportional attention with token sizes (log sizes added to the logits).
    backend: "auto" | "cpu" | "cuda" | "triton" | "reference", passed to every op.
    seed: seed of the "random" selection.
    track_sources: also propagate a (B, n_left, n0) float32 matrix S (S = I at the start) with
        the same rule as the tokens, S' = S_kept + alpha * W S_prop: row r says which original
        patches the r-th remaining image token absorbed, with what weight. A visualisation aid
        (dense, n0 = patches of the input); stored in `last_sources` after each forward
        (None when off), with `last_propagated_at`, (B, n0) int64: the block after which each
        original patch's own token was propagated (removed), -1 when it is left at the end.
        gtp_kernels.visualize draws both.

    torch.compile(model, fullgraph=True) traces the patched forward (no .item(), no
    data-dependent branches; settings are Python constants, so changing them recompiles) with
    the compiled ops. Not covered: backend="reference" (its input checks read tensor values)
    and selection="random" (a torch.Generator is created in the forward).
    """

    num_prop: int | tuple[int, ...] = 8
    sparsity: float = 0.6
    alpha: float = 0.1
    num_neighbours: int = 8
    graph: str = "mixed"
    selection: str = "mixed_max"
    propagation: str = "graph"
    token_scale: bool = True
    backend: str = "auto"
    seed: int = 0
    track_sources: bool = False
    last_sources: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    last_propagated_at: torch.Tensor | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    def per_block(self, depth: int) -> list[int]:
        """num_prop as one int per block (validated against `depth`)."""
        return schedule.expand(self.num_prop, depth)

    def validate(self, model: Any | None = None) -> None:
        """Raise ValueError / TypeError naming the bad setting (and the block where it matters)."""
        p = self.num_prop
        if isinstance(p, bool) or not isinstance(p, (numbers.Integral, list, tuple)):
            raise TypeError(f"{_NAME}: num_prop must be an int or a list of ints, got {p!r}")
        if schedule.is_inflected(p):
            schedule.inflected(p[0], p[1], 2)  # checks r and inflect
            values = []
        else:
            values = [p] if isinstance(p, numbers.Integral) else list(p)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(
                    f"{_NAME}: num_prop must be >= 0 (ints), got {p!r} (ToMe's (r, inflect) "
                    "form takes a float inflect, e.g. (8, -1.0))"
                )
        s = self.sparsity
        if not isinstance(s, (int, float)) or not (0.0 < float(s) <= 1.0):  # rejects NaN
            raise ValueError(f"{_NAME}: sparsity (theta) must be in (0, 1], got {s!r}")
        a = self.alpha
        if not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise ValueError(f"{_NAME}: alpha must be a finite number >= 0, got {a!r}")
        k = self.num_neighbours
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{_NAME}: num_neighbours must be an int >= 0, got {k!r}")
        if self.graph not in GRAPHS:
            raise ValueError(f"{_NAME}: graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"{_NAME}: selection must be one of {SELECTIONS}, got {self.selection!r}"
            )
        if self.propagation not in PROPAGATIONS:
            raise ValueError(
                f"{_NAME}: propagation must be one of {PROPAGATIONS}, got {self.propagation!r}"
            )
        if self.backend not in ops.BACKENDS:
            raise ValueError(
                f"{_NAME}: backend must be one of {ops.BACKENDS}, got {self.backend!r}"
            )
        for name in ("token_scale", "track_sources"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"{_NAME}: {name} must be True or False, got {getattr(self, name)!r}"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"{_NAME}: seed must be an int, got {self.seed!r}")
        if model is None:
            return
        depth = len(model.blocks)
        if not isinstance(p, numbers.Integral) and not schedule.is_inflected(p) and len(p) != depth:
            raise ValueError(
                f"{_NAME}: num_prop has {len(p)} entries but the model has {depth} blocks "
                "(give one int per block, a single int, or (r, inflect) with a float inflect)"
            )
        if self.selection.startswith("cls_") and not getattr(model, "has_class_token", False):
            raise ValueError(
                f"{_NAME}: selection {self.selection!r} needs a class token, and this model "
                "has none (class_token=False); use e.g. 'mixed_max'"
            )


def _check_model(model: Any) -> None:
    """Patch-time checks of what the GTP forward supports."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"{_NAME}: expected a timm VisionTransformer (timm.models.vision_transformer), "
            f"got {type(model).__name__}"
        )
    pool = model.global_pool
    if getattr(model, "attn_pool", None) is not None or pool not in POOLS:
        raise ValueError(
            f"{_NAME}: global_pool={pool!r} is not supported (attention pooling 'map'/'prr' "
            f"runs attention over the tokens GTP removed); supported: {POOLS}"
        )
    for i, blk in enumerate(model.blocks):
        # Subclasses that only change __init__ are fine; a different forward is not ours to run.
        if not isinstance(blk, Block) or type(blk).forward is not Block.forward:
            raise TypeError(
                f"{_NAME}: block {i} is a {type(blk).__name__}; only timm's pre-norm "
                "vision_transformer.Block is supported (not ResPostBlock, "
                "ParallelScalingBlock, ...)"
            )
        if not isinstance(blk.attn, Attention) or type(blk.attn).forward is not Attention.forward:
            raise TypeError(
                f"{_NAME}: block {i} attention is a {type(blk.attn).__name__}; only "
                "timm.layers.Attention is supported"
            )


class _GTPMixin:
    """Methods of the patched class (put in front of the timm class in the MRO)."""

    gtp: GTPSettings

    def forward_features(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError(f"{_NAME}: attn_mask / is_causal are not supported by GTP")
        cfg = self.gtp
        cfg.validate(self)
        if torch.compiler.is_exporting():  # what torch.export cannot capture, said clearly
            from gtp_kernels.export._checks import check_exportable

            check_exportable(cfg, x.device)
        img_hw = (x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)
        grid = _grid_size(self.patch_embed, x, img_hw)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = gtp_blocks(self.blocks, x, self.num_prefix_tokens, grid, cfg)
        return self.norm(x)

    def __reduce_ex__(self, protocol: int) -> Any:
        # The patched class is made at run time, so pickle (torch.save(model), deepcopy) names
        # the timm class instead and re-creates the patched class when loading.
        return (_new_patched, (self._gtp_base_class,), self.__dict__.copy())


def _new_patched(base: type) -> Any:
    cls = _patched_class(base)
    return cls.__new__(cls)


def _grid_size(patch_embed: Any, x: torch.Tensor, img_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the patch grid: from the NHWC feature map (dynamic_img_size), else from the
    input size (non-square and non-strict inputs), else the patch embed's configured grid."""
    if x.dim() == 4:
        return int(x.shape[1]), int(x.shape[2])
    if hasattr(patch_embed, "dynamic_feat_size") and getattr(patch_embed, "patch_size", None):
        h, w = patch_embed.dynamic_feat_size(img_hw)
        if h * w == x.shape[1]:
            return int(h), int(w)
    h, w = patch_embed.grid_size
    return int(h), int(w)


def gtp_blocks(
    blocks: Any, x: torch.Tensor, num_prefix: int, grid: tuple[int, int], cfg: GTPSettings
) -> torch.Tensor:
    """Run the timm blocks with GTP. x: (B, N, C) embedded tokens (prefix first, then the
    h x w image tokens in row-major order). Returns (B, N - sum P (+ 1 per 'mean' block), C)."""
    B, N, _ = x.shape
    M = num_prefix
    n = N - M
    h, w = grid
    if h * w != n:
        raise ValueError(
            f"{_NAME}: {n} image tokens do not form the {h} x {w} patch grid (patch dropout "
            "in training mode, or an unsupported patch embedding?)"
        )
    props = cfg.per_block(len(blocks))
    active = any(p > 0 for p in props)
    state = _State()
    if active:
        K = cfg.num_neighbours
        if cfg.graph != "spatial" and K > n - 1:
            raise ValueError(
                f"{_NAME}: num_neighbours={K} is larger than the {n} image tokens allow "
                f"(at most {n - 1})"
            )
        # K means nothing to the spatial graph (width 8); pass 0 so no K limit applies there.
        k_graph = 0 if cfg.graph == "spatial" else K
        state.index, state.weight = ops.build_graph(
            x[:, M:], h, w, k_graph, cfg.graph, backend=cfg.backend
        )
        if cfg.selection == "random":
            state.generator = torch.Generator(device=x.device)
            state.generator.manual_seed(cfg.seed)
    if cfg.token_scale:
        state.sizes = torch.ones(B, N, dtype=torch.float32, device=x.device)
    if cfg.track_sources:
        eye = torch.eye(n, dtype=torch.float32, device=x.device)
        state.sources = eye.expand(B, n, n).contiguous()
        state.origin = torch.arange(n, device=x.device).expand(B, n)
        state.propagated_at = torch.full((B, n), -1, dtype=torch.int64, device=x.device)
    for i, blk in enumerate(blocks):
        x = gtp_block(blk, x, state, cfg, props[i], M, i)
    cfg.last_sources = state.sources if cfg.track_sources else None
    cfg.last_propagated_at = state.propagated_at if cfg.track_sources else None
    return x


class _State:
    """Per-forward state carried from block to block."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # (B, n, W) int32 graph in current positions
        self.weight: torch.Tensor | None = None  # (B, n, W) float32
        self.sizes: torch.Tensor | None = None  # (B, N) float32 when token_scale
        self.sources: torch.Tensor | None = None  # (B, n, n0) float32 when track_sources
        self.origin: torch.Tensor | None = None  # (B, n) int64 original patch, -1: 'mean' token
        self.propagated_at: torch.Tensor | None = None  # (B, n0) int64 block, -1: still there
        self.generator: torch.Generator | None = None  # selection="random"


def gtp_block(
    blk: Any,
    x: torch.Tensor,
    state: _State,
    cfg: GTPSettings,
    num_prop: int,
    num_prefix: int,
    layer: int = 0,
) -> torch.Tensor:
    """One timm Block with GTP: attention via gtp ops, then select + propagate, then the MLP.

    x: (B, N, C). `state` holds the graph / sizes / sources in the current token positions and
    is updated in place. Returns (B, N - P, C) (N - P + 1 for propagation="mean").
    """
    B, N, _ = x.shape
    M = num_prefix
    n = N - M
    P = num_prop
    if P > n - 1:
        raise ValueError(
            f"{_NAME}: num_prop={P} at block {layer} is too large: only {n} image tokens are "
            f"left there (at most {n - 1} can be propagated)"
        )
    attn = blk.attn
    if attn.training and getattr(attn.attn_drop, "p", 0.0) > 0:
        raise ValueError(
            f"{_NAME}: block {layer} has attention dropout (attn_drop p="
            f"{attn.attn_drop.p:g}) in training mode, which the fused GTP attention cannot "
            "apply; finetune with attn_drop_rate=0 (e.g. set blk.attn.attn_drop.p = 0 in every "
            "block), or call model.eval() for inference"
        )
    y = blk.norm1(x)
    gate = attn.gate(y).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    score_kind = cfg.selection if P > 0 and cfg.selection != "random" else "none"
    log_sizes = state.sizes.log() if state.sizes is not None else None
    out, score = ops.attention(
        q, k, v, log_sizes, attn.scale, float(cfg.sparsity), M, score_kind, backend=cfg.backend
    )
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    x = x + blk.drop_path1(blk.ls1(out))
    if P > 0:
        x = _propagate(x, score, state, cfg, P, M, layer)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _propagate(
    x: torch.Tensor,
    score: torch.Tensor,
    state: _State,
    cfg: GTPSettings,
    P: int,
    M: int,
    layer: int = 0,
) -> torch.Tensor:
    B, N, C = x.shape
    n = N - M
    if cfg.selection == "random":
        score = torch.rand(B, n, generator=state.generator, device=x.device)
    keep, prop = ops.select_tokens(score, P, backend=cfg.backend)
    alpha = float(cfg.alpha) if cfg.propagation == "graph" else 0.0
    index, weight = state.index, state.weight
    sources = state.sources  # (B, n, n0), rows in the current image-token positions
    if sources is not None:
        state.sources = ops.propagate(
            sources, index, weight, keep, alpha, 0, None, backend=cfg.backend
        )[0]
        _track_origins(state, keep, prop, layer)
    x_out, sizes_out, index_out, weight_out = ops.propagate(
        x, index, weight, keep, alpha, M, state.sizes, backend=cfg.backend
    )
    if cfg.propagation == "mean":
        # One extra image token: the mean of the pruned tokens, size = their total size,
        # with an empty graph row (nothing links to it, it links to nothing).
        x_p = x[:, M:].gather(1, prop[:, :, None].expand(B, P, C))
        x_out = torch.cat([x_out, x_p.mean(dim=1, keepdim=True)], dim=1)
        if state.sizes is not None:
            s_p = state.sizes[:, M:].gather(1, prop).sum(dim=1, keepdim=True)
            sizes_out = torch.cat([sizes_out, s_p], dim=1)
        if sources is not None:
            src_p = sources.gather(1, prop[:, :, None].expand(B, P, sources.shape[2]))
            state.sources = torch.cat([state.sources, src_p.mean(dim=1, keepdim=True)], dim=1)
            state.origin = torch.cat([state.origin, state.origin.new_full((B, 1), -1)], dim=1)
        W = index_out.shape[2]
        index_out = torch.cat([index_out, index_out.new_full((B, 1, W), -1)], dim=1)
        weight_out = torch.cat([weight_out, weight_out.new_zeros((B, 1, W))], dim=1)
    if state.sizes is not None:
        state.sizes = sizes_out
    state.index, state.weight = index_out, weight_out
    return x_out


def _track_origins(state: _State, keep: torch.Tensor, prop: torch.Tensor, layer: int) -> None:
    """Record `layer` for the original patches of the propagated tokens ('mean' tokens have
    none) and keep the origins of the survivors."""
    origin = state.origin.gather(1, prop)
    hits = torch.zeros_like(state.propagated_at)  # a count, so clamped -1s cannot collide
    hits.scatter_add_(1, origin.clamp(min=0), (origin >= 0).long())
    state.propagated_at = torch.where(hits > 0, layer, state.propagated_at)
    state.origin = state.origin.gather(1, keep)


_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"GTP{cls.__name__}", (_GTPMixin, cls), {"_gtp_base_class": cls})
    return _CLASSES[cls]


def is_patched(model: Any) -> bool:
    """Whether `model` is a GTP-patched timm model."""
    return isinstance(model, _GTPMixin)


def timm(
    model: Any,
    num_prop: int | list[int] | tuple[int, ...] | tuple[int, float] | None = None,
    sparsity: float = 0.6,
    alpha: float = 0.1,
    num_neighbours: int = 8,
    graph: str = "mixed",
    selection: str = "mixed_max",
    propagation: str = "graph",
    token_scale: bool = True,
    backend: str = "auto",
    seed: int = 0,
    track_sources: bool = False,
    gmacs_reduction: float | None = None,
) -> Any:
    """Apply GTP to a timm VisionTransformer in place and return it (settings in `model.gtp`,
    see GTPSettings). Patching an already patched model only replaces its settings.

    num_prop defaults to 8 in every block. Instead of num_prop, gmacs_reduction=0.26 asks for
    at least 26% fewer GMACs than the unpatched model at its configured input size:
    `model.gtp.num_prop` is then the per-block schedule of gtp_kernels.schedule.for_budget.

    Supported: timm VisionTransformer (and VisionTransformerDistilled) with pre-norm Blocks and
    timm Attention; with or without class token, register / distillation tokens, global_pool
    'token', 'avg', 'avgmax', 'max' or ''; LayerScale, q/k norm, scale norm, gated attention,
    drop path; dynamic image size and non-square inputs. Raises TypeError / ValueError
    otherwise (e.g. 'map' attention pooling, ResPostBlock, ParallelScalingBlock).
    """
    _check_model(model)
    if gmacs_reduction is not None:
        if num_prop is not None:
            raise ValueError(f"{_NAME}: give num_prop or gmacs_reduction, not both")
        num_prop = schedule.for_budget(model, gmacs_reduction, propagation=propagation)
    elif num_prop is None:
        num_prop = 8
    settings = GTPSettings(
        num_prop=tuple(num_prop) if isinstance(num_prop, (list, tuple)) else num_prop,
        sparsity=sparsity,
        alpha=alpha,
        num_neighbours=num_neighbours,
        graph=graph,
        selection=selection,
        propagation=propagation,
        token_scale=token_scale,
        backend=backend,
        seed=seed,
        track_sources=track_sources,
    )
    settings.validate(model)
    if not is_patched(model):
        model.__class__ = _patched_class(type(model))
    model.gtp = settings
    return model


def remove(model: Any) -> Any:
    """Undo `timm(model)`: restore the original class (and forward), drop `model.gtp`."""
    if is_patched(model):
        model.__class__ = model._gtp_base_class
        if "gtp" in model.__dict__:
            del model.__dict__["gtp"]
    return model
