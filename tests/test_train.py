"""train.py through its CLI on tiny data: supervised, rotation, resume, NaN, linear eval."""

from __future__ import annotations

import json

import numpy as np
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


def test_rotations_one_trains_on_n_images_all_on_4n(tmp_path, tiny_idx, monkeypatch):
    """--rotations one: each step sees the input batch once (a random rotation per image);
    all: four times. Counted on the forward batches of the real CLI run."""
    orig, sizes = data.rotate_batch, []

    def spy(x, gen=None):
        out = orig(x, gen)
        sizes.append((len(x), len(out[0])))
        return out

    monkeypatch.setattr(data, "rotate_batch", spy)
    for mode, factor in (("one", 1), ("all", 4)):
        sizes.clear()
        args = ["--data", str(tiny_idx), "--out", str(tmp_path), "--name", mode]
        args += ["--model", "smallnet_s", "--task", "rotation", "--rotations", mode]
        train.main([*args, "--epochs", "1", "--batch-size", "16", "--quiet"])
        train_steps = [(n, b) for n, b in sizes if n == 16]  # eval batches are larger
        assert train_steps and all(b == factor * n for n, b in train_steps), (mode, sizes)


def test_resume_knows_rotnet_runs_from_before_rotations():
    """A rotation run saved before --rotations existed turned every image four ways: resuming it
    with the default (one) is a change resume names; with --rotations all it is not."""
    old = {"task": "rotation", "lr": 0.2}
    assert train.fingerprint_changes(old, {"task": "rotation", "rotations": "one", "lr": 0.2}) == [
        "--rotations one (was all)"
    ]
    assert train.fingerprint_changes(old, {"task": "rotation", "rotations": "all", "lr": 0.2}) == []
    classify = {"task": "classify", "lr": 0.2}
    assert train.fingerprint_changes(classify, {**classify, "rotations": None}) == []


def test_rotations_without_rotation_task_refused(tiny_idx, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(tiny_idx, tmp_path, "--rotations", "all")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        "train.py: error: --rotations all: only for --task rotation; drop it"
    ]
    assert not (tmp_path / "runs").exists()  # refused before the run directory


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
    assert train.lr_factor(0, 100, 10, train.Schedule("cosine")) == pytest.approx(0.1)
    assert train.lr_factor(10, 100, 10, train.Schedule("cosine")) == pytest.approx(1.0)
    assert train.lr_factor(100, 100, 10, train.Schedule("cosine")) == pytest.approx(0.0, abs=1e-9)
    # the decay runs over steps warmup..total-1, so the last step gets the end value exactly
    assert train.lr_factor(55, 100, 10, train.Schedule("onecycle")) == pytest.approx(1 - 45 / 89)
    assert train.lr_factor(99, 100, 10, train.Schedule("onecycle")) == pytest.approx(0.0, abs=1e-9)
    assert train.lr_factor(80, 100, 0, train.Schedule("step")) == pytest.approx(0.01)


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


