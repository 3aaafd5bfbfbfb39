"""data.py: every format from tiny files in tmp_path, the cache, splits, batched augmentation, CLI."""

from __future__ import annotations

import gzip
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from common import UserError

FASHION = Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist"


# ---------------------------------------------------------------------------
# Tiny data sets


def write_idx(folder: Path, part: str, x: np.ndarray, y: np.ndarray | None, gz=False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    op, ext = (gzip.open, ".gz") if gz else (open, "")
    n, h, w = x.shape
    with op(folder / f"{part}-images-idx3-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + x.astype(np.uint8).tobytes())
    if y is not None:
        with op(folder / f"{part}-labels-idx1-ubyte{ext}", "wb") as f:
            f.write(struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes())


def images(n: int, size=(8, 8), seed=0, channels=1) -> np.ndarray:
    shape = (n, *size) if channels == 1 else (n, *size, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_folder(root: Path, classes=("cat", "dog", "emu"), per_class=4, size=(8, 8)) -> Path:
    k = 0
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(images(1, size, seed=k)[0]).save(root / c / f"{c}{i}.png")
            k += 1
    return root


def make_csv_set(root: Path, n=12) -> Path:
    (root / "images").mkdir(parents=True)
    rows = ["file,label"]
    for i in range(n):
        Image.fromarray(images(1, seed=i)[0]).save(root / "images" / f"im{i}.png")
        rows.append(f"im{i}.png,{'abc'[i % 3]}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def run_cli(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    code = 0
    try:
        data.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("gz", [False, True])
def test_idx_raw_and_gz(tmp_path, gz):
    x, y = images(20), np.arange(20) % 4
    write_idx(tmp_path / "d", "train", x, y, gz)
    write_idx(tmp_path / "d", "t10k", x[:5], y[:5], gz)
    assert data.detect_format(tmp_path / "d") == "idx"
    tr = data.load_images(tmp_path / "d")
    te = data.load_images(tmp_path / "d", part="test")
    assert tr.images.shape == (20, 1, 8, 8) and tr.images.dtype == torch.uint8
    assert torch.equal(tr.images[:, 0], torch.from_numpy(x))
    assert tr.labels.tolist() == y.tolist() and tr.labels.dtype == torch.int64
    assert tr.classes == [str(i) for i in range(10)] and tr.ids[:2] == ["0", "1"]
    assert len(te) == 5 and te.classes == tr.classes


def test_idx_fashion_names_resize_and_channels(tmp_path):
    root = tmp_path / "my-fashion-set"
    write_idx(root, "train", images(6), np.arange(6))
    ds = data.load_images(root, opts=data.Opts(img_size=4, in_chans=3))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.images.shape == (6, 3, 4, 4)
    with pytest.raises(data.MissingPartError):
        data.load_images(root, part="test")


def test_idx_errors(tmp_path):
    d = tmp_path / "d"
    write_idx(d, "train", images(5), np.arange(4))
    with pytest.raises(UserError, match="4 labels but"):
        data.load_images(d)
    p = d / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        data.load_images(d)
    p.write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 40)
    with pytest.raises(UserError, match="not an IDX"):
        data.load_images(d)


def test_folder(tmp_path):
    root = make_folder(tmp_path / "f", classes=("dog", "cat", "emu"))
    assert data.detect_format(root) == "folder"
    ds = data.load_images(root)
    assert ds.classes == ["cat", "dog", "emu"]  # sorted
    assert ds.images.shape == (12, 1, 8, 8)
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.ids[0] == "cat0"
    got = np.asarray(Image.open(root / "dog" / "dog1.png"))
    assert np.array_equal(ds.images[ds.ids.index("dog1"), 0].numpy(), got)


def test_folder_train_test_layout(tmp_path):
    make_folder(tmp_path / "d" / "train")
    (tmp_path / "d" / "test").mkdir()
    for i in range(3):
        Image.fromarray(images(1, seed=50 + i)[0]).save(tmp_path / "d" / "test" / f"t{i}.png")
    tr = data.load_images(tmp_path / "d")
    te = data.load_images(tmp_path / "d", part="test")
    assert len(tr) == 12 and tr.classes == ["cat", "dog", "emu"]
    assert len(te) == 3 and not te.has_labels and te.labels.tolist() == [-1] * 3
    assert te.classes == tr.classes and te.ids == ["t0", "t1", "t2"]


def test_folder_mixed_modes_convert(tmp_path):
    """16-bit, palette and RGBA images among grey ones are converted, not rejected."""
    root = make_folder(tmp_path / "f", per_class=2)
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(root / "cat" / "deep.png")
    Image.fromarray(images(1)[0]).convert("P").save(root / "dog" / "pal.png")
    ds = data.load_images(root)
    assert ds.images.shape[1] == 1
    assert ds.images[ds.ids.index("deep")].min() == 255  # 16-bit full scale -> 255
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "emu" / "colour.png")
    ds = data.load_images(root)
    assert ds.images.shape[1] == 3  # one colour image makes the set RGB
    c = ds.images[ds.ids.index("colour")]
    assert c[0].float().mean() == 200 and c[1].max() == 0
    g = ds.images[ds.ids.index("cat0")]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])  # grey repeated
    assert data.load_images(root, opts=data.Opts(in_chans=1)).images.shape[1] == 1


