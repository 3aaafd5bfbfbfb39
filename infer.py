"""Predict with one or more checkpoints: test-time augmentation, weighted ensembles, submissions.

    python infer.py runs/a/best.pt --data PATH --out sub.csv
    python infer.py a.pt b.pt c.pt --weights 1.5,1,1 --tta flip,shift --return-probs
    python infer.py runs/ml/best.pt --data PATH --tta rot90 --tune-threshold f1

TTA follows ttach: a view is a pair (augment, de-augment) of functions on a batch, views compose
by name (`--tta flip,shift` = every flip x every shift), and the per-view probabilities are merged
by a named reduction. All k views of a batch go through the model in ONE forward call of k*B
images (a `forward(model, x)` handed to train.predict), not one call per view. Several
checkpoints are averaged in probability space (vote.soft_vote), optionally weighted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import data
import models
import train
import vote
from common import (
    UserError,
    add_common_flags,
    cli_errors,
    format_table,
    parse_args,
    write_json,
)

TTA_NAMES = ("flip", "vflip", "rot90", "shift", "scale", "five-crop")
MERGES = ("mean", "gmean", "max")
SPLIT_CHOICES = ("auto", *data.SPLITS)
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)

# ---------------------------------------------------------------------------
# TTA views: (augment, de-augment) pairs of functions on an N x C x H x W batch. For classifiers
# the output is N x K logits, so the de-augment is the identity there; it maps spatial outputs
# (N x K x H x W, e.g. segmentation) back to the input frame, and the tests check it inverts
# the augment.


class View(NamedTuple):
    name: str
    augment: Callable[[torch.Tensor], torch.Tensor]
    deaugment: Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


IDENTITY = View("id", _identity, _identity)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return x.flip(-1)


def vflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror top-bottom."""
    return x.flip(-2)


def rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate by k*90 degrees counter-clockwise (square images)."""
    return torch.rot90(x, k, (-2, -1))


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move the content by (dy, dx) pixels, filling from a reflect padding (airbench TTA)."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    mode = "reflect" if p < min(h, w) else "replicate"
    xp = F.pad(x, (p, p, p, p), mode=mode)
    return xp[..., p - dy : p - dy + h, p - dx : p - dx + w]


def affine(x: torch.Tensor, a: float, ty: float = 0.0, tx: float = 0.0) -> torch.Tensor:
    """Resample so output point u shows input point a*u + t (normalised [-1, 1] coordinates).

    a < 1 zooms in on a window of side a centred at t (a crop resized back to full size);
    a > 1 zooms out, the border repeated outside the image. Same size in and out.
    """
    n = x.shape[0]
    theta = torch.tensor([[a, 0.0, tx], [0.0, a, ty]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _affine_view(name: str, a: float, ty: float = 0.0, tx: float = 0.0) -> View:
    return View(
        name,
        lambda x: affine(x, a, ty, tx),
        lambda y: affine(y, 1.0 / a, -ty / a, -tx / a),  # the inverse map
    )


def _named_views(name: str, shift_px: int, scale: float, crop_ratio: float) -> list[View]:
    """The views one --tta name stands for (identity included where it is one of them)."""
    if name == "flip":
        return [IDENTITY, View("hflip", hflip, hflip)]
    if name == "vflip":
        return [IDENTITY, View("vflip", vflip, vflip)]
    if name == "rot90":
        return [IDENTITY] + [
            View(f"rot{90 * k}", lambda x, k=k: rot90(x, k), lambda y, k=k: rot90(y, -k))
            for k in (1, 2, 3)
        ]
    if name == "shift":  # airbench: the image and its two diagonal 1-px translations
        p = shift_px
        return [IDENTITY] + [
            View(
                f"shift({d:+d},{d:+d})",
                lambda x, d=d: shift(x, d, d),
                lambda y, d=d: shift(y, -d, -d),
            )
            for d in (p, -p)
        ]
    if name == "scale":
        return [
            IDENTITY,
            _affine_view(f"zoom{scale:g}", 1.0 / scale),
            _affine_view(f"zoom{1 / scale:.3g}", scale),
        ]
    if name == "five-crop":  # ttach five_crop, each crop resized back so the views stack
        r, e = crop_ratio, 1.0 - crop_ratio
        spots = [("center", 0, 0), ("tl", -e, -e), ("tr", -e, e), ("bl", e, -e), ("br", e, e)]
        return [_affine_view(f"crop-{s}", r, ty, tx) for s, ty, tx in spots]
    raise UserError(f"--tta {name}: unknown view; choose from none, {', '.join(TTA_NAMES)}")


def compose(a: View, b: View) -> View:
    """b applied after a; the de-augment undoes b first, then a."""
    if a is IDENTITY:
        return b
    if b is IDENTITY:
        return a
    return View(
        f"{a.name}+{b.name}",
        lambda x: b.augment(a.augment(x)),
        lambda y: a.deaugment(b.deaugment(y)),
    )


def tta_names(spec: str | Sequence[str] | None) -> list[str]:
    """Parse `flip,shift` (or a list) into known view names; none/empty -> []."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    names = []
    for s in items:
        s = s.strip().lower().replace("_", "-")
        if s in ("", "none", "id", "identity") or s in names:
            continue
        if s not in TTA_NAMES:
            raise UserError(f"--tta {s}: unknown view; choose from none, {', '.join(TTA_NAMES)}")
        names.append(s)
    return names


