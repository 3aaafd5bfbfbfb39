"""Training throughput: our loop vs a per-sample DataLoader pipeline vs a bare tensor loop.

    python benchmarks/bench_train.py [--data ../shared/data/fashion-mnist] [--images 10240]

Same model, batch size, optimizer, AMP setting and CPU threads for all three, measured in one run:
  (a) train.fit: tensor-resident data, batched flip + pad-crop on the device (the real loop),
  (b) torchvision Dataset of PIL images + transforms + DataLoader(num_workers=2),
  (c) a tight loop over pre-made tensors with no augmentation (the limit).
Prints images/s and the ratios a/b and a/c for timm resnet18 and the default smallnet.

--mode rotation (also part of --mode all): RotNet with train.fit next to supervised training
at the same batch size, in input images/s: `--rotations one` (the default: each image at one
random rotation, so a step costs what a supervised one does) and `--rotations all` (each image
at all four, a 4x forward batch; its forward images/s = 4x its input images/s).
--mode rotation-steps (also in rotation and all): the same three at the level of one training
step on random 28x28 images, per forward image, with rotate_batch's share of the step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from common import format_table  # noqa: E402


def ours(
    path: str,
    arch: str,
    n: int,
    bs: int,
    amp: str,
    threads: int,
    task: str = "classify",
    epochs: int = 1,
    rotations: str = "one",
) -> float:
    """images/s (input images) of train.fit's last epoch, its own metric (2 epochs: the first
    warms up kernels)."""
    with tempfile.TemporaryDirectory() as out:
        args = train.build_parser().parse_args(
            [
                "--data",
                path,
                "--model",
                arch,
                "--epochs",
                str(epochs),
                "--task",
                task,
                *(["--rotations", rotations] if task == "rotation" else []),
                "--batch-size",
                str(bs),
                "--labels-per-class",
                str(n // 10),
                "--out",
                out,
                "--name",
                "b",
                "--quiet",
                "--amp",
                amp,
                "--threads",
                str(threads),
                "--warmup-epochs",
                "0",
                "--lr",
                "0.05",
                "--val-ratio",
                "0.01",
            ]
        )
        train.fit(args)
        row = json.loads((Path(out) / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    return row["images_per_s"]


def _step_fn(model, opt, amp):
    def step(x, y):
        with models.autocast("cpu", amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _setup(arch, in_chans, hw, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = models.create_model(arch, 10, in_chans, hw).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    return m, opt


def _warm_up(step, images, labels, bs: int, n: int = 5) -> None:
    """First steps build (bf16) kernels; keep them out of every measurement."""
    x = torch.randn(bs, *images.shape[1:]).contiguous(memory_format=torch.channels_last)
    for _ in range(n):
        step(x, labels[:bs])


def per_sample(images, labels, mean, std, arch, bs, amp, threads) -> float:
    """images/s of the classic torchvision pipeline: PIL images, transforms, 2 workers."""
    import torchvision.transforms as T
    from PIL import Image

    class PilSet(torch.utils.data.Dataset):
        def __init__(self):
            self.tf = T.Compose(
                [
                    T.RandomHorizontalFlip(),
                    T.RandomCrop(images.shape[-1], 2),
                    T.ToTensor(),
                    T.Normalize(mean, std),
                ]
            )

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(images[i, 0].numpy())), int(labels[i])

    m, opt = _setup(arch, images.shape[1], list(images.shape[2:]), threads)
    step = _step_fn(m, opt, amp)
    _warm_up(step, images, labels, bs)
    loader = torch.utils.data.DataLoader(
        PilSet(), bs, shuffle=True, num_workers=2, drop_last=True, persistent_workers=False
    )
    seen, t0 = 0, time.perf_counter()
    for x, y in loader:
        step(x.contiguous(memory_format=torch.channels_last), y)
        seen += len(x)
    return seen / (time.perf_counter() - t0)


def bare(images, labels, mean, std, arch, bs, amp, threads) -> float:
    """images/s of a tight loop over pre-normalised tensors, no augmentation."""
    m, opt = _setup(arch, images.shape[1], list(images.shape[2:]), threads)
    step = _step_fn(m, opt, amp)
    _warm_up(step, images, labels, bs)
    x_all = data.normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
    idx = data.batch_indices(len(images), bs, False, drop_last=True)
    t0 = time.perf_counter()
    for b in idx:
        step(x_all[b], labels[b])
    return len(idx) * bs / (time.perf_counter() - t0)


def rotation_rows(a, amp: str) -> list[list]:
    """Supervised vs RotNet (--rotations one and all) input images/s of train.fit."""
    rows = []
    for arch in a.models.split(","):
        n = a.images if arch.startswith("smallnet") else a.images // 4
        sup = one = every = 0.0

        def run(arch=arch, n=n, **kw) -> float:
            return ours(a.data, arch, n, a.batch_size, amp, a.threads, epochs=2, **kw)

        for _ in range(a.repeats):  # interleaved, best of --repeats
            sup = max(sup, run())
            one = max(one, run(task="rotation", rotations="one"))
            every = max(every, run(task="rotation", rotations="all"))
        rows.append(
            [arch, round(sup), round(one), f"{one / sup:.2f}", round(every), round(4 * every),
             f"{every / sup:.2f}"]
        )  # fmt: skip
        print(
            f"{arch}: supervised {sup:.0f}, RotNet one {one:.0f}, all {every:.0f} in/s", flush=True
        )
    return rows


def rotation_step_rates(arch: str, bs: int, amp: str, threads: int, repeats: int) -> list:
    """Step-level images/s per forward image, interleaved, best of `repeats`: supervised at
    batch B and 4B, RotNet at input batch B (4B forward), and rotate_batch's share of a step."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (4 * bs, 1, 28, 28), dtype=torch.uint8)
    nets = {k: _setup_nc(arch, 4 if k == "rot" else 10) for k in ("sup", "sup4", "rot")}
    best = dict.fromkeys(nets, 0.0)
    share = 0.0
    for rep in range(repeats + 1):  # the first round warms up kernels and is not kept
        for k, (m, opt) in nets.items():
            step = _step_fn(m, opt, amp)
            b, n_steps = (4 * bs, 1) if k == "sup4" else (bs, 4 if k == "sup" else 1)
            t_rot, t0 = 0.0, time.perf_counter()
            for i in range(n_steps):
                x = data.augment_batch(
                    data.normalize(x_u8[i * b % (4 * bs) :][:b], [0.5], [0.25]), ["flip", "crop"], g
                )
                if k == "rot":
                    t1 = time.perf_counter()
                    x, y = data.rotate_batch(x)
                    t_rot += time.perf_counter() - t1
                else:
                    y = torch.randint(0, 10, (len(x),), generator=g)
                step(x.contiguous(memory_format=torch.channels_last), y)
            dt = time.perf_counter() - t0
            if rep:
                fwd = n_steps * b * (4 if k == "rot" else 1)
                best[k] = max(best[k], fwd / dt)
                if k == "rot":
                    share = max(share, t_rot / dt)
    return [arch, round(best["sup"]), round(best["sup4"]), round(best["rot"]),
            f"{best['rot'] / best['sup']:.2f}", f"{best['rot'] / best['sup4']:.2f}",
            f"{100 * share:.2f}%"]  # fmt: skip


