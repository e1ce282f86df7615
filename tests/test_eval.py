"""gtp-eval on a small ImageFolder that the test writes: top-1 / top-5 against a hand loop,
the results file's columns, --checkpoint / --pretrained-path, --num-samples, AMP, torch.compile,
the errors a user meets, and torchrun with 2 CPU processes (gloo) giving 1 process's numbers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from helpers import single_thread
from PIL import Image

import gtp_kernels.patch as gp
from gtp_kernels import eval as gtp_eval
from gtp_kernels._cli import CLIError
from gtp_kernels._extension import has_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 7
SIZES = [(40, 56), (64, 64), (90, 70), (33, 100)]  # none of them the model's 64 x 64 crop
MODEL = "deit_tiny_patch16_224"
GRID = ["--num-prop", "0", "1", "--sparsity", "1", "0.6"]


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _model(num_classes: int = CLASSES) -> torch.nn.Module:
    """deit_tiny at 64 x 64 (16 patches), seeded, qkv x4 (peaked attention, as a trained model
    has: no top-theta ties that rounding could flip) and a larger head (distinct logits)."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, img_size=64, num_classes=num_classes).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ImageFolder of 7 classes x 4 images of several sizes (PNG and JPEG), plus one more image
    in class 0: 29 images, so 2 processes get 15 + 14. And the checkpoint of _model()."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = root / "val" / f"class{c}"
        folder.mkdir(parents=True)
        for i, (h, w) in enumerate(SIZES + ([(48, 48)] if c == 0 else [])):
            base = rng.integers(0, 256, (1, 1, 3))  # a per-image tint plus noise
            img = np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(img).save(folder / f"img{i}.{ext}")
    ckpt = root / "ckpt.pth"
    torch.save(_model().state_dict(), ckpt)
    return root, str(ckpt)


def _args(data, *extra: str) -> list[str]:
    root, ckpt = data
    return [str(root / "val"), "-m", MODEL, "--checkpoint", ckpt, "--num-classes", str(CLASSES),
            "--img-size", "64", "-j", "0", "--bench-rounds", "0", "--num-prop", "1",
            *extra]  # fmt: skip


def _hand_loop(data, settings: dict | None) -> tuple[int, int, int]:
    """(images, top-1 hits, top-5 hits), one image at a time, written without gtp_kernels.eval:
    timm's own transform of the model's pretrained config."""
    from timm.data import create_transform, resolve_model_data_config

    root, _ = data
    model = _model()
    if settings is not None:
        gp.timm(model, **settings)
    cfg = resolve_model_data_config(model, args={"img_size": 64}, use_test_size=True)
    transform = create_transform(**cfg, is_training=False)
    n = top1 = top5 = 0
    names = sorted(os.listdir(root / "val"))
    with torch.no_grad():
        for label, name in enumerate(names):
            for file in sorted(os.listdir(root / "val" / name)):
                img = Image.open(root / "val" / name / file).convert("RGB")
                logits = model(transform(img)[None])[0]
                best = logits.topk(5).indices.tolist()
                n += 1
                top1 += best[0] == label
                top5 += label in best
    return n, top1, top5


needs_kernels = pytest.mark.skipif(not has_kernel("attention", "CPU"), reason="no CPU kernels")


def test_counts_match_a_hand_loop_and_csv_columns(data, tmp_path):
    out = tmp_path / "results.csv"
    rows = gtp_eval.evaluate(
        _args(data, "-b", "3", *GRID, "--gmacs-reduction", "0.2", "--results-file", str(out))
    )
    assert len(rows) == 1 + 4 + 2  # unpatched, the 2 x 2 grid, the budget x 2 sparsities
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == gtp_eval.COLUMNS
        written = list(reader)
    assert len(written) == len(rows)
    assert written[0]["num_prop"] == "" and written[0]["gmacs_reduction"] == ""  # unpatched
    for row, line in zip(rows, written, strict=True):
        assert line["model"] == MODEL and line["img_size"] == "64"
        assert line["interpolation"] == "bicubic" and float(line["crop_pct"]) == 0.9
        assert float(line["top1"]) == row["top1"] and float(line["gmacs"]) == row["gmacs"]
        assert float(row["top1_err"]) == pytest.approx(100 - row["top1"])
        assert line["images_per_sec"] == ""  # --bench-rounds 0: not timed
    expected = [None] + [
        dict(num_prop=p, sparsity=s) for p in (0, 1) for s in (1.0, 0.6)
    ]  # the hand loop's settings, in the grid's order
    for row, settings in zip(rows, expected, strict=False):
        n, t1, t5 = _hand_loop(data, settings)
        assert row["num_images"] == n == 29
        assert row["top1"] == round(100 * t1 / n, 4), (settings, row)
        assert row["top5"] == round(100 * t5 / n, 4), (settings, row)
    assert len({r["top1"] for r in rows}) > 1  # the settings do change predictions
    # GMACs: P = 0 is the model's; P = 1 fewer; the budget meets 20% and its schedule is listed
    assert rows[1]["gmacs"] == rows[0]["gmacs"] > rows[3]["gmacs"]
    budget = rows[5]
    assert budget["gmacs_reduction"] == 0.2 and "," in budget["num_prop"]
    assert budget["gmacs"] <= 0.8 * rows[0]["gmacs"] + 1e-3


