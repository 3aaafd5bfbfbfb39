"""Supervised training and RotNet rotation self-supervision, with per-block linear evaluation.

    python train.py --data PATH --model smallnet --epochs 10
    python train.py --data PATH --task rotation --name rot           # RotNet pre-training
    python train.py --data PATH --linear-eval runs/rot/best.pt        # frozen features per block
    python train.py --data PATH --eval-only runs/x/best.pt            # evaluate a checkpoint

Data live on the training device as one uint8 tensor; batches are cut, normalised and augmented
there as tensors (airbench style). Every epoch's data order and augmentation are a function of
(--random-seed, epoch), and last.pt holds everything else, so --resume reproduces an
uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import losses
import models
from common import (
    Timer,
    UserError,
    add_common_flags,
    append_jsonl,
    check_writable_dir,
    cli_errors,
    format_table,
    parse_args,
    progress,
    read_jsonl,
    write_json,
    write_jsonl,
)


class DivergedError(Exception):
    """The loss became NaN/inf: training stops, the last good checkpoint is kept."""


# ---------------------------------------------------------------------------
# Flags


def build_parser() -> argparse.ArgumentParser:
    """All training flags, grouped; finetune.py extends this parser."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_common_flags(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="data set path (format auto-detected)")
    g.add_argument("--data-format", default=None, help="override auto-detection")
    g.add_argument(
        "--img-size", type=int, default=None, help="resize to this size (default: native)"
    )
    g.add_argument("--in-chans", type=int, default=None, help="1 or 3 (default: from the data)")
    g.add_argument("--val-ratio", type=float, default=0.1, help="held-out fraction (stratified)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split only")
    g.add_argument("--labels-per-class", type=int, default=None, help="train on K labels per class")
    g.add_argument(
        "--kfold", type=int, default=0, help="K: stratified (grouped) k-fold instead of --val-ratio"
    )
    g.add_argument("--fold", type=int, default=0, help="with --kfold: the held-out fold 0..K-1")
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
        help="repeat a class FACTOR times per epoch (class name or index); repeatable",
    )

    g = p.add_argument_group("model")
    g.add_argument("--model", default="smallnet", help="built-in (smallnet*) or any timm name")
    g.add_argument("--task", choices=["classify", "rotation"], default="classify")
    g.add_argument(
        "--weights", default=None, help="start from a checkpoint/state dict/.safetensors"
    )
    g.add_argument(
        "--allow-partial", action="store_true", help="load --weights even if keys differ"
    )
    g.add_argument("--pretrained", action="store_true", help="timm hub weights (needs network)")
    g.add_argument("--drop", type=float, default=0.0, help="dropout before the classifier")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth (timm models)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--opt", choices=["sgd", "adamw", "adam"], default="sgd")
    g.add_argument("--lr", type=float, default=None, help="default: 0.2 (sgd) / 2e-3 (adam*)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4, help="not applied to BN/bias")
    g.add_argument(
        "--sched", choices=["cosine", "onecycle", "step", "plateau", "constant"], default="onecycle"
    )
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr / peak lr (cosine)")
    g.add_argument("--milestones", default="0.5,0.75", help="step: fractions of training")
    g.add_argument("--gamma", type=float, default=0.1, help="step/plateau: lr factor")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation")
    g.add_argument("--clip-grad", type=float, default=None, help="max grad norm")
    g.add_argument("--ema", type=float, default=None, help="weight EMA decay, e.g. 0.999")
    g.add_argument("--loss", default="auto", help="ce|label-smoothing|focal|f1|bce|asl")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (ce)")

    g = p.add_argument_group("augmentation")
    g.add_argument(
        "--aug", default="flip,crop", help="comma list: none,flip,vflip,crop,rot90,randaug"
    )
    g.add_argument("--pad", type=int, default=2, help="crop: pad pixels before random crop")
    g.add_argument("--mix", choices=["none", "cutmix", "mixup"], default="none")
    g.add_argument("--mix-alpha", type=float, default=1.0)
    g.add_argument("--mix-prob", type=float, default=0.5, help="fraction of batches mixed")

    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda")
    g.add_argument(
        "--amp",
        choices=["auto", "none", "bf16", "fp16"],
        default="auto",
        help="mixed precision; auto = bf16 on GPUs and on CPUs with AVX512-BF16/AMX, else none",
    )
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--eval-batch-size", type=int, default=1024)
    g.add_argument("--sync-bn", action="store_true", help="DDP: synchronise BatchNorm")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs", help="output root")
    g.add_argument("--name", default=None, help="run name (default: model_task)")
    g.add_argument("--random-seed", type=int, default=0, help="init, order, augmentation")
    g.add_argument("--resume", nargs="?", const="auto", default=None, help="resume last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run")
    g.add_argument("--eval-test", action="store_true", help="also evaluate on the test part")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate a checkpoint")
    g.add_argument("--split", default="val", help="--eval-only: train|val|test|all")
    g.add_argument("--linear-eval", default=None, metavar="CKPT", help="per-block linear eval")
    g.add_argument("--nonlinear", action="store_true", help="linear eval: also an MLP probe")
    g.add_argument("--linear-epochs", type=int, default=30, help="linear eval epochs")
    return p


# ---------------------------------------------------------------------------
# Small pure pieces


def lr_factor(
    step: int,
    total: int,
    warmup: int,
    sched: str,
    milestones=(0.5, 0.75),
    gamma=0.1,
    min_ratio: float = 0.0,
) -> float:
    """Learning-rate multiplier at optimizer step `step` of `total` (plateau handled apart)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if sched == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if sched == "onecycle":  # linear decay to zero after the warm-up peak (airbench)
        return max(0.0, 1.0 - t)
    if sched == "step":
        return gamma ** sum(step >= m * total for m in milestones)
    return 1.0


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
    """SGD (Nesterov) or AdamW/Adam over the given parameter groups."""
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    cls = torch.optim.AdamW if args.opt == "adamw" else torch.optim.Adam
    return cls(groups, lr=args.lr)


def labelled_subset(labels: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """First k indices of each class under a permutation seeded by the split seed only."""
    y = labels.numpy() if labels.ndim == 1 else labels.argmax(1).numpy()
    order = np.random.default_rng(seed + 7919).permutation(len(y))
    keep = [order[y[order] == c][:k] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


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
        if c is None and name.lstrip("-").isdigit() and 0 <= int(name) < len(classes):
            c = int(name)
        try:
            factor = float(factor)
        except ValueError:
            factor = -1
        if c is None or factor < 1:
            raise UserError(
                f"--oversample {spec}: expected CLASS=FACTOR with a class of {classes[:5]}... "
                "and FACTOR >= 1"
            )
        members = idx[y == c]
        whole, frac = int(factor), factor - int(factor)
        extra += [members] * (whole - 1) + [members[: int(round(frac * len(members)))]]
    return np.concatenate([idx, *extra])


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for float tensors; other buffers copied."""
    with torch.no_grad():
        e_sd, m_sd = ema.state_dict(), _unwrap(model).state_dict()
        floats_e = [v for k, v in e_sd.items() if v.is_floating_point()]
        floats_m = [m_sd[k] for k, v in e_sd.items() if v.is_floating_point()]
        torch._foreach_lerp_(floats_e, floats_m, 1.0 - decay)
        for k, v in e_sd.items():
            if not v.is_floating_point():
                v.copy_(m_sd[k])


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ---------------------------------------------------------------------------
# Inference and evaluation (shared with soup.py and infer.py)


def default_forward(model: nn.Module, x: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Probabilities for one batch: softmax, or sigmoid for multi-label."""
    logits = model(x).float()
    return torch.sigmoid(logits) if multi_label else logits.softmax(1)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean,
    std,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    amp: str | None = None,
    channels_last: bool = False,
    multi_label: bool = False,
    forward=None,
    quiet: bool = True,
) -> torch.Tensor:
    """Probabilities (CPU float32, N x K) for uint8 images; `forward(model, x)` can add TTA."""
    device = torch.device(device)
    forward = forward or (lambda m, x: default_forward(m, x, multi_label))
    was_training = model.training
    model.eval()
    out = []
    for idx in progress(data.batch_indices(len(images), batch_size, False), quiet, desc="predict"):
        x = data.normalize(images[idx].to(device, non_blocking=True), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with models.autocast(device, amp):
            out.append(forward(model, x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def metrics_from_probs(
    probs: torch.Tensor, labels: torch.Tensor, multi_label: bool, threshold: float = 0.5
) -> dict:
    """Loss and accuracy (exact match for multi-label), macro-F1 / per-label accuracy."""
    eps = 1e-7
    if multi_label:
        y = labels.float()
        p = probs.clamp(eps, 1 - eps)
        loss = -(y * p.log() + (1 - y) * (1 - p).log()).mean().item()
        pred = probs >= threshold
        per_label = (pred == y.bool()).float().mean(0)
        return {
            "loss": loss,
            "acc": (pred == y.bool()).all(1).float().mean().item(),
            "label_acc": per_label.mean().item(),
        }
    y = labels.long()
    loss = F.nll_loss(probs.clamp_min(eps).log(), y).item()
    pred = probs.argmax(1)
    k = probs.shape[1]
    cm = torch.bincount(y * k + pred, minlength=k * k).reshape(k, k).double()
    tp = cm.diag()
    f1 = 2 * tp / (cm.sum(0) + cm.sum(1)).clamp_min(1)
    present = (cm.sum(1) + cm.sum(0)) > 0
    return {
        "loss": loss,
        "acc": (pred == y).double().mean().item(),
        "f1": f1[present].mean().item() if present.any() else 0.0,
    }


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean,
    std,
    multi_label: bool = False,
    task: str = "classify",
    **kw,
) -> dict:
    """Metrics of a model on uint8 images (rotation task: rotation accuracy)."""
    if len(images) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    if task == "rotation":
        probs = predict(
            model, images, mean, std, multi_label=False, forward=_rotation_forward, **kw
        )
        return metrics_from_probs(probs.reshape(-1, 4), torch.arange(4).repeat(len(images)), False)
    probs = predict(model, images, mean, std, multi_label=multi_label, **kw)
    return metrics_from_probs(probs, labels, multi_label)


def evaluate_checkpoint(
    model: nn.Module, ck: dict, images: torch.Tensor, labels: torch.Tensor, **kw
) -> dict:
    """evaluate() with the normalisation, label kind and task a checkpoint records."""
    return evaluate(
        model,
        images,
        labels,
        ck["mean"],
        ck["std"],
        ck["multi_label"],
        ck.get("task", "classify"),
        **kw,
    )


def _rotation_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    xr, _ = data.rotate_batch(x)
    p = model(xr).float().softmax(1)  # 4N x 4, grouped by rotation
    n = len(x)
    return p.reshape(4, n, 4).transpose(0, 1).reshape(n, 16)


# ---------------------------------------------------------------------------
# Data and model set-up


def split_kwargs(args) -> dict:
    """data.load_split keyword arguments from the data/split flags."""
    return dict(
        fmt=args.data_format,
        val_ratio=args.val_ratio,
        split_seed=args.split_seed,
        kfold=getattr(args, "kfold", None),
        fold=getattr(args, "fold", None),
        img_size=args.img_size,
        in_chans=args.in_chans,
        cache_dir=args.cache_dir,
        skip_bad_images=args.skip_bad_images,
    )


def load_data(args, need_val: bool = True):
    """Train and val ImageSets plus the split record; labels-per-class and relabel applied."""
    if not args.data:
        raise UserError("--data is required (a data set path; see python data.py --help)")
    kw = split_kwargs(args)
    train_set, record = data.load_split(args.data, "train", **kw)
    need_ids = need_val or getattr(args, "relabel", None)
    val_set = data.load_split(args.data, "val", **kw)[0] if need_ids else None
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
    model = models.create_model(
        args.model,
        num_classes,
        in_chans=in_chans,
        img_size=img_size,
        pretrained=args.pretrained,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
    )
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


def _resolve_defaults(args) -> None:
    if args.lr is None:
        args.lr = 0.2 if args.opt == "sgd" else 2e-3
    if args.name is None:
        args.name = f"{args.model}_{args.task}"


# ---------------------------------------------------------------------------
# Training


def fit(args, hooks: dict | None = None) -> dict:
    """Train per args; writes best.pt/last.pt/metrics.jsonl/args.json/summary.json to out/name."""
    hooks = hooks or {}
    _resolve_defaults(args)
    dist = _init_distributed(args)
    rank, world = dist
    is_main = rank == 0
    device = models.resolve_device(args.device)
    args.amp = models.resolve_amp(device, args.amp)
    if dist[1] > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.out) / args.name
    resume_path = _resume_path(args, run_dir)
    if is_main and resume_path is None:
        _check_fresh_run_dir(run_dir, args.overwrite)
    if is_main:
        check_writable_dir(run_dir, "--out")

    train_set, val_set, record = load_data(args)
    rotation = args.task == "rotation"
    multi_label = train_set.multi_label and not rotation
    num_classes = 4 if rotation else len(train_set.classes)
    in_chans, img_hw = train_set.images.shape[1], list(train_set.images.shape[2:])
    mean, std = data.mean_std(train_set.images)
    if args.weights and args.weights.endswith(".pt"):
        with contextlib.suppress(UserError):  # keep the pretrained start's normalisation
            ck = models.load_checkpoint(args.weights)
            if len(ck.get("mean", [])) == in_chans:
                mean, std = ck["mean"], ck["std"]
    model = build_model(args, num_classes, in_chans, img_hw)
    if "model_ready" in hooks:
        hooks["model_ready"](model, args)
    meta = {
        "arch": args.model,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "img_size": img_hw,
        "classes": ["0", "90", "180", "270"] if rotation else train_set.classes,
        "multi_label": multi_label,
        "mean": list(mean),
        "std": list(std),
        "split": record,
        "args": vars(args),
        "task": args.task,
    }
    loss_fn = _build_loss(args, multi_label)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval() if args.ema else None
    if ema is not None:
        for p in ema.parameters():
            p.requires_grad_(False)
    groups = (
        hooks["param_groups"](model, args)
        if "param_groups" in hooks
        else param_groups(model, args.weight_decay)
    )
    opt = make_optimizer(groups, args)
    for g in opt.param_groups:
        g.setdefault("lr_scale", 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    sample_idx = oversample_index(train_set.labels, args.oversample, train_set.classes)
    n_batches = max(1, len(sample_idx) // (args.batch_size * world))
    steps_per_epoch = max(1, n_batches // args.accum_steps)
    total_steps = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch) if args.sched != "constant" else 0
    milestones = tuple(float(m) for m in args.milestones.split(",") if m)

    state = {
        "epoch": 0,
        "step": 0,
        "batch": 0,
        "best_acc": -1.0,
        "best_ema_acc": -1.0,
        "plateau_scale": 1.0,
        "plateau_best": float("inf"),
        "plateau_bad": 0,
        "partial": {"loss": 0.0, "n": 0, "seconds": 0.0, "images": 0},
    }
    aug_gen = torch.Generator()
    if resume_path is not None:
        _restore(resume_path, model, ema, opt, scaler, state, aug_gen, args)
        if is_main:
            _trim_metrics(run_dir / "metrics.jsonl", state["epoch"])
            print(
                f"resumed from {resume_path} at epoch {state['epoch'] + 1}, batch {state['batch']}"
            )

    train_model = model
    if world > 1:
        if args.sync_bn:
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # parameters frozen for a while (finetune.py LP-FT) get no gradient then
            find_unused_parameters=getattr(args, "find_unused_parameters", False),
        )
    if args.compile:
        train_model = torch.compile(train_model)

    images = train_set.images.to(device, non_blocking=True)
    labels = train_set.labels.to(device, non_blocking=True)
    sample_idx_t = torch.from_numpy(sample_idx)
    aug = [a for a in args.aug.split(",") if a and a != "none"]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "args.json", vars(args))
        print(
            f"{args.name}: {len(train_set)} train / {len(val_set)} val images "
            f"{in_chans}x{img_hw[0]}x{img_hw[1]}, {num_classes} classes, {args.model} "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {device}"
        )

    loop = SimpleNamespace(
        args=args,
        loss_fn=loss_fn,
        opt=opt,
        scaler=scaler,
        aug=aug,
        aug_gen=aug_gen,
        mean=mean,
        std=std,
        device=device,
        multi_label=multi_label,
        num_classes=num_classes,
        total_steps=total_steps,
        warmup=warmup,
        milestones=milestones,
    )
    interrupted = {"flag": False}
    old_handler = _install_sigint(interrupted) if is_main else None
    eval_kw = dict(
        batch_size=args.eval_batch_size,
        device=device,
        amp=args.amp,
        channels_last=args.channels_last,
        quiet=args.quiet,
    )
    loop.__dict__.update(
        model=model,
        ema=ema,
        val_set=val_set,
        eval_kw=eval_kw,
        meta=meta,
        run_dir=run_dir,
        is_main=is_main,
    )
    summary_rows = []
    try:
        for epoch in range(state["epoch"], args.epochs):
            if "epoch_start" in hooks:
                hooks["epoch_start"](epoch, model, opt, args)
            start_batch = state["batch"]
            if start_batch == 0:  # epoch boundary: RNGs are a function of (seed, epoch, rank)
                torch.manual_seed(_epoch_seed(args.random_seed, epoch, rank))
                aug_gen.manual_seed(_epoch_seed(args.random_seed, epoch, rank) + 1)
                state["partial"] = {"loss": 0.0, "n": 0, "seconds": 0.0, "images": 0}
            perm_gen = torch.Generator().manual_seed(_epoch_seed(args.random_seed, epoch, 0) + 2)
            perm = sample_idx_t[torch.randperm(len(sample_idx_t), generator=perm_gen)]
            batches = data.batch_indices(len(perm), args.batch_size * world, False, drop_last=True)
            batches = batches or [torch.arange(len(perm))]
            batches = [perm[b][rank::world] for b in batches]
            batches = batches[: steps_per_epoch * args.accum_steps]
            train_model.train()
            t0 = time.perf_counter()
            part = state["partial"]
            bar = progress(
                range(start_batch, len(batches)),
                args.quiet or not is_main,
                desc=f"epoch {epoch + 1}/{args.epochs}",
                total=len(batches),
                initial=start_batch,
            )
            for b in bar:
                # stop between optimizer steps: gradients accumulated so far are not saved
                if interrupted["flag"] and b % args.accum_steps == 0:
                    raise KeyboardInterrupt
                idx = batches[b].to(device, non_blocking=True)
                loss_val = _train_step(train_model, images[idx], labels[idx], b, loop, state)
                if ema is not None and (b + 1) % args.accum_steps == 0:
                    # warm-up (as timm's ModelEma): early averages do not drag in the random init
                    n = state["step"]
                    ema_update(ema, model, min(args.ema, (1 + n) / (10 + n)))
                part["loss"] += loss_val * len(idx)
                part["n"] += len(idx)
                part["images"] += len(idx) * world
                state["batch"] = b + 1
                if hasattr(bar, "set_postfix") and b % 10 == 0:
                    bar.set_postfix(loss=f"{part['loss'] / max(1, part['n']):.4f}")
                if not math.isfinite(loss_val):
                    raise DivergedError(
                        f"loss became {loss_val} at epoch {epoch + 1} step {state['step']} "
                        f"(lr {opt.param_groups[0]['lr']:.3g}); last good checkpoint kept in "
                        f"{run_dir}; try a lower --lr, --amp bf16 or --clip-grad 1.0"
                    )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            part["seconds"] += time.perf_counter() - t0
            if world > 1:
                _average_buffers(model, world)
            row = _end_epoch(epoch, loop, part, state)
            summary_rows.append(row)
            state["epoch"], state["batch"] = epoch + 1, 0
            if is_main:
                _save_last(run_dir, model, ema, opt, scaler, state, aug_gen, meta)
    except KeyboardInterrupt:
        if is_main:
            # A second Ctrl-C can land inside a step (model half-updated): keep the last
            # consistent last.pt rather than saving that state.
            if state["batch"] > 0 and not interrupted.get("abort"):
                _save_last(run_dir, model, ema, opt, scaler, state, aug_gen, meta)
            last = run_dir / "last.pt"
            msg = (
                f"interrupted: {last} holds the state to continue from; rerun the same command "
                "plus --resume"
                if last.exists()
                else "interrupted before the first checkpoint; nothing to resume, rerun the command"
            )
            print(f"\n{msg}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    result = _finish(
        args,
        run_dir,
        model,
        ema,
        val_set,
        mean,
        std,
        multi_label,
        eval_kw,
        state,
        meta,
        is_main,
        hooks,
    )
    if world > 1:
        torch.distributed.barrier()
    return result


def _train_step(model, x_u8, y, b: int, loop: SimpleNamespace, state: dict) -> float:
    """One forward/backward on a batch; steps the optimizer every --accum-steps batches."""
    x = data.normalize(x_u8, loop.mean, loop.std)
    if loop.aug:
        x = data.augment_batch(x, loop.aug, loop.aug_gen, pad=loop.args.pad)
    if loop.args.task == "rotation":
        x, y = data.rotate_batch(x)
        y = y.to(loop.device)
    elif (
        loop.args.mix != "none"
        and torch.rand((), generator=loop.aug_gen).item() < loop.args.mix_prob
    ):
        y_soft = y.float() if loop.multi_label else F.one_hot(y, loop.num_classes).float()
        x, y = data.mix_batch(x, y_soft, loop.args.mix, loop.args.mix_alpha, loop.aug_gen)
    if loop.args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with models.autocast(loop.device, loop.args.amp):
        out = model(x)
    loss = loop.loss_fn(out.float(), y)
    loop.scaler.scale(loss / loop.args.accum_steps).backward()
    if (b + 1) % loop.args.accum_steps == 0:
        scale = state["plateau_scale"] * lr_factor(
            state["step"],
            loop.total_steps,
            loop.warmup,
            loop.args.sched,
            loop.milestones,
            loop.args.gamma,
            loop.args.min_lr_ratio,
        )
        for g in loop.opt.param_groups:
            g["lr"] = loop.args.lr * scale * g.get("lr_scale", 1.0)
        if loop.args.clip_grad:
            loop.scaler.unscale_(loop.opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), loop.args.clip_grad)
        loop.scaler.step(loop.opt)
        loop.scaler.update()
        loop.opt.zero_grad(set_to_none=True)
        state["step"] += 1
    return loss.item()


def _end_epoch(epoch: int, loop: SimpleNamespace, part: dict, state: dict) -> dict:
    """Evaluate, log a metrics row, save best.pt / best_ema.pt."""
    args, model, ema, val_set, opt = loop.args, loop.model, loop.ema, loop.val_set, loop.opt
    mean, std, multi_label, eval_kw = loop.mean, loop.std, loop.multi_label, loop.eval_kw
    meta, run_dir, is_main = loop.meta, loop.run_dir, loop.is_main
    m = evaluate(
        model, val_set.images, val_set.labels, mean, std, multi_label, args.task, **eval_kw
    )
    row = {
        "epoch": epoch + 1,
        "train_loss": part["loss"] / max(1, part["n"]),
        "val_loss": m["loss"],
        "val_acc": m["acc"],
        "lr": opt.param_groups[0]["lr"],
        "seconds": round(part["seconds"], 3),
        "images_per_s": round(part["images"] / max(part["seconds"], 1e-9), 1),
    }
    row.update({f"val_{k}": v for k, v in m.items() if k not in ("loss", "acc")})
    if ema is not None:
        me = evaluate(
            ema, val_set.images, val_set.labels, mean, std, multi_label, args.task, **eval_kw
        )
        row["ema_val_acc"] = me["acc"]
        row["ema_val_loss"] = me["loss"]
    if args.sched == "plateau":
        if m["loss"] < state["plateau_best"] - 1e-4:
            state["plateau_best"], state["plateau_bad"] = m["loss"], 0
        else:
            state["plateau_bad"] += 1
            if state["plateau_bad"] >= 2:
                state["plateau_scale"] *= args.gamma
                state["plateau_bad"] = 0
    if not is_main:
        return row
    append_jsonl(run_dir / "metrics.jsonl", row)
    acc = (
        m["acc"]
        if math.isfinite(m["acc"])
        else -row["val_loss"]
        if math.isfinite(row["val_loss"])
        else 0.0
    )
    if acc > state["best_acc"] or len(val_set) == 0:
        state["best_acc"] = acc
        models.save_checkpoint(run_dir / "best.pt", _unwrap(model), {**meta, "metrics": row})
    if ema is not None and row["ema_val_acc"] > state["best_ema_acc"]:
        state["best_ema_acc"] = row["ema_val_acc"]
        models.save_checkpoint(
            run_dir / "best_ema.pt",
            ema,
            {**meta, "metrics": {**row, "val_acc": row["ema_val_acc"]}},
        )
    extra = f"  ema {row['ema_val_acc']:.4f}" if ema is not None else ""
    f1 = f"  f1 {row['val_f1']:.4f}" if "val_f1" in row else ""
    print(
        f"epoch {epoch + 1:3d}/{args.epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}{f1}{extra}  "
        f"lr {row['lr']:.3g}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s",
        flush=True,
    )
    return row


def _finish(
    args, run_dir, model, ema, val_set, mean, std, multi_label, eval_kw, state, meta, is_main, hooks
) -> dict:
    """Final hooks, optional test evaluation, summary.json and the closing table."""
    if "after_fit" in hooks:
        hooks["after_fit"](model, run_dir, args, meta)
    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    summary = {
        "run_dir": str(run_dir),
        "best_val_acc": state["best_acc"],
        "best_ema_val_acc": state["best_ema_acc"] if ema is not None else None,
        "epochs": args.epochs,
        "train_seconds": round(sum(r.get("seconds", 0) for r in rows), 1),
        "images_per_s": rows[-1]["images_per_s"] if rows else None,
    }
    if args.eval_test and is_main and args.task == "classify":
        summary.update(_eval_test(args, run_dir, eval_kw))
    if is_main:
        write_json(run_dir / "summary.json", summary)
        table = [["best val acc", summary["best_val_acc"]]]
        if ema is not None:
            table.append(["best EMA val acc", summary["best_ema_val_acc"]])
        for k in ("test_acc", "ema_test_acc"):
            if k in summary:
                table.append([k.replace("_", " "), summary[k]])
        table += [
            ["train time (s)", summary["train_seconds"]],
            ["images/s (last epoch)", summary["images_per_s"]],
            ["wrote", f"{run_dir}/{{best,last}}.pt, metrics.jsonl"],
        ]
        print(format_table(table, ["result", "value"]))
    return summary


def _eval_test(args, run_dir: Path, eval_kw: dict) -> dict:
    """Accuracy of best.pt (and best_ema.pt) on the data set's own test part."""
    out = {}
    try:
        test_set, _ = data.load_split(args.data, "test", **split_kwargs(args))
    except UserError as e:
        print(f"warning: no test part evaluated ({e})", file=sys.stderr)
        return out
    if not test_set.has_labels:
        return out
    for key, name in (("test_acc", "best.pt"), ("ema_test_acc", "best_ema.pt")):
        if (run_dir / name).exists():
            m, ck = models.load_model(run_dir / name, eval_kw["device"])
            r = evaluate_checkpoint(m, ck, test_set.images, test_set.labels, **eval_kw)
            out[key] = r["acc"]
    write_json(run_dir / "test_metrics.json", out)
    return out


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


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63)


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """Drop log rows past the resume point (killed after logging an epoch, before its last.pt)
    and a torn last line, so the resumed run appends to a clean log."""
    if not path.exists():
        return
    rows = read_jsonl(path)
    keep = [r for r in rows if r.get("epoch", 0) <= epochs_done]
    if len(keep) != len(rows) or not path.read_text(encoding="utf-8").endswith("\n"):
        write_jsonl(path, keep)


def _resume_path(args, run_dir: Path) -> Path | None:
    if not args.resume:
        return None
    path = run_dir / "last.pt" if args.resume == "auto" else Path(args.resume)
    if not path.exists():
        raise UserError(f"{path}: nothing to resume; drop --resume to start a new run")
    return path


def _check_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    if overwrite:
        for f in ("metrics.jsonl", "summary.json", "best.pt", "best_ema.pt", "last.pt"):
            (run_dir / f).unlink(missing_ok=True)
        return
    if (run_dir / "summary.json").exists():
        raise UserError(
            f"{run_dir}: already holds a finished run; pass --overwrite or a new --name"
        )
    if (run_dir / "last.pt").exists():
        raise UserError(
            f"{run_dir}: holds an interrupted run; add --resume to continue it, "
            "or --overwrite to start again"
        )


def _save_last(run_dir, model, ema, opt, scaler, state, aug_gen, meta) -> None:
    extra = {
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "train_state": state,
        "aug_rng": aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    if ema is not None:
        extra["ema_state_dict"] = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
    if torch.cuda.is_available():
        extra["cuda_rng"] = torch.cuda.get_rng_state_all()
    models.save_checkpoint(run_dir / "last.pt", _unwrap(model), meta, extra=extra)


def _restore(path, model, ema, opt, scaler, state, aug_gen, args) -> None:
    ck = models.load_checkpoint(path)
    if ck.get("arch") != args.model or "train_state" not in ck:
        raise UserError(
            f"{path}: a last.pt of model {ck.get('arch')!r}, not {args.model!r}; "
            "resume with the same --model, or drop --resume"
        )
    try:
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"{path}: does not match this model/optimizer ({str(e)[:80]}); "
            "resume with the same flags"
        ) from None
    scaler.load_state_dict(ck["scaler"])
    if ema is not None and "ema_state_dict" in ck:
        ema.load_state_dict(ck["ema_state_dict"])
    state.update(ck["train_state"])
    aug_gen.set_state(ck["aug_rng"])
    torch.set_rng_state(ck["torch_rng"])
    if "cuda_rng" in ck and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])


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


