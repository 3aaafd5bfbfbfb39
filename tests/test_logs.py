"""runlog.py: summary.csv, --log tensorboard / wandb, --checkpoint-hist epoch files, epoch soups."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_patterns, write_idx

import models
import runlog
import soup
import train

FAST = ["--batch-size", "32", "--threads", "1", "--quiet", "--device", "cpu", "--amp", "none"]


@pytest.fixture
def eight(tmp_path: Path) -> Path:
    """IDX data with 8 classes (so top-5 has a meaning): 200 train + 40 test, 16x16."""
    x, y = make_patterns(240, classes=8)
    write_idx(tmp_path / "eight", "train", x[:200], y[:200])
    write_idx(tmp_path / "eight", "t10k", x[200:], y[200:])
    return tmp_path / "eight"


def run_train(data_dir: Path, out: Path, *extra: str, name: str = "r") -> Path:
    args = ["--data", str(data_dir), "--out", str(out), "--name", name, "--model", "smallnet_s"]
    train.main([*args, "--epochs", "3", "--lr", "0.05", *FAST, *extra])
    return out / name


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def log_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------
# Pure pieces


def test_summary_table_timm_columns_and_ours():
    rows = [
        {"epoch": 1, "train_loss": 2.0, "val_loss": 1.5, "val_acc": 0.25, "lr": 0.1, "seconds": 3},
        {"epoch": 2, "train_loss": 1.0, "val_loss": 0.5, "val_acc": 0.75, "lr": 0.05, "seconds": 2},
    ]
    header, table = runlog.summary_table(rows)
    assert header == ["epoch", "train_loss", "eval_loss", "eval_top1", "lr", "val_acc", "seconds"]
    assert table[1] == [2, 1.0, 0.5, 75.0, 0.05, 0.75, 2]  # top-1 in percent, as timm writes it
    header5, table5 = runlog.summary_table([{**rows[0], "val_top5": 0.5, "val_f1": 0.2}])
    assert header5[:6] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    assert table5[0][4] == 50.0 and header5[-1] == "val_f1"


def test_update_history_is_timms_checkpoint_saver():
    hist: list = []
    kept = []
    for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.6, 0.9, 0.1], start=1):
        hist, k = runlog.update_history(hist, epoch, acc, 2, higher=True)
        kept.append(k)
    # 0.5 and 0.7 fill the two places; 0.6 replaces 0.5; the tie 0.6 does not replace the
    # earlier 0.6; 0.9 replaces 0.6; 0.1 is worse than both
    assert kept == [True, True, True, False, True, False]
    assert hist == [[0.9, 5], [0.7, 2]]
    low, _ = runlog.update_history([[0.3, 1]], 2, 0.2, 1, higher=False)  # a loss: lower wins
    assert low == [[0.2, 2]]
    again, k = runlog.update_history([[0.9, 5], [0.7, 2]], 5, 0.4, 2, higher=True)
    assert k and again == [[0.7, 2], [0.4, 5]]  # a redone epoch replaces its own entry


# ---------------------------------------------------------------------------
# Through train.py


def test_summary_csv_tensorboard_and_top_k(eight, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_train(eight, tmp_path / "runs", "--log", "tensorboard", "--checkpoint-hist", "2")
    rows = log_rows(run)
    csv_rows = read_csv(run / "summary.csv")
    assert [int(r["epoch"]) for r in csv_rows] == [1, 2, 3]
    assert list(csv_rows[0])[:6] == [
        "epoch",
        "train_loss",
        "eval_loss",
        "eval_top1",
        "eval_top5",
        "lr",
    ]
    for r, c in zip(rows, csv_rows):
        assert float(c["eval_top1"]) == pytest.approx(100 * r["val_acc"])
        assert float(c["eval_top5"]) == pytest.approx(100 * r["val_top5"])
        assert float(c["eval_loss"]) == pytest.approx(r["val_loss"])
        assert r["val_top5"] >= r["val_acc"]
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    top1 = acc.Scalars("eval_top1")
    assert [e.step for e in top1] == [1, 2, 3]
    assert [e.value for e in top1] == pytest.approx([100 * r["val_acc"] for r in rows], abs=1e-4)
    assert {"train_loss", "eval_loss", "lr", "val_f1"} <= set(acc.Tags()["scalars"])
    # the two best epochs by val_acc (ties: the earlier epoch) are kept as epoch_N.pt
    best = sorted(rows, key=lambda r: (-r["val_acc"], r["epoch"]))[:2]
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == sorted(
        f"epoch_{r['epoch']}.pt" for r in best
    )
    for r in best:
        ck = models.load_checkpoint(run / f"epoch_{r['epoch']}.pt")
        assert ck["metrics"]["epoch"] == r["epoch"] and ck["metrics"]["val_acc"] == r["val_acc"]
    last = models.load_checkpoint(run / "last.pt")
    final = [r for r in best if r["epoch"] == 3]
    if final:  # epoch 3 kept: its file holds the final weights
        sd = models.load_checkpoint(run / "epoch_3.pt")["state_dict"]
        assert all(torch.equal(sd[k], v) for k, v in last["state_dict"].items())


def test_checkpoint_hist_by_loss_keeps_lowest(eight, tmp_path):
    run = run_train(
        eight, tmp_path / "runs", "--checkpoint-hist", "1", "--checkpoint-metric", "val_loss"
    )
    rows = log_rows(run)
    low = min(rows, key=lambda r: (r["val_loss"], r["epoch"]))
    assert [p.name for p in run.glob("epoch_*.pt")] == [f"epoch_{low['epoch']}.pt"]


def test_resume_does_not_duplicate_rows_or_keep_stale_epochs(eight, tmp_path):
    """Killed after epoch 2 was logged and saved, with a 3rd row and epoch_3.pt from a run that
    died before its last.pt: resume trims both and the logs hold each epoch once."""
    out = tmp_path / "runs"
    p = train.build_parser()
    base = ["--data", str(eight), "--out", str(out), "--name", "r", "--model", "smallnet_s"]
    argv = [*base, "--epochs", "3", "--lr", "0.05", *FAST, "--checkpoint-hist", "3"]

    def stop(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        train.fit(p.parse_args(argv), train.FitHooks(epoch_end=stop))
    assert e.value.code == 130
    run = out / "r"
    assert [r["epoch"] for r in log_rows(run)] == [1, 2]
    with open(run / "metrics.jsonl", "a") as f:  # the dead run's epoch 3, never in a last.pt
        f.write(json.dumps({**log_rows(run)[-1], "epoch": 3, "val_acc": -1.0}) + "\n")
    (run / "epoch_3.pt").write_bytes((run / "epoch_1.pt").read_bytes())
    train.main([*argv, "--resume"])
    rows = log_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["val_acc"] >= 0
    assert [int(r["epoch"]) for r in read_csv(run / "summary.csv")] == [1, 2, 3]
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == [
        "epoch_1.pt",
        "epoch_2.pt",
        "epoch_3.pt",
    ]
    assert models.load_checkpoint(run / "epoch_3.pt")["metrics"]["epoch"] == 3


def test_wandb_offline_run_directory(eight, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    run = run_train(eight, tmp_path / "runs", "--log", "wandb", "--wandb-project", "t")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    run_id = (run / "wandb_id.txt").read_text().strip()
    records = offline[0] / f"run-{run_id}.wandb"
    assert records.stat().st_size > 0
    blob = records.read_bytes()
    assert b"eval_top1" in blob and b"train_loss" in blob  # the scalars were streamed


# ---------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--log", "tensorbored"], "--log"),
        (["--checkpoint-hist", "-1"], "--checkpoint-hist"),
        (
            ["--ema", "none", "--checkpoint-hist", "2", "--checkpoint-metric", "ema_val_acc"],
            "--ema",
        ),
        (["--checkpoint-metric", "val_accuracy"], "--checkpoint-metric"),
    ],
)
def test_bad_log_flags_exit_2(eight, tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        run_train(eight, tmp_path / "runs", *extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "runs").exists()


def test_missing_tensorboard_is_one_line(eight, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(SystemExit) as e:
        run_train(eight, tmp_path / "runs", "--log", "tensorboard")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "pip install tensorboard" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------
# soup.py averages the kept epochs (timm's avg_checkpoints)


def test_soup_averages_epoch_checkpoints(eight, tmp_path):
    run = run_train(eight, tmp_path / "runs", "--checkpoint-hist", "2")
    files = sorted(run.glob("epoch_*.pt"))
    assert len(files) == 2
    out = tmp_path / "soup"
    soup.main(["--ingredients", str(run / "epoch_*.pt"), "--uniform", "--out", str(out)])
    avg = models.load_checkpoint(out / "uniform_soup.pt")["state_dict"]
    a, b = (models.load_checkpoint(f)["state_dict"] for f in files)
    for k, v in avg.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (a[k] + b[k]) / 2)
    assert os.path.exists(out / "individual.jsonl") or (out / "summary.json").exists()
