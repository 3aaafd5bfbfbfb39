"""Images/s of synth.py dirty mode (256x256, built-in glyphs) with 1 and 2 worker processes.

    python benchmarks/bench_synth.py [--num-images 2000] [--img-size 256] [--workers 1 2]

Times `synth.generate` (render + PNG encode + write, worker start-up included), not the one-off
glyph bank build; each run writes to a fresh temporary directory that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synth  # noqa: E402
from common import Timer, format_table  # noqa: E402


def bench(num_images: int, img_size: int, workers: int, mode: str) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one generate() into a temp directory."""
    glyphs, labels = synth._builtin_bank(0) if mode == "dirty" else synth.builtin_glyphs(True)
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as d:
        job = synth.Job(
            mode=mode, seed=0, size=(img_size, img_size), glyphs=glyphs, labels=labels,
            letters_min=10, letters_max=14, out_dir=d, png_level=0 if mode == "dirty" else 6,
        )  # fmt: skip
        tasks = synth._chunks("train", 0, num_images, workers)
        cpu0 = _cpu_seconds()
        with Timer() as t:
            synth.generate(job, tasks, workers, quiet=True)
        cpu = _cpu_seconds() - cpu0
    return num_images / t.seconds, num_images / cpu


def _cpu_seconds() -> float:
    # this process plus its reaped workers: a rate that survives a machine shared with others
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--num-images", type=int, default=2000, help="images per run")
    p.add_argument("--img-size", type=int, default=256, help="canvas side")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--mode", choices=["dirty", "letters"], default="dirty", help="synth mode")
    a = p.parse_args(argv)
    rates = {w: bench(a.num_images, a.img_size, w, a.mode) for w in a.workers}
    base = rates[a.workers[0]][0]
    rows = [
        (w, a.num_images, round(r), f"{r / base:.2f}x", round(c)) for w, (r, c) in rates.items()
    ]
    print(
        f"synth.py {a.mode} mode, {a.img_size}x{a.img_size}, built-in glyphs, {os.cpu_count()} CPUs"
    )
    header = ["workers", "images", "images/s", f"vs {a.workers[0]} worker", "images/CPU-s"]
    print(format_table(rows, header))


if __name__ == "__main__":
    main()