def tta_views(
    spec: str | Sequence[str] | None,
    shift_px: int = 1,
    scale: float = 1.1,
    crop_ratio: float = 0.875,
) -> list[View]:
    """All compositions of the named views (product, ttach Compose); [IDENTITY] for none."""
    views = [IDENTITY]
    for name in tta_names(spec):
        views = [
            compose(a, b) for a in views for b in _named_views(name, shift_px, scale, crop_ratio)
        ]
    return views


def merge_views(probs: torch.Tensor, how: str = "mean", multi_label: bool = False) -> torch.Tensor:
    """Merge k x N x K per-view probabilities into N x K.

    mean: arithmetic mean. gmean: mean of log-probabilities, renormalised (softmax over classes;
    for multi-label each class against its complement). max: per-class maximum, rows
    renormalised to sum 1 unless multi-label.
    """
    if how == "mean":
        return probs.mean(0)
    if how == "max":
        p = probs.amax(0)
        return p if multi_label else p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    if how == "gmean":
        tiny = torch.finfo(probs.dtype).tiny
        lp = probs.clamp_min(tiny).log().mean(0)
        if multi_label:
            lq = (1 - probs).clamp_min(tiny).log().mean(0)
            return torch.sigmoid(lp - lq)  # e^lp / (e^lp + e^lq)
        return lp.softmax(-1)
    raise UserError(f"--merge {how}: choose from {', '.join(MERGES)}")


def tta_forward(views: Sequence[View], merge: str = "mean", multi_label: bool = False):
    """A `forward(model, x) -> N x K probabilities` for train.predict: one stacked forward."""
    views = list(views)
    k = len(views)

    def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        xs = views[0].augment(x) if k == 1 else torch.cat([v.augment(x) for v in views])
        out = model(xs).float()
        out = out.reshape(k, n, *out.shape[1:])
        if out.ndim > 3:  # spatial outputs: back to the input frame before merging
            out = torch.stack([v.deaugment(o) for v, o in zip(views, out)])
        probs = torch.sigmoid(out) if multi_label else out.softmax(2)
        return merge_views(probs, merge, multi_label)

    return forward


# ---------------------------------------------------------------------------
# Thresholds for multi-label outputs (pure numpy)


def _f1_per_threshold(p: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    pred = p[:, None] >= grid[None, :]
    pos = y.astype(bool)[:, None]
    tp = (pred & pos).sum(0)
    fp = (pred & ~pos).sum(0)
    fn = (~pred & pos).sum(0)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)  # nothing to find: perfect


def _pick(scores: np.ndarray, grid: np.ndarray) -> float:
    """Best threshold; ties go to the one nearest 0.5 (the untuned default)."""
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]])


def tune_thresholds(
    probs: np.ndarray, labels: np.ndarray, metric: str = "f1", grid: np.ndarray | None = None
) -> np.ndarray:
    """Per-class thresholds maximising each class's F1 (`f1`) or the exact-match rate (`exact`,
    coordinate ascent from 0.5, two sweeps over the classes)."""
    grid = THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels) > 0.5
    k = p.shape[1]
    if metric == "f1":
        return np.array([_pick(_f1_per_threshold(p[:, j], y[:, j], grid), grid) for j in range(k)])
    if metric != "exact":
        raise UserError(f"--tune-threshold {metric}: choose f1 or exact")
    thr = np.full(k, 0.5)
    for _ in range(2):
        for j in range(k):
            right = (p >= thr) == y
            others = np.delete(right, j, axis=1).all(1)
            hit = (p[:, j, None] >= grid[None, :]) == y[:, j, None]
            thr[j] = _pick((others[:, None] & hit).mean(0), grid)
    return thr


