"""train.py through its CLI on tiny data: supervised, rotation, resume, NaN, linear eval."""

from __future__ import annotations

import json

import pytest
import torch

import data
import losses
import models
import train

BASE = ["--model", "smallnet_s", "--batch-size", "32", "--quiet", "--threads", "1"]


def run(tiny_idx, tmp_path, *extra, name="r"):
    args = ["--data", str(tiny_idx), "--out", str(tmp_path / "runs"), "--name", name, *BASE]
    return train.main([*args, *extra])


def stop_at_epoch(n):
    """A FitHooks.epoch_start that interrupts (as Ctrl-C would) when epoch index n starts."""

    def hook(epoch, model):
        if epoch == n:
            raise KeyboardInterrupt

    return hook


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_supervised_two_epochs(tiny_idx, tmp_path, capsys):
    summary = run(tiny_idx, tmp_path, "--epochs", "2", "--ema", "0.9", "--eval-test")
    d = tmp_path / "runs" / "r"
    for f in ("best.pt", "last.pt", "best_ema.pt", "metrics.jsonl", "args.json", "summary.json"):
        assert (d / f).exists(), f
    log = rows(d / "metrics.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    keys = {"train_loss", "val_loss", "val_acc", "lr", "seconds", "images_per_s", "ema_val_acc"}
    assert keys <= set(log[0])
    assert log[1]["images_per_s"] > 0
    ck = models.load_checkpoint(d / "best.pt")
    assert (
        ck["task"] == "classify" and ck["num_classes"] == len(ck["classes"]) and ck["in_chans"] == 1
    )
    assert ck["split"]["val_hash"] and ck["split"]["val_ratio"] == 0.1
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert "best val acc" in capsys.readouterr().out
    # a finished run is not overwritten by accident
    with pytest.raises(SystemExit) as e:
        run(tiny_idx, tmp_path, "--epochs", "1")
    assert e.value.code == 2


def test_learns_the_tiny_task(tiny_idx, tmp_path):
    summary = run(tiny_idx, tmp_path, "--epochs", "6", "--lr", "0.05", "--val-ratio", "0.25")
    assert summary["best_val_acc"] >= 0.8  # bars at 3 heights: trivially learnable


def test_rotation_and_linear_eval(tiny_idx, tmp_path, capsys):
    run(tiny_idx, tmp_path, "--epochs", "1", "--task", "rotation", name="rot")
    ck = models.load_checkpoint(tmp_path / "runs" / "rot" / "best.pt")
    assert ck["task"] == "rotation" and ck["num_classes"] == 4
    res = train.main(
        [
            "--data",
            str(tiny_idx),
            "--out",
            str(tmp_path / "runs"),
            "--quiet",
            "--linear-eval",
            str(tmp_path / "runs" / "rot" / "best.pt"),
            "--linear-epochs",
            "2",
            "--nonlinear",
        ]
    )
    names = [n for n, _ in models.feature_blocks(models.model_from_checkpoint(ck))]
    assert [r["block"] for r in res] == names
    assert all(0 <= r["linear_acc"] <= 1 and 0 <= r["mlp_acc"] <= 1 for r in res)
    out = capsys.readouterr().out
    assert "linear_acc" in out and (tmp_path / "runs" / "rot_linear" / "linear_eval.json").exists()


def test_rotation_batch_has_all_four_rotations():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    xr, y = data.rotate_batch(x)
    assert xr.shape == (8, 1, 3, 3) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for k in range(4):
        for i in range(2):
            assert torch.equal(xr[k * 2 + i], torch.rot90(x[i], k, dims=(1, 2)))


def _final_state(path):
    return models.load_checkpoint(path)["state_dict"]


def test_resume_equals_uninterrupted(tiny_idx, tmp_path):
    common = ["--epochs", "2", "--ema", "0.9", "--mix", "cutmix", "--mix-prob", "0.5"]
    run(tiny_idx, tmp_path, *common, name="full")

    args = train.build_parser().parse_args(
        ["--data", str(tiny_idx), "--out", str(tmp_path / "runs"), "--name", "cut", *BASE, *common]
    )
    with pytest.raises(SystemExit):
        train.fit(args, train.FitHooks(epoch_start=stop_at_epoch(1)))
    run(tiny_idx, tmp_path, *common, "--resume", name="cut")
    a = _final_state(tmp_path / "runs" / "full" / "last.pt")
    b = _final_state(tmp_path / "runs" / "cut" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (rows(tmp_path / "runs" / n / "metrics.jsonl") for n in ("full", "cut"))
    assert [r["val_acc"] for r in ma] == [r["val_acc"] for r in mb]


def test_resume_mid_epoch(tiny_idx, tmp_path, monkeypatch):
    common = ["--epochs", "2", "--aug", "flip,crop"]
    run(tiny_idx, tmp_path, *common, name="full")
    real, calls = data.augment_batch, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, second batch (3 batches an epoch)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(data, "augment_batch", flaky)
    with pytest.raises(SystemExit):
        run(tiny_idx, tmp_path, *common, name="cut")
    monkeypatch.setattr(data, "augment_batch", real)
    assert models.load_checkpoint(tmp_path / "runs/cut/last.pt")["train_state"]["batch"] == 1
    run(tiny_idx, tmp_path, *common, "--resume", name="cut")
    a = _final_state(tmp_path / "runs" / "full" / "last.pt")
    b = _final_state(tmp_path / "runs" / "cut" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good(tiny_idx, tmp_path, monkeypatch, capsys):
    real = losses.build_loss

    class NanAfter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, out, y):
            self.calls += 1
            loss = self.inner(out, y)
            return loss * float("nan") if self.calls > 4 else loss

    monkeypatch.setattr(losses, "build_loss", lambda *a, **k: NanAfter(real(*a, **k)))
    with pytest.raises(SystemExit) as e:
        run(tiny_idx, tmp_path, "--epochs", "3")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "loss became nan" in err and "--lr" in err
    ck = models.load_checkpoint(tmp_path / "runs" / "r" / "last.pt")
    assert ck["train_state"]["epoch"] == 1  # the good epoch survives
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_eval_only(tiny_idx, tmp_path, capsys):
    run(tiny_idx, tmp_path, "--epochs", "1")
    m = train.main(
        [
            "--data",
            str(tiny_idx),
            "--eval-only",
            str(tmp_path / "runs" / "r" / "best.pt"),
            "--quiet",
        ]
    )
    best = rows(tmp_path / "runs" / "r" / "metrics.jsonl")[0]["val_acc"]
    assert m["acc"] == pytest.approx(best)


def test_labels_per_class_subset_is_deterministic():
    y = torch.tensor([0, 1, 2] * 10)
    a = train.labelled_subset(y, 2, seed=0)
    assert len(a) == 6 and sorted(y[a].tolist()) == [0, 0, 1, 1, 2, 2]
    assert (a == train.labelled_subset(y, 2, seed=0)).all()


def test_lr_schedules():
    assert train.lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert train.lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert train.lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    # the decay runs over steps warmup..total-1, so the last step gets the end value exactly
    assert train.lr_factor(55, 100, 10, "onecycle") == pytest.approx(1 - 45 / 89)
    assert train.lr_factor(99, 100, 10, "onecycle") == pytest.approx(0.0, abs=1e-9)
    assert train.lr_factor(80, 100, 0, "step") == pytest.approx(0.01)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model", "resnet19"], "resnet18"),
        (["--resume"], "nothing to resume"),
        (["--loss", "nope"], "--loss"),
        (["--oversample", "zzz=2"], "--oversample"),
    ],
)
def test_bad_input_exit_2(tiny_idx, tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        run(tiny_idx, tmp_path, "--epochs", "1", *extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_resume_with_other_model_refused(tiny_idx, tmp_path, capsys):
    common = ["--epochs", "2"]
    args = train.build_parser().parse_args(
        ["--data", str(tiny_idx), "--out", str(tmp_path / "runs"), "--name", "r", *BASE, *common]
    )
    with pytest.raises(SystemExit):
        train.fit(args, train.FitHooks(epoch_start=stop_at_epoch(1)))
    with pytest.raises(SystemExit) as e:
        run(tiny_idx, tmp_path, *common, "--resume", "--model", "smallnet")
    assert e.value.code == 2
    assert "smallnet_s" in capsys.readouterr().err
