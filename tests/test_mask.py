"""The boostcamp mask layout in data.py on a tiny fake tree (random pixels, never real faces)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import combine_heads
from PIL import Image

import data
import infer
import train
from common import UserError

KINDS = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
# ages on both sides of the bin edges 30 and 60
PEOPLE = [
    ("000001", "male", 29),
    ("000002", "female", 30),
    ("000003", "male", 59),
    ("000004", "female", 60),
    ("000005", "female", 18),
    ("000006", "male", 75),
]
EVAL_IDS = ["e3f1.jpg", "a0b2.jpg", "c9d8.jpg", "b7a6.jpg", "d5e4.jpg"]  # not sorted on purpose


def make_mask_tree(root, people=PEOPLE, size=(12, 10), seed=0):
    """train/images/<ID>_<gender>_<race>_<age>/<kind>.<ext> + eval/info.csv + eval/images."""
    rng = np.random.default_rng(seed)
    exts = [".jpg", ".png", ".jpeg"]
    rows = []
    for pid, gender, age in people:
        folder = f"{pid}_{gender}_Asian_{age}"
        d = root / "train" / "images" / folder
        d.mkdir(parents=True)
        for j, kind in enumerate(KINDS):
            px = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(px).save(d / f"{kind}{exts[j % 3]}")
        rows.append(f"{pid},{gender},Asian,{age},{folder}")
    (root / "train" / "train.csv").write_text("id,gender,race,age,path\n" + "\n".join(rows) + "\n")
    ev = root / "eval" / "images"
    ev.mkdir(parents=True)
    for name in EVAL_IDS:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(ev / name)
    (root / "eval" / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},0\n" for n in EVAL_IDS))
    return root


@pytest.fixture
def mask_root(tmp_path):
    return make_mask_tree(tmp_path / "mask")


def expected_label(kind: str, gender: str, age: int) -> int:
    m = 0 if kind.startswith("mask") else (1 if kind == "incorrect_mask" else 2)
    g = 0 if gender == "male" else 1
    a = 0 if age < 30 else (1 if age < 60 else 2)
    return m * 6 + g * 3 + a


def test_layout_labels_groups_and_age_edges(mask_root):
    assert data.detect_format(mask_root) == "mask"
    ds = data.load_images(mask_root)
    assert ds.fmt == "mask" and len(ds) == 42 and ds.images.shape[1:] == (3, 12, 10)
    assert ds.classes == data.MASK_CLASSES and len(ds.classes) == 18
    by_id = dict(zip(ds.ids, ds.labels.tolist()))
    for pid, gender, age in PEOPLE:
        folder = f"{pid}_{gender}_Asian_{age}"
        for kind in KINDS:
            assert by_id[f"{folder}/{kind}"] == expected_label(kind, gender, age), (folder, kind)
    # the bin edges, literally
    assert [data.mask_age_bin(a) for a in (29, 30, 59, 60)] == [0, 1, 1, 2]
    assert by_id["000001_male_Asian_29/normal"] == 12  # not worn, male, <30
    assert by_id["000002_female_Asian_30/mask3"] == 4  # wear, female, 30..59
    assert by_id["000003_male_Asian_59/incorrect_mask"] == 7  # incorrect, male, 30..59
    assert by_id["000004_female_Asian_60/normal"] == 17  # not worn, female, >=60
    assert ds.groups == [i.split("/")[0] for i in ds.ids]
    # the cached copy keeps labels and groups
    again = data.load_images(mask_root)
    assert again.info["cached"] and again.groups == ds.groups
    assert torch.equal(again.labels, ds.labels)


def test_heads_and_combine():
    y = torch.arange(18)
    m, g, a = data.mask_heads(y)
    assert torch.equal(m * 6 + g * 3 + a, y)
    assert m.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and g.tolist()[:6] == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(0)
    lm, lg, la = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 3)
    out = combine_heads(lm, lg, la)
    assert out.shape == (4, 18)
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)
    pm, pg, pa = lm.log_softmax(1), lg.log_softmax(1), la.log_softmax(1)
    assert torch.allclose(out[:, 2 * 6 + 1 * 3 + 0], pm[:, 2] + pg[:, 1] + pa[:, 0])
    best = out.argmax(1)
    hm, hg, ha = data.mask_heads(best)
    assert torch.equal(hm, lm.argmax(1)) and torch.equal(hg, lg.argmax(1))
    assert torch.equal(ha, la.argmax(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_person_level_split(mask_root, seed):
    how = data.SplitSpec(0.34, seed)
    tr, rec = data.load_split(mask_root, "train", how=how)
    va, rec2 = data.load_split(mask_root, "val", how=how)
    assert rec == rec2 and len(tr) + len(va) == 42 and len(va) > 0
    assert not set(tr.groups) & set(va.groups)  # nobody on both sides
    assert len(va) % 7 == 0 and len(tr) % 7 == 0  # whole people
    assert rec["val_hash"] == data.ids_hash(va.ids)


def test_eval_part_keeps_info_csv_order(mask_root):
    te = data.load_images(mask_root, part="test", opts=data.Opts(img_size=8))
    assert te.ids == EVAL_IDS and not te.has_labels and te.images.shape == (5, 3, 8, 8)
    assert te.classes == data.MASK_CLASSES and (te.labels == -1).all()
    (mask_root / "eval" / "images" / EVAL_IDS[2]).unlink()
    with pytest.raises(UserError, match="c9d8.jpg"):
        data.load_images(mask_root, part="test")
    ok = data.load_images(mask_root, part="test", opts=data.Opts(skip_bad_images=True))
    assert ok.ids == [i for i in EVAL_IDS if i != "c9d8.jpg"]


def test_bad_person_folder(tmp_path):
    root = make_mask_tree(tmp_path / "m", people=PEOPLE[:2])
    (root / "train" / "images" / "000009_male_Asian").mkdir()  # no age
    Image.new("RGB", (4, 4)).save(root / "train" / "images" / "000009_male_Asian" / "mask1.jpg")
    with pytest.raises(UserError, match="000009_male_Asian"):
        data.load_images(root, fmt="mask")


def test_train_one_epoch_then_infer(mask_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    train.main(
        [
            "--data", str(mask_root), "--out", str(runs), "--name", "m", "--model", "smallnet_s",
            "--img-size", "16", "--epochs", "1", "--batch-size", "16", "--val-ratio", "0.34",
            "--quiet", "--threads", "1",
        ]
    )  # fmt: skip
    ck = runs / "m" / "best.pt"
    assert ck.exists()
    out = tmp_path / "sub.csv"
    r = infer.main([str(ck), "--data", str(mask_root), "--out", str(out), "--return-probs"])
    assert r["split"] == "test" and r["metrics"] is None
    df = pd.read_csv(out)
    assert list(df.columns) == ["ImageID", "ans"] and df["ImageID"].tolist() == EVAL_IDS
    assert df["ans"].between(0, 17).all()
    assert np.load(tmp_path / "sub.npy").shape == (5, 18)
    # the held-out people: labelled, so metrics with the three heads
    r = infer.main([str(ck), "--data", str(mask_root), "--out", str(tmp_path / "v.csv"),
                    "--split", "val", "--quiet"])  # fmt: skip
    assert r["images"] == 14 and {"accuracy", "macro_f1", "mask_accuracy"} <= set(r["metrics"])
    assert "age accuracy" in capsys.readouterr().out


def test_data_cli_summary(mask_root, capsys):
    data.main(["--data", str(mask_root), "--img-size", "8", "--quiet", "--val-ratio", "0.34"])
    out = capsys.readouterr().out
    assert "format: mask" in out and "grouped by 6 groups" in out and "classes: 18" in out
