"""Per-epoch outputs of a run besides best.pt/last.pt: summary.csv, TensorBoard/W&B, top-k epochs.

train.py (and so finetune.py) calls `epoch_end(t, row)` once per epoch on rank 0, before last.pt:

  summary.csv   timm's columns (epoch, train_loss, eval_loss, eval_top1, eval_top5 where the
                task has more than 5 classes, lr; top-1/top-5 in percent as timm writes them),
                then ours (val_acc, val_f1, seconds, ...). Rewritten atomically from
                metrics.jsonl, so a resumed run (whose metrics.jsonl is trimmed) never
                duplicates rows.
  --log tensorboard   the same scalars through torch.utils.tensorboard into <run>/tb/
  --log wandb         the same scalars into a W&B run (<run>/wandb/); WANDB_MODE=offline keeps
                      it on disk (`wandb sync` uploads it later)
  --checkpoint-hist K keeps the K best epochs by --checkpoint-metric as epoch_N.pt (timm's
                      CheckpointSaver: a better epoch replaces the worst kept one); soup.py
                      averages them: soup.py --ingredients 'runs/x/epoch_*.pt' --uniform

TensorBoard and W&B are optional packages, imported only when asked for.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import io
import math
import re
import sys
import uuid
from pathlib import Path

import models
from common import UserError, atomic_write_text, list_of, nonneg_int, read_jsonl

LOGGERS = ("tensorboard", "wandb")
# timm's summary.csv columns and the metrics.jsonl keys they come from (percent for top-k)
TIMM_COLUMNS = (
    ("epoch", "epoch", 1.0),
    ("train_loss", "train_loss", 1.0),
    ("eval_loss", "val_loss", 1.0),
    ("eval_top1", "val_acc", 100.0),
    ("eval_top5", "val_top5", 100.0),
    ("lr", "lr", 1.0),
)
CHECKPOINT_METRICS = (
    "val_acc",
    "val_loss",
    "val_f1",
    "val_top5",
    "val_label_acc",
    "train_loss",
    "ema_val_acc",
    "ema_val_loss",
)
RUN_FILES = ("summary.csv", "tb", "wandb", "wandb_id.txt")  # what a run dir may hold from here
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def add_flags(p: argparse.ArgumentParser) -> None:
    """--log, --wandb-project, --checkpoint-hist, --checkpoint-metric (train.py and finetune.py)."""
    g = p.add_argument_group("logs and epoch checkpoints")
    g.add_argument(
        "--log",
        type=list_of(_logger_name),
        default=[],
        metavar="NAME[,NAME]",
        help="also stream the per-epoch scalars to tensorboard (<run>/tb) and/or wandb "
        "(WANDB_MODE=offline keeps it on disk); summary.csv is always written",
    )
    g.add_argument("--wandb-project", default="imgcls", help="--log wandb: the W&B project")
    g.add_argument(
        "--checkpoint-hist",
        type=nonneg_int,
        default=0,
        metavar="K",
        help="keep the K best epochs by --checkpoint-metric as epoch_N.pt (0: none)",
    )
    g.add_argument(
        "--checkpoint-metric",
        default="val_acc",
        choices=CHECKPOINT_METRICS,
        help="metrics.jsonl column ranking --checkpoint-hist epochs (*loss: lower is better); "
        "ema_* columns keep the EMA weights",
    )


def _logger_name(text: str) -> str:
    name = text.strip().lower()
    if name not in LOGGERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOGGERS)}")
    return name


# ---------------------------------------------------------------------------
# summary.csv


def summary_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """timm-style header and rows from metrics.jsonl rows (eval_top5 only where it exists)."""
    cols = [(c, k, s) for c, k, s in TIMM_COLUMNS if any(k in r for r in rows)]
    mapped = {"epoch", "train_loss", "val_loss", "lr"}
    ours: list[str] = []
    for r in rows:
        ours += [k for k in r if k not in mapped and k not in ours]
    header = [c for c, _, _ in cols] + ours
    table = []
    for r in rows:
        line = [_scaled(r.get(k), s) for _, k, s in cols]
        table.append(line + [r.get(k, "") for k in ours])
    return header, table


def _scaled(v, scale: float):
    if v is None:
        return ""
    return v * scale if scale != 1.0 and isinstance(v, (int, float)) else v


def write_summary_csv(run_dir: Path, rows: list[dict]) -> Path:
    """<run_dir>/summary.csv from metrics rows, replaced atomically."""
    header, table = summary_table(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(table)
    path = Path(run_dir) / "summary.csv"
    atomic_write_text(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------
# TensorBoard and W&B streams


def scalars(row: dict) -> dict[str, float]:
    """The finite numeric scalars of a metrics row, named as in summary.csv (epoch excluded)."""
    header, table = summary_table([row])
    return {
        k: float(v)
        for k, v in zip(header, table[0])
        if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)
    }


class TensorBoardLog:
    """Event files in <run>/tb; steps are epochs (a resumed run purges the steps it redoes)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, first_epoch: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "--log tensorboard: the tensorboard package is not installed; "
                "pip install tensorboard, or drop --log tensorboard"
            ) from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=first_epoch)

    def log(self, values: dict[str, float], epoch: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, epoch)
        self.writer.flush()  # readable after every epoch, even if the run is killed

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """One W&B run per run directory (its id kept in <run>/wandb_id.txt, so resume continues it)."""

    name = "wandb"

    def __init__(self, run_dir: Path, args):
        try:
            import wandb
        except ImportError:
            raise UserError(
                "--log wandb: the wandb package is not installed; pip install wandb, "
                "or drop --log wandb"
            ) from None
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        if not id_file.exists():
            atomic_write_text(id_file, run_id + "\n")
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        self.wandb = wandb
        self.run = wandb.init(
            project=args.wandb_project,
            name=str(args.name),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            reinit="finish_previous",
            settings=wandb.Settings(silent=bool(getattr(args, "quiet", False))),
        )

    def log(self, values: dict[str, float], epoch: int) -> None:
        self.run.log({**values, "epoch": epoch}, step=epoch)

    def close(self) -> None:
        self.run.finish()


