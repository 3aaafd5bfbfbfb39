"""Shared fixtures: tiny learnable data sets written in the test's tmp dir, and repo paths."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"
sys.path.insert(0, str(ROOT))


def write_idx(folder: Path, part: str, images: np.ndarray, labels: np.ndarray, gz=False) -> None:
    """Write an IDX image/label pair (`part` is 'train' or 't10k')."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    img = struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()
    lab = struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()
    op = gzip.open if gz else open
    ext = ".gz" if gz else ""
    with op(folder / f"{part}-images-idx3-ubyte{ext}", "wb") as f:
        f.write(img)
    with op(folder / f"{part}-labels-idx1-ubyte{ext}", "wb") as f:
        f.write(lab)


def make_patterns(n: int, classes: int = 3, size: int = 16, seed: int = 0):
    """Noisy images whose class is a bright horizontal bar at a class-specific height."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, size, size)).astype(np.int32)
    band = size // classes
    for i, c in enumerate(y):
        x[i, c * band : c * band + max(1, band // 2), 2:-2] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.uint8)


@pytest.fixture
def tiny_idx(tmp_path: Path) -> Path:
    """An IDX data set: 120 train + 30 test images, 16x16, 3 classes."""
    root = tmp_path / "tiny"
    x, y = make_patterns(150)
    write_idx(root, "train", x[:120], y[:120])
    write_idx(root, "t10k", x[120:], y[120:])
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch) -> None:
    """Keep the decoded-tensor cache inside the test's tmp dir."""
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))


def combine_heads(lm, lg, la):
    """The 3-head joint written out, as a reference for models.joint_log_probs: 18-class
    log-probs log p(mask) + log p(gender) + log p(age) at column mask * 6 + gender * 3 + age."""
    import torch.nn.functional as F

    lm, lg, la = (F.log_softmax(z.float(), 1) for z in (lm, lg, la))
    return (lm[:, :, None, None] + lg[:, None, :, None] + la[:, None, None, :]).flatten(1)
