"""Unit tests of the shared mechanisms in common.py (issue 12): flag types and one-line argparse
errors (config values included), the atomic writer and output transactions under failing writers
and a real full file system, directory staging/commit/recovery, directory locks, and the
output-on-input check."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import common
from common import (
    DirLock,
    Outputs,
    UserError,
    atomic_path,
    atomic_write_text,
    commit_dir,
    recover_dir,
    refuse_output_on_input,
    staged_dir,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Flag types: (type, accepted [(text, value)], refused [text], words of the refusal)

NOT_NUMBERS = ["abc", "", "1,5", "0x10", "one"]
NOT_FINITE = ["nan", "NaN", "inf", "-inf", "1e400"]

TYPES = [
    ("positive_int", [("1", 1), ("7", 7), (" 3 ", 3)], ["0", "-1", "1.5", "1e3", *NOT_FINITE]),
    ("nonneg_int", [("0", 0), ("5", 5)], ["-1", "0.5", "nan"]),
    ("positive_float", [("1e-9", 1e-9), ("2.5", 2.5), ("3", 3.0)], ["0", "-0", "-1e-9"]),
    ("nonneg_float", [("0", 0.0), ("0.25", 0.25)], ["-1e-9", "-3"]),
    ("finite_float", [("-5", -5.0), ("0", 0.0), ("1e300", 1e300)], []),
    ("fraction", [("0", 0.0), ("0.999", 0.999)], ["1", "-0.01", "1.5"]),
    ("probability", [("0", 0.0), ("1", 1.0), ("0.5", 0.5)], ["1.0001", "-0.1"]),
    ("open_fraction", [("0.5", 0.5), ("1e-6", 1e-6)], ["0", "1", "2"]),
    ("seed_int", [("0", 0), (str(2**32 - 1), 2**32 - 1)], ["-1", str(2**32)]),
    ("threads_int", [("1", 1), ("1024", 1024)], ["0", "1025", "-2"]),
]


@pytest.mark.parametrize("name, good, bad", TYPES, ids=[t[0] for t in TYPES])
def test_flag_type_bounds(name, good, bad):
    check = getattr(common, name)
    for text, value in good:
        got = check(text)
        assert got == value and type(got) is type(value), (name, text, got)
    for text in bad + NOT_NUMBERS + NOT_FINITE:
        if name == "finite_float" and text in ("-0",):
            continue
        with pytest.raises(argparse.ArgumentTypeError) as e:
            check(text)
        msg = str(e.value)
        assert "\n" not in msg and "give " in msg, (name, text, msg)  # what to give instead


def test_refusals_say_why():
    with pytest.raises(argparse.ArgumentTypeError, match="not a number"):
        common.positive_float("abc")
    with pytest.raises(argparse.ArgumentTypeError, match="not finite"):
        common.positive_float("nan")
    with pytest.raises(argparse.ArgumentTypeError, match=r"out of range; give a number > 0"):
        common.positive_float("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 1\)"):
        common.fraction("1")
    with pytest.raises(argparse.ArgumentTypeError, match="not a whole number"):
        common.positive_int("2.0")


def test_int_and_float_range_ends():
    r = common.int_range(2, 5)
    assert [r("2"), r("5")] == [2, 5]
    for t in ("1", "6"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[2, 5\]"):
            r(t)
    hi_only = common.int_range(hi=3)
    assert hi_only("-100") == -100
    with pytest.raises(argparse.ArgumentTypeError):
        hi_only("4")
    f = common.float_range(1, 2, lo_open=True, hi_open=False)
    assert f("2") == 2.0 and f("1.0001") == 1.0001
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(1, 2\]"):
        f("1")
    assert common.float_range(hi=0, hi_open=True)("-1") == -1.0
    with pytest.raises(argparse.ArgumentTypeError, match="< 0"):
        common.float_range(hi=0, hi_open=True)("0")


def test_list_of():
    lst = common.list_of(common.open_fraction)
    assert lst("0.5,0.75") == [0.5, 0.75] and lst(" 0.25 , ") == [0.25]
    for bad in ("", ",", "0.5,abc", "0.5,1", "nan", "0.5;0.7"):
        with pytest.raises(argparse.ArgumentTypeError):
            lst(bad)
    two = common.list_of(common.positive_int, min_len=2)
    assert two("1,2,3") == [1, 2, 3]
    with pytest.raises(argparse.ArgumentTypeError, match="at least 2"):
        two("4")


def _parser():
    p = argparse.ArgumentParser(prog="tool.py")
    common.add_common_flags(p)
    p.add_argument("--epochs", type=common.positive_int, default=3)
    p.add_argument("--lr", type=common.positive_float, default=0.1)
    p.add_argument("--milestones", type=common.list_of(common.open_fraction), default=[0.5])
    p.add_argument("--opt", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--scales", type=common.positive_float, nargs="+", default=[1.0])
    p.add_argument("--resume", nargs="?", const="auto", default=None)
    return p


BAD_ARGV = [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-3"], "--epochs"),
    (["--epochs", "abc"], "--epochs"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--milestones", "0.5,x"], "--milestones"),
    (["--opt", "rmsprop"], "--opt"),
    (["--bogus"], "--bogus"),
    (["--scales", "1", "0"], "--scales"),
]


@pytest.mark.parametrize("argv, flag", BAD_ARGV, ids=[" ".join(a) for a, _ in BAD_ARGV])
def test_parse_args_errors_are_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(_parser(), argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # no usage block
    assert lines[0].startswith("tool.py: error: ") and flag in lines[0], err


def test_parse_args_good():
    a = common.parse_args(_parser(), ["--epochs", "2", "--lr", "1e-3", "--milestones", "0.3,0.6"])
    assert (a.epochs, a.lr, a.milestones, a.opt) == (2, 1e-3, [0.3, 0.6], "sgd")


def _config(tmp_path, obj, name="c.json") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_config_values_go_through_the_flag_types(tmp_path):
    good = _config(tmp_path, {"epochs": 4, "lr": "0.01", "milestones": [0.25, 0.5], "opt": "adamw"})
    a = common.parse_args(_parser(), ["--config", str(good), "--epochs", "9"])
    assert (a.epochs, a.lr, a.milestones, a.opt) == (9, 0.01, [0.25, 0.5], "adamw")  # CLI wins
    assert common.parse_args(_parser(), ["--config", str(good)]).epochs == 4
    a = common.parse_args(
        _parser(), ["--config", str(_config(tmp_path, {"milestones": "0.2,0.4"}))]
    )
    assert a.milestones == [0.2, 0.4]
    a = common.parse_args(_parser(), ["--config", str(_config(tmp_path, {"scales": [1, 0.5]}))])
    assert a.scales == [1.0, 0.5]
    a = common.parse_args(_parser(), ["--config", str(_config(tmp_path, {"overwrite": True}))])
    assert a.overwrite is True
    a = common.parse_args(_parser(), ["--config", str(_config(tmp_path, {"resume": True}))])
    assert a.resume == "auto"  # as a bare --resume
    a = common.parse_args(_parser(), ["--config", str(_config(tmp_path, {"resume": "r/last.pt"}))])
    assert a.resume == "r/last.pt"


BAD_CONFIG = [
    ({"epochs": 0}, "'epochs'"),
    ({"epochs": -2}, "'epochs'"),
    ({"epochs": 2.5}, "'epochs'"),
    ({"epochs": True}, "'epochs'"),  # a JSON bool is not a count
    ({"lr": "nan"}, "'lr'"),
    ({"lr": "Infinity"}, "'lr'"),
    ({"lr": [0.1]}, "'lr'"),
    ({"lr": {"a": 1}}, "'lr'"),
    ({"milestones": [0.5, 1.5]}, "'milestones'"),
    ({"milestones": [[0.5]]}, "'milestones'"),
    ({"scales": [1, -1]}, "'scales'"),
    ({"opt": "rmsprop"}, "'opt'"),
    ({"overwrite": "no"}, "'overwrite'"),  # a non-empty string would read as True
    ({"overwrite": 1}, "'overwrite'"),
    ({"epoch": 3}, "unknown key 'epoch'"),
    ('{"epochs": 2,,}', "cannot parse"),
    ("[1, 2]", "mapping"),
]


@pytest.mark.parametrize("obj, words", BAD_CONFIG, ids=[str(o) for o, _ in BAD_CONFIG])
def test_config_errors(tmp_path, obj, words):
    cfg = _config(tmp_path, obj)
    with pytest.raises(UserError) as e:
        common.parse_args(_parser(), ["--config", str(cfg)])
    msg = str(e.value)
    assert words in msg and str(cfg) in msg and "\n" not in msg, msg


def test_config_path_errors(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        common.parse_args(_parser(), ["--config", str(tmp_path)])
    with pytest.raises(UserError, match="no such file"):
        common.parse_args(_parser(), ["--config", str(tmp_path / "nope.json")])


def test_refuse_together():
    ns = argparse.Namespace(eval_only="a.pt", linear_eval="b.pt", resume=None)
    with pytest.raises(UserError, match="--eval-only and --linear-eval cannot be used together"):
        common.refuse_together(ns, ("--eval-only", "--linear-eval"))
    common.refuse_together(ns, ("--eval-only", "--resume"))  # only one of them is set


def test_cli_errors_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e, common.cli_errors("x.py"):
        raise UserError("first line; the fix\nsecond line")
    assert e.value.code == 2
    assert capsys.readouterr().err == "x.py: error: first line; the fix\n"


# ---------------------------------------------------------------------------
# atomic_path: a failing writer leaves the old file byte-identical and no temp file


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name or p.name.startswith("."))


OLD = b"old content \x00\x01 kept\n"

WRITE_FAILURES = [
    ("enospc", lambda: OSError(errno.ENOSPC, "No space left on device"), "No space left"),
    ("eacces", lambda: PermissionError(errno.EACCES, "Permission denied"), "writable"),
    ("eio", lambda: OSError(errno.EIO, "Input/output error"), "Input/output error"),
    (
        "torch-enospc",
        lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5 vs 3"),
        "disk full",
    ),
    (
        "torch-write",
        lambda: RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        "disk full",
    ),
]


@pytest.mark.parametrize("kind, make, words", WRITE_FAILURES, ids=[w[0] for w in WRITE_FAILURES])
def test_atomic_path_failing_writer(tmp_path, kind, make, words):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    with pytest.raises(UserError) as e, atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise make()
    msg = str(e.value)
    assert str(target) in msg and words in msg and "\n" not in msg, msg
    assert "intact" in msg
    assert target.read_bytes() == OLD
    assert _leftovers(tmp_path) == []


def test_atomic_path_other_errors_pass_through(tmp_path):
    target = tmp_path / "out.txt"
    target.write_bytes(OLD)
    with pytest.raises(ValueError, match="a bug"), atomic_path(target) as tmp:
        Path(tmp).write_text("partial")
        raise ValueError("a bug")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        Path(tmp).write_text("partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == OLD and _leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_atomic_path_commit_failures(tmp_path, monkeypatch, stage):
    """fsync (EIO) or the rename failing after the body succeeded: same guarantee."""
    target = tmp_path / "out.json"
    target.write_bytes(OLD)

    def fail(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(common.os, stage, fail)
    with pytest.raises(UserError, match="out.json: cannot write"):
        write_json(target, {"new": 1})
    monkeypatch.undo()
    assert target.read_bytes() == OLD and _leftovers(tmp_path) == []


def test_atomic_path_success_and_mode(tmp_path):
    target = tmp_path / "sub" / "deeper" / "x.txt"
    atomic_write_text(target, "hello\n")
    assert target.read_text() == "hello\n" and _leftovers(target.parent) == []
    atomic_write_text(target, "again\n")
    assert target.read_text() == "again\n"


def test_atomic_path_refuses_directory_and_file_parent(tmp_path):
    d = tmp_path / "adir"
    (d / "inside").mkdir(parents=True)
    with pytest.raises(UserError, match="is a directory"):
        atomic_write_text(d, "x")
    assert (d / "inside").is_dir() and _leftovers(tmp_path) == []
    blocker = tmp_path / "afile"
    blocker.write_bytes(OLD)
    with pytest.raises(UserError, match="afile is a file, not a directory"):
        atomic_write_text(blocker / "x.txt", "x")
    assert blocker.read_bytes() == OLD


def test_atomic_path_read_only_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(UserError, match="cannot write here"):
            atomic_write_text(d / "x.txt", "x")
    finally:
        d.chmod(0o700)


# ---------------------------------------------------------------------------
# Outputs: several files committed together


def test_outputs_commit_all(tmp_path):
    a, b, c = tmp_path / "a.npy", tmp_path / "b.csv", tmp_path / "c.json"
    b.write_bytes(OLD)
    with Outputs() as out:
        np.save(out.path(a), np.arange(3))
        out.text(b, "id,label\n")
        out.json(c, {"k": np.float32(0.5)})
        assert not a.exists() and b.read_bytes() == OLD  # nothing visible inside the block
    assert np.load(a).tolist() == [0, 1, 2]
    assert b.read_text() == "id,label\n" and json.loads(c.read_text()) == {"k": 0.5}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind, make, words", WRITE_FAILURES, ids=[w[0] for w in WRITE_FAILURES])
def test_outputs_failing_writer(tmp_path, kind, make, words):
    a, b = tmp_path / "a.csv", tmp_path / "b.npy"
    a.write_bytes(OLD)
    with pytest.raises(UserError) as e, Outputs() as out:
        out.text(a, "new a\n")
        with open(out.path(b), "wb") as f:
            f.write(b"partial")
            raise make()
    msg = str(e.value)
    assert str(b) in msg and words in msg and "\n" not in msg, msg  # the file being written
    assert a.read_bytes() == OLD and not b.exists()
    assert _leftovers(tmp_path) == []


def test_outputs_any_error_commits_nothing(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(OLD)
    for exc in (ValueError("bug"), UserError("bad input"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), Outputs() as out:
            out.text(a, "new")
            out.text(b, "new")
            raise exc
        assert a.read_bytes() == OLD and not b.exists() and _leftovers(tmp_path) == []


def test_outputs_refuses_directory_and_twice(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="is a directory"), Outputs() as out:
        out.text(tmp_path / "ok.txt", "x")
        out.path(tmp_path / "d")
    assert not (tmp_path / "ok.txt").exists() and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="staged twice"), Outputs() as out:
        out.path(tmp_path / "x")
        out.path(tmp_path / "x")
    assert _leftovers(tmp_path) == []


def test_outputs_commit_failure_keeps_all_old(tmp_path, monkeypatch):
    """fsync of the second staged file fails: no target is replaced."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(OLD)
    b.write_bytes(OLD)
    real, calls = common._fsync_file, []

    def flaky(p):
        calls.append(p)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(p)

    monkeypatch.setattr(common, "_fsync_file", flaky)
    with pytest.raises(UserError, match="b.txt: cannot write"), Outputs() as out:
        out.text(a, "new")
        out.text(b, "new")
    assert a.read_bytes() == OLD and b.read_bytes() == OLD and _leftovers(tmp_path) == []


