"""The dirty-MNIST multi-label preset (configs/dirty.yaml) learns on tiny data made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import infer
import models
import train
from common import parse_args

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "dirty.yaml"
CLASSES = ["plus", "ring", "diag", "ell"]


def _shapes() -> list[np.ndarray]:
    """Four 5x5 marks that stay distinct under 90-degree turns."""
    plus, ring, diag, ell = (np.zeros((5, 5), np.int32) for _ in range(4))
    plus[2, :] = plus[:, 2] = 1
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = 1
    np.fill_diagonal(diag, 1)
    ell[:, 0] = ell[-1, :] = 1
    return [plus, ring, diag, ell]


def make_dirty(n: int, size: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise canvases with 1-2 distinct marks, each turned by k*90 degrees, at random places."""
    rng = np.random.default_rng(seed)
    shapes = _shapes()
    x = rng.integers(0, 110, (n, size, size)).astype(np.int32)
    y = np.zeros((n, len(shapes)), np.int64)
    for i in range(n):
        for k in rng.choice(len(shapes), int(rng.integers(1, 3)), replace=False):
            mark = np.rot90(shapes[k], int(rng.integers(4)))
            r, c = rng.integers(0, size - 5 + 1, 2)
            x[i, r : r + 5, c : c + 5] += 150 * mark
            y[i, k] = 1
    return np.clip(x, 0, 255).astype(np.uint8), y


def write_csv_set(root: Path, name: str, x: np.ndarray, y: np.ndarray) -> None:
    """PNGs plus `<name>.csv` with a path column and one 0/1 column per class (multi-label)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, lab) in enumerate(zip(x, y)):
        rel = f"img/{name}_{i:04d}.png"
        Image.fromarray(im).save(root / rel)
        rows.append([rel, *lab.tolist()])
    pd.DataFrame(rows, columns=["path", *CLASSES]).to_csv(root / f"{name}.csv", index=False)


def per_label_f1(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """F1 of each label column (0 where a label is never predicted nor present)."""
    tp = (pred * truth).sum(0)
    denom = pred.sum(0) + truth.sum(0)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def test_per_label_f1_by_hand():
    truth = np.array([[1, 0], [1, 1], [0, 0]])
    pred = np.array([[1, 1], [0, 1], [0, 0]])
    # label 0: tp 1, fp 0, fn 1 -> 2/3; label 1: tp 1, fp 1, fn 0 -> 2/3
    assert np.allclose(per_label_f1(pred, truth), [2 / 3, 2 / 3])
    assert np.allclose(per_label_f1(np.zeros_like(truth), truth), [0, 0])


def test_preset_keys_are_train_flags():
    """Every preset key is a train.py flag and the values pass its flag types."""
    args = parse_args(train.build_parser(), ["--config", str(PRESET), "--data", "x"])
    assert args.aug == "rot90" and args.loss == "bce" and args.opt == "adamw"
    assert args.img_size == 41 and args.smoothing == 0
    # the command line still wins over the preset
    argv = ["--config", str(PRESET), "--data", "x", "--epochs", "2"]
    assert parse_args(train.build_parser(), argv).epochs == 2


def test_gpu_preset_is_the_seed_recipe_and_builds():
    """configs/dirty_gpu.yaml: the seed's settings, read through train.py's flag types; the timm
    model builds with 1 input channel and 26 outputs (at a small size, on the CPU)."""
    args = parse_args(
        train.build_parser(), ["--config", str(ROOT / "configs" / "dirty_gpu.yaml"), "--data", "x"]
    )
    assert (args.model, args.in_chans, args.img_size) == ("tf_efficientnetv2_s", 1, 384)
    assert (args.drop, args.drop_path, args.opt, args.lr) == (0.5, 0.2, "adam", 0.001)
    assert args.sched == "cosine" and args.lr * args.min_lr_ratio == pytest.approx(1e-5)
    assert args.grad_checkpointing and args.loss == "bce" and args.aug == "rot90"
    m = models.create_model(args.model, 26, in_chans=1, img_size=64).eval()
    with torch.no_grad():
        assert m(torch.zeros(2, 1, 64, 64)).shape == (2, 26)


def test_preset_beats_all_absent_baseline(tmp_path: Path):
    """The preset (shortened, native size) learns tiny 4-label data well past predicting absence."""
    x, y = make_dirty(360, seed=0)
    root = tmp_path / "dirty"
    write_csv_set(root, "train", x[:300], y[:300])
    write_csv_set(root, "test", x[300:], y[300:])
    runs = tmp_path / "runs"
    train.main(
        ["--config", str(PRESET), "--data", str(root), "--out", str(runs), "--name", "d"]
        + ["--img-size", "20", "--epochs", "12", "--batch-size", "32", "--val-ratio", "0.1"]
        + ["--warmup-epochs", "0.5", "--random-seed", "0", "--threads", "1", "--quiet"]
    )
    sub = tmp_path / "sub.csv"
    infer.main(
        [str(runs / "d" / "best.pt"), "--data", str(root), "--split", "test"]
        + ["--out", str(sub), "--tta", "rot90", "--quiet"]
    )
    got = pd.read_csv(sub)
    truth = pd.read_csv(root / "test.csv")
    assert list(got.columns[1:]) == CLASSES and len(got) == len(truth) == 60
    pred, true = got[CLASSES].to_numpy(), truth[CLASSES].to_numpy()
    f1 = per_label_f1(pred, true).mean()
    base_f1 = per_label_f1(np.zeros_like(true), true).mean()  # all-absent: 0 for every label
    exact = (pred == true).all(1).mean()
    base_exact = (true == 0).all(1).mean()  # every image here holds a mark, so 0
    assert base_f1 == 0 and base_exact == 0
    assert f1 >= base_f1 + 0.6, f"mean per-label F1 {f1:.3f}"
    assert exact >= base_exact + 0.4, f"exact match {exact:.3f}"


@pytest.mark.parametrize("bad", ["epochs: 0\n", "aug: spin\n", "no-such-flag: 1\n"])
def test_bad_preset_is_one_line_exit_2(tmp_path: Path, capsys, bad: str):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(PRESET.read_text(encoding="utf-8") + bad, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(cfg), "--data", str(tmp_path), "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:"), err
