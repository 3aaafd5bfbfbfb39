"""Make synthetic letter image sets: `letters` (one letter per image) or `dirty` (Dirty-MNIST style).

    python synth.py --mode letters --output-dir data/letters --num-images 20000 --num-test 2000
    python synth.py --mode dirty --output-dir data/dirty --num-images 5000 --workers 2

Image i of a part depends only on (--seed, part, i, settings): its random numbers come from
`np.random.default_rng([seed, part, i])` (part 0 = train, 1 = test). So shards made with
`--index-offset` and runs with any `--workers` give the same bytes as one run over the range.

Glyphs come from `--mnist-data` (Dacon letters CSV `id,digit,letter,0..783`, 28x28, pixel values
doubled and clipped), an IDX pair (`--idx-images/--idx-labels`, labels 0..25 or EMNIST 1..26), or
the font Pillow ships (default), drawn with random stroke width, affine and elastic distortion;
letters mode mixes in lower-case forms (as EMNIST letters does), so the task is not trivial.

Layout of --output-dir (images always sit beside the CSV that lists them):

    synth.json              manifest; data.py recognises the directory by it (format `synth`)
    000000.png ...          train images, grey uint8 PNG, named path_pattern.format(index=i)
    labels.csv              train rows (shards: one CSV per shard, e.g. labels_000100.csv)
    test/000000.png ...     test part (--num-test), own index space
    test/labels.csv
    .synth.lock             lock serialising synth.json updates of concurrent shards

CSV columns: letters mode `index,path,label` (label A..Z); dirty mode the competition answer
format `index,a,...,z` (0/1 per letter, no path column: the image is path_pattern).
synth.json keys:

    format "synth", version 1, mode "letters"|"dirty", multi_label (bool),
    classes     ["A".."Z"] (letters: values of label_column) or ["a".."z"] (dirty: column names)
    img_size [H, W], channels 1,
    id_column "index", image_column "path" (dirty: null), label_column "label" (dirty: null),
    path_pattern "{index:06d}.png"  (relative to the directory of each CSV),
    csv        list of train CSVs relative to this directory, sorted by index_offset;
               concatenating their rows gives the whole train part
    test_csv   list of test CSVs (key absent when there is no test part)
    parts      one record per run: split, csv, index_offset, num_images, seed, glyphs, created

Runs may add shards to an existing synth directory when settings match and index ranges do not
overlap; `--overwrite` replaces overlapping parts (or, on a settings mismatch, all parts).
A killed run registers nothing: rerunning the same command rewrites its images. synth.py only
deletes or writes files inside --output-dir: a synth.json naming a CSV outside it is refused.

The competition layout instead (dirty-MNIST: `dirty_mnist_2nd/00000.png ...` with the answer CSV
`dirty_mnist_2nd_answer.csv` `index,a,...,z` beside the folder): an --output-csv beside
--output-dir whose name starts with the folder's merges this run into that data set, the
seed's "add the synthetic images to the given training data" step as one command:

    python synth.py --mode dirty --mnist-data mnist_data/train.csv --output-dir dirty_mnist_2nd \
        --output-csv dirty_mnist_2nd_answer.csv --num-images 5000 --index-offset 100000

The images go into the folder as {index:06d}.png, the rows are added to the answer CSV (indices
already there, or images already on disk, are refused unless --overwrite; nothing is deleted),
no synth.json is written, and `train.py --data dirty_mnist_2nd_answer.csv` reads the merged set.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import math
import multiprocessing
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from common import (
    HelpFormatter,
    Timer,
    UserError,
    add_common_flags,
    atomic_write_text,
    cli_errors,
    image_size,
    int_range,
    nonneg_int,
    parse_args,
    progress,
    seed_int,
    size2,
    threads_int,
    write_json,
)

LETTERS = [chr(ord("A") + k) for k in range(26)]
MANIFEST = "synth.json"
PATH_PATTERN = "{index:06d}.png"
SPLITS = {"train": 0, "test": 1}  # the `part` number in each image's RNG seed
BANK_STREAM = 2  # RNG stream of the built-in glyph bank used by dirty mode
BANK_PER_LETTER = 64
WORK = 64  # resolution at which letters are distorted before resizing
DEFAULTS = {
    "letters": {"img_size": 28, "num_images": 20000},
    "dirty": {"img_size": 256, "num_images": 5000},
}


# ---------------------------------------------------------------------------
# Glyph sources: uint8 arrays N x h x w (ink bright on 0) and int labels 0..25


def load_pixels_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Dacon letters CSV (`letter` + pixel columns 0..783) -> glyphs doubled and clipped, labels."""
    import pandas as pd  # only this source needs pandas; keeps worker start-up light

    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "file not found"
        raise UserError(f"{path}: --mnist-data {what}; pass the letters CSV (id,letter,0..783)")
    try:
        df = pd.read_csv(p)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read --mnist-data CSV ({msg}); pass a valid CSV") from None
    pixel_cols = [str(k) for k in range(784)]
    missing = [c for c in ["letter", *pixel_cols] if c not in df.columns]
    if missing:
        raise UserError(
            f"{path}: --mnist-data lacks column '{missing[0]}' ({len(missing)} missing); "
            "expected id,digit,letter,0..783"
        )
    if len(df) == 0:
        raise UserError(f"{path}: --mnist-data has no rows; pass a CSV with glyphs")
    letters = df["letter"].astype(str).str.strip().str.upper()
    bad = ~letters.isin(LETTERS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(
            f"{path}: row {row + 1} has letter {df['letter'].iloc[row]!r}; letters must be A-Z"
        )
    pixels = df[pixel_cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if np.isnan(pixels).any() or pixels.min() < 0 or pixels.max() > 255:
        row = int(np.flatnonzero(~((pixels >= 0) & (pixels <= 255)).all(axis=1))[0])
        raise UserError(f"{path}: row {row + 1} has a pixel that is not a number in 0..255; fix it")
    glyphs = np.clip(pixels * 2, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = letters.map({c: k for k, c in enumerate(LETTERS)}).to_numpy(np.int64)
    return glyphs, labels


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not an IDX file" if p.is_dir() else "IDX file not found"
        raise UserError(f"{path}: {what}; pass an existing --idx-images/--idx-labels file")
    try:
        raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read IDX file ({e}); pass an uncorrupted file") from None
    head = 4 + 4 * ndim
    if len(raw) < head or struct.unpack(">I", raw[:4])[0] != magic:
        raise UserError(
            f"{path}: not an IDX file with magic {magic}; check --idx-images/--idx-labels"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) - head != math.prod(dims):
        raise UserError(
            f"{path}: IDX header says {dims} but the data size differs; file truncated?"
        )
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def load_idx(images: str, labels: str, transpose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """IDX images + labels (0..25, or EMNIST letters 1..26) -> glyphs, labels 0..25."""
    x = _read_idx(images, 2051, 3)
    y = _read_idx(labels, 2049, 1).astype(np.int64)
    if len(x) != len(y) or len(x) == 0:
        raise UserError(
            f"{images}: {len(x)} images but {labels} has {len(y)} labels; pass a matching pair"
        )
    if y.max() <= 25:
        pass
    elif y.min() >= 1 and y.max() <= 26:
        y = y - 1  # EMNIST letters numbers A..Z as 1..26
    else:
        raise UserError(f"{labels}: labels must be 0..25 or 1..26 (A..Z), found max {y.max()}")
    return (x.transpose(0, 2, 1) if transpose else x).copy(), y


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType font, Pillow >= 10.1
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # tiny bitmap font, scaled up below


def builtin_glyphs(lowercase: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every letter in Pillow's default font at several heights and stroke widths, WORK x WORK."""
    glyphs, labels = [], []
    cases = [str.upper, str.lower] if lowercase else [str.upper]
    for height in (28, 34, 40, 46):
        font = _font(height)
        for stroke in (0, 1, 2, 3):
            for case in cases:
                for k, ch in enumerate(LETTERS):
                    glyphs.append(_render_char(case(ch), font, height, stroke))
                    labels.append(k)
    return np.stack(glyphs), np.array(labels, np.int64)


def _render_char(ch: str, font, height: int, stroke: int) -> np.ndarray:
    big = Image.new("L", (4 * WORK, 4 * WORK), 0)
    ImageDraw.Draw(big).text(
        (WORK, WORK), ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    glyph = big.crop(big.getbbox())
    if not isinstance(font, ImageFont.FreeTypeFont):  # bitmap font: no sizes, so scale it
        f = height / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * f)), max(1, round(glyph.height * f))))
    if max(glyph.size) > WORK - 4:
        glyph.thumbnail((WORK - 4, WORK - 4), Image.Resampling.BILINEAR)
    out = Image.new("L", (WORK, WORK), 0)
    out.paste(glyph, ((WORK - glyph.width) // 2, (WORK - glyph.height) // 2))
    return np.asarray(out)


def distort(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random affine (rotation, shear, scale, shift) plus elastic jitter, one PIL mesh transform."""
    w, h = im.size
    cells = 4
    gx, gy = np.meshgrid(np.linspace(0, w, cells + 1), np.linspace(0, h, cells + 1))
    out_pts = np.stack([gx, gy], -1)
    ang = np.deg2rad(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    scale = np.exp(rng.uniform(np.log(0.8), np.log(1.2), 2))
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    inv = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(1 / scale)  # output -> source
    centre = np.array([w / 2, h / 2])
    shift = rng.uniform(-0.08, 0.08, 2) * np.array([w, h])
    jitter = rng.normal(0, 0.04 * w, out_pts.shape)
    src = (out_pts - centre) @ inv.T + centre + shift + jitter
    # per cell: output box (x0, y0, x1, y1) and source quad (UL, LL, LR, UR corners)
    boxes = np.concatenate([out_pts[:-1, :-1], out_pts[1:, 1:]], -1).astype(int)
    quads = np.concatenate([src[:-1, :-1], src[1:, :-1], src[1:, 1:], src[:-1, 1:]], -1)
    mesh = [
        (tuple(b), tuple(q))
        for b, q in zip(boxes.reshape(-1, 4).tolist(), quads.reshape(-1, 8).tolist())
    ]
    return im.transform((w, h), Image.Transform.MESH, mesh, resample=Image.Resampling.BILINEAR)


def dirty_bank(clean: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """BANK_PER_LETTER distorted 28x28 glyphs per letter, a function of the seed alone."""
    by_letter = [np.flatnonzero(labels == k) for k in range(26)]
    bank, out_labels = [], []
    for j in range(26 * BANK_PER_LETTER):
        rng = np.random.default_rng([seed, BANK_STREAM, j])
        k = j % 26
        im = distort(Image.fromarray(clean[by_letter[k][rng.integers(len(by_letter[k]))]]), rng)
        bank.append(np.asarray(im.resize((28, 28), Image.Resampling.BILINEAR)))
        out_labels.append(k)
    return np.stack(bank), np.array(out_labels, np.int64)


# ---------------------------------------------------------------------------
# One image: a pure function of (job settings, part, index)


@dataclass
class Job:
    mode: str
    seed: int
    size: tuple[int, int]  # H, W
    glyphs: np.ndarray
    labels: np.ndarray
    letters_min: int
    letters_max: int
    out_dir: str
    png_level: int

    def __post_init__(self) -> None:
        self.by_letter = [np.flatnonzero(self.labels == k) for k in range(26)]
        self.available = np.array([k for k in range(26) if len(self.by_letter[k])], np.int64)


def letter_image(job: Job, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One distorted letter on a noisy background of job.size -> (image, label)."""
    label = int(job.available[rng.integers(len(job.available))])
    pool = job.by_letter[label]
    im = Image.fromarray(job.glyphs[pool[rng.integers(len(pool))]])
    if im.size != (WORK, WORK):
        im = im.resize((WORK, WORK), Image.Resampling.BILINEAR)
    im = distort(im, rng)
    blur = rng.uniform(0, 1.5)
    if blur > 0.3:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    h, w = job.size
    a = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), np.float32)
    bg, ink, sigma = rng.uniform(0, 60), rng.uniform(0.5, 1.0), rng.uniform(0, 20)
    a = bg + a * (ink * (255 - bg) / 255) + rng.normal(0, sigma, a.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8), label


def dirty_image(job: Job, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise canvas with several distinct letters added on -> (image, 26 0/1 flags)."""
    h, w = job.size
    canvas = rng.integers(0, 255, (h, w), dtype=np.uint16)  # noise 0..254
    k = int(rng.integers(job.letters_min, job.letters_max + 1))
    present = np.zeros(26, np.uint8)
    for letter in rng.choice(job.available, k, replace=False):
        pool = job.by_letter[letter]
        glyph = Image.fromarray(job.glyphs[pool[rng.integers(len(pool))]])
        g = np.asarray(scale_rotate(glyph, rng.uniform(1, 2), rng.uniform(0, 360)), np.uint16)
        if rng.random() < 0.3:  # faint letter
            g = (g * rng.uniform(0.3, 0.7)).astype(np.uint16)
        y = int(rng.integers(0, h - g.shape[0] + 1))
        x = int(rng.integers(0, w - g.shape[1] + 1))
        canvas[y : y + g.shape[0], x : x + g.shape[1]] += g
        present[letter] = 1
    return np.minimum(canvas, 255, out=canvas).astype(np.uint8), present


def scale_rotate(glyph: Image.Image, scale: float, angle: float) -> Image.Image:
    """Scale, then rotate by `angle` degrees onto the whole rotated box (like rotate(expand=True)).

    One bilinear affine map instead of resize + rotate: half the time, and no double resampling.
    """
    w, h = glyph.size
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    out_w = math.ceil(scale * (abs(w * cos) + abs(h * sin)) - 1e-6)
    out_h = math.ceil(scale * (abs(w * sin) + abs(h * cos)) - 1e-6)
    # output pixel -> input pixel: about the centres, rotate back and undo the scale
    a, b, d, e = cos / scale, -sin / scale, sin / scale, cos / scale
    c = w / 2 - a * out_w / 2 - b * out_h / 2
    f = h / 2 - d * out_w / 2 - e * out_h / 2
    return glyph.transform(
        (out_w, out_h), Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR
    )


def png_bytes(a: np.ndarray, level: int) -> bytes:
    """Grey uint8 array -> PNG bytes (filter 0). Far faster than PIL for noise that won't compress."""
    h, w = a.shape
    raw = np.zeros((h, w + 1), np.uint8)  # each row starts with filter type 0
    raw[:, 1:] = a

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + chunk(b"IEND", b"")
    )


def write_image(job: Job, split: str, index: int) -> str:
    """Render and write image `index` of a part; return its CSV row."""
    rng = np.random.default_rng([job.seed, SPLITS[split], index])
    name = PATH_PATTERN.format(index=index)
    folder = Path(job.out_dir) / ("test" if split == "test" else "")
    if job.mode == "letters":
        img, label = letter_image(job, rng)
        row = f"{index},{name},{LETTERS[label]}"
    else:
        img, present = dirty_image(job, rng)
        row = f"{index}," + ",".join("01"[v] for v in present)
    with open(folder / name, "wb") as f:
        f.write(png_bytes(img, job.png_level))
    return row


_JOB: Job | None = None  # set once per worker process


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job


def _run_chunk(task: tuple[str, int, int]) -> list[str]:
    split, start, stop = task
    return [write_image(_JOB, split, i) for i in range(start, stop)]


def generate(job: Job, tasks: list[tuple[str, int, int]], workers: int, quiet: bool) -> dict:
    """Write every image of `tasks` (split, start, stop) -> {split: CSV rows in index order}."""
    rows: dict[str, list[str]] = {s: [] for s, _, _ in tasks}
    with contextlib.ExitStack() as stack:
        if workers == 1:
            _init_worker(job)
            results = map(_run_chunk, tasks)
        else:
            # spawn, not fork: safe when the caller has threads (torch, tqdm), same on every OS
            ctx = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ctx.Pool(workers, _init_worker, (job,)))
            results = pool.imap(_run_chunk, tasks)
        bar = progress(results, quiet, total=len(tasks), desc="synth", unit="chunk")
        for (split, _, _), chunk_rows in zip(tasks, bar):
            rows[split].extend(chunk_rows)
    return rows


def _chunks(split: str, start: int, count: int, workers: int) -> list[tuple[str, int, int]]:
    step = max(8, min(256, math.ceil(count / (workers * 8))))
    return [(split, i, min(i + step, start + count)) for i in range(start, start + count, step)]


# ---------------------------------------------------------------------------
# The manifest (synth.json) and shard bookkeeping


def manifest_header(mode: str, size: tuple[int, int]) -> dict:
    """Fixed keys of synth.json for a mode; shards must agree on them."""
    letters = mode == "letters"
    return {
        "format": "synth",
        "version": 1,
        "mode": mode,
        "classes": LETTERS if letters else [c.lower() for c in LETTERS],
        "multi_label": not letters,
        "img_size": list(size),
        "channels": 1,
        "id_column": "index",
        "image_column": "path" if letters else None,
        "label_column": "label" if letters else None,
        "path_pattern": PATH_PATTERN,
    }


@contextlib.contextmanager
def _locked(out_dir: Path):
    """Serialise synth.json updates of shards running at once (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out_dir / ".synth.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(out_dir: Path) -> dict | None:
    p = out_dir / MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(m, dict) or m.get("format") != "synth":
            raise ValueError("not a synth manifest")
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable ({e}); delete it or choose a new --output-dir") from None
    bad = _unsafe_entry(out_dir, m)
    if bad:
        raise UserError(
            f"{p}: {bad}; synth.py only touches files inside --output-dir: delete this "
            "synth.json or choose a new --output-dir"
        )
    return m


def _inside(out_dir: Path, rel) -> bool:
    """Whether a path a manifest names stays inside out_dir (relative, no '..' out of it)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return False
    root = os.path.normpath(os.path.abspath(out_dir))
    p = os.path.normpath(os.path.join(root, rel))
    return p.startswith(root + os.sep)


def _unsafe_entry(out_dir: Path, m: dict) -> str | None:
    """What in a manifest points outside out_dir (or is malformed), else None."""
    parts = m.get("parts", [])
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        return "'parts' is not a list of records"
    for i, p in enumerate(parts):
        if not _inside(out_dir, p.get("csv")):
            return f"part {i} names CSV {p.get('csv')!r}, outside the directory"
        if p.get("split") not in SPLITS:
            return f"part {i} has split {p.get('split')!r}, not train or test"
        if not all(type(p.get(k)) is int and p[k] >= 0 for k in ("index_offset", "num_images")):
            return f"part {i} lacks a whole index_offset/num_images"
    for key in ("csv", "test_csv"):
        v = m.get(key) or []
        for c in [v] if isinstance(v, str) else v:
            if not _inside(out_dir, c):
                return f"'{key}' names {c!r}, outside the directory"
    return None


def _overlaps(a: dict, b: dict) -> bool:
    return a["split"] == b["split"] and (
        a["index_offset"] < b["index_offset"] + b["num_images"]
        and b["index_offset"] < a["index_offset"] + a["num_images"]
    )


def merge_parts(manifest: dict | None, header: dict, new: list[dict], overwrite: bool, where: Path):
    """Existing parts that stay, or UserError on a clash (settings, index range or CSV name)."""
    if manifest is None:
        return []
    keep = list(manifest.get("parts", []))
    if any(manifest.get(k) != v for k, v in header.items()):
        if not overwrite:
            diff = [k for k, v in header.items() if manifest.get(k) != v]
            raise UserError(
                f"{where / MANIFEST}: existing data differs in {', '.join(diff)}; "
                "use a new --output-dir or pass --overwrite"
            )
        keep = []
    for part in new:
        clash = [p for p in keep if _overlaps(p, part) or p["csv"] == part["csv"]]
        if clash and not overwrite:
            p = clash[0]
            raise UserError(
                f"{where}: {p['split']} images {p['index_offset']}..{p['index_offset'] + p['num_images'] - 1} "
                f"({p['csv']}) already exist; use another --index-offset/--output-csv or --overwrite"
            )
        keep = [p for p in keep if p not in clash]
    return keep


def save_manifest(out_dir: Path, header: dict, parts: list[dict]) -> dict:
    """Write synth.json with `csv`/`test_csv` lists derived from the parts."""
    parts = sorted(parts, key=lambda p: (p["split"], p["index_offset"]))
    m = dict(header)
    m["csv"] = [p["csv"] for p in parts if p["split"] == "train"]
    tests = [p["csv"] for p in parts if p["split"] == "test"]
    if tests:
        m["test_csv"] = tests
    m["parts"] = parts
    write_json(out_dir / MANIFEST, m)
    return m


def prepare_output(out_dir: Path, header: dict, new: list[dict], overwrite: bool) -> None:
    """Check the directory may take these parts; mark it as a synth directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory; choose another --output-dir")
    if (
        out_dir.is_dir()
        and not (out_dir / MANIFEST).exists()
        and any(out_dir.iterdir())
        and not overwrite
    ):
        raise UserError(
            f"{out_dir}: not empty and not made by synth.py (no {MANIFEST}); "
            "choose an empty --output-dir or pass --overwrite"
        )
    _mkdir(out_dir)
    if any(p["split"] == "test" for p in new):
        _mkdir(out_dir / "test")
    with _locked(out_dir):
        manifest = _read_manifest(out_dir)
        keep = merge_parts(manifest, header, new, overwrite, out_dir)
        if manifest is None or len(keep) != len(manifest.get("parts", [])):
            _drop_csvs(out_dir, manifest, keep)
            save_manifest(out_dir, header, keep)


def _mkdir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{d}: cannot create ({e.strerror}); choose a writable --output-dir"
        ) from None


def register_parts(out_dir: Path, header: dict, new: list[dict], overwrite: bool) -> dict:
    """Add finished parts to synth.json (re-checked under the lock against concurrent shards)."""
    with _locked(out_dir):
        manifest = _read_manifest(out_dir)
        keep = merge_parts(manifest, header, new, overwrite, out_dir)
        _drop_csvs(out_dir, manifest, keep + new)
        return save_manifest(out_dir, header, keep + new)


def _drop_csvs(out_dir: Path, manifest: dict | None, keep: list[dict]) -> None:
    kept = {p["csv"] for p in keep}
    for p in (manifest or {}).get("parts", []):
        if p["csv"] not in kept and _inside(out_dir, p["csv"]):  # checked on reading, too
            with contextlib.suppress(OSError):
                (out_dir / p["csv"]).unlink()


# ---------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--mode",
        choices=["letters", "dirty"],
        default="letters",
        help="letters: one letter per image, 26 classes; dirty: many letters on noise, multi-label",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="where images, CSVs and synth.json go; None = data/synth-<mode>",
    )
    p.add_argument(
        "--output-csv",
        default=None,
        help="CSV of this run's train rows: a name inside --output-dir (None = labels.csv, or "
        "labels_<offset>.csv for a shard), or, with --mode dirty, an answer CSV beside "
        "--output-dir whose name starts with the folder's (the competition layout: "
        "--output-dir dirty_mnist_2nd --output-csv dirty_mnist_2nd_answer.csv adds the rows to "
        "that CSV, the images to the folder, and writes no synth.json)",
    )
    p.add_argument(
        "--num-images",
        type=nonneg_int,
        default=None,
        help="train images; None = 20000 letters, 5000 dirty",
    )
    p.add_argument(
        "--index-offset",
        type=nonneg_int,
        default=0,
        help="index of the first train image (for shards)",
    )
    p.add_argument(
        "--num-test",
        type=nonneg_int,
        default=0,
        help="also write a test part of this many images to test/ (indices 0..N-1; give it in one shard)",
    )
    p.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="random seed; image i depends only on (seed, part, i)",
    )
    p.add_argument(
        "--workers", type=threads_int, default=1, help="processes; output bytes do not depend on it"
    )
    p.add_argument(
        "--img-size",
        type=image_size(8, 8192),
        default=None,
        help="N or HxW; None = 28 letters, 256 dirty",
    )
    p.add_argument(
        "--letters-min",
        type=int_range(1, 26),
        default=10,
        help="dirty: fewest distinct letters per image",
    )
    p.add_argument(
        "--letters-max",
        type=int_range(1, 26),
        default=14,
        help="dirty: most distinct letters per image",
    )
    p.add_argument(
        "--mnist-data",
        default=None,
        help="glyphs from a Dacon letters CSV (id,digit,letter,0..783)",
    )
    p.add_argument(
        "--idx-images", default=None, help="glyphs from an IDX image file (with --idx-labels)"
    )
    p.add_argument("--idx-labels", default=None, help="IDX labels 0..25 or 1..26 (EMNIST letters)")
    p.add_argument(
        "--idx-transpose", action="store_true", help="transpose IDX glyphs (EMNIST stores them so)"
    )
    p.add_argument(
        "--png-level",
        type=int_range(0, 9),
        default=None,
        help="zlib level 0..9; None = 0 for dirty (noise does not compress), 6 for letters",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace parts whose index range overlaps, or all parts if settings differ",
    )
    add_common_flags(p)
    return p


def check_args(a: argparse.Namespace) -> tuple[int, int]:
    """Flag combinations the flag types cannot see; return the image size (H, W)."""
    if a.letters_min > a.letters_max:
        raise UserError(
            f"--letters-max {a.letters_max}: must be at least --letters-min {a.letters_min}"
        )
    if a.num_images + a.num_test == 0:
        raise UserError("--num-images and --num-test are both 0; nothing to write")
    if a.mnist_data and (a.idx_images or a.idx_labels):
        raise UserError("--mnist-data and --idx-images are exclusive; pass one glyph source")
    if bool(a.idx_images) != bool(a.idx_labels):
        raise UserError("--idx-images and --idx-labels go together; pass both")
    return size2(a.img_size)


def load_glyphs(a: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """Glyphs the job draws from, their labels, and a description for the manifest."""
    if a.mnist_data:
        g, y = load_pixels_csv(a.mnist_data)
        return g, y, f"mnist-csv:{Path(a.mnist_data).name}"
    if a.idx_images:
        g, y = load_idx(a.idx_images, a.idx_labels, a.idx_transpose)
        return g, y, f"idx:{Path(a.idx_images).name}"
    # letters mode mixes in lower case (like EMNIST letters) so the task is not trivial
    if a.mode == "letters":
        return (*builtin_glyphs(lowercase=True), "builtin")
    return (*_builtin_bank(a.seed), "builtin")


@functools.lru_cache(maxsize=2)
def _builtin_bank(seed: int) -> tuple[np.ndarray, np.ndarray]:
    return dirty_bank(*builtin_glyphs(lowercase=False), seed)


def resolve_csv(out_dir: Path, given: str | None, offset: int) -> str | Path:
    """Where this run's train rows go: a CSV name inside out_dir (a synth directory), or the
    path of an answer CSV beside out_dir (the competition layout, see merge_answer_csv)."""
    if given is None:
        return "labels.csv" if offset == 0 else f"labels_{offset:06d}.csv"
    p = Path(given).expanduser()
    if p.suffix.lower() != ".csv" or p.name == MANIFEST:
        raise UserError(f"--output-csv {given}: must end in .csv")
    here = Path(os.path.normpath(p.absolute()))
    od = Path(os.path.normpath(out_dir.expanduser().absolute()))
    if here.parent == od:
        return p.name
    if here.parent == od.parent and p.stem.startswith(od.name):
        return here  # dirty_mnist_2nd_answer.csv beside dirty_mnist_2nd/
    if p.parent == Path("."):  # a bare name: a CSV inside --output-dir
        return p.name
    raise UserError(
        f"--output-csv {given}: must be a name inside --output-dir {out_dir}, or a CSV beside "
        f"it whose name starts with '{od.name}' (e.g. {od.parent / (od.name + '_answer.csv')}), "
        "so the images can be found from it"
    )


def _answer_rows(csv_path: Path, header: str) -> dict[int, str]:
    """index -> row of an existing answer CSV (which must have `header`), {} if absent."""
    if not csv_path.exists():
        return {}
    if not csv_path.is_file():
        raise UserError(f"--output-csv {csv_path}: is a directory; pass a CSV file path")
    try:
        lines = csv_path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--output-csv {csv_path}: cannot read ({e}); fix or move it") from None
    if not lines or lines[0].strip().replace(" ", "") != header:
        raise UserError(
            f"--output-csv {csv_path}: header is not {header[:24]}...; merge only into an "
            "answer CSV of the same letters"
        )
    rows = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cell = line.split(",", 1)[0].strip()
        if not cell.isdigit() or int(cell) in rows:
            raise UserError(f"--output-csv {csv_path}: line {n}: index {cell!r} bad or repeated")
        rows[int(cell)] = line.strip()
    return rows


def check_answer_layout(a: argparse.Namespace, out_dir: Path, csv_path: Path) -> None:
    """Refuse, before anything is written, what the answer-CSV layout cannot take."""
    if a.mode != "dirty":
        raise UserError(
            f"--output-csv {a.output_csv}: a CSV beside --output-dir is the dirty-MNIST answer "
            "layout; use --mode dirty, or a CSV name inside --output-dir"
        )
    if a.num_test:
        raise UserError(
            "--num-test: the answer-CSV layout has no test part; write it to its own "
            "--output-dir (a synth directory)"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory; choose another --output-dir")
    if (out_dir / MANIFEST).exists():
        raise UserError(
            f"{out_dir}: is a synth directory ({MANIFEST}); give --output-csv a name inside it"
        )
    header = "index," + ",".join(c.lower() for c in LETTERS)
    rows = _answer_rows(csv_path, header)
    new = range(a.index_offset, a.index_offset + a.num_images)
    clash = [i for i in new if i in rows]
    if clash and not a.overwrite:
        raise UserError(
            f"--output-csv {csv_path}: already lists index {clash[0]} ({len(clash)} of "
            f"{a.index_offset}..{new[-1]}); pick another --index-offset or pass --overwrite"
        )
    taken = next((i for i in new if (out_dir / PATH_PATTERN.format(index=i)).exists()), None)
    if taken is not None and not a.overwrite:
        raise UserError(
            f"{out_dir / PATH_PATTERN.format(index=taken)}: exists; pick another --index-offset "
            "or pass --overwrite to replace those images"
        )


def merge_answer_csv(out_dir: Path, csv_path: Path, new_rows: list[str]) -> int:
    """Add this run's rows to the answer CSV beside the images (rows of the same index are
    replaced: checked by check_answer_layout); returns the number of rows it holds."""
    header = "index," + ",".join(c.lower() for c in LETTERS)
    with _locked(out_dir):  # shards merging at once: re-read under the lock
        rows = _answer_rows(csv_path, header)
        rows.update({int(r.split(",", 1)[0]): r for r in new_rows})
        atomic_write_text(csv_path, "\n".join([header, *(rows[i] for i in sorted(rows))]) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    with cli_errors("synth.py"):
        a = parse_args(build_parser(), argv)
        for key, value in DEFAULTS[a.mode].items():
            if getattr(a, key) is None:
                setattr(a, key, value)
        size = check_args(a)
        out_dir = Path(a.output_dir or f"data/synth-{a.mode}")
        csv_name = resolve_csv(out_dir, a.output_csv, a.index_offset)
        answer_csv = csv_name if isinstance(csv_name, Path) else None
        if answer_csv is not None:
            check_answer_layout(a, out_dir, answer_csv)
        glyphs, labels, source = load_glyphs(a)
        job = Job(
            mode=a.mode, seed=a.seed, size=size, glyphs=glyphs, labels=labels,
            letters_min=a.letters_min, letters_max=a.letters_max, out_dir=str(out_dir),
            png_level=a.png_level if a.png_level is not None else (0 if a.mode == "dirty" else 6),
        )  # fmt: skip
        if a.mode == "dirty":
            _check_dirty_fits(job, a)

        created = time.strftime("%Y-%m-%dT%H:%M:%S")
        common = {"seed": a.seed, "glyphs": source, "created": created}
        parts = []
        if a.num_images:
            parts.append({"split": "train", "csv": csv_name, "index_offset": a.index_offset,
                          "num_images": a.num_images, **common})  # fmt: skip
        if a.num_test:
            parts.append({"split": "test", "csv": "test/labels.csv", "index_offset": 0,
                          "num_images": a.num_test, **common})  # fmt: skip
        header = manifest_header(a.mode, size)
        if answer_csv is None:
            prepare_output(out_dir, header, parts, a.overwrite)
        else:
            _mkdir(out_dir)

        tasks = [
            t
            for p in parts
            for t in _chunks(p["split"], p["index_offset"], p["num_images"], a.workers)
        ]
        with Timer() as t:
            rows = generate(job, tasks, a.workers, a.quiet)
            csv_header = (
                "index,path,label"
                if a.mode == "letters"
                else "index," + ",".join(header["classes"])
            )
            if answer_csv is not None:
                total = merge_answer_csv(out_dir, answer_csv, rows["train"])
            for p in parts if answer_csv is None else []:
                atomic_write_text(
                    out_dir / p["csv"], "\n".join([csv_header, *rows[p["split"]]]) + "\n"
                )
        if answer_csv is None:
            register_parts(out_dir, header, parts, a.overwrite)

        n = a.num_images + a.num_test
        h, w = size
        print(
            f"synth.py: wrote {n} {a.mode} images ({h}x{w}, glyphs {source}) to {out_dir} "
            f"in {t.seconds:.1f} s ({n / max(t.seconds, 1e-9):.0f} images/s, {a.workers} worker(s))"
        )
        if answer_csv is not None:
            print(f"  train: {a.num_images} images, rows merged into {answer_csv} ({total} rows)")
        for p in parts if answer_csv is None else []:
            print(f"  {p['split']}: {p['num_images']} images, rows in {out_dir / p['csv']}")


def _check_dirty_fits(job: Job, a: argparse.Namespace) -> None:
    """Every glyph, scaled by up to 2 and rotated, must fit on the canvas."""
    g = max(job.glyphs.shape[1:])
    need = math.ceil(2 * g * math.sqrt(2)) + 2
    if min(job.size) < need:
        raise UserError(
            f"--img-size {a.img_size}: dirty mode needs at least {need} px for {g} px glyphs"
        )
    if len(job.available) < a.letters_max:
        raise UserError(
            f"--letters-max {a.letters_max}: the glyph source has only {len(job.available)} letters"
        )


if __name__ == "__main__":
    main()
