"""Fine-tune from a pretrained start: one point of the model-soups random hyper-parameter grid.

    python finetune.py --data PATH --weights runs/rot/best.pt --i 7 --random-seed 1
    python finetune.py --list-grid                       # the 72 grid points as a table
    python finetune.py --data PATH --weights W --i 0     # point 0: linear probe (frozen backbone)
    python finetune.py --data PATH --weights W --lp-epochs 1 --layer-decay 0.75 --wise-alpha 0.5

Grid (after Wortsman et al., 2022, "Model soups"): point 0 is the linear-probe start; points 1..71
are drawn once from np.random.default_rng(1234), so the grid never changes. Each point sets:
  lr            log-uniform, sgd 0.005..0.05, adam/adamw 1e-5..1e-3, below train.py's from-scratch
                peak so ingredients stay in the start's basin (point 0: train.DEFAULT_LR)
  weight_decay  log-uniform, sgd 1e-5..2e-3, adam 1e-6..1e-4, adamw 1e-4..0.5 (decoupled)
  epochs        1..4 times --epoch-scale (default 1; --epoch-scale 4 gives the paper's 4..16)
  smoothing     0 in about half the points, else uniform 0..0.225
  mix           none in about half, else cutmix or mixup, alpha 0.1..1, prob 0.25..1
  aug           none | flip | flip,crop | flip,crop,randaug
Every value comes from the grid only when its flag was not given (CLI or --config): explicit flags
win. --random-seed changes the new head's init, data order and augmentation, never the split.
Starting from a checkpoint of ours, --model, --in-chans and --img-size default to its own, and
--same-split also adopts its split seed/ratio and refuses a run whose held-out ids differ.
Methods: full fine-tuning, linear probe (--freeze-backbone, BN statistics frozen), LP-FT
(--lp-epochs K, one lr schedule over the whole run), layer-wise lr decay (--layer-decay), WiSE-FT
(--wise-alpha A: best.pt becomes (1-A)*start + A*fine-tuned, the new head taken as fine-tuned).
Output: <out>/<name>/i{N}_s{seed}/ with best.pt, last.pt, metrics.jsonl, summary.json; each
ingredient directory is a train.py run directory (locked while it runs; --overwrite swaps it in
at the end).

A sweep (re-run the same loop after an interruption: finished runs are skipped, an interrupted
one resumes from its last.pt):

    for i in $(seq 0 71); do   # a damaged finished run (truncated best.pt) is redone
      python finetune.py --data PATH --weights runs/rot/best.pt --name soup --i $i \\
          --random-seed 0 --skip-existing --quiet || break
    done

DDP: torchrun --nproc_per_node 2 finetune.py ... (gloo on CPU, nccl on CUDA; rank 0 writes).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data
import models
import train
from common import (
    UserError,
    atomic_path,
    float_range,
    format_table,
    nonneg_int,
    parse_args,
    positive_float,
    probability,
    refuse_together,
    write_json,
)

GRID_SIZE = 72
GRID_SEED = 1234
# Fine-tuning lrs stay well below the from-scratch peak (0.2 for SGD) so that every ingredient
# stays in the start's basin: soups of ingredients that left it collapse (Wortsman et al. 2022).
LR_RANGE = {"sgd": (0.005, 0.05), "adam": (1e-5, 1e-3), "adamw": (1e-5, 1e-3)}
WD_RANGE = {"sgd": (1e-5, 2e-3), "adam": (1e-6, 1e-4), "adamw": (1e-4, 0.5)}
DEFAULT_WD = {"sgd": 5e-4, "adam": 1e-5, "adamw": 0.05}  # grid point 0 (linear probe)
GRID_AUGS = ("none", "flip", "flip,crop", "flip,crop,randaug")
# args attributes a grid point sets, in grid_point's order (each one is also a flag of its own)
GRID_KEYS = (
    "lr",
    "weight_decay",
    "epochs",
    "smoothing",
    "mix",
    "mix_alpha",
    "mix_prob",
    "aug",
    "freeze_backbone",
)


# ---------------------------------------------------------------------------
# The grid


def _log_uniform(u: float, lo: float, hi: float) -> float:
    return float(f"{lo * (hi / lo) ** u:.3g}")


def grid_point(i: int, opt: str = "sgd", epoch_scale: float = 1.0) -> dict:
    """Hyper-parameters of grid point i (0 = linear probe); deterministic for all time."""
    if not 0 <= i < GRID_SIZE:
        raise UserError(f"--i {i}: the grid has points 0..{GRID_SIZE - 1}; pick one of those")
    if i == 0:
        lr, wd, epochs = train.DEFAULT_LR[opt], DEFAULT_WD[opt], max(1, round(4 * epoch_scale))
        return dict(zip(GRID_KEYS, (lr, wd, epochs, 0.0, "none", 1.0, 0.5, "none", True)))
    # One fixed table of uniforms: point i's values never depend on other settings' draws.
    u = np.random.default_rng(GRID_SEED).random((GRID_SIZE, 10))[i]
    mixed = u[5] >= 0.5
    values = (
        _log_uniform(u[0], *LR_RANGE[opt]),
        _log_uniform(u[1], *WD_RANGE[opt]),
        max(1, round((1 + int(u[2] * 4)) * epoch_scale)),
        round(0.225 * u[4], 3) if u[3] >= 0.5 else 0.0,
        ("cutmix" if u[6] < 0.5 else "mixup") if mixed else "none",  # mix
        round(0.1 + 0.9 * u[7], 2) if mixed else 1.0,  # mix_alpha
        round(0.25 + 0.75 * u[8], 2) if mixed else 0.5,  # mix_prob
        GRID_AUGS[int(u[9] * len(GRID_AUGS))],
        False,  # freeze_backbone
    )
    return dict(zip(GRID_KEYS, values))


def grid_table(opt: str = "sgd", epoch_scale: float = 1.0) -> str:
    """The whole grid as a text table."""
    rows = []
    for i in range(GRID_SIZE):
        p = grid_point(i, opt, epoch_scale)
        rows.append(
            [i, f"{p['lr']:.3g}", f"{p['weight_decay']:.3g}", p["epochs"], f"{p['smoothing']:g}"]
            + [p["mix"], f"{p['mix_alpha']:g}", f"{p['mix_prob']:g}", p["aug"]]
            + ["linear probe" if p["freeze_backbone"] else "full"]
        )
    header = ["i", "lr", "weight_decay", "epochs", "smoothing", "mix", "alpha", "prob", "aug"]
    return format_table(rows, [*header, "method"])


# ---------------------------------------------------------------------------
# Flags


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags plus the fine-tuning group."""
    p = train.build_parser()
    p.description = __doc__.split("\n\n")[0]
    for a in p._actions:
        if a.dest in GRID_KEYS:
            a.help = f"{a.help or ''}; finetune.py: the --i grid point's value unless given".lstrip(
                "; "
            )
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--i", type=nonneg_int, default=0, help=f"grid point 0..{GRID_SIZE - 1} (0: probe)"
    )
    g.add_argument("--list-grid", action="store_true", help="print the grid and exit")
    g.add_argument(
        "--epoch-scale", type=positive_float, default=1.0, help="multiply the grid's 1..4 epochs"
    )
    g.add_argument(
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="linear probe: train the head only, BN statistics frozen (grid point 0 sets it)",
    )
    g.add_argument(
        "--lp-epochs", type=nonneg_int, default=0, help="LP-FT: head only for K epochs, then all"
    )
    g.add_argument(
        "--layer-decay",
        type=float_range(0, 1, lo_open=True),
        default=None,
        help="layer-wise lr decay in (0, 1], e.g. 0.75",
    )
    g.add_argument(
        "--wise-alpha",
        type=probability,
        default=None,
        help="WiSE-FT: best.pt = (1-A)*start + A*fine-tuned (fine-tuned kept as best_finetuned.pt)",
    )
    g.add_argument(
        "--same-split",
        action="store_true",
        help="require the --weights checkpoint's train/val split (its seed/ratio by default)",
    )
    g.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip a finished run (summary.json and a best.pt that loads; a damaged one is "
        "redone); resume an interrupted one",
    )
    g.add_argument(
        "--report-ranks",
        action="store_true",
        help="each rank prints 'rank R final <sha1 of its weights>' (DDP checks)",
    )
    return p


