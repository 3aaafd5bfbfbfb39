"""Benchmark: soup.py --eval-individual --greedy against the bare forward passes it needs.

    python benchmarks/bench_soup.py [--n 8] [--arch smallnet_s] [--val-ratio 0.05] [--device auto]

Ingredients are N perturbed copies of one model, saved with models.save_checkpoint and recording
Fashion-MNIST's validation split (a synthetic IDX set when Fashion-MNIST is absent). N ingredient
scores plus N-1 greedy candidates need 2N-1 passes over the held-out set; the ratio printed is
soup.py's whole run (checks, data, loads, scoring, writing) over 2N-1 bare `model(x)` passes on
pre-normalised device tensors. Goal: <= 1.3.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import models  # noqa: E402
import soup  # noqa: E402
import train  # noqa: E402

FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"


def synthetic_idx(folder: Path, n: int = 20000) -> Path:
    """A 10-class 28x28 IDX set (a bright bar whose height is the class) when no real data."""
    import gzip
    import struct

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.int32)
    for c in range(10):
        x[y == c, 2 + 2 * c : 4 + 2 * c, 4:-4] += 180
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(
            struct.pack(">IIII", 2051, n, 28, 28) + np.clip(x, 0, 255).astype(np.uint8).tobytes()
        )
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + y.tobytes())
    return folder


def make_ingredients(root: Path, path: Path, args) -> tuple[list[Path], data.ImageSet]:
    """N perturbed copies of one model, with the meta train.py would record."""
    val, record = data.load_split(path, "val", how=data.SplitSpec(args.val_ratio, 0))
    mean, std = data.mean_std(val.images)
    torch.manual_seed(0)
    model = models.create_model(args.arch, len(val.classes), in_chans=1, img_size=(28, 28))
    meta = {
        "arch": args.arch,
        "num_classes": len(val.classes),
        "in_chans": 1,
        "img_size": [28, 28],
        "classes": val.classes,
        "multi_label": False,
        "mean": mean,
        "std": std,
        "split": record,
        "task": "classify",
    }
    paths = []
    for k in range(args.n):
        g = torch.Generator().manual_seed(k)
        sd = {
            n: v + 0.02 * v.std() * torch.randn(v.shape, generator=g)
            if v.is_floating_point() and v.numel() > 1
            else v
            for n, v in model.state_dict().items()
        }
        run_args = {
            "data": str(path),
            "img_size": None,
            "in_chans": None,
            "val_ratio": args.val_ratio,
        }
        p = root / "ft" / f"i{k}_s{k}" / "best.pt"
        run_args.update(i=k, random_seed=k, weights="start.pt")
        models.save_checkpoint(p, sd, {**meta, "args": run_args})
        paths.append(p)
    return paths, val


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_passes(paths, val, device, args) -> tuple[float, int]:
    """Seconds for 2N-1 plain forward passes over the pre-normalised held-out tensor."""
    model, ck = models.load_model(paths[0], device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    x = data.normalize(val.images.to(device), ck["mean"], ck["std"])
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batches = x.split(args.eval_batch_size)
    for b in batches:  # warm-up (kernel selection, allocator)
        model(b)
    sync(device)
    passes = 2 * len(paths) - 1
    t0 = time.perf_counter()
    for _ in range(passes):
        for b in batches:
            model(b)
    sync(device)
    return time.perf_counter() - t0, passes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="number of ingredients")
    p.add_argument("--arch", default="smallnet_s")
    p.add_argument("--val-ratio", type=float, default=0.05, help="held-out fraction")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-batch-size", type=int, default=1024)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = FASHION if FASHION.exists() else synthetic_idx(root / "synthetic")
        paths, val = make_ingredients(root, path, args)
        bare, passes = bare_passes(paths, val, device, args)

        # train.evaluate (what soup.py uses) against one bare pass, same model and data.
        model, ck = models.load_model(paths[0], device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        images = val.images.to(device)
        rt = models.Runtime(device, "none", args.channels_last, args.eval_batch_size, quiet=True)
        t0 = time.perf_counter()
        train.evaluate(model, images, val.labels, ck, rt)
        sync(device)
        one_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        infos = [soup.read_ingredient(str(q)) for q in paths]
        checks = time.perf_counter() - t0
        del infos

        cl = [] if args.channels_last else ["--no-channels-last"]
        argv = ["--ingredients", str(root / "ft" / "*" / "best.pt"), "--out", str(root / "out")]
        argv += ["--eval-individual", "--greedy", "--quiet", "--device", str(device), *cl]
        argv += ["--eval-batch-size", str(args.eval_batch_size)]
        t0 = time.perf_counter()
        summary = soup.main(argv)
        sync(device)
        total = time.perf_counter() - t0
    ratio = total / bare
    print(
        f"\nbench_soup: {args.n} x {args.arch} on {device}, held-out {len(val)} images "
        f"({'Fashion-MNIST' if path == FASHION else 'synthetic'}), "
        f"{torch.get_num_threads()} threads"
    )
    print(f"  bare forward: {passes} passes in {bare:.2f}s ({bare / passes:.3f}s/pass)")
    print(f"  train.evaluate, one pass: {one_eval:.3f}s ({one_eval / (bare / passes):.2f}x bare)")
    print(f"  reading + checking {args.n} checkpoints: {checks:.3f}s")
    print(
        f"  soup.py --eval-individual --greedy: {total:.2f}s, {summary['evaluations']} passes"
        f"\n  ratio soup / bare = {ratio:.2f} (goal <= 1.3)"
    )
    return {"ratio": ratio, "soup_seconds": total, "bare_seconds": bare}


if __name__ == "__main__":
    main()