def test_csv_single_label(tmp_path):
    root = make_csv_set(tmp_path / "c")
    (root / "test.csv").write_text("file\nim0.png\nim1.png\n")
    assert data.detect_format(root) == "csv"
    ds = data.load_images(root)
    assert ds.classes == ["a", "b", "c"] and ds.labels.tolist()[:4] == [0, 1, 2, 0]
    assert ds.ids[0] == "im0" and ds.images.shape == (12, 1, 8, 8)
    te = data.load_images(root, part="test")
    assert len(te) == 2 and not te.has_labels and te.classes == ds.classes


def test_csv_multi_label_and_int_labels(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    rows = ["id,x,y,z"]
    for i in range(6):
        Image.fromarray(images(1, seed=i)[0]).save(root / f"{i:03d}.png")
        rows.append(f"{i:03d},{i % 2},{int(i > 2)},1")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = data.load_images(root)  # ids without extension: .png is found
    assert ds.multi_label and ds.classes == ["x", "y", "z"]
    assert ds.labels.dtype == torch.float32 and ds.labels.shape == (6, 3)
    assert ds.labels[1].tolist() == [1.0, 0.0, 1.0] and ds.ids[0] == "000"
    # integer labels keep their value as the class index
    (root / "labels.csv").write_text("id,label\n000,2\n001,0\n002,2\n")
    ds = data.load_images(root)
    assert ds.classes == ["0", "1", "2"] and ds.labels.tolist() == [2, 0, 2]


def test_csv_errors(tmp_path):
    root = make_csv_set(tmp_path / "c")
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match="label 'c'.*not one of the 2 classes"):
        data.load_images(root)
    (root / "classes.txt").unlink()
    (root / "train.csv").write_text("file,comment\nim0.png,hello\nim1.png,world\n")
    with pytest.raises(UserError, match="no label column"):
        data.load_images(root, fmt="csv")
    (root / "train.csv").write_text("file,label\nim0.png,a\nnope.png,b\n")
    with pytest.raises(UserError, match="row 3: image .*nope.png not found"):
        data.load_images(root, fmt="csv")


def write_pixels_csv(path: Path, n: int, with_digit=True, seed=0) -> np.ndarray:
    x = images(n, (28, 28), seed=seed).reshape(n, -1)
    cols = ["id"] + (["digit"] if with_digit else []) + ["letter"] + [str(i) for i in range(784)]
    lines = [",".join(cols)]
    for i in range(n):
        lab = ([str(i % 10)] if with_digit else []) + ["ABZ"[i % 3]]
        lines.append(",".join([str(100 + i), *lab, *map(str, x[i])]))
    path.write_text("\n".join(lines) + "\n")
    return x


def test_pixels_csv(tmp_path):
    x = write_pixels_csv(tmp_path / "train.csv", 12)
    write_pixels_csv(tmp_path / "test.csv", 4, with_digit=False, seed=1)
    assert data.detect_format(tmp_path) == "pixels-csv"
    ds = data.load_images(tmp_path)
    assert ds.images.shape == (12, 1, 28, 28)
    assert np.array_equal(ds.images[3, 0].numpy().reshape(-1), x[3])
    assert ds.classes == data.LETTERS and ds.labels[:3].tolist() == [0, 1, 25]
    assert ds.ids[0] == "100"
    dg = data.load_images(tmp_path, opts=data.Opts(label_column="digit"))
    assert dg.classes == [str(i) for i in range(10)] and dg.labels[:3].tolist() == [0, 1, 2]
    te = data.load_images(tmp_path, part="test", opts=data.Opts(label_column="digit"))
    assert len(te) == 4 and not te.has_labels


