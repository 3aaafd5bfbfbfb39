"""Ensemble submissions: hard vote, weighted soft vote, Caruana ensemble selection; score them.

    python vote.py a.csv b.csv c.csv --mode hard --out vote.csv
    python vote.py a.npy b.npy c.npy --weights 1.5,1,1 --out vote.csv --return-probs
    python vote.py a.npy b.npy --select caruana --val-probs va.npy vb.npy --val-labels val.csv

This file owns the submission and probability formats (infer.py imports them):

- submission CSV, three kinds: `single` = `id,label` (label = class name); `mask` =
  `ImageID,ans` (ans = integer class); `multi` = `index` + one 0/1 column per class (single-letter
  class names lower-cased, as in the dirty-MNIST answer `index,a,...,z`).
- probabilities beside a submission `<stem>.csv`: `<stem>.npy` (float32 N x K) with
  `<stem>.ids.txt` (one id a line, row order) and `<stem>.classes.txt` (one class a line), or
  `<stem>.probs.csv` (`id` + one column per class); plus `<stem>.meta.json`
  {"multi_label", "classes", "kind"}. Without the meta file, the submission CSV beside the
  probabilities (its format) or --kind says whether they are single- or multi-label; a file
  none of them describes is refused (never guessed from the numbers).
- labels for scoring (`--labels`, `--val-labels`): any submission kind, or a CSV with a `label`
  column (class names) beside an id column (`id`, `index`, `ImageID`, `path` or `file`).

A mask submission (`ans` = class number) voted with files labelled by class name is mapped
through the classes its .meta.json records, or refused. All outputs (--out, --return-probs,
--confusion) are written together at the end (common.Outputs), never onto an input file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import (
    METRICS,
    HelpFormatter,
    Outputs,
    Timer,
    UserError,
    accuracy,
    add_common_flags,
    add_label_limit_flags,
    cli_errors,
    confusion_matrix,
    format_table,
    is_number,
    list_of,
    macro_f1,
    metric_name,
    multi_hot,
    natural_key,
    nonneg_float,
    nonneg_int,
    parse_args,
    per_class_accuracy,
    positive_int,
    pyplot,
    read_csv,
    read_thresholds,
    refuse_output_on_input,
    refuse_together,
    resolve_label_limits,
    threshold_arg,
    tune_thresholds,
)

KINDS = ("single", "mask", "multi")
_ID_COLUMNS = ("id", "index", "imageid", "path", "file", "filename", "image")

# ---------------------------------------------------------------------------
# File formats


def probs_paths(csv_path: str | Path) -> dict[str, Path]:
    """Paths of the probability files that belong to submission `csv_path` (same stem)."""
    s = str(_stem(csv_path))
    return {
        "npy": Path(s + ".npy"),
        "ids": Path(s + ".ids.txt"),
        "classes": Path(s + ".classes.txt"),
        "csv": Path(s + ".probs.csv"),
        "meta": Path(s + ".meta.json"),
        "submission": Path(s + ".csv"),
        "metrics": Path(s + ".metrics.json"),
        "thresholds": Path(s + ".thresholds.json"),
    }


def _stem(path: str | Path) -> Path:
    p = Path(path)
    suffixes = (".probs.csv", ".ids.txt", ".classes.txt", ".meta.json", ".metrics.json")
    for suffix in (*suffixes, ".thresholds.json", ".csv", ".npy"):
        if p.name.endswith(suffix) and len(p.name) > len(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def _column_name(c: str) -> str:
    """Multi-label column name: single letters lower-cased (dirty-MNIST `index,a,...,z`)."""
    c = str(c)
    return c.lower() if len(c) == 1 and c.isalpha() else c


def _str_list(values, path, what: str) -> list[str]:
    out = [str(v) for v in values]
    bad = next((v for v in out if "\n" in v or "\r" in v), None)
    if bad is not None:
        raise UserError(f"{path}: {what} {bad!r} contains a line break; use ids without newlines")
    return out


def _mask_answers(labels, classes, path) -> list[int]:
    """`ans` integers: ints as they are, numeric names parsed, other names by their class index."""
    index = {} if classes is None else {str(c): k for k, c in enumerate(classes)}
    out = []
    for x in labels:
        if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
            out.append(int(x))
        elif str(x).lstrip("-").isdigit():
            out.append(int(str(x)))
        elif str(x) in index:
            out.append(index[str(x)])
        else:
            raise UserError(f"{path}: mask answer {x!r} is not an integer; pass class indices")
    return out


@contextlib.contextmanager
def _staged(out: Outputs | None) -> Iterator[Outputs]:
    """`out` itself (the caller commits), or a fresh transaction committed at the block's end."""
    if out is not None:
        yield out
        return
    with Outputs() as own:
        yield own


def write_submission(
    path: str | Path,
    ids: Sequence,
    labels,
    kind: str = "single",
    classes: Sequence[str] | None = None,
    out: Outputs | None = None,
) -> Path:
    """Write a submission CSV: kind single (`id,label`), mask (`ImageID,ans`), multi.

    single: labels are class names, or class indices mapped through `classes`. multi: labels is
    an N x K 0/1 array, columns named by `classes` (default 0..K-1). Staged in `out` when given
    (visible at its commit), else written atomically now.
    """
    ids = _str_list(ids, path, "id")
    if kind == "single":
        arr = np.asarray(labels)
        if arr.dtype.kind in "iu" and classes is not None:
            names = [str(classes[int(k)]) for k in arr]
        else:
            names = [str(x) for x in labels]
        df = pd.DataFrame({"id": ids, "label": names})
    elif kind == "mask":
        df = pd.DataFrame({"ImageID": ids, "ans": _mask_answers(labels, classes, path)})
    elif kind == "multi":
        arr = np.asarray(labels)
        if arr.ndim != 2:
            raise ValueError(f"multi-label submission needs an N x K array, got {arr.shape}")
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("multi-label submission needs 0/1 values; threshold probabilities")
        cols = [str(k) for k in range(arr.shape[1])] if classes is None else list(classes)
        if len(cols) != arr.shape[1]:
            raise ValueError(f"{len(cols)} classes for {arr.shape[1]} label columns")
        names = [_column_name(c) for c in cols]
        if len(set(names)) != len(names) or "index" in names:
            raise ValueError(f"class names {cols} give duplicate CSV columns")
        df = pd.DataFrame(arr.astype(np.int64), columns=names)
        df.insert(0, "index", ids)
    else:
        raise ValueError(f"unknown submission kind '{kind}'; choose one of {KINDS}")
    if len(df) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(df)} labels")
    with _staged(out) as o:
        tmp = o.path(path)
        df.to_csv(tmp, index=False)
    return Path(path)


