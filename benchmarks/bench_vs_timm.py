"""Time to accuracy: timm's reference train.py against our default recipe, same data and budget.

    python benchmarks/bench_vs_timm.py [--data ../shared/data/fashion-mnist] [--budget 600]
        [--threads N] [--concurrent] [--ours-args "--amp none"] [--timm-args "..."] [--out T.md]

Both sides run as a user would run them, as subprocesses on the same machine with the same
thread count, each for the same wall-clock budget (startup, data loading and evaluation included):
- timm: ../shared/anchors/timm_train.py, unmodified, with the flags documented in
  ../shared/anchors/README.md (resnet10t, 32 px, SGD cosine, fp32, official test set as its
  validation split); the data is given to it as torchvision's FashionMNIST layout
  (DIR/FashionMNIST/raw/ with plain IDX files), written in a temp dir from --data.
- ours: `train.py --data DATA --eval-test --epochs E`, every other flag at its default.
The epoch count E of each side is chosen from a short measurement of that side (its startup,
seconds per epoch and evaluation cost; ours: 2 epochs of the whole training part, the speed
from epoch 2) so that its whole run fits the budget; a side still
running at 1.1x the budget is interrupted and marked. A budget too small for one epoch is
refused after the measurement (exit 2).

Accuracy after each epoch is TEST accuracy for both: timm's summary.csv eval_top1 (its
validation split is the official test set), and for ours the weights at the end of each epoch
(last.pt, hard-linked as it appears) evaluated on the test part after the run. Ours also shows
its validation accuracy (a 10% hold-out of the train part that picks best.pt). Elapsed times
are wall seconds from the start of the command to the moment the epoch's row was written.
The ratio is ours/timm of the wall times to first reach the lower of the two final accuracies.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402
    HelpFormatter,
    UserError,
    atomic_write_text,
    cli_errors,
    parse_args,
    positive_float,
    positive_int,
    threads_int,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"
DEFAULT_ANCHOR = ROOT.parent / "shared" / "anchors" / "timm_train.py"
POLL_S = 0.25
OVERRUN = 1.1  # a side still running at this multiple of the budget is interrupted
CALIB_EPOCHS = 2  # ours' speed measurement: epoch 1 builds kernels, epoch 2 gives the speed
# flags each side gets from the bench; a copy in --ours-args / --timm-args would break it
OURS_RESERVED = ("--data", "--out", "--name", "--threads", "--eval-test", "--resume")
TIMM_RESERVED = ("--data-dir", "--data", "--dataset", "--output", "--experiment", "--device")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="1-channel data set with a test part")
    p.add_argument("--anchor", default=str(DEFAULT_ANCHOR), help="timm's train.py (unmodified)")
    p.add_argument(
        "--budget", type=positive_float, default=600.0, help="wall seconds per side, all included"
    )
    p.add_argument(
        "--threads", type=threads_int, default=os.cpu_count() or 1, help="CPU threads per run"
    )
    p.add_argument(
        "--concurrent",
        action="store_true",
        help="run both sides at the same time with half the threads each (same load on both)",
    )
    p.add_argument(
        "--calib",
        type=positive_float,
        default=40.0,
        help="seconds of timm training to measure its speed (ours: 2 epochs, --calib-images)",
    )
    p.add_argument(
        "--calib-images",
        type=positive_int,
        default=None,
        help="ours' measurement: training images (labels per class = this / classes); default: "
        "the whole training part (subsets of 4,096-16,384 images mis-measured the full run's "
        "speed by 15-25%%, both ways)",
    )
    p.add_argument("--ours-epochs", type=positive_int, default=None, help="skip ours' measurement")
    p.add_argument("--timm-epochs", type=positive_int, default=None, help="skip timm's measurement")
    p.add_argument("--ours-args", default="", help='extra train.py flags, e.g. "--amp none"')
    p.add_argument(
        "--timm-args", default="", help='extra timm flags, e.g. "--amp --amp-dtype bfloat16"'
    )
    p.add_argument("--keep", default=None, metavar="DIR", help="keep run dirs and logs in DIR")
    p.add_argument("--out", default=None, metavar="FILE.md", help="also write the tables here")
    return p


# ---------------------------------------------------------------------------
# Pure helpers (unit-tested)


def time_to_reach(timeline: list[tuple[float, float]], target: float) -> float | None:
    """First elapsed time whose accuracy is >= target (timeline of (seconds, acc)); else None."""
    for t, acc in sorted(timeline):
        if acc >= target - 1e-9:
            return t
    return None


def speed_ratio(ours: list[tuple[float, float]], timm: list[tuple[float, float]]) -> dict:
    """The lower of the two final accuracies, each side's time to reach it, and ours/timm."""
    if not ours or not timm:
        return {"target": None, "ours_s": None, "timm_s": None, "ratio": None}
    final_ours, final_timm = sorted(ours)[-1][1], sorted(timm)[-1][1]
    target = min(final_ours, final_timm)
    t_ours, t_timm = time_to_reach(ours, target), time_to_reach(timm, target)
    ratio = t_ours / t_timm if t_ours is not None and t_timm else None
    return {"target": target, "ours_s": t_ours, "timm_s": t_timm, "ratio": ratio}


