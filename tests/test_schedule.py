"""gtp_kernels.schedule: ToMe's (r, inflect) form and the GMAC budget (gmacs_reduction)."""

from __future__ import annotations

import pytest
import timm
import torch

import gtp_kernels.patch as gp
from gtp_kernels import schedule
from gtp_kernels.cost import gmacs, token_counts


def _meta(name: str, **kw):
    with torch.device("meta"):  # shapes only
        return timm.create_model(name, **kw)


def test_inflected_as_tome():
    # ToMe's parse_r: lo = int(r (1 - inflect)), hi = 2 r - lo, linear, rounded down
    assert schedule.inflected(8, 0.0, 12) == [8] * 12
    assert schedule.inflected(8, -1.0, 12) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert schedule.inflected(8, 1.0, 12) == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]
    assert schedule.inflected(4, -0.5, 5) == [6, 5, 4, 3, 2]
    assert schedule.inflected(3, 0.5, 1) == [3]
    with pytest.raises(ValueError, match=r"inflect .* must be in \[-1, 1\]"):
        schedule.inflected(8, 1.5, 12)
    with pytest.raises(ValueError, match="r of"):
        schedule.inflected(-1, 0.0, 12)


def test_forms_of_num_prop():
    assert schedule.expand(3, 4) == [3, 3, 3, 3]
    assert schedule.expand([1, 2], 2) == [1, 2]  # two ints: a per-block list
    assert schedule.expand((8, -1.0), 3) == [16, 8, 0]  # an int and a float: (r, inflect)
    assert schedule.is_inflected((8, 0.0)) and not schedule.is_inflected((8, 0))


def test_patch_and_cost_take_the_inflected_form():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=96).eval()
    gp.timm(model, num_prop=(4, -1.0))
    assert model.gtp.per_block(4) == [8, 5, 2, 0]
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 96, 96)).shape[1] == 37 - 15
    assert token_counts(model)[-1] == (22, 22)
    assert gmacs(model) == gmacs(model, num_prop=[8, 5, 2, 0])
    with pytest.raises(ValueError, match=r"float inflect, e.g. \(8, -1.0\)"):
        gp.timm(model, num_prop=(8, -1))  # an int inflect is a per-block list: -1 is invalid
    with pytest.raises(ValueError, match="inflect"):
        gp.timm(model, num_prop=(8, 2.0))


@pytest.mark.parametrize(
    "name, reduction, lo, hi",
    [
        ("deit_small_patch16_224", 0.26, 3.40, 3.42),  # the paper's DeiT-S budget
        ("deit_base_patch16_224", 0.254, 13.0, 13.11),  # P = 8: 13.10
    ],
)
def test_budget(name, reduction, lo, hi):
    model = _meta(name)
    props = schedule.for_budget(model, reduction)
    base = gmacs(model)
    g = gmacs(model, num_prop=props)
    assert lo <= g <= hi
    assert g <= (1 - reduction) * base  # the budget is met ...
    # ... by the closest schedule: one token fewer (taken off the first block that has the
    # most) no longer meets it
    fewer = list(props)
    fewer[fewer.index(max(fewer))] -= 1
    assert gmacs(model, num_prop=fewer) > (1 - reduction) * base
    assert max(props) - min(props) <= 1  # near-constant


def test_budget_edges():
    model = _meta("deit_small_patch16_224", depth=4)
    assert schedule.for_budget(model, 0.0) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"gmacs_reduction must be in \[0, 1\)"):
        schedule.for_budget(model, 1.0)
    with pytest.raises(ValueError, match="cannot be met: this model saves at most"):
        schedule.for_budget(model, 0.95)
    # a smaller input: fewer tokens, another schedule; 'mean' keeps one token more per block
    small = schedule.for_budget(model, 0.3, img_size=96)
    assert sum(small) < sum(schedule.for_budget(model, 0.3))
    g = gmacs(model, img_size=96, num_prop=small)
    assert g <= 0.7 * gmacs(model, img_size=96)
    mean = schedule.for_budget(model, 0.3, propagation="mean")
    assert sum(mean) >= sum(schedule.for_budget(model, 0.3))


def test_patch_with_gmacs_reduction():
    model = _meta("deit_small_patch16_224")
    gp.timm(model, gmacs_reduction=0.26)
    assert list(model.gtp.num_prop) == schedule.for_budget(model, 0.26)
    assert 3.40 <= gmacs(model) <= 3.42
    with pytest.raises(ValueError, match="num_prop or gmacs_reduction, not both"):
        gp.timm(model, num_prop=8, gmacs_reduction=0.2)
    gp.timm(model)  # the default stays P = 8
    assert model.gtp.num_prop == 8


def test_readme_table_is_what_the_code_gives():
    """The README's budget table (DeiT-S/B) is the output of `python -m gtp_kernels.schedule`
    for the reductions it lists."""
    import os

    readme = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
    with open(readme) as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("| deit_")]
    rows = [ln for ln in lines if ln.count("|") == 6 and "%" in ln]
    assert rows, "no budget table in README.md"
    reductions = sorted({float(r.split("|")[2]) for r in rows})
    models = list(dict.fromkeys(r.split("|")[1].strip() for r in rows))
    assert models == ["deit_small_patch16_224", "deit_base_patch16_224"]
    table = schedule.budget_table(models, reductions).splitlines()[2:]
    assert rows == table