@dataclass
class Probs:
    """Probabilities for a submission: one row per id, one column per class; `kind` is the
    submission kind (optional)."""

    ids: Sequence
    probs: np.ndarray
    classes: Sequence[str]
    multi_label: bool = False
    kind: str | None = None


def write_probs(
    csv_path: str | Path, pr: Probs, fmt: str = "npy", out: Outputs | None = None
) -> list[Path]:
    """Write probabilities beside submission `csv_path` (staged in `out` when given); returns
    the paths written.

    fmt "npy": `<stem>.npy` (float32 N x K) + `<stem>.ids.txt` + `<stem>.classes.txt`;
    fmt "csv": `<stem>.probs.csv` (`id` + one column per class). Both add `<stem>.meta.json`
    {"multi_label", "classes", "kind"}.
    """
    ids, probs, classes, multi_label, kind = (
        pr.ids, pr.probs, pr.classes, pr.multi_label, pr.kind
    )  # fmt: skip
    paths = probs_paths(csv_path)
    ids = _str_list(ids, paths["ids"], "id")
    classes = _str_list(classes, paths["classes"], "class")
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 2 or p.shape != (len(ids), len(classes)):
        raise ValueError(
            f"probs of shape {p.shape} do not fit {len(ids)} ids x {len(classes)} classes"
        )
    if fmt not in ("npy", "csv"):
        raise ValueError(f"unknown probability format '{fmt}'; choose npy or csv")
    meta = {"format": 1, "multi_label": bool(multi_label), "classes": classes, "kind": kind}
    with _staged(out) as o:
        if fmt == "npy":
            tmp = o.path(paths["npy"])
            with open(tmp, "wb") as f:
                np.save(f, p)  # a file object: np.save(path) would append .npy to the temp name
            o.text(paths["ids"], "".join(i + "\n" for i in ids))
            o.text(paths["classes"], "".join(c + "\n" for c in classes))
            written = [paths["npy"], paths["ids"], paths["classes"]]
        else:
            df = pd.DataFrame(p, columns=classes)
            df.insert(0, "id", ids)
            tmp = o.path(paths["csv"])
            df.to_csv(tmp, index=False)
            written = [paths["csv"]]
        o.json(paths["meta"], meta)
    return written + [paths["meta"]]


def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [line.rstrip("\r") for line in text.split("\n")][: -1 if text.endswith("\n") else None]


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it or rewrite it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object; delete it or rewrite it")
    return meta


