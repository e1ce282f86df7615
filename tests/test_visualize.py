"""gtp_kernels.visualize: known cases drawn and checked pixel by pixel, the patch's record of
where each patch went, and gtp-vis end to end on an image the test writes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import gtp_kernels.patch as gp
from gtp_kernels import visualize as vis
from gtp_kernels._cli import CLIError

# A 64 x 64 image of 4 x 4 patches of 16 x 16 pixels, patch p a solid colour (p*10, 100, 200-p)
COLOUR = np.array([[p * 10, 100, 200 - p] for p in range(16)], dtype=np.uint8)
IMG = np.repeat(np.repeat(COLOUR.reshape(4, 4, 3), 16, axis=0), 16, axis=1)


def _centre(p: int) -> tuple[int, int]:
    return (p // 4) * 16 + 8, (p % 4) * 16 + 8


def test_groups_known_case():
    """Three tokens left: token 0 holds patches 0 (itself), 1 (0.5) and 4 (0.3); token 1 holds
    patch 5 and 0.2 of patch 1 (token 0 holds more of it); token 2 holds patch 15 alone.
    Every other patch is held by nobody."""
    s = torch.zeros(3, 16)
    s[0, [0, 1, 4]] = torch.tensor([1.0, 0.5, 0.3])
    s[1, [5, 1]] = torch.tensor([1.0, 0.2])
    s[2, 15] = 1.0
    assert vis.owners(s).tolist() == [0, 0, -1, -1, 0, 1] + [-1] * 9 + [2]
    colours = vis.group_colours(3)
    assert len({tuple(c) for c in colours}) == 3
    out = np.asarray(vis.make_visualization(Image.fromarray(IMG), s, (4, 4)))
    assert out.shape == IMG.shape
    mean0 = np.round(COLOUR[[0, 1, 4]].astype(float).mean(0)).astype(np.uint8)
    # inside a group: its mean colour; its outline (one pixel, 4-neighbourhood): its colour
    for p in (0, 1, 4):
        assert (out[_centre(p)] == mean0).all(), p
    assert (out[5, 20] == mean0).all()  # patch 1 next to patch 0: the same group, no edge
    assert (out[0, 0] == colours[0]).all()  # the image border
    assert (out[8, 31] == colours[0]).all()  # patch 1's right edge, next to patch 2 (nobody)
    assert (out[16, 8] == mean0).all()  # patch 4 below patch 0: inside, no edge between
    assert (out[31, 8] == colours[0]).all()  # the bottom of patch 4, above patch 8 (nobody)
    assert (out[24, 15] == colours[0]).all()  # patch 4's right edge, next to patch 5
    assert (out[_centre(5)] == COLOUR[5]).all() and (out[16, 24] == colours[1]).all()
    assert (out[_centre(15)] == COLOUR[15]).all() and (out[63, 63] == colours[2]).all()
    # nobody's patches are black, edges included
    for p in (2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14):
        r, c = (p // 4) * 16, (p % 4) * 16
        assert (out[r : r + 16, c : c + 16] == 0).all(), p
    # the outline is exactly one pixel wide: group 0's pixels are mean0 or colour 0
    mask = np.zeros((64, 64), bool)
    mask[:16, :32] = mask[16:32, :16] = True
    edge = (out == colours[0]).all(-1)
    assert ((out[mask] == mean0).all(-1) | edge[mask]).all()
    # the L's outline: top row 32, left column 31 more, right column of the top part 14,
    # the step under it 16, the lower part's right column 15 and bottom row 15
    assert edge[mask].sum() == 32 + 31 + 14 + 16 + 15 + 15


def test_propagation_map_known_case():
    at = torch.full((16,), -1)
    at[[0, 5, 10]] = torch.tensor([0, 3, 11])
    out = np.asarray(vis.propagation_map(IMG, at, (4, 4), 12))
    colours = vis.block_colours(12)
    assert tuple(colours[0]) == (68, 1, 84) and tuple(colours[-1]) == (253, 231, 37)
    for p, block in ((0, 0), (5, 3), (10, 11)):
        r, c = (p // 4) * 16, (p % 4) * 16
        assert (out[r : r + 16, c : c + 16] == colours[block]).all(), p
    kept = [p for p in range(16) if p not in (0, 5, 10)]
    for p in kept:
        r, c = (p // 4) * 16, (p % 4) * 16
        assert (out[r : r + 16, c : c + 16] == IMG[r : r + 16, c : c + 16]).all(), p
    with pytest.raises(ValueError, match="block 12 >= depth 12"):
        vis.propagation_map(IMG, torch.full((16,), 12), (4, 4), 12)
    legend = np.asarray(vis.block_legend(12, 120))
    assert legend.shape == (14, 120, 3) and (legend[13, 0] == colours[0]).all()
    assert (legend[13, 119] == colours[11]).all()


def test_patch_records_where_every_patch_went():
    """track_sources also records the block of every propagated patch: with pruning
    (propagation 'none') each block removes P patches, and the remaining tokens' own patches
    are exactly those never removed."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=96).eval()
    gp.timm(model, num_prop=5, propagation="none", track_sources=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 96, 96))
    at, s = model.gtp.last_propagated_at, model.gtp.last_sources
    assert at.shape == (2, 36) and at.dtype == torch.int64
    for b in range(2):
        counts = torch.bincount(at[b] + 1, minlength=5).tolist()
        assert counts == [36 - 20, 5, 5, 5, 5]  # -1 (left at the end), then blocks 0..3
        left = set(torch.nonzero(at[b] < 0).flatten().tolist())
        assert left == set(s[b].argmax(dim=1).tolist())
    model.gtp.propagation = "mean"  # the mean tokens have no patch of their own
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 96))
    at = model.gtp.last_propagated_at[0]
    assert torch.bincount(at + 1, minlength=5).tolist() == [36 - 20, 5, 5, 5, 5]