def write_synth(root: Path, multi: bool) -> None:
    """The layout synth.py writes (see its docstring)."""
    root.mkdir(parents=True)
    (root / "test").mkdir()
    classes = ["a", "b", "c"] if multi else ["A", "B", "C"]
    for d, n in ((root, 9), (root / "test", 3)):
        rows = ["index," + ",".join(classes)] if multi else ["index,path,label"]
        for i in range(n):
            Image.fromarray(images(1, seed=i)[0]).save(d / f"{i:06d}.png")
            if multi:
                rows.append(f"{i}," + ",".join("01"[(i >> k) & 1] for k in range(3)))
            else:
                rows.append(f"{i},{i:06d}.png,{classes[i % 3]}")
        (d / "labels.csv").write_text("\n".join(rows) + "\n")
    meta = {
        "format": "synth", "mode": "dirty" if multi else "letters", "classes": classes,
        "multi_label": multi, "id_column": "index", "image_column": None if multi else "path",
        "label_column": None if multi else "label", "path_pattern": "{index:06d}.png",
        "csv": ["labels.csv"], "test_csv": ["test/labels.csv"],
    }  # fmt: skip
    (root / "synth.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("multi", [False, True])
def test_synth(tmp_path, multi):
    write_synth(tmp_path / "s", multi)
    assert data.detect_format(tmp_path / "s") == "synth"
    ds = data.load_images(tmp_path / "s")
    te = data.load_images(tmp_path / "s", part="test")
    assert len(ds) == 9 and len(te) == 3 and ds.multi_label == multi
    assert ds.ids[:2] == ["0", "1"]
    if multi:
        assert ds.labels[5].tolist() == [1.0, 0.0, 1.0]
    else:
        assert ds.classes == ["A", "B", "C"] and ds.labels[:4].tolist() == [0, 1, 2, 0]


def test_synth_py_output_loads(tmp_path):
    synth = pytest.importorskip("synth")
    out = tmp_path / "letters"
    synth.main(["--mode", "letters", "--output-dir", str(out), "--num-images", "30",
                "--num-test", "6", "--quiet"])  # fmt: skip
    ds, _ = data.load_split(out, "all")
    assert len(ds) == 30 and ds.classes == data.LETTERS and ds.images.shape[1:] == (1, 28, 28)


def test_detect_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        data.detect_format(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        data.detect_format(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="unknown data layout"):
        data.detect_format(tmp_path / "odd")
    make_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(UserError, match="only one class"):
        data.load_images(tmp_path / "one")


def test_bad_images_named_or_skipped(tmp_path, capsys):
    root = make_folder(tmp_path / "f")
    bad = root / "dog" / "dog2.png"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(UserError, match="dog2.png: cannot read image"):
        data.load_images(root)
    ds = data.load_images(root, opts=data.Opts(skip_bad_images=True))
    assert len(ds) == 11 and "dog2" not in ds.ids
    assert "skipped 1 unreadable" in capsys.readouterr().err


def test_thread_pool_decode_large_images(tmp_path):
    """Images >= 96x96 decode on a thread pool: same result, bad files still named."""
    root = make_folder(tmp_path / "f", per_class=3, size=(100, 100))
    ds = data.load_images(root, opts=data.Opts(cache=False))
    want = np.asarray(Image.open(root / "emu" / "emu2.png"))
    assert ds.images.shape == (9, 1, 100, 100)
    assert np.array_equal(ds.images[ds.ids.index("emu2"), 0].numpy(), want)
    p = root / "emu" / "emu1.png"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(UserError, match="emu1.png: cannot read image"):
        data.load_images(root, opts=data.Opts(cache=False))
    assert (
        len(data.load_images(root, opts=data.Opts(cache=False, skip_bad_images=True, img_size=32)))
        == 8
    )


def test_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "f")
    Image.fromarray(images(1, (10, 12))[0]).save(root / "emu" / "big.png")
    with pytest.raises(UserError, match="differ in size.*--img-size"):
        data.load_images(root)
    assert data.load_images(root, opts=data.Opts(img_size=(6, 5))).images.shape == (13, 1, 6, 5)


def test_memory_check(tmp_path, monkeypatch):
    write_idx(tmp_path / "d", "train", images(50, (28, 28)), np.arange(50) % 10)
    monkeypatch.setenv("IMGCLS_MAX_RAM_GB", "0.00001")  # ~10 KB
    with pytest.raises(UserError, match="does not fit in memory.*--img-size"):
        data.load_images(tmp_path / "d")
    assert data.estimate_bytes(10, 3, 4, 5) == 600


# ---------------------------------------------------------------------------
# Cache


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f")
    first = data.load_images(root)
    assert first.info["cached"] is False

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "decode_images", boom)
    again = data.load_images(root)
    assert again.info["cached"] is True
    assert torch.equal(again.images, first.images) and again.ids == first.ids
    assert again.classes == first.classes and torch.equal(again.labels, first.labels)
    # options are part of the key
    with pytest.raises(AssertionError, match="decoded again"):
        data.load_images(root, opts=data.Opts(img_size=4))
    # a changed source file is re-read
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "cat" / "cat0.png")
    st = (root / "cat" / "cat0.png").stat()
    os.utime(root / "cat" / "cat0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        data.load_images(root)
    monkeypatch.undo()
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    fresh = data.load_images(root)
    assert fresh.info["cached"] is False and fresh.images[0].max() == 0


def test_cache_dir_unwritable_still_loads(tmp_path, capsys):
    write_idx(tmp_path / "d", "train", images(4), np.arange(4))
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache dir should be
    ds = data.load_images(tmp_path / "d", opts=data.Opts(cache_dir=blocker / "sub"))
    assert len(ds) == 4 and "not caching" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Splits


def test_split_deterministic_stratified_seed_independent():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    torch.manual_seed(1)
    np.random.seed(1)
    tr, va = data.split_indices(y, 0.2, seed=3)
    torch.manual_seed(2)
    np.random.seed(2)
    tr2, va2 = data.split_indices(torch.from_numpy(y), 0.2, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert len(va) == 40 and sorted(np.concatenate([tr, va]).tolist()) == list(range(200))
    assert np.bincount(y[va]).tolist() == [20, 10, 6, 4]  # class proportions kept
    assert not np.array_equal(data.split_indices(y, 0.2, seed=4)[1], va)
    tr0, va0 = data.split_indices(y, 0.0)
    assert len(va0) == 0 and len(tr0) == 200


def test_split_grouped_and_multilabel():
    groups = [f"p{i // 7}" for i in range(140)]  # 20 people x 7 images
    y = np.arange(140) % 7
    tr, va = data.split_indices(y, 0.2, seed=0, groups=groups)
    g_tr, g_va = {groups[i] for i in tr}, {groups[i] for i in va}
    assert not g_tr & g_va and len(g_va) == 4 and len(va) == 28
    ml = torch.zeros(50, 3)
    ml[torch.arange(50), torch.arange(50) % 3] = 1
    tr, va = data.split_indices(ml, 0.2)
    assert len(va) == 10


def test_ids_hash_and_load_split(tmp_path):
    assert data.ids_hash(["b", "a"]) == data.ids_hash(["a", "b"])
    assert len(data.ids_hash(["a"])) == 16 and data.ids_hash([]) != data.ids_hash(["a"])
    x, y = images(40), np.arange(40) % 4
    write_idx(tmp_path / "d", "train", x, y)
    write_idx(tmp_path / "d", "t10k", x[:8], y[:8])
    tr, rec = data.load_split(tmp_path / "d", "train", how=data.SplitSpec(val_ratio=0.25, seed=1))
    va, rec2 = data.load_split(tmp_path / "d", "val", how=data.SplitSpec(val_ratio=0.25, seed=1))
    te, rec3 = data.load_split(tmp_path / "d", "test", how=data.SplitSpec(val_ratio=0.25, seed=1))
    al, _ = data.load_split(tmp_path / "d", "all")
    assert rec == rec2 == rec3 and rec["seed"] == 1 and rec["val_ratio"] == 0.25
    assert rec["val_hash"] == data.ids_hash(va.ids) and len(va) == 10 and len(tr) == 30
    assert not set(tr.ids) & set(va.ids) and len(te) == 8 and len(al) == 40
    _, r0 = data.load_split(tmp_path / "d", "train", how=data.SplitSpec(val_ratio=0))
    assert r0["val_hash"] == data.ids_hash([])
    with pytest.raises(UserError):
        data.load_split(tmp_path / "d", "bogus")


# ---------------------------------------------------------------------------
# Tensors and batched augmentation


def test_mean_std_normalize_batches():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    mean, std = data.mean_std(x)
    assert mean == pytest.approx([0.5]) and std == pytest.approx([0.5])
    z = data.normalize(x, mean, std)
    assert z.dtype == torch.float32 and z.flatten().tolist() == [-1.0] * 4 + [1.0] * 4
    b = data.batch_indices(10, 4, False)
    assert [t.tolist() for t in b] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(data.batch_indices(10, 4, True, torch.Generator().manual_seed(0), True)) == 2


def batch(n=16, c=2, h=8, w=8, device="cpu"):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0)).to(device)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_augment_shapes_devices_determinism(device):
    x = batch(device=device)
    names = ["flip", "vflip", "crop", "rot90", "randaug", "cutout", "none", "mixup", "ssr"]
    names += ["cutout:size=0.4:p=0.5", "ssr:rotate=30:scale=0.2:p=1"]
    a = data.augment_batch(x, names, torch.Generator().manual_seed(5))
    b = data.augment_batch(x, names, torch.Generator().manual_seed(5))
    c = data.augment_batch(x, names, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.device == x.device and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(data.augment_batch(x, "flip,crop", torch.Generator().manual_seed(1)),
                       data.augment_batch(x, ["flip", "crop"], torch.Generator().manual_seed(1)))  # fmt: skip
    with pytest.raises(UserError, match="unknown augmentation"):
        data.augment_batch(x, ["jitter"], torch.Generator())


def test_flip_semantics():
    x = batch(64)
    g = torch.Generator().manual_seed(0)
    y = data.augment_batch(x, ["flip"], g)
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()
    y = data.augment_batch(x, ["vflip"], g)
    assert ((y == x).flatten(1).all(1) | (y == x.flip(2)).flatten(1).all(1)).all()
    assert torch.equal(x.flip(3).flip(3), x)


def test_crop_is_a_shift():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(32, 1, 1, 1)
    y = data.augment_batch(x, ["crop"], torch.Generator().manual_seed(0), pad=2)
    assert y.shape == x.shape
    for i in range(len(y)):  # the centre 4x4 of the output is a shifted window of the input
        centre = y[i, 0, 2:6, 2:6]
        hits = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(centre, x[0, 0, 2 + dy : 6 + dy, 2 + dx : 6 + dx])
        ]
        assert hits
    assert not all(torch.equal(y[i], x[0]) for i in range(len(y)))
    assert torch.equal(data.augment_batch(x, ["crop"], torch.Generator(), pad=0), x)


