"""Model soups: average the weights of models fine-tuned from one start (Wortsman et al., 2022).

    python soup.py --ingredients 'runs/ft/*/best.pt' --eval-individual --uniform --greedy --plot \\
        --out runs/soup
    python soup.py --ingredients a.pt b.pt c.pt --uniform --bn-recalib 50 --out runs/soup_bn
    python soup.py --ingredients 'runs/ft/*/best.pt' --eval-individual-models --uniform-soup \\
        --greedy-soup --plot     # the model-soups seed's own flags

The held-out set is the validation split recorded in the ingredients (rebuilt and its hash
verified by data.load_recorded_split), or --holdout PATH. It is decoded once and kept on the
device. Ingredients are streamed from disk one at a time, so memory stays at about three state
dicts (running soup, next ingredient, candidate) plus the model being evaluated, whatever their
number. Greedy soup is the reference algorithm: sort by held-out accuracy, start from the best,
add each next one as a running uniform average and keep it only if the held-out score does not
drop (--greedy-strict: only if it rises). Weights are mixed by models.interpolate_state, the one
interpolation rule (also used by train.py's EMA and finetune.py's WiSE-FT). Every output is
written at the end, together (common.Outputs): a failure or a kill leaves the previous soup as
it was.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import data
import models
import train
from common import (
    METRIC_KEYS,
    METRICS,
    DirLock,
    HelpFormatter,
    Outputs,
    Timer,
    UserError,
    add_common_flags,
    brief,
    check_writable_dir,
    cli_errors,
    ensure_new_output,
    format_table,
    int_range,
    jsonable,
    metric_name,
    natural_key,
    nonneg_int,
    parse_args,
    positive_float,
    positive_int,
    progress,
    pyplot,
    refuse_output_on_input,
    seed_int,
    write_jsonl,
)

OUTPUTS = (
    "individual.jsonl", "greedy.jsonl", "uniform_soup.pt", "greedy_soup.pt", "learned_soup.pt",
    "soup.png", "summary.json",
)  # fmt: skip
# CheckpointMeta fields every ingredient must share, with the words used when they differ.
SAME_META = (
    ("arch", "architecture"),
    ("model_kwargs", "model settings"),
    ("num_classes", "number of classes"),
    ("classes", "classes"),
    ("in_chans", "input channels"),
    ("img_size", "image size"),
    ("multi_label", "label type"),
    ("task", "task"),
)


class Ingredient(NamedTuple):
    """One checkpoint of the soup: its path, metadata (training state dropped) and tensor shapes."""

    path: str
    meta: models.CheckpointMeta
    shapes: dict


# ---------------------------------------------------------------------------
# Flags


def build_parser() -> argparse.ArgumentParser:
    """All soup flags, grouped."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    add_common_flags(p)
    g = p.add_argument_group("ingredients and data")
    g.add_argument(
        "--ingredients",
        nargs="+",
        required=True,
        metavar="PATH",
        help="checkpoints and/or quoted glob patterns ('runs/ft/*/best.pt'; ** recurses)",
    )
    g.add_argument(
        "--data", default=None, help="the ingredients' data set (None: the path recorded in them)"
    )
    g.add_argument("--data-format", default=None, help="override auto-detection")
    g.add_argument(
        "--holdout", default=None, help="another labelled set to choose and score soups on"
    )
    g.add_argument(
        "--holdout-split",
        choices=["all", "train", "val", "test"],
        default="all",
        help="--holdout: which part of it",
    )
    g.add_argument("--holdout-format", default=None, help="--holdout: override auto-detection")
    g.add_argument(
        "--cache-dir",
        default=None,
        help="decoded-tensor cache (None: $IMGCLS_CACHE or ~/.cache/imgcls)",
    )

    g = p.add_argument_group("soups (the model-soups seed's --eval-individual-models, "
                             "--uniform-soup, --greedy-soup are accepted too)")  # fmt: skip
    g.add_argument(
        "--eval-individual",
        "--eval-individual-models",
        dest="eval_individual",
        action="store_true",
        help="score every ingredient",
    )
    g.add_argument(
        "--uniform", "--uniform-soup", dest="uniform", action="store_true", help="average all"
    )
    g.add_argument(
        "--greedy",
        "--greedy-soup",
        dest="greedy",
        action="store_true",
        help="greedy soup (scores every ingredient first)",
    )
    g.add_argument(
        "--greedy-order",
        choices=["accuracy", "random"],
        default="accuracy",
        help="candidate order: best held-out score first, or shuffled with --seed",
    )
    g.add_argument(
        "--greedy-strict",
        action="store_true",
        help="keep a candidate only if the score rises (reference code); default: does not drop",
    )
    g.add_argument(
        "--metric",
        type=metric_name,
        default="accuracy",
        help=f"held-out score to rank and pick: {' or '.join(METRICS)} (aliases acc, f1)",
    )
    g.add_argument(
        "--learned",
        action="store_true",
        help="learn softmax mixing weights on the held-out set (holds all ingredients in memory)",
    )
    g.add_argument(
        "--learned-steps", type=positive_int, default=50, help="--learned: optimiser steps"
    )
    g.add_argument("--learned-lr", type=positive_float, default=0.05, help="--learned: Adam lr")
    g.add_argument(
        "--bn-recalib",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="re-estimate BatchNorm statistics of every soup on N training batches (0: off)",
    )
    g.add_argument("--plot", action="store_true", help="draw soup.png (needs matplotlib)")
    g.add_argument(
        "--seed",
        "--random-seed",
        dest="seed",
        type=seed_int,
        default=0,
        help="random order, BN-recalibration images and --learned batches",
    )

    g = models.add_runtime_flags(p, compile_flag=False)
    g.add_argument(
        "--batch-size",
        type=int_range(2),
        default=256,
        help="BN-recalibration and --learned batch (--eval-batch-size: held-out scoring)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/soup", help="output directory")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of a past run (at the end, once the new ones are written)",
    )
    return p