def test_ema_on_by_default_and_resume_keeps_the_runs_own(tiny_idx, tmp_path, capsys):
    run(tiny_idx, tmp_path, "--epochs", "1", name="dflt")
    d = tmp_path / "runs" / "dflt"
    assert json.loads((d / "args.json").read_text())["ema"] == train.EMA_DEFAULT == 0.999
    assert (d / "best_ema.pt").exists() and "ema_val_acc" in rows(d / "metrics.jsonl")[0]
    assert "ema 0.999 (auto: the default, --ema none for off)" in capsys.readouterr().out
    # a run without EMA (as every run before the default) resumes without EMA when not told
    common = ["--epochs", "2", "--ema", "none"]
    args = train.build_parser().parse_args(
        ["--data", str(tiny_idx), "--out", str(tmp_path / "runs"), "--name", "off", *BASE, *common]
    )
    with pytest.raises(SystemExit):
        train.fit(args, train.FitHooks(epoch_start=stop_at_epoch(1)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # asking for EMA now is a change resume cannot honour
        run(tiny_idx, tmp_path, "--epochs", "2", "--resume", "--ema", "0.9", name="off")
    assert e.value.code == 2 and "--ema 0.9 (was None)" in capsys.readouterr().err
    run(tiny_idx, tmp_path, "--epochs", "2", "--resume", name="off")
    assert "ema none (auto: as the resumed run)" in capsys.readouterr().out
    d = tmp_path / "runs" / "off"
    assert [r["epoch"] for r in rows(d / "metrics.jsonl")] == [1, 2]
    assert not (d / "best_ema.pt").exists()
    assert "ema_val_acc" not in rows(d / "metrics.jsonl")[1]


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


# ---------------------------------------------------------------------------
# Issue 12: checked numbers, validation before side effects, staged --overwrite, resume
# fingerprint, run-dir lock, --sync-bn, messages


def one_line_exit_2(capsys, fn) -> str:
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--epochs", "0"), ("--batch-size", "-1"), ("--eval-batch-size", "0"), ("--lr", "nan"),
        ("--lr", "0"), ("--lr", "inf"), ("--momentum", "1"), ("--weight-decay", "-1e-4"),
        ("--drop", "1"), ("--drop-path", "-0.1"), ("--clip-grad", "-1"), ("--mix-alpha", "0"),
        ("--mix-prob", "1.5"), ("--labels-per-class", "0"), ("--img-size", "100000"),
        ("--milestones", "half,0.75"), ("--milestones", "0.5,1.5"), ("--split-seed", "-1"),
        ("--random-seed", "x"), ("--threads", "0"), ("--ema", "1"), ("--warmup-epochs", "inf"),
        ("--accum-steps", "0"), ("--pad", "-1"), ("--val-ratio", "1"), ("--smoothing", "1"),
        ("--gamma", "0"), ("--gamma", "-1"), ("--min-lr-ratio", "2"), ("--kfold", "-2"), ("--linear-epochs", "0"),
        ("--in-chans", "2"), ("--amp", "fp8"),
    ],
)  # fmt: skip
def test_bad_number_exit_2_before_anything(tiny_idx, tmp_path, capsys, flag, value):
    err = one_line_exit_2(capsys, lambda: run(tiny_idx, tmp_path, "--epochs", "1", flag, value))
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--eval-only", "a.pt", "--linear-eval", "b.pt"], "--eval-only and --linear-eval"),
        (["--resume", "--overwrite"], "--resume and --overwrite"),
        (["--kfold", "1"], "--kfold 1"),
        (["--fold", "2"], "--fold 2: needs --kfold"),
        (["--kfold", "3", "--fold", "3"], "0..2"),
        (["--nonlinear"], "--linear-eval"),
        (["--task", "rotation", "--eval-test"], "--eval-test"),
        (["--accum-steps", "9"], "--accum-steps 9"),  # 3 batches an epoch: no step would happen
        (["--aug", "flip,nope"], "--aug nope"),
        (["--device", "cpu", "--sync-bn"], "--sync-bn"),
        (["--data", "/nonexistent/data"], "/nonexistent/data"),
    ],
)
def test_bad_combination_exit_2_writes_nothing(tiny_idx, tmp_path, capsys, extra, needle):
    err = one_line_exit_2(capsys, lambda: run(tiny_idx, tmp_path, "--epochs", "1", *extra))
    assert needle in err
    assert not (tmp_path / "runs" / "r").exists()  # no run directory, no args.json


def test_checkpoint_flag_given_a_directory(tiny_idx, tmp_path, capsys):
    for flag in ("--eval-only", "--linear-eval", "--weights", "--resume"):
        err = one_line_exit_2(capsys, lambda f=flag: run(tiny_idx, tmp_path, f, str(tmp_path)))
        assert "is a directory" in err and "pass a checkpoint file such as" in err


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_overwrite_keeps_the_old_run_until_the_new_one_is_done(tiny_idx, tmp_path, capsys):
    run(tiny_idx, tmp_path, "--epochs", "1")
    d = tmp_path / "runs" / "r"
    old = snapshot(d)
    # bad inputs: nothing of the finished run is touched
    for bad in (["--data", str(tmp_path / "typo")], ["--aug", "flipp"], ["--weights", "no.pt"]):
        one_line_exit_2(capsys, lambda b=bad: run(tiny_idx, tmp_path, "--overwrite", *b))
        assert snapshot(d) == old
    # interrupted (as Ctrl-C) in its second epoch: the old run is exactly as it was
    argv = ["--data", str(tiny_idx), "--out", str(tmp_path / "runs"), "--name", "r", *BASE]
    args = train.build_parser().parse_args([*argv, "--epochs", "2", "--overwrite"])
    with pytest.raises(SystemExit) as e:
        train.fit(args, train.FitHooks(epoch_start=stop_at_epoch(1)))
    assert e.value.code == 130 and "previous run" in capsys.readouterr().err
    assert snapshot(d) == old
    assert sorted(p.name for p in d.parent.iterdir()) == ["r"]  # no staging dir, no lock left
    # a run that ends well replaces it as a whole
    run(tiny_idx, tmp_path, "--epochs", "2", "--overwrite")
    assert [r["epoch"] for r in rows(d / "metrics.jsonl")] == [1, 2]
    assert (d / "best.pt").read_bytes() != old["best.pt"]
    assert sorted(p.name for p in d.parent.iterdir()) == ["r"]


