"""Benchmark data.py: Fashion-MNIST decode (cold vs cached) and batched augmentation throughput
against a per-sample torchvision transforms + DataLoader pipeline.

    python benchmarks/bench_data.py [--data ../shared/data/fashion-mnist] [--images 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from common import UserError, cli_errors, parse_args  # noqa: E402

FASHION = Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist"


class _PilSet(torch.utils.data.Dataset):
    """Per-sample baseline: uint8 array -> PIL image -> torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def bench_decode(path: str) -> dict:
    """Seconds to decode the train part without cache, to fill the cache, and to read it back."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ds = data.load_images(path, opts=data.Opts(quiet=True, cache=False))
        cold = time.perf_counter() - t
        t = time.perf_counter()
        data.load_images(path, opts=data.Opts(quiet=True, cache_dir=tmp))
        fill = time.perf_counter() - t
        t = time.perf_counter()
        hit = data.load_images(path, opts=data.Opts(quiet=True, cache_dir=tmp))
        cached = time.perf_counter() - t
        assert hit.info["cached"] and torch.equal(hit.images, ds.images)
    return {"n": len(ds), "cold": cold, "fill": fill, "cached": cached, "set": ds}


def bench_batched(ds: data.ImageSet, n: int, batch_size: int, device: str, aug) -> float:
    """Images/s of normalize + augment_batch on `device` over n images (data already there)."""
    images = ds.images[:n].to(device)
    mean, std = data.mean_std(ds.images)
    g = torch.Generator().manual_seed(0)
    for idx in data.batch_indices(len(images), batch_size, True, g)[:2]:  # warm-up
        data.augment_batch(data.normalize(images[idx.to(device)], mean, std), aug, g)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for idx in data.batch_indices(len(images), batch_size, True, g):
        x = data.augment_batch(data.normalize(images[idx.to(device)], mean, std), aug, g)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    del x
    return len(images) / (time.perf_counter() - t)


def bench_torchvision(ds: data.ImageSet, n: int, batch_size: int, device: str, workers: int):
    """Images/s of RandomHorizontalFlip + RandomCrop(pad 2) + ToTensor + Normalize per sample."""
    from torchvision import transforms as T

    mean, std = data.mean_std(ds.images)
    h = ds.images.shape[-1]
    tf = T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomCrop(h, padding=2, padding_mode="reflect"),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    imgs = ds.images[:n, 0].numpy()
    loader = torch.utils.data.DataLoader(
        _PilSet(imgs, ds.labels[:n].numpy(), tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=False,
    )
    t = time.perf_counter()
    for x, _ in loader:
        x = x.to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", default=str(FASHION), help="IDX data set (Fashion-MNIST)")
    p.add_argument("--images", type=int, default=20000, help="images per augmentation run")
    p.add_argument("--batch-size", type=int, default=256, help="batch size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    p.add_argument("--aug", default="flip,crop", help="batched augmentations")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device"
    )
    with cli_errors("bench_data.py"):
        a = parse_args(p, argv)
        if not Path(a.data).exists():
            raise UserError(f"{a.data}: not found; pass --data pointing at Fashion-MNIST")
        d = bench_decode(a.data)
        print(
            f"decode {d['n']} images: cold {d['cold']:.2f} s ({d['n'] / d['cold']:,.0f} img/s), "
            f"cold + cache write {d['fill']:.2f} s, cached {d['cached']:.3f} s "
            f"({d['cold'] / d['cached']:.0f}x faster)"
        )
        ds = d["set"]
        n = min(a.images, len(ds))
        fast = bench_batched(ds, n, a.batch_size, a.device, a.aug)
        slow = bench_torchvision(ds, n, a.batch_size, a.device, a.workers)
        print(
            f"augment {n} images on {a.device} (threads {torch.get_num_threads()}): batched "
            f"{fast:,.0f} img/s vs torchvision per-sample + DataLoader({a.workers} workers) "
            f"{slow:,.0f} img/s -> {fast / slow:.1f}x"
        )


if __name__ == "__main__":
    main()