# ---------------------------------------------------------------------------
# Averaging: pure functions on state dicts, mixed by models.interpolate_state


def _acc_dtype(dtype: torch.dtype, acc_dtype: torch.dtype | None) -> torch.dtype:
    # float32 keeps memory at one model; float64 tensors stay float64.
    return acc_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)


def _same_layout(ref: dict, sd: dict, what: str) -> None:
    if ref.keys() != sd.keys():
        diff = sorted(set(ref) ^ set(sd))
        raise ValueError(f"{what}: state dict keys differ ({', '.join(diff[:3])})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(ref[k].shape):
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)}, not {tuple(ref[k].shape)}")


def _accumulator(sd: dict, acc_dtype: torch.dtype | None = None) -> dict:
    """A copy of `sd` with floating tensors in the accumulation dtype."""
    return {
        k: v.detach().to(_acc_dtype(v.dtype, acc_dtype), copy=True)
        if v.is_floating_point()
        else v.detach().clone()
        for k, v in sd.items()
    }


def average_state_dicts(
    state_dicts: Iterable[dict],
    weights: Sequence[float] | None = None,
    acc_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts, consumed one at a time (a generator keeps memory flat).

    Floating tensors: running mean in float32 (float64 for float64 tensors, or `acc_dtype`),
    cast back to the first state dict's dtype. Integer/bool tensors (BatchNorm
    num_batches_tracked) follow models.interpolate_state: those of the last state dict with a
    positive weight. Weights need not sum to one.
    """
    mean: dict | None = None
    dtypes: dict = {}
    total, n = 0.0, 0
    for sd in state_dicts:
        if weights is not None and n >= len(weights):
            raise ValueError(f"more state dicts than the {len(weights)} weights")
        w = 1.0 if weights is None else float(weights[n])
        if not w >= 0:
            raise ValueError(f"weight {n} is {w}; weights must be >= 0")
        sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
        if mean is None:
            dtypes = {k: v.dtype for k, v in sd.items()}
            mean = _accumulator(sd, acc_dtype)
        else:
            _same_layout(mean, sd, f"item {n}")
        total += w
        if n > 0 and total > 0:
            # Running mean m += (x - m) * w / total: N copies of one model average to it exactly.
            models.interpolate_state(mean, sd, w / total, inplace=True)
        n += 1
    if mean is None:
        raise ValueError("no state dicts to average")
    if weights is not None and n != len(weights):
        raise ValueError(f"{n} state dicts but {len(weights)} weights")
    if total <= 0:
        raise ValueError("weights sum to zero")
    return {k: v.to(dtypes[k]) for k, v in mean.items()}


def greedy_soup(
    paths: Sequence,
    evaluate_fn: Callable[[dict], dict],
    start_metrics: dict | None = None,
    load_fn: Callable[[object], dict] | None = None,
    keep: Callable[[dict, dict], bool] | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list, list[dict]]:
    """Greedy soup over `paths` in the order given (best first): (state dict, kept, step log).

    The soup starts as paths[0] (scored `start_metrics`, else evaluated); each next candidate is
    tried as soup * n/(n+1) + new/(n+1) and kept if keep(its metrics, the soup's) holds (default
    keep_rule(): its accuracy does not drop). Only the running soup, the next ingredient and the
    candidate are in memory.
    """
    load_fn = load_fn or models.load_state_dict_file
    keep = keep or keep_rule()
    first = load_fn(paths[0])
    dtypes = {k: v.dtype for k, v in first.items()}
    soup = _accumulator(first)
    del first
    best = start_metrics if start_metrics is not None else evaluate_fn(soup)
    kept = [paths[0]]
    steps = [_step_row(0, paths[0], True, 1, best, best)]
    if on_step:
        on_step(steps[-1])
    for path in paths[1:]:
        new = load_fn(path)
        _same_layout(soup, new, str(path))
        candidate = models.interpolate_state(soup, new, 1.0 / (len(kept) + 1))
        del new
        m = evaluate_fn(candidate)
        accepted = keep(m, best)
        if accepted:
            soup, best = candidate, m
            kept.append(path)
        del candidate
        steps.append(_step_row(len(steps), path, accepted, len(kept), m, best))
        if on_step:
            on_step(steps[-1])
    return {k: v.to(dtypes[k]) for k, v in soup.items()}, kept, steps


def keep_rule(metric: str = "acc", strict: bool = False) -> Callable[[dict, dict], bool]:
    """The greedy soup's test: keep a candidate whose `metric` does not drop (strict: rises)."""
    if strict:
        return lambda m, best: m[metric] > best[metric]
    return lambda m, best: m[metric] >= best[metric]