def _need_file(path: str | Path) -> Path:
    """`path` when it is a file; a UserError saying what it is otherwise."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a directory; pass a file (a submission CSV, .npy or .probs.csv)")
    if not p.is_file():
        raise UserError(f"{p}: no such file; check the path")
    return p


def _probs_source(path: str | Path) -> Path:
    p = Path(path)
    if p.name.endswith(".probs.csv") or p.suffix == ".npy" or p.is_dir():
        return _need_file(p)
    paths = probs_paths(p)
    for key in ("npy", "csv"):
        if paths[key].is_file():
            return paths[key]
    raise UserError(
        f"{p}: no probabilities beside it (looked for {paths['npy'].name} and "
        f"{paths['csv'].name}); rerun infer.py with --return-probs or pass the .npy file"
    )


def read_probs(
    path: str | Path, kind: str = "auto"
) -> tuple[list[str], np.ndarray, list[str], dict]:
    """Read probabilities -> (ids, float32 N x K, classes, meta with "multi_label" and "kind").

    `path`: a `.npy` (with `.ids.txt` / `.classes.txt` beside it), a `.probs.csv`, or the
    submission CSV whose probabilities lie beside it. Without a classes file: the meta file's,
    else "0".."K-1". Single- vs multi-label comes from the meta file, else the format of the
    submission CSV beside it, else `kind` (--kind); UserError when none of them says.
    """
    src = _probs_source(path)
    paths = probs_paths(src)
    meta = _read_meta(paths["meta"])
    if src.suffix == ".npy":
        try:
            p = np.load(src, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"{src}: not a readable .npy array ({e}); rewrite it") from None
        if p.ndim != 2:
            raise UserError(f"{src}: expected an N x K array of probabilities, got shape {p.shape}")
        if not paths["ids"].is_file():
            raise UserError(
                f"{paths['ids']}: missing; it gives the row order of {src.name} (one id a "
                "line, as infer.py --return-probs writes it)"
            )
        ids = _read_lines(paths["ids"])
        if len(ids) != p.shape[0]:
            raise UserError(
                f"{paths['ids']}: {len(ids)} ids but {src.name} has {p.shape[0]} rows; "
                "regenerate both with infer.py --return-probs"
            )
        if paths["classes"].is_file():
            classes, cls_src = _read_lines(paths["classes"]), paths["classes"]
        else:
            classes, cls_src = meta.get("classes") or [str(k) for k in range(p.shape[1])], src
        if len(classes) != p.shape[1]:
            raise UserError(
                f"{cls_src}: {len(classes)} classes but {src.name} has {p.shape[1]} columns; "
                "regenerate both with infer.py --return-probs"
            )
    else:
        df = _read_csv(src, numeric=True)
        if df.shape[1] < 2:
            raise UserError(f"{src}: needs an id column and one column per class")
        ids = df.iloc[:, 0].tolist()
        classes = [str(c) for c in df.columns[1:]]
        bad = [c for c in df.columns[1:] if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise UserError(f"{src}: column '{bad[0]}' is not numeric; write probabilities only")
        p = df.iloc[:, 1:].to_numpy(dtype=np.float64)
    p = np.asarray(p, dtype=np.float32)
    if not np.isfinite(p).all() or (p.size and (p.min() < -1e-4 or p.max() > 1 + 1e-4)):
        raise UserError(
            f"{src}: values outside 0..1 (logits or NaN?); write softmax/sigmoid probabilities"
        )
    _check_unique(ids, paths["ids"] if src.suffix == ".npy" else src)
    meta["multi_label"], meta["kind"] = _task_of(src, meta, kind)
    return ids, p, [str(c) for c in classes], meta


def _task_of(src: Path, meta: dict, kind: str) -> tuple[bool, str | None]:
    """(multi_label, submission kind) of probability file `src` from explicit information only:
    its meta file, else the submission CSV beside it, else --kind."""
    found = meta.get("kind") if meta.get("kind") in KINDS else None
    found = found or _csv_kind_of(probs_paths(src)["submission"])
    if "multi_label" in meta:
        return bool(meta["multi_label"]), found
    if found is None and kind in KINDS:
        found = kind
    if found is None:
        raise UserError(
            f"{src}: cannot tell single- from multi-label probabilities (no "
            f"{probs_paths(src)['meta'].name} and no submission CSV beside it); pass --kind "
            "single, mask or multi"
        )
    return found == "multi", found


def _read_csv(path: Path, numeric: bool = False) -> pd.DataFrame:
    """CSV with ids kept as text ('007' stays '007'); numeric=True parses the other columns."""
    df = read_csv(_need_file(path), numeric=numeric)
    if len(df) == 0:
        raise UserError(f"{path}: has a header but no rows; pass a non-empty file")
    return df


def _csv_kind(columns: Sequence[str]) -> str:
    low = [c.lower() for c in columns]
    if low == ["imageid", "ans"]:
        return "mask"
    if "label" in low or len(low) == 2:
        return "single"
    return "multi"


def _check_unique(ids: list[str], path) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise UserError(f"{path}: id '{dup}' appears more than once; ids must be unique")


def read_labels_csv(path: str | Path) -> tuple[list[str], np.ndarray, str, list[str]]:
    """Read a submission / labels CSV -> (ids, labels, kind, classes).

    single: labels are class-name strings, classes the sorted distinct names; mask: int answers,
    classes their sorted distinct values as strings; multi: N x K int 0/1, classes the columns.
    """
    path = Path(path)
    df = _read_csv(path)
    cols = list(df.columns)
    if len(cols) < 2:
        raise UserError(
            f"{path}: needs `id,label`, `ImageID,ans` or `index` + one 0/1 column per class"
        )
    kind = _csv_kind(cols)
    if kind == "mask":
        ids = df.iloc[:, 0].tolist()
        try:
            labels = np.array([int(x) for x in df.iloc[:, 1]], dtype=np.int64)
        except ValueError:
            raise UserError(f"{path}: column 'ans' must hold integers") from None
        classes = [str(c) for c in sorted(set(labels.tolist()))]
    elif kind == "single":
        low = [c.lower() for c in cols]
        lab = low.index("label") if "label" in low else 1
        id_col = next((k for k, c in enumerate(low) if c in _ID_COLUMNS and k != lab), None)
        if id_col is None:
            id_col = 0 if lab != 0 else 1
        ids = df.iloc[:, id_col].tolist()
        labels = np.array([str(x).strip() for x in df.iloc[:, lab]], dtype=object)
        if any(x == "" for x in labels):
            row = next(k for k, x in enumerate(labels) if x == "")
            raise UserError(f"{path}: empty label for id '{ids[row]}'; fill in every label")
        classes = sorted(set(labels.tolist()), key=natural_key)
    else:
        ids = df.iloc[:, 0].tolist()
        try:
            vals = df.iloc[:, 1:].to_numpy(dtype=object).astype(np.float64)
        except ValueError:
            vals = np.array([np.nan])
        if not np.isin(vals, (0.0, 1.0)).all():
            raise UserError(
                f"{path}: multi-label columns must be 0/1 (expected `index` + one 0/1 column "
                "per class, or `id,label`)"
            )
        labels = vals.astype(np.int64)
        classes = cols[1:]
    ids = [str(i) for i in ids]
    _check_unique(ids, path)
    return ids, labels, kind, classes


# ---------------------------------------------------------------------------
# Pure numerics: voting and ensemble selection


def _weights(weights, m: int) -> np.ndarray:
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != m or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {m} finite non-negative weights with a positive sum, got {weights}")
    return w


def _first_voter(tied_votes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per row, the label of the earliest model whose vote is among the tied ones."""
    first = tied_votes.argmax(1)
    return labels[np.arange(len(labels)), first]


def hard_vote(label_matrix, weights=None, tiebreak_probs=None) -> np.ndarray:
    """Weighted majority per row of an N x M matrix of class indices (column m = model m).

    Ties go to the tied label with the larger tiebreak_probs[row] (e.g. summed probabilities)
    when given, otherwise (or if those tie too) to the tied label voted by the earliest model.
    """
    lab = np.asarray(label_matrix)
    if lab.ndim == 1:
        lab = lab[:, None]
    if lab.ndim != 2 or lab.dtype.kind not in "iu" or (lab.size and lab.min() < 0):
        raise ValueError("label_matrix must be an N x M array of class indices >= 0")
    n, m = lab.shape
    w = _weights(weights, m)
    k = int(lab.max()) + 1 if lab.size else 1
    if tiebreak_probs is not None:
        k = max(k, np.asarray(tiebreak_probs).shape[1])
    scores = np.zeros((n, k))
    np.add.at(scores, (np.repeat(np.arange(n), m), lab.reshape(-1)), np.tile(w, n))
    best = scores.max(1, keepdims=True)
    tied = scores >= best - 1e-9 * np.maximum(1.0, best)  # equal up to float rounding
    if tiebreak_probs is not None:
        t = np.zeros((n, k))
        tp = np.asarray(tiebreak_probs, dtype=np.float64)
        t[:, : tp.shape[1]] = tp
        t = np.where(tied, t, -np.inf)
        tied &= t >= t.max(1, keepdims=True)
    rows = np.arange(n)[:, None]
    return _first_voter(tied[rows, lab] & (w > 0)[None, :], lab)


