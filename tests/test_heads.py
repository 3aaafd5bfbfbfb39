"""train.py --heads mask,gender,age (the mask competition's 3-head model): training through the
CLI, the checkpoint round trip, infer's 18-class answer from the heads, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import combine_heads
from test_mask import EVAL_IDS, make_mask_tree

import data
import infer
import losses
import models
import train

HEADS = ["--heads", "mask,gender,age"]


def _train_args(root, runs, *extra, name="h"):
    return [
        "--data", str(root), "--out", str(runs), "--name", name, "--model", "smallnet_s",
        "--img-size", "16", "--epochs", "2", "--batch-size", "16", "--val-ratio", "0.34",
        "--threads", "1", "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 3-head run shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("heads")
    root = make_mask_tree(tmp / "mask")
    runs = tmp / "runs"
    summary = train.main(
        _train_args(root, runs, *HEADS, "--head-losses", "ce,label-smoothing,focal")
    )
    return root, runs / "h", summary


def test_three_head_training_through_cli(trained, capsys):
    root, run, summary = trained
    ck = models.load_checkpoint(run / "best.pt")
    assert ck["heads"] == data.MASK_HEADS and ck["num_classes"] == 18
    assert ck["classes"] == data.MASK_CLASSES
    assert ck["args"]["head_losses"] == ["ce", "label-smoothing", "focal"]
    rows = [pd.read_json(run / "metrics.jsonl", lines=True).iloc[i] for i in range(2)]
    for r in rows:
        for h in ("mask", "gender", "age"):
            assert 0 <= r[f"val_{h}_acc"] <= 1 and 0 <= r[f"val_{h}_f1"] <= 1
        assert 0 <= r["val_f1"] <= 1
    # best.pt is chosen on the combined 18-class accuracy
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    # the per-head numbers are those of the 18-class predictions' digits
    model, _ = models.load_model(run / "best.pt")
    val, _ = data.load_split(
        root, "val", how=data.SplitSpec(val_ratio=0.34, seed=0), opts=data.Opts(img_size=16)
    )
    probs = train.predict(model, val.images, ck["mean"], ck["std"])
    pred, y = probs.argmax(1), val.labels
    best = next(r for r in rows if r["val_acc"] == summary["best_val_acc"])
    for h, (a, b) in zip(("mask", "gender", "age"), zip(data.mask_heads(y), data.mask_heads(pred))):
        assert best[f"val_{h}_acc"] == pytest.approx((a == b).double().mean().item())


def test_checkpoint_round_trip_rebuilds_heads(trained):
    _, run, _ = trained
    model, ck = models.load_model(run / "best.pt")
    assert isinstance(model, models.MultiHead) and model.sizes == (3, 2, 3)
    assert model.net.get_classifier().out_features == 8
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
        lm, lg, la = model.head_logits(x)
    assert out.shape == (4, 18)
    assert torch.allclose(out, combine_heads(lm, lg, la), atol=1e-5)
    for marg, z in zip(model.marginals(out), (lm, lg, la)):
        assert torch.allclose(marg, z.float().log_softmax(1), atol=1e-5)
    # save -> load keeps the weights and the heads
    again = models.model_from_checkpoint(ck)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                   again.state_dict().values()))  # fmt: skip
    assert models.head_names(model) == ["net.head."]


def _hand_set(ck_path, out_path, bias):
    """A copy of a 3-head checkpoint whose classifier ignores the image: weight 0, `bias`."""
    ck = models.load_checkpoint(ck_path)
    sd = dict(ck["state_dict"])
    sd["net.head.weight"] = torch.zeros_like(sd["net.head.weight"])
    sd["net.head.bias"] = torch.tensor(bias, dtype=torch.float32)
    meta = models.read_meta(ck)
    models.save_checkpoint(out_path, sd, meta)


def test_infer_answer_from_hand_set_heads(trained, tmp_path):
    root, run, _ = trained
    # mask logits -> class 2 (not worn), gender -> 1 (female), age -> 0 (< 30)
    bias = [0.0, 1.0, 3.0, -1.0, 1.0, 2.0, 0.5, -2.0]
    ck = tmp_path / "hand.pt"
    _hand_set(run / "best.pt", ck, bias)
    out = tmp_path / "sub.csv"
    infer.main([str(ck), "--data", str(root), "--out", str(out), "--return-probs", "--quiet"])
    df = pd.read_csv(out)
    assert df["ImageID"].tolist() == EVAL_IDS
    assert (df["ans"] == 2 * 6 + 1 * 3 + 0).all()  # = 15
    # the probabilities: product of the heads' softmaxes, by hand
    pm = [math.exp(v) for v in bias[:3]]
    pg = [math.exp(v) for v in bias[3:5]]
    pa = [math.exp(v) for v in bias[5:]]
    pm, pg, pa = ([v / sum(p) for v in p] for p in (pm, pg, pa))
    want = np.array([pm[m] * pg[g] * pa[a] for m in range(3) for g in range(2) for a in range(3)])
    probs = np.load(tmp_path / "sub.npy")
    assert probs.shape == (5, 18)
    np.testing.assert_allclose(probs, np.tile(want, (5, 1)), atol=2e-3)  # bf16 autocast on CPU
    assert want.argmax() == 15


def test_combination_unit_hand_values():
    """MultiHead on an identity backbone: its input rows are the 8 head logits."""
    m = models.MultiHead(torch.nn.Identity(), (3, 2, 3))
    z = torch.tensor(
        [
            [5.0, 0, 0, 0, 4, 0, 0, 9],  # mask 0, gender 1, age 2 -> 0 + 3 + 2 = 5
            [0.0, 7, 0, 2, 0, 0, 3, 0],  # mask 1, gender 0, age 1 -> 6 + 0 + 1 = 7
            [0.0, 0, 1, 0, 1, 8, 0, 0],  # mask 2, gender 1, age 0 -> 12 + 3 + 0 = 15
            [0.0, 0, 6, 3, 0, 0, 0, 2],  # mask 2, gender 0, age 2 -> 12 + 0 + 2 = 14
        ]
    )
    assert m(z).argmax(1).tolist() == [5, 7, 15, 14]
    # row 0, column 5 by hand: log softmax of each head's own logits, summed
    lm = 5 - math.log(math.exp(5) + 2)
    lg = 4 - math.log(1 + math.exp(4))
    la = 9 - math.log(2 + math.exp(9))
    assert m(z)[0, 5].item() == pytest.approx(lm + lg + la, abs=1e-5)
    # the loss: sum of the three heads' cross-entropies, each on its own target digit
    y = torch.tensor([5, 7, 15, 14])
    loss = losses.MultiHeadLoss([losses.build_loss("ce")] * 3, (3, 2, 3))
    assert [t.tolist() for t in loss.split_target(y)] == [[0, 1, 2, 2], [1, 0, 1, 0], [2, 1, 0, 2]]
    ce = torch.nn.functional.cross_entropy
    by_hand = ce(z[:, :3], y // 6) + ce(z[:, 3:5], y // 3 % 2) + ce(z[:, 5:], y % 3)
    assert loss(m(z), y).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # head metrics from joint indices
    t = np.array([5, 7, 15, 14])
    p = np.array([5, 6, 15, 2])  # age wrong in row 2, mask wrong in row 4
    hm = train.head_metrics(t, p, data.MASK_HEADS)
    assert hm["mask_acc"] == 0.75 and hm["gender_acc"] == 1.0 and hm["age_acc"] == 0.75


def _refused(capsys, argv, needle, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--heads", "mask,gender,hair"], "unknown head 'hair'"),
        (["--heads", "age,gender,mask"], "--heads mask,gender,age"),
        (HEADS + ["--head-losses", "ce,focal"], "2 losses for 3 heads"),
        (HEADS + ["--head-losses", "ce,ce,nosuch"], "unknown loss 'nosuch'"),
        (HEADS + ["--head-losses", "ce,ce,bce"], "one class index"),
        (["--head-losses", "ce,ce,ce"], "only with --heads"),
        (HEADS + ["--mix", "cutmix"], "--mix"),
    ],
)
def test_bad_head_flags(tmp_path, capsys, extra, needle):
    root = tmp_path / "nodata"  # checked before the data is even looked at
    _refused(capsys, _train_args(root, tmp_path / "runs", *extra), needle, tmp_path)


def test_heads_on_non_mask_data(tmp_path, capsys):
    from conftest import make_patterns, write_idx

    x, y = make_patterns(40, 3, 8, seed=0)
    d = tmp_path / "idx"
    write_idx(d, "train", x, y)
    _refused(capsys, _train_args(d, tmp_path / "runs", *HEADS), "idx-format data", tmp_path)


def test_bench_heads_drawn_set_is_mask_layout(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_heads

    root = bench_heads.make_set(tmp_path / "m", people=6, seed=1)
    ds = data.load_images(root)
    assert ds.fmt == "mask" and len(ds) == 42 and ds.images.shape[1:] == (3, 32, 32)
    for i, label in zip(ds.ids, ds.labels.tolist()):
        _, gender, _, age = i.split("/")[0].split("_")
        kind = i.split("/")[1]
        assert label == data.mask_label(kind, gender, int(age)), i