def _step_row(step: int, path, accepted: bool, n_kept: int, tried: dict, soup: dict) -> dict:
    row = {"step": step, "candidate": str(path), "accepted": accepted, "n_kept": n_kept}
    row.update({f"val_{k}": v for k, v in tried.items()})  # the soup tried at this step
    row.update({f"soup_val_{k}": v for k, v in soup.items()})  # the soup kept after it
    return row


def greedy_order(metrics: Sequence[dict], order: str = "accuracy", seed: int = 0, metric="acc"):
    """Indices in greedy order: best held-out score first (ties: lower loss, then input order)."""
    idx = list(range(len(metrics)))
    if order == "random":
        random.Random(seed).shuffle(idx)
        return idx
    return sorted(idx, key=lambda i: (-metrics[i][metric], metrics[i].get("loss", 0.0), i))


# ---------------------------------------------------------------------------
# BatchNorm re-estimation


def recalibrate_bn(
    model: nn.Module, images: torch.Tensor, mean, std, rt: models.Runtime = train.CPU_FP32
) -> int:
    """Reset BatchNorm running stats and re-estimate them as the plain average over `images`.

    The batches (of rt.eval_batch_size, on rt's device, AMP and layout; default: CPU fp32) go
    through train.predict's loop (normalise, channels_last, autocast); only BN layers run in
    train mode (dropout/drop-path stay off). Returns the number of BN layers.
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an EMA

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if len(x) >= 2:  # train-mode BN needs two samples
            for m in bns:
                m.train()  # predict() put the model in eval mode
            model(x)
            for m in bns:
                m.eval()
        return x.new_zeros(len(x), 0)

    try:
        train.predict(model, images, mean, std, replace(rt, quiet=True), forward)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return len(bns)


# ---------------------------------------------------------------------------
# Ingredients: discovery and compatibility checks


def expand_ingredients(patterns: Sequence[str]) -> list[str]:
    """Paths from literal paths and glob patterns, in natural order, without duplicates."""
    out, seen = [], set()
    for pat in patterns:
        if any(c in pat for c in "*?["):
            hits = sorted(
                (h for h in glob.glob(pat, recursive=True) if Path(h).is_file()), key=natural_key
            )
            if not hits:
                raise UserError(
                    f"--ingredients {pat}: matched no files; check the pattern (quoted, e.g. "
                    "'runs/ft/*/best.pt')"
                )
        else:
            if Path(pat).is_dir():
                raise UserError(
                    f"--ingredients {pat}: is a directory; pass checkpoint files or a pattern "
                    f"such as '{Path(pat) / '*' / 'best.pt'}'"
                )
            if not Path(pat).is_file():
                raise UserError(f"--ingredients {pat}: no such checkpoint; check the path")
            hits = [pat]
        for h in hits:
            key = os.path.realpath(h)
            if key not in seen:
                seen.add(key)
                out.append(h)
    return out


def read_ingredient(path: str) -> Ingredient:
    """Metadata and state-dict shapes of one checkpoint (its tensors and training state dropped)."""
    ck = models.load_checkpoint(path)
    meta = replace(models.read_meta(ck, str(path)), extra={})
    shapes = {k: tuple(v.shape) for k, v in ck["state_dict"].items() if torch.is_tensor(v)}
    return Ingredient(str(path), meta, shapes)


def check_ingredients(infos: Sequence[Ingredient]) -> None:
    """UserError naming both files when an ingredient differs from the first in what matters."""
    a = infos[0]
    fix = "soup only models of one architecture fine-tuned on the same data and split"
    for b in infos[1:]:
        pair = f"{a.path} and {b.path}"
        for key, what in SAME_META:
            va, vb = getattr(a.meta, key), getattr(b.meta, key)
            if va != vb:
                raise UserError(f"{pair} differ in {what} ({brief(va)} vs {brief(vb)}); {fix}")
        sa, sb = a.meta.split, b.meta.split
        if sa.get("val_hash") != sb.get("val_hash"):
            raise UserError(
                f"{pair} were validated on different splits (val_hash {sa.get('val_hash')} vs "
                f"{sb.get('val_hash')}, split seed {sa.get('seed')} vs {sb.get('seed')}, "
                f"val ratio {sa.get('val_ratio')} vs {sb.get('val_ratio')}); train all "
                "ingredients with the same --split-seed and --val-ratio"
            )
        ka, kb = a.shapes, b.shapes
        if ka.keys() != kb.keys():
            only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
            raise UserError(
                f"{pair} have different state_dict keys (only in the first: "
                f"{', '.join(only_a[:3]) or '-'}; only in the second: "
                f"{', '.join(only_b[:3]) or '-'}); {fix}"
            )
        for k in ka:
            if ka[k] != kb[k]:
                raise UserError(
                    f"{pair} differ in the shape of {k} ({list(ka[k])} vs {list(kb[k])}); {fix}"
                )


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    """Normalisation stats equal up to float noise (they are recomputed per run)."""
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(a, b)
    )


def start_warnings(infos: Sequence[Ingredient]) -> list[str]:
    """Warnings (not errors) when ingredients do not look like they share one start."""
    args = [i.meta.args for i in infos]
    out = []
    starts = [a.get("weights") for a in args]
    if len(set(map(str, starts))) > 1:
        j = next(i for i, s in enumerate(starts) if s != starts[0])
        out.append(
            f"{infos[0].path} and {infos[j].path} start from different weights "
            f"({starts[0]} vs {starts[j]}); soups work when all ingredients are fine-tuned from "
            "one pretrained start, expect a poor uniform soup"
        )
    elif starts[0] is None and not any(a.get("pretrained") for a in args):
        seeds = {a.get("random_seed") for a in args}
        if len(seeds) > 1:
            out.append(
                "ingredients were trained from scratch with different --random-seed values, so "
                "they share no start; their average is usually much worse than any of them"
            )
    ref = infos[0].meta
    odd = next(
        (
            i
            for i in infos[1:]
            if not (_close(i.meta.mean, ref.mean) and _close(i.meta.std, ref.std))
        ),
        None,
    )
    if odd is not None:
        out.append(
            f"{odd.path} records another normalisation mean/std ({odd.meta.mean}/{odd.meta.std} "
            f"vs {ref.mean}/{ref.std}); the first one's is used"
        )
    return out


# ---------------------------------------------------------------------------
# Held-out and BN-recalibration data


def _load_like_training(path, split: str, fmt, ref: Ingredient, cache_dir, verify: bool):
    """A part of `path` at the ingredients' image size and channels, reusing training's cache.

    verify: the split the ingredients record, rebuilt and its hash checked
    (data.load_recorded_split); else (another data set, --holdout) the same split rule, unchecked.
    """
    meta = ref.meta
    targs = meta.args
    want = (int(meta.in_chans), *map(int, meta.img_size))
    kw = {"skip_bad_images": bool(targs.get("skip_bad_images", False)), "cache_dir": cache_dir}
    exact = data.Opts.of_checkpoint(meta, **kw)
    # Training's own flags first: same cache key, so no second decode of the data set.
    own = data.Opts(targs.get("img_size"), targs.get("in_chans"), saturation=meta.saturation, **kw)
    tries = [own, exact] if own != exact and "img_size" in targs else [exact]
    for i, opts in enumerate(tries):
        try:
            if verify:
                ds = data.load_recorded_split(meta, path, split, fmt, ref.path, opts)
            else:
                ds, _ = data.load_split(path, split, fmt, data.SplitSpec.of(meta.split), opts)
        except UserError:
            if i + 1 < len(tries):
                continue
            raise
        if len(ds) == 0 or tuple(ds.images.shape[1:]) == want:
            return ds
    return ds


def load_holdout(args, ref: Ingredient) -> tuple[data.ImageSet, str]:
    """The held-out set: the recorded validation split (hash verified) or --holdout."""
    meta = ref.meta
    if args.holdout:
        ds = _load_like_training(
            args.holdout, args.holdout_split, args.holdout_format, ref, args.cache_dir, False
        )
        if not ds.has_labels or len(ds) == 0:
            raise UserError(
                f"--holdout {args.holdout} ({args.holdout_split}): no labelled images; "
                "pass a labelled set or another --holdout-split"
            )
        if ds.classes != meta.classes and meta.task != "rotation":
            raise UserError(
                f"--holdout {args.holdout}: classes {brief(ds.classes)} differ from the "
                f"ingredients' {brief(meta.classes)} ({ref.path}); use a set "
                "labelled with the same classes"
            )
        return ds, f"{args.holdout} ({args.holdout_split}, {len(ds)} images)"
    if not meta.split.get("val_hash") or not meta.split.get("val_ratio"):
        raise UserError(
            f"{ref.path}: records no validation split (val_ratio "
            f"{meta.split.get('val_ratio')}); pass --holdout PATH, a labelled set to score soups on"
        )
    path = data_path(args, ref)
    ds = _load_like_training(path, "val", _data_format(args, ref), ref, args.cache_dir, True)
    return ds, f"{path} (recorded val split, {len(ds)} images)"


def _data_format(args, ref: Ingredient):
    return args.data_format or ref.meta.args.get("data_format")


def data_path(args, ref: Ingredient) -> str:
    """--data, else the data path recorded in the first ingredient's training args."""
    path = args.data or ref.meta.args.get("data")
    if not path:
        raise UserError(
            f"{ref.path}: records no data path; pass --data (the set it was trained on)"
        )
    if not args.data and not Path(path).exists():
        raise UserError(
            f"{ref.path}: recorded data path {path} is not found from here; pass --data"
        )
    return path