def hard_vote_multi(label_stack, weights=None, tiebreak_probs=None, threshold: float = 0.5):
    """Per-class weighted majority over M x N x K 0/1 predictions -> N x K int 0/1.

    A tie goes to tiebreak_probs >= threshold when given, else to the earliest model's vote.
    """
    lab = np.asarray(label_stack).astype(np.int64)
    if lab.ndim != 3:
        raise ValueError("label_stack must be M x N x K (one N x K 0/1 array per model)")
    w = _weights(weights, lab.shape[0])
    pos = np.tensordot(w, lab, axes=1)
    neg = w.sum() - pos
    out = (pos > neg).astype(np.int64)
    tie = np.abs(pos - neg) <= 1e-9 * max(1.0, w.sum())
    if tiebreak_probs is not None:
        fallback = multi_hot(tiebreak_probs, threshold)
    else:
        fallback = lab[int(np.flatnonzero(w > 0)[0])]
    return np.where(tie, fallback, out)


def soft_vote(prob_list: Sequence, weights=None) -> np.ndarray:
    """Weighted mean of M probability arrays of one shape (N x K) -> float64 N x K."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in prob_list])
    w = _weights(weights, len(stack))
    return np.tensordot(w / w.sum(), stack, axes=1)


def _predict(probs: np.ndarray, multi_label: bool, threshold: float = 0.5, limits=(0, 0)):
    return multi_hot(probs, threshold, *limits) if multi_label else probs.argmax(1)


def score_probs(
    probs, y_true, metric: str = "accuracy", multi_label=False, threshold=0.5, limits=(0, 0)
) -> float:
    """Validation score of probabilities: accuracy (exact match if multi-label) or macro-F1
    (`limits`: --min-labels / --max-labels, see common.multi_hot)."""
    pred = _predict(np.asarray(probs), multi_label, threshold, limits)
    try:
        metric = metric_name(metric)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    if metric == "accuracy":
        return accuracy(y_true, pred)
    return macro_f1(y_true, pred, n_classes=np.asarray(probs).shape[1])


def caruana_select(
    val_probs_list: Sequence,
    score: Callable[[np.ndarray], float],
    n_iter: int = 50,
    init_sorted: int = 5,
    replacement: bool = True,
) -> tuple[np.ndarray, list[float]]:
    """Greedy forward ensemble selection (Caruana et al. 2004) -> (count per model, scores).

    `score(probs)`: the validation score of averaged probabilities, higher is better (e.g.
    `lambda p: score_probs(p, y, "accuracy")`). Starts from the best N of the `init_sorted` top
    models (N picked on validation), then adds the model that most improves the averaged
    ensemble, `n_iter` times (with replacement unless told otherwise). Returns the counts at the
    best score seen (earliest on ties), so the result is never below the best single model;
    history[0] is the start, history[i] after addition i.
    """
    probs = np.stack([np.asarray(p, dtype=np.float64) for p in val_probs_list])
    m, val = len(probs), score
    singles = np.array([val(p) for p in probs])
    order = np.argsort(-singles, kind="stable")  # best first; ties keep file order
    start_n, start_score, total = 1, -np.inf, np.zeros_like(probs[0])
    for n in range(1, min(max(1, init_sorted), m) + 1):
        total += probs[order[n - 1]]
        s = val(total / n)
        if s > start_score:
            start_n, start_score = n, s
    counts = np.zeros(m, dtype=np.int64)
    counts[order[:start_n]] = 1
    total = probs[order[:start_n]].sum(0)
    history, best_score, best_counts = [start_score], start_score, counts.copy()
    for _ in range(n_iter):
        cands = [j for j in order if replacement or counts[j] == 0]
        if not cands:
            break
        size = counts.sum() + 1
        scores = [val((total + probs[j]) / size) for j in cands]
        pick = cands[int(np.argmax(scores))]  # ties: the better single model
        counts[pick] += 1
        total += probs[pick]
        history.append(max(scores))
        if history[-1] > best_score:
            best_score, best_counts = history[-1], counts.copy()
    return best_counts, history


def align(ids_ref: Sequence, ids: Sequence, arr, path, ref_path=None) -> np.ndarray:
    """Rows of `arr` (in `ids` order) reordered to `ids_ref`; the two id sets must be equal."""
    ref, ids, arr = [str(i) for i in ids_ref], [str(i) for i in ids], np.asarray(arr)
    ref_name = ref_path or "the first file"
    if len(arr) != len(ids):
        raise UserError(f"{path}: {len(arr)} rows but {len(ids)} ids; regenerate the file")
    if ids == ref:
        return arr
    if len(ids) != len(ref):
        raise UserError(
            f"{path}: {len(ids)} rows but {ref_name} has {len(ref)}; every file must cover the "
            "same ids (predict on the same test set)"
        )
    pos = {i: k for k, i in enumerate(ids)}
    _check_unique(ids, path)
    ref_set = set(ref)
    extra = next((i for i in ids if i not in ref_set), None)
    if extra is not None:
        missing = next(i for i in ref if i not in pos)
        raise UserError(
            f"{path}: id '{extra}' is not in {ref_name} (which has '{missing}' instead); every "
            "file must cover the same ids (predict on the same test set)"
        )
    return arr[np.array([pos[i] for i in ref], dtype=np.int64)]


def _align_classes(ref: list[str], classes: list[str], arr, path, ref_path=None, key=str):
    """Columns of `arr` reordered to the class order `ref` (same set of classes required)."""
    if [key(c) for c in classes] == [key(c) for c in ref]:
        return arr
    ref_name = ref_path or "the first file"
    pos = {key(c): k for k, c in enumerate(classes)}
    if len(classes) != len(ref) or len(pos) != len(classes):
        raise UserError(
            f"{path}: {len(classes)} classes but {ref_name} has {len(ref)}; vote only files "
            "from models of the same task"
        )
    missing = next((c for c in ref if key(c) not in pos), None)
    if missing is not None:
        raise UserError(
            f"{path}: has no class '{missing}' that {ref_name} has; vote only files from "
            "models of the same task"
        )
    return np.asarray(arr)[:, [pos[key(c)] for c in ref]]


def check_plot_path(path: str | Path | None, flag: str = "--confusion") -> None:
    """UserError now (before any work) when `path` cannot be a plot: a directory, a file type
    matplotlib cannot write, or no matplotlib."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file such as {p / 'cm.png'}")
    plt = pyplot(flag)
    fig = plt.figure()
    kinds = fig.canvas.get_supported_filetypes()
    plt.close(fig)
    if p.suffix.lstrip(".").lower() not in kinds:
        raise UserError(
            f"{flag} {path}: cannot write a '{p.suffix or 'suffix-less'}' image; name it "
            f"like cm.png (types: {', '.join(sorted(kinds))})"
        )