def exact_match(probs: np.ndarray, labels: np.ndarray, thresholds) -> float:
    """Exact-match accuracy of thresholded multi-label probabilities."""
    pred = (np.asarray(probs) >= np.asarray(thresholds)).astype(np.int64)
    return vote.accuracy((np.asarray(labels) > 0.5).astype(np.int64), pred)


# ---------------------------------------------------------------------------
# Checkpoints


def load_checkpoints(paths: Sequence[str], device) -> list[tuple[str, torch.nn.Module, dict]]:
    """(path, model in eval mode, checkpoint dict) per file; they must agree on the classes."""
    out = []
    for p in paths:
        model, ck = models.load_model(p, device)
        if ck.get("task", "classify") != "classify":
            raise UserError(
                f"{p}: a {ck.get('task')} checkpoint (self-supervised), not a classifier; "
                "fine-tune it on labels first"
            )
        for key in ("classes", "mean", "std", "img_size", "in_chans"):
            if key not in ck:
                raise UserError(f"{p}: checkpoint lacks '{key}'; re-save it with train.py")
        out.append((str(p), model, ck))
    p0, _, c0 = out[0]
    for p, _, ck in out[1:]:
        if list(ck["classes"]) != list(c0["classes"]):
            raise UserError(
                f"{p}: classes {_short(ck['classes'])} differ from {p0}'s {_short(c0['classes'])}; "
                "ensemble only checkpoints trained on the same classes"
            )
        if bool(ck.get("multi_label")) != bool(c0.get("multi_label")):
            raise UserError(
                f"{p}: multi_label={bool(ck.get('multi_label'))} but {p0} has "
                f"{bool(c0.get('multi_label'))}; ensemble only models of the same task"
            )
    return out


def _short(items: Sequence, n: int = 4) -> str:
    items = [str(c) for c in items]
    more = f", ... ({len(items)})" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"


def trained_augs(ck: dict) -> list[str]:
    """The --aug names a checkpoint was trained with (from its recorded args)."""
    aug = (ck.get("args") or {}).get("aug") or ""
    items = aug.split(",") if isinstance(aug, str) else list(aug)
    return [str(a).strip().lower() for a in items if str(a).strip()]


def check_tta(names: Sequence[str], ckpts, force: bool) -> None:
    """rot90 TTA only for rotation-invariant training (--aug rot90) and square images."""
    if "rot90" not in names:
        return
    for path, _, ck in ckpts:
        h, w = ck["img_size"]
        if h != w:
            raise UserError(f"{path}: rot90 TTA needs square images, the model takes {h}x{w}")
        if "rot90" not in trained_augs(ck) and not force:
            raise UserError(
                f"{path}: trained without --aug rot90 (aug: {','.join(trained_augs(ck)) or 'none'}), "
                "so rotated views would hurt; drop rot90 from --tta or pass --force-tta"
            )


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """--weights 1.5,1,1 -> one non-negative weight per checkpoint (None: equal)."""
    w = vote.parse_weights(text, n, what="checkpoints")
    return None if w is None else w.tolist()


# ---------------------------------------------------------------------------
# Data


def _load_kw(args, ck: dict) -> dict:
    return dict(
        img_size=tuple(ck["img_size"]),
        in_chans=int(ck["in_chans"]),
        cache_dir=args.cache_dir,
        skip_bad_images=args.skip_bad_images,
        label_column=args.label_column,
        quiet=args.quiet,
    )