def bn_images(args, ref: Ingredient, device: torch.device) -> torch.Tensor:
    """uint8 images for BN re-estimation: --bn-recalib batches of the recorded training split."""
    path = data_path(args, ref)
    ds = _load_like_training(path, "train", _data_format(args, ref), ref, args.cache_dir, True)
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(ds), generator=gen)[: args.bn_recalib * args.batch_size]
    images = ds.images[idx.sort().values]
    # Small enough (the usual case): keep them on the device for every recalibration.
    return images.to(device) if images.numel() < 2**31 else images


# ---------------------------------------------------------------------------
# Scoring soups on the held-out set


class Scorer:
    """The one model every evaluation of a run loads state dicts into, plus the held-out data."""

    def __init__(self, ref: Ingredient, held: data.ImageSet, args, rt, bn: torch.Tensor | None):
        self.model, _ = models.load_model(ref.path, rt.device)  # rebuilt as models.py does it
        self.images = held.images.to(rt.device)  # decoded once, on the device for the whole run
        self.labels = held.labels
        self.meta = ref.meta
        self.bn, self.args, self.rt, self.device = bn, args, rt, rt.device
        self.passes = 0

    def load(self, sd: dict, recalib: bool) -> None:
        """Load `sd` into the model; re-estimate BN statistics when asked and enabled."""
        self.model.load_state_dict(sd)
        if recalib and self.bn is not None:
            rt = replace(self.rt, eval_batch_size=self.args.batch_size)
            recalibrate_bn(self.model, self.bn, self.meta.mean, self.meta.std, rt)

    def score(self, sd: dict | None = None, recalib: bool = True) -> dict:
        """Held-out metrics {"acc", "loss", "f1"|"label_acc"} of `sd` (None: model as loaded)."""
        if sd is not None:
            self.load(sd, recalib)
        self.passes += 1
        return train.evaluate(
            self.model, self.images, self.labels, self.meta, replace(self.rt, quiet=True)
        )

    def state(self, like: dict) -> dict:
        """The model's state dict (e.g. with re-estimated BN stats) in the dtypes of `like`."""
        return {
            k: v.detach().cpu().contiguous().to(like[k].dtype)
            for k, v in self.model.state_dict().items()
        }


