"""The mask competition's 3-head model (train.py --heads mask,gender,age) against the plain
18-way head, on a synthetic mask-layout set made here (drawn faces, never real photos).

    python benchmarks/bench_heads.py [--people 150] [--epochs 8] [--model smallnet_s]

Each person is a drawn face: the hair's grey level follows the age (age bins < 30, 30..59,
>= 60 cut a continuous value, so ages near the edges are hard), long hair on the sides for
female (widths overlap with male), and a mask rectangle over mouth and nose (mask1..5, five
colours), a lower one with the nose uncovered (incorrect_mask) or none (normal); per photo a
shift of up to 2 px and pixel noise. Both models train with the same backbone, epochs, seed and
person-level split; the table is each one's val accuracy per head (from the 18-class answer
ans = mask*6 + gender*3 + age, as infer.py scores it; fp32) and the 18-class accuracy and macro-F1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from common import cli_errors, format_table, parse_args, positive_int, seed_int  # noqa: E402

KINDS = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
MASK_COLOURS = [(235, 235, 240), (40, 60, 160), (30, 30, 30), (120, 200, 230), (200, 80, 120)]


def face(rng, age: int, female: bool, kind: str, skin, side: int, size: int = 32) -> np.ndarray:
    """One drawn size x size RGB photo of a person (uint8)."""
    s = size / 32
    img = np.zeros((size, size, 3), np.float32) + np.array([90, 110, 90], np.float32)  # wall
    r0, r1, c0, c1 = int(5 * s), int(31 * s), int(7 * s), int(25 * s)
    img[r0:r1, c0:c1] = skin
    hair = 30 + 2.6 * age + rng.normal(0, 12)  # greyer with age
    img[int(2 * s) : int(8 * s), int(6 * s) : int(26 * s)] = hair
    if side:  # long hair beside the face
        img[int(6 * s) : int(24 * s), int(6 * s) - side : int(8 * s)] = hair
        img[int(6 * s) : int(24 * s), int(24 * s) : int(26 * s) + side] = hair
    img[int(12 * s) : int(14 * s), int(11 * s) : int(14 * s)] = 20  # eyes
    img[int(12 * s) : int(14 * s), int(18 * s) : int(21 * s)] = 20
    img[int(24 * s) : int(25 * s), int(13 * s) : int(19 * s)] = (120, 40, 40)  # mouth
    if kind.startswith("mask"):
        img[int(16 * s) : int(29 * s), int(8 * s) : int(24 * s)] = MASK_COLOURS[int(kind[4]) - 1]
    elif kind == "incorrect_mask":  # below the nose
        img[int(21 * s) : int(31 * s), int(8 * s) : int(24 * s)] = MASK_COLOURS[
            rng.integers(len(MASK_COLOURS))
        ]
    dy, dx = rng.integers(-2, 3, 2)
    img = np.roll(img, (int(dy), int(dx)), (0, 1))
    img += rng.normal(0, 18, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_set(root: Path, people: int = 150, seed: int = 0, size: int = 32) -> Path:
    """train/images/<id>_<gender>_<race>_<age>/<kind>.png + train/train.csv (the mask layout);
    ages about 45% < 30, 40% 30..59, 15% >= 60 (the old class rare, as in the competition)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(people):
        u = rng.random()
        age = int(rng.integers(18, 30) if u < 0.45 else rng.integers(30, 60) if u < 0.85 else
                  rng.integers(60, 81))  # fmt: skip
        female = bool(rng.random() < 0.6)
        side = int(rng.integers(1, 4) if female else rng.integers(0, 2))
        skin = np.array([200, 160, 130], np.float32) + rng.normal(0, 15, 3)
        gender = "female" if female else "male"
        folder = f"{i:06d}_{gender}_Asian_{age}"
        d = root / "train" / "images" / folder
        d.mkdir(parents=True)
        for kind in KINDS:
            Image.fromarray(face(rng, age, female, kind, skin, side, size)).save(d / f"{kind}.png")
        rows.append(f"{i:06d},{gender},Asian,{age},{folder}")
    (root / "train" / "train.csv").write_text("id,gender,race,age,path\n" + "\n".join(rows) + "\n")
    return root


def run_one(root: Path, out: Path, name: str, extra: list[str], args) -> dict:
    flags = [
        "--data", str(root), "--out", str(out), "--name", name, "--model", args.model,
        "--epochs", str(args.epochs), "--random-seed", str(args.seed), "--val-ratio", "0.2",
        "--threads", str(args.threads), "--quiet", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    train.main(flags)
    seconds = time.perf_counter() - t0
    # fp32 evaluation of best.pt on the val people; a head's prediction is the digit of the
    # 18-class argmax (the submission's ans), for both models
    model, ck = models.load_model(out / name / "best.pt")
    val, _ = data.load_split(root, "val", how=data.SplitSpec(0.2, 0))
    meta = replace(models.CheckpointMeta.from_checkpoint(ck), heads=data.MASK_HEADS)
    m = train.evaluate(model, val.images, val.labels, meta)
    return {**m, "seconds": seconds, "flags": " ".join(flags[4:])}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--people", type=positive_int, default=150, help="7 photos each")
    p.add_argument("--epochs", type=positive_int, default=8)
    p.add_argument("--model", default="smallnet_s")
    p.add_argument("--seed", type=seed_int, default=0, help="data, init and order")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--head-losses", default="ce,ce,focal", help="of the 3-head run")
    with cli_errors("bench_heads.py"):
        args = parse_args(p, argv)
        with tempfile.TemporaryDirectory() as tmp:
            root = make_set(Path(tmp) / "mask", args.people, args.seed)
            out = Path(tmp) / "runs"
            res = [
                ("18-way head", run_one(root, out, "flat", [], args)),
                ("3 heads (" + args.head_losses + ")", run_one(root, out, "heads",
                 ["--heads", "mask,gender,age", "--head-losses", args.head_losses], args)),
            ]  # fmt: skip
        rows = [
            [name]
            + [f"{r[h + '_acc']:.4f} / {r[h + '_f1']:.4f}" for h in data.MASK_HEADS]
            + [f"{r['acc']:.4f}", f"{r['f1']:.4f}", f"{r['seconds']:.1f}"]
            for name, r in res
        ]
        head_cols = [f"{h} acc / F1" for h in data.MASK_HEADS]
        print(format_table(rows, ["model", *head_cols, "18-class acc", "18-class macro-F1",
                                  "train s"]))  # fmt: skip
        for name, r in res:
            print(f"{name}: train.py {r['flags']}")
        return [r for _, r in res]


if __name__ == "__main__":
    main()
