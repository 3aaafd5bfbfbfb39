"""Supervised training and RotNet rotation self-supervision, with per-block linear evaluation.

    python train.py --data PATH --model smallnet --epochs 10
    python train.py --data PATH --task rotation --name rot           # RotNet pre-training
    python train.py --data PATH --linear-eval runs/rot/best.pt        # frozen features per block
    python train.py --data PATH --eval-only runs/x/best.pt            # evaluate a checkpoint

Data live on the training device as one uint8 tensor; batches are cut, normalised and augmented
there as tensors (airbench style). Every epoch's data order and augmentation are a function of
(--random-seed, epoch), and last.pt holds everything else, so --resume reproduces an
uninterrupted run exactly on CPU. Every input is loaded and checked before the run directory is
touched; --overwrite builds the new run beside the old one and swaps it in at the end (README
"What is guaranteed").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import losses
import models
import runlog
from common import (
    DirLock,
    HelpFormatter,
    Timer,
    UserError,
    accuracy,
    add_common_flags,
    append_jsonl,
    check_writable_dir,
    cli_errors,
    commit_dir,
    ensure_new_output,
    format_table,
    fraction,
    int_range,
    jsonable,
    list_of,
    macro_f1,
    multi_hot,
    nonneg_float,
    nonneg_int,
    open_fraction,
    parse_args,
    per_class_accuracy,
    positive_float,
    positive_int,
    probability,
    progress,
    read_jsonl,
    recover_dir,
    refuse_together,
    seed_int,
    staged_dir,
    write_json,
    write_jsonl,
)

DEFAULT_LR = {"sgd": 0.2, "adam": 2e-3, "adamw": 2e-3}  # peak lr per --opt when --lr is not given
# What --resume may change: with a schedule that does not depend on the run's length
# (constant, plateau), --epochs; and the runtime flags (device, threads, batch of evaluation...).
EPOCHS_FREE_SCHEDS = ("constant", "plateau")


class DivergedError(Exception):
    """The loss became NaN/inf: training stops (exit 1)."""


@contextlib.contextmanager
def cli(prog: str):
    """common.cli_errors, plus a diverged run as one stderr line and exit 1 (train and finetune)."""
    with cli_errors(prog):
        try:
            yield
        except DivergedError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None


# ---------------------------------------------------------------------------
# Flags


def build_parser() -> argparse.ArgumentParser:
    """All training flags, grouped; finetune.py extends this parser."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    add_common_flags(p)
    _data_flags(p.add_argument_group("data"))
    _model_flags(p.add_argument_group("model"))
    _optimisation_flags(p.add_argument_group("optimisation"))
    _augmentation_flags(p.add_argument_group("augmentation"))
    _head_flags(p.add_argument_group("multi-head (mask layout)"))
    g = models.add_runtime_flags(p)
    g.add_argument("--sync-bn", action="store_true", help="DDP on CUDA: synchronise BatchNorm")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs", help="output root")
    g.add_argument("--name", default=None, help="run name (default: model_task)")
    g.add_argument("--random-seed", type=seed_int, default=0, help="init, order, augmentation")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue last.pt (or the given one) with the same flags; may change only "
        "--epochs (with --sched constant/plateau) and runtime flags (--device, --threads, ...)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace a run (the old one stays until the end)"
    )
    g.add_argument("--eval-test", action="store_true", help="also evaluate on the test part")
    g.add_argument(
        "--eval-tta",
        default="auto",
        metavar="VIEWS",
        help="--eval-test also reports test accuracy under these TTA views (infer.py --tta "
        "names, e.g. flip); auto: flip when --aug has flip, else none",
    )
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate a checkpoint")
    g.add_argument(
        "--split", choices=data.SPLITS, default="val", help="--eval-only: the part to evaluate"
    )
    g.add_argument("--linear-eval", default=None, metavar="CKPT", help="per-block linear eval")
    g.add_argument("--nonlinear", action="store_true", help="linear eval: also an MLP probe")
    g.add_argument("--linear-epochs", type=positive_int, default=30, help="linear eval epochs")
    runlog.add_flags(p)  # --log, --checkpoint-hist
    return p


def _data_flags(g) -> None:
    g.add_argument("--data", help="data set path (format auto-detected)")
    g.add_argument("--data-format", default=None, help="override auto-detection")
    g.add_argument(
        "--img-size", type=int_range(1, 4096), default=None, help="resize to this size (native)"
    )
    g.add_argument("--in-chans", type=int, choices=[1, 3], default=None, help="default: the data's")
    g.add_argument(
        "--saturation-channel",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="grey images plus a second channel of their full-intensity (255) pixels, found "
        "before resizing: ink added onto noise and clipped (dirty MNIST)",
    )
    g.add_argument("--val-ratio", type=fraction, default=0.1, help="held-out fraction (stratified)")
    g.add_argument(
        "--split-seed", type=seed_int, default=0, help="seed of the train/val split only"
    )
    g.add_argument(
        "--labels-per-class", type=positive_int, default=None, help="train on K labels per class"
    )
    g.add_argument(
        "--kfold",
        type=nonneg_int,
        default=0,
        help="K >= 2: stratified (grouped) k-fold, not --val-ratio",
    )
    g.add_argument("--fold", type=nonneg_int, default=0, help="with --kfold: held-out fold 0..K-1")
    g.add_argument(
        "--relabel",
        default=None,
        metavar="FILE.csv",
        help="id,new_label corrections applied to the training part",
    )
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")
    g.add_argument(
        "--cache-dir", default=None, help="decoded-tensor cache (default ~/.cache/imgcls)"
    )
    g.add_argument(
        "--oversample",
        action="append",
        default=[],
        metavar="CLASS=FACTOR",
        help="repeat a class FACTOR times per epoch (class name or index, or @rarest); repeatable",
    )


def _model_flags(g) -> None:
    g.add_argument(
        "--model",
        default=None,
        help="built-in (smallnet*) or any timm name; default: smallnet on GPUs and for short "
        "runs (< 50,000 images seen); on CPUs smallnet_s with bf16 (AMX), else smallnet_t (a "
        'seventh of smallnet\'s compute; README "Which precision and model `auto` picks")',
    )
    g.add_argument("--task", choices=["classify", "rotation"], default="classify")
    g.add_argument(
        "--rotations",
        choices=["all", "one"],
        default=None,
        help="--task rotation: one (the default) = each image at one random rotation (a "
        "supervised step's cost per image); all = each image at all four (a 4x batch, as "
        "Gidaris et al.)",
    )
    g.add_argument(
        "--weights", default=None, help="start from a checkpoint/state dict/.safetensors"
    )
    g.add_argument(
        "--allow-partial", action="store_true", help="load --weights even if keys differ"
    )
    g.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network)")
    g.add_argument("--drop", type=fraction, default=0.0, help="dropout before the classifier")
    g.add_argument("--drop-path", type=fraction, default=0.0, help="stochastic depth (timm)")
    g.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute block activations in backward (less memory, more time): smallnet* and "
        "timm models with set_grad_checkpointing; refused for others",
    )


def _optimisation_flags(g) -> None:
    g.add_argument("--epochs", type=positive_int, default=10)
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="default: the largest of 256/128/64/32/16 giving >= 50 steps per epoch",
    )
    g.add_argument(
        "--opt",
        type=optimizer_name,
        default=None,
        metavar="NAME",
        help="default: sgd, or adamw for a run under 300 steps without --lr; "
        "sgd (Nesterov), adamw, adam; rangerlars = Lookahead + RAdam with LARS trust "
        "ratios; or any timm.optim.list_optimizers() name (lamb, lars, adan, sgdp, ...), also "
        "as lookahead_NAME (lookahead_radam = Ranger)",
    )
    g.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"default: {DEFAULT_LR}, scaled with the batch: sgd x min(1, batch/128), "
        "adam-like x sqrt(batch/256)",
    )
    g.add_argument("--momentum", type=fraction, default=0.9, help="sgd (Nesterov when > 0)")
    g.add_argument("--weight-decay", type=nonneg_float, default=5e-4, help="not on BN/bias")
    g.add_argument(
        "--sched", choices=["cosine", "onecycle", "step", "plateau", "constant"], default="onecycle"
    )
    g.add_argument(
        "--warmup-epochs",
        type=nonneg_float,
        default=None,
        help="linear warm-up; default min(1, 0.2 x --epochs); at most 20%% of the run's steps",
    )
    g.add_argument(
        "--min-lr-ratio", type=probability, default=0.0, help="final/peak lr (cosine, onecycle)"
    )
    g.add_argument(
        "--milestones",
        type=list_of(open_fraction),
        default="0.5,0.75",
        help="step: fractions of training, comma-separated",
    )
    g.add_argument(
        "--gamma", type=positive_float, default=0.1, help="step/plateau: lr factor (< 1 decays)"
    )
    g.add_argument("--accum-steps", type=positive_int, default=1, help="gradient accumulation")
    g.add_argument("--clip-grad", type=positive_float, default=None, help="max grad norm")
    g.add_argument(
        "--ema",
        type=ema_decay,
        default="auto",
        help=f"weight EMA decay in (0, 1), or none; auto: {EMA_DEFAULT} for a new run, the resumed "
        "run's own value on --resume",
    )
    g.add_argument("--loss", default="auto", help="ce|label-smoothing|focal|f1|bce|asl")
    g.add_argument("--smoothing", type=fraction, default=0.1, help="label smoothing (ce)")


def _augmentation_flags(g) -> None:
    g.add_argument(
        "--aug",
        default=None,
        help="comma list: none,flip,vflip,crop,rot90,randaug,cutout; default flip,crop, or crop "
        "for glyph data (synth.py letters/dirty, pixel CSVs: not mirror-invariant)",
    )
    g.add_argument("--pad", type=int_range(0, 256), default=2, help="crop: pad before the crop")
    g.add_argument(
        "--prog-resize",
        type=int_range(0, 4096),
        default=0,
        metavar="PX",
        help="progressive resizing: the first epochs train on images resized to PX (height; "
        "width in proportion), growing linearly to the full size by --prog-until; 0 = off",
    )
    g.add_argument(
        "--prog-until",
        type=fraction,
        default=0.5,
        help="fraction of the epochs after which --prog-resize trains at the full size",
    )
    g.add_argument("--mix", choices=["none", "cutmix", "mixup"], default="none")
    g.add_argument("--mix-alpha", type=positive_float, default=1.0, help="Beta(alpha, alpha)")
    g.add_argument("--mix-prob", type=probability, default=0.5, help="fraction of batches mixed")