def plot_confusion(
    cm, classes: Sequence[str], path: str | Path, out: Outputs | None = None
) -> Path:
    """Save a row-normalised confusion-matrix heat map (counts written in small matrices)."""
    plt = pyplot("--confusion")

    cm = np.asarray(cm)
    k = len(cm)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=90)
    ax.set_yticks(range(k), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        with _staged(out) as o:
            tmp = o.path(path)
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------
# CLI


def _is_probs_file(path: str) -> bool:
    return str(path).endswith((".npy", ".probs.csv"))


WEIGHTS = list_of(nonneg_float)  # the --weights flag type (vote.py and infer.py)


def parse_weights(values, n: int, what: str = "files") -> np.ndarray | None:
    """--weights (parsed by WEIGHTS, or text 1.5,1,1) -> one weight per input (None: equal)."""
    if values is None:
        return None
    try:
        w = WEIGHTS(values) if isinstance(values, str) else list(np.ravel(values).astype(float))
    except argparse.ArgumentTypeError as e:
        raise UserError(f"--weights: {e}") from None
    if len(w) != n:
        raise UserError(f"--weights: {len(w)} values for {n} {what}; give one weight for each")
    if sum(w) <= 0:
        raise UserError(f"--weights: {values} sum to zero; give at least one positive weight")
    return np.array(w, dtype=np.float64)


def _load_probs_set(files: Sequence[str], kind: str = "auto"):
    """Read probability files, rows and columns aligned to the first one."""
    ids, p0, classes, meta = read_probs(files[0], kind)
    probs = [p0]
    for f in files[1:]:
        ids_f, p, cls_f, meta_f = read_probs(f, kind)
        if meta_f["multi_label"] != meta["multi_label"]:
            raise UserError(
                f"{f}: multi_label={meta_f['multi_label']} but {files[0]} has "
                f"{meta['multi_label']}; vote only files from models of the same task"
            )
        p = _align_classes(classes, cls_f, p, f, files[0])
        probs.append(align(ids, ids_f, p, f, files[0]))
    return ids, probs, classes, meta


def _csv_kind_of(sub: Path) -> str | None:
    """The kind of submission CSV `sub` from its header, or None when there is none."""
    if not sub.is_file():
        return None
    try:
        return _csv_kind(list(read_csv(sub, nrows=0).columns))
    except UserError:
        return None


def _resolve_kind(flag: str, found: str | None, multi: bool) -> str:
    if flag != "auto":
        if (flag == "multi") != multi:
            task = "multi-label" if multi else "single-label"
            raise UserError(f"--kind {flag}: the inputs are {task}; use --kind auto")
        return flag
    if multi:
        return "multi"
    return found if found in ("single", "mask") else "single"


def _labels_for(path, ids, classes, multi: bool, extend: bool):
    """Labels of `path` for `ids` (a subset of its ids) as class indices, or N x K 0/1."""
    lab_ids, labels, kind, lab_classes = read_labels_csv(path)
    if (kind == "multi") != multi:
        task = "multi-label" if multi else "single-label"
        raise UserError(f"{path}: the predictions are {task} but this labels file is not")
    pos = {i: k for k, i in enumerate(lab_ids)}
    missing = next((i for i in ids if i not in pos), None)
    if missing is not None:
        raise UserError(f"{path}: has no label for id '{missing}'; give labels for every id")
    rows = np.array([pos[i] for i in ids], dtype=np.int64)
    classes = list(classes)
    if multi:
        cols = _align_classes(classes, lab_classes, labels, path, "the predictions", _column_name)
        return cols[rows], classes
    names = [str(x) for x in labels[rows]]
    named = not all(c.lstrip("-").isdigit() for c in classes)
    if named and all(n.isdigit() and int(n) < len(classes) for n in names):
        names = [classes[int(n)] for n in names]  # integer labels (mask `ans`) are class indices
    unknown = next((n for n in names if n not in classes), None)
    if unknown is not None:
        if not extend:
            raise UserError(
                f"{path}: label '{unknown}' is not one of the model classes "
                f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}); "
                "pass the labels of this task"
            )
        classes += sorted({n for n in names if n not in classes}, key=natural_key)
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def _soft(args, files, weights):
    ids, probs, classes, meta = _load_probs_set(files, args.kind)
    multi = bool(meta["multi_label"])
    thr, recorded = read_thresholds(args.threshold or "0.5", classes) if multi else (0.5, (0, 0))
    limits = resolve_label_limits(args, multi, len(classes), recorded)
    if args.tune_threshold and not multi:
        raise UserError("--tune-threshold: only for multi-label inputs (single-label: argmax)")
    selection = tuned = None
    if args.select == "caruana":
        weights, selection = _caruana(args, classes, multi, thr)
    if args.tune_threshold:
        thr, tuned = _tune(args, classes, weights, limits)
    p = soft_vote(probs, weights)
    if multi:
        labels = _predict(p, True, thr, limits)
    else:
        labels = np.asarray(classes, dtype=object)[p.argmax(1)]
    kind = _resolve_kind(args.kind, meta["kind"], multi)
    return ids, labels, classes, multi, kind, p, weights, selection, tuned


def _val_set(args, classes, multi, flag: str):
    """--val-probs (one per FILE, aligned to `classes`) and the --val-labels they are scored on."""
    if not args.val_probs or not args.val_labels:
        raise UserError(f"{flag}: needs --val-probs (one per FILE) and --val-labels")
    if len(args.val_probs) != len(args.files):
        raise UserError(
            f"--val-probs: {len(args.val_probs)} files for {len(args.files)} FILEs; give one "
            "validation probability file per FILE, in the same order"
        )
    vids, vprobs, vclasses, vmeta = _load_probs_set(args.val_probs, args.kind)
    if bool(vmeta["multi_label"]) != multi:
        raise UserError(f"{args.val_probs[0]}: multi_label differs from {args.files[0]}")
    vprobs = [
        _align_classes(classes, vclasses, p, args.val_probs[0], args.files[0]) for p in vprobs
    ]
    y, _ = _labels_for(args.val_labels, vids, classes, multi, extend=False)
    return vprobs, y


def _tune(args, classes, weights, limits):
    """Per-class thresholds tuned on the soft vote of --val-probs (the same weights), with the
    record written beside --out as <stem>.thresholds.json."""
    vprobs, y = _val_set(args, classes, True, "--tune-threshold")
    thr, record = tune_record(
        soft_vote(vprobs, weights), y, args.tune_threshold, limits, classes, "val rows of the vote"
    )
    record["files"], record["val_files"] = list(args.files), list(args.val_probs)
    record["weights"] = None if weights is None else [float(w) for w in weights]
    return thr, record


def tune_record(probs, y, metric: str, limits, classes, what: str) -> tuple[np.ndarray, dict]:
    """Thresholds tuned on (probs, y) for `metric` (f1 | exact) under `limits`, the core of
    the thresholds file they are written to (infer.py and vote.py), and one line saying so."""
    thr = tune_thresholds(probs, y, metric, limits=limits)
    score = "accuracy" if metric == "exact" else "macro_f1"
    before = score_probs(probs, y, score, True, 0.5, limits)
    after = score_probs(probs, y, score, True, thr, limits)
    print(
        f"thresholds tuned for {metric} on {len(y)} {what}: {before:.4f} at 0.5 -> {after:.4f} "
        f"(range {thr.min():.2f}..{thr.max():.2f})"
    )
    return thr, {
        "metric": metric,
        "classes": list(classes),
        "thresholds": thr.tolist(),
        "val_images": len(y),
        "val_score_at_0.5": before,
        "val_score_tuned": after,
        "min_labels": limits[0],  # the rule tuned for, applied by --threshold FILE
        "max_labels": limits[1],
    }


def _caruana(args, classes, multi, thr):
    vprobs, y = _val_set(args, classes, multi, "--select caruana")
    limits = (args.min_labels, args.max_labels)

    def score(p):
        return score_probs(p, y, args.metric, multi, thr, limits)

    counts, history = caruana_select(
        vprobs, score, args.iters, args.init_sorted, replacement=not args.no_replacement
    )
    singles = [score(p) for p in vprobs]
    ens = score(soft_vote(vprobs, counts))
    if not args.quiet:
        rows = [
            (f, v, s, int(c)) for f, v, s, c in zip(args.files, args.val_probs, singles, counts)
        ]
        print(format_table(rows, ["test file", "val file", f"val {args.metric}", "count"]))
    print(
        f"caruana: {int(counts.sum())} picks of {np.count_nonzero(counts)} distinct models after "
        f"{len(history) - 1} steps; val {args.metric} {ens:.4f} (best single {max(singles):.4f})"
    )
    return counts.astype(np.float64), {
        "counts": counts,
        "val_score": ens,
        "best_single": max(singles),
    }


def _hard(args, files, weights):
    """Hard vote of submission CSVs and/or probability files (their argmax / threshold)."""
    per_file = []
    for f in files:
        if _is_probs_file(f):
            ids, p, classes, meta = read_probs(f, args.kind)
            if meta["multi_label"]:
                per_file.append((ids, _predict(p, True, args.threshold), "multi", classes))
            else:
                names = np.asarray(classes, dtype=object)[p.argmax(1)]
                per_file.append((ids, names, meta["kind"] or "single", classes))
        else:
            ids, labels, kind, classes = read_labels_csv(f)
            if kind == "mask":
                labels = np.array([str(x) for x in labels], dtype=object)
            per_file.append((ids, labels, kind, classes))
    multi = per_file[0][2] == "multi"
    for f, (_, _, kind, _) in zip(files, per_file):
        if (kind == "multi") != multi:
            raise UserError(f"{f}: multi-label and single-label files cannot be voted together")
    mapped: list[list[str]] = []  # class orders of mask files mapped to names
    if not multi:
        per_file, mapped = _mask_answers_as_names(files, per_file)
    ids = per_file[0][0]
    tie = None
    if args.tiebreak == "probs":
        _, tie_probs, tie_classes, _ = _load_probs_set(files, args.kind)
        tie = (tie_classes, soft_vote(tie_probs, weights))
    kind = _resolve_kind(args.kind, per_file[0][2], multi)
    if multi:
        classes = list(per_file[0][3])
        stack = [
            align(ids, i, _align_classes(classes, c, lab, f, files[0], _column_name), f, files[0])
            for f, (i, lab, _, c) in zip(files, per_file)
        ]
        t = None
        if tie:
            t = _align_classes(classes, tie[0], tie[1], files[0], None, _column_name)
        pred = hard_vote_multi(stack, weights, t, args.threshold)
        return ids, pred, classes, True, kind
    # Class order: that of the probabilities (so tie-break columns line up), then the rest.
    prob_classes = [c for f, (_, _, _, c) in zip(files, per_file) if _is_probs_file(f)] + mapped
    classes = list(tie[0]) if tie else list(prob_classes[0]) if prob_classes else []
    seen = set(classes)
    extra = {str(x) for _, lab, _, _ in per_file for x in lab if str(x) not in seen}
    classes += sorted(extra, key=natural_key)
    index = {c: k for k, c in enumerate(classes)}
    cols = [
        align(ids, i, np.array([index[str(x)] for x in lab], dtype=np.int64), f, files[0])
        for f, (i, lab, _, _) in zip(files, per_file)
    ]
    pred = hard_vote(np.stack(cols, axis=1), weights, tie[1] if tie else None)
    return ids, np.asarray(classes, dtype=object)[pred], classes, False, kind


