"""Standard-library helpers every script shares: errors, atomic writes, CLI plumbing.

No third-party imports, so vote.py (numpy + pandas only) can use it too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


class UserError(Exception):
    """Bad input or bad usage. The message names the file and the fix; CLI exits 2."""


# ---------------------------------------------------------------------------
# Atomic writes: temp file in the same directory + fsync + os.replace, so a
# killed process never leaves a half-written file that looks complete.


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        above = parent.absolute()
        while not above.exists() and above != above.parent:
            above = above.parent
        why = f"{above} is a file, not a directory" if above.is_file() else e.strerror
        raise UserError(
            f"{path}: cannot write here ({why}); choose a writable --out directory"
        ) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file open()'s usual mode
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


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


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv, taking defaults from `--config FILE.json|yaml` (keys are flag names; CLI wins)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_read_config(known.config, parser))
    return parser.parse_args(argv)


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found; pass an existing .json or .yaml file")
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
    known = {a.dest for a in parser._actions}
    out = {}
    for k, v in cfg.items():
        dest = k.lstrip("-").replace("-", "_")
        if dest not in known:
            raise UserError(f"{path}: unknown key '{k}'; use flag names from --help")
        out[dest] = v
    return out


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Flags with the same meaning in every script (SPEC section 5)."""
    p.add_argument("--config", help="JSON/YAML file whose keys are flag names; CLI wins")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


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