def test_overwrite_refuses_a_directory_with_other_files(tiny_idx, tmp_path, capsys):
    run(tiny_idx, tmp_path, "--epochs", "1")
    (tmp_path / "runs" / "r" / "notes.txt").write_text("mine")
    err = one_line_exit_2(capsys, lambda: run(tiny_idx, tmp_path, "--epochs", "1", "--overwrite"))
    assert "notes.txt" in err and (tmp_path / "runs" / "r" / "notes.txt").exists()


def interrupted_run(tiny_idx, tmp_path, *extra):
    argv = ["--data", str(tiny_idx), "--out", str(tmp_path / "runs"), "--name", "r", *BASE]
    args = train.build_parser().parse_args([*argv, *extra])
    with pytest.raises(SystemExit):
        train.fit(args, train.FitHooks(epoch_start=stop_at_epoch(1)))


def test_resume_with_changed_flags_lists_the_differences(tiny_idx, tmp_path, capsys):
    interrupted_run(tiny_idx, tmp_path, "--epochs", "2", "--lr", "0.05")
    capsys.readouterr()
    last = (tmp_path / "runs" / "r" / "last.pt").read_bytes()
    err = one_line_exit_2(
        capsys,
        lambda: run(
            tiny_idx, tmp_path, "--epochs", "2", "--resume", "--lr", "0.1", "--batch-size", "16"
        ),
    )
    assert "--lr 0.1 (was 0.05)" in err and "--batch-size 16 (was 32)" in err
    assert "original flags" in err and "--name" in err
    err = one_line_exit_2(
        capsys, lambda: run(tiny_idx, tmp_path, "--epochs", "3", "--lr", "0.05", "--resume")
    )
    assert "--epochs 3 (was 2)" in err  # onecycle: the schedule depends on the run's length
    err = one_line_exit_2(
        capsys,
        lambda: run(
            tiny_idx, tmp_path, "--epochs", "2", "--lr", "0.05", "--resume", "--val-ratio", "0.2"
        ),
    )
    assert "train/val split" in err
    assert (tmp_path / "runs" / "r" / "last.pt").read_bytes() == last
    # runtime flags may change
    run(tiny_idx, tmp_path, "--epochs", "2", "--lr", "0.05", "--resume", "--eval-batch-size", "7")
    assert [r["epoch"] for r in rows(tmp_path / "runs" / "r" / "metrics.jsonl")] == [1, 2]


def test_resume_with_more_epochs_on_a_constant_schedule(tiny_idx, tmp_path):
    interrupted_run(tiny_idx, tmp_path, "--epochs", "2", "--sched", "constant")
    summary = run(tiny_idx, tmp_path, "--epochs", "3", "--sched", "constant", "--resume")
    assert summary["epochs"] == 3
    assert [r["epoch"] for r in rows(tmp_path / "runs" / "r" / "metrics.jsonl")] == [1, 2, 3]


def test_resume_from_a_best_pt_says_so(tiny_idx, tmp_path, capsys):
    run(tiny_idx, tmp_path, "--epochs", "1", name="a")
    best = str(tmp_path / "runs" / "a" / "best.pt")
    err = one_line_exit_2(
        capsys, lambda: run(tiny_idx, tmp_path, "--epochs", "1", "--resume", best)
    )
    assert "no training state" in err and "last.pt" in err and "not 'smallnet_s'" not in err


def test_second_command_on_a_run_is_refused_stale_lock_taken_over(tiny_idx, tmp_path, capsys):
    import subprocess
    import sys

    (tmp_path / "runs").mkdir()
    lock = tmp_path / "runs" / ".r.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{holder.pid}\n")
        err = one_line_exit_2(capsys, lambda: run(tiny_idx, tmp_path, "--epochs", "1"))
        assert f"pid {holder.pid}" in err and "--name" in err
        assert not (tmp_path / "runs" / "r" / "args.json").exists()
    finally:
        holder.kill()
        holder.wait()
    run(tiny_idx, tmp_path, "--epochs", "1")  # its holder is gone: the stale lock is taken over
    assert (tmp_path / "runs" / "r" / "summary.json").exists() and not lock.exists()