def _mask_answers_as_names(files, per_file) -> tuple[list, list[list[str]]]:
    """Mask submissions (`ans` = class number) voted with files labelled by class name: their
    numbers mapped to names through the classes their meta file records; refused without it.
    Returns the new per-file list and the class lists used."""
    named = next(
        (f for f, (_, lab, _, _) in zip(files, per_file) if any(not _is_int(x) for x in lab)),
        None,
    )
    if named is None:
        return per_file, []  # every file labels by number: one namespace
    out, mapped = [], []
    for f, (ids, lab, kind, classes) in zip(files, per_file):
        if kind == "mask" and not _is_probs_file(f):
            meta_file = probs_paths(f)["meta"]
            names = _read_meta(meta_file).get("classes")
            if not names:
                raise UserError(
                    f"{f}: a mask submission (ans = class number) cannot be voted with {named} "
                    f"(labelled by class name) without its classes; keep {meta_file.name} beside "
                    "it (infer.py --return-probs writes it) or vote files of one format"
                )
            bad = next((x for x in lab if not 0 <= int(x) < len(names)), None)
            if bad is not None:
                raise UserError(f"{f}: ans {bad} is not a class of {meta_file} ({len(names)})")
            lab, classes = np.array([str(names[int(x)]) for x in lab], dtype=object), list(names)
            mapped.append(classes)
        out.append((ids, lab, kind, classes))
    return out, mapped


def _is_int(x) -> bool:
    return str(x).lstrip("-").isdigit()


def _report_scores(args, ids, labels, classes, multi) -> tuple[dict, tuple | None]:
    """Score the vote against --labels; print accuracy, macro-F1 and per-class accuracy.

    Returns the scores and (confusion matrix, classes) when --confusion asks for the plot."""
    if multi:
        y, classes = _labels_for(args.labels, ids, classes, True, extend=True)
        pred = np.asarray(labels)
    else:
        y, classes = _labels_for(args.labels, ids, classes, False, extend=True)
        index = {c: k for k, c in enumerate(classes)}
        pred = np.array([index[str(x)] for x in labels], dtype=np.int64)
    k = len(classes)
    acc, f1 = accuracy(y, pred), macro_f1(y, pred, k)
    per = per_class_accuracy(y, pred, k)
    support = y.sum(0) if multi else np.bincount(y, minlength=k)
    if not args.quiet:
        print(
            format_table(
                [(c, int(s), float(a)) for c, s, a in zip(classes, support, per)],
                ["class", "support" if not multi else "positives", "accuracy"],
            )
        )
    name = "exact-match accuracy" if multi else "accuracy"
    print(f"{name} {acc:.4f}  macro-F1 {f1:.4f}  ({len(y)} rows, labels {args.labels})")
    cm = (confusion_matrix(y, pred, k), classes) if args.confusion and not multi else None
    return {"accuracy": acc, "macro_f1": f1}, cm


class _HelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown for every flag; the module docstring kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vote.py",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="submission CSVs (hard vote) or probability files .npy / .probs.csv (soft vote)",
    )
    p.add_argument(
        "--mode",
        choices=["auto", "hard", "soft"],
        default="auto",
        help="auto: soft if every FILE is a .npy / .probs.csv, else hard; soft on a submission "
        "CSV reads the probabilities beside it",
    )
    p.add_argument(
        "--weights", type=WEIGHTS, help="one weight per FILE, e.g. 1.5,1,1; unset: equal weights"
    )
    p.add_argument("--out", default="vote.csv", help="submission CSV to write")
    p.add_argument(
        "--kind",
        choices=["auto", *KINDS],
        default="auto",
        help="submission format to write (auto: the inputs' format); for probability files "
        "without a .meta.json or a submission beside them, it also says single- or multi-label",
    )
    p.add_argument(
        "--return-probs",
        action="store_true",
        help="soft vote: also write the averaged probabilities beside --out",
    )
    p.add_argument(
        "--probs-format", choices=["npy", "csv"], default="npy", help="for --return-probs"
    )
    p.add_argument(
        "--threshold",
        type=threshold_arg,
        default=None,
        help="multi-label: predict a class at prob >= this (None: 0.5), or per class from a "
        "<stem>.thresholds.json of infer.py / vote.py --tune-threshold (soft vote)",
    )
    p.add_argument(
        "--tune-threshold",
        choices=["f1", "exact"],
        default=None,
        help="multi-label soft vote: per-class thresholds maximising F1 or exact match on the "
        "vote of --val-probs against --val-labels (saved as <out stem>.thresholds.json)",
    )
    add_label_limit_flags(p)
    p.add_argument(
        "--tiebreak",
        choices=["first", "probs"],
        default="first",
        help="hard vote ties: the earliest FILE's label, or the largest summed probability "
        "(reads the probabilities of / beside each FILE)",
    )
    g = p.add_argument_group("scoring")
    g.add_argument(
        "--labels", help="labels CSV (id,label or index + 0/1 columns) to score the vote"
    )
    g.add_argument("--confusion", help="with --labels: save the confusion matrix to this PNG")
    g = p.add_argument_group("ensemble selection")
    g.add_argument(
        "--select",
        choices=["none", "caruana"],
        default="none",
        help="caruana: choose weights by greedy forward selection on validation probabilities",
    )
    g.add_argument(
        "--val-probs", nargs="+", help="validation probabilities, one per FILE, same order"
    )
    g.add_argument("--val-labels", help="validation labels CSV (id,label or index + 0/1 columns)")
    g.add_argument("--iters", type=nonneg_int, default=50, help="selection steps")
    g.add_argument(
        "--init-sorted", type=positive_int, default=5, help="start from the best N of this many"
    )
    g.add_argument(
        "--metric",
        type=metric_name,
        default="accuracy",
        help=f"selection metric: {' or '.join(METRICS)} (aliases acc, f1)",
    )
    g.add_argument("--no-replacement", action="store_true", help="add each model at most once")
    add_common_flags(p)
    return p