def explicit_dests(argv) -> set[str]:
    """Names of the flags the user gave (on the command line or in --config)."""
    p = build_parser()
    for a in p._actions:
        a.default = argparse.SUPPRESS
    # parse_args applies --config keys as defaults, so they count as given too.
    return set(vars(parse_args(p, argv)))


def apply_grid(args, explicit: set[str]) -> dict:
    """Set args from grid point args.i where no flag was given; returns the values applied."""
    point = grid_point(args.i, args.opt, args.epoch_scale)
    if args.lp_epochs and "freeze_backbone" not in explicit:
        point.pop("freeze_backbone")  # LP-FT decides freezing itself
    applied = {k: v for k, v in point.items() if k not in explicit}
    for k, v in applied.items():
        setattr(args, k, v)
    return applied


# ---------------------------------------------------------------------------
# Freezing, layer-wise lr decay, WiSE-FT


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    heads = tuple(models.head_names(model))
    if not heads:
        raise UserError(
            f"{type(model).__name__}: cannot find its classifier head to keep trainable"
        )
    return heads


def _frozen_bn_eval(module: nn.Module, _inputs) -> None:
    # model.train() runs every epoch; this keeps frozen BN layers on their running statistics.
    if getattr(module, "frozen", False):
        module.training = False


def set_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) everything but the classifier head; frozen BN stays in eval mode."""
    model = models.unwrap(model)
    heads = _head_prefixes(model)
    for name, p in model.named_parameters():
        if not name.startswith(heads):
            p.requires_grad_(not frozen)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (name + ".").startswith(heads):
            if not hasattr(m, "frozen"):
                m.register_forward_pre_hook(_frozen_bn_eval)
            m.frozen = frozen


def smallnet_layer_ids(model: nn.Module) -> dict[str, int]:
    """Depth of each SmallNet parameter: stem 0, blocks 1..n, head n+1."""
    n = len(model.blocks)
    ids = {}
    for name, _ in model.named_parameters():
        if name.startswith("stem."):
            ids[name] = 0
        elif name.startswith("blocks."):
            ids[name] = int(name.split(".")[1]) + 1
        else:
            ids[name] = n + 1
    return ids


def layer_decay_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """Optimizer groups with lr_scale = decay ** (depth of the head - depth of the layer)."""
    model = models.unwrap(model)
    # Frozen (LP-FT) parameters join the groups too, so they train once unfrozen.
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        if isinstance(model, models.SmallNet):
            ids = smallnet_layer_ids(model)
            top = max(ids.values())
            groups: dict[tuple, dict] = {}
            for name, p in model.named_parameters():
                wd = 0.0 if p.ndim <= 1 else weight_decay
                key = (ids[name], wd)
                g = groups.setdefault(
                    key, {"params": [], "weight_decay": wd, "lr_scale": decay ** (top - ids[name])}
                )
                g["params"].append(p)
            return list(groups.values())
        from timm.optim import param_groups_layer_decay

        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        return param_groups_layer_decay(
            model, weight_decay, no_weight_decay_list=skip, layer_decay=decay
        )
    finally:
        for p, r in was.items():
            p.requires_grad_(r)


def wise_ft(start: dict, finetuned: dict, alpha: float) -> dict:
    """(1-alpha)*start + alpha*finetuned (models.interpolate_state: a new head, integer buffers
    and keys missing from the start are taken from finetuned)."""
    return models.interpolate_state(start, finetuned, alpha)


def state_hash(state_dict: dict) -> str:
    """sha1 over the sorted keys and bytes of a state dict (16 hex)."""
    h = hashlib.sha1()
    for k in sorted(state_dict):
        v = state_dict[k]
        if torch.is_tensor(v):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _start_weights(model: nn.Module, args) -> dict:
    """The pretrained start for WiSE-FT: entries really loaded from --weights (or the hub)."""
    own = models.unwrap(model).state_dict()
    if args.weights:
        sd = models.load_state_dict_file(args.weights)
        return {
            k: v.detach().clone()
            for k, v in own.items()
            if k in sd and sd[k].shape == v.shape and torch.equal(sd[k], v.cpu())
        }
    heads = _head_prefixes(model)  # hub or random start: its head is always new
    return {k: v.detach().clone() for k, v in own.items() if not k.startswith(heads)}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fit_hooks(args, keep: dict) -> train.FitHooks:
    """What fine-tuning changes in train.fit: freezing, LP-FT, layer-wise lr decay, WiSE-FT."""

    def prepare_model(model: nn.Module) -> None:
        keep["model"] = model
        if args.wise_alpha is not None:
            keep["start"] = _start_weights(model, args)
        if args.freeze_backbone:  # before DDP wraps it: DDP then syncs the head only
            set_frozen(model, True)

    def epoch_start(epoch: int, model: nn.Module) -> None:
        if args.lp_epochs and not args.freeze_backbone:
            frozen = epoch < args.lp_epochs
            if frozen != keep.get("lp_frozen"):
                set_frozen(model, frozen)
                keep["lp_frozen"] = frozen
                if _rank() == 0 and epoch > 0 and not frozen:
                    print(f"LP-FT: backbone unfrozen at epoch {epoch + 1}", flush=True)

    def after_fit(t: train.Training) -> dict | None:
        if args.wise_alpha is None or not (t.run.path / "best.pt").exists():
            return None
        return write_wise(t, keep["start"], args.wise_alpha)

    groups = None
    if args.layer_decay is not None:
        groups = lambda model: layer_decay_groups(model, args.weight_decay, args.layer_decay)  # noqa: E731
    return train.FitHooks(
        param_groups=groups,
        prepare_model=prepare_model,
        epoch_start=epoch_start,
        after_fit=after_fit,
        find_unused_parameters=bool(args.lp_epochs),  # DDP: the backbone is frozen at first
        record={"grid_point": args.i, "grid_values": keep.get("grid", {})},
        resume_keys=("freeze_backbone", "lp_epochs", "layer_decay", "wise_alpha"),
    )


def write_wise(t: train.Training, start: dict, alpha: float) -> dict:
    """Rewrite best.pt as the WiSE-FT interpolation; keep the fine-tuned one; evaluate both."""
    best = t.run.path / "best.pt"
    ck = models.load_checkpoint(best)
    sd = wise_ft(start, ck["state_dict"], alpha)
    model = models.model_from_checkpoint({**ck, "state_dict": sd}).to(t.rt.device)
    val = t.val_set
    m = train.evaluate_checkpoint(model, ck, val.images, val.labels, **t.rt.predict_kw())
    ft = ck.get("metrics", {})
    metrics = {
        **ft,
        "val_acc": m["acc"],
        "val_loss": m["loss"],
        **{f"val_{k}": v for k, v in m.items() if k not in ("acc", "loss")},
        "wise_alpha": alpha,
        "finetuned_val_acc": ft.get("val_acc"),
    }
    with atomic_path(t.run.path / "best_finetuned.pt") as tmp:
        shutil.copyfile(best, tmp)
    meta = {k: v for k, v in ck.items() if k not in ("format", "state_dict", "created", "torch")}
    models.save_checkpoint(best, sd, {**meta, "metrics": metrics})
    result = {
        "wise_alpha": alpha,
        "wise_val_acc": m["acc"],
        "wise_val_f1": m.get("f1"),
        "finetuned_val_acc": ft.get("val_acc"),
    }
    write_json(t.run.path / "wise.json", result)
    print(
        f"WiSE-FT alpha {alpha:g}: val_acc {m['acc']:.4f} "
        f"(fine-tuned {ft.get('val_acc', float('nan')):.4f}); best.pt rewritten, "
        "fine-tuned weights in best_finetuned.pt",
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------
# Checks before training


# ---------------------------------------------------------------------------
# Checks before training


def adopt_start(args, explicit: set[str]) -> None:
    """Take --model/--in-chans/--img-size (and with --same-split the split) from --weights."""
    if not args.weights:
        if args.same_split:
            raise UserError("--same-split needs --weights CHECKPOINT.pt (a checkpoint of ours)")
        return
    ck = None
    with contextlib.suppress(UserError):
        ck = models.load_checkpoint(args.weights)
    if ck is None:
        if args.same_split:
            raise UserError(
                f"{args.weights}: not a checkpoint of this toolkit, so it records no split; "
                "drop --same-split"
            )
        models.load_state_dict_file(args.weights)  # a clear error now for unreadable files
        return
    if "model" not in explicit:
        args.model = ck["arch"]
    elif ck["arch"] != args.model and not args.allow_partial:
        raise UserError(
            f"{args.weights}: a {ck['arch']} checkpoint, not --model {args.model}; pass "
            f"--model {ck['arch']} or start from weights of {args.model}"
        )
    if "in_chans" not in explicit and ck.get("in_chans"):
        args.in_chans = int(ck["in_chans"])
    size = ck.get("img_size") or []
    if "img_size" not in explicit and len(size) == 2 and size[0] == size[1]:
        args.img_size = int(size[0])
    if args.same_split:
        adopt_split(args, ck, explicit)


def adopt_split(args, ck: dict, explicit: set[str]) -> None:
    """--same-split: the split flags become the start's record, verified on --data by
    data.load_recorded_split (its held-out ids must hash as recorded); a split flag given with
    another value is refused."""
    rec = data.split_args(ck.get("split") or {})
    rec = {"val_ratio": rec["val_ratio"], "split_seed": rec["split_seed"],
           "kfold": rec["kfold"] or 0, "fold": rec["fold"] or 0}  # fmt: skip
    for k, v in rec.items():
        if k in explicit and getattr(args, k) != v:
            flag = "--" + k.replace("_", "-")
            raise UserError(
                f"{flag} {getattr(args, k)}: --same-split trains on the split of {args.weights} "
                f"({flag} {v}); drop {flag} or --same-split"
            )
        setattr(args, k, v)
    data.load_recorded_split(
        ck, args.data, "val", args.data_format, source=args.weights, **train.load_kwargs(args)
    )


def check_args(args) -> None:
    """Combinations of fine-tuning flags (their ranges are checked by the flag types)."""
    refuse_together(args, ("--skip-existing", "--overwrite"), ("--lp-epochs", "--freeze-backbone"))
    if args.lp_epochs >= args.epochs:
        raise UserError(
            f"--lp-epochs {args.lp_epochs}: must be in 0..{args.epochs - 1} (--epochs {args.epochs})"
        )
    if args.task != "classify":
        raise UserError("finetune.py trains classifiers; use train.py --task rotation to pre-train")


def run_dir_state(args, run_dir: Path) -> str | None:
    """Under --skip-existing: 'skip' a finished run whose best.pt loads, 'resume' an interrupted
    one (from a last.pt that loads), 'redo' a damaged one (replaced at the end, as --overwrite)."""
    if not args.skip_existing:
        return None
    if (run_dir / "summary.json").exists():
        try:
            models.load_checkpoint(run_dir / "best.pt")
            json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            return "skip"
        except (UserError, ValueError) as e:
            why = str(e)
    elif (run_dir / "last.pt").exists() and not args.resume:
        try:
            models.load_checkpoint(run_dir / "last.pt")
            args.resume = "auto"
            return "resume"
        except UserError as e:
            why = str(e)
    else:
        return None
    if _rank() == 0:
        print(f"redo: {run_dir} is damaged ({why}); training it again", flush=True)
    args.overwrite = True
    return "redo"


# ---------------------------------------------------------------------------


def finetune(args, explicit: set[str]) -> dict:
    """Resolve grid point and start, then train.fit with the fine-tuning hooks."""
    keep: dict = {"grid": apply_grid(args, explicit)}
    adopt_start(args, explicit)
    check_args(args)
    base = args.name or f"{args.model}_ft"
    args.name = f"{base}/i{args.i}_s{args.random_seed}"
    run_dir = Path(args.out) / args.name
    state = run_dir_state(args, run_dir)
    if state == "skip":
        print(f"skip: {run_dir} is finished (best.pt, summary.json); drop --skip-existing to redo")
        return json.loads((run_dir / "summary.json").read_text())
    if state == "resume" and _rank() == 0:
        print(f"{run_dir}: interrupted earlier, resuming from last.pt")
    if _rank() == 0:
        shown = ", ".join(f"{k}={v}" for k, v in keep["grid"].items())
        method = (
            "linear probe"
            if args.freeze_backbone
            else f"LP-FT, head only for {args.lp_epochs} epoch(s)"
            if args.lp_epochs
            else "full fine-tuning"
        )
        print(f"grid point {args.i} ({method}): {shown or 'all values from flags'}", flush=True)
    summary = train.fit(args, fit_hooks(args, keep))
    if args.report_ranks and "model" in keep:
        # one write: ranks share the terminal, and print's separate "\n" write can interleave
        sys.stdout.write(f"rank {_rank()} final {state_hash(keep['model'].state_dict())}\n")
        sys.stdout.flush()
    return summary


def main(argv=None):
    with train.cli("finetune.py"):
        args = parse_args(build_parser(), argv)
        if args.list_grid:
            print(grid_table(args.opt, args.epoch_scale))
            return None
        grid_point(args.i)  # range check before anything is loaded
        train.check_flags(args)
        return finetune(args, explicit_dests(argv))


if __name__ == "__main__":
    main()
