"""synth.py: determinism, shard/worker equivalence, output layout, glyph sources, CLI errors."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import synth  # noqa: E402

DIRTY = ["--mode", "dirty", "--img-size", "96", "--quiet"]
LETTERS_AZ = [chr(ord("a") + k) for k in range(26)]


def run(*args: str) -> None:
    synth.main([str(a) for a in args])


def files(d: Path) -> dict[str, bytes]:
    """Every PNG and CSV under d (not synth.json: it holds a timestamp)."""
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.suffix in (".png", ".csv")
    }


def pixels_csv(path: Path, n: int = 52) -> Path:
    rng = np.random.default_rng(1)
    df = pd.DataFrame(rng.integers(0, 128, (n, 784)), columns=[str(k) for k in range(784)])
    df.insert(0, "letter", [chr(65 + k % 26) for k in range(n)])
    df.insert(0, "digit", 0)
    df.insert(0, "id", range(n))
    df.to_csv(path, index=False)
    return path


def test_letters_deterministic_and_layout(tmp_path):
    for name in ("a", "b"):
        run("--output-dir", tmp_path / name, "--num-images", 40, "--num-test", 10, "--quiet")
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b and len(a) == 40 + 10 + 2

    d = tmp_path / "a"
    m = json.loads((d / "synth.json").read_text())
    assert m["format"] == "synth" and m["mode"] == "letters" and m["multi_label"] is False
    assert m["classes"] == [c.upper() for c in LETTERS_AZ]
    assert m["csv"] == ["labels.csv"] and m["test_csv"] == ["test/labels.csv"]
    assert (m["id_column"], m["image_column"], m["label_column"]) == ("index", "path", "label")
    for csv, n in (("labels.csv", 40), ("test/labels.csv", 10)):
        df = pd.read_csv(d / csv)
        assert list(df.columns) == ["index", "path", "label"] and len(df) == n
        assert set(df["label"]) <= set(m["classes"])
        assert list(df["path"]) == [m["path_pattern"].format(index=i) for i in df["index"]]
        for p in df["path"][:5]:
            im = Image.open((d / csv).parent / p)
            assert im.mode == "L" and im.size == (28, 28)
    # train and test images come from different random streams
    assert a["000000.png"] != a["test/000000.png"]


def test_seed_changes_images(tmp_path):
    run("--output-dir", tmp_path / "a", "--num-images", 5, "--quiet")
    run("--output-dir", tmp_path / "b", "--num-images", 5, "--quiet", "--seed", 1)
    assert files(tmp_path / "a")["000000.png"] != files(tmp_path / "b")["000000.png"]


def test_shards_equal_one_run(tmp_path):
    run(*DIRTY, "--output-dir", tmp_path / "one", "--num-images", 12)
    shards = tmp_path / "shards"
    run(*DIRTY, "--output-dir", shards, "--num-images", 5, "--index-offset", 7)
    run(*DIRTY, "--output-dir", shards, "--num-images", 7)
    one, two = files(tmp_path / "one"), files(shards)
    assert {k: v for k, v in one.items() if k.endswith(".png")} == {
        k: v for k, v in two.items() if k.endswith(".png")
    }
    m = json.loads((shards / "synth.json").read_text())
    assert m["csv"] == ["labels.csv", "labels_000007.csv"]  # sorted by index_offset
    rows = [(shards / c).read_text().splitlines() for c in m["csv"]]
    assert (tmp_path / "one" / "labels.csv").read_text().splitlines() == rows[0] + rows[1][1:]


def test_workers_give_same_bytes(tmp_path):
    run(*DIRTY, "--output-dir", tmp_path / "w1", "--num-images", 10, "--num-test", 3)
    run(
        *DIRTY, "--output-dir", tmp_path / "w2", "--num-images", 10, "--num-test", 3, "--workers", 2
    )
    assert files(tmp_path / "w1") == files(tmp_path / "w2")


def test_dirty_answer_csv(tmp_path):
    d = tmp_path / "d"
    run(*DIRTY, "--output-dir", d, "--num-images", 15, "--letters-min", 2, "--letters-max", 4)
    df = pd.read_csv(d / "labels.csv")
    assert list(df.columns) == ["index", *LETTERS_AZ]
    assert list(df["index"]) == list(range(15))
    flags = df[LETTERS_AZ].to_numpy()
    assert set(np.unique(flags)) <= {0, 1}
    assert ((flags.sum(1) >= 2) & (flags.sum(1) <= 4)).all()
    m = json.loads((d / "synth.json").read_text())
    assert m["multi_label"] is True and m["classes"] == LETTERS_AZ and m["image_column"] is None
    im = Image.open(d / m["path_pattern"].format(index=3))
    assert im.mode == "L" and im.size == (96, 96)
    a = np.asarray(im)
    assert a.min() >= 0 and a.max() == 255  # letters added onto the noise saturate


def test_mnist_csv_source(tmp_path):
    src = pixels_csv(tmp_path / "letters.csv")
    run(*DIRTY, "--output-dir", tmp_path / "d", "--num-images", 4, "--mnist-data", src)
    run("--output-dir", tmp_path / "l", "--num-images", 6, "--mnist-data", src, "--quiet")
    m = json.loads((tmp_path / "d" / "synth.json").read_text())
    assert m["parts"][0]["glyphs"] == "mnist-csv:letters.csv"
    assert len(pd.read_csv(tmp_path / "l" / "labels.csv")) == 6


def test_pixels_doubled_and_clipped(tmp_path):
    g, y = synth.load_pixels_csv(str(pixels_csv(tmp_path / "p.csv", 3)))
    raw = pd.read_csv(tmp_path / "p.csv")[[str(k) for k in range(784)]].to_numpy()
    assert g.shape == (3, 28, 28) and list(y) == [0, 1, 2]
    assert (g.reshape(3, -1) == np.clip(raw * 2, 0, 255)).all()


def test_idx_source_emnist_labels(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (26, 28, 28), dtype=np.uint8)
    with gzip.open(tmp_path / "img.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, 26, 28, 28) + x.tobytes())
    (tmp_path / "lab").write_bytes(struct.pack(">II", 2049, 26) + bytes(range(1, 27)))
    g, y = synth.load_idx(str(tmp_path / "img.gz"), str(tmp_path / "lab"))
    assert (g == x).all() and list(y) == list(range(26))  # EMNIST 1..26 -> 0..25
    run(*DIRTY, "--output-dir", tmp_path / "d", "--num-images", 2,
        "--idx-images", tmp_path / "img.gz", "--idx-labels", tmp_path / "lab")  # fmt: skip
    assert (tmp_path / "d" / "000001.png").exists()


def test_png_bytes_roundtrip():
    a = np.random.default_rng(0).integers(0, 256, (7, 11), dtype=np.uint8)
    for level in (0, 6):
        from io import BytesIO

        assert (np.asarray(Image.open(BytesIO(synth.png_bytes(a, level)))) == a).all()


def test_collision_refused_then_overwrite(tmp_path, capsys):
    d = tmp_path / "d"
    run(*DIRTY, "--output-dir", d, "--num-images", 4)
    with pytest.raises(SystemExit) as e:
        run(*DIRTY, "--output-dir", d, "--num-images", 4, "--index-offset", 2)
    assert e.value.code == 2 and "already exist" in capsys.readouterr().err
    run(*DIRTY, "--output-dir", d, "--num-images", 4, "--index-offset", 2, "--overwrite")
    m = json.loads((d / "synth.json").read_text())
    assert m["csv"] == ["labels_000002.csv"] and not (d / "labels.csv").exists()


@pytest.mark.parametrize(
    "args, text",
    [
        (["--num-images", "-1"], "--num-images"),
        (["--letters-min", "5", "--letters-max", "3"], "--letters-max"),
        (["--img-size", "abc"], "--img-size"),
        (["--mode", "dirty", "--img-size", "40"], "at least"),
        (["--workers", "0"], "--workers"),
        (["--seed", "-1"], "--seed"),
        (["--num-test", "1.5"], "--num-test"),
        (["--png-level", "10"], "--png-level"),
        (["--letters-max", "27"], "--letters-max"),
        (["--index-offset", "-3"], "--index-offset"),
        (["--img-size", "0"], "--img-size"),
        (["--img-size", "9000"], "--img-size"),
        (["--mnist-data", "."], "is a directory"),
        (["--idx-images", ".", "--idx-labels", "."], "is a directory"),
    ],
)
def test_bad_numbers_exit_2(tmp_path, capsys, args, text):
    with pytest.raises(SystemExit) as e:
        run("--output-dir", tmp_path / "x", "--quiet", *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and text in err and len(err.strip().splitlines()) == 1


def test_malformed_mnist_csv_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,letter,0,1\n0,A,3,4\n")
    with pytest.raises(SystemExit) as e:
        run("--output-dir", tmp_path / "x", "--mnist-data", bad)
    assert e.value.code == 2 and "lacks column" in capsys.readouterr().err


def test_cli_missing_mnist_file_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "synth.py"), "--mnist-data", str(tmp_path / "none.csv"),
         "--output-dir", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2
    assert "none.csv" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_crafted_manifest_cannot_delete_outside(tmp_path, capsys):
    d = tmp_path / "d"
    run(*DIRTY, "--output-dir", d, "--num-images", 2)
    victim = tmp_path / "victim.csv"
    victim.write_text("precious\n")
    m = json.loads((d / "synth.json").read_text())
    for bad in ("../victim.csv", str(victim)):
        m["parts"][0]["csv"] = bad
        (d / "synth.json").write_text(json.dumps(m))
        with pytest.raises(SystemExit) as e:
            run(*DIRTY, "--output-dir", d, "--num-images", 2, "--overwrite", "--seed", "1")
        err = capsys.readouterr().err
        assert e.value.code == 2 and "outside the directory" in err
        assert victim.read_text() == "precious\n"


def test_seed_answer_csv_layout_merges_beside_the_folder(tmp_path, monkeypatch, capsys):
    """The dirty-MNIST seed's call: images into the given folder, rows into the answer CSV."""
    monkeypatch.chdir(tmp_path)
    given = tmp_path / "dirty_mnist_2nd"
    given.mkdir()
    header = "index," + ",".join(LETTERS_AZ)
    rows = [header]
    for i in range(3):  # the competition's own files: 00000.png .. and their answers
        Image.fromarray(np.full((96, 96), i, np.uint8)).save(given / f"{i:05d}.png")
        rows.append(f"{i}," + ",".join("1" if k in (i, 25) else "0" for k in range(26)))
    answer = tmp_path / "dirty_mnist_2nd_answer.csv"
    answer.write_text("\n".join(rows) + "\n")
    args = [*DIRTY, "--letters-min", "1", "--letters-max", "2", "--output-dir", "dirty_mnist_2nd"]
    run(*args, "--output-csv", "dirty_mnist_2nd_answer.csv", "--num-images", 4,
        "--index-offset", 100000)  # fmt: skip
    assert "rows merged into" in capsys.readouterr().out
    df = pd.read_csv(answer, dtype=str)
    assert list(df.columns) == ["index", *LETTERS_AZ]
    assert df["index"].tolist() == ["0", "1", "2", "100000", "100001", "100002", "100003"]
    assert (given / "100003.png").is_file() and not (given / "synth.json").exists()
    import data

    ds = data.load_images(answer)  # the layout is read without a manifest
    assert ds.multi_label and len(ds) == 7 and ds.classes == LETTERS_AZ
    assert ds.labels[1].tolist()[1] == 1.0 and ds.images[1].max() == 1
    assert len(data.load_images(tmp_path)) == 7  # the folder holding both, too
    # Overlapping rows and existing images are refused (nothing written) unless --overwrite.
    before = answer.read_text()
    for extra in (["--index-offset", 100002], ["--index-offset", 2]):
        with pytest.raises(SystemExit) as e:
            run(*args, "--output-csv", "dirty_mnist_2nd_answer.csv", "--num-images", 2, *extra)
        assert e.value.code == 2 and answer.read_text() == before
    assert "already lists index 2" in capsys.readouterr().err
    # A CSV anywhere else is refused; letters mode and a test part have no answer layout.
    for bad, text in (
        (["--output-csv", str(tmp_path / "sub" / "x.csv")], "beside it"),
        (["--output-csv", "dirty_mnist_2nd_answer.csv", "--num-test", "2"], "no test part"),
    ):
        with pytest.raises(SystemExit):
            run(*args, "--num-images", 1, "--index-offset", 7, *bad)
        assert text in capsys.readouterr().err