# Losses a head can take: they train on one class index per image.
HEAD_LOSSES = ("ce", "label-smoothing", "focal", "f1")


def _head_flags(g) -> None:
    g.add_argument(
        "--heads",
        type=list_of(str),
        default=None,
        metavar="mask,gender,age",
        help="mask-format data only: one backbone with three classifier heads (3/2/3 classes: one "
        "Linear of 8 outputs split 3/2/3), trained on the sum of the heads' losses; the 18-class "
        "prediction is the product of the heads' softmaxes (ans = mask*6 + gender*3 + age). "
        "val_acc (and so best.pt) is the combined 18-class accuracy, val_f1 its macro-F1; each "
        "head's accuracy and macro-F1 are logged too",
    )
    g.add_argument(
        "--head-losses",
        type=list_of(str),
        default=None,
        metavar="L1,L2,L3",
        help=f"with --heads: one loss per head, in --heads order ({'|'.join(HEAD_LOSSES)}), e.g. "
        "ce,ce,focal; default: --loss for every head",
    )


def _check_head_flags(args) -> None:
    """--heads / --head-losses on their own and against other flags (no data needed)."""
    heads, names = getattr(args, "heads", None), getattr(args, "head_losses", None)
    if not heads:
        if names:
            raise UserError("--head-losses: only with --heads mask,gender,age; add it or drop it")
        return
    known = list(data.MASK_HEADS)
    bad = [h for h in heads if h not in known]
    if bad:
        raise UserError(f"--heads: unknown head '{bad[0]}'; the mask heads are {','.join(known)}")
    if list(heads) != known:
        raise UserError(
            f"--heads {','.join(heads)}: the heads are all three, in the order of the 18-class "
            "index (mask*6 + gender*3 + age); use --heads mask,gender,age"
        )
    if names is not None and len(names) != len(heads):
        raise UserError(
            f"--head-losses {','.join(names)}: {len(names)} losses for {len(heads)} heads; "
            "give one per head, e.g. ce,ce,focal"
        )
    if names and args.loss != "auto":
        raise UserError(
            "--loss and --head-losses cannot be used together; with --heads, --head-losses sets "
            "each head's loss (--loss alone sets all three)"
        )
    flag = "--head-losses" if names else "--loss"
    for name in names or [args.loss]:
        if name == "auto":
            continue
        try:
            key = losses.loss_name(name)
        except ValueError as e:
            raise UserError(f"{flag} {name}: {e}") from None
        if key not in HEAD_LOSSES:
            raise UserError(
                f"{flag} {name}: a head trains on one class index per image, '{key}' does not; "
                f"use {', '.join(HEAD_LOSSES)}"
            )
    if args.task == "rotation":
        raise UserError("--heads: classifies the mask labels, not with --task rotation; drop one")
    if args.mix != "none":
        raise UserError(
            f"--heads with --mix {args.mix}: mixed soft targets are not split per head; drop --mix"
        )


def _check_heads_data(args) -> None:
    """--heads needs mask-format data: checked from the path before anything is decoded."""
    if not getattr(args, "heads", None) or not args.data:
        return
    fmt = args.data_format
    if not fmt:
        try:
            fmt = data.detect_format(args.data)
        except UserError:
            return  # load_data reports the path itself
    if fmt != "mask":
        raise UserError(
            f"--heads: {args.data} is {fmt}-format data; the heads split the mask layout's 18 "
            "classes (train/images/<id>_<gender>_<race>_<age>/); use mask data or drop --heads"
        )


def _head_sizes(args) -> list[int] | None:
    heads = getattr(args, "heads", None)
    return [len(data.MASK_HEADS[h]) for h in heads] if heads else None


def _head_loss(args, train_set: data.ImageSet) -> losses.MultiHeadLoss:
    """The sum of the heads' losses (--head-losses, default --loss for each head)."""
    if train_set.fmt != "mask" or list(train_set.classes) != list(data.MASK_CLASSES):
        raise UserError(
            f"--heads: {args.data} is not mask-format data with its 18 classes; drop --heads"
        )
    fns = []
    for name in args.head_losses or [args.loss] * len(args.heads):
        if name == "auto":
            name = "label-smoothing" if args.smoothing > 0 else "ce"
        key = losses.loss_name(name)
        kw = {"smoothing": args.smoothing} if key == "label-smoothing" else {}
        fns.append(losses.build_loss(key, **kw))
    return losses.MultiHeadLoss(fns, _head_sizes(args))


def head_metrics(t: np.ndarray, pred: np.ndarray, heads: dict) -> dict:
    """Each head's accuracy and macro-F1 from joint (e.g. 18-class) true and predicted indices
    (their row-major digits: mask = i // 6, gender = i // 3 % 2, age = i % 3)."""
    sizes = [len(c) for c in heads.values()]
    td, pd_ = np.unravel_index(t, sizes), np.unravel_index(pred, sizes)
    out = {}
    for name, k, a, b in zip(heads, sizes, td, pd_):
        out[f"{name}_acc"] = accuracy(a, b)
        out[f"{name}_f1"] = macro_f1(a, b, k)
    return out


def _heads_text(row: dict, heads: dict | None, prefix: str = "val_") -> str:
    return "".join(
        f"  {h} {row[f'{prefix}{h}_acc']:.3f}/{row[f'{prefix}{h}_f1']:.3f}" for h in heads or {}
    )


def check_flags(args) -> None:
    """Combinations the flag types cannot see; UserError naming the flags."""
    runlog.check_flags(args)  # --log packages installed, --checkpoint-metric possible
    _check_head_flags(args)
    refuse_together(
        args,
        ("--eval-only", "--linear-eval"),
        ("--eval-only", "--resume"),
        ("--linear-eval", "--resume"),
        ("--resume", "--overwrite"),
    )
    if args.kfold == 1:
        raise UserError("--kfold 1: needs at least 2 folds; use --kfold 0 for --val-ratio")
    if args.fold and not args.kfold:
        raise UserError(f"--fold {args.fold}: needs --kfold K; add it or drop --fold")
    if args.kfold and args.fold >= args.kfold:
        raise UserError(
            f"--fold {args.fold}: must be in 0..{args.kfold - 1} for --kfold {args.kfold}"
        )
    if args.rotations is not None and args.task != "rotation":
        raise UserError(f"--rotations {args.rotations}: only for --task rotation; drop it")
    if args.task == "rotation" and args.rotations is None:
        args.rotations = "one"  # resolved here, so a resume compares what the run did
    if args.eval_test and args.task == "rotation" and not (args.eval_only or args.linear_eval):
        raise UserError("--eval-test: a --task rotation run has no test accuracy; drop one of them")
    if args.eval_tta != "auto":
        eval_tta_forward(args, [])  # an unknown view name: UserError before anything is written
    if args.nonlinear and not args.linear_eval:
        raise UserError("--nonlinear: only with --linear-eval CKPT; add it or drop --nonlinear")
    for flag in ("eval_only", "linear_eval", "resume", "weights"):
        v = getattr(args, flag, None)
        if v and v != "auto" and Path(v).is_dir():
            name = "last.pt" if flag == "resume" else "best.pt"
            raise UserError(
                f"--{flag.replace('_', '-')} {v}: is a directory; pass a checkpoint file such as "
                f"{Path(v) / name}"
            )


# ---------------------------------------------------------------------------
# Small pure pieces


@dataclass(frozen=True)
class Schedule:
    """The learning-rate decay after warm-up: --sched, --milestones, --gamma, --min-lr-ratio."""

    name: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    min_ratio: float = 0.0

    @classmethod
    def of(cls, args) -> Schedule:
        return cls(args.sched, tuple(args.milestones), args.gamma, args.min_lr_ratio)