def test_rot90_matches_torch():
    x = batch(8)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    got = data._rot90_each(x, k)
    for i in range(8):
        assert torch.equal(got[i], torch.rot90(x[i], int(k[i]), (1, 2)))
    with pytest.raises(UserError, match="square"):
        data.augment_batch(batch(2, h=4, w=6), ["rot90"], torch.Generator())


def test_rotate_batch():
    x = batch(3)
    xr, y = data.rotate_batch(x)
    assert xr.shape == (12, 2, 8, 8) and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        for i in range(3):
            assert torch.equal(xr[k * 3 + i], torch.rot90(x[i], k, (1, 2)))
    assert y.dtype == torch.int64


def test_rotate_batch_one_rotation_per_image():
    x = batch(16)
    xr, y = data.rotate_batch(x, torch.Generator().manual_seed(0))
    assert xr.shape == x.shape and y.dtype == torch.int64  # the supervised batch size
    for i in range(16):
        assert torch.equal(xr[i], torch.rot90(x[i], int(y[i]), (1, 2)))
    assert len(set(y.tolist())) == 4  # 16 draws: every rotation occurs (seed 0)
    again = data.rotate_batch(x, torch.Generator().manual_seed(0))[1]
    assert torch.equal(again, y)  # a function of the generator


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mix_batch(mode):
    x = batch(8)
    y = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float()
    xm, ym = data.mix_batch(x, y, mode, 1.0, torch.Generator().manual_seed(0))
    xm2, ym2 = data.mix_batch(x, y, mode, 1.0, torch.Generator().manual_seed(0))
    assert xm.shape == x.shape and ym.shape == y.shape
    assert torch.allclose(ym.sum(1), torch.ones(8))
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)
    assert not torch.equal(ym, y)
    _, yi = data.mix_batch(x, torch.arange(8) % 4, mode, 1.0, torch.Generator(), num_classes=4)
    assert torch.allclose(yi.sum(1), torch.ones(8))
    assert data.mix_batch(x, y, mode, 0.0, torch.Generator())[0] is x