def _average_buffers(model: nn.Module, world: int) -> None:
    """Average float buffers (BN running stats) over ranks, so all ranks evaluate one model.

    DDP keeps parameters equal, but each rank's BN statistics follow its own batches.
    """
    import torch.distributed as dist

    for b in _unwrap(model).buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(world)


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


# ---------------------------------------------------------------------------
# Evaluation-only and linear evaluation


def eval_only(args) -> dict:
    """Evaluate a checkpoint on the split recorded in it (or --split)."""
    device = models.resolve_device(args.device)
    model, ck = models.load_model(args.eval_only, device)
    split = ck.get("split", {})
    ds, record = data.load_split(
        args.data,
        args.split,
        fmt=args.data_format,
        **data.split_args({"val_ratio": args.val_ratio, "seed": args.split_seed, **split}),
        img_size=ck["img_size"],
        in_chans=ck["in_chans"],
        cache_dir=args.cache_dir,
    )
    if args.split == "val" and split.get("val_hash") and record["val_hash"] != split["val_hash"]:
        print(
            f"warning: validation ids differ from those recorded in {args.eval_only}",
            file=sys.stderr,
        )
    with Timer() as t:
        m = evaluate_checkpoint(
            model,
            ck,
            ds.images,
            ds.labels,
            batch_size=args.eval_batch_size,
            device=device,
            amp=args.amp,
            channels_last=args.channels_last,
            quiet=args.quiet,
        )
    rows = [[k, v] for k, v in m.items()] + [
        ["images", len(ds)],
        ["images/s", round(len(ds) / max(t.seconds, 1e-9))],
    ]
    print(format_table(rows, [f"{Path(args.eval_only).name} on {args.split}", "value"]))
    return m