def epochs_that_fit(budget: float, fixed_s: float, per_epoch_s: float) -> int:
    """Whole epochs of per_epoch_s that fit in budget after fixed_s (0 when not even one)."""
    if per_epoch_s <= 0:
        raise ValueError("per_epoch_s must be > 0")
    return max(0, int((budget - fixed_s) // per_epoch_s))


_TIMM_TRAIN = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+)")
_TIMM_RATE = re.compile(r"Time: [\d.]+s,\s*[\d.]+/s\s+\([\d.]+s,\s*([\d.]+)/s\)")


def parse_timm_progress(line: str) -> tuple[int, int, int] | None:
    """(epoch, batch, batches per epoch) from one timm 'Train: E [ B/N ...' log line."""
    m = _TIMM_TRAIN.search(line)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def parse_timm_rate(log: str) -> float | None:
    """Training images/s of timm's last logged running average."""
    rates = _TIMM_RATE.findall(log)
    return float(rates[-1]) if rates else None


def timm_precision(log: str, timm_args: list[str]) -> str:
    """The precision timm says it trained in (its own log line), e.g. 'fp32' or 'amp bfloat16'."""
    if "Using native Torch AMP" in log:
        dtype = "float16"
        if "--amp-dtype" in timm_args:
            i = timm_args.index("--amp-dtype")
            dtype = timm_args[i + 1] if i + 1 < len(timm_args) else dtype
        return f"autocast {dtype}"
    m = re.search(r"AMP not enabled\. Training in (?:torch\.)?(\w+)", log)
    if m:
        return "fp32" if m[1] == "float32" else m[1]
    return "unknown"


def ours_precision(amp: str) -> str:
    return {"none": "fp32", "bf16": "autocast bfloat16", "fp16": "autocast float16"}.get(
        amp, str(amp)
    )


def read_summary_csv(path: Path) -> list[dict]:
    """timm's summary.csv rows (epoch, train_loss, eval_loss, eval_top1, ...) as floats."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        try:
            out.append({k: float(v) for k, v in r.items() if k and v not in (None, "")})
        except ValueError:  # a row caught half-written
            break
    return out


def write_idx(path: Path, array, magic_dims: int) -> None:
    """Plain (uncompressed) IDX file of uint8 data: magic 0x0800|dims, then big-endian sizes."""
    arr = array.astype("uint8", copy=False)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | magic_dims))
        f.write(struct.pack(f">{arr.ndim}I", *arr.shape))
        f.write(arr.tobytes())


# ---------------------------------------------------------------------------
# Data: ours reads --data as is; timm gets the torchvision FashionMNIST layout


@dataclass
class DataInfo:
    n_train: int  # ours: train part after the 10% hold-out
    n_val: int
    n_full: int  # timm trains on the whole train part
    n_test: int
    classes: int
    hw: tuple[int, int]
    mean: float
    std: float


def inspect_data(path: str) -> tuple[DataInfo, object, object]:
    """Decode --data (train part and test part) and check both sides can use it."""
    import data

    if not Path(path).exists():
        raise UserError(f"--data {path}: no such file or directory; pass an existing data set")
    full, _ = data.load_split(path, "all")
    try:
        test, _ = data.load_split(path, "test")
    except UserError as e:
        raise UserError(
            f"--data {path}: no test part ({e}); both sides are scored on the test part"
        ) from None
    if not full.has_labels or not test.has_labels or full.multi_label:
        raise UserError(f"--data {path}: needs single-label train and test parts")
    if full.in_chans != 1:
        raise UserError(
            f"--data {path}: {full.in_chans}-channel images; the timm side reads torchvision's "
            "FashionMNIST layout, which holds 1-channel images only"
        )
    if len(full.classes) > 256:
        raise UserError(f"--data {path}: {len(full.classes)} classes; IDX labels hold <= 256")
    val, _ = data.load_split(path, "val")
    x = full.images.float() / 255
    info = DataInfo(
        n_train=len(full) - len(val),
        n_val=len(val),
        n_full=len(full),
        n_test=len(test),
        classes=len(full.classes),
        hw=full.img_size,
        mean=round(float(x.mean()), 4),
        std=round(float(x.std()), 4),
    )
    return info, full, test


def write_torchvision_layout(root: Path, full, test) -> None:
    """DIR/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, as torchvision reads."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for part, ds in (("train", full), ("t10k", test)):
        write_idx(raw / f"{part}-images-idx3-ubyte", ds.images[:, 0].numpy(), 3)
        write_idx(raw / f"{part}-labels-idx1-ubyte", ds.labels.numpy(), 1)


# ---------------------------------------------------------------------------
# Commands


def timm_command(
    anchor: str, data_dir: Path, out: Path, name: str, info: DataInfo, epochs: int, extra: list[str]
) -> list[str]:
    """The README's documented flags; data-derived values where they depend on the data."""
    img = 32 if max(info.hw) <= 32 else max(info.hw)  # the README resizes 28 px to 32 px
    return [
        sys.executable, anchor,
        "--data-dir", str(data_dir), "--dataset", "torch/fashion_mnist",
        "--train-split", "train", "--val-split", "validation",
        "--model", "resnet10t", "--num-classes", str(info.classes), "--in-chans", "1",
        "--img-size", str(img), "--crop-pct", "1.0",
        "--mean", str(info.mean), "--std", str(info.std),
        "--scale", "0.5", "1.0", "--hflip", "0.5", "--color-jitter", "0",
        "-b", "128", "--epochs", str(epochs), "--warmup-epochs", "0", "--sched", "cosine",
        "--opt", "sgd", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "5e-5",
        "--workers", "2", "--no-prefetcher", "--device", "cpu", "--channels-last",
        "--output", str(out), "--experiment", name, "--checkpoint-hist", "1",
        *extra,
    ]  # fmt: skip


def ours_command(
    data_path: str, out: Path, name: str, threads: int, epochs: int, extra: list[str]
) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "--data", data_path, "--eval-test",
        "--epochs", str(epochs), "--out", str(out), "--name", name, "--threads", str(threads),
        "--checkpoint-hist", str(epochs),  # every epoch's weights kept as epoch_N.pt
        *extra,
    ]  # fmt: skip


