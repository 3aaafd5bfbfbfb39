"""Learning-rate schedules end where they say, warm-up stays a fraction of the run (issue 15.9),
and the default recipe fits the data size (issue 16.2). Expected values are hand-computed."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from conftest import make_patterns, write_idx

import models
import train
from common import read_jsonl

FAST = ["--threads", "1", "--quiet", "--device", "cpu", "--model", "smallnet_s"]


@pytest.fixture(scope="module")
def idx200(tmp_path_factory):
    """200 images: 180 train / 20 val; batch 16 gives 11 optimizer steps per epoch."""
    root = tmp_path_factory.mktemp("sched") / "d"
    x, y = make_patterns(200)
    write_idx(root, "train", x, y)
    return root


def run_lrs(data, tmp_path, sched, epochs, *extra) -> list[float]:
    """The lr of the last optimizer step of each epoch, from metrics.jsonl (real CLI run)."""
    name = f"{sched}_{epochs}"
    argv = ["--data", str(data), "--out", str(tmp_path), "--name", name, "--sched", sched]
    argv += ["--epochs", str(epochs), "--batch-size", "16", "--lr", "0.1", "--aug", "none"]
    argv += ["--min-lr-ratio", "0.1", "--gamma", "0.5", "--warmup-epochs", "1", *FAST, *extra]
    train.main(argv)
    return [r["lr"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")]


# ---------------------------------------------------------------------------
# Pure pieces


def test_warmup_is_capped_at_a_fifth_of_the_run():
    # 1 epoch of 30 steps with --warmup-epochs 1: 6 steps (20%), not all 30
    assert train.warmup_steps(1.0, 30, 30, "onecycle") == 6
    assert train.warmup_steps(1.0, 30, 300, "cosine") == 30  # 10 epochs: 1 epoch is 10%
    assert train.warmup_steps(0.5, 30, 300, "cosine") == 15
    assert train.warmup_steps(1.0, 3, 3, "cosine") == 0  # too short to warm up at all
    assert train.warmup_steps(1.0, 30, 300, "constant") == 0
    assert train.warmup_steps(0.0, 30, 300, "step") == 0


def test_lr_factor_hand_computed():
    # total 10, warm-up 2: 0.5, 1.0, then the decay starts at 1 and reaches its end at step 9
    f = [train.lr_factor(s, 10, 2, train.Schedule("cosine", min_ratio=0.1)) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0]
    assert f[9] == pytest.approx(0.1)
    # step 5: t = 3/7, 0.1 + 0.9 * 0.5 * (1 + cos(3 pi / 7)) = 0.650134...
    assert f[5] == pytest.approx(0.1 + 0.45 * (1 + math.cos(3 * math.pi / 7)))
    assert f[5] == pytest.approx(0.650134, abs=1e-6)
    g = [train.lr_factor(s, 10, 2, train.Schedule("onecycle")) for s in range(10)]
    assert g[2] == 1.0 and g[9] == 0.0 and g[5] == pytest.approx(4 / 7)
    h = [train.lr_factor(s, 8, 0, train.Schedule("step", (0.5, 0.75), 0.1)) for s in range(8)]
    assert h == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert train.lr_factor(7, 8, 2, train.Schedule("constant")) == 1.0


def test_plateau_reduces_after_patience_epochs():
    state = train.TrainState()
    scales = []
    for loss in (1.0, 0.9, 0.95, 0.92, 0.9, 0.91, 0.5):
        train.plateau_update(state, loss, 0.5)
        scales.append(state.plateau_scale)
    # improves, improves, worse (1), worse (2 -> x0.5, reset), same as best (1), worse (2 ->
    # x0.5), improves
    assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


# ---------------------------------------------------------------------------
# The final lr of 1-, 2- and 5-epoch runs through train.py (lr 0.1, 11 steps per epoch)

# cosine/onecycle end at --min-lr-ratio 0.1 -> 0.01; step (milestones 0.5,0.75, gamma 0.5)
# at 0.1 * 0.5**2 = 0.025; constant and plateau (loss keeps falling here) stay at 0.1.
FINAL = {"cosine": 0.01, "onecycle": 0.01, "step": 0.025, "constant": 0.1}


@pytest.mark.parametrize("sched", sorted(FINAL))
@pytest.mark.parametrize("epochs", [1, 2, 5])
def test_final_lr_of_each_schedule(idx200, tmp_path, sched, epochs):
    lrs = run_lrs(idx200, tmp_path, sched, epochs)
    assert len(lrs) == epochs
    assert lrs[-1] == pytest.approx(FINAL[sched], rel=1e-6)


def test_two_epoch_cosine_mid_value(idx200, tmp_path):
    # 22 steps, warm-up min(11, int(0.2 * 22)) = 4; the last step of epoch 1 is step 10:
    # t = 6/17, lr = 0.1 * (0.1 + 0.9 * 0.5 * (1 + cos(6 pi / 17))) = 0.0750582...
    lrs = run_lrs(idx200, tmp_path, "cosine", 2)
    assert lrs[0] == pytest.approx(0.0750582, abs=1e-6)


def test_plateau_one_and_two_epochs_end_at_peak(idx200, tmp_path):
    # warm-up (2 resp. 4 steps) is over before the end, and no plateau can be detected yet
    assert run_lrs(idx200, tmp_path, "plateau", 1)[-1] == pytest.approx(0.1)
    assert run_lrs(idx200, tmp_path, "plateau", 2)[-1] == pytest.approx(0.1)


# ---------------------------------------------------------------------------
# Issue 16.2: the recipe for the flags not given


def recipe(n_images: int, epochs: int = 3, fmt: str = "", **given):
    a = argparse.Namespace(batch_size=None, lr=None, warmup_epochs=None, opt=None, epochs=epochs,
                           accum_steps=1, sched="onecycle", amp="none")  # fmt: skip
    vars(a).update(given)
    return a, train.choose_recipe(a, n_images, 1, fmt=fmt)


def test_recipe_small_data_gets_small_batches_adamw_and_short_warmup():
    # 2,700 training letters: batch 32 gives 84 steps/epoch (64 would give 42 < 50); 3 epochs are
    # 252 steps < 300, so AdamW, lr 2e-3 * sqrt(32/256) = 7.071e-4; warm-up 0.6 epoch = 50 steps
    a, line = recipe(2700)
    assert (a.batch_size, a.opt, a.lr, a.warmup_epochs) == (32, "adamw", 7.071e-4, 0.6)
    assert "batch 32 (2700 images: 84 steps/epoch" in line and "warm-up 50 of 252 steps" in line


def test_recipe_large_data_keeps_the_sgd_defaults():
    # Fashion-MNIST: 54,000 images -> batch 256 (210 steps), 10 epochs = 2,100 steps: SGD at 0.2,
    # warm-up 1 epoch (10% of the run)
    a, _ = recipe(54000, epochs=10)
    assert (a.batch_size, a.opt, a.lr, a.warmup_epochs) == (256, "sgd", 0.2, 1.0)
    # run_all.sh's base: 9,000 images, 5 epochs: batch 128 (70 steps/epoch), 350 steps >= 300:
    # SGD at 0.2 (batch >= 128), warm-up 1 epoch (20%): the recipe it was measured with
    a, _ = recipe(9000, epochs=5)
    assert (a.batch_size, a.opt, a.lr, a.warmup_epochs) == (128, "sgd", 0.2, 1.0)


def test_recipe_explicit_flags_win():
    a, line = recipe(2700, batch_size=64, opt="sgd")
    # the batch and the optimizer as given; the lr follows the given batch: 0.2 * 64/128
    assert (a.batch_size, a.opt, a.lr) == (64, "sgd", 0.1)
    assert "batch 64 (--batch-size)" in line and "opt sgd (--opt)" in line
    a, line = recipe(2700, lr=0.01, warmup_epochs=0.0)
    assert a.opt == "sgd" and a.lr == 0.01 and a.warmup_epochs == 0.0  # --lr given: no switch
    assert "(--lr)" in line and "warm-up 0 of" in line


def test_recipe_no_mirror_flips_for_glyphs():
    # letters and digits change class under a mirror flip (b/d): synth.py and pixel-CSV data
    # default to crop only (measured, 3,000 letters x 3 epochs: 74% val with flip,crop, 82% crop)
    assert recipe(2700, aug=None, fmt="synth")[0].aug == "crop"
    a, line = recipe(2700, aug=None, fmt="pixels-csv")
    assert a.aug == "crop" and "not mirror-invariant" in line
    assert recipe(54000, aug=None, fmt="idx")[0].aug == "flip,crop"
    assert recipe(2700, aug="flip", fmt="synth")[0].aug == "flip"  # given: kept


def test_recipe_printed_by_train_cli(idx200, tmp_path, capsys):
    train.main(["--data", str(idx200), "--out", str(tmp_path), "--name", "auto", "--epochs", "1",
                *FAST])  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("recipe: batch 32 (180 images: 5 steps/epoch")
    line = out.splitlines()[0]
    assert f"amp {models.resolve_amp('cpu', 'auto')} (auto: {models.cpu_bf16()[1]})" in line
    assert "model " not in line  # --model given: no reason printed for it
    a = json.loads((tmp_path / "auto" / "args.json").read_text())
    assert (a["batch_size"], a["opt"], a["aug"]) == (32, "adamw", "flip,crop")  # IDX: not glyphs


# ---------------------------------------------------------------------------
# Issue 16.2: precision and model chosen for the hardware


def test_fast_bf16_needs_amx_or_amd_and_avx512_kernels():
    # measured: bf16 autocast is slower than fp32 on a Xeon with AVX512-BF16 but no AMX, faster
    # with AMX and on an AMD EPYC (Zen 4) with AVX512-BF16 and no AMX
    intel, amd = "GenuineIntel", "AuthenticAMD"
    bf16 = ["avx2", "avx512f", "avx512_bf16"]
    assert models.cpu_bf16([*bf16, "amx_bf16", "amx_tile"], "AVX512", intel) == (
        True, "bf16 is fast with AMX"
    )  # fmt: skip
    assert models.cpu_bf16(bf16, "AVX512", amd) == (True, "bf16 is fast with AVX512-BF16 on AMD")
    assert models.cpu_bf16(bf16, "AVX512", intel) == (
        False, "AVX512-BF16 without AMX, bf16 is not faster"
    )  # fmt: skip
    assert not models.cpu_bf16(["avx2", "avx512f"], "AVX512", amd)[0]  # Zen 3 and older
    assert models.cpu_bf16([*bf16, "amx_bf16"], "AVX2", intel) == (
        False, "torch's CPU kernels are AVX2, bf16 needs AVX512"
    )  # fmt: skip
    assert not models.cpu_bf16(["avx2"], "NO AVX", amd)[0]
    # this machine: read from /proc/cpuinfo, the same answer as resolve_amp's
    fast, why = models.cpu_bf16()
    assert why
    assert models.resolve_amp("cpu", "auto") == ("bf16" if fast else "none")


def test_default_model_follows_the_precision_and_the_run_length(monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16", lambda *a: (False, "no AVX512-BF16 or AMX here"))
    assert models.default_arch("cpu", "auto") == "smallnet_t"  # auto -> fp32 -> the thin net
    assert models.default_arch("cpu", "bf16") == "smallnet_s"  # bf16 given: the middle net
    assert models.default_arch("cpu", "bf16", 8100) == "smallnet"  # short: the wide net
    assert models.default_arch("cuda", "none", 10**6) == "smallnet"  # GPUs: the wide net
    assert models.default_arch("cpu", "none", 54000 * 4) == "smallnet_t"
    assert models.default_arch("cpu", "none", 2700 * 3) == "smallnet"  # short: the wide net
    assert models.default_arch("cpu", "none", models.SHORT_RUN_IMAGES) == "smallnet_t"
    rt = models.Runtime(device=torch.device("cpu"), amp="none")
    a = argparse.Namespace(model=None)
    assert (
        train.default_model(a, rt, 216000)
        == ", model smallnet_t (auto: fp32 on cpu, 216000 images seen)"
    )
    assert a.model == "smallnet_t"
    a = argparse.Namespace(model=None)
    assert train.default_model(a, rt, 8100) == (
        ", model smallnet (auto: fp32 on cpu, a short run: 8100 < 50000 images seen)"
    )
    assert train.amp_reason("auto", rt) == ", amp none (auto: no AVX512-BF16 or AMX here)"
    assert train.amp_reason("none", rt) == ", amp none (--amp)"
    a = argparse.Namespace(model="resnet18")
    assert train.default_model(a, rt, 8100) == "" and a.model == "resnet18"  # given: kept
    monkeypatch.setattr(models, "cpu_bf16", lambda *a: (True, "bf16 is fast with AMX"))
    assert models.default_arch("cpu", "auto", 10**6) == "smallnet_s"
    rt = models.Runtime(device=torch.device("cpu"), amp="bf16")
    a = argparse.Namespace(model=None)
    assert train.default_model(a, rt, 10**6) == (
        ", model smallnet_s (auto: bf16 on cpu, 1000000 images seen)"
    )


def test_default_model_in_the_cli_and_the_run_name(idx200, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16", lambda *a: (False, "no AVX512-BF16 or AMX here"))
    fast = [f for f in FAST if f not in ("--model", "smallnet_s")]
    train.main(["--data", str(idx200), "--out", str(tmp_path), "--epochs", "1", *fast])
    line = capsys.readouterr().out.splitlines()[0]
    # 180 images x 1 epoch: a short run, so the wide net, and the run named after it
    assert line.endswith(", amp none (auto: no AVX512-BF16 or AMX here), model smallnet "
                         "(auto: fp32 on cpu, a short run: 180 < 50000 images seen), "
                         "ema 0.999 (auto: the default, --ema none for off)")  # fmt: skip
    a = json.loads((tmp_path / "smallnet_classify" / "args.json").read_text())
    assert a["model"] == "smallnet"


# ---------------------------------------------------------------------------
# Issue 16.2: progressive resizing (--prog-resize)


def test_prog_size_hand_computed():
    a = argparse.Namespace(prog_resize=16, prog_until=0.5, epochs=18)
    # ramp of 9 epochs: 16 + 12 e / 9 px, rounded down to a multiple of 4, never below 16
    got = [train.prog_size(e, a, (28, 28))[0] for e in range(18)]
    assert got == [16, 16, 16, 20, 20, 20, 24, 24, 24] + [28] * 9
    assert train.prog_size(0, a, (28, 42)) == (16, 24)  # width in proportion
    a.prog_until = 0.0
    assert train.prog_size(0, a, (28, 28)) == (28, 28)
    a.prog_until, a.prog_resize = 0.5, 0
    assert train.prog_size(0, a, (28, 28)) == (28, 28)  # off


def test_prog_resize_in_the_cli(idx200, tmp_path, capsys):
    """4 epochs from 8 px: epoch 1 at 8, epoch 2 at 12 (said in the epoch line), then the full 16;
    the run still learns the bars; a size not below the image height is one line, exit 2."""
    argv = ["--data", str(idx200), "--out", str(tmp_path), "--epochs", "4", "--batch-size", "16",
            "--prog-resize", "8", *FAST]  # fmt: skip
    train.main([*argv, "--name", "prog"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    assert "at 8px" in lines[0] and "at 12px" in lines[1]
    assert all("px" not in ln.split("lr")[0] for ln in lines[2:])
    rows = read_jsonl(tmp_path / "prog" / "metrics.jsonl")
    assert rows[-1]["val_acc"] > 0.9  # 3 classes: chance is 0.33
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--name", "bad", "--prog-resize", "16"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--prog-resize 16" in err and "below the training height (16 px)" in err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------
# Issue 16.3: --eval-test also reports flip TTA (--eval-tta auto)


def test_eval_test_reports_flip_tta_as_infer_computes_it(tmp_path, capsys):
    import infer

    root = tmp_path / "d"
    x, y = make_patterns(200)
    write_idx(root, "train", x, y)
    xt, yt = make_patterns(60, seed=1)
    write_idx(root, "test", xt, yt)
    argv = ["--data", str(root), "--out", str(tmp_path), "--epochs", "2", "--batch-size", "16",
            "--eval-test", *FAST]  # fmt: skip
    train.main([*argv, "--name", "flip", "--aug", "flip,crop"])
    tm = json.loads((tmp_path / "flip" / "test_metrics.json").read_text())
    assert set(tm) == {"test_acc", "tta_test_acc", "ema_test_acc", "ema_tta_test_acc"}
    assert "test acc, flip TTA" in capsys.readouterr().out
    # the number infer.py gives for the same checkpoint and views
    model, ck = models.load_model(tmp_path / "flip" / "best.pt")
    test, _ = train.data.load_split(str(root), "test")
    fwd = infer.tta_forward(infer.tta_views("flip"))
    probs = train.predict(model, test.images, ck["mean"], ck["std"], forward=fwd)
    want = train.metrics_from_probs(probs, test.labels, False)["acc"]
    assert tm["tta_test_acc"] == pytest.approx(want)
    train.main([*argv, "--name", "crop", "--aug", "crop"])  # auto: no flips trained, no TTA
    tm = json.loads((tmp_path / "crop" / "test_metrics.json").read_text())
    assert set(tm) == {"test_acc", "ema_test_acc"}
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--name", "bad", "--eval-tta", "flop"])
    assert e.value.code == 2 and "--eval-tta flop: unknown view" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_train_py_copied_without_infer_py_still_evaluates(tmp_path):
    """README "Use in your own project": train.py with data/models/losses/runlog/common only;
    --eval-test then reports no TTA rows (auto), and --eval-tta flip says what is missing."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(train.__file__).parent
    proj = tmp_path / "proj"
    proj.mkdir()
    for f in ("train.py", "data.py", "models.py", "losses.py", "runlog.py", "common.py"):
        shutil.copy(repo / f, proj / f)
    root = tmp_path / "d"
    x, y = make_patterns(120)
    write_idx(root, "train", x, y)
    write_idx(root, "test", *make_patterns(30, seed=1))
    argv = [sys.executable, "train.py", "--data", str(root), "--out", str(tmp_path / "runs"),
            "--epochs", "1", "--eval-test", *FAST]  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([*argv, "--name", "a"], cwd=proj, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    tm = json.loads((tmp_path / "runs" / "a" / "test_metrics.json").read_text())
    assert set(tm) == {"test_acc", "ema_test_acc"}
    r = subprocess.run([*argv, "--name", "b", "--eval-tta", "flip"], cwd=proj,
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 2 and "needs infer.py and vote.py beside train.py" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs" / "b").exists()