def test_subset_keeps_everything(tmp_path):
    write_idx(tmp_path / "d", "train", images(10), np.arange(10) % 3)
    ds = data.load_images(tmp_path / "d")
    sub = ds.subset(torch.tensor([4, 1]))
    assert sub.ids == ["4", "1"] and sub.labels.tolist() == [1, 1] and sub.classes == ds.classes
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0


# ---------------------------------------------------------------------------
# CLI


def test_cli_summary_and_grid(tmp_path, capsys):
    root = make_folder(tmp_path / "f", per_class=5)
    grid = tmp_path / "grid.png"
    code, out, err = run_cli(["--data", str(root), "--grid", str(grid), "--quiet"], capsys)
    assert code == 0, err
    assert "format: folder" in out and "| cat " in out and "decoded in" in out
    assert Image.open(grid).size[1] > 0
    code, out, _ = run_cli(["--data", str(root), "--quiet"], capsys)
    assert code == 0 and "cached" in out


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not present")
def test_cli_fashion_mnist(capsys):
    code, out, err = run_cli(["--data", str(FASHION), "--quiet"], capsys)
    assert code == 0, err
    assert "| train | 60000" in out and "| test  | 10000" in out
    rows = [ln for ln in out.splitlines() if "Ankle boot" in ln or "T-shirt/top" in ln]
    assert len(rows) == 2 and all("6000" in r and "1000" in r for r in rows)


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    (tmp / "empty").mkdir()
    nolabel = tmp / "nolabel"
    make_csv_set(nolabel)
    (nolabel / "train.csv").write_text("file,note\nim0.png,x\nim1.png,y\n")
    trunc = make_folder(tmp / "trunc")
    p = trunc / "cat" / "cat1.png"
    p.write_bytes(p.read_bytes()[:60])  # cut inside the pixel data
    mixed = make_folder(tmp / "mixed")
    Image.fromarray(images(1, (9, 9))[0]).save(mixed / "dog" / "odd.png")
    return {
        "missing": tmp / "nope",
        "empty": tmp / "empty",
        "nolabel": nolabel,
        "trunc": trunc,
        "mixed": mixed,
    }


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    expect = {
        "missing": "no such file",
        "empty": "empty",
        "nolabel": "no label column",
        "trunc": "cat1.png: cannot read image",
        "mixed": "differ in size",
    }
    for name, path in cases.items():
        fmt = ["--data-format", "csv"] if name == "nolabel" else []
        code, out, err = run_cli(["--data", str(path), "--quiet", *fmt], capsys)
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and expect[name] in err, (name, err)
        assert err.startswith("data.py: error:")
    assert not list((tmp_path / "cache").glob("*.tmp"))  # nothing half-written