def test_nan_in_the_first_epoch_promises_no_checkpoint(tiny_idx, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(losses, "build_loss", lambda *a, **k: lambda out, y: out.sum() * np.nan)
    with pytest.raises(SystemExit) as e:
        run(tiny_idx, tmp_path, "--epochs", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert "no checkpoint was written" in err[0] and "data" in err[0] and "--lr" in err[0]
    assert not (tmp_path / "runs" / "r" / "last.pt").exists()


def test_eval_only_and_linear_eval_honour_runtime_flags(tiny_idx, tmp_path, monkeypatch):
    run(tiny_idx, tmp_path, "--epochs", "1")
    ckpt = str(tmp_path / "runs" / "r" / "best.pt")
    seen, real = [], models.autocast
    monkeypatch.setattr(models, "autocast", lambda dev, amp: seen.append(amp) or real(dev, amp))
    torch.set_num_threads(2)
    try:
        base = ["--data", str(tiny_idx), "--quiet", "--threads", "1", "--out", str(tmp_path)]
        train.main([*base, "--eval-only", ckpt, "--amp", "bf16"])
        assert torch.get_num_threads() == 1 and set(seen) == {"bf16"}
        torch.set_num_threads(2)
        seen.clear()
        train.main([*base, "--linear-eval", ckpt, "--linear-epochs", "1", "--amp", "none"])
        assert torch.get_num_threads() == 1 and seen and set(seen) == {"none"}
    finally:
        torch.set_num_threads(1)


def test_metrics_from_probs_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    m = train.metrics_from_probs(probs, torch.tensor([0, 1, 1, 2]), False)
    # predictions 0,1,0,2: class F1 = 2/3 (tp 1, fp 1), 2/3 (tp 1, fn 1), 1
    assert m["acc"] == 0.75 and m["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    nll = -(np.log(0.7) + np.log(0.8) + np.log(0.3) + np.log(0.6)) / 4
    assert m["loss"] == pytest.approx(nll, rel=1e-5)
    ml = train.metrics_from_probs(
        torch.tensor([[0.9, 0.2], [0.6, 0.7]]), torch.tensor([[1, 0], [0, 1]]), True
    )
    assert ml["acc"] == 0.5 and ml["label_acc"] == 0.75


def test_sigkill_during_overwrite_leaves_the_old_run(tiny_idx, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    run(tiny_idx, tmp_path, "--epochs", "1")
    d = tmp_path / "runs" / "r"
    old = snapshot(d)
    argv = [sys.executable, str(ROOT / "train.py"), "--data", str(tiny_idx), "--out"]
    argv += [str(tmp_path / "runs"), "--name", "r", *BASE, "--epochs", "200", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stage = tmp_path / "runs" / f".r.staging-{proc.pid}"
    end = time.monotonic() + 120
    while not (stage / "last.pt").exists():  # the new run is under way, beside the old one
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < end, "the staged run never saved an epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert snapshot(d) == old
    run(tiny_idx, tmp_path, "--epochs", "1", "--overwrite", "--random-seed", "1")
    assert sorted(p.name for p in d.parent.iterdir()) == ["r"]  # stale stage and lock cleared
    assert (d / "best.pt").read_bytes() != old["best.pt"]


def test_resume_of_an_older_last_pt_checks_its_recorded_flags(tiny_idx, tmp_path, capsys):
    interrupted_run(tiny_idx, tmp_path, "--epochs", "2", "--lr", "0.05")
    last = tmp_path / "runs" / "r" / "last.pt"
    ck = models.load_checkpoint(last)
    del ck["resume_fingerprint"]  # as written before the fingerprint existed
    torch.save(ck, last)
    capsys.readouterr()
    err = one_line_exit_2(
        capsys, lambda: run(tiny_idx, tmp_path, "--epochs", "2", "--lr", "0.1", "--resume")
    )
    assert "--lr 0.1 (was 0.05)" in err
    run(tiny_idx, tmp_path, "--epochs", "2", "--lr", "0.05", "--resume")
    assert [r["epoch"] for r in rows(tmp_path / "runs" / "r" / "metrics.jsonl")] == [1, 2]


def test_sync_bn_under_torchrun_on_cpu_is_one_line_per_rank(tiny_idx, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "train.py")]
    cmd += ["--data", str(tiny_idx), "--out", str(tmp_path / "runs"), *BASE, "--epochs", "1"]
    cmd += ["--device", "cpu", "--sync-bn"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and str(ROOT / "train.py") + '", line' not in r.stderr  # ours: none
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train.py: error: --sync-bn")]
    assert lines and "CUDA" in lines[0], r.stderr[-2000:]  # torchrun may stop rank 1 first
    assert not (tmp_path / "runs").exists()