def _companions(path) -> list[Path]:
    """`path` and the files read with it (probabilities, ids, classes, meta, submission)."""
    return [Path(path)] + [p for p in probs_paths(path).values() if p.is_file()]


def _inputs(args) -> list[tuple[str, Path]]:
    out = [("FILE", p) for f in args.files for p in _companions(f)]
    out += [("--val-probs", p) for f in args.val_probs or [] for p in _companions(f)]
    out += [
        (flag, getattr(args, flag[2:].replace("-", "_"))) for flag in ("--labels", "--val-labels")
    ]
    if args.threshold is not None and not is_number(args.threshold):
        out.append(("--threshold", args.threshold))
    return out + [("--config", args.config)]


def planned_outputs(args, extra: Sequence[tuple[str, Path]] = ()) -> list[tuple[str, Path]]:
    """(flag, path) of every file a command writes: --out, --return-probs' files beside it,
    --confusion, and `extra`; UserError when two of them are the same file (vote and infer)."""
    outs = [("--out", Path(args.out))]
    if args.return_probs:
        keys = ("npy", "ids", "classes") if args.probs_format == "npy" else ("csv",)
        paths = probs_paths(args.out)
        outs += [("--return-probs", paths[k]) for k in (*keys, "meta")]
    outs += list(extra)
    if args.confusion:
        outs.append(("--confusion", Path(args.confusion)))
    seen: dict[str, str] = {}
    for flag, p in outs:
        key = os.path.realpath(p)
        if key in seen:
            raise UserError(f"{flag} {p}: is also the {seen[key]} output; give it another name")
        seen[key] = flag
    return outs


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the CLI; returns a summary dict (files, mode, rows, out, scores)."""
    with cli_errors("vote.py"), Timer() as timer:
        args = parse_args(build_parser(), argv)
        files = list(args.files)
        weights = parse_weights(args.weights, len(files))
        mode = args.mode
        if args.select == "caruana":
            if weights is not None:
                raise UserError("--weights: not used with --select caruana (it sets the weights)")
            if mode == "hard":
                raise UserError("--select caruana: averages probabilities; drop --mode hard")
            mode = "soft"
        elif (args.val_probs or args.val_labels) and not args.tune_threshold:
            raise UserError(
                "--val-probs / --val-labels: only used with --select caruana or --tune-threshold"
            )
        refuse_together(args, ("--threshold", "--tune-threshold"))
        if mode == "auto":
            mode = "soft" if all(_is_probs_file(f) for f in files) else "hard"
        if args.return_probs and mode == "hard":
            raise UserError("--return-probs: a hard vote has no probabilities; use --mode soft")
        soft_only = [
            ("--min-labels", args.min_labels),
            ("--max-labels", args.max_labels),
            ("--tune-threshold", args.tune_threshold),
            ("--threshold FILE", args.threshold and not is_number(args.threshold)),
        ]
        for flag, given in soft_only:
            if given and mode == "hard":
                raise UserError(f"{flag}: works on the averaged probabilities; use --mode soft")
        if args.confusion and not args.labels:
            raise UserError("--confusion: needs --labels (the truth to compare with)")
        tuned_file = [("--tune-threshold", probs_paths(args.out)["thresholds"])]
        refuse_output_on_input(planned_outputs(args, tuned_file if args.tune_threshold else ()),
                               _inputs(args))  # fmt: skip
        check_plot_path(args.confusion)
        given_threshold = args.threshold is not None
        selection = probs = tuned = None
        if mode == "soft":
            ids, labels, classes, multi, kind, probs, weights, selection, tuned = _soft(
                args, files, weights
            )
        else:
            args.threshold = float(args.threshold or 0.5)  # a number: files are soft only
            ids, labels, classes, multi, kind = _hard(args, files, weights)
        if given_threshold and not multi:
            raise UserError("--threshold: the inputs are single-label (argmax); drop it")
        scores, cm = (
            _report_scores(args, ids, labels, classes, multi) if args.labels else ({}, None)
        )
        if args.confusion and cm is None:
            raise UserError("--confusion: only for single-label votes; drop it")
        with Outputs() as out:  # every output becomes visible together, or none
            written = [write_submission(args.out, ids, labels, kind, classes, out=out)]
            if args.return_probs:
                pr = Probs(ids, probs, classes, multi, kind)
                written += write_probs(args.out, pr, args.probs_format, out)
            if cm is not None:
                written.append(plot_confusion(*cm, args.confusion, out=out))
            if tuned is not None:
                tfile = probs_paths(args.out)["thresholds"]
                out.json(tfile, tuned)
                written.append(str(tfile))
    w_text = "equal" if weights is None else ",".join(f"{w:g}" for w in weights)
    score_text = "".join(f", {k.replace('_', '-')} {v:.4f}" for k, v in scores.items())
    print(
        f"vote.py: {mode} vote of {len(files)} files (weights {w_text}), {len(ids)} rows, "
        f"{kind} -> {', '.join(map(str, written))}{score_text} in {timer.seconds:.1f} s"
    )
    return {
        "files": files,
        "mode": mode,
        "rows": len(ids),
        "kind": kind,
        "out": str(args.out),
        "written": [str(w) for w in written],
        "weights": None if weights is None else weights.tolist(),
        "scores": scores,
        "selection": selection,
        "thresholds": tuned,
    }


if __name__ == "__main__":
    main()