def load_for(args, path: str, split: str, ck: dict, ck_path: str) -> tuple[data.ImageSet, str]:
    """(the split decoded at the checkpoint's size/channels, the split's name).

    auto: the data set's test part where it has one, else all of it; val/train: the split
    recorded in the checkpoint, its validation hash checked.
    """
    kw = _load_kw(args, ck)
    if split in ("test", "auto"):
        try:
            return data.load_images(path, args.data_format, "test", **kw), "test"
        except data.MissingPartError as e:
            if split == "test":
                raise UserError(f"{e}; use --split all (or val)") from None
            split = "all"
    if split == "all":
        return data.load_images(path, args.data_format, "train", **kw), "all"
    rec = ck.get("split") or {}
    if not rec.get("val_hash"):
        print(
            f"warning: {ck_path} records no train/val split; using --val-ratio 0.1, seed 0",
            file=sys.stderr,
        )
    ds, record = data.load_split(
        path,
        split,
        fmt=args.data_format,
        **data.split_args(rec),
        **kw,
    )
    if rec.get("val_hash") and record["val_hash"] != rec["val_hash"]:
        raise UserError(
            f"{ck_path}: its validation split (seed {rec.get('seed')}, ratio "
            f"{rec.get('val_ratio')}, hash {rec['val_hash']}) is not this data's (hash "
            f"{record['val_hash']}); the data changed or another --data was used: use the "
            "training data, or --split test/all"
        )
    return ds, split


def _check_same_split(ckpts) -> None:
    p0, _, c0 = ckpts[0]
    r0 = c0.get("split") or {}
    for p, _, ck in ckpts[1:]:
        r = ck.get("split") or {}
        if r.get("val_hash") != r0.get("val_hash"):
            raise UserError(
                f"{p}: validation split (hash {r.get('val_hash')}) differs from {p0}'s "
                f"({r0.get('val_hash')}); --split val/train and --tune-threshold need one shared "
                "held-out set"
            )


def _labels_in(ds: data.ImageSet, classes: list[str], multi_label: bool) -> torch.Tensor | None:
    """The data's labels in the checkpoint's class order, or None (unlabelled / other classes)."""
    if not ds.has_labels:
        return None
    if ds.multi_label != multi_label:
        tasks = ("single-label", "multi-label")
        print(
            f"warning: the data is {tasks[ds.multi_label]} but the checkpoint "
            f"{tasks[multi_label]}; no metrics",
            file=sys.stderr,
        )
        return None
    if list(ds.classes) == list(classes) or not ds.classes:
        return ds.labels
    index = {c: k for k, c in enumerate(classes)}
    if ds.multi_label or not set(ds.classes) <= set(index):
        print(
            f"warning: the data's classes {_short(ds.classes)} are not the checkpoint's "
            f"{_short(classes)}; no metrics",
            file=sys.stderr,
        )
        return None
    remap = torch.tensor([index[c] for c in ds.classes])
    y = ds.labels.clone()
    y[y >= 0] = remap[y[y >= 0]]
    return y


# ---------------------------------------------------------------------------
# Prediction


def ensemble_predict(args, ckpts, path: str, split: str, views, device):
    """(ImageSet, N x K probabilities, split, seconds): weighted mean of TTA probs."""
    sets: dict[tuple, data.ImageSet] = {}
    probs = []
    seconds = 0.0
    for ck_path, model, ck in ckpts:
        key = (tuple(ck["img_size"]), int(ck["in_chans"]))
        if key not in sets:  # decode once per size (cached on disk anyway)
            sets[key], split = load_for(args, path, split, ck, ck_path)
        ds = sets[key]
        first = next(iter(sets.values()))
        if ds.ids != first.ids:
            raise UserError(
                f"{ck_path}: the data decoded at {key[0]} has other images than at "
                f"{next(iter(sets))[0]} (unreadable files?); fix the data or drop --skip-bad-images"
            )
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        ml = bool(ck.get("multi_label"))
        fwd = (
            None if len(views) == 1 and views[0] is IDENTITY else tta_forward(views, args.merge, ml)
        )
        t0 = time.perf_counter()
        p = train.predict(
            model,
            ds.images,
            ck["mean"],
            ck["std"],
            batch_size=args.batch_size,
            device=device,
            amp=args.amp,
            channels_last=args.channels_last,
            multi_label=ml,
            forward=fwd,
            quiet=args.quiet,
        )
        seconds += time.perf_counter() - t0
        probs.append(p.numpy())
    weights = parse_weights(args.weights, len(ckpts))
    merged = vote.soft_vote(probs, weights).astype(np.float32)
    return next(iter(sets.values())), merged, split, seconds


def read_thresholds(text: str, classes: list[str]) -> np.ndarray:
    """--threshold: a number for every class, or a JSON file written by --tune-threshold."""
    try:
        t = float(text)
    except ValueError:
        return _thresholds_file(Path(text), classes)
    if not 0 <= t <= 1:
        raise UserError(f"--threshold {text}: must be in [0, 1]")
    return np.full(len(classes), t)


