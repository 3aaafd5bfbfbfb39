"""Helpers every script shares: errors, flag types, atomic writes and output transactions,
directory locks, CLI plumbing, metrics.

Only the standard library and numpy, so vote.py and synth.py (no torch) can use it too.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np


class UserError(Exception):
    """Bad input or bad usage. The message names the file and the fix; CLI exits 2."""


# ---------------------------------------------------------------------------
# Atomic writes: temp file in the same directory + fsync + os.replace, so a
# killed process never leaves a half-written file that looks complete.


def write_error(path: str | os.PathLike, e: BaseException) -> UserError | None:
    """The one-line UserError for a failed write of `path`, or None when `e` is not an I/O failure."""
    if isinstance(e, UserError):
        return e
    if isinstance(e, OSError) and e.errno is None and "requested and" in str(e):
        why, code = f"short write: {e} (disk full?)", errno.ENOSPC  # numpy's tofile
    elif isinstance(e, OSError):
        why, code = e.strerror or str(e), e.errno
    elif isinstance(e, RuntimeError) and any(
        s in str(e)
        for s in ("No space left", "file write failed", "write failed", "unexpected pos")
    ):  # torch.save reports a failed write (ENOSPC) as RuntimeError
        why, code = "write failed (disk full?)", errno.ENOSPC
    else:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that file system or choose another output path"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable output path"
    elif code == errno.EISDIR:
        fix = "give a file path, not a directory"
    else:
        fix = "check the path and the disk, then run again"
    return UserError(f"{path}: cannot write ({why}); {fix}; the previous file, if any, is intact")


def _tmp_beside(path: Path) -> str:
    """An empty temp file beside `path` (same suffix, so np.save keeps the name), mode 0666&~umask."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file path for this output")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=parent)
    except OSError as e:
        above = parent.absolute()
        while not above.exists() and above != above.parent:
            above = above.parent
        why = f"{above} is a file, not a directory" if above.is_file() else e.strerror
        raise UserError(
            f"{path}: cannot write here ({why}); choose a writable output path"
        ) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file open()'s usual mode
    return tmp


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):  # make renames durable
        fd = os.open(d if str(d) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_temp(tmp: str) -> None:
    """Delete a temp file, emptied first: a failed writer (torch.save) may keep it open from a
    traceback's frames, and an open unlinked file would keep its disk space."""
    with contextlib.suppress(OSError):
        os.truncate(tmp, 0)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it replaces `path` atomically.

    Any failure (the body's write, fsync, rename; a full disk) removes the temp file, leaves the
    old `path` as it was, and an I/O failure becomes one UserError naming `path`.
    """
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _remove_temp(tmp)
        err = write_error(path, e)
        if err is None or err is e:
            raise
        raise err from None
    _fsync_dir(path.parent)


class Outputs:
    """Every output of one command, staged as temp files and committed together at the end.

    `with Outputs() as out: np.save(out.path(a), x); write(out.path(b))` writes nothing visible
    until the block ends without error; then each temp file replaces its target (fsynced first).
    An error or a kill inside the block leaves every target as it was (temp files are removed,
    or, after a kill, are dot-files named `.NAME.*.tmp*` beside the target).
    """

    def __init__(self) -> None:
        self.staged: list[tuple[str, Path]] = []

    def path(self, final: str | os.PathLike) -> str:
        """A temp path that becomes `final` at commit."""
        final = Path(final)
        if any(f == final for _, f in self.staged):
            raise ValueError(f"{final} staged twice")
        tmp = _tmp_beside(final)
        self.staged.append((tmp, final))
        return tmp

    def text(self, final: str | os.PathLike, text: str) -> None:
        with open(self.path(final), "w", encoding="utf-8") as f:
            f.write(text)

    def json(self, final: str | os.PathLike, obj) -> None:
        self.text(final, json.dumps(obj, indent=2, default=_json_default) + "\n")

    def commit(self) -> list[Path]:
        """Make every staged file visible; returns the targets."""
        for tmp, final in self.staged:
            try:
                _fsync_file(tmp)
            except BaseException as e:
                self.abort()
                raise write_error(final, e) or e from None
        for tmp, final in self.staged:
            try:
                os.replace(tmp, final)
            except OSError as e:
                self.abort()
                raise write_error(final, e) from None
        for d in {f.parent for _, f in self.staged}:
            _fsync_dir(d)
        done = [f for _, f in self.staged]
        self.staged = []
        return done

    def abort(self) -> None:
        for tmp, _ in self.staged:
            _remove_temp(tmp)
        self.staged = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, kind, e, tb) -> None:
        if kind is None:
            self.commit()
            return
        # the file being written when it failed: the last one staged
        where = self.staged[-1][1] if self.staged else "output"
        self.abort()
        if e is not None and not isinstance(e, UserError):
            err = write_error(where, e)
            if err is not None:
                raise err from None


def staged_dir(final: str | os.PathLike) -> Path:
    """A fresh empty staging directory beside `final` (commit it with `commit_dir`)."""
    final = Path(final)
    stage = final.parent / f".{final.name}.staging-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def commit_dir(stage: str | os.PathLike, final: str | os.PathLike) -> None:
    """Replace directory `final` by `stage`: the old one is removed only after the swap."""
    stage, final = Path(stage), Path(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str | os.PathLike) -> None:
    """After a kill between the two renames of `commit_dir`: put the old directory back; drop stale
    staging directories of dead processes."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    old, staging = f".{final.name}.old", f".{final.name}.staging"
    for p in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = p.name.rpartition("-")
        # exactly this directory's leftovers (".run.v2.old-7" belongs to "run.v2", not "run")
        if kind not in (old, staging) or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == old and not final.exists():
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------
# One writer per output directory


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """Exclusive lock on an output directory: `.NAME.lock` beside it holds the owner's pid.

    A second command on the same directory is refused (UserError naming the holder); a lock left
    by a killed process (its pid is gone) is taken over. Use as a context manager.
    """

    def __init__(self, target: str | os.PathLike, flag: str = "--out"):
        self.target = Path(target)
        self.flag = flag
        self.file = self.target.parent / f".{self.target.name}.lock"
        self.held = False

    def acquire(self) -> DirLock:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self.holder()
                if pid is not None and _alive(pid):
                    raise UserError(
                        f"{self.target}: in use by another command (pid {pid}, lock {self.file}); "
                        f"wait for it to finish or choose another {self.flag}"
                    ) from None
                if pid is None and self._age() < 10:  # just created, its pid not written yet
                    raise UserError(
                        f"{self.target}: being taken by another command (lock {self.file}); "
                        f"wait for it to finish or choose another {self.flag}"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.file)  # stale: its owner was killed
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as e:  # a full disk: no half-made lock left behind
                with contextlib.suppress(OSError):
                    os.unlink(self.file)
                raise write_error(self.file, e) from None
            self.held = True
            return self
        raise UserError(f"{self.file}: cannot take the lock; remove it if no command is running")

    def _age(self) -> float:
        try:
            return time.time() - self.file.stat().st_mtime
        except OSError:
            return float("inf")

    def holder(self) -> int | None:
        try:
            text = self.file.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                os.unlink(self.file)
            self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------
# Outputs never land on inputs


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(child: Path, parent: Path) -> bool:
    c, p = os.path.realpath(child), os.path.realpath(parent)
    return c == p or c.startswith(p.rstrip(os.sep) + os.sep)


def refuse_output_on_input(
    outputs: Iterable[tuple[str, str | os.PathLike | None]],
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    replaced_dirs: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> None:
    """UserError when an output file is one of the inputs, or an input lies inside an output
    directory that this command replaces. Each item is (flag, path); None paths are skipped."""
    inputs = [(f, Path(p)) for f, p in inputs if p is not None and str(p) != ""]
    for flag, out in outputs:
        if out is None:
            continue
        for iflag, inp in inputs:
            if _same(Path(out), inp):
                raise UserError(
                    f"{flag} {out}: is the input {iflag} {inp}; writing it would destroy the "
                    f"input, choose another {flag}"
                )
    for flag, d in replaced_dirs:
        if d is None:
            continue
        for iflag, inp in inputs:
            if _inside(inp, Path(d)):
                raise UserError(
                    f"{flag} {d}: holds the input {iflag} {inp}, and this command replaces it; "
                    f"choose another {flag} or move the input"
                )


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def append_jsonl(path: str | os.PathLike, obj) -> None:
    """Append one JSON object as a line (flushed and fsynced: a log, not a result)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write a whole JSON-lines file atomically."""
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def read_csv(path: str | os.PathLike, nrows: int | None = None, numeric: bool = False):
    """A CSV as a pandas DataFrame of text cells, as written ('007' stays '007', 'NA' is not
    NaN), headers stripped; numeric=True parses every column but the first (the ids). UserError
    when it cannot be parsed. pandas is imported here only, so this module stays light."""
    import pandas as pd

    try:
        dtype = str
        if numeric:
            header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
            dtype = {header[0]: str} if len(header) else str
        df = pd.read_csv(
            path, dtype=dtype, keep_default_na=False, nrows=nrows, encoding="utf-8-sig"
        )
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot parse as CSV ({why}); fix the file") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a torn last line (killed writer) is ignored."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _json_default(o):
    if hasattr(o, "tolist"):  # numpy / torch arrays and scalars
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def jsonable(obj):
    """Return `obj` reduced to JSON types (for args stored in checkpoints)."""
    return json.loads(json.dumps(obj, default=_json_default))


# ---------------------------------------------------------------------------
# CLI plumbing


@contextlib.contextmanager
def cli_errors(prog: str | None = None) -> Iterator[None]:
    """Turn UserError into one line on stderr + exit 2; Ctrl-C into exit 130."""
    prog = prog or Path(sys.argv[0]).name
    try:
        yield
    except UserError as e:
        msg = str(e).splitlines()[0] if str(e) else "bad input"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


def _one_line_error(parser: argparse.ArgumentParser):
    def error(message: str):
        print(f"{parser.prog}: error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)

    return error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after every flag's help, unless the help already says its
    default in words ("default: the data's")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if re.search(r"\bdefault\b", text) else super()._get_help_string(action)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv, taking defaults from `--config FILE.json|yaml` (keys are flag names; CLI wins).

    Every error is one stderr line and exit 2 (argparse's usage block is left out); values from
    the config file go through the same flag types as the command line.
    """
    parser.error = _one_line_error(parser)
    argv, dotted = split_dotted_overrides(sys.argv[1:] if argv is None else list(argv), parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    defaults = _read_config(known.config, parser) if known.config else {}
    if dotted:  # `train.batch_size=512 optim.lr=5e-3`: over the file, under the flags
        defaults.update(_config_entries(dotted, parser, "command line", nested=False))
    if defaults:
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


# The dirty-MNIST seed's nested YAML (sections data/model/optim/train) and its dotted command-line
# overrides: SECTION.KEY -> the flag below; any other SECTION.KEY -> --KEY when that is a flag of
# the script; keys with no equivalent are named in one warning (README "coming from ...").
CONFIG_SECTIONS = ("data", "model", "optim", "train")
SEED_CONFIG_KEYS = {
    "data.image_size": "img_size",
    "data.train.labels": "data",  # the answer CSV; its images lie beside it
    "model.model_name": "model",
    "model.name": "model",
    "model.drop_rate": "drop",
    "model.drop_path_rate": "drop_path",
    "optim.opt": "opt",
    "optim.name": "opt",
    "train.accumulate_grad_batches": "accum_steps",
    "train.gradient_clip_val": "clip_grad",  # 0 = off
    "train.gradient_checkpointing": "grad_checkpointing",
    "train.seed": "random_seed",
    "train.num_workers": "workers",
}
SEED_CONFIG_IGNORED = {
    "data.train.filenames": "images are found beside data.train.labels",
    "data.validation.filenames": "the held-out part is --val-ratio of --data",
    "data.validation.labels": "the held-out part is --val-ratio of --data",
    "model.num_classes": "taken from the data",
    "optim.betas": "optimizer defaults",
    "optim.eps": "optimizer defaults",
    "optim.filter_bias_and_bn": "no weight decay on norms and biases, always",
    "train.validation_interval": "validation after every epoch",
    "train.log_every_n_steps": "one log row per epoch",
}


def split_dotted_overrides(argv: list[str], parser: argparse.ArgumentParser):
    """(argv without them, {"train.batch_size": "512", ...}) for SECTION.KEY=VALUE arguments
    that are not the value of a preceding option."""
    rest, dotted = [], {}
    for i, a in enumerate(argv):
        prev = argv[i - 1] if i else ""
        prev_action = parser._option_string_actions.get(prev.split("=", 1)[0])
        takes_value = prev_action is not None and prev_action.nargs in (None, 1, "+", "*")
        takes_value = takes_value and "=" not in prev
        if _DOTTED.match(a) and not takes_value:
            k, _, v = a.partition("=")
            dotted[k] = _scalar(v)
        else:
            rest.append(a)
    return rest, dotted


_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)+=")


def _scalar(text: str):
    """A command-line override's value: true/false/null as in YAML, anything else as given."""
    low = text.strip().lower()
    return {"true": True, "false": False, "null": None, "none": None}.get(low, text)


def flatten_config(cfg: dict, dests: set[str], prefix: str = "") -> dict:
    """Nested sections -> dotted keys ({"train": {"batch_size": 8}} -> {"train.batch_size": 8});
    a top-level key that is a flag keeps its value (a dict there is a bad value), except the
    seed's section names (--data is a flag, `data:` a section)."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        section = prefix or k in CONFIG_SECTIONS or _dest(k) not in dests
        if isinstance(v, dict) and section:
            out.update(flatten_config(v, dests, key + "."))
        else:
            out[key] = v
    return out


def _dest(key: str) -> str:
    return str(key).lstrip("-").replace("-", "_")


def _config_entries(flat: dict, parser: argparse.ArgumentParser, where: str, nested: bool) -> dict:
    """Flag dest -> checked value for each (dotted) key; unknown keys refused, seed keys with no
    equivalent (or, in a nested file, keys for another script) named in one warning."""
    actions = {a.dest: a for a in parser._actions}
    out, ignored, mapped = {}, [], []
    for k, v in flat.items():
        dest = _dest(k)
        if dest not in actions and "." in k:
            if k in SEED_CONFIG_KEYS:
                dest = SEED_CONFIG_KEYS[k]
                if dest == "clip_grad" and v in (0, 0.0, "0", "0.0"):
                    v = None
            else:
                dest = _dest(k.rsplit(".", 1)[1])
            if dest in actions:
                mapped.append(f"{k} -> --{dest.replace('_', '-')}")
        if dest not in actions:
            if k in SEED_CONFIG_IGNORED or (nested and "." in k and k in SEED_CONFIG_KEYS):
                ignored.append(f"{k} ({SEED_CONFIG_IGNORED.get(k, 'not a flag of this script')})")
                continue
            raise UserError(
                f"{where}: unknown key '{k}'; use flag names from --help (nested SECTION.KEY: "
                "see README 'Coming from ...')"
            )
        out[dest] = _config_value(actions[dest], v, f"{where}: key '{k}'")
    for line in (
        f"config ({where}): {', '.join(mapped)}" if mapped else "",
        f"config ({where}): ignored, no equivalent: {', '.join(ignored)}" if ignored else "",
    ):
        if line and line not in _SAID:  # a script may parse its argv twice (finetune.py)
            _SAID.add(line)
            print(line, file=sys.stderr)
    return out


_SAID: set[str] = set()


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--config {path}: is a directory; pass a .json or .yaml file")
    if not p.is_file():
        raise UserError(f"--config {path}: no such file; pass an existing .json or .yaml file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # optional: only for YAML configs
            except ImportError:
                raise UserError(
                    f"{path}: YAML config needs PyYAML (pip install pyyaml) or use JSON"
                ) from None
            cfg = yaml.safe_load(text) or {}
        else:
            cfg = json.loads(text)
    except (ValueError, Exception) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: cannot parse config ({e}); fix the syntax") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: config must be a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    flat = flatten_config(cfg, dests)
    return _config_entries(flat, parser, path, nested=len(flat) != len(cfg) or flat != cfg)


def _config_value(action: argparse.Action, v, where: str):
    """A config value checked as the flag would check it on the command line."""
    if v is None:
        return v
    if action.nargs == 0:  # store_true / store_false / --x/--no-x: only a JSON true or false
        if not isinstance(v, bool):
            raise UserError(f"{where}: {v!r} is not true or false; fix the value")
        return v  # the value of the flag's dest, as set_defaults takes it
    if action.nargs == "?" and isinstance(v, bool) and action.const is not None:
        return action.const if v else action.default  # "resume": true is a bare --resume
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    one_list = getattr(action.type, "is_list", False)  # list_of: one value holding a list
    if isinstance(v, (dict, bool)) or (isinstance(v, list) and not many and not one_list):
        raise UserError(f"{where}: {json.dumps(v)} is not a value of this flag; fix the value")
    try:
        if isinstance(v, list) and many:
            v = [action.type(str(x)) if action.type else x for x in v]
        elif isinstance(v, list):  # one list_of value (e.g. comma-separated fractions)
            if any(isinstance(x, (list, dict, bool)) for x in v):
                raise ValueError(f"{json.dumps(v)} is not a flat list")
            v = action.type(",".join(map(str, v)))
        elif action.type is not None:
            v = action.type(str(v))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}; fix the value") from None
    if action.choices is not None and isinstance(v, list) and many:
        for x in v:
            if x not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise UserError(f"{where}: {x!r} is not one of {choices}; fix the value")
    if action.choices is not None and not isinstance(v, list) and v not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UserError(f"{where}: {v!r} is not one of {choices}; fix the value")
    return v


# ---------------------------------------------------------------------------
# Flag types: every numeric flag of every script is range-checked by one of these


def _number(text: str, kind: type, what: str):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number; give {what}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"'{text}' is not finite; give {what}")
    return v


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number in [lo, hi] (either bound optional)."""
    what = _describe("a whole number", lo, hi, False, False)

    def check(text: str) -> int:
        try:
            v = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a whole number; give {what}"
            ) from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range; give {what}")
        return v

    check.__name__ = what
    return check


def float_range(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], float]:
    """argparse type: a finite number in the interval (open ends optional)."""
    what = _describe("a number", lo, hi, lo_open, hi_open)

    def check(text: str) -> float:
        v = _number(str(text).strip(), float, what)
        bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (
            hi is not None and (v > hi or (hi_open and v == hi))
        )
        if bad:
            raise argparse.ArgumentTypeError(f"{v:g} is out of range; give {what}")
        return v

    check.__name__ = what
    return check


def _describe(base: str, lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{base} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{base} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{base} {'<' if hi_open else '<='} {hi:g}"
    return f"{base}"


def list_of(item: Callable[[str], object], min_len: int = 1) -> Callable[[str], list]:
    """argparse type: comma-separated values, each checked by `item`."""

    def check(text: str) -> list:
        parts = [s.strip() for s in str(text).split(",") if s.strip()]
        if len(parts) < min_len:
            raise argparse.ArgumentTypeError(
                f"'{text}' has {len(parts)} values; give at least {min_len}, comma-separated"
            )
        return [item(s) for s in parts]

    check.__name__ = f"comma-separated list of {getattr(item, '__name__', 'values')}"
    check.is_list = True  # a config file may give it as a JSON list
    return check


positive_int = int_range(1)
nonneg_int = int_range(0)
positive_float = float_range(0, lo_open=True)
nonneg_float = float_range(0)
finite_float = float_range()
fraction = float_range(0, 1, hi_open=True)  # [0, 1): a share that cannot be everything
probability = float_range(0, 1)  # [0, 1]
open_fraction = float_range(0, 1, lo_open=True, hi_open=True)  # (0, 1)
seed_int = int_range(0, 2**32 - 1)
threads_int = int_range(1, 1024)


def size2(img_size) -> tuple[int, int]:
    """An image size N, [N], (H, W) or "HxW" as (H, W) of positive ints; UserError otherwise."""
    vals = img_size
    if isinstance(vals, str):
        vals = vals.lower().replace(",", "x").split("x")
    elif not isinstance(vals, list | tuple):
        vals = [vals]
    try:
        ints = [int(v) for v in vals]
        if any(float(v) != i for v, i in zip(vals, ints)):  # 2.5 is no size
            ints = []
        vals = ints * 2 if len(ints) == 1 else ints
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 2 or min(vals) < 1:
        raise UserError(f"image size {img_size!r}: expected N or HxW with positive sides")
    return vals[0], vals[1]


def image_size(lo: int = 1, hi: int = 8192) -> Callable[[str], int | tuple[int, int]]:
    """argparse type: N or HxW (sides in [lo, hi]); N stays an int, HxW becomes (H, W)."""
    what = f"N or HxW with sides in [{lo}, {hi}]"

    def check(text: str) -> int | tuple[int, int]:
        try:
            h, w = size2(text)
        except UserError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not an image size; give {what}"
            ) from None
        if not (lo <= h <= hi and lo <= w <= hi):
            raise argparse.ArgumentTypeError(f"'{text}' is out of range; give {what}")
        return h if "x" not in str(text).lower().replace(",", "x") else (h, w)

    check.__name__ = what
    return check


def refuse_together(args: argparse.Namespace, *groups: Sequence[str]) -> None:
    """UserError when two flags of one group are both set (truthy)."""
    for group in groups:
        given = [f for f in group if getattr(args, f.lstrip("-").replace("-", "_"), None)]
        if len(given) > 1:
            raise UserError(f"{given[0]} and {given[1]} cannot be used together; drop one of them")


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Flags with the same meaning in every script (README "What is guaranteed")."""
    p.add_argument("--config", help="JSON/YAML file whose keys are flag names; CLI wins")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def pyplot(flag: str):
    """matplotlib.pyplot on the file-only Agg backend (imported here only, for the plot flags);
    UserError naming `flag` when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            f"{flag} needs matplotlib (pip install matplotlib); or drop {flag}"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress(iterable, quiet: bool = False, **kw):
    """tqdm progress bar on a TTY unless quiet; the plain iterable otherwise."""
    if quiet or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, dynamic_ncols=True, leave=False, **kw)


class Timer:
    """Wall-clock timer: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def format_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """Plain-text table with aligned columns (markdown-compatible)."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.4f}"
    return str(c)


def ensure_new_output(path: str | os.PathLike, marker: str, overwrite: bool) -> None:
    """Refuse to reuse an output directory holding a finished run unless --overwrite."""
    if not overwrite and (Path(path) / marker).exists():
        raise UserError(
            f"{path}: already holds a finished run ({marker}); pass --overwrite, --resume, "
            "or a new --name"
        )


def check_writable_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """UserError now, before any long work, when directory `path` cannot be created or written."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(
            f"{flag} {path}: {probe} is a file, so no directory can be made under it; "
            f"choose another {flag}"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable; choose another {flag}")


# ---------------------------------------------------------------------------
# Metrics, the one implementation every script uses (numpy; y are class indices [N], or N x K
# 0/1 arrays for multi-label)


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    return t, p


def multi_hot(probs, thresholds=0.5, min_labels: int = 0, max_labels: int = 0) -> np.ndarray:
    """The multi-label decision, N x K probabilities -> N x K int64 0/1: a label is on where its
    probability reaches its threshold; a row with fewer than `min_labels` on gets its best
    others, and one with more than `max_labels` (0: no cap) keeps its best, best meaning the
    highest probability / threshold (every label that is on ranks above every one that is off).
    """
    p = np.asarray(probs, dtype=np.float64)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), p.shape)
    on = p >= thr
    if min_labels or max_labels:
        # p / threshold is >= 1 where on and < 1 where off; + on keeps that order at threshold 0
        key = p / np.maximum(thr, 1e-12) + on
        best_first = np.argsort(-key, axis=1, kind="stable")
        rows = np.arange(len(p))[:, None]
        on[rows, best_first[:, :min_labels]] = True
        if max_labels:
            keep = np.zeros_like(on)
            keep[rows, best_first[:, :max_labels]] = True
            on &= keep
    return on.astype(np.int64)


def add_label_limit_flags(group) -> None:
    """--min-labels / --max-labels: the bounds multi_hot applies (infer.py, vote.py)."""
    group.add_argument(
        "--min-labels",
        type=nonneg_int,
        default=None,
        help="multi-label: an image with fewer labels over their thresholds gets its most likely "
        "others (highest probability / threshold) up to this many, e.g. 1 where every image has "
        "one (None: 0, or the bounds a --threshold file was tuned with)",
    )
    group.add_argument(
        "--max-labels",
        type=nonneg_int,
        default=None,
        help="multi-label: keep at most this many labels per image, the most likely (0: no cap; "
        "None: 0, or the bounds a --threshold file was tuned with)",
    )


def resolve_label_limits(args, multi_label: bool, k: int, recorded=(0, 0)) -> tuple[int, int]:
    """--min-labels / --max-labels, each `recorded` where not given (the bounds a thresholds
    file was tuned with), set on args and returned; multi-label only, at most k, min <= max."""
    given = [f for f, v in (("--min-labels", args.min_labels), ("--max-labels", args.max_labels))
             if v is not None]  # fmt: skip
    if given and not multi_label:
        raise UserError(f"{given[0]}: only for multi-label inputs (single-label: argmax)")
    lo = int(recorded[0]) if args.min_labels is None else args.min_labels
    hi = int(recorded[1]) if args.max_labels is None else args.max_labels
    if lo > k or hi > k:
        flag, n = ("--min-labels", lo) if lo > k else ("--max-labels", hi)
        raise UserError(f"{flag} {n}: there are {k} classes; give at most {k}")
    if hi and lo > hi:
        raise UserError(f"--min-labels {lo} exceeds --max-labels {hi}; give min <= max")
    args.min_labels, args.max_labels = lo, hi
    return lo, hi


# ---------------------------------------------------------------------------
# Multi-label thresholds: tuning on val and the thresholds file (infer.py, vote.py)

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


def _f1_per_threshold(p: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    pred = p[:, None] >= grid[None, :]
    pos = y.astype(bool)[:, None]
    tp = (pred & pos).sum(0)
    fp = (pred & ~pos).sum(0)
    fn = (~pred & pos).sum(0)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)  # nothing to find: perfect


def _pick(scores: np.ndarray, grid: np.ndarray) -> float:
    """Best threshold; ties go to the one nearest 0.5 (the untuned default)."""
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return float(grid[best[np.argmin(np.abs(grid[best] - 0.5))]])


def tune_thresholds(
    probs: np.ndarray,
    labels: np.ndarray,
    metric: str = "f1",
    grid: np.ndarray | None = None,
    limits=(0, 0),
) -> np.ndarray:
    """Per-class thresholds maximising each class's F1 (`f1`) or the exact-match rate (`exact`,
    coordinate ascent from 0.5, two sweeps over the classes, scored under `limits`: the
    --min-labels / --max-labels that common.multi_hot will apply; `f1` is per class)."""
    grid = THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels) > 0.5
    k = p.shape[1]
    if metric == "f1":
        return np.array([_pick(_f1_per_threshold(p[:, j], y[:, j], grid), grid) for j in range(k)])
    if metric != "exact":
        raise UserError(f"--tune-threshold {metric}: choose f1 or exact")
    thr = np.full(k, 0.5)
    for _ in range(2):
        for j in range(k):
            if any(limits):
                thr[j] = _pick(_exact_per_threshold(p, y, thr, j, grid, limits), grid)
                continue
            right = (p >= thr) == y
            others = np.delete(right, j, axis=1).all(1)
            hit = (p[:, j, None] >= grid[None, :]) == y[:, j, None]
            thr[j] = _pick((others[:, None] & hit).mean(0), grid)
    return thr


def _exact_per_threshold(p, y, thr, j, grid, limits) -> np.ndarray:
    """Exact match under common.multi_hot(p, thr, *limits) for each grid value of class j's
    threshold, the others held, without deciding every grid value. multi_hot ranks the labels
    by key = p / threshold + on (stable: ties to the lower index) and keeps a prefix of length
    f = clip(labels on, min, max), so a row is exact iff f equals its number of true labels and
    every true label outranks every false one."""
    n, k = p.shape
    lo, hi = limits
    key = p / np.maximum(thr, 1e-12) + (p >= thr)
    pos = np.empty((n, k), dtype=np.int64)  # rank of each label, j included (it is masked below)
    np.put_along_axis(pos, np.argsort(-key, axis=1, kind="stable"), np.arange(k)[None, :], axis=1)
    rows = np.arange(n)
    others = np.arange(k) != j
    t_pos = np.where(y & others, pos, -1)  # weakest true label other than j: largest rank
    f_pos = np.where(~y & others, pos, k)  # strongest false label other than j: smallest rank
    weak_t, strong_f = t_pos.argmax(1), f_pos.argmin(1)
    has_t, has_f = t_pos.max(1) >= 0, f_pos.min(1) < k
    kj_t, kj_f = key[rows, weak_t], key[rows, strong_f]
    rest_ok = ~has_t | ~has_f | (t_pos.max(1) < f_pos.min(1))

    g = np.asarray(grid, dtype=np.float64)[None, :]
    pj = p[:, j, None]
    on_j = pj >= g
    key_j = pj / np.maximum(g, 1e-12) + on_j  # N x G, the same arithmetic as multi_hot
    count = (p >= thr)[:, others].sum(1)[:, None] + on_j
    f = np.maximum(count, lo)
    if hi:
        f = np.minimum(f, hi)
    size_ok = f == y.sum(1)[:, None]
    # "a outranks b": a larger key, or an equal key and a lower index
    j_beats_f = (key_j > kj_f[:, None]) | ((key_j == kj_f[:, None]) & (j < strong_f)[:, None])
    t_beats_j = (kj_t[:, None] > key_j) | ((kj_t[:, None] == key_j) & (weak_t < j)[:, None])
    order_ok = (
        np.where(y[:, j, None], ~has_f[:, None] | j_beats_f, ~has_t[:, None] | t_beats_j)
        & rest_ok[:, None]
    )
    return (size_ok & order_ok).mean(0)


def threshold_arg(text: str) -> str:
    """argparse type of --threshold: a probability in [0, 1] or the path of a thresholds file."""
    if is_number(text):
        probability(text)
    return text


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_thresholds(text: str, classes: list[str]) -> tuple[np.ndarray, tuple[int, int]]:
    """--threshold (checked by threshold_arg): one number for every class, or a JSON file
    written by --tune-threshold; with the --min-labels / --max-labels it was tuned under."""
    if is_number(text):
        return np.full(len(classes), float(text)), (0, 0)
    return _thresholds_file(Path(text), classes)


def _thresholds_file(p: Path, classes: list[str]) -> tuple[np.ndarray, tuple[int, int]]:
    if p.is_dir():
        raise UserError(f"--threshold {p}: is a directory; pass a .thresholds.json file")
    if not p.is_file():
        raise UserError(f"--threshold {p}: neither a number nor a thresholds JSON file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
        thr = [float(v) for v in obj["thresholds"]]
        cls = [str(c) for c in obj.get("classes", classes)]
        limits = (int(obj.get("min_labels") or 0), int(obj.get("max_labels") or 0))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{p}: not a thresholds file ({e}); rerun --tune-threshold") from None
    if cls != list(classes) or len(thr) != len(classes):
        raise UserError(f"{p}: thresholds for other classes {brief(cls)}; rerun tuning")
    if not all(0 <= t <= 1 for t in thr):
        raise UserError(f"{p}: thresholds outside [0, 1]; rerun --tune-threshold")
    if min(limits) < 0 or len(classes) < max(limits) or (limits[1] and limits[0] > limits[1]):
        raise UserError(f"{p}: min_labels / max_labels {limits} impossible; rerun tuning")
    return np.array(thr), limits


def exact_match_accuracy(y_true, y_pred) -> float:
    """Multi-label: fraction of rows whose whole 0/1 vector is right."""
    t, p = _pair(y_true, y_pred)
    return float((t == p).all(axis=1).mean()) if len(t) else float("nan")


def accuracy(y_true, y_pred) -> float:
    """Fraction right; exact-match accuracy for N x K multi-label arrays."""
    t, p = _pair(y_true, y_pred)
    if t.ndim == 2:
        return exact_match_accuracy(t, p)
    return float((t == p).mean()) if len(t) else float("nan")


def confusion_matrix(y_true, y_pred, n_classes: int | None = None) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted class."""
    t, p = _pair(y_true, y_pred)
    t, p = t.astype(np.int64), p.astype(np.int64)
    k = n_classes or int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def macro_f1(y_true, y_pred, n_classes: int | None = None) -> float:
    """Unweighted mean F1 over classes seen in y_true or y_pred (all columns if multi-label)."""
    t, p = _pair(y_true, y_pred)
    if t.ndim == 2:
        t, p = t.astype(bool), p.astype(bool)
        tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
        present = np.ones(t.shape[1], dtype=bool)  # as sklearn: an empty column scores 0
    else:
        cm = confusion_matrix(t, p, n_classes)
        tp = np.diag(cm)
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        present = (cm.sum(0) + cm.sum(1)) > 0
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean()) if present.any() else float("nan")