_OPEN: dict[str, list] = {}  # run dir -> its open streams (closed after the last epoch)


def _streams(t, first_epoch: int) -> list:
    key = str(Path(t.run.path))
    if key not in _OPEN:
        opened = []
        for name in getattr(t.args, "log", None) or []:
            try:
                opened.append(
                    TensorBoardLog(t.run.path, first_epoch)
                    if name == "tensorboard"
                    else WandbLog(t.run.path, t.args)
                )
            except Exception as e:  # noqa: BLE001 - a logger never stops a training
                _warn(name, e)
        _OPEN[key] = opened
    return _OPEN[key]


def _warn(name: str, e: BaseException) -> None:
    hint = "; wandb login, or WANDB_MODE=offline to keep the run on disk" if name == "wandb" else ""
    msg = str(e).strip().splitlines()[0].rstrip(". ") if str(e).strip() else type(e).__name__
    print(
        f"warning: --log {name}: {msg}{hint}; streaming off, summary.csv still written",
        file=sys.stderr,
    )


def close_streams(run_dir) -> None:
    """Flush and close the TensorBoard/W&B streams of a run directory (idempotent)."""
    for s in _OPEN.pop(str(run_dir), []):
        s.close()


def _close_all() -> None:
    for key in list(_OPEN):
        close_streams(key)


atexit.register(_close_all)


# ---------------------------------------------------------------------------
# Top-k epoch checkpoints


def higher_is_better(metric: str) -> bool:
    return "loss" not in metric


