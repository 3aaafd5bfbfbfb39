"""Reliability (issue 9): crash-safe resume, safe checkpoint loading, numerics, bad inputs.

Everything runs the real CLIs in child processes (`python script.py ...`), so a traceback would
show on stderr. The bad-input battery is one table, (id, command builder, expected substring),
whose rows all run first (forked from one process that imported torch once, see ZYGOTE), then
each row is checked on its own: exit code, one stderr line naming the file/flag and the fix, no
traceback, no partial output. Also: SIGKILL/SIGINT mid-epoch + --resume equal an uninterrupted
run bitwise, streaming from disk under a tiny RAM budget, and source audits (one safe loader,
atomic writes).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_patterns, write_idx
from PIL import Image

import models

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "smallnet_s", "--batch-size", "16", "--threads", "1", "--quiet"]


def cli(script: str, *args, env: dict | None = None, timeout: float = 300, cwd=None):
    """Run `python script.py args...` from the repo; CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def child_env(tmp: Path, **extra) -> dict:
    """Environment for a child: its own decode cache, one BLAS thread, no stray config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGCLS_")}
    env.update(IMGCLS_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------
# Tiny data and checkpoints


def write_png(path: Path, a: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path)
    return path


def make_folder(root: Path, classes=("a", "b", "c"), per_class=6, size=16, seed=0) -> Path:
    """root/<class>/*.png: grey pattern images (bar height = class)."""
    x, y = make_patterns(per_class * len(classes), len(classes), size, seed)
    for i, (img, c) in enumerate(zip(x, y)):
        write_png(root / classes[c] / f"{classes[c]}{i:03d}.png", img)
    return root


def make_csv(root: Path, header: str, rows: list[str], n_images: int = 6) -> Path:
    """root/images/im{i}.png + root/train.csv with the given header and rows."""
    x, _ = make_patterns(n_images, 3, 16)
    for i in range(n_images):
        write_png(root / "images" / f"im{i}.png", x[i])
    (root / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def ckpt_meta(
    arch="smallnet_s", val_hash="0123456789abcdef", aug="flip,crop", data=None, classes=None
) -> dict:
    classes = classes or [str(k) for k in range(10)]  # as the IDX sets below: classes 0..9
    return {
        "arch": arch,
        "num_classes": len(classes),
        "in_chans": 1,
        "img_size": [16, 16],
        "classes": classes,
        "multi_label": False,
        "mean": [0.2],
        "std": [0.3],
        "split": {"seed": 0, "val_ratio": 0.1, "val_hash": val_hash},
        "args": {"aug": aug, "data": str(data) if data else None},
        "task": "classify",
    }


def save_ckpt(path: Path, **meta_kw) -> Path:
    torch.manual_seed(0)
    meta = ckpt_meta(**meta_kw)
    model = models.create_model(meta["arch"], meta["num_classes"], in_chans=1, img_size=(16, 16))
    models.save_checkpoint(path, model, meta)
    return path


class Evil:
    """Unpickling this creates `marker` (builtins.open(marker, "w")): code run on load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_malicious_payload_is_live(tmp_path):
    """The battery's pickle really runs code when loaded unsafely (so its refusal means something)."""
    marker = tmp_path / "ran"
    path = evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)  # what the toolkit must never do
    assert marker.exists()


def evil_checkpoint(path: Path, marker: Path, zip_format: bool = True) -> Path:
    """A .pt whose loading with weights_only=False would run code (create `marker`)."""
    obj = {"format": 1, "arch": "smallnet_s", "state_dict": {"w": Evil(marker)}}
    if zip_format:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


# ---------------------------------------------------------------------------
# The bad-input battery


@dataclass
class Case:
    """What one row runs: argv of a script, files that must not exist after it, exit code."""

    script: str
    args: list
    absent: list = field(default_factory=list)
    code: int = 2
    env: dict = field(default_factory=dict)
    present: list = field(default_factory=list)
    unchanged: list = field(default_factory=list)  # files/dirs byte-identical after the row
    loads: list = field(default_factory=list)  # checkpoints that must load after the row
    expect: str | None = None  # overrides the table's expected substring (built at run time)
    skip: str | None = None  # reason this row cannot run here


class Workspace:
    """Shared inputs of the battery, built once; rows add their own small variants."""

    def __init__(self, root: Path):
        self.root = root
        self.idx = root / "idx"
        x, y = make_patterns(150, 3, 16)
        write_idx(self.idx, "train", x[:120], y[:120])
        write_idx(self.idx, "t10k", x[120:], y[120:])
        self.folder = make_folder(root / "folder")
        self.ckpt = save_ckpt(root / "ck" / "a.pt", data=self.idx)
        self.ckpt_big = save_ckpt(root / "ck" / "big.pt", arch="smallnet", data=self.idx)
        self.ckpt_split = save_ckpt(root / "ck" / "other_split.pt", val_hash="f" * 16)
        self.marker = root / "PWNED"
        self.evil = evil_checkpoint(root / "ck" / "evil.pt", self.marker)
        self.evil_raw = evil_checkpoint(root / "ck" / "evil_raw.pt", self.marker, zip_format=False)
        self.blocker = root / "a_file"  # a regular file: nothing can be created below it
        self.blocker.write_text("not a directory\n")
        self.finished = root / "runs"
        (self.finished / "done").mkdir(parents=True)
        (self.finished / "done" / "summary.json").write_text("{}\n")
        self.prep = root / "prep"  # outputs of PREP (real runs), made before the rows are built
        self.full: Path | None = None  # a full file system (tmpfs), see full_fs()
        self.holders: list[subprocess.Popen] = []

    def full_fs(self) -> Path | None:
        """A 256 KiB tmpfs (root only), filled to the last byte after the rows are built."""
        if self.full is None and os.geteuid() == 0:
            d = self.root / "full_fs"
            d.mkdir()
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                               capture_output=True)  # fmt: skip
            self.full = d if r.returncode == 0 else None
        return self.full

    def fill(self) -> None:
        if self.full is None:
            return
        fd = os.open(self.full / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * 4096):
                    pass
        finally:
            os.close(fd)

    def holder(self) -> int:
        """The pid of a live process (another command holding a lock)."""
        self.holders.append(subprocess.Popen(["sleep", "600"]))
        return self.holders[-1].pid

    def close(self) -> None:
        for h in self.holders:
            h.kill()
            h.wait()
        if self.full is not None:
            subprocess.run(["umount", "-l", str(self.full)], check=False)

    def dir(self, name: str) -> Path:
        return self.root / "cases" / name

    def out(self, name: str) -> Path:
        return self.root / "out" / name


def malicious(case: Case, ws: Workspace) -> Case:
    """A row fed the malicious pickle: its payload must not have run."""
    case.absent.append(ws.marker)
    return case


def train_case(data: Path, ws: Workspace, name: str, *extra, code: int = 2) -> Case:
    """train.py on `data` for one epoch; its run dir must not appear on failure."""
    out = ws.out(name)
    args = ["--data", data, "--out", out, "--name", "r", "--epochs", "1", *FAST, *extra]
    return Case("train.py", args, [out / "r"] if code else [], code)


def data_case(data: Path, ws: Workspace, name: str, *extra, code: int = 2) -> Case:
    """data.py (load + EDA) on `data`, writing a grid PNG only on success."""
    grid = ws.out(name + ".png")
    return Case("data.py", ["--data", data, "--grid", grid, *extra], [grid] if code else [], code)


def _missing(ws):
    return train_case(ws.root / "no_such_data", ws, "missing")


def _empty(ws):
    d = ws.dir("empty")
    d.mkdir(parents=True)
    return train_case(d, ws, "empty")


def _one_class(ws):
    return train_case(make_folder(ws.dir("one"), classes=("only",)), ws, "one")


def _csv_no_label(ws):
    d = make_csv(ws.dir("csv_nolabel"), "file,comment", [f"im{i}.png,x" for i in range(6)])
    return train_case(d, ws, "csv_nolabel")


def _csv_extra_columns(ws):
    rows = [f"im{i}.png,{'abc'[i % 3]},{i * 7},note {i}" for i in range(6)]
    d = make_csv(ws.dir("csv_extra"), "file,label,width_px,notes", rows)
    return data_case(d, ws, "csv_extra", code=0)


def _csv_unknown_label(ws):
    d = make_csv(
        ws.dir("csv_badlabel"), "file,label", [f"im{i}.png,{'abz'[i % 3]}" for i in range(6)]
    )
    (d / "classes.txt").write_text("a\nb\nc\n")
    return train_case(d, ws, "csv_badlabel")


def _csv_duplicate_ids(ws):
    rows = [f"im{i % 5}.png,{'abc'[i % 3]}" for i in range(6)]  # im0.png twice
    return train_case(make_csv(ws.dir("csv_dup"), "file,label", rows), ws, "csv_dup")


def _relabel_unknown_class(ws):
    f = ws.dir("relabel") / "fix.csv"
    f.parent.mkdir(parents=True)
    f.write_text("id,new_label\n5,zebra\n")
    return train_case(ws.idx, ws, "relabel", "--relabel", f)


def _not_an_image(ws):
    d = make_folder(ws.dir("notimg"))
    (d / "a" / "fake.png").write_text("this is text, not a PNG\n")
    return train_case(d, ws, "notimg")


def _stray_text_file(ws):
    d = make_folder(ws.dir("stray"))
    (d / "a" / "README.txt").write_text("notes about the data\n")
    (d / "b" / ".DS_Store").write_bytes(b"\0\1\2")
    return data_case(d, ws, "stray", code=0)


def _truncated_png(ws):
    d = make_folder(ws.dir("trunc_png"))
    x, _ = make_patterns(1, 3, 16, seed=9)
    p = write_png(d / "b" / "cut.png", x[0])
    p.write_bytes(p.read_bytes()[:-40])
    return train_case(d, ws, "trunc_png")


def _truncated_jpeg(ws):
    d = make_folder(ws.dir("trunc_jpg"))
    x, _ = make_patterns(1, 3, 16, seed=9)
    p = d / "c" / "cut.jpg"
    Image.fromarray(x[0]).save(p, quality=95)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return train_case(d, ws, "trunc_jpg")


def _odd_modes(ws):
    d = make_folder(ws.dir("modes"))
    write_png(d / "a" / "deep16.png", np.full((16, 16), 40000, np.uint16))
    x, _ = make_patterns(3, 3, 16, seed=5)
    Image.fromarray(x[0]).convert("P").save(d / "b" / "palette.png")
    rgba = np.stack([x[1]] * 3 + [np.full((16, 16), 255, np.uint8)], -1)
    write_png(d / "c" / "alpha.png", rgba, "RGBA")
    return train_case(d, ws, "modes", code=0)


def _mixed_sizes(ws):
    d = make_folder(ws.dir("sizes"))
    write_png(d / "a" / "big.png", np.zeros((20, 24), np.uint8))
    return train_case(d, ws, "sizes")


def _unknown_model(ws):
    return train_case(ws.idx, ws, "model", "--model", "resnet18x")


def _bad_config(ws):
    cfg = ws.dir("cfg") / "bad.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('{"epochs": 2,,}')
    return train_case(ws.idx, ws, "cfg", "--config", cfg)


def _resume_nothing(ws):
    return train_case(ws.idx, ws, "resume", "--resume")


def _finished_run(ws):
    args = ["--data", ws.idx, "--out", ws.finished, "--name", "done", "--epochs", "1", *FAST]
    return Case("train.py", args, [ws.finished / "done" / "metrics.jsonl"])


def _out_under_file(ws):
    args = ["--data", ws.idx, "--out", ws.blocker / "sub", "--name", "r", "--epochs", "1", *FAST]
    return Case("train.py", args, [ws.blocker / "sub"])


def _eval_only_evil(ws):
    return malicious(
        Case("train.py", ["--data", ws.idx, "--eval-only", ws.evil, "--threads", "1"]), ws
    )


def _weights_evil(ws):
    return malicious(train_case(ws.idx, ws, "w_evil", "--weights", ws.evil), ws)


def _finetune_evil(ws):
    out = ws.out("ft_evil")
    args = ["--data", ws.idx, "--weights", ws.evil, "--out", out, "--name", "f", "--i", "1", *FAST]
    return malicious(Case("finetune.py", args, [out]), ws)


def _finetune_grid(ws):
    out = ws.out("ft_grid")
    args = ["--data", ws.idx, "--weights", ws.ckpt, "--out", out, "--i", "72", *FAST]
    return Case("finetune.py", args, [out])


def _soup_evil(ws):
    out = ws.out("soup_evil")
    return malicious(
        Case("soup.py", ["--ingredients", ws.ckpt, ws.evil, "--uniform", "--out", out], [out]), ws
    )


def _soup_archs(ws):
    out = ws.out("soup_arch")
    args = ["--ingredients", ws.ckpt, ws.ckpt_big, "--uniform", "--out", out]
    return Case("soup.py", args, [out])


def _soup_splits(ws):
    out = ws.out("soup_split")
    args = ["--ingredients", ws.ckpt, ws.ckpt_split, "--uniform", "--out", out]
    return Case("soup.py", args, [out])


def _infer_evil(ws):
    out = ws.out("evil.csv")
    return malicious(Case("infer.py", [ws.evil, "--data", ws.idx, "--out", out], [out]), ws)


def _infer_evil_raw_pickle(ws):
    out = ws.out("evil_raw.csv")
    return malicious(Case("infer.py", [ws.evil_raw, "--data", ws.idx, "--out", out], [out]), ws)


def _infer_plain_state_dict(ws):
    sd = ws.dir("plain") / "weights.pt"
    sd.parent.mkdir(parents=True)
    torch.save(models.create_model("smallnet_s", 3, img_size=(16, 16)).state_dict(), sd)
    out = ws.out("plain.csv")
    return Case("infer.py", [sd, "--data", ws.idx, "--out", out], [out])


def _infer_truncated_ckpt(ws):
    p = ws.dir("cut") / "cut.pt"
    p.parent.mkdir(parents=True)
    p.write_bytes(ws.ckpt.read_bytes()[:5000])
    out = ws.out("cut.csv")
    return Case("infer.py", [p, "--data", ws.idx, "--out", out], [out])


def _infer_rot90(ws):
    out = ws.out("rot.csv")
    return Case("infer.py", [ws.ckpt, "--data", ws.idx, "--tta", "rot90", "--out", out], [out])


def _infer_out_under_file(ws):
    out = ws.blocker / "sub.csv"
    return Case("infer.py", [ws.ckpt, "--data", ws.idx, "--threads", "1", "--out", out], [out])


def _resume_evil(ws):
    return malicious(train_case(ws.idx, ws, "resume_evil", "--resume", ws.evil), ws)


def _linear_eval_evil(ws):
    out = ws.out("lin_evil")
    args = ["--data", ws.idx, "--linear-eval", ws.evil, "--out", out, "--threads", "1"]
    return malicious(Case("train.py", args, [out]), ws)


def _weights_safetensors(ws):
    from safetensors.torch import save_file

    f = ws.dir("st") / "start.safetensors"
    f.parent.mkdir(parents=True)
    save_file(models.create_model("smallnet_s", 3, img_size=(16, 16)).state_dict(), str(f))
    case = train_case(ws.idx, ws, "st", "--weights", f, code=0)
    case.present = [ws.out("st") / "r" / "best.pt"]
    return case


def _weights_garbage_safetensors(ws):
    f = ws.dir("st_bad") / "start.safetensors"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    out = ws.out("ft_st_bad")
    args = ["--data", ws.idx, "--weights", f, "--out", out, "--name", "f", "--i", "1", *FAST]
    return Case("finetune.py", args, [out])


def _amp_fp16_on_cpu(ws):
    case = train_case(ws.idx, ws, "fp16", "--amp", "fp16", "--device", "cpu", code=0)
    case.present = [ws.out("fp16") / "r" / "summary.json"]
    return case


def _diverges(ws):
    # lr x 1e12 from the second epoch on (step schedule): epoch 1 is good and saved
    case = train_case(
        ws.idx, ws, "nan", "--epochs", "2", "--sched", "step", "--milestones", "0.5",
        "--gamma", "1e12", "--aug", "none", code=1,
    )  # fmt: skip
    run = ws.out("nan") / "r"
    case.absent, case.present = [run / "summary.json"], [run / "last.pt", run / "best.pt"]
    return case


def _finetune_out_under_file(ws):
    args = ["--data", ws.idx, "--weights", ws.ckpt, "--out", ws.blocker / "x", "--i", "1", *FAST]
    return Case("finetune.py", args, [ws.blocker / "x"])


def _soup_out_under_file(ws):
    out = ws.blocker / "soup"
    args = ["--ingredients", ws.ckpt, ws.ckpt, "--uniform", "--holdout", ws.idx, "--out", out]
    return Case("soup.py", [*args, "--threads", "1"], [out])


def _data_grid_under_file(ws):
    out = ws.blocker / "grid.png"
    return Case("data.py", ["--data", ws.idx, "--grid", out], [out])


def _vote_out_under_file(ws):
    d = ws.dir("vote_out")
    a, b = _probs(d, "a", ["1", "2"], 3), _probs(d, "b", ["1", "2"], 3)
    return Case("vote.py", [a, b, "--out", ws.blocker / "v.csv"], [ws.blocker / "v.csv"])


def _synth_out_under_file(ws):
    out = ws.blocker / "synth"
    return Case("synth.py", ["--num-images", "2", "--output-dir", out], [out])


TINY_RAM = {"IMGCLS_MAX_RAM_GB": "1e-6"}  # ~1 KB: every image set "does not fit"


def _stream_train(ws):
    case = train_case(ws.folder, ws, "stream", code=0)
    case.env, case.present = TINY_RAM, [ws.out("stream") / "r" / "best.pt"]
    return case


def _stream_data(ws):
    case = data_case(ws.folder, ws, "stream_eda", code=0)
    case.env, case.present = TINY_RAM, case.absent
    case.absent = []
    return case


def _stream_infer(ws):
    out = ws.out("stream.csv")
    args = [ws.ckpt, "--data", ws.folder, "--threads", "1", "--out", out]
    return Case("infer.py", args, code=0, env=TINY_RAM, present=[out])


def _probs(d: Path, name: str, ids: list[str], k: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = np.full((len(ids), k), 1.0 / k, np.float32)
    np.save(d / f"{name}.npy", p)
    (d / f"{name}.ids.txt").write_text("".join(i + "\n" for i in ids))
    (d / f"{name}.meta.json").write_text('{"multi_label": false}')  # vote.py never guesses
    return d / f"{name}.npy"


def _vote_ids(ws):
    d = ws.dir("vote_ids")
    a, b = _probs(d, "a", ["1", "2", "3"], 3), _probs(d, "b", ["1", "2", "4"], 3)
    return Case("vote.py", [a, b, "--out", d / "vote.csv"], [d / "vote.csv"])


def _vote_shapes(ws):
    d = ws.dir("vote_shapes")
    a, b = _probs(d, "a", ["1", "2", "3"], 3), _probs(d, "b", ["1", "2", "3"], 4)
    return Case("vote.py", [a, b, "--out", d / "vote.csv"], [d / "vote.csv"])


def _vote_weights(ws):
    d = ws.dir("vote_w")
    a, b = _probs(d, "a", ["1", "2"], 3), _probs(d, "b", ["1", "2"], 3)
    return Case("vote.py", [a, b, "--weights", "1,2,3", "--out", d / "v.csv"], [d / "v.csv"])


def _vote_duplicate_ids(ws):
    d = ws.dir("vote_dup")
    d.mkdir(parents=True)
    (d / "a.csv").write_text("id,label\n1,cat\n2,dog\n1,dog\n")
    (d / "b.csv").write_text("id,label\n1,cat\n2,dog\n3,dog\n")
    return Case("vote.py", [d / "a.csv", d / "b.csv", "--out", d / "v.csv"], [d / "v.csv"])


def _synth_bad_mnist(ws):
    d = ws.dir("synth")
    d.mkdir(parents=True)
    (d / "letters.csv").write_text("id,digit,letter\n1,5,A\n")
    out = ws.out("synth")
    args = ["--mode", "dirty", "--mnist-data", d / "letters.csv", "--output-dir", out]
    return Case("synth.py", [*args, "--num-images", "2"], [out])


# ---------------------------------------------------------------------------
# Issue 12: the guarantees by design. Rows by class (1..12 of the issue); each failed on ef59d5d.

PREP_NEEDED: set[str] = set()  # ids of rows that use PREP outputs (real finished runs)


def needs_prep(build):
    PREP_NEEDED.add(build.__name__)
    return build


PREP_FLAGS = ["--epochs", "1", *FAST, "--amp", "none", "--aug", "none", "--opt", "sgd"]


def prep_cases(ws: Workspace) -> dict[str, Case]:
    """Real runs the rows start from: a finished 1-epoch run, a decode cache of `idx_names`."""
    ws.idx_names = ws.root / "idx_names"
    shutil.copytree(ws.idx, ws.idx_names)
    args = ["--data", ws.idx, "--out", ws.prep, "--name", "done", *PREP_FLAGS]
    return {
        "prep-run": Case("train.py", args, code=0),
        "prep-cache": Case("data.py", ["--data", ws.idx_names], code=0),
        "prep-letters": Case(
            "synth.py",
            [
                "--mode",
                "letters",
                "--num-images",
                "26",
                "--num-test",
                "26",
                "--img-size",
                "16",
                "--output-dir",
                ws.prep / "letters",
                "--quiet",
            ],
            code=0,
        ),  # fmt: skip
    }


def copy_run(ws: Workspace, name: str, interrupted: bool = False) -> Path:
    """A copy of the prepared finished run as ws.out(name)/r (without summary.json: interrupted
    after its last epoch was saved, before the summary)."""
    run = ws.out(name) / "r"
    shutil.copytree(ws.prep / "done", run)
    if interrupted:
        (run / "summary.json").unlink()
    return run


# 1. Numbers are range-checked by the flag types, before anything is created -----------------

NUMERIC = [
    ("train.py", "--batch-size", "0"), ("train.py", "--eval-batch-size", "-1"),
    ("train.py", "--epochs", "0"), ("train.py", "--accum-steps", "0"), ("train.py", "--lr", "nan"),
    ("train.py", "--lr", "-0.1"), ("train.py", "--momentum", "inf"),
    ("train.py", "--weight-decay", "-1"), ("train.py", "--clip-grad", "-1"),
    ("train.py", "--threads", "0"), ("train.py", "--split-seed", "-1"), ("train.py", "--pad", "-1"),
    ("train.py", "--warmup-epochs", "nan"), ("train.py", "--ema", "1.5"),
    ("train.py", "--mix-alpha", "0"), ("train.py", "--labels-per-class", "0"),
    ("train.py", "--milestones", "0.5,abc"), ("train.py", "--drop", "1.5"),
    ("finetune.py", "--epochs", "0"), ("finetune.py", "--lr", "inf"),
    ("finetune.py", "--batch-size", "-4"), ("soup.py", "--threads", "-1"),
    ("infer.py", "--eval-batch-size", "0"), ("infer.py", "--threads", "0"),
    ("vote.py", "--iters", "-1"), ("vote.py", "--init-sorted", "0"), ("vote.py", "--mode", "avg"),
    ("data.py", "--split-seed", "nan"), ("data.py", "--split-seed", "-1"),
    ("data.py", "--in-chans", "2"),
]  # fmt: skip


def _numeric(script: str, flag: str, value: str):
    def build(ws: Workspace) -> Case:
        name = f"num_{script[:-3]}_{flag[2:]}_{value}"
        out = ws.out(name)
        if script == "train.py":
            extra = ["--mix", "cutmix"] if flag == "--mix-alpha" else []
            extra += ["--sched", "step"] if flag == "--milestones" else []
            return train_case(ws.idx, ws, name, *extra, flag, value)
        if script == "finetune.py":
            args = ["--data", ws.idx, "--weights", ws.ckpt, "--out", out, "--i", "1", *FAST]
        elif script == "soup.py":
            args = ["--ingredients", ws.ckpt, ws.ckpt, "--uniform", "--out", out]
        elif script == "infer.py":
            tta = ["--tta", "scale"] if flag == "--scale" else []
            tta = ["--tta", "shift"] if flag == "--shift-px" else tta
            tta = ["--tta", "five-crop"] if flag == "--crop-ratio" else tta
            args = [ws.ckpt, "--data", ws.idx, *tta, "--out", out / "s.csv"]
        elif script == "vote.py":
            d = ws.dir(name)
            a, b = _probs(d, "a", ["1", "2"], 3), _probs(d, "b", ["1", "2"], 3)
            args = [a, b, "--out", out / "v.csv"]
        elif script == "synth.py":
            args = ["--num-images", "2", "--output-dir", out]
        else:
            args = ["--data", ws.idx, "--grid", out / "g.png"]
        return Case(script, [*args, flag, value], [out])

    build.__name__ = f"_num_{script}_{flag}_{value}"
    return build


def _config_value_checked(ws):
    cfg = ws.dir("cfg_lr") / "c.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('{"lr": -1, "epochs": 1}')
    return train_case(ws.idx, ws, "cfg_lr", "--config", cfg)


def _eval_only_with_linear_eval(ws):
    out = ws.out("ev_lin")
    args = ["--data", ws.idx, "--eval-only", ws.ckpt, "--linear-eval", ws.ckpt, "--out", out]
    return Case("train.py", [*args, "--threads", "1"], [out])


def _resume_with_overwrite(ws):
    return train_case(ws.idx, ws, "res_ow", "--resume", "--overwrite")


# 2. Validation before side effects; --overwrite replaces only at the commit -----------------


@needs_prep
def _overwrite_bad_data(ws):
    run = copy_run(ws, "ow_data")
    args = ["--data", ws.root / "typo_data", "--out", run.parent, "--name", "r", "--epochs", "1"]
    return Case("train.py", [*args, *FAST, "--overwrite"], unchanged=[run.parent])


@needs_prep
def _overwrite_bad_aug(ws):
    run = copy_run(ws, "ow_aug")
    args = ["--data", ws.idx, "--out", run.parent, "--name", "r", "--epochs", "1", *FAST]
    return Case("train.py", [*args, "--aug", "flip,flipp", "--overwrite"], unchanged=[run.parent])


def _unknown_aug_no_run_dir(ws):
    case = train_case(ws.idx, ws, "aug_typo", "--aug", "flip,flipp")
    case.absent = [ws.out("aug_typo")]  # not even args.json
    return case


def _old_file(path: Path, text: str = "old output\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _infer_confusion_fails(ws):
    sub = _old_file(ws.out("conf") / "sub.csv")
    args = [ws.ckpt, "--data", ws.idx, "--threads", "1", "--out", sub]
    return Case("infer.py", [*args, "--confusion", ws.blocker / "c.png"], unchanged=[sub.parent])


def _infer_probs_fail(ws):
    sub = _old_file(ws.out("probs_dir") / "p.csv")
    (sub.parent / "p.npy").mkdir()  # where --return-probs would go
    args = [ws.ckpt, "--data", ws.idx, "--threads", "1", "--out", sub, "--return-probs"]
    return Case("infer.py", args, unchanged=[sub.parent])


def _fake_soup(ws: Workspace, d: Path) -> Path:
    """A finished soup directory (its files only need to be there)."""
    _old_file(d / "summary.json", "{}\n")
    shutil.copy(ws.ckpt, d / "uniform_soup.pt")
    return d


def _soup_plot_fails(ws):
    d = ws.out("soup_plot") / "soup"
    d.mkdir(parents=True)
    (d / "soup.png").mkdir()  # the plot cannot be written
    args = ["--ingredients", ws.ckpt, ws.ckpt, "--uniform", "--plot", "--out", d, "--threads", "1"]
    return Case("soup.py", [*args, "--holdout", ws.idx], [d / "uniform_soup.pt"], unchanged=[d])


def _infer_out_is_dir(ws):
    d = ws.out("infer_dir") / "sub.csv"
    (d / "keep").mkdir(parents=True)
    return Case("infer.py", [ws.ckpt, "--data", ws.idx, "--out", d], unchanged=[d])


def _vote_out_is_dir(ws):
    d = ws.dir("vote_dir")
    a, b = _probs(d, "a", ["1", "2"], 3), _probs(d, "b", ["1", "2"], 3)
    (d / "v.csv" / "keep").mkdir(parents=True)
    return Case("vote.py", [a, b, "--out", d / "v.csv"], unchanged=[d / "v.csv"])


def _grid_is_dir(ws):
    g = ws.out("grid_dir") / "g.png"
    (g / "keep").mkdir(parents=True)
    return Case("data.py", ["--data", ws.idx, "--grid", g], unchanged=[g])


def _full(ws: Workspace, name: str) -> tuple[Path, str | None]:
    fs = ws.full_fs()
    if fs is None:
        return ws.out(name), "needs root to mount a small tmpfs (a full disk)"
    return fs / name, None


def _full_infer(ws):
    d, skip = _full(ws, "infer")
    sub = _old_file(d / "sub.csv")
    args = [ws.ckpt, "--data", ws.idx, "--threads", "1", "--out", sub, "--return-probs"]
    return Case("infer.py", args, unchanged=[d], skip=skip)


def _full_vote(ws):
    d, skip = _full(ws, "vote")
    a, b = (
        _probs(ws.dir("vote_full"), "a", ["1", "2"], 3),
        _probs(ws.dir("vote_full"), "b", ["1", "2"], 3),
    )
    out = _old_file(d / "v.csv")
    return Case("vote.py", [a, b, "--out", out], unchanged=[d], skip=skip)


def _full_train(ws):
    d, skip = _full(ws, "train")
    d.mkdir(parents=True, exist_ok=True)
    args = ["--data", ws.idx, "--out", d, "--name", "r", "--epochs", "1", *FAST]
    return Case("train.py", args, [d / "r"], skip=skip)


def _full_soup(ws):
    d, skip = _full(ws, "soup")
    args = ["--ingredients", ws.ckpt, ws.ckpt, "--uniform", "--out", d, "--threads", "1"]
    return Case("soup.py", args, [d / "uniform_soup.pt"], skip=skip)


def _full_synth(ws):
    d, skip = _full(ws, "synth")
    args = ["--num-images", "20", "--num-test", "4", "--output-dir", d, "--quiet"]
    return Case("synth.py", args, [d / "synth.json"], skip=skip)


# 4. Outputs never land on inputs ------------------------------------------------------------


@needs_prep
def _infer_out_onto_synth_test_labels(ws):
    """The issue's example: `infer.py --out DATA/test/labels.csv` (synth.py's layout)."""
    d = ws.dir("letters_onto")
    shutil.copytree(ws.prep / "letters", d)
    labels = d / "test" / "labels.csv"
    return Case("infer.py", [ws.ckpt, "--data", d, "--out", labels], unchanged=[d])


def _infer_out_onto_test_csv(ws):
    d = make_csv(ws.dir("csv_onto"), "file,label", [f"im{i}.png,{'abc'[i % 3]}" for i in range(6)])
    (d / "test.csv").write_text((d / "train.csv").read_text())
    ck = save_ckpt(d.parent / "csv_onto.pt", classes=["a", "b", "c"])
    return Case("infer.py", [ck, "--data", d, "--out", d / "test.csv"], unchanged=[d])


def _soup_ingredient_is_an_output(ws):
    d = _fake_soup(ws, ws.out("soup_onto_out") / "soup")
    shutil.copy(ws.prep / "done" / "best.pt", d / "uniform_soup.pt")  # a real ingredient
    args = ["--ingredients", d / "uniform_soup.pt", ws.prep / "done" / "best.pt", "--uniform"]
    return Case("soup.py", [*args, "--out", d, "--overwrite"], unchanged=[d])


def _vote_out_onto_input(ws):
    d = ws.dir("vote_onto")
    d.mkdir(parents=True)
    (d / "a.csv").write_text("id,label\n1,cat\n2,dog\n")
    (d / "b.csv").write_text("id,label\n1,cat\n2,cat\n")
    return Case("vote.py", [d / "a.csv", d / "b.csv", "--out", d / "a.csv"], unchanged=[d])


def _vote_out_onto_labels(ws):
    d = ws.dir("vote_onto_labels")
    d.mkdir(parents=True)
    (d / "a.csv").write_text("id,label\n1,cat\n2,dog\n")
    (d / "b.csv").write_text("id,label\n1,cat\n2,cat\n")
    (d / "truth.csv").write_text("id,label\n1,cat\n2,dog\n")
    args = [d / "a.csv", d / "b.csv", "--labels", d / "truth.csv", "--out", d / "truth.csv"]
    return Case("vote.py", args, unchanged=[d])


@needs_prep
def _soup_out_holds_ingredients(ws):
    """Ingredients and the config inside --out survive --overwrite (only soup's own files go)."""
    d = _fake_soup(ws, ws.out("soup_onto") / "soup")
    ing = ws.prep / "done" / "best.pt"
    a, b = shutil.copy(ing, d / "i1.pt"), shutil.copy(ing, d / "i2.pt")
    (d / "c.json").write_text('{"uniform": true}\n')
    args = ["--ingredients", a, b, "--config", d / "c.json", "--out", d, "--overwrite"]
    return Case("soup.py", args, code=0, present=[d / "uniform_soup.pt"],
                unchanged=[Path(a), Path(b), d / "c.json"])  # fmt: skip


@needs_prep
def _train_overwrite_holds_data(ws):
    run = copy_run(ws, "ow_holds")
    shutil.copytree(ws.idx, run / "data")
    args = ["--data", run / "data", "--out", run.parent, "--name", "r", "--epochs", "1", *FAST]
    return Case("train.py", [*args, "--overwrite"], unchanged=[run])


# 5. Resume refuses what it cannot continue ---------------------------------------------------


def _resume_changed(name: str, *changed):
    @needs_prep
    def build(ws):
        run = copy_run(ws, name, interrupted=True)
        args = ["--data", ws.idx, "--out", run.parent, "--name", "r", *PREP_FLAGS]
        return Case("train.py", [*args, *changed, "--resume"],
                    [run / "summary.json"], unchanged=[run])  # fmt: skip

    build.__name__ = f"_resume_{name}"
    return build


@needs_prep
def _resume_other_data(ws):
    run = copy_run(ws, "res_data", interrupted=True)
    other = ws.dir("other_data")
    x, y = make_patterns(150, 3, 16, seed=7)
    write_idx(other, "train", x[:120], y[:120])
    args = ["--data", other, "--out", run.parent, "--name", "r", *PREP_FLAGS]
    return Case("train.py", [*args, "--resume"],
                [run / "summary.json"], unchanged=[run])  # fmt: skip


@needs_prep
def _resume_from_best(ws):
    run = copy_run(ws, "res_best", interrupted=True)
    args = ["--data", ws.idx, "--out", ws.out("res_best2"), "--name", "r", "--epochs", "1", *FAST]
    return Case("train.py", [*args, "--resume", run / "best.pt"], [ws.out("res_best2") / "r"])


# 6. One command per output directory ---------------------------------------------------------


def _locked_train(ws):
    out = ws.out("lock_train")
    out.mkdir(parents=True)
    pid = ws.holder()
    (out / ".r.lock").write_text(f"{pid}\n")
    case = train_case(ws.idx, ws, "lock_train")
    case.expect = f"pid {pid}"
    return case


def _locked_soup(ws):
    d = ws.out("lock_soup") / "soup"
    d.parent.mkdir(parents=True)
    pid = ws.holder()
    (d.parent / ".soup.lock").write_text(f"{pid}\n")
    args = ["--ingredients", ws.ckpt, ws.ckpt, "--uniform", "--out", d]
    return Case("soup.py", args, [d], expect=f"pid {pid}")


def _locked_finetune(ws):
    out = ws.out("lock_ft")
    (out / "ft").mkdir(parents=True)
    pid = ws.holder()
    (out / "ft" / ".i1_s0.lock").write_text(f"{pid}\n")
    args = ["--data", ws.idx, "--weights", ws.ckpt, "--out", out, "--name", "ft", "--i", "1"]
    return Case("finetune.py", [*args, *FAST], [out / "ft" / "i1_s0"], expect=f"pid {pid}")


# 7. Labels and classes -----------------------------------------------------------------------


def _csv_nan_label(ws):
    rows = [f"im{i}.png,{'ab'[i % 2] if i != 3 else 'nan'}" for i in range(6)]
    return train_case(make_csv(ws.dir("csv_nan"), "file,label", rows), ws, "csv_nan")


def _csv_empty_label(ws):
    rows = [f"im{i}.png,{'ab'[i % 2] if i != 4 else ''}" for i in range(6)]
    return train_case(make_csv(ws.dir("csv_empty"), "file,label", rows), ws, "csv_empty")


def _csv_one_class(ws):
    rows = [f"im{i}.png,cat" for i in range(6)]
    return train_case(make_csv(ws.dir("csv_one"), "file,label", rows), ws, "csv_one")


def _idx_one_class(ws):
    x, _ = make_patterns(40, 3, 16)
    write_idx(ws.dir("idx_one"), "train", x, np.zeros(40, np.uint8))
    return train_case(ws.dir("idx_one"), ws, "idx_one")


@needs_prep
def _classes_txt_after_first_load(ws):
    (ws.idx_names / "classes.txt").write_text("zebra\nyak\nxerus\n")  # after prep-cache decoded it
    return Case("data.py", ["--data", ws.idx_names], code=0)


# 8. vote.py decides single/multi-label from explicit information -----------------------------


def _unsummed_probs(d: Path, name: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / f"{name}.npy", np.full((2, 3), 0.2, np.float32))  # rows sum to 0.6
    (d / f"{name}.ids.txt").write_text("1\n2\n")
    return d / f"{name}.npy"


def _vote_no_meta(ws):
    d = ws.dir("vote_nometa")
    a, b = _unsummed_probs(d, "a"), _unsummed_probs(d, "b")
    return Case("vote.py", [a, b, "--out", d / "v.csv"], [d / "v.csv"])


def _vote_no_meta_kind_single(ws):
    d = ws.dir("vote_kind")
    a, b = _unsummed_probs(d, "a"), _unsummed_probs(d, "b")
    return Case(
        "vote.py", [a, b, "--kind", "single", "--out", d / "v.csv"], code=0, present=[d / "v.csv"]
    )


# 9. Paths read from files are untrusted ------------------------------------------------------


def _synth_crafted_manifest(ws):
    d = ws.dir("synth_evil") / "out"
    d.mkdir(parents=True)
    victim = _old_file(ws.dir("synth_evil") / "victim.csv", "precious\n")
    part = {"csv": "../victim.csv", "split": "train", "index_offset": 0, "num_images": 1}
    (d / "synth.json").write_text(json.dumps({"format": "synth", "mode": "other", "parts": [part]}))
    args = ["--num-images", "2", "--output-dir", d, "--overwrite", "--quiet"]
    return Case("synth.py", args, unchanged=[victim])


def _csv_path_escapes(ws):
    write_png(ws.dir("csv_escape_outside") / "x.png", make_patterns(1, 3, 16)[0][0])
    rows = [f"im{i}.png,{'abc'[i % 3]}" for i in range(5)] + ["../../csv_escape_outside/x.png,a"]
    return train_case(make_csv(ws.dir("csv_escape"), "file,label", rows), ws, "csv_escape")


def _csv_absolute_path(ws):
    outside = write_png(ws.dir("csv_abs_outside") / "x.png", make_patterns(1, 3, 16)[0][0])
    rows = [f"im{i}.png,{'abc'[i % 3]}" for i in range(5)] + [f"{outside},a"]
    return train_case(make_csv(ws.dir("csv_abs"), "file,label", rows), ws, "csv_abs")


# ---------------------------------------------------------------------------
# 10. --sync-bn needs CUDA --------------------------------------------------------------------


def _sync_bn_cpu(ws):
    return train_case(ws.idx, ws, "syncbn", "--sync-bn", "--device", "cpu")


def _sync_bn_cpu_finetune(ws):
    out = ws.out("syncbn_ft")
    args = ["--data", ws.idx, "--weights", ws.ckpt, "--out", out, "--i", "1", *FAST]
    return Case("finetune.py", [*args, "--sync-bn", "--device", "cpu"], [out])


# 11. Messages name the real problem ----------------------------------------------------------


def _dir_as(script: str, flag: str | None):
    def build(ws):
        d = ws.dir(f"dir_{script}_{flag}")
        d.mkdir(parents=True)
        out = ws.out(f"dir_{script}_{flag}")
        if script == "train.py":
            return Case(script, ["--data", ws.idx, flag, d, "--out", out, *FAST], [out])
        if script == "infer.py":
            return Case(script, [d, "--data", ws.idx, "--out", out / "s.csv"], [out])
        if script == "soup.py":
            return Case(script, ["--ingredients", ws.ckpt, d, "--uniform", "--out", out], [out])
        if script == "vote.py":
            a = _probs(ws.dir(f"dir_vote_{flag}_in"), "a", ["1", "2"], 3)
            b = _probs(ws.dir(f"dir_vote_{flag}_in"), "b", ["1", "2"], 3)
            ins = [d, a] if flag == "files" else [a, b, flag, d]
            return Case(script, [*ins, "--out", out / "v.csv"], [out])
        if script == "synth.py":
            args = ["--mode", "dirty", flag, d, "--num-images", "2", "--output-dir", out]
            return Case(script, args, [out])
        args = ["--data", ws.idx, "--weights", d, "--out", out, "--i", "1", *FAST]
        return Case(script, args, [out])

    build.__name__ = f"_dir_{script}_{flag}"
    return build


def _nan_first_epoch(ws):
    case = train_case(ws.idx, ws, "nan1", "--lr", "1e12", "--warmup-epochs", "0",
                      "--sched", "constant", "--aug", "none", code=1)  # fmt: skip
    run = ws.out("nan1") / "r"
    case.absent = [run / "summary.json", run / "last.pt", run / "best.pt"]
    return case


def _run_all(name: str, **env):
    def build(ws):
        runs = ws.out(f"run_all_{name}")
        full = {"FAST": "1", "RUNS_DIR": str(runs), "PYTHON": sys.executable, **env}
        return Case("run_all.sh", [], [runs], env=full)

    build.__name__ = f"_run_all_{name}"
    return build


def _run_all_runs_dir_file(ws):
    return Case("run_all.sh", [], [], env={"FAST": "1", "RUNS_DIR": str(ws.blocker), "PYTHON": sys.executable},
                unchanged=[ws.blocker])  # fmt: skip


# 12. A finished output is verified before it is skipped --------------------------------------


def _skip_existing_truncated(ws):
    out = ws.out("skip_trunc")
    ing = out / "ft" / "i1_s0"
    ing.mkdir(parents=True)
    (ing / "best.pt").write_bytes(ws.ckpt.read_bytes()[:3000])
    (ing / "summary.json").write_text("{}\n")
    args = ["--data", ws.idx, "--weights", ws.ckpt, "--out", out, "--name", "ft", "--i", "1"]
    return Case("finetune.py", [*args, "--epochs", "1", *FAST, "--skip-existing"], code=0,
                present=[ing / "summary.json"], loads=[ing / "best.pt"])  # fmt: skip


NEW_CASES: list[tuple[str, Callable[[Workspace], Case], str]] = [
    *[(f"num-{s[:-3]}{f}={v}", _numeric(s, f, v), f) for s, f, v in NUMERIC],
    ("config-value-range-checked", _config_value_checked, "'lr'"),
    ("eval-only-with-linear-eval", _eval_only_with_linear_eval, "--eval-only and --linear-eval"),
    ("resume-with-overwrite", _resume_with_overwrite, "--resume and --overwrite"),
    ("overwrite-typo-in-data-keeps-run", _overwrite_bad_data, "typo_data"),
    ("overwrite-unknown-aug-keeps-run", _overwrite_bad_aug, "flipp"),
    ("unknown-aug-writes-no-run-dir", _unknown_aug_no_run_dir, "flipp"),
    ("infer-confusion-fails-nothing-written", _infer_confusion_fails, "a_file"),
    ("infer-probs-fail-nothing-written", _infer_probs_fail, "p.npy"),
    ("soup-plot-fails-nothing-written", _soup_plot_fails, "soup.png"),
    ("infer-out-is-a-directory", _infer_out_is_dir, "is a directory"),
    ("vote-out-is-a-directory", _vote_out_is_dir, "is a directory"),
    ("data-grid-is-a-directory", _grid_is_dir, "is a directory"),
    ("full-disk-infer", _full_infer, "free space"),
    ("full-disk-vote", _full_vote, "free space"),
    ("full-disk-train", _full_train, "free space"),
    ("full-disk-soup", _full_soup, "free space"),
    ("full-disk-synth", _full_synth, "free space"),
    ("infer-out-onto-test-csv", _infer_out_onto_test_csv, "--out"),
    ("infer-out-onto-synth-test-labels", _infer_out_onto_synth_test_labels, "--out"),
    ("soup-ingredient-is-an-output", _soup_ingredient_is_an_output, "--ingredients"),
    ("vote-out-onto-input", _vote_out_onto_input, "--out"),
    ("vote-out-onto-labels", _vote_out_onto_labels, "--labels"),
    ("soup-out-holds-inputs-ok", _soup_out_holds_ingredients, "uniform"),
    ("train-overwrite-run-holds-data", _train_overwrite_holds_data, "data"),
    ("resume-changed-lr", _resume_changed("res_lr", "--lr", "0.05"), "--lr 0.05"),
    ("resume-changed-batch-size", _resume_changed("res_bs", "--batch-size", "8"), "--batch-size 8"),
    ("resume-changed-opt", _resume_changed("res_opt", "--opt", "adamw"), "--opt adamw"),
    ("resume-changed-amp", _resume_changed("res_amp", "--amp", "bf16"), "--amp bf16"),
    ("resume-changed-data", _resume_other_data, "the training data"),
    ("resume-from-best-pt", _resume_from_best, "no training state"),
    ("lock-train-second-command", _locked_train, ""),
    ("lock-soup-second-command", _locked_soup, ""),
    ("lock-finetune-second-command", _locked_finetune, ""),
    ("csv-nan-label", _csv_nan_label, "missing label"),
    ("csv-empty-label", _csv_empty_label, "empty label"),
    ("csv-one-class", _csv_one_class, "only one class"),
    ("idx-one-class", _idx_one_class, "only one class"),
    ("classes-txt-in-cache-key-ok", _classes_txt_after_first_load, "zebra"),
    ("vote-no-meta-refused", _vote_no_meta, "a.npy"),
    ("vote-no-meta-kind-single-ok", _vote_no_meta_kind_single, ""),
    ("synth-crafted-manifest", _synth_crafted_manifest, "victim.csv"),
    ("csv-path-escapes-data-root", _csv_path_escapes, "outside"),
    ("csv-absolute-path", _csv_absolute_path, "outside"),
    ("sync-bn-on-cpu", _sync_bn_cpu, "--sync-bn"),
    ("sync-bn-on-cpu-finetune", _sync_bn_cpu_finetune, "--sync-bn"),
    ("config-given-a-directory", _dir_as("train.py", "--config"), "is a directory"),
    ("soup-ingredient-is-a-directory", _dir_as("soup.py", None), "is a directory"),
    ("vote-input-is-a-directory", _dir_as("vote.py", "files"), "is a directory"),
    ("vote-labels-is-a-directory", _dir_as("vote.py", "--labels"), "is a directory"),
    ("relabel-is-a-directory", _dir_as("train.py", "--relabel"), "is a directory"),
    ("synth-mnist-data-is-a-directory", _dir_as("synth.py", "--mnist-data"), "is a directory"),
    ("nan-in-first-epoch-no-checkpoint", _nan_first_epoch, "no checkpoint was written"),
    ("run-all-epochs-abc", _run_all("epochs", EPOCHS="abc"), "EPOCHS='abc'"),
    ("run-all-negative", _run_all("neg", LABELS_PER_CLASS="-3"), "LABELS_PER_CLASS='-3'"),
    ("run-all-zero-threads", _run_all("threads", THREADS="0"), "THREADS='0'"),
    ("run-all-unknown-amp", _run_all("amp", AMP="fp8"), "AMP='fp8'"),
    ("run-all-missing-data", _run_all("data", DATA="/no/such/data"), "DATA='/no/such/data'"),
    ("run-all-run-not-a-name", _run_all("run", RUN="../escape"), "RUN='../escape'"),
    ("run-all-unknown-model", _run_all("model", MODEL="resnet18x"), "MODEL='resnet18x'"),
    ("run-all-unknown-aug", _run_all("aug", AUG="flip,blur"), "AUG='flip,blur'"),
    ("run-all-runs-dir-is-a-file", _run_all_runs_dir_file, "RUNS_DIR="),
    ("skip-existing-truncated-best-redone", _skip_existing_truncated, "redo"),
]


# (id, command builder, expected substring of the one stderr line; exit-0 rows: of the output)
CASES: list[tuple[str, Callable[[Workspace], Case], str]] = [
    ("missing-path", _missing, "no such file or directory"),
    ("empty-folder", _empty, "is empty"),
    ("one-class", _one_class, "only one class"),
    ("csv-no-label-column", _csv_no_label, "no label column"),
    ("csv-extra-columns-ok", _csv_extra_columns, ""),
    ("csv-label-not-a-class", _csv_unknown_label, "'z'"),
    ("csv-duplicate-ids", _csv_duplicate_ids, "im0"),
    ("relabel-unknown-class", _relabel_unknown_class, "zebra"),
    ("not-an-image", _not_an_image, "fake.png"),
    ("stray-non-image-files-ok", _stray_text_file, ""),
    ("truncated-png", _truncated_png, "cut.png"),
    ("truncated-jpeg", _truncated_jpeg, "cut.jpg"),
    ("16bit-palette-rgba-ok", _odd_modes, ""),
    ("mixed-sizes", _mixed_sizes, "--img-size"),
    ("unknown-model", _unknown_model, "did you mean resnet18"),
    ("bad-config", _bad_config, "bad.json"),
    ("resume-nothing", _resume_nothing, "nothing to resume"),
    ("finished-run", _finished_run, "--overwrite"),
    ("out-under-a-file", _out_under_file, "a_file"),
    ("eval-only-malicious", _eval_only_evil, "not a safe checkpoint"),
    ("weights-malicious", _weights_evil, "not a safe checkpoint"),
    ("finetune-malicious", _finetune_evil, "not a safe checkpoint"),
    ("finetune-i-off-grid", _finetune_grid, "--i 72"),
    ("soup-malicious", _soup_evil, "not a safe checkpoint"),
    ("soup-architectures", _soup_archs, "architecture"),
    ("soup-splits", _soup_splits, "different splits"),
    ("infer-malicious", _infer_evil, "not a safe checkpoint"),
    ("infer-malicious-raw-pickle", _infer_evil_raw_pickle, "evil_raw.pt"),
    ("infer-plain-state-dict", _infer_plain_state_dict, "not a checkpoint of this toolkit"),
    ("infer-truncated-checkpoint", _infer_truncated_ckpt, "cut.pt"),
    ("infer-rot90-tta", _infer_rot90, "--force-tta"),
    ("infer-out-under-a-file", _infer_out_under_file, "a_file"),
    ("vote-different-ids", _vote_ids, "same ids"),
    ("vote-different-classes", _vote_shapes, "4 classes"),
    ("vote-weights-count", _vote_weights, "3 values for 2 files"),
    ("vote-duplicate-ids", _vote_duplicate_ids, "more than once"),
    ("synth-bad-mnist-data", _synth_bad_mnist, "--mnist-data"),
    ("resume-malicious", _resume_evil, "not a safe checkpoint"),
    ("linear-eval-malicious", _linear_eval_evil, "not a safe checkpoint"),
    ("weights-safetensors-ok", _weights_safetensors, ""),
    ("weights-garbage-safetensors", _weights_garbage_safetensors, "start.safetensors"),
    ("amp-fp16-on-cpu-ok", _amp_fp16_on_cpu, ""),
    ("nan-loss-stops", _diverges, "step"),
    ("finetune-out-under-a-file", _finetune_out_under_file, "a_file"),
    ("soup-out-under-a-file", _soup_out_under_file, "a_file"),
    ("data-grid-under-a-file", _data_grid_under_file, "a_file"),
    ("vote-out-under-a-file", _vote_out_under_file, "a_file"),
    ("synth-out-under-a-file", _synth_out_under_file, "a_file"),
    ("stream-train-ok", _stream_train, "streaming from disk"),
    ("stream-data-eda-ok", _stream_data, "would need"),
    ("stream-infer-ok", _stream_infer, "streaming from disk"),
]
CASES += NEW_CASES


# The battery's runner. `python script.py` pays ~3 s of torch import per row; on two busy cores
# that alone would take minutes. So one clean "zygote" process imports the toolkit once (imports
# only, no torch ops: safe to fork) and forks a child per row that runs the script exactly as
# `python script.py ARGS` would (runpy as __main__, its own argv/env/cwd, stdout and stderr to
# files, an uncaught exception printed as a traceback, the exit code as the process exits).
# IMGCLS_TEST_SUBPROCESS=1 runs each row as a plain `subprocess.run([python, script, ...])`.
ZYGOTE = r"""
import json, os, runpy, sys, traceback
root = sys.argv[1]
sys.path.insert(0, root)
import common, data, models, losses, train, finetune, soup, infer, vote, synth  # noqa

def child(job):
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    script = os.path.join(root, job["script"])
    if script.endswith(".sh"):  # run_all.sh: the forked child becomes bash
        os.execvp("bash", ["bash", script, *job["args"]])
    sys.argv = [script, *job["args"]]
    sys.path[0] = root
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code

jobs, running, codes = json.load(sys.stdin), {}, {}
for job in jobs + [None] * 2:
    while running and (job is None or len(running) >= 2):
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    if job is not None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(job)
            finally:
                os._exit(code)
        running[pid] = job["id"]
print(json.dumps(codes))
"""


def _run_one(c: Case, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    if c.script.endswith(".sh"):
        argv = ["bash", str(ROOT / c.script), *map(str, c.args)]
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    return cli(c.script, *c.args, env=env, cwd=cwd)


def run_rows(
    cases: dict[str, Case], env: dict, tmp: Path
) -> dict[str, subprocess.CompletedProcess]:
    """Run every case (two at a time); id -> CompletedProcess(args, returncode, stdout, stderr)."""
    if os.environ.get("IMGCLS_TEST_SUBPROCESS") == "1" or not hasattr(os, "fork"):
        with ThreadPoolExecutor(2) as ex:
            futures = {
                cid: ex.submit(_run_one, c, {**env, **c.env}, tmp) for cid, c in cases.items()
            }
        return {cid: f.result() for cid, f in futures.items()}
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    jobs = [
        {
            "id": cid,
            "script": c.script,
            "args": [str(a) for a in c.args],
            "env": {**env, **c.env},
            "cwd": str(tmp),
            "stdout": str(logs / f"{cid}.out"),
            "stderr": str(logs / f"{cid}.err"),
        }
        for cid, c in cases.items()
    ]
    z = subprocess.run(
        [sys.executable, "-c", ZYGOTE, str(ROOT)],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert z.returncode == 0, z.stderr
    codes = json.loads(z.stdout.strip().splitlines()[-1])
    return {
        j["id"]: subprocess.CompletedProcess(
            [j["script"], *j["args"]],
            codes[j["id"]],
            Path(j["stdout"]).read_text(),
            Path(j["stderr"]).read_text(),
        )
        for j in jobs
    }


@pytest.fixture(scope="module")
def battery(request, tmp_path_factory) -> dict[str, tuple[Case, subprocess.CompletedProcess]]:
    """Build every selected row's inputs and run them all; id -> (case, result)."""
    wanted = {
        it.callspec.params["row"][0]
        for it in request.session.items
        if getattr(it, "originalname", "") == "test_bad_input" and hasattr(it, "callspec")
    }
    tmp = tmp_path_factory.mktemp("battery")
    ws = Workspace(tmp)
    try:
        builds = [(cid, build) for cid, build, _ in CASES if cid in wanted]
        if any(build.__name__ in PREP_NEEDED for _, build in builds):
            prep = run_rows(prep_cases(ws), child_env(tmp), tmp)
            for cid, r in prep.items():
                assert r.returncode == 0, f"{cid}: {r.stderr}"
        cases = {cid: build(ws) for cid, build in builds}
        ws.fill()  # the full-disk rows' file system: full from here on
        before = {cid: [_snapshot(p) for p in c.unchanged] for cid, c in cases.items()}
        run = {cid: c for cid, c in cases.items() if c.skip is None}
        results = run_rows(run, child_env(tmp), tmp)
        assert not ws.marker.exists(), "a malicious checkpoint ran code on load"
        after = {cid: [_snapshot(p) for p in c.unchanged] for cid, c in run.items()}
        yield {
            cid: (c, results.get(cid), before[cid] == after.get(cid)) for cid, c in cases.items()
        }
    finally:
        ws.close()


def _snapshot(p: Path) -> dict[str, bytes] | None:
    """Every file under p (or p itself) with its bytes; None when p does not exist."""
    p = Path(p)
    if p.is_file():
        return {"": p.read_bytes()}
    if not p.is_dir():
        return None
    return {
        str(f.relative_to(p)): f.read_bytes() if f.is_file() else b"<dir>"
        for f in sorted(p.rglob("*"))
    }


@pytest.mark.parametrize("row", CASES, ids=[c[0] for c in CASES])
def test_bad_input(row, battery):
    cid, _, expected = row
    case, r, same = battery[cid]
    if case.skip:
        pytest.skip(case.skip)
    expected = expected if case.expect is None else case.expect
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    shown = f"exit {r.returncode}\nstderr:\n{r.stderr}\nstdout tail:\n{r.stdout[-800:]}"
    assert "Traceback" not in r.stderr, shown
    assert r.returncode == case.code, shown
    for p in case.present:
        assert Path(p).is_file(), f"{p} is missing\n{shown}"
    for p in case.absent:
        assert not Path(p).exists(), f"{p} was left behind\n{shown}"
    assert same, f"{case.unchanged} changed\n{shown}"
    for p in case.loads:
        models.load_checkpoint(p)  # a verified, complete checkpoint
    if case.code == 0:
        assert expected in r.stdout + r.stderr, shown
        return
    assert len(lines) == 1, shown
    assert lines[0].startswith(f"{case.script}: error: "), shown
    assert expected in lines[0], shown


# ---------------------------------------------------------------------------
# Crash safety: SIGKILL and SIGINT mid-epoch, then --resume, give the uninterrupted weights

# Every source of randomness and state on: EMA, dropout, cutmix, flip/crop, a grad scaler
# (--amp fp16 runs as bf16 with the scaler enabled on CPU), gradient accumulation (an
# interrupt must land between optimizer steps). One thread: bitwise CPU determinism.
RESUME_FLAGS = [
    "--model", "smallnet_s", "--batch-size", "16", "--threads", "1", "--epochs", "2",
    "--ema", "0.9", "--drop", "0.1", "--mix", "cutmix", "--val-ratio", "0.05",
    "--amp", "fp16", "--accum-steps", "2", "--random-seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    """4000 16x16 images (an epoch takes seconds at one thread) and an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("resume")
    x, y = make_patterns(4000, 3, 16, seed=1)
    write_idx(tmp / "big", "train", x, y)
    env = child_env(tmp)
    r = cli("train.py", *train_args(tmp, "ref"), env=env)
    assert r.returncode == 0, r.stderr
    return tmp, env


def train_args(tmp: Path, name: str) -> list:
    return ["--data", tmp / "big", "--out", tmp / "runs", "--name", name, *RESUME_FLAGS]


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, what: str, timeout=240) -> None:
    """Poll until cond() holds; fail when the process ends first or time runs out."""
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"train.py ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def epoch_one_saved(run: Path) -> Callable[[], bool]:
    """True once last.pt of epoch 1 exists and metrics.jsonl has its one line."""

    def cond() -> bool:
        m = run / "metrics.jsonl"
        return (run / "last.pt").exists() and m.exists() and m.read_text().count("\n") == 1

    return cond


def assert_same_run(a: Path, b: Path) -> None:
    """Two run dirs ended in bitwise-equal weights, EMA, optimizer state and metrics."""
    ca, cb = models.load_checkpoint(a / "last.pt"), models.load_checkpoint(b / "last.pt")
    for key in ("state_dict", "ema_state_dict"):
        assert ca[key].keys() == cb[key].keys()
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), f"{key}[{k}] differs"
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, v in sa[k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k][name])), (k, name)
    assert ca["scaler"] == cb["scaler"]
    ta, tb = dict(ca["train_state"]), dict(cb["train_state"])
    ta.pop("partial"), tb.pop("partial")
    assert ta == tb
    keys = ("epoch", "train_loss", "val_loss", "val_acc", "lr")
    rows_a = [{k: r[k] for k in keys} for r in map(json.loads, (a / "metrics.jsonl").open())]
    rows_b = [{k: r[k] for k in keys} for r in map(json.loads, (b / "metrics.jsonl").open())]
    assert rows_a == rows_b


def test_sigkill_mid_epoch_then_resume_matches(resume_setup):
    tmp, env = resume_setup
    run = tmp / "runs" / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, train_args(tmp, "killed"))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(epoch_one_saved(run), proc, "epoch 1 was saved")
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "metrics.jsonl").read_text().count("\n") == 1, "epoch 2 finished: kill earlier"
    assert models.load_checkpoint(run / "last.pt")["train_state"]["epoch"] == 1
    assert not (run / "summary.json").exists()
    # A kill between the epoch-2 log line and its last.pt, and a torn line, must not leave
    # duplicate or broken rows behind after the resume.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": 9.0}) + "\n" + '{"epoch": 2, "tra')
    r = cli("train.py", *train_args(tmp, "killed"), "--resume", env=env)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert_same_run(tmp / "runs" / "ref", run)


def test_sigint_mid_epoch_exits_130_then_resume_matches(resume_setup):
    tmp, env = resume_setup
    run = tmp / "runs" / "ctrl_c"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, train_args(tmp, "ctrl_c"))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(epoch_one_saved(run), proc, "epoch 1 was saved")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err, err
    ck = models.load_checkpoint(run / "last.pt")
    assert ck["train_state"]["epoch"] == 1 and ck["train_state"]["batch"] > 0  # mid-epoch
    assert not (run / "summary.json").exists()
    r = cli("train.py", *train_args(tmp, "ctrl_c"), "--resume", env=env)
    assert r.returncode == 0, r.stderr
    assert f"epoch 2, batch {ck['train_state']['batch']}" in r.stdout
    assert_same_run(tmp / "runs" / "ref", run)


# ---------------------------------------------------------------------------
# Fault injection (issue 12): kill -9 during --overwrite, a second command on the same run


def test_kill_during_overwrite_and_a_concurrent_run(tmp_path):
    """A finished run; `--overwrite` SIGKILLed mid-training leaves it byte-identical; meanwhile a
    second command on the same --out/--name is refused naming the holder's pid; the next
    --overwrite takes the stale lock over, drops the dead staging dir and replaces the run."""
    x, y = make_patterns(400, 3, 16, seed=2)
    write_idx(tmp_path / "d", "train", x, y)
    env, runs = child_env(tmp_path), tmp_path / "runs"
    base = ["--data", tmp_path / "d", "--out", runs, "--name", "r", *FAST, "--aug", "none"]
    r = cli("train.py", *base, "--epochs", "1", env=env)
    assert r.returncode == 0, r.stderr
    run = runs / "r"
    old = _snapshot(run)
    argv = [sys.executable, str(ROOT / "train.py"), *map(str, base), "--epochs", "500"]
    proc = subprocess.Popen([*argv, "--overwrite"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: any(runs.glob(".r.staging-*/last.pt")), proc, "the new run saved epoch 1")
        second = cli("train.py", *base, "--epochs", "1", "--overwrite", env=env)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"pid {proc.pid}" in lines[0] and "--name" in lines[0], lines
        assert proc.poll() is None, "the first run ended before the second was refused"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert _snapshot(run) == old  # killed before its commit: the old run exactly as it was
    assert (runs / ".r.lock").exists() and any(runs.glob(".r.staging-*"))  # a kill's leftovers
    again = cli("train.py", *base, "--epochs", "2", "--overwrite", env=env)
    assert again.returncode == 0, again.stderr
    assert [row["epoch"] for row in map(json.loads, (run / "metrics.jsonl").open())] == [1, 2]
    assert sorted(p.name for p in runs.iterdir()) == ["r"]  # no lock, no staging dir left