def split_extra(text: str, flag: str, reserved: tuple[str, ...]) -> list[str]:
    try:
        parts = shlex.split(text)
    except ValueError as e:
        raise UserError(f"{flag} {text!r}: cannot split it ({e}); quote it as one string") from None
    for a in parts:
        if a.split("=")[0] in reserved:
            raise UserError(f"{flag}: {a.split('=')[0]} is set by the bench; leave it out")
    return parts


# ---------------------------------------------------------------------------
# Running a side: a subprocess watched by polling its output files


@dataclass
class Side:
    name: str
    cmd: list[str]
    run_dir: Path
    log: Path
    threads: int
    deadline_s: float | None = None  # interrupt when still running after this
    proc: subprocess.Popen | None = None
    t0: float = 0.0
    rows: list[tuple[float, dict]] = field(default_factory=list)  # (elapsed, row)
    snaps: list[Path] = field(default_factory=list)
    progress: list[tuple[float, int, int, int]] = field(default_factory=list)
    wall: float | None = None
    returncode: int | None = None
    stopped: bool = False
    cpu_s: float | None = None
    _log_pos: int = 0
    _last_inode: int | None = None

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        env.pop("CUDA_VISIBLE_DEVICES", None)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "wb")  # noqa: SIM115 - closed by the child's exit
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            start_new_session=True, stdin=subprocess.DEVNULL, preexec_fn=_default_sigint,
        )  # fmt: skip
        fh.close()

    def _reap(self) -> bool:
        """True once the child has exited (its exit code and CPU seconds recorded)."""
        if self.proc.returncode is not None:
            return True
        try:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            return self.proc.poll() is not None
        if pid == 0:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s = ru.ru_utime + ru.ru_stime  # the child and the processes it waited for
        return True

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def poll(self) -> bool:
        """Record new rows/checkpoints/progress; True while the process runs."""
        now = self.elapsed()
        self._scan(now)
        if self._reap():
            if self.wall is None:
                self.wall, self.returncode = now, self.proc.returncode
                self._scan(now)
            return False
        if self.deadline_s is not None and now > self.deadline_s and not self.stopped:
            self.stopped = True
            self.interrupt()
        return True

    def _scan(self, now: float) -> None:
        if self.name == "timm":
            rows = read_summary_csv(self.run_dir / "summary.csv")
        else:
            rows = _read_jsonl_rows(self.run_dir / "metrics.jsonl")
        for r in rows[len(self.rows) :]:
            self.rows.append((now, r))
        last = self.run_dir / "last.pt"
        if self.name == "ours" and last.exists():
            try:
                ino = last.stat().st_ino
                if ino != self._last_inode:
                    snap = self.run_dir.parent / f"snap_{len(self.snaps):03d}.pt"
                    os.link(last, snap)
                    self.snaps.append(snap)
                    self._last_inode = ino
            except OSError:
                pass  # replaced between stat and link: caught on the next poll
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_pos)
                chunk = f.read()
        except OSError:
            return
        cut = chunk.rfind(b"\n") + 1
        self._log_pos += cut
        for line in chunk[:cut].decode("utf-8", "replace").splitlines():
            p = parse_timm_progress(line)
            if p:
                self.progress.append((now, *p))

    def interrupt(self) -> None:
        """Ctrl-C to the whole process group (both scripts stop cleanly on it), then force."""
        if self.proc and not self._reap():
            with _suppress():
                os.killpg(self.proc.pid, signal.SIGINT)
            end = time.perf_counter() + 30
            while not self._reap() and time.perf_counter() < end:
                time.sleep(0.1)
            if not self._reap():
                with _suppress():
                    os.killpg(self.proc.pid, signal.SIGKILL)
                while not self._reap():
                    time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _default_sigint() -> None:
    """In the child: Ctrl-C back to its default, even when the bench runs in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


def _read_jsonl_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def run_sides(sides: list[Side], concurrent: bool, stop_when=None) -> None:
    """Run sides together or one after the other; stop_when(side) -> True ends a side early."""
    groups = [sides] if concurrent else [[s] for s in sides]
    try:
        for group in groups:
            for s in group:
                s.start()
            running = list(group)
            while running:
                time.sleep(POLL_S)
                for s in list(running):
                    alive = s.poll()
                    if alive and stop_when is not None and stop_when(s):
                        s.interrupt()
                        s.poll()
                        alive = False
                    if not alive:
                        running.remove(s)
    finally:
        for s in sides:
            s.interrupt()


def _fail(side: Side, what: str) -> UserError:
    tail = " | ".join(side.log_text().strip().splitlines()[-3:])[-400:]
    return UserError(f"{side.name} {what} (exit {side.returncode}); its log ends: {tail}")


# ---------------------------------------------------------------------------
# Measurement: seconds per epoch of each side, to choose its epoch count


def calibrate(args, info: DataInfo, work: Path, timm_data: Path, threads: int, extra_o, extra_t):
    """Short runs of both sides -> {'ours': {...}, 'timm': {...}} with fixed and per-epoch s."""
    sides, est = [], {}
    if args.ours_epochs is None:
        cmd = ours_command(args.data, work / "calib_ours", "ours", threads, CALIB_EPOCHS, extra_o)
        if args.calib_images is not None and args.calib_images < info.n_train:
            cmd += ["--labels-per-class", str(max(1, -(-args.calib_images // info.classes)))]
        sides.append(
            Side("ours", cmd, work / "calib_ours" / "ours", work / "calib_ours.log", threads)
        )
    if args.timm_epochs is None:
        cmd = timm_command(args.anchor, timm_data, work / "calib_timm", "timm", info, 1, extra_t)
        cmd += ["--log-interval", "10"]
        sides.append(
            Side("timm", cmd, work / "calib_timm" / "timm", work / "calib_timm.log", threads)
        )

    def enough(s: Side) -> bool:
        if s.name != "timm" or not s.progress:
            return False
        distinct = {p[0] for p in s.progress}
        return s.elapsed() - s.progress[0][0] >= args.calib and len(distinct) >= 3

    run_sides(sides, args.concurrent, stop_when=enough)
    batch = 128  # the README's -b, unless --timm-args sets another
    for flag in ("-b", "--batch-size"):
        if flag in extra_t and extra_t.index(flag) + 1 < len(extra_t):
            batch = int(extra_t[extra_t.index(flag) + 1])
    for s in sides:
        if s.name == "ours":
            if len(s.rows) < 2:
                raise _fail(s, "failed during the speed measurement")
            est["ours"] = ours_estimate(s.rows, info)
        else:
            prog = [p for p in s.progress if p[1] == 0]
            if not prog:
                raise _fail(s, "failed during the speed measurement (no training progress logged)")
            (ta, _, ba, n), (tb, _, bb, _) = prog[0], prog[-1]
            if tb > ta and bb > ba:
                per_batch = (tb - ta) / (bb - ba)
            else:  # every line arrived within one poll: timm's own running average
                rate = parse_timm_rate(s.log_text())
                if not rate:
                    raise _fail(s, "failed during the speed measurement (no timing logged)")
                per_batch = batch / rate
            train_s = n * per_batch
            rows = s.rows
            # evaluation: measured when the measurement saw a whole epoch, else forward ~ 1/3
            if rows and s.returncode == 0:
                val_s = max(0.0, rows[0][0] - (ta + (n - ba) * per_batch))
            else:
                val_s = train_s / 3 * info.n_test / max(1, info.n_full)
            est["timm"] = {
                "images_per_s": batch / per_batch,
                "fixed_s": ta,  # startup to the first logged batch
                "per_epoch_s": train_s + val_s,
                "startup_s": ta,
            }
    return est


def ours_estimate(rows: list[tuple[float, dict]], info: DataInfo) -> dict:
    """Fixed and per-epoch seconds of the full run from the measurement's epoch rows.

    rows: (elapsed s when the row appeared, train.py's epoch row) for >= 2 epochs of the
    measurement run. The speed is the images of epochs 2.. over their training seconds, the
    per-epoch evaluation cost (validation, EMA, checkpoints) their mean gap; epoch 1's extra
    time (kernels built on first use) and the startup before it are fixed costs, and so is the
    final test evaluation (n_test / n_val of one validation)."""
    (t1, r1), later = rows[0], rows[1:]
    images = sum(r["images_per_s"] * r["seconds"] for _, r in later)
    train_s = sum(r["seconds"] for _, r in later)
    ips = images / max(train_s, 1e-9)
    gaps = [t - t_prev - r["seconds"] for (t_prev, _), (t, r) in zip(rows, later)]
    eval_s = max(0.0, sum(gaps) / len(gaps))
    warm = max(0.0, r1["seconds"] - images / len(later) / ips)
    startup = max(0.0, t1 - r1["seconds"] - eval_s)
    test_s = eval_s * info.n_test / max(1, info.n_val)
    return {
        "images_per_s": ips,
        "fixed_s": startup + warm + test_s,
        "per_epoch_s": info.n_train / ips + eval_s,
        "startup_s": startup,
    }


# ---------------------------------------------------------------------------
# After the run: ours' per-epoch test accuracy from the epoch checkpoints


def ours_test_timeline(side: Side, data_path: str, test) -> tuple[dict, dict]:
    """{epoch: {'model': acc, 'ema': acc}} from the last.pt snapshots, and args.json."""
    import torch

    import models
    import train

    targs = json.loads((side.run_dir / "args.json").read_text())
    rt = models.Runtime(torch.device("cpu"), targs.get("amp", "none"), True, quiet=True)
    out = {}
    for snap in side.snaps:  # EMA weights: only last.pt has them (snapshots caught by polling)
        ck = models.load_checkpoint(snap)
        st = ck.get("train_state", {})
        if st.get("batch", 0) == 0 and "ema_state_dict" in ck:  # not saved mid-epoch
            model = models.model_from_checkpoint(ck).eval()
            model.load_state_dict(ck["ema_state_dict"])
            acc = train.evaluate(model, test.images, test.labels, ck, rt)["acc"]
            out.setdefault(int(st["epoch"]), {})["ema"] = acc
        snap.unlink()
    for path in sorted(side.run_dir.glob("epoch_*.pt")):  # every epoch, from --checkpoint-hist
        model, ck = models.load_model(path)
        epoch = int(path.stem.split("_")[1])
        acc = train.evaluate(model.eval(), test.images, test.labels, ck, rt)["acc"]
        out.setdefault(epoch, {})["model"] = acc
    return out, targs


def ours_final(side: Side, test, targs: dict) -> dict:
    """train.py's own --eval-test result; evaluated here when the side was interrupted."""
    import torch

    import models
    import train

    summary_p = side.run_dir / "summary.json"
    s = json.loads(summary_p.read_text()) if summary_p.exists() else {}
    rt = models.Runtime(torch.device("cpu"), targs.get("amp", "none"), True, quiet=True)
    for key, name in (("test_acc", "best.pt"), ("ema_test_acc", "best_ema.pt")):
        if key not in s and (side.run_dir / name).exists():
            m, ck = models.load_model(side.run_dir / name)
            s[key] = train.evaluate(m, test.images, test.labels, ck, rt)["acc"]
    vals = [r for _, r in side.rows]
    best_val = max((r["val_acc"] for r in vals), default=float("nan"))
    best_ema = max((r.get("ema_val_acc", -1) for r in vals), default=-1)
    use_ema = "ema_test_acc" in s and best_ema > best_val  # chosen on validation, not on test
    return {
        "family": "ema" if use_ema else "model",
        "acc": s.get("ema_test_acc" if use_ema else "test_acc"),
        "test_acc": s.get("test_acc"),
        "ema_test_acc": s.get("ema_test_acc"),
        "tta": s.get("ema_tta_test_acc" if use_ema else "tta_test_acc"),  # --eval-tta auto
    }


# ---------------------------------------------------------------------------
# Report


def cpu_description() -> str:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        name = m[1].strip() if m else name
        flags = set(re.findall(r"\b(avx512_bf16|amx_bf16|avx512f|avx2)\b", text))
    except OSError:
        pass
    import torch

    env = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # limits on torch's kernels
    limits = [f"{k}={os.environ[k]}" for k in env if os.environ.get(k)]
    kernels = torch.backends.cpu.get_cpu_capability() + (
        f" ({', '.join(limits)})" if limits else ""
    )
    return (
        f"{name} ({os.cpu_count()} logical CPUs; {', '.join(sorted(flags)) or 'no AVX flags'}); "
        f"torch kernels {kernels}"
    )


def code_version() -> str:
    """The commit our side ran, and whether train.py/models.py/data.py differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "train.py", "models.py", "data.py", "common.py"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}" + (
        f" (uncommitted changes: {', '.join(dirty[1::2])})" if dirty else ""
    )


def _cores(side: Side) -> str:
    """CPU seconds / wall seconds: how much of the machine a side actually got."""
    if side.cpu_s is None or not side.wall:
        return "-"
    return f"{side.cpu_s / side.wall:.2f} of {side.threads}"


def _f(x, nd=4) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def report(
    args,
    info,
    est,
    timm: Side,
    ours: Side,
    ours_epochs,
    ours_fin,
    targs,
    load0,
    load1,
    threads: int,
    epochs: dict,
) -> str:
    t_rows = [(t, r["eval_top1"] / 100) for t, r in timm.rows if "eval_top1" in r]
    fam = ours_fin["family"]
    o_rows = [
        (t, ours_epochs[int(r["epoch"])][fam])
        for t, r in ours.rows
        if int(r["epoch"]) in ours_epochs
    ]
    o_time = list(o_rows)
    if ours_fin["acc"] is not None and ours.wall is not None:
        o_time.append((ours.wall, ours_fin["acc"]))
    t_time = list(t_rows)
    ratio = speed_ratio(o_time, t_time)
    t_final = t_rows[-1][1] if t_rows else None
    timm_log = timm.log_text()
    t_args = shlex.split(args.timm_args)
    mode = (
        f"concurrent, {threads} threads each"
        if args.concurrent
        else f"sequential, {threads} threads"
    )
    lines = [
        f"## bench_vs_timm: {Path(args.data).name}, budget {args.budget:.0f} s per side",
        "",
        f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: "
        f"{cpu_description()}; torch threads {threads}; {mode}; ours at commit {args.code_version}",
        f"- load average (1/5/15 min) before {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
        f"after {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}",
        f"- data: {info.n_full} train ({info.n_train} + {info.n_val} held out for ours' "
        f"validation) / {info.n_test} test images, {info.classes} classes, "
        f"{info.hw[0]}x{info.hw[1]} px",
    ]
    for side, e in (("ours", est.get("ours")), ("timm", est.get("timm"))):
        if e:
            lines.append(
                f"- measurement, {side}: {e['images_per_s']:.0f} train images/s, about "
                f"{e['per_epoch_s']:.0f} s per epoch + {e['fixed_s']:.0f} s fixed -> "
                f"{epochs[side]} epochs"
            )
        else:
            lines.append(f"- {side}: {epochs[side]} epochs as given")
    lines += [
        "",
        "| side | command | precision | epochs done | final test acc | wall s | CPU cores used | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    o_note = "interrupted at 1.1x budget" if ours.stopped else ""
    t_note = "interrupted at 1.1x budget" if timm.stopped else "last epoch's eval_top1"
    fin = ours_fin
    o_acc = f"{_f(fin['acc'])} ({fam}; model {_f(fin['test_acc'])}, EMA {_f(fin['ema_test_acc'])})"
    if fin.get("tta") is not None:  # train.py's --eval-tta (auto: flip) on the same weights
        o_acc += f"; with flip TTA {_f(fin['tta'])}"
    o_cmd = "train.py --data DATA --eval-test --epochs " + str(epochs["ours"])
    o_cmd += (" " + args.ours_args) if args.ours_args else ""
    t_cmd = f"timm train.py, README flags, --epochs {epochs['timm']}"
    t_cmd += (" " + args.timm_args) if args.timm_args else ""
    lines.append(
        f"| ours | `{o_cmd}` | {ours_precision(targs.get('amp'))} | {len(ours.rows)} | {o_acc} | "
        f"{_f(ours.wall, 0)} | {_cores(ours)} | {o_note} |"
    )
    lines.append(
        f"| timm | `{t_cmd}` | {timm_precision(timm_log, t_args)} | {len(t_rows)} | "
        f"{_f(t_final)} | {_f(timm.wall, 0)} | {_cores(timm)} | {t_note} |"
    )
    lines += ["", "| side | epoch | elapsed s | test acc | val acc (ours' hold-out) |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for t, r in ours.rows:
        e = int(r["epoch"])
        acc = ours_epochs.get(e, {})
        test_s = _f(acc.get(fam)) + (f" (model {_f(acc.get('model'))})" if fam == "ema" else "")
        val = r.get("ema_val_acc") if fam == "ema" else r.get("val_acc")
        lines.append(f"| ours | {e} | {t:.0f} | {test_s} | {_f(val)} |")
    for k, (t, acc) in enumerate(t_rows, 1):
        lines.append(f"| timm | {k} | {t:.0f} | {acc:.4f} | - |")
    lines.append("")
    if ratio["target"] is None:
        lines.append("ratio: not available (a side has no accuracy)")
    else:
        tr = f"{ratio['ratio']:.3f}" if ratio["ratio"] is not None else "-"
        lines.append(
            f"Time to the lower final accuracy ({ratio['target']:.4f}): ours {_f(ratio['ours_s'], 0)} s, "
            f"timm {_f(ratio['timm_s'], 0)} s -> **ours/timm = {tr}** (epoch granularity; "
            "times include startup and evaluation)"
        )
    lines.append(
        "Test accuracy per epoch: timm's eval_top1 (its validation split is the test part); ours: "
        f"the {'EMA ' if fam == 'ema' else ''}weights at the end of each epoch (epoch_N.pt of --checkpoint-hist; EMA from last.pt) "
        "evaluated on the test part after the run; final: train.py's --eval-test (best.pt / "
        "best_ema.pt, chosen on validation)."
    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------


def check_inputs(args) -> tuple[list[str], list[str]]:
    anchor = Path(args.anchor)
    if not anchor.is_file():
        raise UserError(
            f"--anchor {args.anchor}: no such file; pass timm's train.py (a copy lives at "
            "../shared/anchors/timm_train.py)"
        )
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        raise UserError("the timm package is not installed; pip install timm (1.0.31 checked)")
    if not Path(args.data).exists():
        raise UserError(f"--data {args.data}: no such file or directory; pass an existing data set")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise UserError(f"--out {args.out}: is a directory; pass a file name such as table.md")
        if not out.parent.resolve().is_dir():
            raise UserError(
                f"--out {args.out}: folder {out.parent} does not exist; create it first"
            )
        if not os.access(out.parent.resolve(), os.W_OK):
            raise UserError(f"--out {args.out}: folder {out.parent} is not writable")
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        raise UserError(f"--keep {args.keep}: exists and is not empty; pass a new folder")
    return (
        split_extra(args.ours_args, "--ours-args", OURS_RESERVED),
        split_extra(args.timm_args, "--timm-args", TIMM_RESERVED),
    )


def full_run_flags(data: str, extra_o: list[str], info: DataInfo) -> list[str]:
    """The --model, --batch-size and --opt that train.py picks for a run of at least 2 epochs
    on the whole training part, for those not in extra_o, so that the speed measurement (2
    epochs, of a subset with --calib-images) trains what the real run trains: for a subset
    train.py would pick another net (models.default_arch, under 50,000 images seen), batch size
    or optimizer (train.choose_recipe: AdamW for 16,384 images, SGD for Fashion-MNIST's 54,000)."""
    import models
    import train

    a = train.build_parser().parse_args(["--data", data, "--epochs", "2", *extra_o])
    train.choose_recipe(a, info.n_train, 1)
    flags = []
    if a.model is None:
        flags += ["--model", models.default_arch("cpu", a.amp, 2 * info.n_train)]
    if "--batch-size" not in extra_o:
        flags += ["--batch-size", str(a.batch_size)]
    if "--opt" not in extra_o:
        flags += ["--opt", a.opt]
    return flags


def run(args) -> str:
    extra_o, extra_t = check_inputs(args)
    args.code_version = code_version()  # before the runs: what ours ran
    info, full, test = inspect_data(args.data)
    auto = full_run_flags(args.data, extra_o, info)  # the real run's, for the measurement too
    if auto:
        extra_o = [*extra_o, *auto]
        args.ours_args = f"{args.ours_args} {' '.join(auto)} (the defaults)".strip()
    threads = max(1, args.threads // 2) if args.concurrent else args.threads
    tmp = tempfile.TemporaryDirectory(prefix="bench_vs_timm_") if not args.keep else None
    work = Path(tmp.name) if tmp else Path(args.keep)
    try:
        work.mkdir(parents=True, exist_ok=True)
        timm_data = work / "timm_data"
        write_torchvision_layout(timm_data, full, test)
        print(
            f"data: {info.n_full} train / {info.n_test} test, {info.classes} classes; timm layout "
            f"in {timm_data}; threads {threads}{' each, concurrent' if args.concurrent else ''}",
            flush=True,
        )
        est = {}
        if args.ours_epochs is None or args.timm_epochs is None:
            print("measuring the speed of each side ...", flush=True)
            est = calibrate(args, info, work, timm_data, threads, extra_o, extra_t)
        epochs = {"ours": args.ours_epochs, "timm": args.timm_epochs}
        short = []
        for side, e in est.items():
            n = epochs_that_fit(args.budget, e["fixed_s"], e["per_epoch_s"])
            print(
                f"{side}: {e['images_per_s']:.0f} images/s, ~{e['per_epoch_s']:.0f} s/epoch + "
                f"{e['fixed_s']:.0f} s fixed -> {n} epochs in {args.budget:.0f} s",
                flush=True,
            )
            epochs[side] = n
            if n < 1:
                short.append((e["fixed_s"] + e["per_epoch_s"], side))
        if short:  # measured, and not even one epoch fits: refuse before the long runs
            need, side = max(short)
            raise UserError(
                f"--budget {args.budget:g}: one epoch of {side} takes about {need:.0f} s here "
                f"(startup and evaluation included); pass --budget {int(need * 1.2) + 1} or more"
            )
        ours = Side(
            "ours",
            ours_command(args.data, work / "ours", "ours", threads, epochs["ours"], extra_o),
            work / "ours" / "ours", work / "ours.log", threads, args.budget * OVERRUN,
        )  # fmt: skip
        timm = Side(
            "timm",
            timm_command(args.anchor, timm_data, work / "timm", "timm", info, epochs["timm"], extra_t),
            work / "timm" / "timm", work / "timm.log", threads, args.budget * OVERRUN,
        )  # fmt: skip
        load0 = os.getloadavg()
        print(f"running {'both at once' if args.concurrent else 'timm, then ours'} ...", flush=True)
        run_sides([timm, ours], args.concurrent)
        load1 = os.getloadavg()
        for s in (timm, ours):
            if not s.rows:
                raise _fail(s, "finished no epoch")
            print(f"{s.name}: {len(s.rows)} epochs, {s.wall:.0f} s wall", flush=True)
        ours_epochs, targs = ours_test_timeline(ours, args.data, test)
        fin = ours_final(ours, test, targs)
        text = report(args, info, est, timm, ours, ours_epochs, fin, targs, load0, load1,
                      threads, epochs)  # fmt: skip
    finally:
        if tmp:
            tmp.cleanup()
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    return text


def main(argv=None) -> str:
    with cli_errors("bench_vs_timm.py"):
        args = parse_args(build_parser(), argv)
        return run(args)


if __name__ == "__main__":
    main()
