"""Benchmark: k-view TTA in one stacked forward against k separate forwards and one big forward.

    python benchmarks/bench_tta.py [--n 4096] [--tta rot90] [--model smallnet] [--device auto]

All three variants go through train.predict over the same N random 28x28 images, B images per
batch:
- ours: infer.tta_forward, the k views of a batch stacked into ONE forward of k*B images;
- loop: the same views, but k forward calls of B images per batch (one per view);
- big:  no TTA, the images repeated k times and predicted in batches of k*B (the model cost of
        k*N images with nothing else: the floor TTA can reach).
Goal: ours <= 1.1x big, and faster than loop. Times are the best of --repeats interleaved runs
after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import infer  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from common import format_table  # noqa: E402


def loop_forward(views, multi_label: bool = False):
    """The naive TTA: one model call per view."""

    def forward(model, x):
        outs = [model(v.augment(x)).float() for v in views]
        probs = torch.stack([torch.sigmoid(o) if multi_label else o.softmax(1) for o in outs])
        return infer.merge_views(probs, "mean", multi_label)

    return forward


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smallnet", help="models.create_model name")
    p.add_argument("--n", type=int, default=4096, help="images")
    p.add_argument("--size", type=int, default=28, help="image side")
    p.add_argument("--tta", default="rot90", help="infer.py --tta views (rot90 = 4 views)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (B)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best kept)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.resolve_device(args.device)
    torch.manual_seed(0)
    model = models.create_model(args.model, 10, in_chans=1, img_size=(args.size, args.size))
    model = model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (args.n, 1, args.size, args.size), dtype=torch.uint8)
    views = infer.tta_views(args.tta)
    k, b = len(views), args.batch_size
    rt = models.Runtime(device, models.resolve_amp(device, args.amp), args.channels_last, b, True)
    big = replace(rt, eval_batch_size=k * b)
    tta, naive = infer.tta_forward(views), loop_forward(views)
    # name -> (input images, predict call); big's input is the k-times repeated set, made once
    variants = {
        "ours (1 stacked forward)": (
            images,
            lambda x: train.predict(model, x, [0.5], [0.25], rt, tta),
        ),
        f"loop ({k} forwards)": (
            images,
            lambda x: train.predict(model, x, [0.5], [0.25], rt, naive),
        ),
        f"big (1 forward, {k}x batch)": (
            images.repeat(k, 1, 1, 1),
            lambda x: train.predict(model, x, [0.5], [0.25], big),
        ),
    }
    for x, fn in variants.values():  # warm-up: allocator, kernels, cudnn autotune
        fn(x[: 2 * k * b])
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, (x, fn) in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    ours, loop, big = best.values()
    rows = [[name, s, f"{args.n / s:,.0f}", f"{k * args.n / s:,.0f}"] for name, s in best.items()]
    print(
        f"TTA benchmark: {args.model}, {args.n} images {args.size}x{args.size}, k={k} views "
        f"({args.tta}), B={b}, {device} ({torch.get_num_threads()} threads), amp {args.amp}"
    )
    print(format_table(rows, ["variant", "seconds", "images/s", "view-images/s"]))
    r_big, r_loop = ours / big, loop / ours
    print(f"ours / big  = {r_big:.3f}  (goal <= 1.1: {'met' if r_big <= 1.1 else 'NOT met'})")
    print(f"loop / ours = {r_loop:.3f}  (goal > 1: {'met' if r_loop > 1 else 'NOT met'})")
    return {"seconds": best, "ours_over_big": r_big, "loop_over_ours": r_loop}


if __name__ == "__main__":
    main()