# ---------------------------------------------------------------------------
# Streaming from disk when the decoded set would not fit in memory


def test_streaming_trains_like_in_memory(tmp_path):
    """Forced tiny RAM budget: same weights as the in-RAM run; a file corrupt past its header
    fails at batch time with the one-line error, not a traceback."""
    data = make_folder(tmp_path / "f", per_class=8)
    bad = make_folder(tmp_path / "bad", per_class=8)
    png = bad / "b" / "b001.png"
    png.write_bytes(png.read_bytes()[:60])  # header intact, pixel data cut
    base = ["--out", tmp_path / "runs", "--epochs", "2", "--aug", "flip,crop", *FAST]
    cases = {
        "ram": Case("train.py", ["--data", data, "--name", "ram", *base], code=0),
        "disk": Case("train.py", ["--data", data, "--name", "disk", *base], code=0, env=TINY_RAM),
        "bad": Case("train.py", ["--data", bad, "--name", "bad", *base], env=TINY_RAM),
    }
    res = run_rows(cases, child_env(tmp_path), tmp_path)
    assert res["ram"].returncode == 0 and "streaming" not in res["ram"].stderr, res["ram"].stderr
    assert res["disk"].returncode == 0, res["disk"].stderr
    assert res["disk"].stderr.count("streaming from disk: ") == 1
    assert "would need" in res["disk"].stderr and "GB available" in res["disk"].stderr
    a = models.load_checkpoint(tmp_path / "runs" / "ram" / "last.pt")
    b = models.load_checkpoint(tmp_path / "runs" / "disk" / "last.pt")
    assert a["mean"] == b["mean"] and a["std"] == b["std"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    err = res["bad"].stderr
    assert res["bad"].returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("train.py: error: ") and "b001.png" in err


# ---------------------------------------------------------------------------
# Source audits: one safe loader; every result file written through common.atomic_path

SCRIPTS = sorted(p for p in ROOT.glob("*.py") if p.name != "common.py")  # common implements it
WRITERS = {"save", "to_csv", "savefig", "copyfile", "dump", "write_text", "write_bytes"}
# (file, source line) written directly on purpose
DIRECT_OK = {
    ("synth.py", 'with open(out_dir / ".synth.lock", "a") as f:'),  # a lock file, not a result
    # thousands of generated PNGs: the CSV listing them is written atomically after all of them,
    # so a killed run never references a torn image (a re-run writes them again)
    ("synth.py", 'with open(folder / name, "wb") as f:'),
}


def _calls(path: Path):
    import ast

    src = path.read_text(encoding="utf-8")
    lines = src.splitlines()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, name, owner, lines[node.lineno - 1].strip()


def test_only_safe_loaders():
    """One torch.load (weights_only=True, in models.py); np.load never unpickles; no pickle."""
    torch_loads = []
    for path in SCRIPTS:
        for node, name, owner, line in _calls(path):
            kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if owner == "torch" and name == "load":
                torch_loads.append(path.name)
                assert kw.get("weights_only") is True, f"{path.name}: {line}"
            if owner == "np" and name == "load":
                assert kw.get("allow_pickle") is False, f"{path.name}: {line}"
            assert not (owner == "pickle" and name in ("load", "loads")), f"{path.name}: {line}"
            assert not (owner == "yaml" and name == "load"), f"{path.name}: {line}"
            assert name not in ("read_pickle", "unsafe_load"), f"{path.name}: {line}"
    assert torch_loads == ["models.py"]


def test_outputs_go_through_atomic_path():
    """Writers (torch/np.save, to_csv, savefig, Image.save, json.dump, copyfile, open for
    writing) only ever target the temp path that common.atomic_path yields (or its handle)."""
    import ast

    bad = []
    for path in SCRIPTS:
        for node, name, owner, line in _calls(path):
            targets = {a.id for a in node.args if isinstance(a, ast.Name)}
            if name == "open" and not owner:
                mode = node.args[1].value if len(node.args) > 1 else "r"
                if isinstance(mode, str) and set(mode) & set("wax") and "tmp" not in targets:
                    bad.append((path.name, line))
            elif name in WRITERS and owner not in ("json",) and not targets & {"tmp", "f"}:
                bad.append((path.name, line))
            elif owner == "json" and name == "dump" and "f" not in targets:
                bad.append((path.name, line))
    assert set(bad) <= DIRECT_OK, sorted(set(bad) - DIRECT_OK)


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """atomic_path's temp file (mkstemp: 0600) ends up with open()'s mode (0666 & ~umask)."""
    from common import write_json

    write_json(tmp_path / "a.json", {})
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode
