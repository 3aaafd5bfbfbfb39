"""Data: load image-classification data sets as uint8 tensors, split them, augment in batches.

Formats (auto-detected; --data-format overrides): idx, folder, csv, mask, pixels-csv, synth
(README "data.py"). A data set is decoded once into an N x C x H x W uint8 tensor and cached as
.npy, so later runs skip decoding; batches are then normalised and augmented as tensors on the
device. Augmentations and their parameters: AUG_HELP.

    python data.py --data ../shared/data/fashion-mnist --grid samples.png
"""

from __future__ import annotations

import argparse
import csv as csvlib
import gzip
import hashlib
import json
import math
import os
import re
import string
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import (
    HelpFormatter,
    Timer,
    UserError,
    add_common_flags,
    atomic_path,
    cli_errors,
    format_table,
    fraction,
    image_size,
    parse_args,
    progress,
    read_csv,
    seed_int,
    size2,
)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
LETTERS = [chr(ord("A") + i) for i in range(26)]
PARTS = ("train", "test")
SPLITS = ("train", "val", "test", "all")
AUGS = ("none", "flip", "vflip", "crop", "rot90", "randaug", "cutout", "ssr")
MIXES = ("cutmix", "mixup")
# Parameters an augmentation takes, as name:key=value:key=value (e.g. ssr:rotate=30:p=0.8):
# key -> (default, low, high). ssr's rotate=15 is the dirty-MNIST seed's; shift and scale are
# albumentations' ShiftScaleRotate defaults.
AUG_PARAMS: dict[str, dict[str, tuple[float, float, float]]] = {
    "ssr": {"rotate": (15.0, 0.0, 180.0), "shift": (0.0625, 0.0, 0.5), "scale": (0.1, 0.0, 0.9),
            "p": (0.5, 0.0, 1.0)},
    "cutout": {"size": (0.25, 0.0, 1.0), "p": (1.0, 0.0, 1.0)},
}  # fmt: skip
AUG_ALIASES = {"shift-scale-rotate": "ssr", "shiftscalerotate": "ssr"}
AUG_HELP = (
    "comma list of: none; flip / vflip (mirror left-right / up-down, p=0.5); crop (pad by --pad "
    "px, reflected, then crop back = a random shift of up to --pad px); rot90 (a random multiple "
    "of 90 degrees, square images); randaug (a light RandAugment of 3 ops, each p=0.5 per image: "
    "brightness +-0.25 std, contrast x0.75..1.25, translation up to 1/8 of the side; not the "
    "14-op RandAugment); cutout[:size=0.25][:p=1] (zero = the mean in one square of size x the "
    "shorter side at a random place); ssr[:rotate=15][:shift=0.0625][:scale=0.1][:p=0.5] "
    "(shift-scale-rotate: rotate by up to +-rotate degrees, shift by up to shift x the side, "
    "scale by 1+-scale, reflected border, bilinear); cutmix, mixup (with --mix-alpha)"
)
# 2: missing labels refused, classes.txt in the key (entries of version 1 may hold a "nan" class)
CACHE_VERSION = 2
# Cells that mean "no label" (pandas' NA spellings); a label column may not hold them.
MISSING_LABELS = {"", "nan", "na", "n/a", "<na>", "null", "none", "nat", "-nan", "#n/a"}
# Thread decoding only pays off for large images: PIL releases the GIL while decoding, but for
# 28x28 PNGs the per-file Python overhead dominates and threads are ~2x slower (measured).
THREAD_MIN_PIXELS = 96 * 96


class MissingPartError(UserError):
    """The data set has no such part (e.g. no test part)."""


@dataclass
class ImageSet:
    """A decoded data set (or a part of one): uint8 images plus labels and ids."""

    images: torch.Tensor  # uint8, N x C x H x W, CPU
    labels: torch.Tensor  # int64 [N] (-1 = unknown) or float32 [N, K] multi-hot (multi_label)
    ids: list[str]  # stable ids (file name stem, CSV id, or index as str)
    classes: list[str]
    multi_label: bool = False
    has_labels: bool = True
    groups: list[str] | None = None  # e.g. person id, for grouped splits
    fmt: str = ""
    source: str = ""
    info: dict = field(default_factory=dict)  # cached, seconds, cache_path, skipped

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def img_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, idx) -> ImageSet:
        """The samples at positions `idx` (sequence, array or tensor of int), in that order."""
        if isinstance(idx, torch.Tensor):
            t = idx.to(device="cpu", dtype=torch.long).reshape(-1)
        else:
            t = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))
        pos = t.tolist()
        return replace(
            self,
            images=self.images.take(t) if isinstance(self.images, LazyImages) else self.images[t],
            labels=self.labels[t],
            ids=[self.ids[i] for i in pos],
            groups=None if self.groups is None else [self.groups[i] for i in pos],
            info=dict(self.info),
        )


@dataclass
class Opts:
    """How to read a data set: the decode options every format loader receives, and the .npy
    cache (`cache`: use it; `cache_dir`: where, default default_cache_dir())."""

    img_size: tuple[int, int] | None = None
    in_chans: int | None = None
    skip_bad_images: bool = False
    label_column: str | None = None
    quiet: bool = False
    cache: bool = True
    cache_dir: str | Path | None = None
    saturation: bool = False  # add the saturation plane (saturation_plane) as a second channel

    def __post_init__(self):
        if self.saturation:
            if self.in_chans not in (None, 1, 2):
                raise UserError(
                    f"--saturation-channel reads grey images (its second channel is the "
                    f"saturation plane), not --in-chans {self.in_chans}; drop --in-chans"
                )
            self.in_chans = 2
        elif self.in_chans not in (None, 1, 3):
            raise UserError(f"--in-chans {self.in_chans}: expected 1 or 3")
        if self.img_size is not None:
            self.img_size = size2(self.img_size)

    @classmethod
    def of_checkpoint(cls, meta, img_size=None, **kw) -> Opts:
        """How to read data for a model trained as `meta` (a models.CheckpointMeta) says: its
        size (img_size wins), channels and saturation plane; kw: the other fields."""
        return cls(img_size or meta.img_size, meta.in_chans, saturation=meta.saturation, **kw)


@dataclass(frozen=True)
class SplitSpec:
    """How the train part is split into train/val: `val_ratio` held out with `seed`, or fold
    `fold` of a `kfold`-fold split (the val ratio is then 1/kfold)."""

    val_ratio: float = 0.1
    seed: int = 0
    kfold: int | None = None
    fold: int | None = None

    @classmethod
    def of(cls, record: dict | None) -> SplitSpec:
        """The spec that rebuilds the split a checkpoint records ({"seed", "val_ratio", ...})."""
        record = record or {}
        return cls(
            record.get("val_ratio", 0.1), record.get("seed", 0), record.get("kfold"),
            record.get("fold"),
        )  # fmt: skip


@dataclass
class Source:
    """What a format loader found: the files that define the data set (the cache key) and a
    function that decodes them into an ImageSet (called only on a cache miss)."""

    files: list[Path]
    decode: Callable[[], ImageSet]
    extra_key: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Memory


def estimate_bytes(n: int, channels: int, height: int, width: int) -> int:
    """Bytes of an N x C x H x W uint8 tensor."""
    return int(n) * int(channels) * int(height) * int(width)


def memory_budget() -> int | None:
    """Bytes a decoded data set may take: $IMGCLS_MAX_RAM_GB, else half of MemAvailable."""
    env = os.environ.get("IMGCLS_MAX_RAM_GB")
    if env:
        try:
            return int(float(env) * 2**30)
        except ValueError:
            raise UserError(f"IMGCLS_MAX_RAM_GB={env!r}: not a number of GiB") from None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return None  # unknown (not Linux): do not guess


def check_fits(n: int, channels: int, height: int, width: int, source: str) -> None:
    """UserError when N x C x H x W uint8 would not fit in the memory budget."""
    need = estimate_bytes(n, channels, height, width)
    budget = memory_budget()
    if budget is None or need <= budget:
        return
    side = max(1, int(math.sqrt(budget / max(1, n * channels))))
    raise UserError(
        f"{source}: does not fit in memory: {n} images of {channels}x{height}x{width} need "
        f"{need / 2**30:.2f} GiB as uint8, over the {budget / 2**30:.2f} GiB budget (half of "
        f"available memory, or $IMGCLS_MAX_RAM_GB); pass a smaller --img-size (at most {side})"
    )


# ---------------------------------------------------------------------------
# Format detection


def _existing(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: no such file or directory; pass --data pointing at a data set")
    return p


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _listdir(p: Path) -> list[Path]:
    try:
        return sorted(e for e in p.iterdir() if not e.name.startswith("."))
    except PermissionError:
        raise UserError(f"{p}: permission denied; make the data directory readable") from None


def _has_images(d: Path) -> bool:
    return any(_is_image(e) and e.is_file() for e in _listdir(d))


def _class_dirs(d: Path) -> list[Path]:
    """Subfolders of `d` that hold images (at any depth), sorted by name."""
    out = []
    for e in _listdir(d):
        if e.is_dir() and any(_walk_images(e, limit=1)):
            out.append(e)
    return out


def _walk_images(d: Path, limit: int | None = None) -> Iterator[Path]:
    n = 0
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_image(p):
                yield p
                n += 1
                if limit is not None and n >= limit:
                    return


_IDX_IMAGES = re.compile(r"^(?P<prefix>.*?)[-_.]?images[-_.]idx3[-_.]ubyte(?P<gz>\.gz)?$", re.I)
_IDX_LABELS = re.compile(r"^(?P<prefix>.*?)[-_.]?labels[-_.]idx1[-_.]ubyte(?P<gz>\.gz)?$", re.I)


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csvlib.reader(f), [])]
    except (OSError, UnicodeDecodeError, csvlib.Error) as e:
        raise UserError(f"{path}: cannot read CSV header ({e}); check the file") from None


def _pixel_columns(header: Sequence[str]) -> list[str]:
    """The pixel columns '0'..'N-1' of a pixels CSV (N a square >= 64), else []."""
    cols = [c for c in header if c.isdigit()]
    n = len(cols)
    side = int(math.isqrt(n))
    if n >= 64 and side * side == n and set(cols) == {str(i) for i in range(n)}:
        return [str(i) for i in range(n)]
    return []


def _looks_like_mask(p: Path) -> bool:
    imgs = p / "train" / "images"
    if imgs.is_dir():
        pat = re.compile(r"^[^_]+_(male|female)_[^_]+_\d+$", re.I)
        if any(pat.match(e.name) for e in _listdir(imgs)[:50] if e.is_dir()):
            return True
    return (p / "eval" / "info.csv").is_file() and (p / "eval" / "images").is_dir()


def _looks_like_idx(p: Path) -> bool:
    return any(_IDX_IMAGES.match(e.name) for e in _listdir(p))


def _looks_like_pixels_csv(p: Path) -> bool:
    train, _ = _csv_parts(p)
    return train is not None and bool(_pixel_columns(_csv_header(train)))


def _looks_like_csv(p: Path) -> bool:
    train, _ = _csv_parts(p)
    if train is None or not _path_column(_csv_header(train)):
        return False
    try:  # a stray CSV next to class folders must not win: its first image has to exist
        df = read_csv(train, nrows=1)
        if not len(df):
            return False
        _resolve_paths(df[_path_column(list(df.columns))].tolist(), train, "train", first_only=True)
        return True
    except UserError:
        return False


def _looks_like_folder(p: Path) -> bool:
    return bool(_class_dirs(p)) or _has_images(p)


# Ordered: the first detector that matches names the format. Add a format by adding a loader to
# FORMATS and, if it can be recognised, a detector here.
DETECTORS: list[tuple[str, Callable[[Path], bool]]] = [
    ("synth", lambda p: (p / "synth.json").is_file()),
    ("idx", _looks_like_idx),
    ("mask", _looks_like_mask),
    ("pixels-csv", _looks_like_pixels_csv),
    ("csv", _looks_like_csv),
    ("folder", _looks_like_folder),
]


def detect_format(path: str) -> str:
    """Name of the data format at `path`: idx|folder|csv|mask|pixels-csv|synth."""
    p = _existing(path)
    if p.is_file():
        if p.name == "synth.json":
            return "synth"
        if _IDX_IMAGES.match(p.name) or _IDX_LABELS.match(p.name):
            return "idx"
        if p.suffix.lower() == ".csv":
            return "pixels-csv" if _pixel_columns(_csv_header(p)) else "csv"
        raise UserError(
            f"{path}: not a data set file; pass a data directory, a .csv or an IDX "
            "*-images-idx3-ubyte[.gz] file"
        )
    if not _listdir(p):
        raise UserError(f"{path}: directory is empty; point --data at a folder holding the data")
    for name, looks in DETECTORS:
        if looks(p):
            return name
    raise UserError(
        f"{path}: unknown data layout (expected IDX files, <class>/ image folders, a CSV with "
        "path+label columns, a pixels CSV or a synth.json); pass --data-format or fix the layout"
    )


# ---------------------------------------------------------------------------
# Label helpers shared by the table formats


def _label_classes(
    values: Sequence[str], column: str, given: list[str] | None, where: str
) -> tuple[np.ndarray, list[str]]:
    """Map label strings to indices: a given class list, else ints as-is, else sorted names."""
    vals = [str(v).strip() for v in values]
    missing = next((i for i, v in enumerate(vals) if v.lower() in MISSING_LABELS), None)
    if missing is not None:
        what = f"a missing label ({vals[missing]!r})" if vals[missing] else "an empty label"
        raise UserError(
            f"{where}: row {missing + 2} has {what} in '{column}'; fill in every label "
            "(a missing label is not a class)"
        )
    if given is None:
        if all(_is_int(v) for v in vals):
            ints = np.array([int(float(v)) for v in vals], dtype=np.int64)
            if len(ints) and ints.min() < 0:
                raise UserError(
                    f"{where}: '{column}' has negative label {ints.min()}; labels must be 0..K-1"
                )
            k = int(ints.max()) + 1 if len(ints) else 0
            if column.lower() == "digit":
                k = max(k, 10)
            return ints, [str(i) for i in range(k)]
        uniq = sorted(set(vals))
        if column.lower() == "letter" and set(uniq) <= set(LETTERS):
            uniq = LETTERS
        given = uniq
    index = {c: i for i, c in enumerate(given)}
    out = np.empty(len(vals), dtype=np.int64)
    for i, v in enumerate(vals):
        j = index.get(v)
        if j is None and _is_int(v) and not any(_is_int(c) for c in given):
            j = int(float(v)) if 0 <= int(float(v)) < len(given) else None
        if j is None:
            raise UserError(
                f"{where}: row {i + 2}: label '{v}' in '{column}' is not one of the "
                f"{len(given)} classes ({', '.join(given[:8])}{', ...' if len(given) > 8 else ''}); "
                "fix the label or the class list"
            )
        out[i] = j
    return out, list(given)


def _is_int(v: str) -> bool:
    try:
        f = float(v)
    except ValueError:
        return False
    return math.isfinite(f) and f == int(f)


def _classes_file(d: Path) -> list[str] | None:
    """Class names from an optional classes.txt (one per line) beside the data."""
    p = d / "classes.txt"
    if not p.is_file():
        return None
    names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return names or None


# ---------------------------------------------------------------------------
# Image decoding


def _pil_to_array(im: Image.Image, in_chans: int | None) -> np.ndarray:
    """uint8 H x W (grey) or H x W x 3 (colour); 16-bit and float images scaled to 8-bit."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im)
        if a.dtype.kind == "f":
            a = a * 255.0 if np.nanmax(a) <= 1.0 else a
        elif mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0  # 16-bit full range -> 8-bit
        im = Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")
        mode = "L"
    grey = mode in ("1", "L", "LA", "La")
    if mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGB"))
        grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    want_grey = grey if in_chans is None else in_chans == 1
    return np.asarray(im.convert("L" if want_grey else "RGB"))


def saturation_plane(grey: np.ndarray) -> np.ndarray:
    """The pixels at full intensity (255) of a uint8 grey image as 255, the rest 0.

    Where ink is added onto noise and clipped (dirty MNIST: noise 0..254, letters added, clipped
    to 255), full-strength strokes are exactly 255 and the noise never is, so this plane is the
    letters without their background; resized with the image it becomes the share of
    saturated source pixels under each output pixel. --saturation-channel feeds it to the model
    as a second channel next to the grey image.
    """
    return np.where(grey == 255, np.uint8(255), np.uint8(0))


def _decode_file(
    path: Path, size: tuple[int, int] | None, in_chans: int | None, saturation: bool = False
):
    """Decoded array, or the error text when the file is not a readable image. With
    `saturation`: H x W x 2, the grey image and its saturation_plane (found before resizing)."""
    try:
        with Image.open(path) as im:
            if size is not None and im.format == "JPEG" and not saturation:
                im.draft(im.mode, (size[1], size[0]))  # DCT downscale: much faster for big JPEGs
            im.load()
            if saturation:
                grey = _pil_to_array(im, 1)
                planes = [Image.fromarray(grey), Image.fromarray(saturation_plane(grey))]
                if size is not None and grey.shape != tuple(size):
                    wh = (size[1], size[0])
                    planes = [p.resize(wh, Image.Resampling.BILINEAR) for p in planes]
                return np.stack([np.asarray(p) for p in planes], axis=-1)
            if size is not None and im.size != (size[1], size[0]):
                if im.mode not in ("1", "L", "RGB", "RGBA", "LA"):
                    im = Image.fromarray(_pil_to_array(im, in_chans))
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return _pil_to_array(im, in_chans)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _imap(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """map() in order, on a thread pool when workers > 1 (bounded look-ahead)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as ex:
        window: deque = deque()
        try:
            for x in items:
                window.append(ex.submit(fn, x))
                if len(window) >= workers * 16:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()


def _skip_bad_image(path: Path, why: str, opts, skipped: list[str]) -> None:
    """Record an unreadable image, or stop with the fix unless --skip-bad-images."""
    if not opts.skip_bad_images:
        raise UserError(
            f"{path}: cannot read image ({why}); replace or delete it, or pass --skip-bad-images"
        )
    skipped.append(str(path))


def decode_images(
    paths: Sequence[Path], opts: Opts, source: str
) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode image files into uint8 N x C x H x W; returns (array, kept positions, skipped).

    A bad file raises UserError naming it, unless opts.skip_bad_images (then it is skipped).
    """
    n = len(paths)
    size = opts.img_size
    out: np.ndarray | None = None
    kept: list[int] = []
    skipped: list[str] = []
    first = None  # (path, shape) of the first decoded image, for size-mismatch messages

    def fn(p):
        return _decode_file(p, size, opts.in_chans, opts.saturation)

    # Decode the first image alone to learn the size, then pick threads or not.
    head = fn(paths[0]) if n else None
    if isinstance(head, np.ndarray):
        c = head.shape[2] if head.ndim == 3 else 1
        need = estimate_bytes(n, opts.in_chans or c, *head.shape[:2])
        budget = memory_budget()
        if budget is not None and need > budget:
            return _lazy_images(paths, opts, source, budget)
    workers = 1
    if isinstance(head, np.ndarray) and head.size >= THREAD_MIN_PIXELS:
        workers = min(8, os.cpu_count() or 1)
    results = _imap(fn, paths[1:], workers) if n > 1 else _imap(fn, [], 1)
    stream = progress(
        _chain([head], results) if n else iter(()), opts.quiet, total=n, desc="decode", unit="img"
    )
    try:
        for i, a in enumerate(stream):
            p = paths[i]
            if isinstance(a, str):
                _skip_bad_image(p, a, opts, skipped)
                continue
            c = a.shape[2] if a.ndim == 3 else 1
            if out is None:
                h, w = a.shape[:2]
                check_fits(n, c, h, w, source)
                out = np.empty((n, c, h, w), dtype=np.uint8)
                first = (p, a.shape[:2])
            elif a.shape[:2] != out.shape[2:]:
                raise UserError(
                    f"{p}: image is {a.shape[0]}x{a.shape[1]} but {first[0]} is "
                    f"{first[1][0]}x{first[1][1]}; images differ in size: pass --img-size N "
                    "to resize them at load time"
                )
            elif c > out.shape[1]:  # first colour image among grey ones: switch the set to RGB
                check_fits(n, 3, *out.shape[2:], source)
                rgb = np.empty((n, 3, *out.shape[2:]), dtype=np.uint8)
                rgb[: len(kept)] = out[: len(kept)]
                out = rgb
            k = len(kept)
            if a.ndim == 3:
                out[k] = a.transpose(2, 0, 1)
            else:
                out[k] = a  # broadcasts over channels when the set is RGB
            kept.append(i)
    finally:
        results.close()  # stop the pool's look-ahead at once on an error
    if out is None:
        raise UserError(f"{source}: no readable images; check the files or the layout")
    return out[: len(kept)], kept, skipped


def _chain(*its: Iterable) -> Iterator:
    for it in its:
        yield from it


# ---------------------------------------------------------------------------
# Streaming from disk: when the decoded set would not fit in the memory budget


class LazyImages:
    """Image files decoded on demand: a stand-in for the N x C x H x W uint8 tensor.

    images[idx] (an index tensor, list or int) decodes those files at `size` with `channels`
    into a uint8 tensor on `device`, so train.py's per-batch images[idx] works unchanged.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(
        self, paths: Sequence[Path], size: tuple[int, int], channels: int, device="cpu",
        saturation: bool = False,
    ):  # fmt: skip
        self.paths = list(paths)
        self.size = (int(size[0]), int(size[1]))
        self.channels = int(channels)
        self.device = torch.device(device)
        self.saturation = saturation  # channel 2 is the saturation plane (Opts.saturation)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), self.channels, *self.size))

    def __len__(self) -> int:
        return len(self.paths)

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return 4

    def to(self, device=None, *args, **kwargs) -> LazyImages:
        """The same files, decoded onto `device` from now on (nothing is copied now)."""
        if device is None or isinstance(device, torch.dtype):
            return self
        return LazyImages(self.paths, self.size, self.channels, device, self.saturation)

    def take(self, idx) -> LazyImages:
        """The images at positions idx, still lazy (ImageSet.subset)."""
        pos = torch.as_tensor(idx).reshape(-1).tolist()
        files = [self.paths[i] for i in pos]
        return LazyImages(files, self.size, self.channels, self.device, self.saturation)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[[int(idx)]][0]
        if isinstance(idx, slice):
            pos = list(range(len(self))[idx])
        else:
            pos = torch.as_tensor(idx).reshape(-1).tolist()
        files = [self.paths[i] for i in pos]
        h, w = self.size
        out = np.empty((len(files), self.channels, h, w), dtype=np.uint8)
        big = h * w >= THREAD_MIN_PIXELS and len(files) > 1
        workers = min(8, os.cpu_count() or 1) if big else 1
        decoded = _imap(
            lambda f: _decode_file(f, self.size, self.channels, self.saturation), files, workers
        )
        for k, (f, a) in enumerate(zip(files, decoded)):
            if isinstance(a, str):
                raise UserError(f"{f}: cannot read image ({a}); replace or delete it")
            if a.shape[:2] != (h, w):
                raise UserError(f"{f}: decoded as {a.shape[0]}x{a.shape[1]}, not {h}x{w}")
            out[k] = a.transpose(2, 0, 1) if a.ndim == 3 else a
        return torch.from_numpy(out).to(self.device)


_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_STREAMING: set[str] = set()  # sources already announced as streamed


def _probe(path: Path):
    """(height, width, is_colour) from the file header, or the error text."""
    try:
        with Image.open(path) as im:
            colour = im.mode not in _GREY_MODES
            if im.mode in ("P", "PA"):
                pal = np.asarray(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
                colour = bool((pal != pal[:, :1]).any())
            return im.size[1], im.size[0], colour
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _lazy_images(
    paths: Sequence[Path], opts: Opts, source: str, budget: int
) -> tuple[LazyImages, list[int], list[str]]:
    """Header scan of every file (readable? size? colour?), then LazyImages over the good ones.

    Pixels are decoded only per batch, so a file corrupt past its header fails then.
    """
    kept: list[int] = []
    skipped: list[str] = []
    first = None
    colour = False
    for i, r in enumerate(_imap(_probe, paths, min(8, os.cpu_count() or 1))):
        p = paths[i]
        if isinstance(r, str):
            _skip_bad_image(p, r, opts, skipped)
            continue
        if first is None:
            first = (p, r[:2])
        elif opts.img_size is None and r[:2] != first[1]:
            raise UserError(
                f"{p}: image is {r[0]}x{r[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; "
                "images differ in size: pass --img-size N to resize them at load time"
            )
        colour = colour or r[2]
        kept.append(i)
    if first is None:
        raise UserError(f"{source}: no readable images; check the files or the layout")
    size = opts.img_size or first[1]
    c = opts.in_chans or (3 if colour else 1)
    need = estimate_bytes(len(kept), c, *size)
    if source not in _STREAMING:  # once per data set (train and val come from one load)
        _STREAMING.add(source)
        print(
            f"streaming from disk: {source}: {len(kept)} images of {c}x{size[0]}x{size[1]} would "
            f"need {need / 2**30:.3g} GB, {budget / 2**30:.3g} GB available (half of free "
            "memory, or $IMGCLS_MAX_RAM_GB); decoding each batch from the files (slower)",
            file=sys.stderr,
        )
    return LazyImages([paths[i] for i in kept], size, c, saturation=opts.saturation), kept, skipped


def _array_to_opts(a: np.ndarray, opts: Opts) -> np.ndarray:
    """Channel conversion and resizing for formats stored as raw pixel arrays (N x C x H x W)."""
    if opts.in_chans == 3 and a.shape[1] == 1:
        a = np.repeat(a, 3, axis=1)
    elif opts.in_chans in (1, 2) and a.shape[1] == 3:
        w = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
        a = np.rint((a * w).sum(1, keepdims=True)).clip(0, 255).astype(np.uint8)
    if opts.saturation:
        a = np.concatenate([a, saturation_plane(a)], axis=1)
    if opts.img_size is not None and tuple(a.shape[2:]) != opts.img_size:
        a = _resize_array(a, opts.img_size)
    return np.ascontiguousarray(a)


def _resize_array(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 N x C x H x W array, in chunks to bound memory."""
    n, c = a.shape[:2]
    out = np.empty((n, c, *size), dtype=np.uint8)
    for i in range(0, n, 2048):
        t = torch.from_numpy(np.ascontiguousarray(a[i : i + 2048])).float()
        r = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[i : i + 2048] = r.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _imageset(images: np.ndarray, labels, ids, classes, **kw) -> ImageSet:
    lab = torch.from_numpy(np.asarray(labels))
    x = images if isinstance(images, LazyImages) else torch.from_numpy(images)
    return ImageSet(images=x, labels=lab, ids=list(ids), classes=classes, **kw)


# ---------------------------------------------------------------------------
# idx: MNIST-style files


def _idx_files(root: Path) -> dict[str, tuple[Path, Path | None]]:
    """part -> (images file, labels file or None)."""
    d = root.parent if root.is_file() else root
    entries = _listdir(d)
    labels = {}
    for e in entries:
        m = _IDX_LABELS.match(e.name)
        if m:
            labels.setdefault(m["prefix"].lower(), []).append(e)
    found: dict[str, list[tuple[Path, Path | None]]] = {}
    for e in entries:
        m = _IDX_IMAGES.match(e.name)
        if not m:
            continue
        pre = m["prefix"].lower()
        part = "test" if ("t10k" in pre or "test" in pre) else "train"
        lab = labels.get(pre, [])
        # prefer the file with the same compression, else any
        same = [x for x in lab if x.name.endswith(".gz") == e.name.endswith(".gz")]
        found.setdefault(part, []).append((e, (same or lab or [None])[0]))
    out = {}
    for part, cands in found.items():
        if len(cands) > 1:  # the same data gz and raw: take raw (faster); else ambiguous
            raw = [c for c in cands if not c[0].name.endswith(".gz")]
            stems = {re.sub(r"\.gz$", "", c[0].name) for c in cands}
            if len(stems) > 1:
                names = ", ".join(c[0].name for c in cands)
                raise UserError(
                    f"{d}: several IDX image files for the {part} part ({names}); "
                    "keep one data set per folder or pass the images file itself"
                )
            cands = raw or cands
        out[part] = cands[0]
    if root.is_file():  # a file given: its part is that file's part
        for part, (img, lab) in out.items():
            if root in (img, lab):
                return {part: (img, lab)}
    return out


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def read_idx(path: Path, ndim: int, check: Callable[[tuple], None] | None = None) -> np.ndarray:
    """Read an IDX uint8 file with `ndim` dimensions (gz or raw); `check(dims)` runs first."""
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != ndim:
                magic = int.from_bytes(head.ljust(4, b"\0"), "big")
                want = 0x0800 + ndim
                raise UserError(
                    f"{path}: not an IDX uint8 file with {ndim} dimensions (magic {magic:#x}, "
                    f"expected {want:#x}); re-download it"
                )
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise UserError(f"{path}: truncated IDX header; re-download it")
            dims = struct.unpack(f">{ndim}I", raw)
            if check is not None:
                check(dims)
            arr = np.empty(int(np.prod(dims)), dtype=np.uint8)
            view, got = memoryview(arr), 0
            while got < arr.size:
                k = f.readinto(view[got:])
                if not k:
                    break
                got += k
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e}); the file is corrupt, re-download it") from None
    if got < arr.size:
        raise UserError(
            f"{path}: truncated: {got} of {arr.size} data bytes the header promises; re-download it"
        )
    return arr.reshape(dims)


def _idx_classes(root: Path, max_label: int, where: Path) -> list[str]:
    d = root.parent if root.is_file() else root
    given = _classes_file(d)
    if given is not None:
        if max_label >= len(given):
            raise UserError(
                f"{where}: label {max_label} but classes.txt lists {len(given)} classes; "
                "fix classes.txt"
            )
        return given
    k = max(10, max_label + 1)
    if "fashion" in d.resolve().name.lower() and k == 10:
        return list(FASHION_CLASSES)
    return [str(i) for i in range(k)]


def _scan_idx(root: Path, part: str, opts: Opts) -> Source:
    parts = _idx_files(root)
    if part not in parts:
        if part == "train" and "test" in parts and root.is_file():
            parts = {"train": parts["test"]}
        else:
            raise MissingPartError(
                f"{root}: no IDX {part} part ({'t10k-*' if part == 'test' else 'train-*'} files)"
            )
    img_path, lab_path = parts[part]
    lab_paths = [lp for _, lp in parts.values() if lp is not None]

    def decode() -> ImageSet:
        def check(dims):
            check_fits(dims[0], opts.in_chans or 1, dims[1], dims[2], str(img_path))
            if opts.img_size:
                check_fits(dims[0], opts.in_chans or 1, *opts.img_size, str(img_path))

        x = read_idx(img_path, 3, check)[:, None]
        n = len(x)
        all_max = 0
        y = None
        for lp in lab_paths:  # class count from every part, so train and test agree
            lab = read_idx(lp, 1)
            if len(lab):
                all_max = max(all_max, int(lab.max()))
            if lp == lab_path:
                y = lab
        if y is not None and len(y) != n:
            raise UserError(
                f"{lab_path}: {len(y)} labels but {img_path.name} has {n} images; "
                "the two files must come from the same data set"
            )
        classes = _idx_classes(root, all_max, lab_path or img_path)
        labels = y.astype(np.int64) if y is not None else np.full(n, -1, np.int64)
        return _imageset(
            _array_to_opts(x, opts),
            labels,
            [str(i) for i in range(n)],
            classes,
            has_labels=y is not None,
        )

    files = [img_path, *lab_paths]
    return Source(files=files, decode=decode)


# ---------------------------------------------------------------------------
# folder: root/<class>/*.png (or root/train/<class>/ + root/test/)


def _folder_parts(root: Path) -> tuple[Path, Path | None]:
    tr = root / "train"
    if tr.is_dir() and (_class_dirs(tr) or _has_images(tr)):
        te = root / "test"
        return tr, (te if te.is_dir() else None)
    return root, None


def _unique_ids(files: list[Path], base: Path) -> list[str]:
    """File stems when unique, else paths relative to `base` without the extension."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    return [f.relative_to(base).with_suffix("").as_posix() for f in files]


def _scan_folder(root: Path, part: str, opts: Opts) -> Source:
    if root.is_file():
        raise UserError(f"{root}: the folder format needs a directory of <class>/ folders")
    train_dir, test_dir = _folder_parts(root)
    classes = [d.name for d in _class_dirs(train_dir)]
    if len(classes) == 1:
        raise UserError(
            f"{train_dir}: only one class folder ({classes[0]}/); a classifier needs at least "
            "two root/<class>/ folders"
        )
    base = train_dir if part == "train" else test_dir
    if base is None:
        raise MissingPartError(f"{root}: no test/ folder")
    sub = [d.name for d in _class_dirs(base)]
    files: list[Path] = []
    labels: list[int] = []
    if sub and classes:
        unknown = sorted(set(sub) - set(classes))
        if unknown:
            raise UserError(
                f"{base}: class folder(s) {', '.join(unknown)} not in {train_dir}; "
                "test classes must be training classes"
            )
        for name in sub:
            k = classes.index(name)
            got = list(_walk_images(base / name))
            files += got
            labels += [k] * len(got)
        has_labels = True
    else:  # a flat folder of images: unlabeled (e.g. a test set to predict)
        files = [p for p in _listdir(base) if _is_image(p) and p.is_file()]
        labels = [-1] * len(files)
        has_labels = False
    if not files:
        raise UserError(f"{base}: no images (.png/.jpg/...) found; check the folder layout")
    ids = _unique_ids(files, base)

    def decode() -> ImageSet:
        x, kept, skipped = decode_images(files, opts, str(base))
        ds = _imageset(
            x,
            np.asarray(labels, np.int64)[kept],
            [ids[i] for i in kept],
            classes,
            has_labels=has_labels,
        )
        ds.info["skipped"] = skipped
        return ds

    return Source(files=files, decode=decode)


# ---------------------------------------------------------------------------
# csv: a table of image paths and labels (one label column, or 0/1 columns = multi-label)

PATH_COLUMNS = (
    "path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path",
    "image_name", "img", "imageid", "image_id", "id", "index",
)  # fmt: skip
LABEL_COLUMNS = ("label", "labels", "class", "target", "category", "ans")
META_COLUMNS = {"fold", "group", "groups", "split", "width", "height"} | set(PATH_COLUMNS)


def _path_column(header: Sequence[str]) -> str | None:
    low = {c.lower(): c for c in header}
    return next((low[c] for c in PATH_COLUMNS if c in low), None)


def _csv_parts(root: Path) -> tuple[Path | None, Path | None]:
    """(train CSV, test CSV) of a directory (or of a CSV file given directly)."""
    if root.is_file():
        if root.suffix.lower() != ".csv":
            return None, None
        te = root.with_name("test.csv")
        return root, (te if root.name.lower() == "train.csv" and te.is_file() else None)
    csvs = [p for p in _listdir(root) if p.suffix.lower() == ".csv" and p.is_file()]
    if not csvs:
        return None, None

    def pick(words):
        for w in words:
            hit = [p for p in csvs if w in p.stem.lower()]
            if hit:
                return hit[0]
        return None

    test = pick(("test", "submission", "eval"))
    train = pick(("train", "answer", "label"))
    if train is None:
        rest = [p for p in csvs if p != test]
        train = rest[0] if len(rest) == 1 else None
    return train, test


def _image_folders(csv: Path, part: str) -> Iterator[Path]:
    """Folders a CSV's image names may be relative to, in the order they are tried (lazily: a
    CSV among 60k images is not listed unless the usual places fail)."""
    d = csv.parent
    fixed = [d, d / "images", d / part, d / part / "images", d / f"{part}_images", d / csv.stem]
    yield from fixed
    # The competition layout: dirty_mnist_2nd_answer.csv beside dirty_mnist_2nd/, and
    # sample_submission.csv beside test_dirty_mnist_2nd/.
    subdirs = [e for e in _listdir(d) if e not in fixed and e.is_dir()]
    yield from [e for e in subdirs if csv.stem.startswith(e.name) and len(e.name) >= 3]
    if part == "test":
        yield from [e for e in subdirs if "test" in e.name.lower()]


def _name_forms(v: str) -> list[str]:
    """A CSV cell as a file name: as written, and a bare index zero-padded to 5 or 6 digits
    (the competition's 00000.png, synth.py's 000000.png)."""
    return [v, f"{int(v):05d}", f"{int(v):06d}"] if v.isdigit() else [v]


def _resolve_paths(
    values: Sequence[str], csv: Path, part: str, first_only: bool = False
) -> list[Path]:
    """Image paths of CSV cells: relative to the CSV's folder, or images/, <part>/, ...; the
    extension may be missing, a bare index may be zero-padded. The first row picks the folder
    and extension, every row must follow them."""
    v0 = str(values[0]).strip()
    exts = [""] if Path(v0).suffix.lower() in IMAGE_EXTS else ["", *IMAGE_EXTS]
    rule = next(
        (
            (b, e, form)
            for b in _image_folders(csv, part)
            for form in range(len(_name_forms(v0)))
            for e in exts
            if (b / (_name_forms(v0)[form] + e)).is_file()
        ),
        None,
    )
    if rule is None:
        raise UserError(
            f"{csv}: image '{v0}' (row 2) not found next to the CSV or in its images/ folder; "
            "paths must be relative to the CSV's folder"
        )
    b, e, form = rule
    if first_only:
        return [b / (_name_forms(v0)[form] + e)]
    out = []
    for v in values:
        forms = _name_forms(str(v).strip())
        p = b / (forms[min(form, len(forms) - 1)] + e)
        if len(forms) > 1 and not p.is_file():  # 00042.png beside 100000.png: both paddings
            p = next((b / (f + e) for f in forms if (b / (f + e)).is_file()), p)
        out.append(p)
    return out


def _outside(paths: Sequence[Path], root: Path) -> int | None:
    """Position of the first path that leaves `root` (lexically: ../, absolute), or None."""
    r = os.path.normpath(os.path.abspath(root))
    r = r if r.endswith(os.sep) else r + os.sep
    for i, p in enumerate(paths):
        if not (os.path.normpath(os.path.abspath(p)) + os.sep).startswith(r):
            return i
    return None


@dataclass
class TableSpec:
    """How to read a labelled CSV (found by inspection, or given by synth.json)."""

    path_col: str | None = None
    label_col: str | None = None
    class_cols: list[str] | None = None  # multi-label 0/1 columns
    classes: list[str] | None = None
    path_pattern: str | None = None  # e.g. "images/{index:06d}.png", formatted with the row
    id_col: str | None = None
    group_col: str | None = None
    multi_label: bool | None = None  # declared by synth.json: the labels must agree


def _table_spec(df, csv: Path, label_column: str | None, need_labels: bool) -> TableSpec:
    cols = list(df.columns)
    spec = TableSpec(path_col=_path_column(cols))
    if spec.path_col is None:
        raise UserError(
            f"{csv}: no image path column (looked for {', '.join(PATH_COLUMNS[:6])}, id); "
            "add a 'path' column"
        )
    low = {c.lower(): c for c in cols}
    spec.group_col = low.get("group") or low.get("groups")
    if label_column:
        if label_column not in cols:
            raise UserError(
                f"{csv}: no column '{label_column}' (columns: {', '.join(cols[:12])}); "
                "fix --label-column"
            )
        spec.label_col = label_column
        return spec
    spec.label_col = next((low[c] for c in LABEL_COLUMNS if c in low), None)
    if spec.label_col is None:
        binary = [
            c
            for c in cols
            if c.lower() not in META_COLUMNS
            and c != spec.path_col
            and len(df)
            and df[c].isin(["0", "1", "0.0", "1.0"]).all()
        ]
        if len(binary) >= 2:
            spec.class_cols = binary
        elif need_labels:
            raise UserError(
                f"{csv}: no label column (looked for {', '.join(LABEL_COLUMNS)}) and no 0/1 "
                "class columns; add a 'label' column or pass --label-column"
            )
    spec.classes = _classes_file(csv.parent)
    return spec


def _table_labels(df, spec: TableSpec, where: str, classes: list[str] | None):
    """(labels, classes, multi_label, has_labels) of a CSV read with `spec`."""
    if spec.class_cols:
        missing = [c for c in spec.class_cols if c not in df.columns]
        if missing:
            raise UserError(f"{where}: class column(s) {', '.join(missing[:5])} missing")
        y = df[spec.class_cols].to_numpy()
        ok = np.isin(y, ["0", "1", "0.0", "1.0"])
        if not ok.all():
            r, c = np.argwhere(~ok)[0]
            raise UserError(
                f"{where}: row {r + 2}, column '{spec.class_cols[c]}' is '{y[r, c]}', not 0/1; "
                "multi-label columns must be 0 or 1"
            )
        y = y.astype(np.float32)
        return y, list(classes or spec.class_cols), True, bool(y.any())
    if spec.label_col is None or spec.label_col not in df.columns:
        return np.full(len(df), -1, np.int64), list(classes or spec.classes or []), False, False
    vals = df[spec.label_col].tolist()
    if classes is not None and all(str(v).strip() == "" for v in vals):
        return np.full(len(df), -1, np.int64), list(classes), False, False
    y, cls = _label_classes(vals, spec.label_col, classes or spec.classes, where)
    return y, cls, False, True


def _table_paths(df, spec: TableSpec, csv: Path, part: str) -> list[Path]:
    """Image paths of the rows: the path column, or spec.path_pattern formatted with the row."""
    if not spec.path_pattern:
        vals = df[spec.path_col].tolist()
        return _resolve_paths(vals, csv, part) if vals else []
    fields = sorted({f for _, f, _, _ in string.Formatter().parse(spec.path_pattern) if f})
    missing = [f for f in fields if f not in df.columns]
    if missing:
        raise UserError(f"{csv}: path pattern {spec.path_pattern!r} needs column(s) {missing}")
    cols = [df[f].tolist() for f in fields]
    try:  # "{index:06d}" needs ints: digit cells become ints when the strings do not format
        spec.path_pattern.format(**{f: c[0] for f, c in zip(fields, cols)})
    except ValueError:
        cols = [[int(v) if v.isdigit() else v for v in c] for c in cols]
    try:
        return [
            csv.parent / spec.path_pattern.format(**dict(zip(fields, row))) for row in zip(*cols)
        ]
    except (ValueError, IndexError) as e:
        raise UserError(f"{csv}: path pattern {spec.path_pattern!r} failed ({e})") from None


def _read_tables(csvs: list[Path], spec: TableSpec, part: str):
    """Rows of several CSVs (shards of one part) concatenated, and each row's image path."""
    import pandas as pd

    frames, paths = [], []
    for c in csvs:
        df = read_csv(c)
        if spec.path_col and not spec.path_pattern and spec.path_col not in df.columns:
            found = _path_column(list(df.columns))
            if found is None:
                raise UserError(f"{c}: no image path column '{spec.path_col}'; fix the CSV")
            spec = replace(spec, path_col=found)
        frames.append(df)
        paths += _table_paths(df, spec, c, part)
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if not len(df):
        raise UserError(f"{csvs[0]}: CSV has no rows; add rows of image path and label")
    return df, paths, spec


def _table_source(
    data_root: Path,
    train_csvs: list[Path],
    part_csvs: list[Path],
    part: str,
    opts: Opts,
    spec: TableSpec | None = None,
) -> Source:
    """A Source for a labelled CSV part; the train CSV(s) fix the class list. Every image path
    must stay inside `data_root` (a CSV cannot make us read elsewhere)."""
    if spec is None:
        spec = _table_spec(read_csv(train_csvs[0]), train_csvs[0], opts.label_column, True)
    where = str(part_csvs[0]) + (f" (+{len(part_csvs) - 1} more)" if len(part_csvs) > 1 else "")
    if part_csvs == train_csvs:
        df, paths, spec = _read_tables(part_csvs, spec, part)
        df_train = df
    else:
        df_train = _concat([read_csv(c) for c in train_csvs])
        df, paths, spec = _read_tables(part_csvs, spec, part)
    _, classes, ml, _ = _table_labels(df_train, spec, str(train_csvs[0]), spec.classes)
    if spec.multi_label is not None and ml != spec.multi_label:
        raise UserError(f"{train_csvs[0]}: labels do not match multi_label={spec.multi_label}")
    out = _outside(paths, data_root)
    if out is not None:
        raise UserError(
            f"{where}: row {out + 2}: image path {paths[out]} is outside the data folder "
            f"{data_root}; image paths must be relative and stay inside it"
        )
    _refuse_missing(paths, where, "the CSV", opts)
    id_col = spec.id_col or spec.path_col
    if id_col and id_col in df.columns:
        ids = [str(v) for v in df[id_col].tolist()]
        if id_col == spec.path_col and Path(ids[0]).suffix.lower() in IMAGE_EXTS:
            ids = [Path(v).with_suffix("").as_posix() for v in ids]
    else:
        ids = [p.stem for p in paths]
    first_row: dict[str, int] = {}
    for row, i in enumerate(ids, start=2):
        if first_row.setdefault(i, row) != row:
            raise UserError(
                f"{where}: rows {first_row[i]} and {row} have the same id '{i}'; list each "
                "image once (--oversample repeats a class)"
            )
    groups = df[spec.group_col].astype(str).tolist() if spec.group_col in df.columns else None

    def decode() -> ImageSet:
        y, cls, ml2, has = _table_labels(df, spec, where, classes)
        x, kept, skipped = decode_images(paths, opts, where)
        ds = _imageset(
            x,
            y[kept],
            [ids[i] for i in kept],
            cls,
            multi_label=ml2 or ml,
            has_labels=has,
            groups=None if groups is None else [groups[i] for i in kept],
        )
        ds.info["skipped"] = skipped
        return ds

    files = [*train_csvs, *part_csvs, *paths]
    return Source(files=files, decode=decode, extra_key={"spec": spec.__dict__})


def _concat(frames: list):
    import pandas as pd

    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _refuse_missing(files: list[Path], where, fix: str, opts: Opts) -> None:
    """One line naming the first listed image that does not exist (row numbers count the
    header), unless --skip-bad-images."""
    missing = [(i, f) for i, f in enumerate(files) if not f.is_file()]
    if missing and not opts.skip_bad_images:
        i, f = missing[0]
        raise UserError(
            f"{where}: row {i + 2}: image {f} not found ({len(missing)} missing); "
            f"fix {fix} or pass --skip-bad-images"
        )


def _csv_of_part(root: Path, part: str, what: str) -> tuple[Path, Path]:
    """(train CSV, the CSV of `part`); `what` names the training CSV in the error."""
    train_csv, test_csv = _csv_parts(root)
    if train_csv is None:
        raise UserError(f"{root}: no {what}")
    part_csv = train_csv if part == "train" else test_csv
    if part_csv is None:
        raise MissingPartError(f"{root}: no test CSV (test.csv)")
    return train_csv, part_csv


def _scan_csv(root: Path, part: str, opts: Opts) -> Source:
    train_csv, part_csv = _csv_of_part(
        root, part, "training CSV (train.csv or a single *.csv) found"
    )
    data_root = root.parent if root.is_file() else root
    return _table_source(data_root, [train_csv], [part_csv], part, opts)


# ---------------------------------------------------------------------------
# pixels-csv: Dacon MNIST `id,digit,letter,0..783`


def _scan_pixels_csv(root: Path, part: str, opts: Opts) -> Source:
    train_csv, part_csv = _csv_of_part(
        root, part, "pixels CSV (train.csv with columns id,digit,letter,0..783)"
    )

    def label_col(header, where, need):
        if opts.label_column:
            if opts.label_column not in header:
                if need:
                    raise UserError(f"{where}: no column '{opts.label_column}'; fix --label-column")
                return None
            return opts.label_column
        col = "letter" if "letter" in header else ("digit" if "digit" in header else None)
        if col is None and need:
            raise UserError(f"{where}: no 'letter' or 'digit' column; pass --label-column")
        return col

    def read(path: Path):
        header = _csv_header(path)
        pix = _pixel_columns(header)
        if not pix:
            raise UserError(f"{path}: no pixel columns 0..N-1 (N a square); not a pixels CSV")
        dtypes = {c: np.int32 for c in pix}
        import pandas as pd

        try:
            df = pd.read_csv(path, dtype={**{c: str for c in header if c not in pix}, **dtypes})
        except (ValueError, pd.errors.ParserError) as e:
            raise UserError(f"{path}: cannot parse pixels CSV ({str(e).splitlines()[0]})") from None
        return df, pix

    def decode() -> ImageSet:
        hdr_train = _csv_header(train_csv)
        tcol = label_col(hdr_train, train_csv, need=True)
        df_train, _ = read(train_csv)
        _, classes = _label_classes(df_train[tcol].tolist(), tcol, None, str(train_csv))
        df, pix = read(part_csv) if part_csv != train_csv else (df_train, _pixel_columns(hdr_train))
        side = math.isqrt(len(pix))
        check_fits(len(df), 1, side, side, str(part_csv))
        px = df[pix].to_numpy()
        if len(px) and (px.min() < 0 or px.max() > 255):
            raise UserError(f"{part_csv}: pixel values outside 0..255; expected 8-bit grey pixels")
        x = px.astype(np.uint8).reshape(-1, 1, side, side)
        col = label_col(list(df.columns), part_csv, need=part_csv == train_csv)
        if col is None:
            y, has = np.full(len(df), -1, np.int64), False
        else:
            y, _ = _label_classes(df[col].tolist(), col, classes, str(part_csv))
            has = True
        ids = (
            df["id"].astype(str).tolist()
            if "id" in df.columns
            else [str(i) for i in range(len(df))]
        )
        return _imageset(_array_to_opts(x, opts), y, ids, classes, has_labels=has)

    files = [train_csv, part_csv]
    return Source(files=files, decode=decode, extra_key={"label_column": opts.label_column})


# ---------------------------------------------------------------------------
# synth: a directory written by synth.py, described by its synth.json


def _scan_synth(root: Path, part: str, opts: Opts) -> Source:
    """A synth.py directory: synth.json names the CSVs (train `csv`, `test_csv`) and columns."""
    d = root.parent if root.is_file() else root
    meta_path = d / "synth.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"{meta_path}: cannot read ({e}); re-run synth.py") from None

    def csv_list(key):
        v = meta.get(key) or []
        paths = [d / str(c) for c in ([v] if isinstance(v, str) else v)]
        out = _outside(paths, d)
        if out is not None:
            raise UserError(
                f"{meta_path}: '{key}' lists {paths[out]}, outside {d}; a synth directory's "
                "CSVs must lie inside it (re-run synth.py)"
            )
        return paths

    train_csvs, test_csvs = csv_list("csv"), csv_list("test_csv")
    if not train_csvs:
        raise UserError(f"{meta_path}: no train 'csv' listed; re-run synth.py")
    part_csvs = train_csvs if part == "train" else test_csvs
    if not part_csvs:
        raise MissingPartError(f"{d}: synth data has no {part} part")
    ml = bool(meta.get("multi_label", False))
    classes = meta.get("classes")
    spec = TableSpec(
        path_col=meta.get("image_column") or meta.get("path_column"),
        id_col=meta.get("id_column"),
        classes=list(classes) if classes else None,
        multi_label=ml,
    )
    if spec.path_col is None:
        spec.path_pattern = meta.get("path_pattern")
        if not spec.path_pattern:
            raise UserError(f"{meta_path}: neither image_column nor path_pattern; re-run synth.py")
    if ml:
        spec.class_cols = list(meta.get("label_columns") or classes or [])
        if not spec.class_cols:
            raise UserError(f"{meta_path}: multi_label data needs 'classes'; re-run synth.py")
    else:
        spec.label_col = opts.label_column or meta.get("label_column") or "label"
    src = _table_source(d, train_csvs, part_csvs, part, opts, spec)
    src.files.insert(0, meta_path)
    return src


# ---------------------------------------------------------------------------
# mask: boostcamp mask classification. train/images/<ID>_<gender>_<race>_<age>/{mask1..mask5,
# incorrect_mask,normal}.{jpg,jpeg,png}; test part eval/info.csv (ImageID,ans) + eval/images/.
# 18 classes = mask * 6 + gender * 3 + age: mask wear=0 (mask1..5), incorrect=1, not worn=2
# (normal); gender male=0, female=1; age <30 = 0, 30..59 = 1, >= 60 = 2. The person folder is
# each image's group, so the train/val split never puts one person on both sides.

MASK_KINDS = {
    **{f"mask{i}": 0 for i in range(1, 6)},
    "incorrect_mask": 1,
    "normal": 2,
}
MASK_CLASSES = [
    f"{m}_{g}_{a}"
    for m in ("wear", "incorrect", "not_worn")
    for g in ("male", "female")
    for a in ("lt30", "30to59", "ge60")
]
# The three heads of the mask competition's multi-head model, in the order of the 18-class index.
MASK_HEADS = {
    "mask": ["wear", "incorrect", "not_worn"],
    "gender": ["male", "female"],
    "age": ["lt30", "30to59", "ge60"],
}
_MASK_PERSON = re.compile(
    r"^(?P<id>[^_]+)_(?P<gender>male|female)_(?P<race>.+)_(?P<age>\d+)$", re.I
)


def mask_age_bin(age: int) -> int:
    """Age class of the mask layout: <30 -> 0, 30..59 -> 1, >= 60 -> 2."""
    return 0 if age < 30 else (1 if age < 60 else 2)


def mask_label(kind: str, gender: str, age: int) -> int:
    """18-class label of one photo: mask * 6 + gender * 3 + age bin."""
    return MASK_KINDS[kind] * 6 + (3 if gender.lower() == "female" else 0) + mask_age_bin(age)


def mask_heads(labels18):
    """(mask, gender, age) class indices of 18-class mask labels (tensor or array)."""
    return labels18 // 6, (labels18 // 3) % 2, labels18 % 3


def _scan_mask(root: Path, part: str, opts: Opts) -> Source:
    if root.is_file():
        raise UserError(f"{root}: the mask layout needs the directory holding train/ and eval/")
    return _mask_train(root, opts) if part == "train" else _mask_eval(root, opts)


def _mask_train(root: Path, opts: Opts) -> Source:
    img_dir = root / "train" / "images"
    if not img_dir.is_dir():
        raise MissingPartError(f"{root}: no train/images/ folder (mask layout)")
    files: list[Path] = []
    labels: list[int] = []
    groups: list[str] = []
    for person in _listdir(img_dir):
        if not person.is_dir():
            continue
        m = _MASK_PERSON.match(person.name)
        if m is None:
            raise UserError(
                f"{person}: folder name is not <ID>_<gender>_<race>_<age> "
                "(e.g. 000001_female_Asian_45); rename or remove it"
            )
        for f in _listdir(person):
            if not (f.is_file() and _is_image(f)):
                continue
            kind = f.stem.lower()
            if kind not in MASK_KINDS:
                raise UserError(
                    f"{f}: not one of mask1..mask5, incorrect_mask, normal; rename or remove it"
                )
            files.append(f)
            labels.append(mask_label(kind, m["gender"], int(m["age"])))
            groups.append(person.name)
    if not files:
        raise UserError(f"{img_dir}: no images in <ID>_<gender>_<race>_<age>/ folders")
    ids = [f"{f.parent.name}/{f.stem}" for f in files]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{img_dir / dup}: the same photo twice (two extensions); keep one")

    def decode() -> ImageSet:
        x, kept, skipped = decode_images(files, opts, str(img_dir))
        ds = _imageset(
            x,
            np.asarray(labels, np.int64)[kept],
            [ids[i] for i in kept],
            list(MASK_CLASSES),
            groups=[groups[i] for i in kept],
        )
        ds.info["skipped"] = skipped
        return ds

    return Source(files=files, decode=decode)


def _mask_eval(root: Path, opts: Opts) -> Source:
    info = root / "eval" / "info.csv"
    if not info.is_file():
        raise MissingPartError(f"{root}: no eval/info.csv (mask test part)")
    df = read_csv(info)
    col = next((c for c in df.columns if c.lower() == "imageid"), None)
    if col is None:
        raise UserError(f"{info}: no ImageID column; expected the header ImageID,ans")
    names = [str(v).strip() for v in df[col].tolist()]
    if not names:
        raise UserError(f"{info}: no rows; add one ImageID per test image")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{info}: ImageID {dup} appears twice; each test image once")
    img_dir = root / "eval" / "images"
    out = _outside([img_dir / n for n in names], img_dir)
    if out is not None:
        raise UserError(
            f"{info}: row {out + 2}: ImageID {names[out]!r} leaves eval/images; "
            "ImageIDs are file names inside eval/images"
        )
    files = []
    for n in names:
        f = img_dir / n
        if not f.is_file() and f.suffix.lower() not in IMAGE_EXTS:
            f = next((f.with_name(n + e) for e in IMAGE_EXTS if (img_dir / (n + e)).is_file()), f)
        files.append(f)
    _refuse_missing(files, info, "eval/images", opts)

    def decode() -> ImageSet:
        x, kept, skipped = decode_images(files, opts, str(img_dir))
        ds = _imageset(
            x,
            np.full(len(kept), -1, np.int64),
            [names[i] for i in kept],  # ImageID as written, in info.csv order
            list(MASK_CLASSES),
            has_labels=False,
        )
        ds.info["skipped"] = skipped
        return ds

    return Source(files=[info, *files], decode=decode)


# Format name -> loader(root, part, opts) -> Source.
FORMATS: dict[str, Callable[[Path, str, Opts], Source]] = {
    "idx": _scan_idx,
    "folder": _scan_folder,
    "csv": _scan_csv,
    "mask": _scan_mask,
    "pixels-csv": _scan_pixels_csv,
    "synth": _scan_synth,
}


# ---------------------------------------------------------------------------
# Loading with the on-disk cache


def default_cache_dir() -> Path:
    """$IMGCLS_CACHE, else ~/.cache/imgcls."""
    env = os.environ.get("IMGCLS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imgcls"


def _cache_key(fmt: str, part: str, root: Path, src: Source, opts: Opts) -> str:
    h = hashlib.sha1()
    head = {
        "v": CACHE_VERSION,
        "fmt": fmt,
        "part": part,
        "root": str(root.resolve()),
        "img_size": opts.img_size,
        "in_chans": opts.in_chans,
        "skip_bad": opts.skip_bad_images,
        "label_column": opts.label_column,
        "saturation": opts.saturation,
        "extra": src.extra_key,
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    # Everything that changes decoding or labels: the loader's files, and a classes.txt beside
    # the data (names IDX/CSV classes) even when it appears after the first load.
    for f in [*src.files, (root if root.is_dir() else root.parent) / "classes.txt"]:
        try:
            st = os.stat(f)
            h.update(f"\n{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"\n{os.path.abspath(f)}|missing".encode())
    return h.hexdigest()


def _cache_paths(cache_dir: Path, fmt: str, part: str, root: Path, key: str) -> dict[str, Path]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.resolve().name)[:40] or "data"
    stem = cache_dir / f"{fmt}-{name}-{part}-{key[:16]}"
    return {k: Path(f"{stem}.{k}") for k in ("images.npy", "labels.npy", "json")}


def _cache_read(paths: dict[str, Path]) -> ImageSet | None:
    if not paths["json"].is_file():
        return None
    try:
        meta = json.loads(paths["json"].read_text(encoding="utf-8"))
        budget = memory_budget()
        if budget is not None and estimate_bytes(*meta.get("shape", [0])) > budget:
            return None  # too big for RAM now: the format loader streams it (or says so)
        x = np.load(paths["images.npy"], allow_pickle=False)
        y = np.load(paths["labels.npy"], allow_pickle=False)
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(meta["ids"]) or len(y) != len(x):
            raise ValueError("shape mismatch")
    except (OSError, ValueError, KeyError) as e:
        print(f"data.py: warning: ignoring broken cache {paths['json']} ({e})", file=sys.stderr)
        return None
    ds = _imageset(
        x,
        y,
        meta["ids"],
        meta["classes"],
        multi_label=meta["multi_label"],
        has_labels=meta["has_labels"],
        groups=meta.get("groups"),
    )
    ds.info.update(skipped=meta.get("skipped", []), decode_seconds=meta.get("seconds"))
    return ds


def _cache_write(paths: dict[str, Path], ds: ImageSet, seconds: float) -> None:
    meta = {
        "version": CACHE_VERSION,
        "fmt": ds.fmt,
        "source": ds.source,
        "shape": list(ds.images.shape),
        "seconds": seconds,
        "classes": ds.classes,
        "multi_label": ds.multi_label,
        "has_labels": ds.has_labels,
        "skipped": ds.info.get("skipped", []),
        "groups": ds.groups,
        "ids": ds.ids,
    }
    try:
        for k, t in (("images.npy", ds.images), ("labels.npy", ds.labels)):
            with atomic_path(paths[k]) as tmp, open(tmp, "wb") as f:
                np.save(f, t.numpy(), allow_pickle=False)
        with atomic_path(paths["json"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)  # written last: its presence means the entry is complete
    except (UserError, OSError) as e:
        print(f"data.py: warning: not caching decoded data ({e})", file=sys.stderr)


def load_images(path, fmt: str | None = None, part: str = "train", opts: Opts | None = None):
    """Decode one part ('train' or 'test') of a data set into an ImageSet, via the .npy cache."""
    root = _existing(path)
    if part not in PARTS:
        raise UserError(f"part {part!r}: expected one of {', '.join(PARTS)}")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"--data-format {fmt}: unknown; choose from {', '.join(FORMATS)}")
    opts = opts or Opts()
    ds = _decode_cached(fmt, part, root, FORMATS[fmt](root, part, opts), opts)
    if part == "train" and ds.has_labels and not ds.multi_label:
        present = torch.unique(ds.labels[ds.labels >= 0]).tolist() if len(ds) else []
        if len(ds.classes) < 2 or len(present) < 2:
            names = [ds.classes[k] for k in present if k < len(ds.classes)] or ds.classes
            raise UserError(
                f"{root}: only one class ({', '.join(names[:1]) or 'none'}) in its labels; a "
                "classifier needs at least two classes: add labelled images of another class"
            )
    return ds


def _decode_cached(fmt: str, part: str, root: Path, src: Source, opts: Opts) -> ImageSet:
    """The part a loader found, from the .npy cache when its key matches, else decoded."""
    paths = None
    if opts.cache:
        key = _cache_key(fmt, part, root, src, opts)
        cache_dir = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
        paths = _cache_paths(cache_dir, fmt, part, root, key)
        t0 = time.perf_counter()
        ds = _cache_read(paths)
        if ds is not None:
            ds.fmt, ds.source = fmt, str(root)
            ds.info.update(
                cached=True, seconds=time.perf_counter() - t0, cache_path=str(paths["json"])
            )
            return ds
    with Timer() as t:
        ds = src.decode()
    ds.fmt, ds.source = fmt, str(root)
    ds.info.update(cached=False, seconds=t.seconds, decode_seconds=t.seconds)
    if ds.info.get("skipped"):
        sk = ds.info["skipped"]
        print(
            f"data.py: warning: skipped {len(sk)} unreadable image(s), first: {sk[0]}",
            file=sys.stderr,
        )
    if paths is not None and not isinstance(ds.images, LazyImages):
        _cache_write(paths, ds, t.seconds)
        ds.info["cache_path"] = str(paths["json"])
    return ds


# ---------------------------------------------------------------------------
# Splits


def _strata(labels) -> np.ndarray:
    """One int per sample to stratify on: the label, or the first positive of a multi-hot row."""
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim == 2:
        pos = y > 0.5
        return np.where(pos.any(1), pos.argmax(1), -1).astype(np.int64)
    return y.astype(np.int64).reshape(-1)


def _stratified_pick(keys: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Positions of about ratio*len(keys) units, the same fraction from every stratum."""
    n = len(keys)
    total = min(n - 1, int(round(ratio * n))) if n > 1 else 0
    strata, inv = np.unique(keys, return_inverse=True)
    counts = np.bincount(inv, minlength=len(strata))
    want = ratio * counts
    take = np.floor(want).astype(np.int64)
    # largest remainders get the leftover picks, so the total is exact
    rest = total - int(take.sum())
    if rest > 0:
        order = np.argsort(-(want - take), kind="stable")
        take[order[:rest]] += 1
    members = np.split(np.argsort(inv, kind="stable"), np.cumsum(counts)[:-1])
    picked = [rng.permutation(m)[:k] for m, k in zip(members, take)]
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)


def split_indices(
    labels, val_ratio: float = 0.1, seed: int = 0, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train, val) index arrays; with `groups`, no group on both sides.

    Uses only its own numpy Generator seeded by `seed`, never a global RNG.
    """
    if not 0 <= val_ratio < 1:
        raise UserError(f"--val-ratio {val_ratio}: must be in [0, 1)")
    keys = _strata(labels)
    n = len(keys)
    if val_ratio == 0 or n == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, np.int64)
    rng = np.random.default_rng(seed)
    if groups is None:
        val = _stratified_pick(keys, val_ratio, rng)
    else:
        ginv, gkey = _group_strata(keys, groups)
        val_groups = _stratified_pick(gkey, val_ratio, rng)
        val = np.flatnonzero(np.isin(ginv, val_groups))
    mask = np.zeros(n, bool)
    mask[val] = True
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def _group_strata(keys: np.ndarray, groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(group index of each sample, stratum of each group = its most common key, ties: smallest)."""
    if len(groups) != len(keys):
        raise ValueError(f"groups has {len(groups)} entries for {len(keys)} labels")
    names, ginv = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    m = int(keys.max()) + 2
    pair, cnt = np.unique(ginv.astype(np.int64) * m + (keys + 1), return_counts=True)
    g, k = pair // m, pair % m - 1
    order = np.lexsort((k, -cnt, g))
    first = np.unique(g[order], return_index=True)[1]
    gkey = np.empty(len(names), np.int64)
    gkey[g[order][first]] = k[order][first]
    return ginv, gkey


def kfold_indices(
    labels, k: int, fold: int, seed: int = 0, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) index arrays of fold `fold` of a stratified k-fold split (grouped if `groups`).

    Each stratum is shuffled by `seed` and dealt round-robin to the folds: the K validation folds
    are disjoint, cover every sample, and no group is on both sides.
    """
    if k < 2:
        raise UserError(f"--kfold {k}: needs at least 2 folds")
    if not 0 <= fold < k:
        raise UserError(f"--fold {fold}: must be in 0..{k - 1} for --kfold {k}")
    keys = _strata(labels)
    if groups is None:
        unit_of, unit_keys = np.arange(len(keys)), keys
    else:
        unit_of, unit_keys = _group_strata(keys, groups)
    if len(unit_keys) < k:
        what = "groups" if groups is not None else "samples"
        raise UserError(f"--kfold {k}: only {len(unit_keys)} {what}; use fewer folds")
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [rng.permutation(np.flatnonzero(unit_keys == s)) for s in np.unique(unit_keys)]
    )
    unit_fold = np.empty(len(unit_keys), np.int64)
    unit_fold[order] = np.arange(len(order)) % k
    val = unit_fold[unit_of] == fold
    return np.flatnonzero(~val).astype(np.int64), np.flatnonzero(val).astype(np.int64)


def relabel(ds: ImageSet, path, known_ids: Iterable[str] = ()) -> tuple[ImageSet, int]:
    """Apply `id,new_label` corrections from a CSV to `ds` (single-label); (new set, changed).

    Ids in `known_ids` but not in `ds` (e.g. held-out ones) are skipped; any other id is an error.
    Labels are class names or class indices.
    """
    if ds.multi_label:
        raise UserError(f"{path}: --relabel works on single-label data only")
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "no such relabel file"
        raise UserError(f"{path}: {what}; pass a CSV with columns id,new_label")
    df = read_csv(Path(path))
    cols = {c.lower(): c for c in df.columns}
    id_col = cols.get("id", df.columns[0] if len(df.columns) else None)
    lab_col = cols.get("new_label") or cols.get("label")
    if id_col is None or lab_col is None:
        raise UserError(f"{path}: expected columns id,new_label; fix the header")
    pos = {str(i): n for n, i in enumerate(ds.ids)}
    known = set(map(str, known_ids))
    labels = ds.labels.clone()
    for line, (i, lab) in enumerate(zip(df[id_col], df[lab_col]), start=2):
        i, lab = str(i).strip(), str(lab).strip()
        if i not in pos:
            if i in known:
                continue
            raise UserError(f"{path}: line {line}: id {i!r} is not in the data set; fix the id")
        if lab in ds.classes:
            c = ds.classes.index(lab)
        elif lab.isdigit() and int(lab) < len(ds.classes):
            c = int(lab)
        else:
            raise UserError(
                f"{path}: line {line}: label {lab!r} is not a class name or index "
                f"0..{len(ds.classes) - 1}; fix the label"
            )
        labels[pos[i]] = c
    changed = int((labels != ds.labels).sum())
    return replace(ds, labels=labels), changed


def ids_hash(ids: Sequence[str]) -> str:
    """16-hex sha1 of the sorted ids: names a held-out set independent of order."""
    return hashlib.sha1("\n".join(sorted(str(i) for i in ids)).encode()).hexdigest()[:16]


def load_split(
    path,
    split: str = "train",
    fmt: str | None = None,
    how: SplitSpec | None = None,
    opts: Opts | None = None,
) -> tuple[ImageSet, dict]:
    """One split (train|val|test|all) and the record of the train/val split.

    train/val: the held-out split of the data set's train part (`how`, default SplitSpec());
    test: its own test part; all: the whole train part. The record is
    {"seed", "val_ratio", "val_hash"} (+ "kfold", "fold"); `SplitSpec.of(record)` rebuilds it.
    """
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    how = how or SplitSpec()
    full = load_images(path, fmt, "train", opts)
    if how.kfold:
        tr, va = kfold_indices(full.labels, how.kfold, how.fold or 0, how.seed, full.groups)
        val_ratio = 1 / how.kfold
    else:
        tr, va = split_indices(full.labels, how.val_ratio, how.seed, full.groups)
        val_ratio = how.val_ratio
    record = {
        "seed": int(how.seed),
        "val_ratio": float(val_ratio),
        "val_hash": ids_hash([full.ids[i] for i in va]),
    }
    if how.kfold:
        record.update(kfold=int(how.kfold), fold=int(how.fold or 0))
    if split == "test":
        return load_images(path, full.fmt, "test", opts), record
    if split == "all":
        return full, record
    return full.subset(tr if split == "train" else va), record


def _split_record(recorded) -> dict:
    """The split record of a CheckpointMeta, a checkpoint (or meta) dict, or the record itself."""
    if hasattr(recorded, "split"):
        recorded = recorded.split
    if isinstance(recorded, dict) and isinstance(recorded.get("split"), dict):
        recorded = recorded["split"]
    return dict(recorded or {})


def load_recorded_split(
    recorded,
    path,
    split: str = "val",
    fmt: str | None = None,
    source: str = "the checkpoint",
    opts: Opts | None = None,
) -> ImageSet:
    """Part `split` of the data at `path`, on the train/val split a checkpoint records.

    `recorded`: a models.CheckpointMeta, a checkpoint dict or its "split" record. For train/val
    the split is rebuilt from the record (seed, ratio, k-fold) and its validation ids must hash
    to the recorded val_hash, else UserError (the data changed, or it is another data set);
    a checkpoint without a record cannot name its held-out set: UserError too. test/all need
    no record. The record is in ds.info["split"]; `opts` go to load_images.
    """
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    rec = _split_record(recorded)
    if split in ("test", "all"):
        ds = load_images(path, fmt, "test" if split == "test" else "train", opts)
        ds.info["split"] = rec
        return ds
    if not rec.get("val_hash"):
        raise UserError(
            f"{source} records no train/val split, so its held-out images are unknown; "
            "use --split test or all (or retrain to record one)"
        )
    ds, record = load_split(path, split, fmt, SplitSpec.of(rec), opts)
    if record["val_hash"] != rec["val_hash"]:
        fold = f", fold {rec['fold']} of {rec['kfold']}" if rec.get("kfold") else ""
        raise UserError(
            f"{path}: its validation split (seed {rec.get('seed')}, ratio "
            f"{rec.get('val_ratio')}{fold}) hashes to {record['val_hash']} but {source} recorded "
            f"{rec['val_hash']}: the data changed since training or this is another data set; "
            "pass the training data, or --split test/all"
        )
    ds.info["split"] = record
    return ds


# ---------------------------------------------------------------------------
# A data set's labels in a checkpoint's class order


class ClassMismatchError(UserError):
    """The data's labels cannot be expressed in the checkpoint's classes."""


def _index_names(classes: Sequence[str]) -> bool:
    return list(classes) == [str(i) for i in range(len(classes))]


def map_labels(
    ds: ImageSet, classes: Sequence[str], multi_label: bool = False, source: str = "the checkpoint"
) -> torch.Tensor:
    """ds.labels re-indexed to `classes` (a checkpoint's class list, in its order).

    Single-label: each data class name must be one of `classes` (a subset is fine, e.g. a test
    folder lacking some classes); data whose classes are bare indices "0".."n-1" (IDX files or
    integer labels without names) keep their indices when n <= len(classes) and the checkpoint's
    classes are names (none is a number). Multi-label: the
    same class set, columns reordered. Unknown labels (-1) stay -1. ClassMismatchError otherwise
    (and for unlabelled data), naming the classes.
    """
    classes = [str(c) for c in classes]
    if not ds.has_labels:
        raise ClassMismatchError(f"{ds.source or 'the data'}: no labels to compare with")
    tasks = ("single-label", "multi-label")
    if bool(ds.multi_label) != bool(multi_label):
        raise ClassMismatchError(
            f"{ds.source or 'the data'} is {tasks[bool(ds.multi_label)]} but {source} is "
            f"{tasks[bool(multi_label)]}"
        )
    have = [str(c) for c in ds.classes]
    if have == classes:
        return ds.labels
    index = {c: k for k, c in enumerate(classes)}
    unknown = [c for c in have if c not in index]
    if multi_label:
        if unknown or len(have) != len(classes):
            raise ClassMismatchError(
                f"{ds.source or 'the data'}: classes {_names(have)} are not {source}'s "
                f"{_names(classes)}; multi-label data must have the same classes"
            )
        return ds.labels[:, torch.tensor([have.index(c) for c in classes])]
    if unknown:
        if _index_names(have) and len(have) <= len(classes) and not any(map(_is_int, classes)):
            return ds.labels  # unnamed indices onto a named class list: same positions
        raise ClassMismatchError(
            f"{ds.source or 'the data'}: classes {_names(unknown)} are not among {source}'s "
            f"{len(classes)} classes ({_names(classes)}); use data labelled with its classes"
        )
    remap = torch.tensor([index[c] for c in have], dtype=torch.long)
    y = ds.labels.clone()
    known = y >= 0
    y[known] = remap[y[known]]
    return y


def _names(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(map(str, names[:n])) + (", ..." if len(names) > n else "")


# ---------------------------------------------------------------------------
# Tensors: statistics, normalisation, batches


def mean_std(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 N x C x H x W images, on the 0..1 scale.

    LazyImages (streamed from disk): estimated from at most 2048 evenly spaced images.
    """
    if isinstance(images, LazyImages):
        images = images[torch.linspace(0, len(images) - 1, min(len(images), 2048)).long()]
    c = images.shape[1]
    if len(images) == 0:
        return [0.0] * c, [1.0] * c
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):  # float copy of a chunk, not of the whole set
        f = chunk.float()
        s += f.sum((0, 2, 3)).double().cpu()
        s2 += (f * f).sum((0, 2, 3)).double().cpu()
    cnt = images.numel() / c
    mean = s / cnt
    var = (s2 / cnt - mean * mean).clamp_min(1e-12)
    return (mean / 255).tolist(), (var.sqrt() / 255).tolist()


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(x/255 - mean) / std per channel, float32 on x's device."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x_uint8.device).view(-1, 1, 1)
    return (x_uint8.float() / 255 - m) / s


def batch_indices(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """Index tensors of the batches of range(n), shuffled with `generator` when asked."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size)) if n else []
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


# ---------------------------------------------------------------------------
# Geometric ops, the one set: batched augmentation below and infer.py's TTA views (and their
# inverses) use these. x is N x C x H x W (any device); k, dy, dx are ints or one per image.


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return x.flip(-1)


def vflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror top-bottom."""
    return x.flip(-2)


def rot90(x: torch.Tensor, k) -> torch.Tensor:
    """Rotate by k*90 degrees counter-clockwise (torch.rot90 on the last two dims); square
    images when k differs per image."""
    if isinstance(k, int):
        return torch.rot90(x, k, (-2, -1))
    return _rot90_each(x, k)


def shift(x: torch.Tensor, dy, dx, pad: int | None = None, mode: str = "reflect") -> torch.Tensor:
    """Move the content by (dy, dx) pixels, filling from a `mode` padding of `pad` pixels (default:
    the largest shift); reflect becomes replicate where the image is not larger than the pad."""
    if isinstance(dy, int) and isinstance(dx, int):
        h, w = x.shape[-2:]
        p = max(abs(dy), abs(dx)) if pad is None else pad
        if p == 0:
            return x
        mode = "replicate" if mode == "reflect" and p >= min(h, w) else mode
        xp = F.pad(x, (p, p, p, p), mode=mode)
        return xp[..., p - dy : p - dy + h, p - dx : p - dx + w]
    dy, dx = torch.as_tensor(dy), torch.as_tensor(dx)
    p = int(max(dy.abs().max(), dx.abs().max())) if pad is None else pad
    return _translate(x, -dy, -dx, p, mode)


# ---------------------------------------------------------------------------
# Batched augmentation: per-sample random parameters drawn on the CPU generator, applied with
# whole-batch tensor ops on x's device (no Python loop over images).


def _rand(n: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g).to(device, non_blocking=True)


def _coin(n: int, g: torch.Generator, device, p: float = 0.5) -> torch.Tensor:
    return (_rand(n, g, device) < p).view(n, 1, 1, 1)


def _translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int, mode: str):
    """Image i sampled at (r + dy[i], c + dx[i]), |d| <= pad, from a `mode` padding (shift's
    per-image path: its content moves by (-dy, -dx))."""
    n, c, h, w = x.shape
    if mode == "reflect" and pad >= min(h, w):
        mode = "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    dev = x.device
    rows = (dy.to(dev) + pad).view(n, 1, 1, 1) + torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = (dx.to(dev) + pad).view(n, 1, 1, 1) + torch.arange(w, device=dev).view(1, 1, 1, w)
    return xp[
        torch.arange(n, device=dev).view(n, 1, 1, 1),
        torch.arange(c, device=dev).view(1, c, 1, 1),
        rows,
        cols,
    ]


def _rot90_each(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate image i by k[i]*90 degrees (as torch.rot90 on dims (2, 3)); square images."""
    k = k.to(x.device).view(-1, 1, 1, 1)
    t = torch.where(k % 2 == 1, x.transpose(2, 3), x)
    t = torch.where((k == 1) | (k == 2), t.flip(2), t)
    return torch.where((k == 2) | (k == 3), t.flip(3), t)


def _need_square(x: torch.Tensor, what: str) -> None:
    if x.shape[-1] != x.shape[-2]:
        raise UserError(
            f"{what} needs square images, got {x.shape[-2]}x{x.shape[-1]}; pass --img-size N"
        )


def _aug_flip(x, g):
    return torch.where(_coin(len(x), g, x.device), hflip(x), x)


def _aug_vflip(x, g):
    return torch.where(_coin(len(x), g, x.device), vflip(x), x)


def _aug_crop(x, g, pad):
    if pad <= 0:
        return x
    n = len(x)
    dy = torch.randint(-pad, pad + 1, (n,), generator=g)
    dx = torch.randint(-pad, pad + 1, (n,), generator=g)
    return shift(x, -dy, -dx, pad, "reflect")  # -: the draws of earlier versions, same images


def _aug_rot90(x, g):
    _need_square(x, "rot90")
    return rot90(x, torch.randint(0, 4, (len(x),), generator=g))


def _aug_randaug(x, g):
    """Light RandAugment: each of brightness, contrast, translate with p=0.5 per image."""
    n, dev = len(x), x.device
    on_b, on_c, on_t = (_coin(n, g, dev) for _ in range(3))
    b = (_rand(n, g, dev) * 0.5 - 0.25).view(n, 1, 1, 1)  # in normalised units (~std)
    c = (_rand(n, g, dev) * 0.5 + 0.75).view(n, 1, 1, 1)
    m = max(1, round(0.125 * min(x.shape[-2:])))
    dy = torch.randint(-m, m + 1, (n,), generator=g)
    dx = torch.randint(-m, m + 1, (n,), generator=g)
    x = torch.where(on_b, x + b, x)
    mu = x.mean((1, 2, 3), keepdim=True)
    x = torch.where(on_c, (x - mu) * c + mu, x)
    return torch.where(on_t, shift(x, -dy, -dx, m, "replicate"), x)


def _aug_cutout(x, g, size: float, p: float):
    """Zero (= the mean after normalising) one square of side size x the shorter side at a
    random place, in each image with probability p."""
    n, _, h, w = x.shape
    s = max(1, int(size * min(h, w)))
    on = _coin(n, g, x.device, p) if p < 1 else None  # p=1 draws nothing: same as before
    cy = torch.randint(0, h, (n,), generator=g).to(x.device).view(n, 1, 1, 1)
    cx = torch.randint(0, w, (n,), generator=g).to(x.device).view(n, 1, 1, 1)
    yy = torch.arange(h, device=x.device).view(1, 1, h, 1)
    xx = torch.arange(w, device=x.device).view(1, 1, 1, w)
    hole = ((yy - cy).abs() <= s // 2) & ((xx - cx).abs() <= s // 2)
    if on is not None:
        hole = hole & on
    return x.masked_fill(hole, 0.0)


def _aug_ssr(x, g, rotate: float, shift: float, scale: float, p: float):
    """Shift-scale-rotate, one random affine map per image (with probability p): angle
    U(-rotate, rotate) degrees, scale U(1 - scale, 1 + scale), shift U(-shift, shift) x the
    width/height."""
    n = len(x)
    angle = (torch.rand(n, generator=g) * 2 - 1) * rotate
    sc = 1 + (torch.rand(n, generator=g) * 2 - 1) * scale
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * shift
    on = _coin(n, g, x.device, p)
    return torch.where(on, affine(x, angle, sc, t), x)


def affine(x: torch.Tensor, angle, scale, shift) -> torch.Tensor:
    """Rotate each image by angle[i] degrees (counter-clockwise on screen), scale it by
    scale[i] and shift it by shift[i] = (dx, dy) x (width, height), about the centre: one
    affine_grid + grid_sample over the batch, bilinear, reflected border."""
    n, _, h, w = x.shape
    ang = torch.deg2rad(torch.as_tensor(angle, dtype=torch.float32).expand(n))
    sc = torch.as_tensor(scale, dtype=torch.float32).expand(n)
    t = torch.as_tensor(shift, dtype=torch.float32).expand(n, 2) * 2  # in [-1, 1] units
    # output -> input in pixels about the centre: M = R(-angle) / scale (y grows downwards, so
    # this turns the picture counter-clockwise); affine_grid wants D^-1 M D, D = diag(w/2, h/2).
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    theta[:, :, 2] = -(theta[:, :, :2] @ t[:, :, None])[:, :, 0]
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


_AUG_FNS = {
    "flip": _aug_flip,
    "vflip": _aug_vflip,
    "crop": _aug_crop,
    "rot90": _aug_rot90,
    "randaug": _aug_randaug,
    "cutout": _aug_cutout,
    "ssr": _aug_ssr,
}


def _aug_names(aug) -> list[str]:
    """The augmentation specs of --aug (names, aliases resolved, lower case), checked."""
    names = aug.split(",") if isinstance(aug, str) else list(aug or [])
    names = [a.strip().lower() for a in names if a and a.strip()]
    out = []
    for spec in names:
        name, *_ = spec.split(":")
        name = AUG_ALIASES.get(name, name)
        out.append(":".join([name, *spec.split(":")[1:]]))
        if name not in AUGS and name not in MIXES:
            raise UserError(
                f"--aug {spec}: unknown augmentation; choose from {', '.join(AUGS + MIXES)}"
            )
        _aug_params(out[-1])
    return out


def _aug_params(spec: str) -> tuple[str, dict[str, float]]:
    """'ssr:rotate=30:p=1' -> ('ssr', {'rotate': 30.0, 'shift': 0.0625, 'scale': 0.1, 'p': 1.0}):
    every parameter of the augmentation, AUG_PARAMS' default where not given; UserError for bad
    values."""
    name, *pairs = spec.split(":")
    known = AUG_PARAMS.get(name, {})
    params = {k: default for k, (default, _, _) in known.items()}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in known:
            takes = ", ".join(known) if known else "no parameters"
            raise UserError(f"--aug {spec}: {name} has no parameter '{key}'; it takes {takes}")
        _, lo, hi = known[key]
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not lo <= v <= hi:
            raise UserError(f"--aug {spec}: {key}={text!r} must be a number in [{lo:g}, {hi:g}]")
        params[key] = v
    return name, params


def augment_batch(
    x: torch.Tensor, aug: Sequence[str] | str, generator: torch.Generator, pad: int = 2
) -> torch.Tensor:
    """Randomly augment a float N x C x H x W batch (any device); same shape and device.

    Specs as in AUG_HELP, e.g. "flip,ssr:rotate=15,cutout:size=0.25" (cutmix/mixup are skipped
    here: see mix_batch). Random numbers come from `generator` (CPU), so output is a function
    of its state.
    """
    for spec in _aug_names(aug):
        name, params = _aug_params(spec)
        if name in _AUG_FNS:
            x = _AUG_FNS[name](x, generator, **({"pad": pad} if name == "crop" else params))
    return x


def mix_batch(
    x: torch.Tensor,
    y_soft: torch.Tensor,
    mode: str,
    alpha: float,
    generator: torch.Generator,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix or MixUp of a batch with a shuffled copy of itself; one lambda ~ Beta(a, a).

    y_soft: float N x K (one-hot or multi-hot); int64 [N] also works given num_classes.
    """
    if mode not in MIXES:
        raise UserError(f"--mix {mode}: expected one of {', '.join(MIXES)}")
    if y_soft.ndim == 1:
        if num_classes is None:
            raise ValueError("mix_batch: int labels need num_classes")
        y_soft = F.one_hot(y_soft.long(), num_classes)
    y_soft = y_soft.float()
    if alpha <= 0 or len(x) < 2:
        return x, y_soft
    # torch has no seeded Beta sampler: seed numpy from the generator so it stays reproducible
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    if mode == "mixup":
        x = x * lam + x[perm] * (1 - lam)
    else:
        h, w = x.shape[-2:]
        r = math.sqrt(1 - lam)
        ch, cw = int(h * r), int(w * r)
        cy = int(torch.randint(0, h, (1,), generator=generator))
        cx = int(torch.randint(0, w, (1,), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    y = y_soft * lam + y_soft[perm.to(y_soft.device)] * (1 - lam)
    return x, y


def rotate_batch(
    x: torch.Tensor, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RotNet batch and labels k. Without `gen`: x rotated by 0, 90, 180, 270 degrees (4N,
    grouped by k; Gidaris et al. 2018). With `gen`: each image turned by one k drawn from it
    (N images: the forward cost of a supervised batch)."""
    _need_square(x, "rotation")
    if gen is not None:
        k = torch.randint(0, 4, (len(x),), generator=gen)
        return rot90(x, k), k.to(x.device)
    xs = [rot90(x, k) for k in range(4)]
    y = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return torch.cat(xs), y


# ---------------------------------------------------------------------------
# EDA: the CLI summary and a sample grid


def class_counts(ds: ImageSet) -> np.ndarray:
    """Images per class (positives per class when multi-label)."""
    k = len(ds.classes)
    if not ds.has_labels or k == 0:
        return np.zeros(k, np.int64)
    if ds.multi_label:
        return (ds.labels > 0.5).sum(0).numpy().astype(np.int64)
    y = ds.labels[ds.labels >= 0]
    return np.bincount(y.numpy(), minlength=k)[:k]


def save_grid(ds: ImageSet, path, per_class: int = 8, max_classes: int = 40) -> int:
    """Write a PNG grid: one row of samples per class (or 8x8 samples if unlabeled). Rows."""
    from PIL import ImageDraw

    n, c, h, w = ds.images.shape
    scale = max(1, 56 // max(h, w))
    cell_h, cell_w = h * scale, w * scale
    if max(cell_h, cell_w) > 128:
        f = 128 / max(cell_h, cell_w)
        cell_h, cell_w = max(1, int(cell_h * f)), max(1, int(cell_w * f))
    rows: list[tuple[str, list[int]]] = []
    if ds.has_labels and ds.classes:
        for k, name in enumerate(ds.classes[:max_classes]):
            hit = ds.labels[:, k] > 0.5 if ds.multi_label else ds.labels == k
            rows.append((f"{k} {name}", torch.nonzero(hit).flatten()[:per_class].tolist()))
    else:
        per_class = 8
        rows = [("", list(range(i, min(i + 8, n)))) for i in range(0, min(64, n), 8)]
    label_w = 110 if any(r[0] for r in rows) else 0
    gap = 2
    grid = Image.new(
        "RGB",
        (label_w + per_class * (cell_w + gap), max(1, len(rows)) * (cell_h + gap)),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for r, (name, idx) in enumerate(rows):
        y = r * (cell_h + gap)
        draw.text((2, y + max(0, cell_h // 2 - 6)), name[:18], fill="black")
        for j, i in enumerate(idx):
            a = ds.images[i].numpy()
            im = Image.fromarray(a[0] if c == 1 else a.transpose(1, 2, 0))
            im = im.resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(im.convert("RGB"), (label_w + j * (cell_w + gap), y))
    fmt = _check_grid_path(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format=fmt)
    return len(rows)


def _check_grid_path(path) -> str:
    """PIL format name of a --grid path; UserError for a directory or an unknown extension."""
    if Path(path).is_dir():
        raise UserError(
            f"--grid {path}: is a directory; pass a file such as {Path(path) / 'grid.png'}"
        )
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"--grid {path}: unknown image extension; use .png")
    return fmt


def _describe_part(name: str, ds: ImageSet) -> list:
    sec = ds.info.get("seconds") or 0.0
    if ds.info.get("cached"):
        how = f"cached, loaded in {sec:.2f} s"
    else:
        how = f"decoded in {sec:.2f} s ({len(ds) / max(sec, 1e-9):,.0f} images/s)"
    shape = "x".join(str(v) for v in ds.images.shape[1:])
    return [name, len(ds), shape, str(ds.images.dtype).replace("torch.", ""), how]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Load a data set and print what was found (format, parts, classes, stats).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", required=True, help="data set path (directory, CSV or IDX file)")
    p.add_argument(
        "--data-format", default=None, choices=sorted(FORMATS), help="override auto-detection"
    )
    p.add_argument("--img-size", type=image_size(), default=None, help="resize to N or HxW")
    p.add_argument("--in-chans", type=int, choices=(1, 3), default=None, help="force grey/RGB")
    p.add_argument("--val-ratio", type=fraction, default=0.1, help="held-out fraction of train")
    p.add_argument("--split-seed", type=seed_int, default=0, help="seed of the train/val split")
    p.add_argument(
        "--split", choices=SPLITS, default="train", help="split for the statistics and --grid"
    )
    p.add_argument("--label-column", default=None, help="CSV label column (default: auto)")
    p.add_argument("--grid", default=None, help="write a PNG of samples per class here")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")
    p.add_argument("--cache-dir", default=None, help="cache dir ($IMGCLS_CACHE or ~/.cache/imgcls)")
    p.add_argument("--no-cache", action="store_true", help="decode without reading/writing cache")
    add_common_flags(p)
    with cli_errors("data.py"):
        args = parse_args(p, argv)
        summarize(args)


def summarize(args: argparse.Namespace) -> None:
    """Print the EDA summary of args.data (and write --grid)."""
    t0 = time.perf_counter()
    if args.grid:
        _check_grid_path(args.grid)  # before the data is decoded: a bad --grid fails at once
    fmt = args.data_format or detect_format(args.data)
    opts = Opts(
        args.img_size, args.in_chans, args.skip_bad_images, args.label_column, args.quiet,
        not args.no_cache, args.cache_dir,
    )  # fmt: skip
    train = load_images(args.data, fmt, "train", opts)
    try:
        test = load_images(args.data, fmt, "test", opts)
    except MissingPartError:
        test = None
    tr, va = split_indices(train.labels, args.val_ratio, args.split_seed, train.groups)
    val_hash = ids_hash([train.ids[i] for i in va])
    ml = "  (multi-label)" if train.multi_label else ""
    print(f"data: {args.data}  format: {fmt}  classes: {len(train.classes)}{ml}")
    rows = [_describe_part("train", train)]
    if test is not None:
        rows.append(_describe_part("test", test))
    print(format_table(rows, ["part", "images", "shape", "dtype", "load"]))
    print(
        f"split (--split-seed {args.split_seed}, --val-ratio {args.val_ratio}): "
        f"train {len(tr)}, val {len(va)}, val_hash {val_hash}"
        + (f", grouped by {len(set(train.groups))} groups" if train.groups else "")
    )
    if train.classes:
        parts = {"train-part": train, "train": train.subset(tr), "val": train.subset(va)}
        if test is not None:
            parts["test"] = test
        counts = {k: class_counts(v) for k, v in parts.items()}
        table = [
            [k, name, *(int(counts[p][k]) for p in parts)] for k, name in enumerate(train.classes)
        ]
        print(format_table(table, ["label", "class", *parts]))
    if not train.has_labels:
        print("no labels found (unlabeled images)")
    if args.split == "test" and test is None:
        raise UserError(f"{args.data}: no test part; use --split train, val or all")
    chosen = {
        "train": lambda: train.subset(tr),
        "val": lambda: train.subset(va),
        "test": lambda: test,
        "all": lambda: train,
    }[args.split]()
    mean, std = mean_std(chosen.images)
    print(
        f"{args.split}: {len(chosen)} images; mean {[round(v, 4) for v in mean]}, "
        f"std {[round(v, 4) for v in std]} (0..1 scale)"
    )
    skipped = len(train.info.get("skipped", [])) + len(test.info.get("skipped", []) if test else [])
    if skipped:
        print(f"skipped {skipped} unreadable images (--skip-bad-images)")
    if args.grid:
        nrows = save_grid(chosen, args.grid)
        print(f"wrote {args.grid} ({nrows} rows of samples from {args.split})")
    total = len(train) + (len(test) if test is not None else 0)
    print(f"data.py: {fmt}, {total} images, {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
