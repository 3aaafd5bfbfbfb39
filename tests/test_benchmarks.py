"""benchmarks/bench_vs_timm.py, bench_gpu.sh and bench_train.py: logic, bad input, tiny real runs.

The timm side is played by a stand-in script with timm's command line and outputs (its
`Train: E [ B/N ...]` log lines and summary.csv), so the orchestration, measurement, refusal
and report are exercised in seconds; our side is the real train.py on tiny data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_patterns, write_idx

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_vs_timm as bvt  # noqa: E402

# A stand-in for timm's train.py: same flags, same files, checks the torchvision layout.
FAKE_TIMM = textwrap.dedent(
    """
    import argparse, csv, os, struct, sys, time
    p = argparse.ArgumentParser()
    for f in ("--data-dir", "--output", "--experiment", "--amp-dtype"):
        p.add_argument(f)
    p.add_argument("--epochs", type=int)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--num-classes", type=int)
    a, _ = p.parse_known_args()
    raw = os.path.join(a.data_dir, "FashionMNIST", "raw")
    with open(os.path.join(raw, "train-images-idx3-ubyte"), "rb") as f:
        magic, n = struct.unpack(">II", f.read(8))
    assert magic == 2051 and os.path.exists(os.path.join(raw, "t10k-labels-idx1-ubyte"))
    print("Using native Torch AMP. Training in mixed precision." if a.amp
          else "AMP not enabled. Training in torch.float32.", flush=True)
    out = os.path.join(a.output, a.experiment)
    os.makedirs(out, exist_ok=True)
    nb = 8
    for e in range(a.epochs):
        for b in range(nb):
            time.sleep(0.02)
            if b % a.log_interval == 0 or b == nb - 1:
                print(f"Train: {e} [{b:>4d}/{nb} (50%)]  Loss: 1.0 (1.0)  "
                      f"Time: 0.020s, 6400.00/s  (0.020s, 6400.00/s)  LR: 1e-1", flush=True)
        new = not os.path.exists(os.path.join(out, "summary.csv"))
        with open(os.path.join(out, "summary.csv"), "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"])
            w.writerow([e, 1.0, 1.0, 40.0 + 20 * e, 99.0, 0.1])
    """
)


@pytest.fixture
def fake_timm(tmp_path: Path) -> Path:
    p = tmp_path / "fake_timm_train.py"
    p.write_text(FAKE_TIMM)
    return p


@pytest.fixture
def idx28(tmp_path: Path) -> Path:
    root = tmp_path / "idx28"
    x, y = make_patterns(200, classes=3, size=16)
    write_idx(root, "train", x[:160], y[:160])
    write_idx(root, "t10k", x[160:], y[160:])
    return root


def _main_exit(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        bvt.main(argv)
    return e.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------
# pure helpers


def test_time_to_reach_and_ratio():
    ours = [(30.0, 0.80), (60.0, 0.90), (90.0, 0.93)]
    timm = [(200.0, 0.85), (400.0, 0.89), (600.0, 0.91)]
    assert bvt.time_to_reach(ours, 0.91) == 90.0
    assert bvt.time_to_reach(ours, 0.95) is None
    r = bvt.speed_ratio(ours, timm)
    assert r["target"] == 0.91 and r["ours_s"] == 90.0 and r["timm_s"] == 600.0
    assert r["ratio"] == pytest.approx(0.15)
    assert bvt.speed_ratio([], timm)["ratio"] is None


def test_measurement_uses_the_real_runs_defaults():
    """The 2-epoch speed measurement on a subset is a short run, for which train.py would pick
    smallnet and a batch of 64; the measurement and the real run are given the real run's
    model, batch size and optimizer, and flags the user gave are left alone."""
    info = bvt.DataInfo(54000, 6000, 60000, 10000, 10, (28, 28), 0.3, 0.35)
    got = bvt.full_run_flags("d", ["--amp", "none"], info)
    assert got == ["--model", "smallnet_t", "--batch-size", "256", "--opt", "sgd"]
    got = bvt.full_run_flags("d", ["--amp", "bf16", "--batch-size", "32"], info)
    assert got == ["--model", "smallnet_s", "--opt", "sgd"]
    assert bvt.full_run_flags("d", ["--model", "smallnet", "--opt", "adamw"], info) == [
        "--batch-size", "256"
    ]  # fmt: skip
    small = bvt.DataInfo(900, 100, 1000, 100, 10, (28, 28), 0.3, 0.35)
    got = bvt.full_run_flags("d", ["--amp", "none"], small)  # 810 images: 25 steps of 32
    assert got == ["--model", "smallnet", "--batch-size", "32", "--opt", "adamw"]


def test_epochs_that_fit():
    assert bvt.epochs_that_fit(600, 20, 190) == 3  # 20 + 3 * 190 = 590 <= 600
    assert bvt.epochs_that_fit(600, 20, 580) == 1
    assert bvt.epochs_that_fit(100, 20, 190) == 0


def test_ours_estimate_from_the_measurement_rows():
    # 8,000 images per epoch: epoch 1 in 10 s (kernels built), epochs 2-3 in 4 s and 6 s, the
    # rows appearing 1 s and 2 s after their training ended (validation, checkpoints)
    rows = [
        (15.0, {"seconds": 10.0, "images_per_s": 800.0}),
        (20.0, {"seconds": 4.0, "images_per_s": 2000.0}),
        (28.0, {"seconds": 6.0, "images_per_s": 8000 / 6}),
    ]
    info = bvt.DataInfo(54000, 6000, 60000, 10000, 10, (28, 28), 0.3, 0.35)
    e = bvt.ours_estimate(rows, info)
    assert e["images_per_s"] == pytest.approx(1600.0)  # 16,000 images in 10 s, not epoch 2 alone
    assert e["per_epoch_s"] == pytest.approx(54000 / 1600 + 1.5)  # + the mean gap
    assert e["startup_s"] == pytest.approx(15 - 10 - 1.5)
    # startup 3.5 + epoch 1's extra 10 - 5 + test evaluation 1.5 * 10000 / 6000
    assert e["fixed_s"] == pytest.approx(3.5 + 5.0 + 2.5)


def test_timm_log_parsing():
    line = (
        "Train: 1 [ 150/469 ( 32%)]  Loss: 0.512 (0.601)  Time: 0.410s,  312.20/s  "
        "(0.405s,  316.05/s)  LR: 1.000e-01  Data: 0.010 (0.012)"
    )
    assert bvt.parse_timm_progress(line) == (1, 150, 469)
    assert bvt.parse_timm_progress("Test: [ 10/78]") is None
    assert bvt.parse_timm_rate(line + "\n" + line.replace("316.05", "320.50")) == 320.5
    assert bvt.timm_precision("AMP not enabled. Training in torch.float32.", []) == "fp32"
    amp = "Using native Torch AMP. Training in mixed precision."
    assert bvt.timm_precision(amp, ["--amp", "--amp-dtype", "bfloat16"]) == "autocast bfloat16"
    assert bvt.ours_precision("none") == "fp32"


def test_summary_csv_and_idx(tmp_path: Path):
    import data

    p = tmp_path / "summary.csv"
    p.write_text("epoch,train_loss,eval_loss,eval_top1\n0,1.0,0.9,81.5\n1,0.8,0.7,8")
    rows = bvt.read_summary_csv(p)
    assert [r["eval_top1"] for r in rows] == [81.5, 8.0]
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    bvt.write_idx(tmp_path / "train-images-idx3-ubyte", x, 3)
    assert np.array_equal(data.read_idx(tmp_path / "train-images-idx3-ubyte", 3), x)


# ---------------------------------------------------------------------------
# bad input: one line, exit 2, nothing run


def test_missing_anchor(tmp_path, idx28, capsys):
    code, err = _main_exit(["--data", str(idx28), "--anchor", str(tmp_path / "no.py")], capsys)
    assert code == 2 and "--anchor" in err and len(err.strip().splitlines()) == 1


def test_missing_data(tmp_path, fake_timm, capsys):
    code, err = _main_exit(["--data", str(tmp_path / "nope"), "--anchor", str(fake_timm)], capsys)
    assert code == 2 and "--data" in err and "no such" in err


@pytest.mark.parametrize(
    "extra, word",
    [
        (["--budget", "0"], "--budget"),
        (["--ours-args", "--out elsewhere"], "--out"),
        (["--timm-args", "--output x"], "--output"),
        (["--ours-args", "'unclosed"], "--ours-args"),
    ],
)
def test_bad_flags(idx28, fake_timm, capsys, extra, word):
    code, err = _main_exit(["--data", str(idx28), "--anchor", str(fake_timm), *extra], capsys)
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1


def test_out_is_a_directory(tmp_path, idx28, fake_timm, capsys):
    argv = ["--data", str(idx28), "--anchor", str(fake_timm), "--out", str(tmp_path)]
    code, err = _main_exit(argv, capsys)
    assert code == 2 and "--out" in err and "directory" in err


def test_budget_too_small_is_measured_then_refused(idx28, fake_timm, capsys):
    # ours' epochs given (no measurement of ours); timm's stand-in is measured: ~0.2 s/epoch
    argv = ["--data", str(idx28), "--anchor", str(fake_timm), "--ours-epochs", "1",
            "--budget", "0.01", "--calib", "0.05"]  # fmt: skip
    code, err = _main_exit(argv, capsys)
    assert code == 2 and "--budget 0.01" in err and "one epoch of timm" in err


@pytest.mark.parametrize("calib_images", [None, 30])
def test_ours_measurement_trains_the_whole_training_part(tmp_path, idx28, calib_images):
    # a subset mis-measured the full run's speed by 15-25%: by default the measurement trains
    # 2 epochs of everything the real run trains on; --calib-images still takes a subset
    argv = ["--data", str(idx28), "--timm-epochs", "1"]
    if calib_images:
        argv += ["--calib-images", str(calib_images)]
    args = bvt.build_parser().parse_args(argv)
    info, _, _ = bvt.inspect_data(str(idx28))
    extra = ["--batch-size", "32", "--val-ratio", "0.2", "--amp", "none"]
    est = bvt.calibrate(args, info, tmp_path, tmp_path / "timm_data", 1, extra, [])
    assert set(est) == {"ours"}  # timm's epochs given: not measured
    run = tmp_path / "calib_ours" / "ours"
    per_class = -(-calib_images // info.classes) if calib_images else None  # IDX: 10 names
    assert json.loads((run / "args.json").read_text())["labels_per_class"] == per_class
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "images_per_s" in r]) == bvt.CALIB_EPOCHS == 2
    e = est["ours"]
    assert e["images_per_s"] > 0 and e["per_epoch_s"] >= info.n_train / e["images_per_s"]


# ---------------------------------------------------------------------------
# a whole tiny run: real train.py against the stand-in


def test_tiny_run_report(tmp_path, idx28, fake_timm):
    out = tmp_path / "t.md"
    text = bvt.main(
        [
            "--data",
            str(idx28),
            "--anchor",
            str(fake_timm),
            "--ours-epochs",
            "2",
            "--timm-epochs",
            "3",
            "--budget",
            "120",
            "--threads",
            "1",
            "--out",
            str(out),
            "--ours-args",
            "--batch-size 32 --val-ratio 0.2",
        ]  # fmt: skip
    )
    assert out.read_text() == text
    rows = [
        ln for ln in text.splitlines() if ln.startswith("| ours | ") or ln.startswith("| timm | ")
    ]
    ours_epochs = [ln for ln in rows if ln.startswith("| ours | ") and "`" not in ln]
    timm_epochs = [ln for ln in rows if ln.startswith("| timm | ") and "`" not in ln]
    assert len(ours_epochs) == 2 and len(timm_epochs) == 3
    # the stand-in's eval_top1 is 40, 60, 80 %: the table reports them as accuracies
    assert [ln.split(" | ")[3] for ln in timm_epochs] == ["0.4000", "0.6000", "0.8000"]
    for ln in ours_epochs:  # a real test accuracy of each epoch's weights
        assert 0.0 <= float(ln.split(" | ")[3].split()[0]) <= 1.0
    assert "| fp32 |" in text and "--epochs 2 --batch-size 32" in text
    assert "ours/timm = " in text and "Time to the lower final accuracy" in text


# ---------------------------------------------------------------------------
# bench_gpu.sh on a CPU with tiny sizes; bench_train.py's RotNet numbers


def test_bench_gpu_tiny_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    r = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "bench_gpu.sh"),
            "--device",
            "cpu",
            "--tiny",
            "--models",
            "smallnet_s",
            "--sizes",
            "16",
            "--variants",
            "fp32",
            "--threads",
            "1",
            "--out",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| smallnet_s | 16 | fp32 |"))
    assert float(row.split("|")[5]) > 0  # a measured images/s
    assert "### time to 0.94" in text and "TTA benchmark" in text and "ratio soup / bare" in text


@pytest.mark.parametrize(
    "args, word",
    [(["--device", "cuda:x"], "--device"), (["--variants", "fp64"], "--variants"),
     (["--cifar", "/no/such/dir", "--device", "cpu"], "--cifar"), (["--bogus"], "--bogus")],
)  # fmt: skip
def test_bench_gpu_bad_input(tmp_path, args, word):
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "bench_gpu.sh"), *args, "--out", str(tmp_path / "g.md")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.md").exists()


def test_bench_train_rotation_images_per_s(tiny_idx):
    import bench_train

    sup = bench_train.ours(str(tiny_idx), "smallnet_s", 120, 32, "none", 1, epochs=1)
    one = bench_train.ours(str(tiny_idx), "smallnet_s", 120, 32, "none", 1, "rotation", epochs=1)
    every = bench_train.ours(
        str(tiny_idx), "smallnet_s", 120, 32, "none", 1, "rotation", epochs=1, rotations="all"
    )
    assert sup > 0 and one > 0 and every > 0


def test_bench_train_rotation_step_rates():
    import bench_train

    row = bench_train.rotation_step_rates("smallnet_s", 8, "none", 1, 1)
    assert row[0] == "smallnet_s" and all(v > 0 for v in row[1:4])
    assert row[6].endswith("%") and 0 <= float(row[6][:-1]) < 100
