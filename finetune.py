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
import dataclasses
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
    fam = train.opt_family(opt)  # any --opt name: its sgd/adam/adamw family's ranges
    if i == 0:
        lr, wd, epochs = train.default_lr(opt), DEFAULT_WD[fam], max(1, round(4 * epoch_scale))
        return dict(zip(GRID_KEYS, (lr, wd, epochs, 0.0, "none", 1.0, 0.5, "none", True)))
    # One fixed table of uniforms: point i's values never depend on other settings' draws.
    u = np.random.default_rng(GRID_SEED).random((GRID_SIZE, 10))[i]
    mixed = u[5] >= 0.5
    values = (
        _log_uniform(u[0], *LR_RANGE[fam]),
        _log_uniform(u[1], *WD_RANGE[fam]),
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
    p.set_defaults(opt="sgd")  # the grid's lr ranges are per optimizer: no automatic switch
    p.set_defaults(ema=None)  # ingredients are the fine-tuned weights; EMA not measured here
    for a in p._actions:
        if a.dest == "ema":
            a.help += "; finetune.py: none unless given"
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
    add_seed_flags(p)  # the model-soups seed's --loss-fn and --old-aug
    add_search_flags(p)  # --search, --storage, --study, --search-report, --export-top
    return p


def _true_false(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"'{text}' is not True or False")


def add_seed_flags(p: argparse.ArgumentParser) -> None:
    """Aliases of the model-soups mask seed's fine-tuning flags."""
    g = p.add_argument_group("model-soups seed aliases")
    g.add_argument(
        "--loss-fn",
        dest="loss",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help="alias of --loss; also the seed's names CrossEntropyLoss (ce) and ContrastiveLoss "
        "(supcon)",
    )
    g.add_argument(
        "--old-aug",
        nargs="?",
        const=True,
        default=False,
        type=_true_false,
        metavar="True|False",
        help="oversample the training part's rarest class once more (2x per epoch, as the seed "
        "did for age >= 60: --oversample @rarest=2); its copies are augmented anew each batch",
    )


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
    m = train.evaluate(model, val.images, val.labels, ck, t.rt)
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
    meta = dataclasses.replace(models.read_meta(ck, str(best)), metrics=metrics)
    models.save_checkpoint(best, sd, meta)
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
    if "saturation_channel" not in explicit:
        args.saturation_channel = models.read_meta(ck, args.weights).saturation
    size = ck.get("img_size") or []
    if "img_size" not in explicit and len(size) == 2 and size[0] == size[1]:
        args.img_size = int(size[0])
    if args.same_split:
        adopt_split(args, ck, explicit)


def adopt_split(args, ck: dict, explicit: set[str]) -> None:
    """--same-split: the split flags become the start's record, verified on --data by
    data.load_recorded_split (its held-out ids must hash as recorded); a split flag given with
    another value is refused."""
    how = data.SplitSpec.of(ck.get("split"))
    rec = {"val_ratio": how.val_ratio, "split_seed": how.seed,
           "kfold": how.kfold or 0, "fold": how.fold or 0}  # fmt: skip
    for k, v in rec.items():
        if k in explicit and getattr(args, k) != v:
            flag = "--" + k.replace("_", "-")
            raise UserError(
                f"{flag} {getattr(args, k)}: --same-split trains on the split of {args.weights} "
                f"({flag} {v}); drop {flag} or --same-split"
            )
        setattr(args, k, v)
    data.load_recorded_split(
        ck, args.data, "val", args.data_format, args.weights, train.data_opts(args)
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


# The built-in default start: what `bash run_all.sh` makes with its defaults (RUN=default, its
# synth_letters and base stages), so `finetune.py --i 3` alone and run_all.sh share one data set
# and one base model (tests/test_seeds.py checks these against run_all.sh).
DEFAULT_START = {
    "run": "default",  # <out>/default/{data,base,ft}, as run_all.sh's $RUNS_DIR/$RUN
    "num_images": 10000,
    "num_test": 2000,
    "img_size": 28,
    "seed": 0,
    "model": "smallnet_s",
    "epochs": 5,
    "aug": "crop",  # letters are not mirror-invariant
    "workers": 2,  # synth.py processes (the bytes do not depend on it)
}


def resolve_start(args, explicit: set[str]) -> None:
    """No --data and no --weights: the default start (made on first use, then reused).
    --data without a start (--weights or --pretrained): refused, never random weights."""
    if args.data and not args.weights and not args.pretrained:
        raise UserError(
            f"--data {args.data} without --weights: fine-tuning needs a trained start; pass "
            "--weights CKPT (e.g. runs/default/base/best.pt of train.py), --pretrained for timm "
            "hub weights, or train from scratch with train.py"
        )
    if args.data or args.weights:
        return
    root = Path(args.out) / DEFAULT_START["run"]
    data_dir, base_dir = default_start(root, args)
    args.data, args.weights = str(data_dir), str(base_dir / "best.pt")
    args.out = str(root)
    for k, v in (("name", "ft"), ("aug", DEFAULT_START["aug"]), ("same_split", True)):
        if k not in explicit:  # run_all.sh's ingredient flags
            setattr(args, k, v)
            explicit.add(k)


def default_start(root: Path, args) -> tuple[Path, Path]:
    """Make (or reuse) <root>/data (synth.py letters) and <root>/base (train.py), with the flags
    run_all.sh uses; one process at a time (others wait for it)."""
    import time

    from common import DirLock

    d, lock = DEFAULT_START, DirLock(root, "--out")
    for waited in range(3600):
        try:
            lock.acquire()
            break
        except UserError as e:
            if waited == 0:
                print(f"waiting: {e}", flush=True)
            time.sleep(1)
    else:
        raise UserError(f"{root}: still in use after an hour; rerun when the other command ends")
    try:
        data_dir, base_dir = root / "data", root / "base"
        runtime = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("device", "amp")]
        runtime += [f"--threads={args.threads}"] if getattr(args, "threads", None) else []
        if (data_dir / "synth.json").exists():
            print(f"default data: reusing {data_dir} (synthetic letters)", flush=True)
        else:
            print(
                f"default data: no --data given, making {data_dir}: {d['num_images']} + "
                f"{d['num_test']} test synthetic letters, {d['img_size']} px (synth.py, as "
                "run_all.sh does; reused next time)",
                flush=True,
            )
            import synth

            _run_default(synth.main, [
                "--mode", "letters", "--output-dir", str(data_dir), "--num-images",
                str(d["num_images"]), "--num-test", str(d["num_test"]), "--img-size",
                str(d["img_size"]), "--seed", str(d["seed"]), "--workers", str(d["workers"]), "--overwrite",
                "--quiet",
            ], "synth.py")  # fmt: skip
        if (base_dir / "summary.json").exists() and (base_dir / "best.pt").exists():
            print(f"default start: reusing {base_dir / 'best.pt'}", flush=True)
        else:
            print(
                f"default start: no --weights given, training {base_dir / 'best.pt'}: "
                f"{d['model']}, {d['epochs']} epochs, --aug {d['aug']} (train.py, as run_all.sh "
                "does; reused next time)",
                flush=True,
            )
            resume = ["--resume"] if (base_dir / "last.pt").exists() else []
            _run_default(train.main, [
                "--data", str(data_dir), "--out", str(root), "--name", "base", "--model",
                d["model"], "--random-seed", str(d["seed"]), "--epochs", str(d["epochs"]),
                "--aug", d["aug"], "--eval-test", "--quiet", *runtime, *resume,
            ], "train.py")  # fmt: skip
        return data_dir, base_dir
    finally:
        lock.release()


def _run_default(main_fn, argv: list[str], what: str) -> None:
    try:
        main_fn(argv)
    except SystemExit as e:
        if e.code == 130:  # Ctrl-C: the next run of the same command resumes from last.pt
            print("finetune.py: interrupted; run the same command again to continue", flush=True)
            raise
        if e.code not in (0, None):
            raise UserError(
                f"making the default start failed ({what} {' '.join(argv)}); see above, or pass "
                "--data and --weights"
            ) from None


def finetune(args, explicit: set[str]) -> dict:
    """Resolve grid point and start, then train.fit with the fine-tuning hooks."""
    resolve_start(args, explicit)
    if args.old_aug:
        args.oversample = [*args.oversample, f"{train.RAREST}=2"]
    keep: dict = {"grid": apply_grid(args, explicit)}
    adopt_start(args, explicit)
    check_args(args)
    default_model(args)
    base = _search_base(args)
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
    if _rank() == 0:
        print(
            f"ingredient: {run_dir / 'best.pt'} (best val acc {summary.get('best_val_acc')}); "
            f"soup it with python soup.py --ingredients {Path(args.out) / base}/*/best.pt",
            flush=True,
        )
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
        if wants_search(args):  # Optuna: the search section at the end of this file
            return run_search(args, argv)
        return finetune(args, explicit_dests(argv))


# ---------------------------------------------------------------------------
# Search (Optuna) -- `--search N`, `--search-report`, `--export-top K`
#
# Optuna (optional, imported only for these flags) samples the grid's own space with TPE, prunes
# weak trials from their per-epoch val_acc (successive halving / Hyperband) and keeps the study in
# a database (SQLAlchemy URL; default a SQLite file in the run directory): an interrupted search
# continues, and every process started with the same --storage/--study takes the next trial.
# Each trial is an ordinary ingredient directory <out>/<name>/<study>/t<N>/ (best.pt, last.pt,
# metrics.jsonl, summary.csv), so soup.py takes them as they are.

SEARCH_METHODS = ("full", "probe")
SEARCH_RETRIES = 3  # a killed trial is resumed (from its last.pt) at most this often


def add_search_flags(p: argparse.ArgumentParser) -> None:
    """The search group: --search, --storage, --study, --pruner, --search-report, --export-top."""
    from common import nonneg_int, positive_int, seed_int

    g = p.add_argument_group("search (Optuna; optional package)")
    g.add_argument(
        "--search",
        type=positive_int,
        default=None,
        metavar="N",
        help="run a TPE search until the study holds N finished (complete or pruned) trials",
    )
    g.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="study database, any SQLAlchemy URL (postgresql+psycopg2://user:pw@host/db, "
        "sqlite:///path.db); None: sqlite:///<out>/<name>/search.db",
    )
    g.add_argument("--study", default="search", help="study name inside --storage")
    g.add_argument(
        "--pruner",
        choices=["sha", "hyperband", "none"],
        default="sha",
        help="stop weak trials from their per-epoch val_acc: successive halving or Hyperband",
    )
    g.add_argument(
        "--search-seed",
        type=seed_int,
        default=0,
        help="TPE seed; trial N's random draws depend on (seed, N) only, so workers differ",
    )
    g.add_argument(
        "--heartbeat",
        type=positive_int,
        default=30,
        metavar="S",
        help="seconds between a trial's heartbeats; one silent for 2*S (killed) is resumed",
    )
    g.add_argument(
        "--search-report",
        action="store_true",
        help="print the study's trials (number, value, state, params, seconds) and importances",
    )
    g.add_argument(
        "--export-top",
        type=nonneg_int,
        default=None,
        metavar="K",
        help="print the best.pt paths of the best K complete trials, one per line (soup.py)",
    )