def _thresholds_file(p: Path, classes: list[str]) -> np.ndarray:
    if not p.is_file():
        raise UserError(f"--threshold {p}: neither a number nor a thresholds JSON file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
        thr = [float(v) for v in obj["thresholds"]]
        cls = [str(c) for c in obj.get("classes", classes)]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p}: not a thresholds file ({e}); rerun --tune-threshold") from None
    if cls != list(classes) or len(thr) != len(classes):
        raise UserError(f"{p}: thresholds for other classes {_short(cls)}; rerun tuning")
    return np.array(thr)


# ---------------------------------------------------------------------------
# Metrics


def label_metrics(probs: np.ndarray, y: np.ndarray, classes, multi_label, thresholds) -> dict:
    """accuracy (exact match if multi-label), macro-F1 and per-class accuracy of predictions."""
    k = len(classes)
    if multi_label:
        t = (np.asarray(y) > 0.5).astype(np.int64)
        pred = (probs >= thresholds).astype(np.int64)
        support = t.sum(0)
    else:
        keep = np.asarray(y) >= 0
        t, pred = np.asarray(y)[keep].astype(np.int64), probs[keep].argmax(1)
        support = np.bincount(t, minlength=k)[:k]
    return {
        "accuracy": vote.accuracy(t, pred),
        "macro_f1": vote.macro_f1(t, pred, n_classes=None if multi_label else k),
        "per_class_accuracy": vote.per_class_accuracy(t, pred, None if multi_label else k).tolist(),
        "support": support.tolist(),
        "n": int(len(t)),
        "_true": t,
        "_pred": pred,
    }


def _print_per_class(m: dict, classes: list[str], multi_label: bool) -> None:
    rows = [
        [k, c, s, a]
        for k, (c, s, a) in enumerate(zip(classes, m["support"], m["per_class_accuracy"]))
    ]
    if len(rows) > 40:  # long class lists: the worst 20 only
        rows = sorted(rows, key=lambda r: (np.nan_to_num(r[3], nan=2.0), r[0]))[:20]
        print("per-class accuracy (worst 20):")
    rows = [[k, c, s, "-" if math.isnan(a) else a] for k, c, s, a in rows]  # "-": no samples
    what = "positives" if multi_label else "support"
    print(format_table(rows, ["k", "class", what, "accuracy"]))


def _mask_head_metrics(m: dict) -> dict:
    t, p = m["_true"], m["_pred"]
    return {
        f"{name}_accuracy": vote.accuracy(a, b)
        for name, a, b in zip(("mask", "gender", "age"), data.mask_heads(t), data.mask_heads(p))
    }


# ---------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint(s) to ensemble")
    add_common_flags(p)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        help="images to predict: any data.py format, a folder of images, or the mask layout "
        "(default: the data the first checkpoint was trained on)",
    )
    g.add_argument("--data-format", default=None, help="override auto-detection")
    g.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default="auto",
        help="auto = test where the data has a test part, else all; val/train = the "
        "checkpoint's recorded split (hash checked)",
    )
    g.add_argument("--label-column", default=None, help="CSV label column (default: auto)")
    g.add_argument("--cache-dir", default=None, help="decoded-tensor cache (~/.cache/imgcls)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")

    g = p.add_argument_group("ensemble and TTA")
    g.add_argument(
        "--weights", default=None, help="one weight per CKPT, e.g. 1.5,1,1 (default: equal)"
    )
    g.add_argument(
        "--tta",
        default="none",
        help=f"comma list of views composed as a product: none,{','.join(TTA_NAMES)}",
    )
    g.add_argument("--merge", choices=MERGES, default="mean", help="how views are merged")
    g.add_argument(
        "--force-tta", action="store_true", help="allow rot90 TTA for non-rotation-trained models"
    )
    g.add_argument("--shift-px", type=int, default=1, help="shift: translation in pixels")
    g.add_argument("--scale", type=float, default=1.1, help="scale: zoom factor (in and out)")
    g.add_argument("--crop-ratio", type=float, default=0.875, help="five-crop: crop side ratio")

    g = p.add_argument_group("output")
    g.add_argument("--out", default="submission.csv", help="submission CSV")
    g.add_argument(
        "--return-probs", action="store_true", help="also write probabilities beside --out"
    )
    g.add_argument("--probs-format", choices=["npy", "csv"], default="npy")
    g.add_argument(
        "--threshold",
        default="0.5",
        help="multi-label: probability threshold, or a .thresholds.json from --tune-threshold",
    )
    g.add_argument(
        "--tune-threshold",
        choices=["f1", "exact"],
        default=None,
        help="multi-label: per-class thresholds maximising F1 or exact match on the "
        "checkpoint's val split (saved as <out stem>.thresholds.json)",
    )
    g.add_argument("--confusion", default=None, metavar="FILE.png", help="confusion matrix plot")

    g = p.add_argument_group("speed")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward (x views)")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    return p