def per_class_accuracy(y_true, y_pred, n_classes: int | None = None) -> np.ndarray:
    """Per true class: fraction predicted right (NaN where absent); per column if multi-label."""
    t, p = _pair(y_true, y_pred)
    if t.ndim == 2:
        return (t == p).mean(0)
    cm = confusion_matrix(t, p, n_classes)
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


# One vocabulary for the metric flags of every script (soup --metric, vote --metric): canonical
# name -> accepted spellings. Scripts store scores under the short keys ("acc", "f1").
METRICS = {"accuracy": ("accuracy", "acc"), "macro-f1": ("macro-f1", "macro_f1", "f1")}
METRIC_KEYS = {"accuracy": "acc", "macro-f1": "f1"}


def metric_name(text: str) -> str:
    """argparse type: a metric name or alias (acc, f1, macro_f1) -> its canonical name."""
    t = str(text).strip().lower()
    for name, spellings in METRICS.items():
        if t in spellings:
            return name
    raise argparse.ArgumentTypeError(
        f"'{text}' is not a metric; choose accuracy (acc) or macro-f1 (f1)"
    )


metric_name.__name__ = "metric"


# ---------------------------------------------------------------------------
# Small text helpers


def natural_key(s) -> list:
    """Sort key: digit runs compare as numbers (i2 < i10, "2" < "10"), the rest as text."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def brief(v, n: int = 4, width: int = 60) -> str:
    """A short preview of a value for messages: long lists cut to n items plus their count."""
    if isinstance(v, (list, tuple)) and len(v) > n:
        return "[" + ", ".join(map(str, v[:n])) + f", ... ({len(v)} items)]"
    s = repr(v) if not isinstance(v, (list, tuple)) else "[" + ", ".join(map(str, v)) + "]"
    return s if len(s) <= width else s[: width - 3] + "..."