def wants_search(args) -> bool:
    return bool(args.search or args.search_report or args.export_top is not None)


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(
            "--search/--search-report/--export-top need the optuna package; pip install optuna"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happened
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    return optuna


def default_model(args) -> None:
    """--model when neither given nor taken from a checkpoint of ours: train.py's default."""
    if args.model is None:
        args.model = models.default_arch(models.resolve_device(args.device), args.amp)


def _search_base(args) -> str:
    return args.name or f"{args.model}_ft"


def default_storage(args) -> str:
    return f"sqlite:///{(Path(args.out) / _search_base(args) / 'search.db').absolute()}"


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite:"):
        return None
    path = url.split(":///", 1)[1] if ":///" in url else ""
    return Path(path.split("?", 1)[0]) if path and path != ":memory:" else None


def _check_storage_file(url: str, create: bool) -> None:
    """A SQLite storage file must be a writable file (or creatable, for a new search)."""
    from common import check_writable_dir

    path = _sqlite_file(url)
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--storage {url}: {path} is a directory; name a .db file")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise UserError(f"--storage {url}: {path} is not writable; fix its permissions")
        return
    if not create:
        raise UserError(f"--storage {url}: {path} does not exist; run --search first")
    check_writable_dir(path.parent, "--storage")


def open_storage(optuna, url: str, heartbeat: int | None = None):
    """RDBStorage with heartbeats (killed trials are failed and retried); one-line errors."""
    import sqlalchemy.exc

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    retry_cls = retry_cls or optuna.storages.RetryFailedTrialCallback
    retry = retry_cls(max_retry=SEARCH_RETRIES, inherit_intermediate_values=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    kw = {"engine_kwargs": engine}
    if heartbeat:
        kw.update(heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
    import time

    try:
        for attempt in range(6):
            try:
                try:
                    return optuna.storages.RDBStorage(
                        url, heartbeat_stale_trial_callback=retry, **kw
                    )
                except TypeError:  # optuna < 4.9 names the callback failed_trial_callback
                    return optuna.storages.RDBStorage(url, failed_trial_callback=retry, **kw)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
                # workers creating one new database at once race on its tables: try again
                transient = isinstance(e, sqlalchemy.exc.IntegrityError) or any(
                    w in str(e) for w in ("locked", "already exists")
                )
                if not transient or attempt == 5:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except (ImportError, sqlalchemy.exc.SQLAlchemyError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(
            f"--storage {url}: cannot open the study database ({first}); check the URL, that "
            "the server is reachable and that its driver is installed (postgresql+psycopg2://"
            "...: pip install psycopg2-binary)"
        ) from None


def search_space(args, explicit: set[str]) -> dict:
    """The grid's space as Optuna dimensions; flags the user gave are fixed, not searched."""
    family = getattr(train, "opt_family", lambda name: name)(args.opt)  # timm names: sgd/adam*
    lr, wd = LR_RANGE[family], WD_RANGE[family]
    scale = args.epoch_scale
    epochs = sorted({max(1, round(k * scale)) for k in range(1, 5)})
    if args.lp_epochs:
        epochs = [e for e in epochs if e > args.lp_epochs]
        if not epochs and "epochs" not in explicit:
            raise UserError(
                f"--lp-epochs {args.lp_epochs}: the search's epochs are at most "
                f"{round(4 * scale)}; raise --epoch-scale or lower --lp-epochs"
            )
    dims = {
        "method": ["cat", list(SEARCH_METHODS)],
        "lr": ["log", *lr],
        "weight_decay": ["log", *wd],
        "epochs": ["cat", epochs],
        "smoothing": ["float", 0.0, 0.225],
        "mix": ["cat", ["none", "cutmix", "mixup"]],
        "mix_alpha": ["float", 0.1, 1.0],
        "mix_prob": ["float", 0.25, 1.0],
        "aug": ["cat", list(GRID_AUGS)],
    }
    fixed = {k: getattr(args, k) for k in GRID_KEYS if k in explicit}
    if "freeze_backbone" in explicit or args.lp_epochs:
        dims.pop("method")  # the user (or LP-FT) decides freezing
    for k in fixed:
        dims.pop(k, None)
    return {"dims": dims, "fixed": fixed, "opt": args.opt, "weights": _file_hash(args.weights)}


def _file_hash(path) -> str | None:
    """sha1 of a file's bytes (16 hex), so a study recognises its start on any machine."""
    if not path or not Path(path).is_file():
        return str(path) if path else None
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def suggest(trial, space: dict, args) -> dict:
    """One point of the space: method 'probe' is the grid's point 0, 'full' draws the rest."""
    dims = space["dims"]

    def draw(name):
        kind, *rest = dims[name]
        if kind == "cat":
            return trial.suggest_categorical(name, rest[0])
        return trial.suggest_float(name, rest[0], rest[1], log=kind == "log")

    values = {}
    method = draw("method") if "method" in dims else None
    if method == "probe":
        values = grid_point(0, args.opt, args.epoch_scale)
    else:
        for k in ("lr", "weight_decay", "epochs", "smoothing", "mix", "aug"):
            if k in dims:
                values[k] = draw(k)
        if values.get("mix", space["fixed"].get("mix", "none")) != "none":
            for k in ("mix_alpha", "mix_prob"):
                if k in dims:
                    values[k] = draw(k)
        if method == "full":
            values["freeze_backbone"] = False
    return {k: v for k, v in values.items() if k not in space["fixed"]}


def _load_study(optuna, args, storage, create: bool, space: dict | None = None, pruner=None):
    url = args.storage or default_storage(args)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if args.study not in names and not create:
        have = ", ".join(names) or "none"
        raise UserError(f"--study {args.study}: not in {url} (studies: {have}); run --search")
    study = optuna.create_study(
        storage=storage,
        study_name=args.study,
        direction="maximize",
        load_if_exists=True,
        pruner=pruner,
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserError(f"--study {args.study}: in {url} it minimises; pick another --study")
    if space is not None:
        have = study.user_attrs.get("space")
        if have is None and study.trials:
            raise UserError(
                f"--study {args.study}: in {url} was not made by finetune.py --search; "
                "pick another --study"
            )
        if have is None:
            study.set_user_attr("space", json.loads(json.dumps(space)))
        elif have != json.loads(json.dumps(space)):
            diff = [k for k in ("dims", "fixed", "opt", "weights") if have.get(k) != space.get(k)]
            raise UserError(
                f"--study {args.study}: exists in {url} with another search space (its "
                f"{', '.join(diff)} differ: flags, --opt, --epoch-scale or --weights changed); "
                "use the same flags, or a new --study"
            )
    return study


def _make_pruner(optuna, name: str, space: dict, args):
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        epochs = space["dims"].get("epochs", ["cat", [args.epochs]])[1]
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs))
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


def _fit_trial(args, explicit: set[str], values: dict, epoch_end) -> dict:
    """finetune() for one trial: its values (where no flag fixed them), then train.fit."""
    for k, v in values.items():
        setattr(args, k, v)
    adopt_start(args, explicit)
    check_args(args)
    hooks = fit_hooks(args, {"grid": values})
    hooks.epoch_end = epoch_end
    hooks.record = {**hooks.record, "grid_point": None, "search_study": args.study}
    return train.fit(args, hooks)


def _counts(optuna, study, target: int) -> dict:
    """Finished trials toward --search N (a duplicate counts only past N of them), and the rest."""
    S = optuna.trial.TrialState
    n = {"done": 0, "running": 0, "waiting": 0}
    dups = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == S.COMPLETE and "duplicate_of" in t.user_attrs:
            dups += 1
        elif t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and "error" in t.user_attrs):
            n["done"] += 1
        elif t.state == S.RUNNING:
            n["running"] += 1
        elif t.state == S.WAITING:
            n["waiting"] += 1
    n["done"] += max(0, dups - target)  # so a search that keeps proposing one point still ends
    return n


def run_search(args, argv) -> dict:
    """--search N, then --search-report / --export-top (each also works on its own)."""
    import copy

    from common import check_writable_dir

    if args.search and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--search runs one trial per process; start several workers, not torchrun")
    explicit = explicit_dests(argv)
    if args.search:
        if "i" in explicit:
            raise UserError("--search draws its own points from the grid's space; drop --i")
        if args.resume or args.skip_existing:
            flag = "--resume" if args.resume else "--skip-existing"
            raise UserError(f"--search resumes its interrupted trials itself; drop {flag}")
        if not args.data:
            raise UserError("--data is required (a data set path; see python data.py --help)")
    optuna = _import_optuna()
    probe = copy.deepcopy(args)
    if args.search or args.weights:
        adopt_start(probe, explicit)  # --model etc. from --weights, before the space is made
    default_model(probe)
    args.name = _search_base(probe)  # <model>_ft by default, as finetune() names it
    url = args.storage or default_storage(args)
    result: dict = {}
    if args.search:
        space = search_space(probe, explicit)
        check = copy.deepcopy(probe)
        if "epochs" in space["dims"]:
            check.epochs = max(space["dims"]["epochs"][1])
        check_args(check)
        base = _search_base(probe)
        study_dir = Path(args.out) / base / args.study
        _check_storage_file(url, create=True)
        check_writable_dir(study_dir, "--out")
        db = _sqlite_file(url)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        storage = open_storage(optuna, url, args.heartbeat)
        pruner = _make_pruner(optuna, args.pruner, space, probe)
        study = _load_study(optuna, args, storage, True, space, pruner)
        beat = study.user_attrs.get("heartbeat")
        if beat is None:
            study.set_user_attr("heartbeat", args.heartbeat)
        elif beat != args.heartbeat:  # a shorter one would take live workers' trials for dead
            raise UserError(
                f"--heartbeat {args.heartbeat}: study {args.study} runs with --heartbeat {beat}; "
                "give every worker the same value"
            )
        if not study.trials and study_dir.exists() and any(study_dir.iterdir()):
            raise UserError(
                f"{study_dir}: holds trials of another study than {url} records; "
                "pick a new --study or remove that directory"
            )
        result = search(optuna, study, args, explicit, base, space)
    else:
        _check_storage_file(url, create=False)
        study = _load_study(optuna, args, open_storage(optuna, url), False)
    if args.search_report:
        print(search_report(optuna, study))
    if args.export_top is not None:
        paths = export_top(optuna, study, args.export_top)
        if len(paths) < args.export_top:
            print(
                f"warning: only {len(paths)} complete trial(s) with a best.pt in study "
                f"{args.study}",
                file=sys.stderr,
            )
        for p in paths:
            print(p)
        result["top"] = paths
    return result


def search(optuna, study, args, explicit: set[str], base: str, space: dict) -> dict:
    """Take trials until the study holds args.search finished ones (shared with other workers)."""
    import copy
    import time

    startup = min(10, max(2, args.search // 3))
    seen = {"ran": 0}

    def objective(trial):
        # Trial N's random draws depend on (--search-seed, N) only: parallel workers differ.
        study.sampler = optuna.samplers.TPESampler(
            seed=(args.search_seed * 1_000_003 + trial.number) % 2**32,
            n_startup_trials=startup,
            constant_liar=True,
        )
        values = suggest(trial, space, args)
        twin = _same_values(optuna, study, trial)
        if twin is not None:  # e.g. a second linear probe: the same run, not trained again
            trial.set_user_attr("run_dir", twin.user_attrs["run_dir"])
            trial.set_user_attr("duplicate_of", twin.number)
            print(
                f"trial {trial.number}: the values of trial {twin.number}; its val_acc "
                f"{twin.value:.4f} taken, not trained again",
                flush=True,
            )
            return twin.value
        retried = trial.user_attrs.get("run_dir")  # a killed trial's retry takes over its dir
        run_name = f"{base}/{args.study}/t{trial.number}"
        targs = copy.deepcopy(args)
        targs.search = None
        if retried:  # its directory, wherever --out pointed then
            targs.out, run_name = str(Path(retried).parent), Path(retried).name
        run_dir = (Path(targs.out) / run_name).absolute()
        targs.name = run_name
        if retried and (run_dir / "last.pt").exists() and not (run_dir / "summary.json").exists():
            targs.resume = "auto"
        else:
            targs.overwrite = True  # nothing worth keeping: killed before its first epoch ended
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("values", values)
        shown = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
        )
        again = f", resuming {run_dir}" if targs.resume else ""
        print(
            f"trial {trial.number} of {args.study}{again}: {shown or 'all from flags'}", flush=True
        )

        def epoch_end(epoch, row):
            trial.report(float(row["val_acc"]), int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned at epoch {row['epoch']}: val_acc {row['val_acc']:.4f}"
                )

        try:
            summary = _fit_trial(targs, explicit, values, epoch_end)
        except train.DivergedError as e:
            trial.set_user_attr("error", str(e))
            raise
        except optuna.TrialPruned as e:  # train.fit's epoch_end hook raised it
            print(f"trial {trial.number}: {e}", flush=True)
            raise
        except SystemExit as e:
            if e.code == 130:  # Ctrl-C: train.fit saved last.pt; let Optuna mark the trial
                raise KeyboardInterrupt from None
            raise
        finally:
            import runlog

            runlog.close_streams(run_dir)
        for k in ("test_acc", "best_ema_val_acc"):
            if summary.get(k) is not None:
                trial.set_user_attr(k, summary[k])
        seen["ran"] += 1
        return summary["best_val_acc"]

    t0 = time.perf_counter()
    while True:
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial comes back WAITING
        n = _counts(optuna, study, args.search)
        if n["done"] >= args.search:
            break
        if n["done"] + n["running"] >= args.search and not n["waiting"]:
            time.sleep(min(args.heartbeat, 5))  # the rest is in other workers' hands
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(train.DivergedError,))
        except KeyboardInterrupt:
            _retry_interrupted(optuna, study)
            print(
                f"interrupted: run the same command again to continue study {args.study} "
                "(the interrupted trial resumes from its last.pt)",
                file=sys.stderr,
            )
            raise SystemExit(130) from None
    best = _best_complete(optuna, study)
    took = time.perf_counter() - t0
    n = _counts(optuna, study, args.search)
    print(
        f"search {args.study}: {n['done']} finished trial(s), {seen['ran']} complete here in "
        f"{took:.0f}s; best "
        + (
            f"trial {best.number} val_acc {best.value:.4f} ({best.user_attrs.get('run_dir')})"
            if best
            else "none complete"
        ),
        flush=True,
    )
    return {
        "study": args.study,
        "finished": n["done"],
        "best_trial": best.number if best else None,
        "best_val_acc": best.value if best else None,
        "best_run_dir": best.user_attrs.get("run_dir") if best else None,
    }


def _same_values(optuna, study, trial):
    """A complete, trained trial with exactly this trial's parameters, or None."""
    for t in study.get_trials(deepcopy=False):
        if (
            t.state == optuna.trial.TrialState.COMPLETE
            and t.number != trial.number
            and t.params == trial.params
            and "duplicate_of" not in t.user_attrs
            and "run_dir" in t.user_attrs
        ):
            return t
    return None


def _retry_interrupted(optuna, study) -> None:
    """Queue a Ctrl-C'd trial again (same values, same directory) for the next worker."""
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if t.state == S.FAIL and "run_dir" in t.user_attrs]
    if not mine:
        return
    last = max(mine, key=lambda t: t.number)
    queued = {t.user_attrs.get("run_dir") for t in trials if t.state in (S.WAITING, S.RUNNING)}
    if last.user_attrs["run_dir"] not in queued and "error" not in last.user_attrs:
        retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        retry_cls = retry_cls or optuna.storages.RetryFailedTrialCallback
        retry_cls(max_retry=SEARCH_RETRIES, inherit_intermediate_values=True)(study, last)


def _best_complete(optuna, study):
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
    ]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def _seconds(t) -> float | None:
    if t.datetime_start and t.datetime_complete:
        return round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
    return None