def _stem(out: Path) -> str:
    return str(out.with_suffix("")) if out.suffix.lower() == ".csv" else str(out)


def run(args) -> dict:
    """Predict, write the submission (and probabilities), print metrics when labels are known."""
    t_start = time.perf_counter()
    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise UserError(f"--out {args.out}: the submission is a CSV; name it like sub.csv")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shift_px < 1 or args.scale <= 0 or not 0 < args.crop_ratio <= 1:
        raise UserError("--shift-px >= 1, --scale > 0 and 0 < --crop-ratio <= 1 are needed")
    names = tta_names(args.tta)
    views = tta_views(names, args.shift_px, args.scale, args.crop_ratio)
    device = models.resolve_device(args.device)
    ckpts = load_checkpoints(args.checkpoints, device)
    parse_weights(args.weights, len(ckpts))  # fail before any work
    check_tta(names, ckpts, args.force_tta)
    ck0 = ckpts[0][2]
    classes, multi_label = [str(c) for c in ck0["classes"]], bool(ck0.get("multi_label"))
    if args.tune_threshold and not multi_label:
        raise UserError("--tune-threshold: only for multi-label checkpoints")
    if args.confusion and multi_label:
        raise UserError("--confusion: needs a single-label model (multi-label has no K x K matrix)")
    thresholds = read_thresholds(args.threshold, classes) if multi_label else None
    path = args.data
    if not path:  # the data the first checkpoint was trained on
        ck_args = ck0.get("args") or {}
        path, args.data_format = ck_args.get("data"), args.data_format or ck_args.get("data_format")
        if not path:
            raise UserError(f"{ckpts[0][0]}: records no training data; pass --data PATH")
    if args.split in ("train", "val") or args.tune_threshold:
        _check_same_split(ckpts)

    ds, probs, split, seconds = ensemble_predict(args, ckpts, path, args.split, views, device)
    written = []
    result: dict = {"split": split, "images": len(ds), "views": [v.name for v in views]}
    if args.tune_threshold:
        thresholds, info, s2 = tune_on_val(args, ckpts, path, split, ds, probs, views, device)
        seconds += s2
        written.append(Path(info["file"]))
        result["thresholds"] = info

    kind = "multi" if multi_label else ("mask" if ds.fmt == "mask" else "single")
    if multi_label:
        labels = (probs >= thresholds).astype(np.int64)
    else:
        labels = probs.argmax(1)
    written.append(vote.write_submission(out, ds.ids, labels, kind, classes))
    if args.return_probs:
        written += vote.write_probs(
            out, ds.ids, probs, classes, multi_label, fmt=args.probs_format, kind=kind
        )
    skipped = ds.info.get("skipped") or []
    if skipped:
        print(f"warning: {len(skipped)} unreadable images are missing from {out}", file=sys.stderr)

    y = _labels_in(ds, classes, multi_label)
    metrics = None
    if y is not None and len(ds):
        m = label_metrics(probs, y.numpy(), classes, multi_label, thresholds)
        if m["n"]:
            _print_per_class(m, classes, multi_label)
            metrics = {k: v for k, v in m.items() if not k.startswith("_")}
            if kind == "mask" and not multi_label:
                metrics.update(_mask_head_metrics(m))
            if args.confusion:
                cm = vote.confusion_matrix(m["_true"], m["_pred"], len(classes))
                written.append(vote.plot_confusion(cm, classes, args.confusion))
            mpath = Path(_stem(out) + ".metrics.json")
            per_class = [None if math.isnan(a) else a for a in metrics["per_class_accuracy"]]
            write_json(
                mpath,
                {
                    "split": split,
                    "checkpoints": args.checkpoints,
                    **metrics,
                    "per_class_accuracy": per_class,
                },
            )
            written.append(mpath)
    elif args.confusion:
        print(f"warning: {split} split has no labels; no --confusion plot", file=sys.stderr)
    result.update(
        out=str(out),
        written=[str(w) for w in written],
        metrics=metrics,
        seconds=seconds,
        images_per_s=len(ds) / max(seconds, 1e-9),
        checkpoints=[c[0] for c in ckpts],
    )
    _print_summary(args, ckpts, views, ds, split, result, time.perf_counter() - t_start)
    return result