def lr_factor(step: int, total: int, warmup: int, sched: Schedule) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based) of `total` (plateau apart).

    Linear warm-up to 1 over `warmup` steps, then the decay; the last step (total - 1) gets the
    schedule's end value exactly: cosine and onecycle `min_ratio`, step gamma ** (milestones
    passed), constant/plateau 1.
    """
    min_ratio = sched.min_ratio
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    # t runs 0 -> 1 from the first step after warm-up to the last step of the run
    t = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    if sched.name == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if sched.name == "onecycle":  # linear decay after the warm-up peak (airbench), to min_ratio
        return min_ratio + (1 - min_ratio) * max(0.0, 1.0 - t)
    if sched.name == "step":
        return sched.gamma ** sum(step >= m * total for m in sched.milestones)
    return 1.0


# Warm-up never takes more than this fraction of a run's optimizer steps: a 1-epoch run with
# --warmup-epochs 1 would otherwise end at its peak lr without ever decaying.
WARMUP_MAX_FRAC = 0.2


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total: int, sched: str) -> int:
    """Warm-up length in optimizer steps: --warmup-epochs, capped at WARMUP_MAX_FRAC of total."""
    if sched == "constant" or total <= 1:
        return 0
    return max(0, min(int(warmup_epochs * steps_per_epoch), int(WARMUP_MAX_FRAC * total)))


def plateau_update(state, val_loss: float, gamma: float, patience: int = 2) -> None:
    """Reduce-on-plateau after an epoch: lr scale *= gamma after `patience` epochs without a
    val-loss improvement of more than 1e-4 (the next epoch trains at the reduced lr)."""
    if val_loss < state.plateau_best - 1e-4:
        state.plateau_best, state.plateau_bad = val_loss, 0
    else:
        state.plateau_bad += 1
        if state.plateau_bad >= patience:
            state.plateau_scale *= gamma
            state.plateau_bad = 0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():  # frozen ones too: LP-FT unfreezes them later
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(groups: list[dict], args) -> torch.optim.Optimizer:
    """SGD (Nesterov unless --momentum 0) or AdamW/Adam over the given parameter groups."""
    if args.opt == "sgd":
        return torch.optim.SGD(
            groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0
        )
    if args.opt in ("adamw", "adam"):
        cls = torch.optim.AdamW if args.opt == "adamw" else torch.optim.Adam
        return cls(groups, lr=args.lr)
    if args.opt == "rangerlars":
        return rangerlars(groups, lr=args.lr)
    return _timm_optimizer(groups, args)


# --opt: our three (the defaults, unchanged), "rangerlars", and every name of timm's optimizer
# factory (timm.optim.list_optimizers(), each also as lookahead_NAME).
OWN_OPTIMIZERS = ("sgd", "adamw", "adam", "rangerlars")
# timm names with an SGD-style lr scale (and --momentum); the rest are Adam-like
SGD_LIKE = {
    "sgd", "nesterov", "momentum", "sgdp", "sgdw", "sgdc", "csgdc", "csgdp", "csgdw", "lars",
    "larc", "nlars", "nlarc", "bnbsgd", "bnbsgd8bit", "fusedsgd",
}  # fmt: skip
# Adam-like names whose weight decay is an L2 term in the gradient (not decoupled)
COUPLED_WD = {
    "adam", "radam", "nadam", "adamax", "adamp", "adabelief", "radabelief", "rmsprop",
    "rmsproptf", "adagrad", "adadelta", "novograd", "nadamlegacy", "radamlegacy", "rangerlars",
}  # fmt: skip
NO_SECOND_ORDER = {"adahessian"}  # needs backward(create_graph=True), which fit does not do


def _base_opt(name: str) -> str:
    return name[len("lookahead_") :] if name.startswith("lookahead_") else name


def optimizer_names() -> list[str]:
    """Every name --opt accepts except the lookahead_NAME forms (timm's names need timm)."""
    from timm.optim import list_optimizers

    return sorted(set(OWN_OPTIMIZERS) | set(list_optimizers()))


def optimizer_name(text: str) -> str:
    """argparse type of --opt: a known optimizer name (lower case), or a one-line error."""
    name = str(text).strip().lower()
    if name in OWN_OPTIMIZERS:
        return name
    known = optimizer_names()
    base = _base_opt(name)
    if base in NO_SECOND_ORDER:
        raise argparse.ArgumentTypeError(
            f"'{text}' needs second-order gradients (backward with create_graph), which this "
            "training loop does not compute; use adamw, lamb or another first-order optimizer"
        )
    if name in known or (base != name and base in known and base != "rangerlars"):
        return name
    import difflib

    close = difflib.get_close_matches(base, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise argparse.ArgumentTypeError(
        f"unknown optimizer '{text}'; {hint}use sgd, adamw, adam, rangerlars or a name of "
        "timm.optim.list_optimizers() (also as lookahead_NAME)"
    )


def opt_family(name: str) -> str:
    """'sgd', 'adam' (L2 weight decay) or 'adamw' (decoupled): picks default lr and ranges."""
    base = _base_opt(name)
    if base in SGD_LIKE:
        return "sgd"
    return "adam" if base in COUPLED_WD else "adamw"


# EMA on by default: Fashion-MNIST, fp32 smallnet_t (torch limited to AVX2), the EMA weights at
# 0.9070 test after 2 epochs against the model's 0.8956 (README "Against timm's train.py")
EMA_DEFAULT = 0.999


def ema_decay(text: str) -> float | str | None:
    """argparse type for --ema: auto, none (off), or a decay in (0, 1)."""
    low = str(text).strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        return open_fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is no EMA decay; give a number in (0, 1) such as 0.999, auto or none"
        ) from None


def default_ema(args, resume_ck: dict | None) -> str:
    """Resolve --ema auto: EMA_DEFAULT for a new run, the resumed last.pt's own value (none for
    runs from before the default); the reason for the recipe line ("" when --ema was given)."""
    if args.ema != "auto":
        return ""
    if resume_ck is not None:
        saved = resume_ck.get("resume_fingerprint") or resume_ck.get("args") or {}
        args.ema, why = saved.get("ema"), "auto: as the resumed run"
    else:
        args.ema, why = EMA_DEFAULT, "auto: the default, --ema none for off"
    return f", ema {args.ema or 'none'} ({why})"


def default_lr(name: str) -> float:
    """Peak lr at batch 256 when --lr is not given: 0.2 SGD-like, 2e-4 Lion, 2e-3 the rest."""
    if "lion" in _base_opt(name):
        return 2e-4  # Lion's sign updates want a 3-10x smaller lr (Chen et al. 2023)
    return DEFAULT_LR[opt_family(name)]


def _timm_optimizer(groups: list[dict], args) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    kw = {"momentum": args.momentum} if opt_family(args.opt) == "sgd" else {}
    try:  # the groups carry their own weight_decay (none on norms and biases)
        return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, **kw)
    except (ImportError, AssertionError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(
            f"--opt {args.opt}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
            "pick another --opt (e.g. adamw or lamb)"
        ) from None


class RAdamLARS(torch.optim.RAdam):
    """RAdam whose step of each weight tensor (ndim > 1) is rescaled by the LARS trust ratio:
    its length becomes lr * min(||w||, 10), as in LARS/LAMB (You et al. 2017, 2019)."""

    @torch.no_grad()
    def step(self, closure=None):
        before = {
            p: p.detach().clone()
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None and p.ndim > 1
        }
        loss = super().step(closure)
        for g in self.param_groups:
            for p in g["params"]:
                old = before.get(p)
                if old is None:
                    continue
                d = p - old  # -lr * RAdam's direction (weight decay included)
                d_norm, w_norm = d.norm(), old.norm().clamp(max=10.0)
                if d_norm > 0 and w_norm > 0:
                    p.copy_(old + d * (g["lr"] * w_norm / d_norm))
        return loss


def rangerlars(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """--opt rangerlars, the RotNet seed's optimizer: Lookahead (k=6, alpha=0.5; Zhang et al.
    2019) around RAdam (Liu et al. 2020) with LARS trust ratios (RAdamLARS)."""
    from timm.optim import Lookahead

    return Lookahead(RAdamLARS(groups, lr=lr), alpha=0.5, k=6)


def labelled_subset(labels: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """First k indices of each class under a permutation seeded by the split seed only."""
    y = labels.numpy() if labels.ndim == 1 else labels.argmax(1).numpy()
    order = np.random.default_rng(seed + 7919).permutation(len(y))
    keep = [order[y[order] == c][:k] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


RAREST = "@rarest"  # --oversample @rarest=F: the training part's rarest class


def oversample_index(labels: torch.Tensor, specs: list[str], classes: list[str]) -> np.ndarray:
    """Index array where each CLASS=FACTOR class appears FACTOR times (fractions sampled)."""
    idx = np.arange(len(labels))
    if not specs:
        return idx
    y = labels.numpy() if labels.ndim == 1 else labels.argmax(1).numpy()
    extra = []
    for spec in specs:
        name, _, factor = spec.partition("=")
        c = classes.index(name) if name in classes else None
        if c is None and name == RAREST:  # finetune.py --old-aug: the class with fewest images
            counts = np.bincount(y, minlength=len(classes))
            c = int(np.where(counts > 0, counts, counts.max() + 1).argmin())
        if c is None and name.lstrip("-").isdigit() and 0 <= int(name) < len(classes):
            c = int(name)
        try:
            factor = float(factor)
        except ValueError:
            factor = -1
        if c is None or not 1 <= factor <= 1000:
            raise UserError(
                f"--oversample {spec}: expected CLASS=FACTOR with a class of {classes[:5]}... "
                "and FACTOR in [1, 1000]"
            )
        members = idx[y == c]
        whole, frac = int(factor), factor - int(factor)
        extra += [members] * (whole - 1) + [members[: int(round(frac * len(members)))]]
    return np.concatenate([idx, *extra])


class EMA:
    """Exponential moving average of a model's weights, with timm's warm-up: the decay at
    optimizer step n is min(decay, (1 + n) / (10 + n)), so early averages forget the init."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(models.unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def update(self, model: nn.Module, step: int) -> None:
        """ema = d * ema + (1 - d) * model (models.interpolate_state: integer buffers copied)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            sd = models.unwrap(model).state_dict()
            models.interpolate_state(self.module.state_dict(), sd, 1.0 - decay, inplace=True)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)


# ---------------------------------------------------------------------------
# Inference and evaluation (shared with soup.py and infer.py)


def probs_forward(multi_label: bool = False) -> Callable:
    """The plain `forward(model, x)` for predict: softmax, or sigmoid for multi-label."""

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()
        return torch.sigmoid(logits) if multi_label else logits.softmax(1)

    return forward


CPU_FP32 = models.Runtime(torch.device("cpu"), "none", quiet=True)  # predict's default


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean,
    std,
    rt: models.Runtime = CPU_FP32,
    forward: Callable | None = None,
) -> torch.Tensor:
    """Probabilities (CPU float32, N x K) for uint8 images: the one batch loop (normalise ->
    channels_last -> autocast -> forward) in batches of rt.eval_batch_size on rt.device.
    `forward(model, x)` defaults to probs_forward() (softmax) and can add TTA. With
    rt.channels_last the model is put in channels-last too: inputs and weights in different
    layouts ran 3.6x slower (smallnet_s, bf16, 2-core AMX CPU)."""
    forward = forward or probs_forward()
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    out = []
    batches = data.batch_indices(len(images), rt.eval_batch_size, False)
    for idx in progress(batches, rt.quiet, desc="predict"):
        x = data.normalize(images[idx].to(rt.device, non_blocking=True), mean, std)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with models.autocast(rt.device, rt.amp):
            out.append(forward(model, x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def metrics_from_probs(
    probs: torch.Tensor,
    labels: torch.Tensor,
    multi_label: bool,
    threshold: float = 0.5,
    heads: dict | None = None,
) -> dict:
    """Loss (torch) and the common.py metrics: accuracy (exact match for multi-label) and
    macro-F1, or per-label accuracy for multi-label."""
    eps = 1e-7
    if multi_label:
        y = labels.float()
        p = probs.clamp(eps, 1 - eps)
        loss = -(y * p.log() + (1 - y) * (1 - p).log()).mean().item()
        t, pred = y.bool().numpy().astype(np.int64), multi_hot(probs.numpy(), threshold)
        return {
            "loss": loss,
            "acc": accuracy(t, pred),
            "label_acc": float(per_class_accuracy(t, pred).mean()),
        }
    y = labels.long()
    loss = F.nll_loss(probs.clamp_min(eps).log(), y).item()
    t, pred = y.numpy(), probs.argmax(1).numpy()
    out = {"loss": loss, "acc": accuracy(t, pred), "f1": macro_f1(t, pred, probs.shape[1])}
    if probs.shape[1] > 5:  # top-5 has a meaning only above 5 classes (summary.csv eval_top5)
        out["top5"] = (probs.topk(5, dim=1).indices == y[:, None]).any(1).double().mean().item()
    if heads:  # a multi-head model: each head's accuracy and macro-F1 too
        out.update(head_metrics(t, pred, heads))
    return out


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    meta: models.CheckpointMeta | dict,
    rt: models.Runtime = CPU_FP32,
) -> dict:
    """Metrics of a model on uint8 images, read as its metadata says (a CheckpointMeta, or a
    checkpoint / meta dict): normalisation, label kind, task (rotation: rotation accuracy) and,
    for a multi-head model, each head's accuracy and macro-F1."""
    if isinstance(meta, dict):
        meta = models.CheckpointMeta.from_checkpoint(meta)
    if len(images) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    if meta.task == "rotation":
        probs = predict(model, images, meta.mean, meta.std, rt, _rotation_forward)
        return metrics_from_probs(probs.reshape(-1, 4), torch.arange(4).repeat(len(images)), False)
    probs = predict(model, images, meta.mean, meta.std, rt, probs_forward(meta.multi_label))
    return metrics_from_probs(probs, labels, meta.multi_label, heads=meta.heads)


def _rotation_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    xr, _ = data.rotate_batch(x)
    p = model(xr).float().softmax(1)  # 4N x 4, grouped by rotation
    n = len(x)
    return p.reshape(4, n, 4).transpose(0, 1).reshape(n, 16)


# ---------------------------------------------------------------------------
# Data and model set-up


def data_opts(args, ck: dict | None = None, img_size=None) -> data.Opts:
    """How to read --data: the data flags, or for checkpoint `ck` its size (img_size wins) and
    channels."""
    kw = {"skip_bad_images": args.skip_bad_images, "cache_dir": args.cache_dir}
    if ck is not None:
        return data.Opts.of_checkpoint(models.read_meta(ck), img_size, **kw)
    return data.Opts(args.img_size, args.in_chans, saturation=args.saturation_channel, **kw)


def split_spec(args) -> data.SplitSpec:
    """The train/val split the split flags ask for."""
    return data.SplitSpec(
        args.val_ratio, args.split_seed, getattr(args, "kfold", None), getattr(args, "fold", None)
    )


def load_data(args, need_val: bool = True):
    """Train and val ImageSets plus the split record; labels-per-class and relabel applied."""
    if not args.data:
        raise UserError("--data is required (a data set path; see python data.py --help)")
    kw = (args.data_format, split_spec(args), data_opts(args))
    train_set, record = data.load_split(args.data, "train", *kw)
    need_ids = need_val or getattr(args, "relabel", None)
    val_set = data.load_split(args.data, "val", *kw)[0] if need_ids else None
    if not train_set.has_labels:
        raise UserError(f"{args.data}: no labels found; training needs a labelled data set")
    if getattr(args, "relabel", None):  # the held-out part keeps its labels: comparable metrics
        train_set, changed = data.relabel(train_set, args.relabel, val_set.ids)
        print(f"relabel: {changed} of {len(train_set)} training labels changed by {args.relabel}")
    if args.labels_per_class:
        train_set = train_set.subset(
            labelled_subset(train_set.labels, args.labels_per_class, args.split_seed)
        )
    return train_set, val_set, record


def build_model(args, num_classes: int, in_chans: int, img_size) -> nn.Module:
    """Create the model (seeded) and load --weights (head replaced when shapes differ)."""
    torch.manual_seed(args.random_seed)
    opts = models.ModelOpts(
        pretrained=args.pretrained,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        grad_checkpointing=getattr(args, "grad_checkpointing", False),
        heads=_head_sizes(args),  # --heads: models.MultiHead, joint 18-class log-probs out
    )
    model = models.create_model(args.model, num_classes, in_chans, img_size, opts)
    if args.weights:
        sd = models.load_state_dict_file(args.weights)
        head = set(models.head_names(model))
        own = model.state_dict()
        head_differs = any(
            k in sd and sd[k].shape != own[k].shape
            for k in own
            if any(k.startswith(h) for h in head)
        )
        report = models.load_weights(
            model, sd, allow_partial=args.allow_partial, skip_head=head_differs, source=args.weights
        )
        bad = sum(len(report[k]) for k in ("missing", "unexpected", "shape"))
        note = f" ({bad} keys differ, loaded the rest)" if bad else ""
        head_note = ", new classifier head" if head_differs else ""
        print(f"weights: {args.weights}{head_note}{note}")
    return model


def _build_loss(args, multi_label: bool) -> nn.Module:
    name = args.loss
    if name == "auto":
        name = "bce" if multi_label else ("label-smoothing" if args.smoothing > 0 else "ce")
    if args.task == "rotation":
        name = "label-smoothing" if args.smoothing > 0 else "ce"
    kw = {"smoothing": args.smoothing} if name == "label-smoothing" else {}
    if name == "f1":
        kw = {"multi_label": multi_label}
    try:
        return losses.build_loss(name, **kw)
    except ValueError as e:
        raise UserError(f"--loss {args.loss}: {e}") from None


# ---------------------------------------------------------------------------
# The run directory: one writer, fresh/resume checks, staging under --overwrite, checkpoints


# Files a run writes; --overwrite replaces a directory only when it holds nothing else.
RUN_FILES = {
    "args.json", "metrics.jsonl", "summary.json", "test_metrics.json", "last.pt", "best.pt",
    "best_ema.pt", "best_finetuned.pt", "wise.json",
    *runlog.RUN_FILES,  # summary.csv, tb/, wandb/, wandb_id.txt (epoch_N.pt: runlog.EPOCH_FILE)
}  # fmt: skip


class RunDir:
    """<out>/<name>. `check` (read-only) says whether to start or resume; `open` takes the lock
    (rank 0) and, under --overwrite, a staging directory beside the old run, which `close`
    swaps in only when the run ends well; files go to `path` meanwhile."""

    def __init__(self, final: Path, is_main: bool = True):
        self.final = final
        self.path = final
        self.is_main = is_main
        self.staged = False
        self.lock = DirLock(final, "--name")

    def check(self, args) -> Path | None:
        """The last.pt to resume, or None for a new run; UserError when neither is right."""
        if args.resume:
            path = self.final / "last.pt" if args.resume == "auto" else Path(args.resume)
            if not path.exists():
                raise UserError(f"{path}: nothing to resume; drop --resume to start a new run")
            return path
        if not self.is_main:
            return None
        ensure_new_output(self.final, "summary.json", args.overwrite)
        if (self.final / "last.pt").exists() and not args.overwrite:
            raise UserError(
                f"{self.final}: holds an interrupted run; add --resume to continue it, "
                "or --overwrite to start again"
            )
        if args.overwrite and self.final.is_dir():
            other = sorted(
                p.name
                for p in self.final.iterdir()
                if p.name not in RUN_FILES
                and not p.name.startswith(".")
                and not runlog.EPOCH_FILE.match(p.name)
            )
            if other:
                raise UserError(
                    f"{self.final}: holds files that are not part of a run ({', '.join(other[:3])}); "
                    "--overwrite replaces the whole directory: move them or choose another --name"
                )
        check_writable_dir(self.final, "--out")
        return None

    def open(self, args, record: dict, resuming: bool) -> None:
        """Lock; stage under --overwrite; write `record` as args.json (rank 0 only)."""
        if not self.is_main:
            return
        self.lock.acquire()
        try:
            recover_dir(self.final)
            self.check(args)  # again, now that no other command can change it
            if args.overwrite and not resuming and self.final.exists():
                self.path, self.staged = staged_dir(self.final), True
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                if not resuming:  # leftovers of a run killed before its first epoch ended
                    for f in ("metrics.jsonl", "best.pt", "best_ema.pt"):
                        (self.path / f).unlink(missing_ok=True)
            write_json(self.path / "args.json", record)
        except BaseException:
            self.close(ok=False)
            raise

    def close(self, ok: bool) -> None:
        """Commit a staged run when ok, else drop it (the old run stays); release the lock."""
        if not self.is_main:
            return
        try:
            if self.staged and ok:
                commit_dir(self.path, self.final)
            elif self.staged:
                shutil.rmtree(self.path, ignore_errors=True)
            self.path = self.final
            self.staged = False
        finally:
            self.lock.release()

    def log(self, row: dict) -> None:
        append_jsonl(self.path / "metrics.jsonl", row)

    def trim_log(self, epochs_done: int) -> None:
        """Drop log rows past the resume point (killed after logging an epoch, before its last.pt)
        and a torn last line, so the resumed run appends to a clean log."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        rows = read_jsonl(path)
        keep = [r for r in rows if r.get("epoch", 0) <= epochs_done]
        if len(keep) != len(rows) or not path.read_text(encoding="utf-8").endswith("\n"):
            write_jsonl(path, keep)

    def save_best(self, name: str, model: nn.Module, meta: dict, row: dict) -> None:
        models.save_checkpoint(self.path / name, model, {**meta, "metrics": row})

    def save_last(self, t: Training) -> None:
        extra = {
            "optimizer": t.opt.state_dict(),
            "scaler": t.scaler.state_dict(),
            "train_state": asdict(t.state),
            "aug_rng": t.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "resume_fingerprint": t.fingerprint,
        }
        if t.ema is not None:
            extra["ema_state_dict"] = t.ema.state_dict()
        if torch.cuda.is_available():
            extra["cuda_rng"] = torch.cuda.get_rng_state_all()
        models.save_checkpoint(self.path / "last.pt", t.model, t.meta, extra=extra)

    def rows(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return read_jsonl(path) if path.exists() else []


# ---------------------------------------------------------------------------
# Resume: what a continued run depends on must not change


# args that shape the trajectory of a run (flag = key with "-" for "_")
RESUME_KEYS = (
    "model", "task", "rotations", "opt", "amp", "batch_size", "accum_steps", "lr", "momentum",
    "weight_decay", "sched", "min_lr_ratio", "milestones", "gamma", "epochs",
    "clip_grad", "ema", "loss", "smoothing", "aug", "pad", "mix", "mix_alpha", "mix_prob",
    "drop", "drop_path", "random_seed", "labels_per_class", "oversample", "img_size", "in_chans",
    "prog_resize", "prog_until",
)  # fmt: skip


def fingerprint(args, keys, train_set, record: dict, world: int, warmup: int) -> dict:
    """What resume depends on: the trajectory flags, the warm-up in steps, the world size, the
    data and the split."""
    h = hashlib.sha1(data.ids_hash(train_set.ids).encode())
    h.update(np.ascontiguousarray(train_set.labels.numpy()).tobytes())
    fp = {k: getattr(args, k, None) for k in keys}
    fp.update(warmup=warmup, world_size=world, data_hash=h.hexdigest()[:16])
    return jsonable({**fp, "val_hash": record.get("val_hash")})


def fingerprint_changes(saved: dict, now: dict, data_path=None) -> list[str]:
    """'--lr 0.1 (was 0.2)' for each difference that resume cannot honour."""
    out = []
    if "rotations" not in saved and saved.get("task") == "rotation":
        saved = {**saved, "rotations": "all"}  # runs from before --rotations used all four
    for k, v in now.items():
        if k not in saved or saved[k] == v:
            continue
        if k == "epochs" and now.get("sched") in EPOCHS_FREE_SCHEDS:
            continue
        if k == "data_hash":
            out.append(f"the training data (--data {data_path}: other images or labels)")
        elif k == "val_hash":
            out.append("the train/val split (other held-out ids)")
        elif k == "world_size":
            out.append(f"{v} processes (was {saved[k]})")
        elif k == "warmup":
            out.append(f"a warm-up of {v} steps (was {saved[k]}; see --warmup-epochs)")
        else:
            out.append(f"--{k.replace('_', '-')} {v} (was {saved[k]})")
    return out


# ---------------------------------------------------------------------------
# Training


@dataclass
class FitHooks:
    """What a caller (finetune.py) changes in fit; every field is optional and explicit."""

    param_groups: Callable[[nn.Module], list[dict]] | None = None  # optimizer groups
    prepare_model: Callable[[nn.Module], None] | None = None  # before EMA copy / DDP wrap
    epoch_start: Callable[[int, nn.Module], None] | None = None  # (epoch index, model)
    epoch_end: Callable[[int, dict], None] | None = None  # (epoch index, its metrics row)
    after_fit: Callable[[Training], dict | None] | None = None  # rank 0; dict joins summary
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient for a while
    record: dict = field(default_factory=dict)  # extra keys for args.json / checkpoint "args"
    resume_keys: tuple[str, ...] = ()  # extra args resume depends on


def _empty_partial() -> dict:
    return {"loss": 0.0, "n": 0, "seconds": 0.0, "images": 0}


@dataclass
class TrainState:
    """The counters last.pt saves ('train_state'): position in the run and best scores."""

    epoch: int = 0
    step: int = 0
    batch: int = 0
    best_acc: float = -1.0
    best_ema_acc: float = -1.0
    plateau_scale: float = 1.0
    plateau_best: float = float("inf")
    plateau_bad: int = 0
    partial: dict = field(default_factory=_empty_partial)  # the epoch in progress


@dataclass
class Training:
    """Everything the loop works with, built by `_prepare` before anything is written."""

    args: argparse.Namespace
    hooks: FitHooks
    rt: models.Runtime
    rank: int
    world: int
    run: RunDir
    train_set: data.ImageSet
    val_set: data.ImageSet
    meta: dict  # checkpoint metadata
    model: nn.Module
    ema: EMA | None
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    fingerprint: dict
    sample_idx: torch.Tensor  # one epoch's indices (oversampling applied)
    steps_per_epoch: int
    aug_gen: torch.Generator = field(default_factory=torch.Generator)
    state: TrainState = field(default_factory=TrainState)
    aug: list[str] = field(default_factory=list)  # --aug names
    resume_from: Path | None = None
    train_model: nn.Module | None = None  # set by _wrap_for_training: DDP / torch.compile
    images: torch.Tensor | None = None  # the training images and labels on the device
    labels: torch.Tensor | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi_label(self) -> bool:
        return self.meta["multi_label"]

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.args.epochs

    @property
    def warmup(self) -> int:
        a = self.args
        return warmup_steps(a.warmup_epochs, self.steps_per_epoch, self.total_steps, a.sched)

    @functools.cached_property
    def schedule(self) -> Schedule:
        return Schedule.of(self.args)


def fit(args, hooks: FitHooks | None = None) -> dict:
    """Train per args; writes best.pt/last.pt/metrics.jsonl/args.json/summary.json to out/name."""
    t = _prepare(args, hooks or FitHooks())
    ok = False
    t.run.open(t.args, t.meta["args"], resuming=t.resume_from is not None)
    try:
        if t.resume_from is not None and t.is_main:
            t.run.trim_log(t.state.epoch)
            print(
                f"resumed from {t.resume_from} at epoch {t.state.epoch + 1}, batch {t.state.batch}"
            )
        _wrap_for_training(t)
        _announce(t)
        _train_epochs(t)
        summary = _finish(t)
        ok = True
    finally:
        t.run.close(ok)
    if t.world > 1:
        torch.distributed.barrier()
    return summary


def _prepare(args, hooks: FitHooks) -> Training:
    """Check every flag and load every input (data, weights, last.pt); nothing is written."""
    check_flags(args)
    rank, world = _init_distributed(args)
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else None
    rt = models.setup_runtime(args, local_rank)
    if args.sync_bn and rt.device.type != "cuda":
        raise UserError(
            f"--sync-bn: SyncBatchNorm needs CUDA, and this run is on {rt.device.type}; drop "
            "--sync-bn (BN statistics are averaged over ranks after every epoch anyway)"
        )
    why_amp = amp_reason(args.amp, rt)
    args.amp = rt.amp
    aug = data._aug_names(args.aug) if args.aug is not None else None  # unknown: UserError now
    _check_heads_data(args)
    train_set, val_set, record = load_data(args)
    rotation = args.task == "rotation"
    multi_label = train_set.multi_label and not rotation
    num_classes = 4 if rotation else len(train_set.classes)
    in_chans, img_hw = train_set.images.shape[1], list(train_set.images.shape[2:])
    if args.prog_resize and not 8 <= args.prog_resize < img_hw[0]:
        raise UserError(
            f"--prog-resize {args.prog_resize}: must be 8 or more and below the training height "
            f"({img_hw[0]} px); use e.g. {max(8, img_hw[0] * 2 // 3)}, or 0 for off"
        )
    mean, std = _normalisation(args, train_set, in_chans)
    loss_fn = _build_loss(args, multi_label)
    if getattr(args, "heads", None):
        loss_fn = _head_loss(args, train_set)
    sample_idx = oversample_index(train_set.labels, args.oversample, train_set.classes)
    recipe = choose_recipe(args, len(sample_idx), world, fmt=train_set.fmt)
    why_model = default_model(args, rt, len(sample_idx) * args.epochs)
    if args.name is None:
        args.name = f"{args.model}_{args.task}"
    run = RunDir(Path(args.out) / args.name, is_main=rank == 0)
    resume_from = run.check(args)
    resume_ck = models.load_checkpoint(resume_from) if resume_from is not None else None
    why_ema = default_ema(args, resume_ck)
    if rank == 0:
        print(recipe + why_amp + why_model + why_ema, flush=True)
    aug = aug if aug is not None else data._aug_names(args.aug)
    steps_per_epoch = _steps_per_epoch(args, len(sample_idx), world)
    total = steps_per_epoch * args.epochs
    warmup = warmup_steps(args.warmup_epochs, steps_per_epoch, total, args.sched)
    model = build_model(args, num_classes, in_chans, img_hw)
    if hooks.prepare_model:
        hooks.prepare_model(model)
    args_record = {**vars(args), **hooks.record}
    meta = {
        "arch": args.model,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "saturation": bool(args.saturation_channel),
        "img_size": img_hw,
        "classes": ["0", "90", "180", "270"] if rotation else train_set.classes,
        "multi_label": multi_label,
        "mean": list(mean),
        "std": list(std),
        "split": record,
        "args": args_record,
        "task": args.task,
    }
    if getattr(args, "heads", None):
        meta["heads"] = {h: list(data.MASK_HEADS[h]) for h in args.heads}
    model.to(rt.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    groups = hooks.param_groups(model) if hooks.param_groups else None
    opt = make_optimizer(groups or param_groups(model, args.weight_decay), args)
    for g in opt.param_groups:
        g.setdefault("lr_scale", 1.0)
    t = Training(
        args=args,
        hooks=hooks,
        rt=rt,
        rank=rank,
        world=world,
        run=run,
        train_set=train_set,
        val_set=val_set,
        meta=meta,
        model=model,
        ema=EMA(model, args.ema) if args.ema else None,
        opt=opt,
        scaler=torch.amp.GradScaler(rt.device.type, enabled=args.amp == "fp16"),
        loss_fn=loss_fn,
        fingerprint=fingerprint(
            args, RESUME_KEYS + hooks.resume_keys, train_set, record, world, warmup
        ),
        sample_idx=torch.from_numpy(sample_idx),
        steps_per_epoch=steps_per_epoch,
        aug=aug,
        resume_from=resume_from,
    )
    if resume_from is not None:
        _restore(t, resume_from, resume_ck)
    return t


def _init_distributed(args) -> tuple[int, int]:
    """(rank, world size); starts torch.distributed under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _normalisation(args, train_set, in_chans: int) -> tuple[list, list]:
    """The data's mean/std, or the pretrained start's when --weights is a checkpoint of ours."""
    mean, std = data.mean_std(train_set.images)
    if args.weights and args.weights.endswith(".pt"):
        with contextlib.suppress(UserError):
            ck = models.load_checkpoint(args.weights)
            if len(ck.get("mean", [])) == in_chans:
                mean, std = ck["mean"], ck["std"]
    return mean, std


# Defaults that fit the data size, for the flags not given (CLI or --config), from measurements
# (README "Defaults that fit the data size"): --batch-size the largest of RECIPE_BATCHES that
# still gives an epoch >= RECIPE_MIN_STEPS optimizer steps; --opt sgd, but adamw for a run of
# fewer than RECIPE_SGD_MIN_STEPS steps when --lr is not given either (3,000 letters x 3 epochs:
# SGD stays near chance at lr >= 0.05, AdamW learns); --lr for SGD 0.2 at batch >= 128 (measured
# at 128 and 256), linear below (Goyal et al. 2017), for Adam-like optimizers their batch-256
# default times sqrt(batch/256) (Malladi et al. 2022); --warmup-epochs min(1, 20% of the run).
RECIPE_BATCHES = (256, 128, 64, 32)
RECIPE_MIN_STEPS = 50
RECIPE_SGD_MIN_STEPS = 300
RECIPE_SGD_FULL_LR_BATCH = 128
RECIPE_WARMUP_FRAC = 0.2


# data formats of glyphs (letters, digits): a mirror flip changes the class (b/d, p/q)
GLYPH_FORMATS = ("synth", "pixels-csv")


def default_model(args, rt: models.Runtime, images_seen: int) -> str:
    """Set --model where it was not given (models.default_arch); the reason for the recipe line
    ("" when --model was given)."""
    if args.model is not None:
        return ""
    args.model = models.default_arch(rt.device, rt.amp, images_seen)
    precision = "fp32" if rt.amp == "none" else rt.amp
    if rt.device.type != "cpu":
        why = f"{precision} on {rt.device.type}"
    elif images_seen < models.SHORT_RUN_IMAGES:
        why = f"{precision} on cpu, a short run: {images_seen} < {models.SHORT_RUN_IMAGES} images"
        why += " seen"
    else:
        why = f"{precision} on cpu, {images_seen} images seen"
    return f", model {args.model} (auto: {why})"


def amp_reason(amp_flag: str, rt: models.Runtime) -> str:
    """', amp X (why)' for the recipe line; `amp_flag` is --amp as given."""
    if amp_flag != "auto":
        why = "--amp"
    elif rt.device.type == "cpu":  # auto resolved to bf16 exactly where cpu_bf16 says fast
        why = f"auto: {models.cpu_bf16()[1]}"
    else:
        why = f"auto: {rt.device.type}"
    return f", amp {rt.amp} ({why})"


def choose_recipe(args, n_samples: int, world: int, fmt: str = "") -> str:
    """Set --batch-size, --opt, --lr, --warmup-epochs and --aug where they were not given; the
    reasons as one line."""
    per_batch = world * args.accum_steps

    def steps(b: int) -> int:
        return n_samples // (b * per_batch)

    if args.batch_size is None:
        ok = [b for b in RECIPE_BATCHES if steps(b) >= RECIPE_MIN_STEPS]
        args.batch_size = ok[0] if ok else RECIPE_BATCHES[-1]
        why_b = (
            f"{n_samples} images: {steps(args.batch_size)} steps/epoch; auto = the largest of "
            f"{'/'.join(map(str, RECIPE_BATCHES))} with >= {RECIPE_MIN_STEPS}"
        )
    else:
        why_b = "--batch-size"
    spe = max(1, steps(args.batch_size))
    total = spe * args.epochs
    why_o = "--opt"
    if args.opt is None:
        short = args.lr is None and total < RECIPE_SGD_MIN_STEPS
        args.opt = "adamw" if short else "sgd"
        why_o = f"auto: {total} < {RECIPE_SGD_MIN_STEPS} steps" if short else "auto: the default"
    if args.lr is None:
        effective = args.batch_size * per_batch
        ratio = effective / 256
        if opt_family(args.opt) == "sgd":
            full = RECIPE_SGD_FULL_LR_BATCH
            ratio = min(1.0, effective / full)
            args.lr = default_lr(args.opt) * ratio
            rule = f"x {effective}/{full}" if ratio < 1 else f"at batch >= {full}"
        else:
            args.lr, rule = default_lr(args.opt) * ratio**0.5, f"x sqrt({effective}/256)"
        args.lr = float(f"{args.lr:.4g}")
        why_lr = f"{default_lr(args.opt):g} {rule}, {args.opt}"
    else:
        why_lr = "--lr"
    if args.warmup_epochs is None:
        args.warmup_epochs = round(min(1.0, RECIPE_WARMUP_FRAC * args.epochs), 4)
        why_w = f"auto: min(1 epoch, {RECIPE_WARMUP_FRAC:.0%} of the run)"
    else:
        why_w = f"--warmup-epochs, at most {WARMUP_MAX_FRAC:.0%} of the run"
    w = warmup_steps(args.warmup_epochs, spe, total, args.sched)
    why_aug = ""
    if getattr(args, "aug", "") is None:
        glyphs = fmt in GLYPH_FORMATS
        args.aug = "crop" if glyphs else "flip,crop"
        why = f"{fmt} data are glyphs, not mirror-invariant" if glyphs else "the default"
        why_aug = f", aug {args.aug} (auto: {why})"
    return (
        f"recipe: batch {args.batch_size} ({why_b}), opt {args.opt} ({why_o}), lr {args.lr:g} "
        f"({why_lr}), warm-up {w} of {total} steps ({why_w}){why_aug}"
    )


def _steps_per_epoch(args, n_samples: int, world: int) -> int:
    n_batches = max(1, n_samples // (args.batch_size * world))
    if args.accum_steps > n_batches:
        raise UserError(
            f"--accum-steps {args.accum_steps}: an epoch has only {n_batches} batch(es) of "
            f"--batch-size {args.batch_size}, so no optimizer step would happen; use "
            f"--accum-steps {n_batches} or less, or a smaller --batch-size"
        )
    return n_batches // args.accum_steps


def _restore(t: Training, path: Path, ck: dict) -> None:
    """Load last.pt (`ck`, read from `path`) into the model, EMA, optimizer, scaler, counters and
    RNGs (after checking that it was written by a run with the same settings)."""
    if "train_state" not in ck:
        raise UserError(
            f"{path}: holds no training state (a best.pt or an exported model?); --resume needs "
            f"the last.pt of a run, e.g. {Path(t.args.out) / t.args.name / 'last.pt'}"
        )
    old_args = ck.get("args") or {}  # a last.pt without a fingerprint: its recorded flags
    saved = ck.get("resume_fingerprint") or jsonable(
        {k: old_args[k] for k in t.fingerprint if k in old_args}
        | {"model": ck["arch"], "val_hash": (ck.get("split") or {}).get("val_hash")}
    )
    changes = fingerprint_changes(saved, t.fingerprint, t.args.data)
    if changes:
        raise UserError(
            f"{path}: cannot continue with other settings: {', '.join(changes)}; rerun with the "
            "original flags, or start a new run with a new --name (or --overwrite)"
        )
    try:
        t.model.load_state_dict(ck["state_dict"])
        t.opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"{path}: does not match this model/optimizer ({str(e)[:80]}); "
            "resume with the same flags"
        ) from None
    t.scaler.load_state_dict(ck["scaler"])
    if t.ema is not None and "ema_state_dict" in ck:
        t.ema.load_state_dict(ck["ema_state_dict"])
    t.state = TrainState(**ck["train_state"])
    t.aug_gen.set_state(ck["aug_rng"])
    torch.set_rng_state(ck["torch_rng"])
    if "cuda_rng" in ck and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])


def _wrap_for_training(t: Training) -> None:
    """DDP (with SyncBatchNorm on CUDA when asked) and torch.compile around the model."""
    m = t.model
    if t.world > 1:
        if t.args.sync_bn:
            m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
        m = nn.parallel.DistributedDataParallel(
            m,
            device_ids=[t.rt.device.index] if t.rt.device.type == "cuda" else None,
            find_unused_parameters=t.hooks.find_unused_parameters,
        )
    t.train_model = torch.compile(m) if t.args.compile else m
    t.images = t.train_set.images.to(t.rt.device, non_blocking=True)
    t.labels = t.train_set.labels.to(t.rt.device, non_blocking=True)


def _announce(t: Training) -> None:
    if t.is_main:
        n_params = sum(p.numel() for p in t.model.parameters()) / 1e6
        c, h, w = t.train_set.images.shape[1:]
        print(
            f"{t.args.name}: {len(t.train_set)} train / {len(t.val_set)} val images "
            f"{c}x{h}x{w}, {t.meta['num_classes']} classes, {t.args.model} "
            f"({n_params:.2f}M params) on {t.rt.device}"
        )


def _train_epochs(t: Training) -> None:
    """The epochs left; Ctrl-C saves last.pt and exits 130, a NaN loss raises DivergedError."""
    interrupted = {"flag": False}
    old_handler = _install_sigint(interrupted) if t.is_main else None
    try:
        for epoch in range(t.state.epoch, t.args.epochs):
            if t.hooks.epoch_start:
                t.hooks.epoch_start(epoch, t.model)
            _train_epoch(t, epoch, interrupted)
            row = _end_epoch(t, epoch)
            t.state.epoch, t.state.batch = epoch + 1, 0
            if t.is_main:
                runlog.epoch_end(t, row)  # summary.csv, --log streams, --checkpoint-hist files
                t.run.save_last(t)
            if t.hooks.epoch_end:
                t.hooks.epoch_end(epoch, row)
    except KeyboardInterrupt:
        if t.is_main:
            _report_interrupt(t, interrupted)
        raise SystemExit(130) from None
    except DivergedError as e:
        raise DivergedError(f"{e}; {_what_is_kept(t)}") from None
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def _install_sigint(flag: dict):
    """First Ctrl-C: finish the current step, save last.pt, exit. Second: stop at once."""

    def handler(signum, frame):
        if flag["flag"]:
            flag["abort"] = True
            raise KeyboardInterrupt
        flag["flag"] = True
        print("\nCtrl-C: saving last.pt after this step (press again to abort)", file=sys.stderr)

    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        return None


def _train_epoch(t: Training, epoch: int, interrupted: dict) -> None:
    """Train from state.batch to the end of the epoch; the epoch's timing goes to state.partial."""
    args, state, rank = t.args, t.state, t.rank
    if state.batch == 0:  # epoch boundary: RNGs are a function of (seed, epoch, rank)
        torch.manual_seed(_epoch_seed(args.random_seed, epoch, rank))
        t.aug_gen.manual_seed(_epoch_seed(args.random_seed, epoch, rank) + 1)
        state.partial = _empty_partial()
    batches = _epoch_batches(t, epoch)
    t.train_model.train()
    t0 = time.perf_counter()
    part = state.partial
    bar = progress(
        range(state.batch, len(batches)),
        args.quiet or not t.is_main,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        total=len(batches),
        initial=state.batch,
    )
    for b in bar:
        # stop between optimizer steps: gradients accumulated so far are not saved
        if interrupted["flag"] and b % args.accum_steps == 0:
            raise KeyboardInterrupt
        idx = batches[b].to(t.rt.device, non_blocking=True)
        loss_val = _train_step(t, t.images[idx], t.labels[idx], b)
        if t.ema is not None and (b + 1) % args.accum_steps == 0:
            t.ema.update(t.model, state.step)
        part["loss"] += loss_val * len(idx)
        part["n"] += len(idx)
        part["images"] += len(idx) * t.world
        state.batch = b + 1
        if hasattr(bar, "set_postfix") and b % 10 == 0:
            bar.set_postfix(loss=f"{part['loss'] / max(1, part['n']):.4f}")
        if not math.isfinite(loss_val):
            raise DivergedError(
                f"loss became {loss_val} at epoch {epoch + 1} step {state.step} "
                f"(lr {t.opt.param_groups[0]['lr']:.3g}); training stopped"
            )
    if t.rt.device.type == "cuda":
        torch.cuda.synchronize(t.rt.device)
    part["seconds"] += time.perf_counter() - t0
    if t.world > 1:
        _average_buffers(t.model, t.world)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63)