@torch.no_grad()
def block_features(
    model: nn.Module, images: torch.Tensor, mean, std, device, batch_size=512, pool: int = 2
) -> list[torch.Tensor]:
    """Features after each block (avg-pooled to pool x pool, flattened), one pass for all blocks."""
    blocks = models.feature_blocks(model)
    outs: list[list[torch.Tensor]] = [[] for _ in blocks]
    current: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, i=i: current.__setitem__(i, o))
        for i, (_, m) in enumerate(blocks)
    ]
    model.eval()
    try:
        for idx in data.batch_indices(len(images), batch_size, False):
            model(data.normalize(images[idx].to(device), mean, std))
            for i in range(len(blocks)):
                o = current[i]
                if o.ndim == 4:
                    o = F.adaptive_avg_pool2d(o.float(), pool)
                elif o.ndim == 3:  # tokens: mean over the sequence
                    o = o.float().mean(1)
                outs[i].append(o.flatten(1).cpu())
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o) for o in outs]


def train_probe(
    xtr, ytr, xva, yva, num_classes: int, epochs: int, seed: int, hidden: int = 0
) -> float:
    """Train a linear (or one-hidden-layer) classifier on fixed features; val accuracy."""
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
    device = models.resolve_device(args.device)
    model, ck = models.load_model(args.linear_eval, device)
    split = ck.get("split", {})
    args.val_ratio = split.get("val_ratio", args.val_ratio)
    args.split_seed = split.get("seed", args.split_seed)
    args.kfold, args.fold = split.get("kfold", 0), split.get("fold", 0)
    args.img_size = args.img_size or ck["img_size"][0]
    train_set, val_set, _ = load_data(args)
    if train_set.multi_label:
        raise UserError(f"{args.data}: linear eval needs single-label data")
    names = [n for n, _ in models.feature_blocks(model)]
    with Timer() as t:
        ftr = block_features(model, train_set.images, ck["mean"], ck["std"], device)
        fva = block_features(model, val_set.images, ck["mean"], ck["std"], device)
    k = len(train_set.classes)
    results = []
    for name, a, b in zip(names, ftr, fva):
        row = {
            "block": name,
            "dims": a.shape[1],
            "linear_acc": train_probe(
                a, train_set.labels, b, val_set.labels, k, args.linear_epochs, args.random_seed
            ),
        }
        if args.nonlinear:
            row["mlp_acc"] = train_probe(
                a,
                train_set.labels,
                b,
                val_set.labels,
                k,
                args.linear_epochs,
                args.random_seed,
                hidden=512,
            )
        results.append(row)
    header = ["block", "dims", "linear_acc"] + (["mlp_acc"] if args.nonlinear else [])
    print(
        f"linear eval of {args.linear_eval} ({ck.get('task')}): {len(train_set)} train / "
        f"{len(val_set)} val images, features in {t.seconds:.1f}s"
    )
    print(format_table([[r[h] for h in header] for r in results], header))
    name = args.name or f"{Path(args.linear_eval).parent.name}_linear"
    out = Path(args.out) / name
    write_json(
        out / "linear_eval.json",
        {
            "checkpoint": args.linear_eval,
            "blocks": results,
            "labels_per_class": args.labels_per_class,
        },
    )
    print(f"wrote {out / 'linear_eval.json'}")
    return results


def main(argv=None):
    with cli_errors("train.py"):
        args = parse_args(build_parser(), argv)
        if args.eval_only:
            return eval_only(args)
        if args.linear_eval:
            return linear_eval(args)
        try:
            return fit(args)
        except DivergedError as e:
            print(f"train.py: error: {e}", file=sys.stderr)
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
