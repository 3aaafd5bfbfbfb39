"""The source systems' command lines and names (issue 15): optimizers by timm name and
RangerLars, --grad-checkpointing, --loss-fn / --old-aug, the dirty-MNIST seed's nested YAML and
dotted overrides, and `finetune.py --i 3 --random-seed 7` with nothing else."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, make_patterns, write_idx

import finetune
import train
from common import UserError

FAST = ["--threads", "1", "--quiet", "--device", "cpu", "--model", "smallnet_s"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """120 train + 30 test images, 16x16, 3 classes (class 2 made rarer: 20 of 120)."""
    root = tmp_path_factory.mktemp("seeds") / "tiny"
    x, y = make_patterns(170)
    keep = [i for i in range(170) if y[i] != 2 or (y[:i] == 2).sum() < 30]
    x, y = x[keep], y[keep]
    write_idx(root, "train", x[:120], y[:120])
    write_idx(root, "t10k", x[120:150], y[120:150])
    return root


def one_line_exit_2(capsys, fn) -> str:
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def args_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "args.json").read_text())


# ---------------------------------------------------------------------------
# Item 4: --opt takes every name of timm's optimizer factory, and rangerlars

NEEDS_CUDA = ("bnb", "fused")  # bitsandbytes / NVIDIA apex builds: CUDA only


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3))


@pytest.mark.parametrize(
    "name", train.optimizer_names() + ["lookahead_radam", "lookahead_lamb", "lookahead_sgd"]
)
def test_each_optimizer_builds_and_steps(name, monkeypatch):
    # kron torch.compiles its helpers when it can (a minute on 2 CPU cores): eager here
    import timm.optim.kron

    monkeypatch.setattr(timm.optim.kron, "has_dynamo", False)
    if name in train.NO_SECOND_ORDER:
        with pytest.raises(argparse.ArgumentTypeError, match="second-order"):
            train.optimizer_name(name)
        return
    assert train.optimizer_name(name.upper()) == name
    model = tiny_model()
    args = argparse.Namespace(opt=name, lr=train.default_lr(name), momentum=0.9)
    if name.startswith(NEEDS_CUDA) and not torch.cuda.is_available():
        with pytest.raises(UserError, match=f"--opt {name}: .*CUDA"):
            train.make_optimizer(train.param_groups(model, 1e-4), args)
        return
    opt = train.make_optimizer(train.param_groups(model, 1e-4), args)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # ADOPT only initialises its second moment on the first step
        model(torch.randn(4, 1, 6, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.load_state_dict(opt.state_dict())  # resume needs it


def test_optimizer_families_and_default_lrs():
    assert train.opt_family("lars") == "sgd" and train.default_lr("lookahead_sgdp") == 0.2
    assert train.opt_family("radam") == "adam" and train.opt_family("lamb") == "adamw"
    assert train.default_lr("lion") == 2e-4 and train.default_lr("adan") == 2e-3
    assert finetune.grid_point(3, "lamb")["lr"] == finetune.grid_point(3, "adamw")["lr"]


def test_radam_lars_trust_ratio_hand_computed():
    # one 2x2 weight w = 3 (||w|| = 6): the step's length becomes lr * ||w|| = 0.1 * 6 = 0.6,
    # in RAdam's direction (first steps: the bias-corrected momentum, i.e. the gradient sign).
    w = nn.Parameter(torch.full((2, 2), 3.0))
    opt = train.RAdamLARS([w], lr=0.1)
    w.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    opt.step()
    d = w.detach() - 3.0
    assert d.norm().item() == pytest.approx(0.6, rel=1e-5)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.allclose(d / d.norm(), -g / g.norm(), atol=1e-6)
    # ||w|| = 20 is clipped to 10: the step is 0.1 * 10 = 1.0 long
    big = nn.Parameter(torch.full((2, 2), 10.0))
    opt = train.RAdamLARS([big], lr=0.1)
    big.grad = torch.ones(2, 2)
    opt.step()
    assert (big.detach() - 10.0).norm().item() == pytest.approx(1.0, rel=1e-5)


def test_rangerlars_is_lookahead_around_radam_lars():
    from timm.optim import Lookahead

    opt = train.rangerlars(train.param_groups(tiny_model(), 0.0), lr=1e-3)
    assert isinstance(opt, Lookahead) and isinstance(opt._base_optimizer, train.RAdamLARS)
    assert opt.param_groups[0]["lookahead_k"] == 6 and opt.param_groups[0]["lookahead_alpha"] == 0.5


@pytest.mark.parametrize("name", ["rangerlars", "lamb", "lookahead_radam"])
def test_optimizer_names_through_train_cli(tiny, tmp_path, name):
    train.main(["--data", str(tiny), "--out", str(tmp_path), "--name", name, "--opt", name,
                "--epochs", "1", "--batch-size", "32", *FAST])  # fmt: skip
    assert args_json(tmp_path / name)["opt"] == name
    assert (tmp_path / name / "best.pt").exists()


def test_unknown_optimizer_one_line_with_suggestion(tiny, tmp_path, capsys):
    err = one_line_exit_2(
        capsys, lambda: train.main(["--data", str(tiny), "--out", str(tmp_path), "--opt", "lamm"])
    )
    assert "--opt" in err and "lamb" in err
    err = one_line_exit_2(
        capsys, lambda: train.main(["--data", str(tiny), "--opt", "adahessian", "--out", "x"])
    )
    assert "second-order" in err


# ---------------------------------------------------------------------------
# Item 5: --grad-checkpointing through train.py


def test_grad_checkpointing_cli(tiny, tmp_path, capsys):
    train.main(["--data", str(tiny), "--out", str(tmp_path), "--name", "gc", "--epochs", "1",
                "--batch-size", "32", "--grad-checkpointing", *FAST])  # fmt: skip
    assert args_json(tmp_path / "gc")["grad_checkpointing"] is True
    bad = ["--data", str(tiny), "--out", str(tmp_path), "--name", "no", "--epochs", "1", *FAST,
           "--model", "dla46x_c", "--img-size", "32", "--grad-checkpointing"]  # fmt: skip
    err = one_line_exit_2(capsys, lambda: train.main(bad))
    assert "--grad-checkpointing: dla46x_c does not support it" in err
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------
# Item 7: --loss-fn and --old-aug (finetune.py), the seed's nested YAML and dotted overrides


@pytest.fixture(scope="module")
def start(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("start")
    train.main(["--data", str(tiny), "--out", str(out), "--name", "base", "--epochs", "1",
                "--batch-size", "32", *FAST])  # fmt: skip
    return out / "base" / "best.pt"


def test_oversample_rarest_hand_computed():
    y = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])
    idx = train.oversample_index(y, ["@rarest=2"], ["a", "b", "c"])
    # classes b (ids 3, 6) and c (4, 5) both have 2: the first, b, is repeated once more
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 3, 6]
    # a class that is absent from the training part is never "the rarest"
    assert train.oversample_index(y[:6], ["@rarest=2"], ["a", "b", "c", "d"]).tolist()[-1] == 3


def test_finetune_loss_fn_and_old_aug(tiny, start, tmp_path, capsys):
    base = ["--data", str(tiny), "--weights", str(start), "--out", str(tmp_path), "--i", "2",
            "--epochs", "1", "--batch-size", "32", *FAST]  # fmt: skip
    finetune.main([*base, "--name", "ce", "--loss-fn", "CrossEntropyLoss", "--old-aug", "True"])
    a = args_json(tmp_path / "ce" / "i2_s0")
    assert a["loss"] == "CrossEntropyLoss" and a["old_aug"] is True
    assert a["oversample"] == ["@rarest=2"]
    finetune.main([*base, "--name", "plain", "--old-aug", "false"])
    assert args_json(tmp_path / "plain" / "i2_s0")["oversample"] == []
    err = one_line_exit_2(capsys, lambda: finetune.main([*base, "--loss-fn", "NoSuchLoss"]))
    assert "NoSuchLoss" in err


SEED_YAML = """\
data:
  train:
    filenames: resources/dirty_mnist_2nd/*.png
    labels: {data}
  validation:
    labels: resources/val_dirty_mnist_2nd_answer.csv
  image_size: 16
model:
  model_name: smallnet_s
  pretrained: false
  in_chans: 1
  num_classes: 26
  drop_rate: 0.5
  drop_path_rate: 0.0
optim:
  opt: adamw
  lr: 1e-3
  betas: [0.9, 0.999]
  weight_decay: 1e-5
train:
  epochs: 30
  batch_size: 512
  accumulate_grad_batches: 1
  gradient_clip_val: 0.0
  gradient_checkpointing: true
  log_every_n_steps: 10
"""


def test_seed_nested_yaml_and_dotted_overrides(tiny, tmp_path, capsys):
    cfg = tmp_path / "seed.yaml"
    cfg.write_text(SEED_YAML.format(data=tiny))
    train.main(["--config", str(cfg), "train.epochs=1", "train.batch_size=32", "optim.lr=5e-3",
                "--out", str(tmp_path), "--name", "y", "--threads", "1", "--quiet"])  # fmt: skip
    a = args_json(tmp_path / "y")
    assert (a["data"], a["img_size"], a["model"], a["drop"]) == (str(tiny), 16, "smallnet_s", 0.5)
    assert (a["opt"], a["lr"], a["weight_decay"]) == ("adamw", 5e-3, 1e-5)  # override wins
    assert (a["epochs"], a["batch_size"], a["accum_steps"]) == (1, 32, 1)
    assert a["clip_grad"] is None and a["grad_checkpointing"] is True  # clip 0 = off
    err = capsys.readouterr().err
    assert "train.batch_size -> --batch-size" in err and "optim.lr -> --lr" in err
    assert re.search(r"ignored, no equivalent: .*optim\.betas", err)
    # explicit flags win over both the file and the dotted overrides
    a = train.build_parser()
    ns = train.parse_args(a, ["--config", str(cfg), "train.batch_size=8", "--batch-size", "4"])
    assert ns.batch_size == 4 and ns.epochs == 30


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["train.batch_sise=8"], "train.batch_sise"),
        (["optim.lr=fast"], "optim.lr"),
        (["train.batch_size=0"], "train.batch_size"),
    ],
)
def test_bad_dotted_override_one_line(tiny, tmp_path, capsys, extra, needle):
    err = one_line_exit_2(
        capsys, lambda: train.main(["--data", str(tiny), "--out", str(tmp_path), *extra])
    )
    assert needle in err
    assert not list(tmp_path.iterdir())


def test_unknown_nested_key_refused(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epoks: 3\n")
    err = one_line_exit_2(capsys, lambda: train.main(["--config", str(cfg)]))
    assert "train.epoks" in err


def test_dotted_value_of_an_option_is_left_alone():
    p = argparse.ArgumentParser()
    p.add_argument("--relabel")
    p.add_argument("--lr", type=float)
    ns = train.parse_args(p, ["--relabel", "a.b=c", "x.lr=0.5"])
    assert ns.relabel == "a.b=c" and ns.lr == 0.5


# ---------------------------------------------------------------------------
# Item 1: `finetune.py --i 3 --random-seed 7` alone; --data without --weights


def run_all_default(var: str) -> str:
    """A default of run_all.sh's non-FAST branch (d_x=...) or of its ${VAR:-...} settings."""
    text = (ROOT / "run_all.sh").read_text()
    branch = text.split("else", 1)[1].split("fi", 1)[0]
    m = re.search(rf"\b{var}=(\S*)", branch)
    if m:
        return m.group(1)
    return re.search(rf'{var}="\$\{{{var}:-([^}}]*)\}}"', text).group(1)


def test_default_start_is_what_run_all_makes():
    d = finetune.DEFAULT_START
    assert run_all_default("d_run") == d["run"]
    assert int(run_all_default("d_images")) == d["num_images"]
    assert int(run_all_default("d_test")) == d["num_test"]
    assert int(run_all_default("d_img")) == d["img_size"]
    assert int(run_all_default("d_epochs")) == d["epochs"]
    assert run_all_default("MODEL") == d["model"] and run_all_default("AUG") == d["aug"]
    assert int(run_all_default("SEED")) == d["seed"]


def test_finetune_with_nothing_else_makes_then_reuses_the_default_start(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    small = {"num_images": 260, "num_test": 52, "img_size": 16, "epochs": 1, "workers": 1}
    monkeypatch.setattr(finetune, "DEFAULT_START", {**finetune.DEFAULT_START, **small})
    finetune.main(["--i", "3", "--random-seed", "7", "--threads", "1", "--quiet"])
    out = capsys.readouterr().out
    root = Path("runs/default")
    assert "making runs/default/data" in out and "training runs/default/base/best.pt" in out
    ing = root / "ft" / "i3_s7" / "best.pt"
    assert ing.exists() and f"ingredient: {ing}" in out
    a = args_json(ing.parent)
    assert a["data"] == str(root / "data") and a["weights"] == str(root / "base" / "best.pt")
    assert a["aug"] == "crop" and a["same_split"] is True
    assert a["lr"] == finetune.grid_point(3)["lr"]
    mtime = (root / "base" / "best.pt").stat().st_mtime
    finetune.main(["--i", "4", "--random-seed", "7", "--threads", "1", "--quiet"])
    out = capsys.readouterr().out
    assert "reusing runs/default/data" in out and "reusing runs/default/base/best.pt" in out
    assert (root / "base" / "best.pt").stat().st_mtime == mtime
    assert (root / "ft" / "i4_s7" / "best.pt").exists()


def test_finetune_data_without_weights_refused(tiny, tmp_path, capsys):
    err = one_line_exit_2(
        capsys, lambda: finetune.main(["--data", str(tiny), "--out", str(tmp_path), "--i", "1"])
    )
    assert "without --weights" in err and "train.py" in err
    assert not list(tmp_path.iterdir())