def _epoch_batches(t: Training, epoch: int) -> list[torch.Tensor]:
    """This rank's batches of the epoch: one permutation shared by all ranks, cut, strided."""
    n, bs, world = len(t.sample_idx), t.args.batch_size * t.world, t.world
    perm_gen = torch.Generator().manual_seed(_epoch_seed(t.args.random_seed, epoch, 0) + 2)
    perm = t.sample_idx[torch.randperm(n, generator=perm_gen)]
    batches = data.batch_indices(n, bs, False, drop_last=True) or [torch.arange(n)]
    batches = [perm[b][t.rank :: world] for b in batches]
    return batches[: t.steps_per_epoch * t.args.accum_steps]


def prog_size(epoch: int, args, full_hw) -> tuple[int, int]:
    """Training (height, width) of `epoch` (0-based) under --prog-resize PX: PX at the first
    epoch, growing linearly to the full size at --prog-until x epochs (full from then on),
    heights rounded down to a multiple of 4 (a few kernel shapes), width in proportion."""
    h, w = int(full_hw[0]), int(full_hw[1])
    ramp = args.prog_until * args.epochs
    if not args.prog_resize or epoch >= ramp:
        return h, w
    px = args.prog_resize + (h - args.prog_resize) * epoch / ramp
    px = max(args.prog_resize, int(px) // 4 * 4)
    return (h, w) if px >= h else (px, max(1, round(w * px / h)))


def _train_step(t: Training, x_u8: torch.Tensor, y: torch.Tensor, b: int) -> float:
    """One forward/backward on a batch; steps the optimizer every --accum-steps batches."""
    args = t.args
    x = data.normalize(x_u8, t.meta["mean"], t.meta["std"])
    if t.aug:
        x = data.augment_batch(x, t.aug, t.aug_gen, pad=args.pad)
    hw = prog_size(t.state.epoch, args, x.shape[-2:])
    if hw != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
    if args.task == "rotation":
        x, y = data.rotate_batch(x, None if args.rotations == "all" else t.aug_gen)
        y = y.to(t.rt.device)
    elif args.mix != "none" and torch.rand((), generator=t.aug_gen).item() < args.mix_prob:
        y_soft = y.float() if t.multi_label else F.one_hot(y, t.meta["num_classes"]).float()
        x, y = data.mix_batch(x, y_soft, args.mix, args.mix_alpha, t.aug_gen)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with models.autocast(t.rt.device, args.amp):
        out = t.train_model(x)
    loss = t.loss_fn(out.float(), y)
    t.scaler.scale(loss / args.accum_steps).backward()
    if (b + 1) % args.accum_steps == 0:
        scale = t.state.plateau_scale * lr_factor(t.state.step, t.total_steps, t.warmup, t.schedule)
        for g in t.opt.param_groups:
            g["lr"] = args.lr * scale * g.get("lr_scale", 1.0)
        if args.clip_grad:
            t.scaler.unscale_(t.opt)
            torch.nn.utils.clip_grad_norm_(t.train_model.parameters(), args.clip_grad)
        t.scaler.step(t.opt)
        t.scaler.update()
        t.opt.zero_grad(set_to_none=True)
        t.state.step += 1
    return loss.item()


def _average_buffers(model: nn.Module, world: int) -> None:
    """Average float buffers (BN running stats) over ranks, so all ranks evaluate one model.

    DDP keeps parameters equal, but each rank's BN statistics follow its own batches.
    """
    import torch.distributed as dist

    for b in models.unwrap(model).buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(world)


def _end_epoch(t: Training, epoch: int) -> dict:
    """Evaluate, log a metrics row, save best.pt / best_ema.pt, print the epoch line."""
    args, state, val, part = t.args, t.state, t.val_set, t.state.partial
    meta = models.CheckpointMeta.from_checkpoint(t.meta)
    m = evaluate(t.model, val.images, val.labels, meta, t.rt)
    row = {
        "epoch": epoch + 1,
        "train_loss": part["loss"] / max(1, part["n"]),
        "val_loss": m["loss"],
        "val_acc": m["acc"],
        "lr": t.opt.param_groups[0]["lr"],
        "seconds": round(part["seconds"], 3),
        "images_per_s": round(part["images"] / max(part["seconds"], 1e-9), 1),
    }
    row.update({f"val_{k}": v for k, v in m.items() if k not in ("loss", "acc")})
    if t.ema is not None:
        me = evaluate(t.ema.module, val.images, val.labels, meta, t.rt)
        row["ema_val_acc"] = me["acc"]
        row["ema_val_loss"] = me["loss"]
    if args.sched == "plateau":
        plateau_update(state, m["loss"], args.gamma)
    if not t.is_main:
        return row
    t.run.log(row)
    loss = row["val_loss"]
    score = m["acc"] if math.isfinite(m["acc"]) else -loss if math.isfinite(loss) else 0.0
    if score > state.best_acc or len(val) == 0:
        state.best_acc = score
        t.run.save_best("best.pt", t.model, t.meta, row)
    if t.ema is not None and row["ema_val_acc"] > state.best_ema_acc:
        state.best_ema_acc = row["ema_val_acc"]
        t.run.save_best("best_ema.pt", t.ema.module, t.meta, {**row, "val_acc": row["ema_val_acc"]})
    extra = f"  ema {row['ema_val_acc']:.4f}" if t.ema is not None else ""
    f1 = f"  f1 {row['val_f1']:.4f}" if "val_f1" in row else ""
    f1 += _heads_text(row, t.meta.get("heads"))  # --heads: "  mask acc/f1  gender ..."
    hw = prog_size(epoch, args, t.meta["img_size"])
    if hw != tuple(t.meta["img_size"]):  # --prog-resize: the size this epoch trained at
        extra += f"  at {hw[0]}px"
    print(
        f"epoch {epoch + 1:3d}/{args.epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}{f1}{extra}  "
        f"lr {row['lr']:.3g}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s",
        flush=True,
    )
    return row


def _report_interrupt(t: Training, interrupted: dict) -> None:
    """Ctrl-C: save a consistent last.pt (not after a second Ctrl-C, which may land mid-step)."""
    if t.run.staged:
        msg = (
            f"interrupted: the previous run in {t.run.final} is unchanged (--overwrite replaces "
            "it only at the end); rerun the command to start again"
        )
    else:
        if t.state.batch > 0 and not interrupted.get("abort"):
            t.run.save_last(t)
        last = t.run.path / "last.pt"
        msg = (
            f"interrupted: {last} holds the state to continue from; rerun the same command "
            "plus --resume"
            if last.exists()
            else "interrupted before the first checkpoint; nothing to resume, rerun the command"
        )
    print(f"\n{msg}", file=sys.stderr)


def _what_is_kept(t: Training) -> str:
    """The end of the divergence message: what is on disk now, and what to try."""
    fix = (
        "causes: a too high --lr, fp16 overflow, or NaN/inf in the data or labels; try a lower "
        "--lr, --clip-grad 1.0 or --amp bf16/none"
    )
    if t.run.staged:
        return f"the previous run in {t.run.final} is unchanged; {fix}"
    if t.is_main and (t.run.path / "last.pt").exists():
        return f"{t.run.path / 'last.pt'} keeps epoch {t.state.epoch}, the last good one; {fix}"
    return f"no checkpoint was written (it diverged in its first epoch); {fix}"


def _finish(t: Training) -> dict:
    """after_fit hook, optional test evaluation, summary.json and the closing table."""
    extra = t.hooks.after_fit(t) if t.hooks.after_fit and t.is_main else None
    rows = t.run.rows() if t.is_main else []
    summary = {
        "run_dir": str(t.run.final),
        "best_val_acc": t.state.best_acc,
        "best_ema_val_acc": t.state.best_ema_acc if t.ema is not None else None,
        "epochs": t.args.epochs,
        "train_seconds": round(sum(r.get("seconds", 0) for r in rows), 1),
        "images_per_s": rows[-1]["images_per_s"] if rows else None,
    }
    if not t.is_main:
        return summary
    if t.args.eval_test and t.args.task == "classify":
        summary.update(_eval_test(t))
    summary.update(extra or {})
    write_json(t.run.path / "summary.json", summary)
    table = [["best val acc", summary["best_val_acc"]]]
    best = next((r for r in rows if r.get("val_acc") == summary["best_val_acc"]), None)
    if t.meta.get("heads") and best is not None:  # the best.pt epoch, head by head
        table.append(["best val 18-class macro-F1", best["val_f1"]])
        for h in t.meta["heads"]:
            table.append([f"  {h} head acc / macro-F1", f"{best[f'val_{h}_acc']:.4f} / "
                          f"{best[f'val_{h}_f1']:.4f}"])  # fmt: skip
    if t.ema is not None:
        table.append(["best EMA val acc", summary["best_ema_val_acc"]])
    tta = eval_tta_spec(t.args, t.aug) + " TTA"
    for k in ("test_acc", "tta_test_acc", "ema_test_acc", "ema_tta_test_acc"):
        if k in summary:
            table.append(
                [
                    k.replace("tta_", "").replace("_", " ") + (f", {tta}" if "tta" in k else ""),
                    summary[k],
                ]
            )
    ckpts = "best,best_ema,last" if t.ema is not None else "best,last"
    table += [
        ["train time (s)", summary["train_seconds"]],
        ["images/s (last epoch)", summary["images_per_s"]],
        ["wrote", f"{t.run.final}/{{{ckpts}}}.pt, metrics.jsonl"],
    ]
    print(format_table(table, ["result", "value"]))
    return summary


def eval_tta_spec(args, aug: list[str]) -> str:
    """--eval-tta with auto resolved: flip if the run trained with flips, else none."""
    if args.eval_tta == "auto":
        return "flip" if "flip" in aug else "none"
    return args.eval_tta


def eval_tta_forward(args, aug: list[str], multi_label: bool = False) -> Callable | None:
    """predict's forward for the TTA views --eval-test also reports (--eval-tta; auto: flip
    if trained with flips); None for none. check_flags calls it, so a bad name fails before
    anything is written."""
    try:
        import infer  # infer imports train: imported when used
    except ImportError:  # train.py copied without infer.py / vote.py: no TTA rows
        if args.eval_tta in ("auto", "none"):
            return None
        raise UserError(
            f"--eval-tta {args.eval_tta}: needs infer.py and vote.py beside train.py; copy them "
            "or pass --eval-tta none"
        ) from None
    spec = eval_tta_spec(args, aug)
    try:
        views = infer.tta_views(spec)
    except UserError as e:  # infer.py names its own flag
        raise UserError(f"--eval-{str(e).removeprefix('--')}") from None
    return None if views == [infer.IDENTITY] else infer.tta_forward(views, "mean", multi_label)


def _eval_test(t: Training) -> dict:
    """Accuracy of best.pt (and best_ema.pt) on the data set's own test part."""
    out = {}
    try:
        test_set = data.load_images(t.args.data, t.args.data_format, "test", data_opts(t.args))
    except UserError as e:
        print(f"warning: no test part evaluated ({e})", file=sys.stderr)
        return out
    if not test_set.has_labels:
        return out
    ml = t.meta["multi_label"]
    tta = eval_tta_forward(t.args, t.aug, ml)
    for key, name in (("test_acc", "best.pt"), ("ema_test_acc", "best_ema.pt")):
        if (t.run.path / name).exists():
            m, ck = models.load_model(t.run.path / name, t.rt.device)
            out[key] = evaluate(m, test_set.images, test_set.labels, ck, t.rt)["acc"]
            if tta:  # the same checkpoint, its views' probabilities averaged (infer.py --tta)
                probs = predict(m, test_set.images, ck["mean"], ck["std"], t.rt, tta)
                out[key.replace("test", "tta_test")] = metrics_from_probs(
                    probs, test_set.labels, ml
                )["acc"]
    write_json(t.run.path / "test_metrics.json", out)
    return out


# ---------------------------------------------------------------------------
# Evaluation-only and linear evaluation


def eval_only(args) -> dict:
    """Evaluate a checkpoint on --split of the data, rebuilt as the checkpoint records it (its
    validation ids verified) with the data's classes mapped onto the checkpoint's."""
    rt = models.setup_runtime(args)
    model, ck = models.load_model(args.eval_only, rt.device)
    ds = _recorded_part(args, ck, args.eval_only, args.split)
    labels = ds.labels
    if ck.get("task", "classify") == "classify":
        labels = data.map_labels(ds, ck["classes"], ck["multi_label"], args.eval_only)
    with Timer() as timer:
        m = evaluate(model, ds.images, labels, ck, rt)
    rows = [[k, v] for k, v in m.items()] + [
        ["images", len(ds)],
        ["images/s", round(len(ds) / max(timer.seconds, 1e-9))],
    ]
    print(format_table(rows, [f"{Path(args.eval_only).name} on {args.split}", "value"]))
    return m


def _recorded_part(args, ck: dict, source: str, split: str, img_size=None) -> data.ImageSet:
    """Part `split` of --data on the split checkpoint `ck` records (data.load_recorded_split)."""
    return data.load_recorded_split(
        ck,
        args.data,
        split,
        args.data_format,
        source,
        data_opts(args, ck, img_size),
    )


def block_features(
    model: nn.Module, images: torch.Tensor, mean, std, rt: models.Runtime, pool: int = 2
) -> list[torch.Tensor]:
    """Features after each block (avg-pooled to pool x pool, flattened), one pass for all
    blocks, through train.predict's batch loop (normalise, channels_last, autocast)."""
    blocks = models.feature_blocks(model)
    current: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, i=i: current.__setitem__(i, o))
        for i, (_, m) in enumerate(blocks)
    ]
    dims: list[int] = []

    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        m(x)
        feats = []
        for i in range(len(blocks)):
            o = current[i].float()
            o = F.adaptive_avg_pool2d(o, pool) if o.ndim == 4 else o.mean(1) if o.ndim == 3 else o
            feats.append(o.flatten(1))
        dims[:] = [f.shape[1] for f in feats]
        return torch.cat(feats, 1)

    try:
        out = predict(model, images, mean, std, rt, forward)
    finally:
        for h in hooks:
            h.remove()
    return list(out.split(dims, 1)) if dims else [torch.zeros(0, 0) for _ in blocks]


