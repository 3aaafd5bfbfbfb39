"""infer.py: TTA views and merges, one stacked forward, ensembles, submission formats, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import data
import infer
import models
import train
import vote

MEAN, STD = [0.2], [0.3]
RT4 = models.Runtime(torch.device("cpu"), "none", eval_batch_size=4, quiet=True)
CLS = ["cat", "dog", "owl"]


def tiny_model(k: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create_model("smallnet_s", k, in_chans=1, img_size=(16, 16)).eval()


def rand_images(n: int = 10, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)


def save_ckpt(path, root, classes=None, multi_label=False, aug="flip,crop", seed=0, val=0.1):
    """A random-weight checkpoint for the data at `root`, with its split recorded."""
    train_set, record = data.load_split(root, "train", how=data.SplitSpec(val_ratio=val))
    classes = classes or train_set.classes
    mean, std = data.mean_std(train_set.images)
    meta = {
        "arch": "smallnet_s",
        "num_classes": len(classes),
        "in_chans": 1,
        "img_size": list(train_set.img_size),
        "classes": list(classes),
        "multi_label": multi_label,
        "mean": mean,
        "std": std,
        "split": record,
        "args": {"aug": aug, "data": str(root)},
        "task": "classify",
    }
    models.save_checkpoint(path, tiny_model(len(classes), seed), meta)
    return str(path)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        infer.main(argv)
    return e.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------
# Views and merges (pure functions)


def test_identity_view_equals_plain_inference():
    model, x = tiny_model(), rand_images()
    plain = train.predict(model, x, MEAN, STD, RT4)
    assert infer.tta_views("none") == [infer.IDENTITY]
    tta = train.predict(model, x, MEAN, STD, RT4, infer.tta_forward([infer.IDENTITY]))
    assert torch.equal(plain, tta)


def test_predict_puts_the_model_in_the_runtime_layout_and_batches():
    """A channels-last runtime converts the model too (mixed layouts are the slow path); the
    probabilities do not depend on the layout or on the batch size."""
    model, x = tiny_model(), rand_images()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = train.predict(model, x, MEAN, STD, RT4)
    cl = models.Runtime(torch.device("cpu"), "none", channels_last=True, eval_batch_size=3)
    got = train.predict(model, x, MEAN, STD, cl)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert got.shape == plain.shape and torch.allclose(got, plain, atol=1e-6)
    sig = train.predict(model, x, MEAN, STD, RT4, train.probs_forward(multi_label=True))
    assert not torch.allclose(sig.sum(1), torch.ones(len(x)))  # sigmoid, not softmax
    assert torch.allclose(plain.sum(1), torch.ones(len(x)), atol=1e-5)


class FlipInvariant(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return (self.inner(x) + self.inner(x.flip(-1))) / 2


def test_flip_tta_of_flip_invariant_model_equals_plain():
    model, x = FlipInvariant(tiny_model()).eval(), rand_images()
    plain = train.predict(model, x, MEAN, STD, RT4)
    fwd = infer.tta_forward(infer.tta_views("flip"))
    assert torch.allclose(train.predict(model, x, MEAN, STD, RT4, fwd), plain, atol=1e-6)
    # a model that is not flip-invariant does change under flip TTA
    other = train.predict(tiny_model(), x, MEAN, STD, RT4, fwd)
    assert not torch.allclose(other, train.predict(tiny_model(), x, MEAN, STD, RT4), atol=1e-6)


def test_every_view_has_an_inverse():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 24, 24)
    exact = infer.tta_views("flip,vflip,rot90")
    assert len(exact) == 16
    for v in exact:
        assert torch.equal(v.deaugment(v.augment(x)), x), v.name
    for p in (1, 2):
        for v in infer.tta_views("flip,shift", shift_px=p):  # exact away from the p-px border
            y = v.augment(x)
            assert y.shape == x.shape
            assert torch.equal(v.deaugment(y)[..., p:-p, p:-p], x[..., p:-p, p:-p]), v.name
    # resampling views: exact for a linear ramp (bilinear), inside the part the view keeps
    i = torch.arange(24.0)
    ramp = (0.5 * i.view(24, 1) - 0.25 * i.view(1, 24) + 3).expand(2, 3, 24, 24)
    m = 5
    for v in infer.tta_views("scale") + infer.tta_views("five-crop"):
        y = v.augment(ramp)
        assert y.shape == ramp.shape
        back = v.deaugment(y)
        assert torch.allclose(back[..., m:-m, m:-m], ramp[..., m:-m, m:-m], atol=1e-3), v.name
        if v is not infer.IDENTITY:
            assert not torch.allclose(y, ramp, atol=1e-3), v.name
    assert len(infer.tta_views("five-crop")) == 5 and len(infer.tta_views("scale")) == 3


def test_unknown_view_is_a_user_error():
    with pytest.raises(infer.UserError, match="unknown view"):
        infer.tta_views("flip,spin")


def test_merges_equal_hand_computed_values():
    p = torch.tensor([[[0.7, 0.2, 0.1]], [[0.4, 0.4, 0.2]]])  # k=2 views, N=1, K=3
    assert torch.allclose(infer.merge_views(p, "mean"), torch.tensor([[0.55, 0.3, 0.15]]))
    g = torch.tensor([0.28, 0.08, 0.02]).sqrt()
    assert torch.allclose(infer.merge_views(p, "gmean"), (g / g.sum())[None], atol=1e-6)
    mx = torch.tensor([0.7, 0.4, 0.2])
    assert torch.allclose(infer.merge_views(p, "max"), (mx / mx.sum())[None], atol=1e-6)
    q = torch.tensor([[[0.9, 0.2]], [[0.5, 0.6]]])  # multi-label: per class against 1 - p
    a = (0.9 * 0.5) ** 0.5 / ((0.9 * 0.5) ** 0.5 + (0.1 * 0.5) ** 0.5)
    b = (0.2 * 0.6) ** 0.5 / ((0.2 * 0.6) ** 0.5 + (0.8 * 0.4) ** 0.5)
    got = infer.merge_views(q, "gmean", multi_label=True)
    assert torch.allclose(got, torch.tensor([[a, b]]), atol=1e-6)
    assert torch.allclose(infer.merge_views(q, "max", True), torch.tensor([[0.9, 0.6]]))


class CountingModel(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append(len(x))
        return self.inner(x)


def test_one_stacked_forward_per_batch():
    model, x = CountingModel(tiny_model()), rand_images(10)
    views = infer.tta_views("flip,shift")
    assert len(views) == 6
    p = train.predict(model, x, MEAN, STD, RT4, infer.tta_forward(views, "gmean"))
    assert model.calls == [24, 24, 12]  # 3 batches of B=4,4,2 images, 6 views each, one call
    assert p.shape == (10, 3) and torch.allclose(p.sum(1), torch.ones(10), atol=1e-5)


def exact_match(probs, labels, thresholds, limits=(0, 0)) -> float:
    """Exact match of thresholded probabilities, as infer.py and vote.py score them."""
    y = (np.asarray(labels) > 0.5).astype(np.int64)
    return vote.score_probs(np.asarray(probs), y, "accuracy", True, thresholds, limits)


def test_tune_thresholds():
    probs = np.array([[0.35, 0.9], [0.40, 0.1], [0.10, 0.8], [0.20, 0.3]])
    labels = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    t = common.tune_thresholds(probs, labels, "f1")
    # column 0: any threshold in (0.20, 0.35] is perfect; ties go to the one nearest 0.5
    assert t[0] == pytest.approx(0.35) and 0.3 < t[1] <= 0.8
    t2 = common.tune_thresholds(probs, labels, "exact")
    assert exact_match(probs, labels, t2) == 1.0
    assert exact_match(probs, labels, [0.5, 0.5]) == 0.5


# ---------------------------------------------------------------------------
# CLI


def test_end_to_end_trained_checkpoint(tiny_idx, tmp_path, capsys):
    runs = tmp_path / "runs"
    train.main(
        ["--data", str(tiny_idx), "--out", str(runs), "--name", "r", "--model", "smallnet_s",
         "--epochs", "1", "--batch-size", "32", "--quiet", "--threads", "1"]
    )  # fmt: skip
    ck = str(runs / "r" / "best.pt")
    out = tmp_path / "sub.csv"
    r = infer.main(
        [ck, "--data", str(tiny_idx), "--out", str(out), "--tta", "flip", "--return-probs",
         "--confusion", str(tmp_path / "cm.png"), "--quiet"]
    )  # fmt: skip
    assert r["split"] == "test" and r["images"] == 30 and len(r["views"]) == 2
    df = pd.read_csv(out, dtype=str)
    assert list(df.columns) == ["id", "label"] and len(df) == 30
    ids, probs, classes, meta = vote.read_probs(out)
    assert ids == df["id"].tolist() and probs.shape == (30, len(classes))
    assert not meta["multi_label"]
    assert df["label"].tolist() == [classes[k] for k in probs.argmax(1)]
    assert (tmp_path / "cm.png").stat().st_size > 0
    assert 0 <= r["metrics"]["accuracy"] <= 1 and "macro_f1" in r["metrics"]
    text = capsys.readouterr().out
    assert "| k " in text and "support" in text  # the per-class table
    assert "images/s" in text and "macro-F1" in text and str(out) in text
    # probabilities as CSV; the recorded val split, its hash checked
    r = infer.main([ck, "--data", str(tiny_idx), "--out", str(tmp_path / "v.csv"), "--split",
                    "val", "--return-probs", "--probs-format", "csv", "--quiet"])  # fmt: skip
    assert r["split"] == "val" and r["images"] == 12
    assert len(pd.read_csv(tmp_path / "v.probs.csv")) == 12


def test_val_hash_mismatch_exits_2(tiny_idx, tmp_path, capsys):
    ck = save_ckpt(tmp_path / "a.pt", tiny_idx)
    raw = torch.load(ck, weights_only=True)
    raw["split"]["val_hash"] = "0" * 16
    torch.save(raw, tmp_path / "b.pt")
    code, err = run_cli(
        [str(tmp_path / "b.pt"), "--data", str(tiny_idx), "--split", "val", "--out",
         str(tmp_path / "s.csv")], capsys
    )  # fmt: skip
    assert code == 2 and "validation split" in err and "b.pt" in err


def test_weighted_ensemble_equals_hand_average(tiny_idx, tmp_path):
    a = save_ckpt(tmp_path / "a.pt", tiny_idx, seed=1)
    b = save_ckpt(tmp_path / "b.pt", tiny_idx, seed=2)
    base = ["--data", str(tiny_idx), "--return-probs", "--quiet", "--tta", "flip"]
    for name, ck in (("pa", [a]), ("pb", [b]), ("ens", [a, b])):
        extra = ["--weights", "1.5,1"] if name == "ens" else []
        infer.main([*ck, *base, "--out", str(tmp_path / f"{name}.csv"), *extra])
    _, pa, _, _ = vote.read_probs(tmp_path / "pa.csv")
    _, pb, _, _ = vote.read_probs(tmp_path / "pb.csv")
    ids, pe, _, _ = vote.read_probs(tmp_path / "ens.csv")
    assert np.allclose(pe, (1.5 * pa + pb) / 2.5, atol=1e-6)
    assert not np.allclose(pa, pb, atol=1e-3)


def test_weights_count_must_match(tiny_idx, tmp_path, capsys):
    a = save_ckpt(tmp_path / "a.pt", tiny_idx)
    code, err = run_cli([a, "--data", str(tiny_idx), "--weights", "1,2"], capsys)
    assert code == 2 and "--weights" in err


def test_class_mismatch_exits_2_naming_both(tiny_idx, tmp_path, capsys):
    a = save_ckpt(tmp_path / "first.pt", tiny_idx)
    b = save_ckpt(tmp_path / "second.pt", tiny_idx, classes=["x", "y", "z"])
    code, err = run_cli([a, b, "--data", str(tiny_idx), "--out", str(tmp_path / "s.csv")], capsys)
    assert code == 2 and "first.pt" in err and "second.pt" in err and "classes" in err
    assert len(err.strip().splitlines()) == 1


def test_rot90_tta_needs_rotation_training(tiny_idx, tmp_path, capsys):
    plain = save_ckpt(tmp_path / "plain.pt", tiny_idx, aug="flip,crop")
    argv = ["--data", str(tiny_idx), "--tta", "rot90", "--out", str(tmp_path / "s.csv"), "--quiet"]
    code, err = run_cli([plain, *argv], capsys)
    assert code == 2 and "--force-tta" in err and "plain.pt" in err
    assert len(infer.main([plain, *argv, "--force-tta"])["views"]) == 4
    rot = save_ckpt(tmp_path / "rot.pt", tiny_idx, aug="flip,rot90")
    assert infer.main([rot, *argv])["views"] == ["id", "rot90", "rot180", "rot270"]


def make_multilabel(root, n=24, seed=0):
    """A CSV multi-label data set: bright top half -> cat, bright left half -> dog, owl random."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = ["id,cat,dog,owl"]
    for i in range(n):
        a = rng.integers(0, 60, (16, 16))
        c, d, o = i % 2, (i // 2) % 2, int(rng.integers(0, 2))
        a[:8] += 150 * c
        a[:, :8] += 90 * d
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / f"{i:03d}.png")
        rows.append(f"{i:03d},{c},{d},{o}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def test_multilabel_threshold_and_tuning(tmp_path, capsys):
    root = make_multilabel(tmp_path / "ml")
    ck = save_ckpt(tmp_path / "ml.pt", root, multi_label=True, val=0.25)
    out = tmp_path / "sub.csv"
    r = infer.main([ck, "--data", str(root), "--out", str(out), "--threshold", "0.45",
                    "--return-probs", "--tta", "rot90", "--force-tta", "--quiet"])  # fmt: skip
    assert r["split"] == "all" and r["images"] == 24
    df = pd.read_csv(out, dtype={"index": str})
    assert list(df.columns) == ["index", "cat", "dog", "owl"] and df["index"].tolist()[0] == "000"
    ids, probs, classes, meta = vote.read_probs(out)
    assert meta["multi_label"] and classes == ["cat", "dog", "owl"]
    assert (df[CLS].to_numpy() == (probs >= 0.45)).all()
    assert "exact-match accuracy" in capsys.readouterr().out
    # per-class thresholds tuned on the checkpoint's val split, saved beside the output
    out2 = tmp_path / "tuned.csv"
    r = infer.main([ck, "--data", str(root), "--out", str(out2), "--tune-threshold", "f1",
                    "--return-probs", "--quiet"])  # fmt: skip
    tfile = tmp_path / "tuned.thresholds.json"
    assert r["thresholds"]["file"] == str(tfile) and tfile.exists()
    assert r["thresholds"]["tuned"] >= r["thresholds"]["at_0.5"]

    thr = np.array(json.loads(tfile.read_text())["thresholds"])
    assert thr.shape == (3,) and ((thr >= 0.05) & (thr <= 0.95)).all()
    _, p2, _, _ = vote.read_probs(out2)
    sub = pd.read_csv(out2)[CLS].to_numpy()
    assert (sub == (p2 >= thr)).all()
    # the saved thresholds can be reused
    out3 = tmp_path / "again.csv"
    infer.main([ck, "--data", str(root), "--out", str(out3), "--threshold", str(tfile), "--quiet"])
    assert (pd.read_csv(out3)[CLS].to_numpy() == sub).all()


def test_unlabelled_image_folder(tmp_path, tiny_idx, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, a in enumerate(rand_images(5).numpy()):
        Image.fromarray(a[0]).save(d / f"img{4 - i}.png")
    ck = save_ckpt(tmp_path / "a.pt", tiny_idx)
    r = infer.main([ck, "--data", str(d), "--out", str(tmp_path / "s.csv"), "--quiet"])
    df = pd.read_csv(tmp_path / "s.csv")
    assert r["split"] == "all" and r["metrics"] is None
    assert df["id"].tolist() == [f"img{i}" for i in range(5)]
    code, err = run_cli([ck, "--data", str(d), "--split", "test"], capsys)
    assert code == 2 and "--split all" in err


# ---------------------------------------------------------------------------
# Guarantees: validate first, one output transaction, outputs never on inputs, seed aliases


class RotInvariant(nn.Module):
    """Mean over the four rotations of an inner model: rotation-invariant by construction."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return sum(self.inner(torch.rot90(x, k, (-2, -1))) for k in range(4)) / 4


def test_rot90_tta_is_exact():
    x = rand_images(6)
    views = infer.tta_views("rot90")
    assert [v.name for v in views] == ["id", "rot90", "rot180", "rot270"]
    fwd = infer.tta_forward(views)
    # a rotation-invariant model: the 4-view mean is the plain prediction
    torch.manual_seed(1)
    inv = RotInvariant(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(392, 3))).eval()
    plain = train.predict(inv, x, MEAN, STD, RT4)
    assert torch.allclose(train.predict(inv, x, MEAN, STD, RT4, fwd), plain, atol=1e-6)
    # a model that sees orientation: the mean of its softmax on each rotated copy, by hand
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 3)).eval()
    z = (x.float() / 255 - MEAN[0]) / STD[0]
    with torch.no_grad():
        hand = sum(model(torch.rot90(z, k, (2, 3))).softmax(1) for k in range(4)) / 4
    got = train.predict(model, x, MEAN, STD, RT4, fwd)
    assert torch.allclose(got, hand, atol=1e-5)
    assert not torch.allclose(got, train.predict(model, x, MEAN, STD, RT4), atol=1e-4)


def test_bad_confusion_path_leaves_no_outputs(tiny_idx, tmp_path, capsys):
    ck = save_ckpt(tmp_path / "a.pt", tiny_idx)
    out = tmp_path / "sub.csv"
    out.write_text("id,label\nold,0\n")
    (tmp_path / "adir").mkdir()
    base = [ck, "--data", str(tiny_idx), "--out", str(out), "--return-probs", "--quiet"]
    for bad, words in ((tmp_path / "adir", "is a directory"), (tmp_path / "cm.xyz", "cm.xyz")):
        code, err = run_cli([*base, "--confusion", str(bad)], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "id,label\nold,0\n"  # the previous submission, untouched
    assert not (tmp_path / "sub.npy").exists() and not (tmp_path / "sub.metrics.json").exists()
    r = infer.main([*base, "--confusion", str(tmp_path / "cm.png")])
    assert {str(out), str(tmp_path / "cm.png"), str(tmp_path / "sub.metrics.json")} <= set(
        r["written"]
    )


def test_class_name_with_line_break_refused_before_writing(tiny_idx, tmp_path, capsys):
    ck = save_ckpt(tmp_path / "a.pt", tiny_idx, classes=["a\nb", "c", "d"])
    out = tmp_path / "sub.csv"
    code, err = run_cli([ck, "--data", str(tiny_idx), "--out", str(out), "--return-probs"], capsys)
    assert code == 2 and "line break" in err and "a.pt" in err
    assert not out.exists() and not list(tmp_path.glob("sub.*"))


def test_outputs_onto_inputs_are_refused(tmp_path, capsys):
    root = make_multilabel(tmp_path / "ml")
    ck = save_ckpt(tmp_path / "ml.pt", root, multi_label=True, val=0.25)
    labels = root / "train.csv"
    before = labels.read_bytes()
    code, err = run_cli([ck, "--data", str(root), "--out", str(labels)], capsys)
    assert code == 2 and "is the input --data" in err and "train.csv" in err
    cfg = tmp_path / "cfg.csv"
    cfg.write_text("{}")
    code, err = run_cli([ck, "--data", str(root), "--out", str(cfg), "--config", str(cfg)], capsys)
    assert code == 2 and "--config" in err
    thr = tmp_path / "s.thresholds.json"  # tuning would write over the thresholds it reads
    thr.write_text(json.dumps({"classes": CLS, "thresholds": [0.4, 0.5, 0.6]}))
    code, err = run_cli(
        [ck, "--data", str(root), "--out", str(tmp_path / "s.csv"), "--threshold", str(thr),
         "--tune-threshold", "f1"], capsys
    )  # fmt: skip
    assert code == 2 and "is the input --threshold" in err
    assert labels.read_bytes() == before and cfg.read_text() == "{}"
    assert not (tmp_path / "s.csv").exists()


def test_seed_command_line(tiny_idx, tmp_path, monkeypatch):
    ck = save_ckpt(tmp_path / "rot.pt", tiny_idx, aug="rot90")
    d = tmp_path / "imgs"
    d.mkdir()
    for i, a in enumerate(rand_images(5, size=20).numpy()):
        Image.fromarray(a[0]).save(d / f"{i:05d}.png")
    monkeypatch.chdir(tmp_path)
    r = infer.main([ck, str(d), "--image-size", "16", "--batch-size", "2", "--use-tta",
                    "--return-probs", "--quiet"])  # fmt: skip
    assert r["views"] == ["id", "rot90", "rot180", "rot270"] and r["images"] == 5
    # another size than the training one: decoded at it, after a dry run of the model
    r = infer.main([ck, str(d), "--img-size", "20", "--out", "s20.csv", "--quiet"])
    assert r["images"] == 5 and (tmp_path / "s20.csv").exists()
    assert (tmp_path / "submission.csv").exists() and (tmp_path / "submission.npy").exists()
    assert pd.read_csv(tmp_path / "submission.csv", dtype=str)["id"].tolist()[0] == "00000"


@pytest.mark.parametrize(
    "flag,value,words",
    [
        ("--scale", "0", "> 0"),
        ("--scale", "nan", "not finite"),
        ("--batch-size", "0", ">= 1"),
        ("--eval-batch-size", "-3", ">= 1"),
        ("--crop-ratio", "0", "(0, 1]"),
        ("--shift-px", "0", ">= 1"),
        ("--threshold", "1.5", "[0, 1]"),
        ("--weights", "1,inf", "not finite"),
        ("--threads", "0", "[1, 1024]"),
        ("--image-size", "0", "positive"),
    ],
)
def test_bad_numbers_are_one_line_errors(tmp_path, capsys, flag, value, words):
    code, err = run_cli(["a.pt", flag, value, "--out", str(tmp_path / "s.csv")], capsys)
    assert code == 2 and flag in err and words in err and len(err.strip().splitlines()) == 1


def test_directory_as_checkpoint_says_so(tmp_path, tiny_idx, capsys):
    (tmp_path / "run").mkdir()
    code, err = run_cli([str(tmp_path / "run"), "--data", str(tiny_idx)], capsys)
    assert code == 2 and "is a directory" in err


def test_tta_views_use_the_augmentation_ops_of_data_py():
    x = rand_images(4, size=12).float()
    views = {v.name: v for v in infer.tta_views("flip,rot90,shift")}
    assert views["hflip"].augment is data.hflip
    assert torch.equal(views["rot90"].augment(x), data.rot90(x, 1))
    # one shift: the same result for a whole-batch shift and for per-image shifts
    for dy, dx in ((1, -2), (-3, 0), (2, 2)):
        n = len(x)
        per_image = data.shift(x, torch.full((n,), dy), torch.full((n,), dx))
        assert torch.equal(data.shift(x, dy, dx), per_image)
        assert torch.equal(
            data.shift(x, dy, dx)[..., 3:-3, 3:-3], x[..., 3 - dy : 9 - dy, 3 - dx : 9 - dx]
        )
    k = torch.tensor([0, 1, 2, 3])
    assert all(torch.equal(data.rot90(x, k)[i], data.rot90(x[i : i + 1], i)[0]) for i in range(4))


def test_threshold_for_single_label_is_refused(tiny_idx, tmp_path, capsys):
    ck = save_ckpt(tmp_path / "a.pt", tiny_idx)
    code, err = run_cli([ck, "--data", str(tiny_idx), "--threshold", "0.3", "--out",
                         str(tmp_path / "s.csv")], capsys)  # fmt: skip
    assert code == 2 and "--threshold" in err and not (tmp_path / "s.csv").exists()


def test_multi_hot_label_limits_hand_computed():
    p = np.array([[0.9, 0.2, 0.1], [0.3, 0.35, 0.1], [0.8, 0.7, 0.6], [0.0, 0.3, 0.0]])
    t = np.array([0.5, 0.5, 0.05])
    plain = [[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]
    assert common.multi_hot(p, t).tolist() == plain
    # ratios p / t: row 3 is (0, 0.6, 0) -> its best is column 1; row 2 keeps 0.6/0.05 and 1.6
    assert common.multi_hot(p, t, 1, 2).tolist() == [[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 1, 0]]
    assert common.multi_hot(p, 0.5, 2).tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]]
    # a label that is on outranks every label that is off, even at threshold 0
    assert common.multi_hot([[0.0, 0.3]], [0.0, 0.5], 0, 1).tolist() == [[1, 0]]
    assert exact_match(p, [[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 1, 0]], t, (1, 2)) == 1.0


def test_exact_tuning_under_label_limits_hand_computed():
    # one true label per image; row 2's is the least probable everywhere, and its class 2
    # also reaches 0.2 on row 1, so no threshold alone gets rows 1 and 2 both right
    p = np.array([[0.6, 0.55, 0.1], [0.3, 0.9, 0.2], [0.2, 0.1, 0.15], [0.45, 0.2, 0.05]])
    y = np.eye(3)[[0, 1, 2, 0]]
    plain = common.tune_thresholds(p, y, "exact")
    assert exact_match(p, y, plain) == 0.75
    assert exact_match(p, y, plain, (1, 0)) == 0.75  # class 2 keeps 0.5: 0.15/0.5 < 0.2/0.45
    aware = common.tune_thresholds(p, y, "exact", limits=(1, 0))
    # with --min-labels 1 row 2 takes its best p / threshold: class 2 needs 0.15/t2 > 0.2/t0
    assert aware[2] < 0.15 / (0.2 / aware[0]) and aware[2] > 0.2  # and row 1 keeps it off
    assert exact_match(p, y, aware, (1, 0)) == 1.0


def test_exact_under_limits_matches_deciding_every_threshold():
    rng = np.random.default_rng(3)
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    for _ in range(25):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 6))
        p = np.round(rng.random((n, k)) * 20) / 20  # coarse: ties of p / threshold happen
        y = rng.random((n, k)) < 0.35
        thr = grid[rng.integers(0, len(grid), k)]
        lo, hi = sorted(int(v) for v in rng.integers(0, k + 1, 2))
        limits = (lo, hi) if rng.random() < 0.5 else (max(lo, 1), 0)
        for j in range(k):
            fast = common._exact_per_threshold(p, y, thr, j, grid, limits)
            each = [exact_match(p, y, np.where(np.arange(k) == j, g, thr), limits)
                    for g in grid]  # fmt: skip
            assert fast.tolist() == pytest.approx(each)


def test_min_and_max_labels_through_the_cli(tmp_path, capsys):
    root = make_multilabel(tmp_path / "ml")
    ck = save_ckpt(tmp_path / "ml.pt", root, multi_label=True, val=0.25)
    base = [ck, "--data", str(root), "--return-probs", "--quiet", "--threshold", "0.95"]
    infer.main([*base, "--out", str(tmp_path / "a.csv")])
    plain = pd.read_csv(tmp_path / "a.csv")[CLS].to_numpy()
    assert (plain.sum(1) == 0).any()  # at 0.95 some images have no label
    r = infer.main([*base, "--out", str(tmp_path / "b.csv"), "--min-labels", "1"])
    got = pd.read_csv(tmp_path / "b.csv")[CLS].to_numpy()
    _, probs, _, _ = vote.read_probs(tmp_path / "b.csv")
    want = plain.copy()
    empty = plain.sum(1) == 0
    want[empty, probs[empty].argmax(1)] = 1  # one threshold: the most probable label
    assert (got == want).all()
    truth = pd.read_csv(root / "train.csv")[CLS].to_numpy()  # the same order (split all)
    assert r["metrics"]["accuracy"] == pytest.approx(common.accuracy(truth, want))
    assert "labels per image" in capsys.readouterr().out
    infer.main([ck, "--data", str(root), "--out", str(tmp_path / "c.csv"), "--threshold", "0.01",
                "--max-labels", "1", "--quiet"])  # fmt: skip
    assert (pd.read_csv(tmp_path / "c.csv")[CLS].to_numpy().sum(1) == 1).all()


def test_thresholds_file_brings_the_label_bounds_it_was_tuned_for(tmp_path, capsys):
    root = make_multilabel(tmp_path / "ml")
    ck = save_ckpt(tmp_path / "ml.pt", root, multi_label=True, val=0.25)
    base = [ck, "--data", str(root), "--quiet", "--return-probs", "--split", "all"]
    infer.main([*base, "--tune-threshold", "exact", "--min-labels", "1", "--max-labels", "2",
                "--out", str(tmp_path / "t.csv")])  # fmt: skip
    rec = json.loads((tmp_path / "t.thresholds.json").read_text())
    assert (rec["min_labels"], rec["max_labels"]) == (1, 2)
    tfile = tmp_path / "high.thresholds.json"  # every label off alone: the bound decides
    tfile.write_text(json.dumps({**rec, "thresholds": [0.999] * 3, "max_labels": 1}))
    capsys.readouterr()
    again = [*base, "--threshold", str(tfile)]
    infer.main([*again, "--out", str(tmp_path / "a.csv")])
    assert "tuned for 1 to 1 labels per image; applying that" in capsys.readouterr().out
    _, probs, _, _ = vote.read_probs(tmp_path / "a.csv")
    got = pd.read_csv(tmp_path / "a.csv")[CLS].to_numpy()
    assert probs.max() < 0.999 and (got == np.eye(3, dtype=int)[probs.argmax(1)]).all()
    # given flags win: 0 / 0 is the plain per-class thresholding, here nothing
    infer.main([*again, "--min-labels", "0", "--max-labels", "0", "--out", str(tmp_path / "b.csv")])
    assert pd.read_csv(tmp_path / "b.csv")[CLS].to_numpy().sum() == 0
    assert "applying" not in capsys.readouterr().out


def test_thresholds_file_with_impossible_bounds_is_refused(tmp_path, capsys):
    root = make_multilabel(tmp_path / "ml")
    ck = save_ckpt(tmp_path / "ml.pt", root, multi_label=True, val=0.25)
    bad = tmp_path / "bad.thresholds.json"
    bad.write_text(json.dumps({"classes": CLS, "thresholds": [0.5] * 3, "min_labels": 5}))
    code, err = run_cli([ck, "--data", str(root), "--threshold", str(bad), "--out",
                         str(tmp_path / "s.csv")], capsys)  # fmt: skip
    assert code == 2 and "bad.thresholds.json: min_labels / max_labels (5, 0) impossible" in err
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--min-labels", "4"], "there are 3 classes"),
        (["--min-labels", "2", "--max-labels", "1"], "exceeds --max-labels 1"),
        (["--max-labels", "-1"], "--max-labels"),
    ],
)
def test_bad_label_limits_are_one_line_errors(tmp_path, capsys, extra, words):
    root = make_multilabel(tmp_path / "ml")
    ck = save_ckpt(tmp_path / "ml.pt", root, multi_label=True, val=0.25)
    code, err = run_cli([ck, "--data", str(root), *extra, "--out", str(tmp_path / "s.csv")], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.csv").exists()


def test_label_limits_for_single_label_are_refused(tiny_idx, tmp_path, capsys):
    ck = save_ckpt(tmp_path / "a.pt", tiny_idx)
    code, err = run_cli([ck, "--data", str(tiny_idx), "--min-labels", "1", "--out",
                         str(tmp_path / "s.csv")], capsys)  # fmt: skip
    assert code == 2 and "--min-labels: only for multi-label" in err