def test_pretrained_path_num_samples_amp_compile(data, tmp_path):
    """--pretrained-path loads a local file through timm's pretrained path (1000 classes, so
    timm keeps the head): the same numbers as --checkpoint of that file. --num-samples takes
    every (29 / 7)-th image: one per class here. AMP bfloat16, channels-last and
    torch.compile (eager backend) run the same grid."""
    root, _ = data
    ckpt = tmp_path / "in1k.pth"
    torch.save(_model(1000).state_dict(), ckpt)
    common = [str(root / "val"), "-m", MODEL, "--img-size", "64", "-j", "0", "-b", "8",
              "--bench-rounds", "0", "--num-prop", "1", "--num-samples", "7"]  # fmt: skip
    by_ckpt = gtp_eval.evaluate([*common, "--checkpoint", str(ckpt)])
    by_path = gtp_eval.evaluate([*common, "--pretrained-path", str(ckpt)])
    assert by_ckpt == by_path
    assert [r["num_images"] for r in by_ckpt] == [7, 7]
    fast = gtp_eval.evaluate(
        [
            *common,
            "--checkpoint",
            str(ckpt),
            "--amp",
            "--amp-dtype",
            "bfloat16",
            "--channels-last",
            "--torchcompile",
            "eager",
            "--bench-rounds",
            "1",
            "--bench-warmup",
            "0",
        ]  # fmt: skip
    )
    assert [r["num_images"] for r in fast] == [7, 7]
    assert all(r["images_per_sec"] > 0 for r in fast)
    assert [r["gmacs"] for r in fast] == [r["gmacs"] for r in by_ckpt]


def _error(argv) -> str:
    with pytest.raises(CLIError) as info:
        gtp_eval.evaluate(argv)
    return str(info.value)


def test_clear_errors(data, tmp_path):
    root, ckpt = data
    args = _args(data)
    missing = [str(tmp_path / "nowhere"), *args[1:]]
    assert "data dir" in _error(missing) and "does not exist" in _error(missing)
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    (tmp_path / "empty" / "class0" / "notes.txt").write_text("not an image")
    msg = _error([str(tmp_path / "empty"), *args[1:]])
    assert "no images in" in msg and "ImageFolder" in msg and ".png" in msg
    assert "unknown model 'deit_tinyy'" in _error([args[0], "-m", "deit_tinyy", *args[3:]])
    msg = _error([args[0], "-m", "resnet18", *args[3:]])
    assert "model resnet18 is not supported by GTP" in msg and "VisionTransformer" in msg
    msg = _error([args[0], "-m", "vit_base_patch16_siglip_224", *args[3:]])
    assert "not supported by GTP" in msg and "global_pool='map'" in msg
    # a checkpoint that does not fit: 7 classes in the file, 1000 in the model built without
    # --num-classes; the message says which keys and what to pass
    no_classes = [a for a in args if a not in ("--num-classes", str(CLASSES))]
    msg = _error(no_classes)
    assert "does not fit deit_tiny_patch16_224" in msg
    assert "head.weight: checkpoint (7, 192), model (1000, 192)" in msg
    assert "pass --num-classes 7" in msg
    msg = _error([*args, "--checkpoint", str(tmp_path / "no.pth")])
    assert "no such file" in msg
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "cannot read a state dict" in _error([*args, "--checkpoint", str(tmp_path / "junk.pth")])
    # the data has more classes than the model (a pretrained file adapted to 5 classes)
    msg = _error([*no_classes[:3], "--pretrained-path", ckpt, "--num-classes", "5",
                  *no_classes[5:]])  # fmt: skip
    assert "the data has 7 classes but the model 5" in msg
    # settings: checked before any image is read
    assert "sparsity" in _error([*args, "--sparsity", "1.5"])
    msg = _error([*args, "--num-prop", "2"])  # 16 patches, 12 blocks
    assert "num_prop 2 does not fit 64 x 64 inputs" in msg and "block 7" in msg
    assert "cannot be met" in _error([*args, "--gmacs-reduction", "0.9"])
    with pytest.raises(SystemExit):  # argparse: a malformed --num-prop
        gtp_eval.evaluate([*args, "--num-prop", "8,x"])


def test_pretrained_offline_says_what_to_do(data, monkeypatch, tmp_path):
    """--pretrained without a network (the Hub in offline mode, an empty cache): the real
    download path runs up to the Hub and fails with a message that says what to do."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root, _ = data
    msg = _error(
        [str(root / "val"), "-m", MODEL, "--pretrained", "--img-size", "64", "--num-prop", "1"]
    )
    assert "could not load the pretrained weights of deit_tiny_patch16_224" in msg
    assert "timm/deit_tiny_patch16_224" in msg and "Offline?" in msg
    assert "--pretrained-path FILE" in msg


def _cli(*args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@needs_kernels
def test_torchrun_two_processes_give_the_same_numbers(data, tmp_path):
    """`python -m gtp_kernels.eval` in 1 process and under torchrun in 2 (gloo): identical rows,
    29 images counted once each (no padding duplicates), one table and one file (rank 0)."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = _args(data, "-b", "4", *GRID, "--results-format", "json")
    single = _cli("-m", "gtp_kernels.eval", *args, "--results-file", str(one))
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    multi = _cli(*run, "-m", "gtp_kernels.eval", *args, "--results-file", str(two))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a == b
    assert [r["num_images"] for r in a] == [29] * 5
    assert multi.stdout.count("| num_prop |") == 1 == single.stdout.count("| num_prop |")