def train_probe(
    train_xy, val_xy, num_classes: int, epochs: int, seed: int, hidden: int = 0
) -> float:
    """Train a linear (or one-hidden-layer) classifier on fixed (features, labels); val accuracy."""
    (xtr, ytr), (xva, yva) = train_xy, val_xy
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    torch.manual_seed(seed)
    d = xtr.shape[1]
    probe = (
        nn.Sequential(
            nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
        if hidden
        else nn.Linear(d, num_classes)
    )
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=5e-4)
    steps = epochs * math.ceil(len(xtr) / 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in data.batch_indices(len(xtr), 256, True, generator=gen):
            loss = F.cross_entropy(probe(xtr[idx]), ytr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    probe.eval()
    return (probe(xva).argmax(1) == yva).float().mean().item()


def linear_eval(args) -> list[dict]:
    """RotNet protocol: freeze the backbone, train a probe on each block's features."""
    rt = models.setup_runtime(args)
    model, ck = models.load_model(args.linear_eval, rt.device)
    if not args.data:
        raise UserError("--data is required (the data set the probes train on)")
    train_set, val_set = (
        _recorded_part(args, ck, args.linear_eval, part, args.img_size) for part in ("train", "val")
    )
    if not train_set.has_labels:
        raise UserError(f"{args.data}: no labels found; linear eval needs a labelled data set")
    if args.relabel:  # as in training: the held-out part keeps its labels
        train_set, _ = data.relabel(train_set, args.relabel, val_set.ids)
    if args.labels_per_class:
        seed = ck["split"].get("seed", 0)
        train_set = train_set.subset(labelled_subset(train_set.labels, args.labels_per_class, seed))
    if train_set.multi_label:
        raise UserError(f"{args.data}: linear eval needs single-label data")
    names = [n for n, _ in models.feature_blocks(model)]
    with Timer() as timer:
        ftr = block_features(model, train_set.images, ck["mean"], ck["std"], rt)
        fva = block_features(model, val_set.images, ck["mean"], ck["std"], rt)
    k, ytr, yva = len(train_set.classes), train_set.labels, val_set.labels
    results = []
    for name, a, b in zip(names, ftr, fva):
        probe = functools.partial(
            train_probe, (a, ytr), (b, yva), k, args.linear_epochs, args.random_seed
        )
        row = {"block": name, "dims": a.shape[1], "linear_acc": probe()}
        if args.nonlinear:
            row["mlp_acc"] = probe(hidden=512)
        results.append(row)
    header = ["block", "dims", "linear_acc"] + (["mlp_acc"] if args.nonlinear else [])
    print(
        f"linear eval of {args.linear_eval} ({ck.get('task')}): {len(train_set)} train / "
        f"{len(val_set)} val images, features in {timer.seconds:.1f}s"
    )
    print(format_table([[r[h] for h in header] for r in results], header))
    name = args.name or f"{Path(args.linear_eval).parent.name}_linear"
    out = Path(args.out) / name
    record = {
        "checkpoint": args.linear_eval,
        "blocks": results,
        "labels_per_class": args.labels_per_class,
    }
    write_json(out / "linear_eval.json", record)
    print(f"wrote {out / 'linear_eval.json'}")
    return results


def main(argv=None):
    with cli("train.py"):
        args = parse_args(build_parser(), argv)
        check_flags(args)
        if args.eval_only:
            return eval_only(args)
        if args.linear_eval:
            return linear_eval(args)
        return fit(args)


if __name__ == "__main__":
    main()