@pytest.mark.parametrize(
    "flags",
    [
        ["--val-ratio", "1"], ["--val-ratio", "nan"], ["--val-ratio", "-0.1"],
        ["--split-seed", "-1"], ["--img-size", "0"], ["--img-size", "99999"],
        ["--img-size", "8x"], ["--in-chans", "2"],
    ],
)  # fmt: skip
def test_cli_numeric_flags_range_checked(tmp_path, capsys, flags):
    root = make_folder(tmp_path / "f")
    code, _, err = run_cli(["--data", str(root), "--quiet", *flags], capsys)
    assert code == 2 and flags[0] in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # refused before anything was decoded


def test_cli_grid_checked_before_decoding(tmp_path, capsys):
    root = make_folder(tmp_path / "f")
    for grid, text in (
        (tmp_path, "is a directory"),
        (tmp_path / "g.xyz", "unknown image extension"),
    ):
        code, _, err = run_cli(["--data", str(root), "--quiet", "--grid", str(grid)], capsys)
        assert code == 2 and text in err
    assert not (tmp_path / "cache").exists()


def test_relabel_directory_message(tmp_path):
    ds = data.load_images(make_folder(tmp_path / "f"))
    with pytest.raises(UserError, match="is a directory"):
        data.relabel(ds, tmp_path)


def test_cli_subprocess_exit_code(tmp_path):
    import subprocess
    import sys

    root = Path(data.__file__).parent
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, str(root / "data.py"), "--data", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env={**os.environ, "IMGCLS_CACHE": str(tmp_path / "c")},
    )
    assert r.returncode == 2 and r.stdout == "" and "no such file" in r.stderr
    assert time.perf_counter() - t < 60


# ---------------------------------------------------------------------------
# The split a checkpoint records, and labels in a checkpoint's class order


def test_load_recorded_split_verifies_the_hash(tmp_path):
    root = tmp_path / "d"
    write_idx(root, "train", images(40), np.arange(40) % 4)
    write_idx(root, "t10k", images(8, seed=1), np.arange(8) % 4)
    val, rec = data.load_split(root, "val", how=data.SplitSpec(val_ratio=0.25, seed=3))
    meta = {"arch": "smallnet", "split": rec}  # a checkpoint dict, its record, or an object
    for recorded in (meta, rec, type("Meta", (), {"split": rec})()):
        got = data.load_recorded_split(recorded, root, "val")
        assert got.ids == val.ids and got.info["split"]["val_hash"] == rec["val_hash"]
    train = data.load_recorded_split(meta, root, "train")
    assert not set(train.ids) & set(val.ids) and len(train) + len(val) == 40
    assert len(data.load_recorded_split({}, root, "test")) == 8  # test/all need no record
    assert len(data.load_recorded_split({}, root, "all")) == 40
    with pytest.raises(UserError, match="records no train/val split.*--split test or all"):
        data.load_recorded_split({"arch": "x"}, root, "val", source="old.pt")
    write_idx(root, "train", images(44), np.arange(44) % 4)  # the data changed
    with pytest.raises(UserError, match=r"seed 3, ratio 0.25\) hashes to .* but best.pt recorded"):
        data.load_recorded_split(meta, root, "val", source="best.pt")


def _labelled(classes, labels, multi=False):
    y = torch.as_tensor(labels, dtype=torch.float32 if multi else torch.long)
    n = len(y)
    return data.ImageSet(
        images=torch.zeros(n, 1, 2, 2, dtype=torch.uint8), labels=y, ids=[str(i) for i in range(n)],
        classes=list(classes), multi_label=multi, source="d",
    )  # fmt: skip


def test_map_labels_onto_checkpoint_classes():
    ck = ["cat", "dog", "emu"]
    same = _labelled(ck, [0, 2, 1])
    assert data.map_labels(same, ck) is same.labels
    # a test folder holding only dog/ and emu/: its labels 0, 1 are the checkpoint's 1, 2
    sub = _labelled(["dog", "emu"], [0, 1, -1, 1])
    assert data.map_labels(sub, ck).tolist() == [1, 2, -1, 2]
    # IDX files / integer labels without names keep their indices
    assert data.map_labels(_labelled(["0", "1"], [1, 0]), ck).tolist() == [1, 0]
    with pytest.raises(data.ClassMismatchError, match="classes 0 are not among"):
        data.map_labels(_labelled(["0", "1"], [1, 0]), ["1", "2", "3"])  # numbers: by name only
    with pytest.raises(data.ClassMismatchError, match="classes owl are not among best.pt's 3"):
        data.map_labels(_labelled(["cat", "owl"], [0, 1]), ck, source="best.pt")
    with pytest.raises(data.ClassMismatchError, match="0, 1, 2, 3"):  # 4 indices onto 3 classes
        data.map_labels(_labelled(["0", "1", "2", "3"], [3]), ck)
    multi = _labelled(["b", "a"], [[1, 0], [0, 1]], multi=True)
    assert data.map_labels(multi, ["a", "b"], multi_label=True).tolist() == [[0, 1], [1, 0]]
    with pytest.raises(data.ClassMismatchError, match="multi-label data must have the same"):
        data.map_labels(multi, ["a", "b", "c"], multi_label=True)
    with pytest.raises(data.ClassMismatchError, match="single-label but .* multi-label"):
        data.map_labels(sub, ck, multi_label=True)
    unlabelled = _labelled(ck, [-1])
    unlabelled.has_labels = False
    with pytest.raises(data.ClassMismatchError, match="no labels"):
        data.map_labels(unlabelled, ck)


