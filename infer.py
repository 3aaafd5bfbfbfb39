"""Predict with one or more checkpoints: test-time augmentation, weighted ensembles, submissions.

    python infer.py runs/a/best.pt --data PATH --out sub.csv
    python infer.py a.pt b.pt c.pt --weights 1.5,1,1 --tta flip,shift --return-probs
    python infer.py runs/ml/best.pt --data PATH --tta rot90 --tune-threshold f1
    python infer.py MODEL IMAGEDIR --image-size 384 --batch-size 64 --use-tta --return-probs
                                                       # the dirty-MNIST seed's own form

TTA follows ttach: a view is a pair (augment, de-augment) of functions on a batch, views compose
by name (`--tta flip,shift` = every flip x every shift), and the per-view probabilities are merged
by a named reduction. All k views of a batch go through the model in ONE forward call of k*B
images (a `forward(model, x)` handed to train.predict), not one call per view. Several
checkpoints are averaged in probability space (vote.soft_vote), optionally weighted. Every
input is checked and the predictions made before anything is written; the submission and its
companions (probabilities, metrics, thresholds, --confusion) then appear together
(common.Outputs), never on top of an input.
"""

from __future__ import annotations

import argparse
import math
import os
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
    HelpFormatter,
    Outputs,
    UserError,
    accuracy,
    add_common_flags,
    add_label_limit_flags,
    brief,
    cli_errors,
    confusion_matrix,
    float_range,
    format_table,
    is_number,
    macro_f1,
    multi_hot,
    parse_args,
    per_class_accuracy,
    positive_float,
    positive_int,
    read_thresholds,
    refuse_output_on_input,
    resolve_label_limits,
    size2,
    threshold_arg,
)

TTA_NAMES = ("flip", "vflip", "rot90", "shift", "scale", "five-crop")
MERGES = ("mean", "gmean", "max")
SPLIT_CHOICES = ("auto", *data.SPLITS)