def _setup_nc(arch: str, num_classes: int):
    torch.manual_seed(0)
    m = models.create_model(arch, num_classes, 1, [28, 28]).to(memory_format=torch.channels_last)
    return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)


STEP_HEADER = [
    "model",
    "supervised fwd img/s (B)",
    "supervised fwd img/s (4B)",
    "RotNet fwd img/s (B in, 4B fwd)",
    "RotNet / sup B",
    "RotNet / sup 4B",
    "rotate_batch share",
]

ROT_HEADER = [
    "model",
    "supervised img/s",
    "RotNet one img/s",
    "one / sup",
    "RotNet all input img/s",
    "all forward img/s (4x)",
    "all input / sup",
]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/fashion-mnist"))
    p.add_argument("--images", type=int, default=10240, help="training images per measurement")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", default="auto", help="same AMP for all three (auto: bf16 if fast)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="smallnet_s,resnet18")
    p.add_argument("--repeats", type=int, default=2, help="best of N measurements of each")
    p.add_argument(
        "--mode", choices=["all", "pipeline", "rotation", "rotation-steps"], default="all"
    )
    a = p.parse_args()
    amp = models.resolve_amp("cpu", a.amp)
    full, _ = data.load_split(a.data, "train")
    sub = full.subset(train.labelled_subset(full.labels, a.images // 10, 0))
    mean, std = data.mean_std(sub.images)
    rows = []
    for arch in a.models.split(",") if a.mode in ("all", "pipeline") else []:
        # resnet18 is slow on CPU; the class-balanced subset can be a few images short of --images
        n = min(len(sub), a.images if arch.startswith("smallnet") else a.images // 4)
        s = sub.subset(range(n))
        # best of --repeats, interleaved, so a noisy moment does not decide a ratio
        ra = rb = rc = 0.0
        for _ in range(a.repeats):
            ra = max(ra, ours(a.data, arch, n, a.batch_size, amp, a.threads))
            rb = max(
                rb, per_sample(s.images, s.labels, mean, std, arch, a.batch_size, amp, a.threads)
            )
            rc = max(rc, bare(s.images, s.labels, mean, std, arch, a.batch_size, amp, a.threads))
        rows.append([arch, round(ra), round(rb), round(rc), f"{ra / rb:.2f}", f"{ra / rc:.2f}"])
        print(f"{arch}: ours {ra:.0f}  per-sample {rb:.0f}  bare {rc:.0f} img/s", flush=True)
    rot = rotation_rows(a, amp) if a.mode in ("all", "rotation") else []
    a_steps = a.mode != "pipeline"
    steps = (
        [
            rotation_step_rates(m, a.batch_size, amp, a.threads, a.repeats)
            for m in a.models.split(",")
        ]
        if a_steps
        else []
    )
    print(f"\namp={amp}, threads={a.threads}, batch {a.batch_size}")
    if rows:
        print(format_table(rows, ["model", "a: ours", "b: per-sample", "c: bare", "a/b", "a/c"]))
    if rot:
        print("\ntrain.fit, whole epochs, input images/s (RotNet all forwards 4 per input):")
        print(format_table(rot, ROT_HEADER))
    if steps:
        print("\none training step, per forward image (rotate_batch timed on its own):")
        print(format_table(steps, STEP_HEADER))


if __name__ == "__main__":
    main()