# ---------------------------------------------------------------------------
# Labels: a missing label is no class, one class is no classifier, the key covers the labels


@pytest.mark.parametrize("cell", ["", "NaN", "nan", "NA", "null", "None"])
def test_missing_label_refused(tmp_path, cell):
    root = make_csv_set(tmp_path / "c")
    rows = (root / "train.csv").read_text().splitlines()
    rows[3] = f"im2.png,{cell}"
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"row 4 has (an empty|a missing) label.*not a class"):
        data.load_images(root)


def test_missing_letter_in_pixels_csv_refused(tmp_path):
    write_pixels_csv(tmp_path / "train.csv", 6)
    rows = (tmp_path / "train.csv").read_text().splitlines()
    cells = rows[2].split(",")
    cells[2] = ""  # the letter of row 3
    rows[2] = ",".join(cells)
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match="row 3 has a missing label .* in 'letter'"):
        data.load_images(tmp_path / "train.csv")


def test_one_class_refused_in_every_format(tmp_path):
    root = make_csv_set(tmp_path / "c", n=4)
    (root / "train.csv").write_text("file,label\n" + "".join(f"im{i}.png,a\n" for i in range(4)))
    with pytest.raises(UserError, match=r"only one class \(a\) in its labels; a classifier"):
        data.load_images(root)
    idx = tmp_path / "i"
    write_idx(idx, "train", images(6), np.zeros(6))
    (idx / "classes.txt").write_text("only\n")
    with pytest.raises(UserError, match=r"only one class \(only\)"):
        data.load_images(idx)
    with pytest.raises(UserError, match="only one class folder"):
        data.load_images(make_folder(tmp_path / "f", classes=("cat",)))
    # ten class names but every label 0: one class present in the training part
    write_idx(tmp_path / "z", "train", images(6), np.zeros(6))
    write_idx(tmp_path / "z", "t10k", images(2), np.zeros(2))
    with pytest.raises(UserError, match=r"only one class \(0\) in its labels"):
        data.load_images(tmp_path / "z")
    assert len(data.load_images(tmp_path / "z", part="test")) == 2  # a test part may have one


def test_classes_txt_added_later_is_not_hidden_by_the_cache(tmp_path):
    root = tmp_path / "i"
    write_idx(root, "train", images(6), np.arange(6) % 2)
    assert data.load_images(root).classes[:2] == ["0", "1"]
    (root / "classes.txt").write_text("" + "\n".join(f"c{k}" for k in range(10)) + "\n")
    again = data.load_images(root)
    assert again.info["cached"] is False and again.classes[:2] == ["c0", "c1"]
    assert data.load_images(root).info["cached"] is True  # and cached under the new key


# ---------------------------------------------------------------------------
# Paths read from files stay inside the data folder


def test_csv_paths_outside_the_data_folder_refused(tmp_path):
    outside = tmp_path / "secret.png"
    Image.fromarray(images(1)[0]).save(outside)
    root = make_csv_set(tmp_path / "c", n=4)
    rows = (root / "train.csv").read_text().splitlines()
    for cell in ("../../secret.png", str(outside), "sub/../../../secret.png"):
        (root / "train.csv").write_text("\n".join([*rows, f"{cell},a"]) + "\n")
        with pytest.raises(UserError, match="row 6: image path .* is outside the data folder"):
            data.load_images(root)
    # A synth.json naming a CSV or a path pattern outside its directory is refused too.
    d = tmp_path / "s"
    d.mkdir()
    (d / "labels.csv").write_text("index,label\n0,a\n1,b\n")
    meta = {"format": "synth", "classes": ["a", "b"], "id_column": "index"}
    for extra, text in (
        ({"csv": ["../c/train.csv"], "image_column": "file"}, "outside"),
        ({"csv": ["labels.csv"], "path_pattern": "../{index}.png"}, "outside the data folder"),
    ):
        (d / "synth.json").write_text(json.dumps({**meta, **extra}))
        with pytest.raises(UserError, match=text):
            data.load_images(d)


def test_mask_image_ids_stay_in_eval_images(tmp_path):
    root = tmp_path / "m"
    (root / "eval" / "images").mkdir(parents=True)
    (root / "eval" / "info.csv").write_text("ImageID,ans\n../../x.jpg,0\n")
    with pytest.raises(UserError, match="leaves eval/images"):
        data.load_images(root, fmt="mask", part="test")