def tune_on_val(args, ckpts, path, split, ds, probs, views, device):
    """Per-class thresholds tuned on the checkpoints' val split, saved beside --out.

    Returns (thresholds, {"at_0.5", "tuned", "file"}, extra prediction seconds).
    """
    classes = [str(c) for c in ckpts[0][2]["classes"]]
    seconds = 0.0
    if split == "val":
        vs, vp = ds, probs
    else:
        vs, vp, _, seconds = ensemble_predict(args, ckpts, path, "val", views, device)
    vy = _labels_in(vs, classes, True)
    if vy is None or len(vs) == 0:
        raise UserError(f"{path}: the val split has no labels; cannot tune thresholds")
    vy = vy.numpy()
    thresholds = tune_thresholds(vp, vy, args.tune_threshold)
    score = exact_match if args.tune_threshold == "exact" else _macro_f1_at
    before, after = score(vp, vy, np.full(len(classes), 0.5)), score(vp, vy, thresholds)
    tpath = Path(_stem(Path(args.out)) + ".thresholds.json")
    write_json(
        tpath,
        {
            "metric": args.tune_threshold,
            "classes": classes,
            "thresholds": thresholds.tolist(),
            "val_images": len(vs),
            "val_hash": (ckpts[0][2].get("split") or {}).get("val_hash"),
            "val_score_at_0.5": before,
            "val_score_tuned": after,
            "checkpoints": [c[0] for c in ckpts],
            "tta": [v.name for v in views],
        },
    )
    print(
        f"thresholds tuned for {args.tune_threshold} on {len(vs)} val images: {before:.4f} "
        f"at 0.5 -> {after:.4f} (range {thresholds.min():.2f}..{thresholds.max():.2f})"
    )
    if split == "val":
        print("warning: metrics on the split the thresholds were tuned on are optimistic")
    return thresholds, {"at_0.5": before, "tuned": after, "file": str(tpath)}, seconds


def _macro_f1_at(probs, labels, thresholds) -> float:
    pred = (np.asarray(probs) >= np.asarray(thresholds)).astype(np.int64)
    return vote.macro_f1((np.asarray(labels) > 0.5).astype(np.int64), pred)


def _print_summary(args, ckpts, views, ds, split, r, total) -> None:
    w = parse_weights(args.weights, len(ckpts))
    names = ", ".join(
        f"{Path(p).parent.name}/{Path(p).name}" + (f" x{w[i]:g}" if w else "")
        for i, (p, _, _) in enumerate(ckpts)
    )
    view_names = ", ".join(v.name for v in views[:8]) + (", ..." if len(views) > 8 else "")
    rows = [
        ["checkpoints", f"{len(ckpts)}: {names}"],
        [
            "TTA views",
            f"{len(views)} ({view_names}), merge {args.merge}, one forward of {len(views)}xB",
        ],
        ["data", f"{ds.source} [{ds.fmt}, split {split}]"],
        ["images", len(ds)],
        [
            "images/s",
            f"{r['images_per_s']:,.0f} ({r['seconds']:.2f} s predicting, {total:.2f} s total)",
        ],
    ]
    m = r["metrics"]
    if m:
        acc = "exact-match accuracy" if ckpts[0][2].get("multi_label") else "accuracy"
        rows += [[acc, m["accuracy"]], ["macro-F1", m["macro_f1"]]]
        rows += [
            [k.replace("_", " "), v]
            for k, v in m.items()
            if k.endswith("_accuracy") and k != "accuracy" and k != "per_class_accuracy"
        ]
    rows.append(["wrote", ", ".join(r["written"])])
    print(format_table(rows, ["infer.py", "value"]))


def main(argv: Sequence[str] | None = None) -> dict:
    with cli_errors("infer.py"):
        args = parse_args(build_parser(), argv)
        return run(args)


if __name__ == "__main__":
    main()