KILLED_INSIDE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from common import Outputs
with Outputs() as out:
    out.text(sys.argv[2], "new a")
    out.text(sys.argv[3], "new b")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_outputs_killed_inside_leaves_targets(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(OLD)
    r = subprocess.run([sys.executable, "-c", KILLED_INSIDE, str(ROOT), str(a), str(b)])
    assert r.returncode == -signal.SIGKILL
    assert a.read_bytes() == OLD and not b.exists()
    assert all(n.startswith((".a.txt.", ".b.txt.")) for n in _leftovers(tmp_path))  # dot-files


# ---------------------------------------------------------------------------
# A real full file system: a 256 KiB tmpfs (needs root to mount; skipped otherwise)


@pytest.fixture
def full_fs(tmp_path):
    d = tmp_path / "tiny_fs"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _torch_save(path):
    import torch

    torch.save({"w": torch.zeros(200_000)}, path)  # 800 KB > 256 KiB


def _np_save(path):
    np.save(path, np.zeros(200_000))


def _to_csv(path):
    import pandas as pd

    pd.DataFrame(np.zeros((20_000, 10))).to_csv(path)


BIG_WRITERS = [("torch.save", _torch_save, "x.pt"), ("np.save", _np_save, "x.npy"),
               ("to_csv", _to_csv, "x.csv")]  # fmt: skip


@pytest.mark.parametrize("name, write, fname", BIG_WRITERS, ids=[w[0] for w in BIG_WRITERS])
def test_full_disk_atomic_path(full_fs, name, write, fname):
    target = full_fs / fname
    target.write_bytes(OLD)
    with pytest.raises(UserError) as e, atomic_path(target) as tmp:
        write(tmp)
    msg = str(e.value)
    assert str(target) in msg and "free space" in msg and "\n" not in msg, msg
    assert target.read_bytes() == OLD
    assert sorted(p.name for p in full_fs.iterdir()) == [fname]  # no temp left
    atomic_write_text(full_fs / "small.txt", "fits\n")  # the space came back
    assert (full_fs / "small.txt").read_text() == "fits\n"


@pytest.mark.parametrize("name, write, fname", BIG_WRITERS, ids=[w[0] for w in BIG_WRITERS])
def test_full_disk_outputs(full_fs, name, write, fname):
    first, target = full_fs / "first.json", full_fs / fname
    first.write_bytes(OLD)
    target.write_bytes(OLD)
    with pytest.raises(UserError) as e, Outputs() as out:
        out.json(first, {"new": True})
        write(out.path(target))
    assert str(target) in str(e.value) and "free space" in str(e.value)
    assert first.read_bytes() == OLD and target.read_bytes() == OLD
    assert sorted(p.name for p in full_fs.iterdir()) == sorted(["first.json", fname])


# ---------------------------------------------------------------------------
# Directories: stage, commit, recover after a kill between the two renames


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staged_dir_and_commit(tmp_path):
    final = tmp_path / "run"
    (final / "sub").mkdir(parents=True)
    (final / "old.txt").write_bytes(OLD)
    stage = staged_dir(final)
    assert (
        stage.parent == tmp_path
        and stage.name.startswith(".run.staging-")
        and not any(stage.iterdir())
    )
    (stage / "new.txt").write_text("new")
    assert _tree(final) == {"old.txt": OLD}  # untouched until the commit
    commit_dir(stage, final)
    assert _tree(final) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    again = staged_dir(tmp_path / "fresh")  # no previous directory
    (again / "f").write_text("1")
    commit_dir(again, tmp_path / "fresh")
    assert _tree(tmp_path / "fresh") == {"f": b"1"}


def test_staged_dir_replaces_own_leftover(tmp_path):
    final = tmp_path / "run"
    first = staged_dir(final)
    (first / "junk").write_text("x")
    assert staged_dir(final) == first and not any(first.iterdir())


def test_recover_after_kill_between_renames(tmp_path):
    """Old moved aside, new not yet in place: the old directory comes back, the stage goes."""
    final, pid = tmp_path / "run", _dead_pid()
    old = tmp_path / f".run.old-{pid}"
    old.mkdir()
    (old / "best.pt").write_bytes(OLD)
    stage = tmp_path / f".run.staging-{pid}"
    stage.mkdir()
    (stage / "half").write_text("x")
    recover_dir(final)
    assert _tree(final) == {"best.pt": OLD}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_recover_after_kill_after_swap(tmp_path):
    """Killed after the swap, before the old copy was deleted: the new one stays."""
    final, pid = tmp_path / "run", _dead_pid()
    final.mkdir()
    (final / "new").write_text("new")
    (tmp_path / f".run.old-{pid}").mkdir()
    recover_dir(final)
    assert _tree(final) == {"new": b"new"} and sorted(os.listdir(tmp_path)) == ["run"]


def test_recover_leaves_live_and_other_dirs(tmp_path):
    """A live process's staging dir and another run's leftovers (a name sharing the prefix)."""
    final, pid = tmp_path / "run", _dead_pid()
    live = tmp_path / f".run.staging-{os.getpid()}"
    live.mkdir()
    other_old = tmp_path / f".run.v2.old-{pid}"  # belongs to "run.v2", not to "run"
    other_old.mkdir()
    (other_old / "f").write_text("v2")
    recover_dir(final)
    assert live.is_dir() and other_old.is_dir() and not final.exists()
    recover_dir(tmp_path / "missing_parent" / "run")  # nothing to do


KILLED_IN_COMMIT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import common
real = os.replace
def replace(a, b):
    real(a, b)
    os.kill(os.getpid(), signal.SIGKILL)  # right after the first rename (old moved aside)
stage = common.staged_dir(sys.argv[2])
(stage / "new.txt").write_text("new")
common.os.replace = replace
common.commit_dir(stage, sys.argv[2])
"""


def test_real_kill_in_commit_then_recover(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "best.pt").write_bytes(OLD)
    r = subprocess.run([sys.executable, "-c", KILLED_IN_COMMIT, str(ROOT), str(final)])
    assert r.returncode == -signal.SIGKILL
    assert not final.exists()  # the window recover_dir exists for
    recover_dir(final)
    assert _tree(final) == {"best.pt": OLD} and sorted(os.listdir(tmp_path)) == ["run"]


# ---------------------------------------------------------------------------
# DirLock

HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from common import DirLock
with DirLock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_dirlock_second_acquire_refused(tmp_path):
    run = tmp_path / "runs" / "r"
    with DirLock(run, flag="--name") as lock:
        assert lock.file == tmp_path / "runs" / ".r.lock"
        assert lock.file.read_text().strip() == str(os.getpid())
        with pytest.raises(UserError) as e:
            DirLock(run, flag="--name").acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and "--name" in msg and "\n" not in msg
    assert not lock.file.exists()  # released on exit
    with DirLock(run):  # free again
        pass


def test_dirlock_released_on_error(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(RuntimeError), DirLock(run):
        raise RuntimeError("boom")
    assert not (tmp_path / ".r.lock").exists()


def test_dirlock_held_by_another_process_then_killed(tmp_path):
    run = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(run)],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by another command \\(pid {p.pid}"):
            DirLock(run).acquire()
    finally:
        p.kill()
        p.wait()
    assert (tmp_path / ".r.lock").read_text().strip() == str(p.pid)  # left by the kill
    with DirLock(run) as lock:  # stale: taken over
        assert lock.file.read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("content", ["dead", "", "garbage\n"])
def test_dirlock_stale_or_unreadable(tmp_path, content):
    lock = tmp_path / ".r.lock"
    lock.write_text(f"{_dead_pid()}\n" if content == "dead" else content)
    if content != "dead":  # no pid (yet?): respected while fresh, stale when old
        os.utime(lock, (0, 0))
    with DirLock(tmp_path / "r"):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_dirlock_fresh_empty_lock_is_respected(tmp_path):
    """A lock file just created (pid not written yet) is not stolen."""
    (tmp_path / ".r.lock").write_text("")
    with pytest.raises(UserError, match="r.lock"):
        DirLock(tmp_path / "r").acquire()


# ---------------------------------------------------------------------------
# Outputs never land on inputs


def test_refuse_output_on_input_same_file(tmp_path):
    data = tmp_path / "data" / "test"
    data.mkdir(parents=True)
    labels = data / "labels.csv"
    labels.write_text("id,label\n")
    (tmp_path / "link.csv").symlink_to(labels)
    os.link(labels, tmp_path / "hard.csv")
    for out in (labels, tmp_path / "link.csv", tmp_path / "hard.csv",
                tmp_path / "data" / "test" / ".." / "test" / "labels.csv"):  # fmt: skip
        with pytest.raises(UserError) as e:
            refuse_output_on_input(
                [("--out", out)], [("--data", tmp_path / "x"), ("--labels", labels)]
            )
        msg = str(e.value)
        assert "--out" in msg and "--labels" in msg and "\n" not in msg
    refuse_output_on_input([("--out", tmp_path / "new.csv")], [("--labels", labels)])
    refuse_output_on_input([("--out", None)], [("--labels", labels), ("--x", None)])


def test_refuse_input_inside_replaced_dir(tmp_path):
    soup = tmp_path / "soup"
    soup.mkdir()
    ing = soup / "a.pt"
    ing.write_bytes(b"x")
    (tmp_path / "via").symlink_to(soup)
    for inp in (ing, tmp_path / "via" / "a.pt", soup):
        with pytest.raises(UserError, match="--out .*holds the input --ingredients"):
            refuse_output_on_input([], [("--ingredients", inp)], replaced_dirs=[("--out", soup)])
    sibling = tmp_path / "soup2" / "a.pt"  # shares the prefix, is not inside
    sibling.parent.mkdir()
    sibling.write_bytes(b"x")
    refuse_output_on_input([], [("--ingredients", sibling)], replaced_dirs=[("--out", soup)])


# ---------------------------------------------------------------------------
# Small helpers


def test_check_writable_dir_and_ensure_new_output(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        common.check_writable_dir(f / "a" / "b", "--out")
    common.check_writable_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # a check, not a side effect
    (tmp_path / "run").mkdir()
    common.ensure_new_output(tmp_path / "run", "summary.json", overwrite=False)
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="--overwrite"):
        common.ensure_new_output(tmp_path / "run", "summary.json", overwrite=False)
    common.ensure_new_output(tmp_path / "run", "summary.json", overwrite=True)


def test_jsonl_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    common.write_jsonl(p, [{"a": 1}, {"a": 2}])
    common.append_jsonl(p, {"a": 3})
    with open(p, "a") as f:
        f.write('{"a": 4, "b')
    assert [r["a"] for r in common.read_jsonl(p)] == [1, 2, 3]


def test_write_error_classifies():
    assert common.write_error("p", ValueError("x")) is None
    assert common.write_error("p", RuntimeError("shape mismatch")) is None
    e = common.write_error("p", OSError(errno.EROFS, "Read-only file system"))
    assert "p: cannot write (Read-only file system); choose a writable output path" in str(e)
    e = common.write_error("p", IsADirectoryError(errno.EISDIR, "Is a directory"))
    assert "not a directory" in str(e)


def test_dirlock_on_a_full_disk(full_fs):
    with open(full_fs / "filler", "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while f.write(b"\0" * 4096):
                pass
    with pytest.raises(UserError, match="No space left"):
        DirLock(full_fs / "run").acquire()
    assert sorted(os.listdir(full_fs)) == ["filler"]  # no empty lock left to block the next run


def test_help_formatter_shows_each_default_once():
    p = argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="passes over the data")
    p.add_argument("--name", default=None, help="run name (default: model_task)")
    text = " ".join(p.format_help().split())
    assert "passes over the data (default: 3)" in text
    assert "run name (default: model_task)" in text and "(default: None)" not in text
