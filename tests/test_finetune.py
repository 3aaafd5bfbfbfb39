"""finetune.py on tiny data: the grid, overrides, pretrained starts, LP/LP-FT/WiSE, sweeps, DDP."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_patterns, write_idx

import data
import finetune
import models
import train
from common import UserError

FAST = ["--batch-size", "32", "--threads", "1", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict:
    """Tiny IDX data and a RotNet checkpoint trained on it by train.py (shared by the module)."""
    root = tmp_path_factory.mktemp("ft")
    x, y = make_patterns(150)
    write_idx(root / "tiny", "train", x[:120], y[:120])
    write_idx(root / "tiny", "t10k", x[120:], y[120:])
    args = ["--data", str(root / "tiny"), "--out", str(root / "runs"), "--name", "rot"]
    args += ["--model", "smallnet_s", "--task", "rotation", "--epochs", "1", "--lr", "0.05"]
    train.main([*args, *FAST, "--cache-dir", str(root / "cache")])
    return {"data": root / "tiny", "rot": root / "runs" / "rot" / "best.pt"}


def ft(start, tmp_path, *extra, weights=None, name="ft"):
    args = ["--data", str(start["data"]), "--out", str(tmp_path / "runs"), "--name", name]
    args += ["--weights", str(weights or start["rot"]), *FAST]
    return finetune.main([*args, *extra])


def sd_of(path) -> dict:
    return models.load_checkpoint(path)["state_dict"]


def backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# The grid and flag overrides


def test_grid_is_fixed_and_listed(capsys):
    pts = [finetune.grid_point(i) for i in range(finetune.GRID_SIZE)]
    assert len(pts) == 72 and pts == [finetune.grid_point(i) for i in range(72)]
    assert pts[0]["freeze_backbone"] and not any(p["freeze_backbone"] for p in pts[1:])
    assert all(0.005 <= p["lr"] <= 0.05 and 1 <= p["epochs"] <= 4 for p in pts[1:])
    assert 20 <= sum(p["smoothing"] > 0 for p in pts[1:]) <= 50
    assert all(0 <= p["smoothing"] <= 0.225 for p in pts)
    assert 20 <= sum(p["mix"] != "none" for p in pts[1:]) <= 50
    assert {p["aug"] for p in pts} == set(finetune.GRID_AUGS)
    adamw = finetune.grid_point(5, "adamw")
    assert 1e-5 <= adamw["lr"] <= 3e-3 and adamw["smoothing"] == pts[5]["smoothing"]
    assert finetune.grid_point(5, epoch_scale=4)["epochs"] == 4 * pts[5]["epochs"]
    finetune.main(["--list-grid"])
    out = capsys.readouterr().out
    assert len(re.findall(r"^\| \d+ ", out, re.M)) == 72 and "linear probe" in out


def test_grid_point_out_of_range_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        finetune.main(["--i", "72", "--data", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--i 72" in err and "0..71" in err and len(err.strip().splitlines()) == 1


def test_explicit_flags_override_grid(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"mix": "none"}))
    argv = ["--i", "5", "--lr", "0.2", "--epochs", "7", "--config", str(cfg)]
    explicit = finetune.explicit_dests(argv)
    assert {"lr", "epochs", "mix", "i"} <= explicit and "smoothing" not in explicit
    args = finetune.parse_args(finetune.build_parser(), argv)
    applied = finetune.apply_grid(args, explicit)
    grid = finetune.grid_point(5)
    assert (args.lr, args.epochs, args.mix) == (0.2, 7, "none")
    assert args.weight_decay == grid["weight_decay"] and args.aug == grid["aug"]
    assert "lr" not in applied and applied["aug"] == grid["aug"]
    # a flag given with its default value still counts as given
    args = finetune.parse_args(finetune.build_parser(), ["--i", "0", "--no-freeze-backbone"])
    finetune.apply_grid(args, finetune.explicit_dests(["--i", "0", "--no-freeze-backbone"]))
    assert args.freeze_backbone is False and args.aug == "none"


# ---------------------------------------------------------------------------
# Ingredients, pretrained starts, methods


def test_ingredients_share_split_differ_in_weights(start, tmp_path):
    ft(start, tmp_path, "--i", "1", "--random-seed", "0", "--epochs", "1", "--same-split")
    ft(start, tmp_path, "--i", "2", "--random-seed", "1", "--epochs", "1", "--layer-decay", "0.75")
    a, b = (
        models.load_checkpoint(tmp_path / "runs" / "ft" / d / "best.pt") for d in ("i1_s0", "i2_s1")
    )
    assert a["split"]["val_hash"] == b["split"]["val_hash"]
    assert a["split"] == models.load_checkpoint(start["rot"])["split"]
    assert not torch.equal(a["state_dict"]["head.weight"], b["state_dict"]["head.weight"])
    assert (a["args"]["grid_point"], a["args"]["random_seed"]) == (1, 0)
    assert (b["args"]["grid_point"], b["args"]["random_seed"]) == (2, 1)
    assert b["args"]["lr"] == finetune.grid_point(2)["lr"] and b["args"]["epochs"] == 1
    assert a["arch"] == "smallnet_s" and len(a["classes"]) == 10  # model taken from the start
    for f in ("best.pt", "last.pt", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "runs" / "ft" / "i1_s0" / f).exists()


def test_rotation_start_keeps_backbone_new_head(start, tmp_path, capsys):
    ft(start, tmp_path, "--i", "3", "--freeze-backbone", "--epochs", "1", "--mix", "none")
    out = capsys.readouterr().out
    assert "new classifier head" in out
    rot, got = sd_of(start["rot"]), sd_of(tmp_path / "runs" / "ft" / "i3_s0" / "best.pt")
    assert rot["head.weight"].shape[0] == 4 and got["head.weight"].shape[0] == 10
    params = [k for k in rot if "running" not in k and "num_batches" not in k and "head" not in k]
    assert params and all(torch.equal(rot[k], got[k]) for k in params)


def test_plain_state_dict_and_safetensors_starts(start, tmp_path, capsys):
    from safetensors.torch import save_file

    sd = sd_of(start["rot"])
    torch.save(sd, tmp_path / "plain.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for i, w in ((1, "plain.pth"), (2, "w.safetensors")):
        ft(start, tmp_path, "--i", str(i), "--model", "smallnet_s", "--freeze-backbone",
           "--epochs", "1", weights=tmp_path / w)  # fmt: skip
        got = sd_of(tmp_path / "runs" / "ft" / f"i{i}_s0" / "best.pt")
        assert torch.equal(got["stem.0.weight"], sd["stem.0.weight"])
    # another architecture: one clear line naming the file and the keys, exit 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ft(start, tmp_path, "--model", "smallnet", "--epochs", "1", weights=tmp_path / "plain.pth")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "plain.pth" in err and "shape" in err
    with pytest.raises(SystemExit) as e:
        ft(start, tmp_path, "--model", "smallnet", "--epochs", "1")
    assert e.value.code == 2 and "a smallnet_s checkpoint" in capsys.readouterr().err


def test_freeze_backbone_keeps_backbone_and_bn_stats(start, tmp_path):
    ft(start, tmp_path, "--i", "0", "--epochs", "1", "--lr", "0.05")  # point 0: linear probe
    ck = models.load_checkpoint(tmp_path / "runs" / "ft" / "i0_s0" / "last.pt")
    assert ck["args"]["freeze_backbone"] is True
    assert same(backbone(ck["state_dict"]), backbone(sd_of(start["rot"])))
    first = sd_of(tmp_path / "runs" / "ft" / "i0_s0" / "best.pt")
    assert ck["state_dict"]["head.weight"].shape == (10, 128)
    assert len(json.loads((tmp_path / "runs" / "ft" / "i0_s0" / "summary.json").read_text()))
    assert torch.equal(first["stem.0.weight"], ck["state_dict"]["stem.0.weight"])


def test_lp_ft_unfreezes_after_k_epochs(start, tmp_path, monkeypatch):
    snaps = []
    real = finetune.fit_hooks

    def spy(args, keep):
        hooks = real(args, keep)
        inner = hooks.epoch_start

        def epoch_start(epoch, model):
            snaps.append({k: v.clone() for k, v in backbone(model.state_dict()).items()})
            inner(epoch, model)

        hooks.epoch_start = epoch_start
        return hooks

    monkeypatch.setattr(finetune, "fit_hooks", spy)
    ft(start, tmp_path, "--i", "4", "--epochs", "2", "--lp-epochs", "1", "--lr", "0.05")
    final = backbone(sd_of(tmp_path / "runs" / "ft" / "i4_s0" / "last.pt"))
    rot = backbone(sd_of(start["rot"]))
    assert len(snaps) == 2 and same(snaps[0], rot) and same(snaps[1], rot)
    assert not torch.equal(final["stem.0.weight"], rot["stem.0.weight"])


def test_wise_alpha_zero_is_the_start_backbone(start, tmp_path):
    s = ft(start, tmp_path, "--i", "4", "--epochs", "1", "--lr", "0.05", "--wise-alpha", "0")
    d = tmp_path / "runs" / "ft" / "i4_s0"
    best, tuned, rot = sd_of(d / "best.pt"), sd_of(d / "best_finetuned.pt"), sd_of(start["rot"])
    floats = [k for k, v in backbone(rot).items() if v.is_floating_point()]
    assert all(torch.equal(best[k], rot[k]) for k in floats)
    assert torch.equal(best["head.weight"], tuned["head.weight"])  # start had no 10-class head
    assert not torch.equal(tuned["stem.0.weight"], rot["stem.0.weight"])
    ck = models.load_checkpoint(d / "best.pt")
    assert ck["metrics"]["wise_alpha"] == 0 and "finetuned_val_acc" in ck["metrics"]
    assert s["wise_val_acc"] == ck["metrics"]["val_acc"]
    assert json.loads((d / "summary.json").read_text())["wise_alpha"] == 0
    half = finetune.wise_ft({"w": torch.zeros(2)}, {"w": torch.ones(2), "n": torch.tensor(3)}, 0.5)
    assert torch.equal(half["w"], torch.full((2,), 0.5)) and half["n"] == 3


def test_layer_decay_groups_smallnet():
    m = models.create_model("smallnet_s", 3, img_size=16)
    finetune.set_frozen(m, True)  # LP-FT: frozen parameters still get their groups
    groups = finetune.layer_decay_groups(m, 1e-3, 0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(m.head.weight)] == 1.0 and scale[id(m.stem[0].weight)] == 0.5**4
    assert scale[id(m.blocks[2].conv1.weight)] == 0.5
    assert all(g["weight_decay"] == 0 for g in groups if g["params"][0].ndim == 1)
    assert not m.stem[0].weight.requires_grad  # restored


# ---------------------------------------------------------------------------
# Competition tools and sweeps


def test_skip_existing_and_resume(start, tmp_path, capsys):
    ft(start, tmp_path, "--i", "6", "--epochs", "1", "--lr", "0.05", "--oversample", "1=2")
    d = tmp_path / "runs" / "ft" / "i6_s0"
    log = (d / "metrics.jsonl").read_text()
    capsys.readouterr()
    ft(start, tmp_path, "--i", "6", "--epochs", "1", "--skip-existing")
    assert "skip:" in capsys.readouterr().out and (d / "metrics.jsonl").read_text() == log
    (d / "summary.json").unlink()  # interrupted sweep: finishes from last.pt
    ft(start, tmp_path, "--i", "6", "--epochs", "1", "--lr", "0.05", "--oversample", "1=2",
       "--skip-existing")  # fmt: skip
    assert (d / "summary.json").exists() and (d / "metrics.jsonl").read_text() == log


def test_same_split_mismatch_exits_2(start, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ft(start, tmp_path, "--same-split", "--split-seed", "5", "--epochs", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "split" in err and "--same-split" in err


def test_kfold_indices_stratified_grouped():
    y = np.arange(60) % 3
    folds = [data.kfold_indices(y, 5, f, seed=1) for f in range(5)]
    vals = np.concatenate([v for _, v in folds])
    assert sorted(vals) == list(range(60))
    assert all(np.bincount(y[v], minlength=3).tolist() == [4, 4, 4] for _, v in folds)
    assert all(len(np.intersect1d(t, v)) == 0 and len(t) + len(v) == 60 for t, v in folds)
    groups = [str(i // 3) for i in range(60)]  # 20 people, 3 images each
    tr, va = data.kfold_indices(y, 4, 2, seed=0, groups=groups)
    assert not {groups[i] for i in tr} & {groups[i] for i in va} and len(va) == 15
    with pytest.raises(UserError, match="0..3"):
        data.kfold_indices(y, 4, 4)


def test_kfold_and_relabel_in_load_data(start, tmp_path):
    argv = ["--data", str(start["data"]), "--kfold", "4", "--fold", "1"]
    args = finetune.build_parser().parse_args(argv)
    tr, va, rec = train.load_data(args)
    assert len(va) == 30 and len(tr) == 90 and (rec["kfold"], rec["fold"]) == (4, 1)
    assert rec["val_hash"] == data.ids_hash(va.ids) and not set(tr.ids) & set(va.ids)
    args = finetune.build_parser().parse_args(["--data", str(start["data"])])
    tr0, va0, _ = train.load_data(args)
    csv = tmp_path / "fix.csv"
    a, b = tr0.ids[0], tr0.ids[1]
    new_a = (int(tr0.labels[0]) + 1) % 3
    csv.write_text(f"id,new_label\n{a},{new_a}\n{b},{tr0.classes[2]}\n{va0.ids[0]},0\n")
    args.relabel = str(csv)
    tr1, va1, _ = train.load_data(args)
    assert int(tr1.labels[0]) == new_a and int(tr1.labels[1]) == 2
    assert torch.equal(va1.labels, va0.labels) and torch.equal(tr1.labels[2:], tr0.labels[2:])
    csv.write_text("id,new_label\nnope,1\n")
    with pytest.raises(UserError, match="'nope' is not in the data set"):
        train.load_data(args)


# ---------------------------------------------------------------------------
# DDP on CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_agree_and_rank0_writes(start, tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd += [str(ROOT / "finetune.py"), "--data", str(start["data"]), "--out", str(out)]
    cmd += ["--weights", str(start["rot"]), "--name", "ddp", "--i", "5", "--epochs", "2"]
    cmd += ["--lp-epochs", "1", "--lr", "0.05", "--batch-size", "16", "--report-ranks"]
    cmd += ["--threads", "1", "--quiet", "--device", "cpu"]
    env = {**os.environ, "IMGCLS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    hashes = dict(re.findall(r"rank (\d) final ([0-9a-f]{16})", r.stdout))
    assert set(hashes) == {"0", "1"} and hashes["0"] == hashes["1"], r.stdout
    d = out / "ddp" / "i5_s0"
    assert finetune.state_hash(sd_of(d / "last.pt")) == hashes["0"]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(
        ["args.json", "best.pt", "last.pt", "metrics.jsonl", "summary.csv", "summary.json"]
    )
    assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    assert r.stdout.count("epoch   1/2") == 1  # only rank 0 reports epochs
    assert Path(d / "args.json").exists()


# ---------------------------------------------------------------------------
# Issue 12/13: checked flags, verified --skip-existing, explicit hooks, one lock per ingredient


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--layer-decay", "0"], "--layer-decay"),
        (["--wise-alpha", "1.5"], "--wise-alpha"),
        (["--epoch-scale", "0"], "--epoch-scale"),
        (["--lp-epochs", "-1"], "--lp-epochs"),
        (["--lp-epochs", "3", "--epochs", "3"], "--lp-epochs 3"),
        (["--skip-existing", "--overwrite"], "--skip-existing and --overwrite"),
        (["--i", "-1"], "--i"),
        (["--epochs", "0"], "--epochs"),
    ],
)
def test_bad_finetune_flags_exit_2(start, tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        ft(start, tmp_path, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "runs").exists()


def test_skip_existing_redoes_a_truncated_best_pt(start, tmp_path, capsys):
    flags = ["--i", "7", "--epochs", "1", "--lr", "0.05", "--skip-existing"]
    ft(start, tmp_path, *flags)
    d = tmp_path / "runs" / "ft" / "i7_s0"
    best = d / "best.pt"
    best.write_bytes(best.read_bytes()[:200])  # a copy cut short
    capsys.readouterr()
    ft(start, tmp_path, *flags)
    out = capsys.readouterr().out
    assert "redo:" in out and "skip:" not in out
    models.load_checkpoint(best)  # whole again
    assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [1]
    ft(start, tmp_path, *flags)
    assert "skip:" in capsys.readouterr().out


def test_ingredient_directory_is_locked(start, tmp_path, capsys):
    import subprocess

    lock = tmp_path / "runs" / "ft" / ".i1_s0.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{holder.pid}\n")
        with pytest.raises(SystemExit) as e:
            ft(start, tmp_path, "--i", "1", "--epochs", "1")
        assert e.value.code == 2 and f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_fit_hooks_are_explicit(start):
    with pytest.raises(TypeError):
        train.FitHooks(epoch_strat=lambda e, m: None)  # a misspelt hook is an error, not ignored
    args = finetune.parse_args(finetune.build_parser(), ["--i", "3", "--lp-epochs", "1"])
    args.layer_decay = 0.5
    hooks = finetune.fit_hooks(args, {"grid": {"lr": 0.01}})
    assert hooks.find_unused_parameters and hooks.record == {
        "grid_point": 3,
        "grid_values": {"lr": 0.01},
    }
    m = models.create_model("smallnet_s", 3, img_size=16)
    assert {g["lr_scale"] for g in hooks.param_groups(m)} == {0.5**k for k in range(5)}
    assert finetune.grid_point(0)["lr"] == train.DEFAULT_LR["sgd"]
    assert tuple(finetune.grid_point(9)) == finetune.GRID_KEYS


def test_ema_stays_off_for_ingredients_unless_given():
    assert train.build_parser().parse_args([]).ema == "auto"  # train.py: on by default
    p = finetune.build_parser()
    assert p.parse_args([]).ema is None
    assert p.parse_args(["--ema", "0.99"]).ema == 0.99