def search_report(optuna, study) -> str:
    """Trial table (number, value, state, params, seconds, directory) and param importances."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    resumed_in = {}  # a killed/interrupted trial -> the trial that trained it on
    for t in trials:
        for n in t.system_attrs.get("retry_history", []):
            resumed_in[n] = t.number
    for t in trials:
        last = max(t.intermediate_values) if t.intermediate_values else None
        value = (
            t.value
            if t.value is not None
            else (t.intermediate_values[last] if last is not None else None)
        )
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items()
        )
        state = t.state.name.lower()
        if state == "pruned" and last is not None:
            state = f"pruned@{last}"
        if "duplicate_of" in t.user_attrs:
            state = f"same as {t.user_attrs['duplicate_of']}"
        elif "error" in t.user_attrs:
            state = "diverged"
        elif t.state.name == "FAIL" and t.number in resumed_in:
            state = f"stopped, resumed in {resumed_in[t.number]}"
        rows.append(
            [
                t.number,
                "" if value is None else round(value, 4),
                state,
                params,
                _seconds(t) or "",
                t.user_attrs.get("run_dir", ""),
            ]
        )
    header = ["trial", "value", "state", "params", "seconds", "run_dir"]
    text = [f"study {study.study_name}: {len(rows)} trial(s), value = best val_acc"]
    text.append(format_table(rows, header) if rows else "(no trials yet)")
    complete = [
        t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
    ]
    import warnings

    try:
        with warnings.catch_warnings():  # few-trial caveats; the table says how many there are
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study) if len(complete) >= 2 else {}
    except (ValueError, RuntimeError) as e:
        imp, note = {}, str(e).splitlines()[0]
    else:
        note = "needs at least 2 complete trials sharing a parameter"
    if imp:
        text.append(
            format_table([[k, round(v, 4)] for k, v in imp.items()], ["parameter", "importance"])
        )
    else:
        text.append(f"importances: {note}")
    return "\n".join(text)


def export_top(optuna, study, k: int) -> list[str]:
    """best.pt of the best k complete trials (highest value first; ties: lower trial number)."""
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
    ]
    done.sort(key=lambda t: (-t.value, t.number))
    paths: list[str] = []
    for t in done:
        if "run_dir" not in t.user_attrs or "duplicate_of" in t.user_attrs:
            continue
        p = Path(t.user_attrs["run_dir"]) / "best.pt"
        if p.is_file() and str(p) not in paths:
            paths.append(str(p))
        if len(paths) == k:
            break
    return paths


if __name__ == "__main__":
    main()