# ---------------------------------------------------------------------------
# Learned soup (optional): softmax mixing weights fitted on the held-out set


@contextlib.contextmanager
def _differentiable_eval_bn():
    """Eval-mode F.batch_norm in plain tensor ops, so gradients also reach the mixed BN stats."""
    original = F.batch_norm

    def batch_norm(x, mean, var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if training or mean is None:
            return original(x, mean, var, weight, bias, training, momentum, eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale = torch.rsqrt(var + eps) if weight is None else weight * torch.rsqrt(var + eps)
        y = (x - mean.view(shape)) * scale.view(shape)
        return y if bias is None else y + bias.view(shape)

    F.batch_norm = batch_norm  # nn.BatchNorm* and timm's BatchNormAct call F.batch_norm
    try:
        yield
    finally:
        F.batch_norm = original


def learned_weights(paths: Sequence[str], scorer: Scorer, args) -> list[float]:
    """Mixing weights softmax(a) minimising held-out loss of sum_i w_i * theta_i (all in memory).

    Each step is one batch through train.predict's loop (normalise, channels_last, autocast);
    its forward builds the mixed weights with gradients on, and the step runs after it."""
    rt, n = scorer.rt, len(paths)
    stacked, fixed = {}, {}
    for i, p in enumerate(progress(paths, args.quiet, desc="load all")):
        for k, v in models.load_state_dict_file(p).items():
            if v.is_floating_point():
                if k not in stacked:
                    stacked[k] = torch.empty((n, *v.shape), dtype=torch.float32, device=rt.device)
                stacked[k][i] = v
            elif i == 0:
                fixed[k] = v.to(rt.device)
    logits = torch.zeros(n, device=rt.device, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=args.learned_lr)
    gen = torch.Generator().manual_seed(args.seed)
    batch: dict = {}

    def mixed_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), _differentiable_eval_bn():  # predict() runs under no_grad
            w = logits.softmax(0)
            state = {k: torch.tensordot(w, s, dims=1) for k, s in stacked.items()}
            state.update(fixed)
            out = torch.func.functional_call(model, state, (x,)).float()
            y = batch["y"]
            batch["loss"] = (
                F.binary_cross_entropy_with_logits(out, y.float())
                if scorer.meta.multi_label
                else F.cross_entropy(out, y)
            )
        return out.detach()

    for _ in progress(range(args.learned_steps), args.quiet, desc="learn weights"):
        idx = torch.randint(
            len(scorer.images), (min(args.batch_size, len(scorer.images)),), generator=gen
        )
        batch["y"] = scorer.labels[idx].to(rt.device)
        images = scorer.images[idx.to(scorer.images.device)]
        one_batch = replace(rt, eval_batch_size=len(images), quiet=True)
        train.predict(  # eval mode: BN uses the mixed running stats; dropout off
            scorer.model, images, scorer.meta.mean, scorer.meta.std, one_batch, mixed_forward
        )
        opt.zero_grad(set_to_none=True)
        batch.pop("loss").backward()
        opt.step()
    return logits.detach().softmax(0).cpu().tolist()


# ---------------------------------------------------------------------------
# Outputs


def short_names(paths: Sequence[str]) -> list[str]:
    """Paths relative to the ingredients' common folder (e.g. i3_s1/best.pt), for tables."""
    full = [Path(p).resolve() for p in paths]
    base = os.path.commonpath([str(f.parent) for f in full]) if len(full) > 1 else full[0].parent
    if len(full) > 1 and all(f.parent == Path(base) for f in full):
        base = str(Path(base).parent)  # keep the folder: runs/x/best.pt -> x/best.pt
    return [os.path.relpath(f, base) for f in full]


def varying_args(infos: Sequence[Ingredient]) -> list[str]:
    """The training args whose values differ between ingredients (their grid point), run
    names and output folders aside."""
    keys = sorted({k for i in infos for k in i.meta.args} - {"i", "random_seed", "name", "out"})
    return [k for k in keys if len({repr(i.meta.args.get(k)) for i in infos}) > 1]


def individual_row(info: Ingredient, m: dict, grid_keys: Sequence[str]) -> dict:
    """One line of individual.jsonl: path, held-out metrics, grid point and seed."""
    targs = info.meta.args
    row = {"path": info.path, **_val(m)}
    if "i" in targs:
        row["i"] = targs["i"]
    if "random_seed" in targs:
        row["seed"] = targs["random_seed"]
    row["grid"] = {k: targs.get(k) for k in grid_keys}  # what sets it apart from the others
    if "val_acc" in info.meta.metrics:
        row["recorded_val_acc"] = info.meta.metrics["val_acc"]
    return row


def soup_meta(used: Sequence[Ingredient], soup: dict, m: dict, args) -> models.CheckpointMeta:
    """The metadata of a soup: its first ingredient's, with the training args of the
    ingredients actually in it (their augmentations: those every one of them was trained with,
    so infer.py's rot90 guard reads the truth), what went in, and its held-out metrics."""
    first = used[0].meta
    targs = dict(first.args)
    augs = [data._aug_names(i.meta.args.get("aug") or "") for i in used]
    if any(a != augs[0] for a in augs[1:]):
        shared = [a for a in augs[0] if all(a in b for b in augs[1:])]
        targs["aug"] = ",".join(shared) or "none"
    record = {
        **soup,
        "bn_recalib": args.bn_recalib,
        "args": jsonable(vars(args)),
        "ingredient_args": [jsonable(i.meta.args) for i in used],
    }
    return replace(first, args=targs, metrics=_val(m), extra={"soup": record})


def plot_soup(tmp, names: list[str], accs: list[float], kept: set, soups: dict) -> None:
    """soup.png (into `tmp`, a staged path): each ingredient's held-out accuracy (by rank) and
    the soups as lines."""
    plt = pyplot("--plot")
    from matplotlib.ticker import MaxNLocator

    order = sorted(range(len(accs)), key=lambda i: -accs[i])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups = [
        (True, "tab:green", "ingredient in the greedy soup"),
        (False, "tab:gray", "ingredient"),
    ]
    for in_soup, color, label in groups:
        ranks = [r + 1 for r, i in enumerate(order) if (names[i] in kept) == in_soup]
        if ranks:
            ax.scatter(ranks, [accs[order[r - 1]] for r in ranks], c=color, zorder=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    styles = {"uniform soup": ("tab:blue", "--"), "greedy soup": ("tab:red", "-")}
    for name, acc in soups.items():
        color, ls = styles.get(name, ("tab:purple", ":"))
        ax.axhline(acc, color=color, ls=ls, label=f"{name} {acc:.4f}")
    ax.set_xlabel("ingredient, ranked by held-out accuracy")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Model soup of {len(accs)} ingredients")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------
# The run, step by step


def gather_ingredients(args) -> list[Ingredient]:
    """Expand --ingredients and check them all (before any averaging); warn on mixed starts."""
    paths = expand_ingredients(args.ingredients)
    infos = [read_ingredient(p) for p in progress(paths, args.quiet, desc="check")]
    check_ingredients(infos)
    for w in start_warnings(infos):
        print(f"soup.py: warning: {w}", file=sys.stderr)
    return infos


def score_and_average(
    paths: list[str], names: list[str], scorer: Scorer, args, key: str
) -> tuple[list[dict], dict | None]:
    """One streamed pass: held-out metrics of each ingredient and/or their uniform average."""
    scores: list[dict] = []
    need_scores = args.eval_individual or args.greedy or args.plot

    def stream():
        for i, p in enumerate(progress(paths, args.quiet, desc="ingredients")):
            sd = models.load_state_dict_file(p)
            if need_scores:
                m = scorer.score(sd, recalib=False)  # an ingredient keeps its own BN stats
                scores.append(m)
                print(f"  [{i + 1}/{len(paths)}] {names[i]}: {_fmt_metrics(m, key)}")
            yield sd

    if args.uniform:
        return scores, average_state_dicts(stream())
    if need_scores:
        for _ in stream():
            pass
    return scores, None


def make_greedy(paths, names, scores, scorer: Scorer, args, key: str):
    """Greedy soup in --greedy-order: (state dict to save, its metrics, step log, soup record)."""
    order = greedy_order(scores, args.greedy_order, args.seed, key)

    def on_step(row):
        name = names[paths.index(row["candidate"])]
        verdict = "start" if row["step"] == 0 else ("kept" if row["accepted"] else "dropped")
        print(
            f"  greedy {row['step']}: {verdict:7s} {name} (tried val_{key} "
            f"{row[f'val_{key}']:.4f}; soup of {row['n_kept']}: "
            f"{row[f'soup_val_{key}']:.4f})"
        )

    sd, kept, steps = greedy_soup(
        [paths[i] for i in order],
        scorer.score,
        start_metrics=scores[order[0]],
        keep=keep_rule(key, args.greedy_strict),
        on_step=on_step,
    )
    m = {k[len("soup_val_") :]: v for k, v in steps[-1].items() if k.startswith("soup_val_")}
    if scorer.bn is not None and len(kept) > 1:
        scorer.load(sd, recalib=True)  # same images, so the BN stats it was scored with
        sd = scorer.state(sd)
    info = {
        "method": "greedy",
        "ingredients": kept,
        "weights": [1.0 / len(kept)] * len(kept),
        "order": [paths[i] for i in order],
        "strict": args.greedy_strict,
    }
    return sd, m, steps, info


def _fmt_metrics(m: dict, key: str) -> str:
    return f"val_{key} {m[key]:.4f}  val_loss {m['loss']:.4f}"


def _val(m: dict) -> dict:
    return {f"val_{k}": v for k, v in m.items()}


def summary_table(results: dict[str, dict], key: str, best_name: str | None) -> str:
    """Best ingredient and each soup: score, delta vs the best ingredient, ingredients used."""
    best = results["best ingredient"]["metrics"][key] if best_name else float("nan")
    rows = []
    for name, r in results.items():
        label = f"best ingredient ({best_name})" if name == "best ingredient" else name
        x = r["metrics"][key]
        delta = f"{x - best:+.4f}" if math.isfinite(best) else "-"
        rows.append([label, x, delta, r["metrics"]["loss"], r["used"]])
    return format_table(rows, ["model", f"val_{key}", "vs best", "val_loss", "ingredients"])


def check_run(args, infos: list[Ingredient]) -> None:
    """Everything about the flags and the ingredients that can fail, before any work."""
    meta = infos[0].meta
    if args.metric == "macro-f1" and meta.multi_label:
        raise UserError("--metric macro-f1 is for single-label data; use --metric accuracy")
    if args.learned and meta.task == "rotation":
        raise UserError("--learned needs a classifier; drop it for rotation checkpoints")
    out = Path(args.out)
    check_writable_dir(out)
    ensure_new_output(out, "summary.json", args.overwrite)
    inputs = [("--ingredients", i.path) for i in infos]
    inputs += [("--holdout", args.holdout), ("--config", args.config)]
    refuse_output_on_input([("--out", out / f) for f in OUTPUTS], inputs)
    if args.plot:
        pyplot("--plot")


def run(args) -> dict:
    """Check, score and mix the ingredients per args; write the outputs; return the summary."""
    if not (args.eval_individual or args.uniform or args.greedy or args.learned or args.plot):
        raise UserError("nothing to do: add --eval-individual, --uniform, --greedy or --learned")
    start = time.perf_counter()
    rt = models.setup_runtime(args)
    infos = gather_ingredients(args)
    check_run(args, infos)
    out = Path(args.out)
    with DirLock(out):
        for name in OUTPUTS:  # temp files of a killed soup (none can be live: we hold the lock)
            for stale in out.glob(f".*{name}.*tmp*"):  # (a writer's own temp of it: "..NAME")
                stale.unlink(missing_ok=True)
        summary, table, written, passes, n_held = _make_soups(args, infos, rt, out, start)
        if args.overwrite:  # outputs of a past run that this one did not write
            for name in OUTPUTS:
                if name not in written:
                    (out / name).unlink(missing_ok=True)
    if table:
        print(table)
    print(
        f"wrote {out}/{{{','.join(written)}}}; {passes} held-out passes over {n_held} images "
        f"in {summary['seconds']:.1f}s"
    )
    return summary


def _make_soups(args, infos: list[Ingredient], rt, out: Path, start: float):
    """Score and mix; every output staged in one transaction committed at the end."""
    ref, paths, n, key = infos[0], [i.path for i in infos], len(infos), METRIC_KEYS[args.metric]
    held, held_desc = load_holdout(args, ref)
    bn = bn_images(args, ref, rt.device) if args.bn_recalib else None
    scorer = Scorer(ref, held, args, rt, bn)
    if scorer.bn is not None and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in scorer.model.modules()
    ):
        print(
            "soup.py: warning: no BatchNorm layers; --bn-recalib changes nothing", file=sys.stderr
        )
        scorer.bn = None
    names = short_names(paths)
    bn_note = f", BN re-estimated on {args.bn_recalib} batches" if scorer.bn is not None else ""
    print(
        f"soup of {n} ingredient(s) ({ref.meta.arch}) on {rt.device}; held-out: "
        f"{held_desc}; metric {args.metric}{bn_note}"
    )
    summary: dict = {"n_ingredients": n, "holdout": held_desc, "metric": args.metric}
    results: dict[str, dict] = {}  # table rows: name -> {"metrics", "used"}
    by_path = dict(zip(paths, infos))
    with Outputs() as o:
        written = []

        def stage(name: str) -> str:
            written.append(name)
            return o.path(out / name)

        # 1. One streamed pass over the ingredients: scores and the uniform average.
        with Timer() as t:
            scores, uniform_sd = score_and_average(paths, names, scorer, args, key)
        summary["individual_seconds"] = round(t.seconds, 3)
        best_name = None
        if scores:
            write_jsonl(
                stage("individual.jsonl"),
                [individual_row(i, m, varying_args(infos)) for i, m in zip(infos, scores)],
            )
            b = greedy_order(scores, "accuracy", metric=key)[0]
            best_name = names[b]
            results["best ingredient"] = {"metrics": scores[b], "used": 1}
            summary["best_ingredient"] = {"path": paths[b], **_val(scores[b])}

        # 2. Uniform soup.
        if uniform_sd is not None:
            m = scorer.score(uniform_sd)
            if scorer.bn is not None:
                uniform_sd = scorer.state(uniform_sd)  # with the re-estimated BN stats
            info = {"method": "uniform", "ingredients": paths, "weights": [1.0 / n] * n}
            models.save_checkpoint(
                stage("uniform_soup.pt"), uniform_sd, soup_meta(infos, info, m, args)
            )
            del uniform_sd
            results["uniform soup"] = {"metrics": m, "used": f"{n}/{n}"}
            summary["uniform"] = {**_val(m), "path": str(out / "uniform_soup.pt")}

        # 3. Greedy soup.
        kept: list[str] = []
        if args.greedy:
            with Timer() as t:
                sd, m, steps, info = make_greedy(paths, names, scores, scorer, args, key)
            write_jsonl(stage("greedy.jsonl"), steps)
            kept = info["ingredients"]
            meta = soup_meta([by_path[p] for p in kept], info, m, args)
            models.save_checkpoint(stage("greedy_soup.pt"), sd, meta)
            del sd
            results["greedy soup"] = {"metrics": m, "used": f"{len(kept)}/{n}"}
            summary["greedy"] = {
                **_val(m),
                "kept": kept,
                "n_kept": len(kept),
                "path": str(out / "greedy_soup.pt"),
                "seconds": round(t.seconds, 3),
            }

        # 4. Learned soup (optional): weights fitted on the held-out set, so its score is optimistic.
        if args.learned:
            weights = learned_weights(paths, scorer, args)
            sd = average_state_dicts((models.load_state_dict_file(p) for p in paths), weights)
            m = scorer.score(sd)
            if scorer.bn is not None:
                sd = scorer.state(sd)
            info = {"method": "learned", "ingredients": paths, "weights": weights}
            models.save_checkpoint(stage("learned_soup.pt"), sd, soup_meta(infos, info, m, args))
            del sd
            results["learned soup (fit on held-out)"] = {"metrics": m, "used": f"{n}/{n}"}
            summary["learned"] = {
                **_val(m),
                "weights": weights,
                "path": str(out / "learned_soup.pt"),
            }

        if args.plot:
            soups = {k: r["metrics"]["acc"] for k, r in results.items() if k != "best ingredient"}
            kept_names = {names[paths.index(p)] for p in kept}
            plot_soup(stage("soup.png"), names, [s["acc"] for s in scores], kept_names, soups)

        # 5. Summary: summary.json (and the table the caller prints).
        if best_name:
            best = scores[paths.index(summary["best_ingredient"]["path"])][key]
            for k in ("uniform", "greedy", "learned"):
                if k in summary:
                    summary[k]["delta_vs_best"] = summary[k][f"val_{key}"] - best
        summary.update(
            bn_recalib=args.bn_recalib if scorer.bn is not None else 0,
            evaluations=scorer.passes,
            seconds=round(time.perf_counter() - start, 3),
        )
        o.json(out / "summary.json", summary)
        written.append("summary.json")
    table = summary_table(results, key, best_name) if results else ""
    return summary, table, [f for f in OUTPUTS if f in written], scorer.passes, len(held)


def main(argv=None):
    with cli_errors("soup.py"):
        return run(parse_args(build_parser(), argv))


if __name__ == "__main__":
    main()