def test_competition_answer_csv_beside_its_image_folder(tmp_path):
    """dirty_mnist_2nd_answer.csv (index,a..z) beside dirty_mnist_2nd/00000.png, and the test
    part sample_submission.csv beside test_dirty_mnist_2nd/: read without a manifest."""
    letters = [chr(97 + k) for k in range(26)]
    for folder, csv, n in (
        ("dirty_mnist_2nd", "dirty_mnist_2nd_answer.csv", 4),
        ("test_dirty_mnist_2nd", "sample_submission.csv", 2),
    ):
        (tmp_path / folder).mkdir()
        rows = ["index," + ",".join(letters)]
        for i in range(n):
            Image.fromarray(images(1, seed=i)[0]).save(tmp_path / folder / f"{50000 + i:05d}.png")
            on = (i, 7) if "answer" in csv else ()
            rows.append(f"{50000 + i}," + ",".join("1" if k in on else "0" for k in range(26)))
        (tmp_path / csv).write_text("\n".join(rows) + "\n")
    tr = data.load_images(tmp_path)
    assert tr.fmt == "csv" and tr.multi_label and tr.classes == letters and len(tr) == 4
    assert tr.labels[2].nonzero().flatten().tolist() == [2, 7] and tr.ids[0] == "50000"
    te = data.load_images(tmp_path, part="test")
    assert len(te) == 2 and not te.has_labels and te.ids == ["50000", "50001"]
    assert torch.equal(te.images[1, 0], torch.from_numpy(images(1, seed=1)[0]))


# ---------------------------------------------------------------------------
# Augmentations with parameters: shift-scale-rotate and cutout


def test_affine_hand_values():
    x = torch.arange(32.0).view(2, 1, 4, 4)
    assert torch.allclose(
        data.affine(x, 90.0, 1.0, (0.0, 0.0)), torch.rot90(x, 1, (2, 3)), atol=1e-5
    )
    right = data.affine(x, 0.0, 1.0, (0.25, 0.0))  # 0.25 x 4 px = one pixel to the right
    assert torch.equal(right[..., 1:], x[..., :-1]) and torch.equal(right[..., 0], x[..., 0])
    down = data.affine(x, torch.tensor([0.0, 0.0]), 1.0, torch.tensor([[0.0, 0.25], [0.0, -0.25]]))
    assert torch.equal(down[0, :, 1:], x[0, :, :-1]) and torch.equal(down[1, :, :-1], x[1, :, 1:])
    # scale 2 about the centre (1.5, 1.5): output pixel (r, c) reads input 1.5 + (r - 1.5) / 2,
    # so (1, 1) reads (1.25, 1.25) = 4 x 1.25 + 1.25 (bilinear) and (2, 2) reads (1.75, 1.75)
    big = data.affine(x[:1], 0.0, 2.0, (0.0, 0.0))
    assert big[0, 0, 1:3, 1:3].tolist() == [[6.25, 6.75], [8.25, 8.75]]


def test_ssr_and_cutout_parameters():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 12, 12)
    same = data.augment_batch(x, "ssr:rotate=0:shift=0:scale=0:p=1", g)
    assert torch.allclose(same, x, atol=1e-5)  # no movement at all: the identity
    assert torch.equal(data.augment_batch(x, "shift-scale-rotate:p=0", g), x)
    out = data.augment_batch(x, "ssr", torch.Generator().manual_seed(1))  # 15 degrees, p=0.5
    moved = ~torch.isclose(out, x).flatten(1).all(1)
    assert 3 <= int(moved.sum()) <= 13  # about half the images
    assert torch.equal(out, data.augment_batch(x, "ssr", torch.Generator().manual_seed(1)))
    ones = torch.ones(8, 1, 12, 12)
    holes = (data.augment_batch(ones, "cutout:size=0.5", g) == 0).flatten(1).sum(1)
    assert holes.max() == 7 * 7  # side 6 -> a 7 x 7 square centred on a pixel, clipped at edges
    assert torch.equal(data.augment_batch(ones, "cutout:p=0", g), ones)
    default = data.augment_batch(ones, "cutout", torch.Generator().manual_seed(2))
    assert (default == 0).flatten(1).sum(1).max() == 3 * 3  # side 12 // 4 = 3
    for bad, text in [
        ("ssr:rotate=200", r"rotate='200' must be a number in \[0, 180\]"),
        ("ssr:spin=1", "no parameter 'spin'; it takes rotate, shift, scale, p"),
        ("flip:p=1", "flip has no parameter 'p'; it takes no parameters"),
        ("cutout:size=x", "size='x'"),
        ("warp", "unknown augmentation"),
    ]:
        with pytest.raises(UserError, match=text):
            data.augment_batch(x, bad, g)
    assert "ssr[:rotate=15]" in data.AUG_HELP and "cutout[:size=0.25]" in data.AUG_HELP