def test_gtp_vis_end_to_end(tmp_path, capsys):
    """gtp-vis on an image file with a saved random deit_tiny (64 x 64 input): the PNG holds
    the preprocessed input, the groups and the block map, and they agree with the model's
    track_sources record."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(tmp_path / "in.jpg")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=4)
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    out = tmp_path / "vis.png"
    args = [str(tmp_path / "in.jpg"), "-m", "deit_tiny_patch16_224", "--img-size", "64",
            "--num-classes", "4", "--checkpoint", str(tmp_path / "ckpt.pth"),
            "--num-prop", "1", "--out", str(out)]  # fmt: skip
    drawn = vis.render(args)
    assert "4 of 16 image tokens left" in capsys.readouterr().out
    png = np.asarray(Image.open(out))
    m, t = vis.MARGIN, vis.TITLE
    assert png.shape == (m + t + 64 + m + 14 + m, m + 3 * (64 + m), 3)
    top = m + t
    panels = [png[top : top + 64, m + k * (64 + m) : m + k * (64 + m) + 64] for k in range(3)]
    assert (panels[0] == drawn["input"]).all()
    assert (panels[1] == np.asarray(drawn["groups"])).all()
    assert (panels[2] == np.asarray(drawn["blocks"])).all()
    # the input panel is timm's preprocessing of the file (resize 73 + centre crop 64), undone
    at = drawn["propagated_at"]
    assert (at >= 0).sum() == 12 and drawn["depth"] == 12
    kept = torch.nonzero(at < 0).flatten().tolist()
    for p in kept:  # a patch left at the end shows the input in the block map
        r, c = (p // 4) * 16, (p % 4) * 16
        assert (panels[2][r : r + 16, c : c + 16] == panels[0][r : r + 16, c : c + 16]).all()
    with pytest.raises(CLIError, match="cannot read image"):
        vis.render([str(tmp_path / "missing.png"), *args[1:]])