def update_history(
    hist: list[list], epoch: int, value: float, k: int, higher: bool
) -> tuple[list[list], bool]:
    """timm CheckpointSaver rule: (new [[value, epoch], ...] best first, whether epoch is kept).

    The epoch joins while fewer than k are kept or when it beats the worst kept one (ties: the
    earlier epoch stays)."""
    if k <= 0 or not math.isfinite(value):
        return hist, False
    hist = [h for h in hist if h[1] != epoch]  # a redone epoch (resume) replaces itself
    if len(hist) >= k:
        worst = hist[-1][0]
        if not (value > worst if higher else value < worst):
            return hist, False
    new = sorted([*hist, [value, epoch]], key=lambda h: (-h[0] if higher else h[0], h[1]))
    return new[:k], True


def epoch_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / f"epoch_{epoch}.pt"


def kept_epochs(run_dir: Path) -> list[int]:
    """Epoch numbers of the epoch_N.pt files in a run directory."""
    found = (EPOCH_FILE.match(f.name) for f in Path(run_dir).glob("epoch_*.pt"))
    return sorted(int(m.group(1)) for m in found if m)


def save_top_k(t, row: dict, rows: list[dict]) -> bool:
    """Keep the K best epochs as epoch_N.pt; a file whose epoch left the top K is removed.

    The history is the epoch files on disk ranked by their metrics.jsonl rows, so a resumed
    run (log trimmed to last.pt) drops files of the epochs it redoes, with no extra state."""
    args, run_dir = t.args, Path(t.run.path)
    k = getattr(args, "checkpoint_hist", 0) or 0
    if k <= 0:
        return False
    metric = args.checkpoint_metric
    if metric not in row:
        raise UserError(
            f"--checkpoint-metric {metric}: not a column of this run's metrics.jsonl "
            f"({', '.join(c for c in row if c != 'epoch')}); pick one of those"
        )
    by_epoch = {r["epoch"]: r for r in rows if metric in r}
    hist = [[float(by_epoch[e][metric]), e] for e in kept_epochs(run_dir) if e in by_epoch]
    higher = higher_is_better(metric)
    hist.sort(key=lambda h: (-h[0] if higher else h[0], h[1]))
    hist, kept = update_history(hist[:k], row["epoch"], float(row[metric]), k, higher)
    if kept:
        use_ema = metric.startswith("ema_") and getattr(t, "ema", None) is not None
        weights = t.ema.module if use_ema else t.model
        meta = {**t.meta, "metrics": {**row, "checkpoint_metric": metric}}
        models.save_checkpoint(epoch_path(run_dir, row["epoch"]), models.unwrap(weights), meta)
    keep = {e for _, e in hist}
    for e in kept_epochs(run_dir):
        if e not in keep:
            epoch_path(run_dir, e).unlink(missing_ok=True)
    return kept


def check_flags(args) -> None:
    """Before training: the --log packages import, and --checkpoint-metric can exist."""
    for name in getattr(args, "log", None) or []:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise UserError(
                f"--log {name}: the {name} package is not installed; pip install {name}, "
                f"or drop --log {name}"
            ) from None
    metric = getattr(args, "checkpoint_metric", "val_acc")
    if getattr(args, "checkpoint_hist", 0) and metric.startswith("ema_") and not args.ema:
        raise UserError(f"--checkpoint-metric {metric}: needs --ema DECAY; or rank by val_acc")


def epoch_end(t, row: dict) -> None:
    """Rank 0, once per epoch, before last.pt: top-k epoch files, summary.csv, the streams.

    `t` is train.Training (uses t.args, t.run.path, t.model, t.ema, t.meta)."""
    run_dir = Path(t.run.path)
    metrics = run_dir / "metrics.jsonl"
    rows = (
        [r for r in read_jsonl(metrics) if r.get("epoch", 0) <= row["epoch"]]
        if metrics.exists()
        else [row]
    )
    save_top_k(t, row, rows)
    write_summary_csv(run_dir, rows)
    streams = _streams(t, row["epoch"])
    values = scalars(row)
    for s in list(streams):
        try:
            s.log(values, row["epoch"])
        except Exception as e:  # noqa: BLE001
            _warn(s.name, e)
            streams.remove(s)
    if row["epoch"] >= t.args.epochs:
        close_streams(run_dir)