# ---------------------------------------------------------------------------
# TTA views: (augment, de-augment) pairs of functions on an N x C x H x W batch, built from
# data.py's geometric ops (hflip, vflip, rot90, shift: the ones augmentation uses). For classifiers
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
        return [IDENTITY, View("hflip", data.hflip, data.hflip)]
    if name == "vflip":
        return [IDENTITY, View("vflip", data.vflip, data.vflip)]
    if name == "rot90":
        return [IDENTITY] + [
            View(f"rot{90 * k}", lambda x, k=k: data.rot90(x, k), lambda y, k=k: data.rot90(y, -k))
            for k in (1, 2, 3)
        ]
    if name == "shift":  # airbench: the image and its two diagonal 1-px translations
        p = shift_px
        return [IDENTITY] + [
            View(
                f"shift({d:+d},{d:+d})",
                lambda x, d=d: data.shift(x, d, d),
                lambda y, d=d: data.shift(y, -d, -d),
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
# Checkpoints


class Member(NamedTuple):
    """One checkpoint of the ensemble: its path, the model (eval mode) and its metadata."""

    path: str
    model: torch.nn.Module
    meta: models.CheckpointMeta


def load_checkpoints(paths: Sequence[str], device) -> list[Member]:
    """One Member per file; they must agree on the classes and the label type."""
    out = []
    for p in paths:
        model, ck = models.load_model(p, device)
        meta = models.read_meta(ck, str(p))
        if meta.task != "classify":
            raise UserError(
                f"{p}: a {meta.task} checkpoint (self-supervised), not a classifier; "
                "fine-tune it on labels first"
            )
        lacks = [
            k for k in ("classes", "mean", "std", "img_size", "in_chans") if not getattr(meta, k)
        ]
        if lacks:
            raise UserError(f"{p}: checkpoint lacks '{lacks[0]}'; re-save it with train.py")
        out.append(Member(str(p), model, meta))
    first = out[0]
    for m in out[1:]:
        if m.meta.classes != first.meta.classes:
            raise UserError(
                f"{m.path}: classes {brief(m.meta.classes)} differ from {first.path}'s "
                f"{brief(first.meta.classes)}; ensemble only checkpoints trained on the same classes"
            )
        if m.meta.multi_label != first.meta.multi_label:
            raise UserError(
                f"{m.path}: multi_label={m.meta.multi_label} but {first.path} has "
                f"{first.meta.multi_label}; ensemble only models of the same task"
            )
    return out


def trained_augs(meta: models.CheckpointMeta) -> list[str]:
    """The --aug names a checkpoint was trained with (from its recorded args)."""
    return data._aug_names(meta.args.get("aug") or "")  # the parser training itself uses


def check_tta(names: Sequence[str], ckpts: Sequence[Member], force: bool) -> None:
    """rot90 TTA only for rotation-invariant training (--aug rot90) and square images."""
    if "rot90" not in names:
        return
    for m in ckpts:
        h, w = m.meta.img_size
        if h != w:
            raise UserError(f"{m.path}: rot90 TTA needs square images, the model takes {h}x{w}")
        if "rot90" not in trained_augs(m.meta) and not force:
            augs = ",".join(trained_augs(m.meta)) or "none"
            raise UserError(
                f"{m.path}: trained without --aug rot90 (aug: {augs}), so rotated views would "
                "hurt; drop rot90 from --tta or pass --force-tta"
            )


def parse_weights(values, n: int) -> list[float] | None:
    """--weights 1.5,1,1 -> one non-negative weight per checkpoint (None: equal)."""
    w = vote.parse_weights(values, n, what="checkpoints")
    return None if w is None else w.tolist()


# ---------------------------------------------------------------------------
# Data


def _opts(args, meta: models.CheckpointMeta) -> data.Opts:
    """How to read the data for a checkpoint: at its size (or --img-size) and channels."""
    return data.Opts.of_checkpoint(
        meta,
        args.img_size,
        skip_bad_images=args.skip_bad_images,
        label_column=args.label_column,
        quiet=args.quiet,
        cache_dir=args.cache_dir,
    )


def load_for(args, path: str, split: str, m: Member, opts: data.Opts) -> tuple[data.ImageSet, str]:
    """(the split decoded with `opts` (_opts: the checkpoint's size/channels), the split's name).

    auto: the data set's test part where it has one, else all of it; val/train: the split
    recorded in the checkpoint, rebuilt and its validation hash checked (data.load_recorded_split).
    """
    if split == "auto":
        try:
            return data.load_images(path, args.data_format, "test", opts), "test"
        except data.MissingPartError:
            split = "all"
    try:
        ds = data.load_recorded_split(m.meta, path, split, args.data_format, m.path, opts)
    except data.MissingPartError as e:
        raise UserError(f"{e}; use --split all (or val)") from None
    return ds, split


def _check_same_split(ckpts: Sequence[Member]) -> None:
    first = ckpts[0]
    for m in ckpts[1:]:
        if m.meta.split.get("val_hash") != first.meta.split.get("val_hash"):
            raise UserError(
                f"{m.path}: validation split (hash {m.meta.split.get('val_hash')}) differs from "
                f"{first.path}'s ({first.meta.split.get('val_hash')}); --split val/train and "
                "--tune-threshold need one shared held-out set"
            )


def _labels_in(ds: data.ImageSet, meta: models.CheckpointMeta, source: str) -> torch.Tensor | None:
    """The data's labels in the checkpoint's class order, or None (unlabelled / other classes)."""
    if not ds.has_labels:
        return None
    try:
        return data.map_labels(ds, meta.classes, meta.multi_label, source)
    except data.ClassMismatchError as e:
        print(f"warning: {e}; no metrics", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------
# Prediction


class Job(NamedTuple):
    """What every prediction of one infer.py run shares."""

    args: argparse.Namespace
    ckpts: Sequence[Member]
    path: str  # the data
    views: list[View]
    rt: models.Runtime


def ensemble_predict(job: Job, split: str):
    """(ImageSet, N x K probabilities, split, seconds): weighted mean of TTA probs."""
    args, ckpts, path, views, rt = job
    sets: dict[tuple, data.ImageSet] = {}
    probs = []
    seconds = 0.0
    for m in ckpts:
        opts = _opts(args, m.meta)
        key = (opts.img_size, opts.in_chans)
        if key not in sets:  # decode once per size (cached on disk anyway)
            sets[key], split = load_for(args, path, split, m, opts)
        ds = sets[key]
        first = next(iter(sets.values()))
        if ds.ids != first.ids:
            raise UserError(
                f"{m.path}: the data decoded at {key[0]} has other images than at "
                f"{next(iter(sets))[0]} (unreadable files?); fix the data or drop --skip-bad-images"
            )
        model = m.model
        if rt.channels_last:  # before compiling (train.predict would do it for a plain model)
            model.to(memory_format=torch.channels_last)
        if rt.compile:
            model = torch.compile(model)
        ml = m.meta.multi_label
        fwd = train.probs_forward(ml) if views == [IDENTITY] else tta_forward(views, args.merge, ml)
        t0 = time.perf_counter()
        p = train.predict(model, ds.images, m.meta.mean, m.meta.std, rt, fwd)
        seconds += time.perf_counter() - t0
        probs.append(p.numpy())
    merged = vote.soft_vote(probs, parse_weights(args.weights, len(ckpts))).astype(np.float32)
    return next(iter(sets.values())), merged, split, seconds


# ---------------------------------------------------------------------------
# Metrics (common.py's, the one implementation)


def label_metrics(probs, y, classes, multi_label, thresholds, limits=(0, 0)) -> dict:
    """accuracy (exact match if multi-label), macro-F1 and per-class accuracy of predictions."""
    k = len(classes)
    if multi_label:
        t = (np.asarray(y) > 0.5).astype(np.int64)
        pred = multi_hot(probs, thresholds, *limits)
        support = t.sum(0)
    else:
        keep = np.asarray(y) >= 0
        t, pred = np.asarray(y)[keep].astype(np.int64), probs[keep].argmax(1)
        support = np.bincount(t, minlength=k)[:k]
    return {
        "accuracy": accuracy(t, pred),
        "macro_f1": macro_f1(t, pred, n_classes=None if multi_label else k),
        "per_class_accuracy": per_class_accuracy(t, pred, None if multi_label else k).tolist(),
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
        f"{name}_accuracy": accuracy(a, b)
        for name, a, b in zip(("mask", "gender", "age"), data.mask_heads(t), data.mask_heads(p))
    }


# ---------------------------------------------------------------------------
# CLI


def _size_arg(text: str) -> tuple[int, int]:
    try:
        return size2(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="checkpoint(s) to ensemble; without --data, a last argument that is a folder is "
        "the images to predict (the dirty-MNIST seed's `infer.py MODEL IMAGEDIR`)",
    )
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
    g.add_argument(
        "--img-size",
        "--image-size",
        dest="img_size",
        type=_size_arg,
        default=None,
        metavar="N|HxW",
        help="decode images at this size instead of the checkpoint's training size",
    )
    g.add_argument("--label-column", default=None, help="CSV label column (default: auto)")
    g.add_argument("--cache-dir", default=None, help="decoded-tensor cache (~/.cache/imgcls)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")

    g = p.add_argument_group("ensemble and TTA")
    g.add_argument(
        "--weights",
        type=vote.WEIGHTS,
        default=None,
        help="one weight per CKPT, e.g. 1.5,1,1 (default: equal)",
    )
    g.add_argument(
        "--tta",
        default="none",
        help=f"comma list of views composed as a product: none,{','.join(TTA_NAMES)}",
    )
    g.add_argument(
        "--use-tta", action="store_true", help="add rot90 to --tta (the dirty-MNIST seed's flag)"
    )
    g.add_argument("--merge", choices=MERGES, default="mean", help="how views are merged")
    g.add_argument(
        "--force-tta", action="store_true", help="allow rot90 TTA for non-rotation-trained models"
    )
    g.add_argument("--shift-px", type=positive_int, default=1, help="shift: translation in pixels")
    g.add_argument(
        "--scale", type=positive_float, default=1.1, help="scale: zoom factor (in and out)"
    )
    g.add_argument(
        "--crop-ratio",
        type=float_range(0, 1, lo_open=True),
        default=0.875,
        help="five-crop: crop side ratio",
    )

    g = p.add_argument_group("output")
    g.add_argument("--out", default="submission.csv", help="submission CSV")
    g.add_argument(
        "--return-probs",
        action="store_true",
        help="also write probabilities beside --out; a 3-head model (train.py --heads): the "
        "18-class probabilities, the product of the heads' softmaxes (ans = their argmaxes "
        "combined, mask*6 + gender*3 + age)",
    )
    g.add_argument("--probs-format", choices=["npy", "csv"], default="npy")
    g.add_argument(
        "--threshold",
        type=threshold_arg,
        default=None,
        help="multi-label: probability threshold (None: 0.5), or a .thresholds.json from "
        "--tune-threshold",
    )
    g.add_argument(
        "--tune-threshold",
        choices=["f1", "exact"],
        default=None,
        help="multi-label: per-class thresholds maximising F1 or exact match on the "
        "checkpoint's val split (saved as <out stem>.thresholds.json); exact is scored "
        "under --min-labels / --max-labels",
    )
    add_label_limit_flags(g)
    g.add_argument("--confusion", default=None, metavar="FILE.png", help="confusion matrix plot")

    g = models.add_runtime_flags(p)
    g.add_argument(
        "--batch-size",
        dest="eval_batch_size",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="the same as --eval-batch-size: images per forward (x views)",
    )
    return p


def _seed_positionals(args) -> None:
    """`infer.py MODEL IMAGEDIR`: without --data, a trailing folder is the data, not a CKPT."""
    ck = args.checkpoints
    if args.data is None and len(ck) > 1 and Path(ck[-1]).is_dir():
        args.data, args.checkpoints = ck[-1], ck[:-1]


def planned_outputs(args) -> list[tuple[str, Path]]:
    """Every file this command may write (flag, path), refused when two are the same file."""
    paths = vote.probs_paths(args.out)
    extra = [("--out (metrics)", paths["metrics"])]
    if args.tune_threshold:
        extra.append(("--tune-threshold", paths["thresholds"]))
    return vote.planned_outputs(args, extra)


def _refuse_outputs_on_inputs(args, outs, data_path: str) -> None:
    """No output may be a checkpoint, the thresholds file, the config, or a file of the data."""
    inputs = [("CKPT", p) for p in args.checkpoints] + [("--config", args.config)]
    if args.threshold is not None and not is_number(args.threshold):
        inputs.append(("--threshold", args.threshold))
    root = Path(data_path)
    if root.is_file():
        inputs.append(("--data", root))
    elif root.is_dir():  # existing files inside the data set are its inputs (labels.csv, ...)
        real = os.path.realpath(root) + os.sep
        inputs += [
            ("--data", p) for _, p in outs if p.is_file() and os.path.realpath(p).startswith(real)
        ]
    refuse_output_on_input(outs, inputs)


def run(args) -> dict:
    """Predict, write the submission (and probabilities), print metrics when labels are known.

    Everything is checked and computed first; then all outputs are written as one transaction
    (common.Outputs), so a failure leaves the previous files as they were."""
    t_start = time.perf_counter()
    _seed_positionals(args)
    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise UserError(f"--out {args.out}: the submission is a CSV; name it like sub.csv")
    names = tta_names(args.tta) + (
        ["rot90"] if args.use_tta and "rot90" not in tta_names(args.tta) else []
    )
    views = tta_views(names, args.shift_px, args.scale, args.crop_ratio)
    rt = models.setup_runtime(args)
    ckpts = load_checkpoints(args.checkpoints, rt.device)
    parse_weights(args.weights, len(ckpts))  # fail before any work
    check_tta(names, ckpts, args.force_tta)
    meta0 = ckpts[0].meta
    classes, multi_label = list(meta0.classes), meta0.multi_label
    if args.tune_threshold and not multi_label:
        raise UserError("--tune-threshold: only for multi-label checkpoints")
    if args.confusion and multi_label:
        raise UserError("--confusion: needs a single-label model (multi-label has no K x K matrix)")
    if args.img_size and tuple(args.img_size) != tuple(meta0.img_size):
        for m in ckpts:  # the dry run is on the CPU
            models._check_size(m.model.cpu(), m.meta.arch, int(m.meta.in_chans), args.img_size)
            m.model.to(rt.device)
    if args.threshold is not None and not multi_label:
        raise UserError("--threshold: only for multi-label checkpoints (single-label: argmax)")
    thresholds, recorded = (None, (0, 0))
    if multi_label:
        thresholds, recorded = read_thresholds(args.threshold or "0.5", classes)
    given = (args.min_labels, args.max_labels)
    limits = resolve_label_limits(args, multi_label, len(classes), recorded)
    if any(recorded) and given == (None, None):
        print(
            f"--threshold {args.threshold}: tuned for {_limits_text(limits)} labels per image; "
            "applying that (--min-labels / --max-labels to change it)"
        )
    path = args.data
    if not path:  # the data the first checkpoint was trained on
        path = meta0.args.get("data")
        args.data_format = args.data_format or meta0.args.get("data_format")
        if not path:
            raise UserError(f"{ckpts[0].path}: records no training data; pass --data PATH")
    outs = planned_outputs(args)
    _refuse_outputs_on_inputs(args, outs, path)
    vote.check_plot_path(args.confusion)
    if args.return_probs:
        vote._str_list(classes, ckpts[0].path, "class")  # a line break would break classes.txt
    if args.split in ("train", "val") or args.tune_threshold:
        _check_same_split(ckpts)

    job = Job(args, ckpts, path, views, rt)
    ds, probs, split, seconds = ensemble_predict(job, args.split)
    result: dict = {"split": split, "images": len(ds), "views": [v.name for v in views]}
    tuned = None
    if args.tune_threshold:
        thresholds, tuned, s2 = tune_on_val(job, split, ds, probs)
        seconds += s2
        result["thresholds"] = {k: tuned[k] for k in ("at_0.5", "tuned", "file")}

    kind = "multi" if multi_label else ("mask" if ds.fmt == "mask" else "single")
    labels = multi_hot(probs, thresholds, *limits) if multi_label else probs.argmax(1)
    y = _labels_in(ds, meta0, ckpts[0].path)
    metrics = m = None
    if y is not None and len(ds):
        m = label_metrics(probs, y.numpy(), classes, multi_label, thresholds, limits)
        if m["n"]:
            _print_per_class(m, classes, multi_label)
            metrics = {k: v for k, v in m.items() if not k.startswith("_")}
            if kind == "mask" and not multi_label:
                metrics.update(_mask_head_metrics(m))
        else:
            m = None
    if args.confusion and m is None:
        print(f"warning: {split} split has no labels; no --confusion plot", file=sys.stderr)

    with Outputs() as o:  # every output becomes visible together, or none
        written = [vote.write_submission(out, ds.ids, labels, kind, classes, out=o)]
        if args.return_probs:
            pr = vote.Probs(ds.ids, probs, classes, multi_label, kind)
            written += vote.write_probs(out, pr, args.probs_format, o)
        if tuned is not None:
            o.json(tuned["file"], tuned["record"])
            written.append(Path(tuned["file"]))
        if metrics is not None:
            mpath = vote.probs_paths(out)["metrics"]
            per_class = [None if math.isnan(a) else a for a in metrics["per_class_accuracy"]]
            record = {"split": split, "checkpoints": [c.path for c in ckpts], **metrics}
            o.json(mpath, {**record, "per_class_accuracy": per_class})
            written.append(mpath)
            if args.confusion:
                cm = confusion_matrix(m["_true"], m["_pred"], len(classes))
                written.append(vote.plot_confusion(cm, classes, args.confusion, out=o))
    skipped = ds.info.get("skipped") or []
    if skipped:
        print(f"warning: {len(skipped)} unreadable images are missing from {out}", file=sys.stderr)
    result.update(
        out=str(out),
        written=[str(w) for w in written],
        metrics=metrics,
        seconds=seconds,
        images_per_s=len(ds) / max(seconds, 1e-9),
        checkpoints=[c.path for c in ckpts],
    )
    _print_summary(job, ds, result, time.perf_counter() - t_start)
    return result


def tune_on_val(job: Job, split: str, ds: data.ImageSet, probs: np.ndarray):
    """Per-class thresholds tuned on the checkpoints' val split (written beside --out later);
    `ds` / `probs` are the predicted `split`'s, reused when it is val.

    Returns (thresholds, {"at_0.5", "tuned", "file", "record"}, extra prediction seconds).
    """
    args, ckpts, path, views, _ = job
    classes = list(ckpts[0].meta.classes)
    seconds = 0.0
    if split == "val":
        vs, vp = ds, probs
    else:
        vs, vp, _, seconds = ensemble_predict(job, "val")
    vy = _labels_in(vs, ckpts[0].meta, ckpts[0].path)
    if vy is None or len(vs) == 0:
        raise UserError(f"{path}: the val split has no labels; cannot tune thresholds")
    vy = vy.numpy()
    limits = (args.min_labels, args.max_labels)
    thresholds, record = vote.tune_record(
        vp, vy, args.tune_threshold, limits, classes, "val images"
    )
    record["val_hash"] = ckpts[0].meta.split.get("val_hash")
    record["checkpoints"] = [c.path for c in ckpts]
    record["tta"] = [v.name for v in views]
    if split == "val":
        print("warning: metrics on the split the thresholds were tuned on are optimistic")
    tfile = str(vote.probs_paths(args.out)["thresholds"])
    scores = {"at_0.5": record["val_score_at_0.5"], "tuned": record["val_score_tuned"]}
    return thresholds, {**scores, "file": tfile, "record": record}, seconds


def _limits_text(limits) -> str:
    return f"{limits[0]} to {limits[1] or 'any'}"


def _print_summary(job: Job, ds: data.ImageSet, r: dict, total: float) -> None:
    args, ckpts, _, views, _ = job
    w = parse_weights(args.weights, len(ckpts))
    names = ", ".join(
        str(Path(*Path(m.path).parts[-2:])) + (f" x{w[i]:g}" if w else "")
        for i, m in enumerate(ckpts)
    )
    view_names = ", ".join(v.name for v in views[:8]) + (", ..." if len(views) > 8 else "")
    rows = [
        ["checkpoints", f"{len(ckpts)}: {names}"],
        [
            "TTA views",
            f"{len(views)} ({view_names}), merge {args.merge}, one forward of {len(views)}xB",
        ],
        ["data", f"{ds.source} [{ds.fmt}, split {r['split']}]"],
        ["images", len(ds)],
        [
            "images/s",
            f"{r['images_per_s']:,.0f} ({r['seconds']:.2f} s predicting, {total:.2f} s total)",
        ],
    ]
    if args.min_labels or args.max_labels:
        rows.append(["labels per image", _limits_text((args.min_labels, args.max_labels))])
    m = r["metrics"]
    if m:
        acc = "exact-match accuracy" if ckpts[0].meta.multi_label else "accuracy"
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
