"""soup.py: exact averaging, scripted greedy soups, BN re-estimation, refusals, CLI end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_patterns, write_idx
from torch import nn

import data
import models
import soup
import train

# ---------------------------------------------------------------------------
# Pure numerics


def test_average_is_exact_with_weights_and_dtypes():
    a = {
        "w": torch.tensor([1.0, 2.0, 3.0]),
        "h": torch.tensor([1.0, 2.0], dtype=torch.float16),
        "d": torch.tensor([0.1], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    b = {
        "w": torch.tensor([3.0, 4.0, 5.0]),
        "h": torch.tensor([2.0, 4.0], dtype=torch.float16),
        "d": torch.tensor([0.2], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(99),
    }
    c = {k: v * 4 if v.is_floating_point() else v + 1 for k, v in a.items()}
    avg = soup.average_state_dicts(iter([a, b, c]))  # a generator is enough: streamed
    assert {k: v.dtype for k, v in avg.items()} == {k: v.dtype for k, v in a.items()}
    torch.testing.assert_close(avg["w"], torch.tensor([8 / 3, 14 / 3, 20 / 3]))
    exp_h = (
        (torch.tensor([1.0, 2.0]) + torch.tensor([2.0, 4.0]) + torch.tensor([4.0, 8.0])) / 3
    ).half()
    assert torch.equal(avg["h"], exp_h)
    torch.testing.assert_close(
        avg["d"], torch.tensor([0.7 / 3], dtype=torch.float64), rtol=0, atol=1e-15
    )
    # integer buffers (models.interpolate_state): those of the last state dict with a weight
    assert avg["bn.num_batches_tracked"].item() == 8

    wavg = soup.average_state_dicts([a, b], weights=[1, 3])
    torch.testing.assert_close(wavg["w"], torch.tensor([2.5, 3.5, 4.5]))
    assert torch.equal(wavg["h"], torch.tensor([1.75, 3.5], dtype=torch.float16))
    zero_first = soup.average_state_dicts([a, b], weights=[0, 2])
    assert torch.equal(zero_first["w"], b["w"]) and zero_first["bn.num_batches_tracked"] == 99
    zero_last = soup.average_state_dicts([a, b], weights=[2, 0])
    assert torch.equal(zero_last["w"], a["w"]) and zero_last["bn.num_batches_tracked"] == 7
    f64 = soup.average_state_dicts([a, b], acc_dtype=torch.float64)
    assert f64["w"].dtype == torch.float32 and torch.equal(f64["w"], torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0, 3.0]))  # inputs untouched


def test_average_refuses_bad_input():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="keys"):
        soup.average_state_dicts([a, {"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="shape"):
        soup.average_state_dicts([a, {"w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="weights"):
        soup.average_state_dicts([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="no state dicts"):
        soup.average_state_dicts([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uniform_of_copies_equals_the_model(dtype):
    torch.manual_seed(0)
    model = models.create_model("smallnet_s", 3, in_chans=1, img_size=16).to(dtype)
    sd = model.state_dict()
    avg = soup.average_state_dicts(dict(sd) for _ in range(5))
    assert avg.keys() == sd.keys()
    assert all(torch.equal(avg[k], sd[k]) and avg[k].dtype == sd[k].dtype for k in sd)


def _scalar_sds(values):
    return {
        f"m{i}": {"w": torch.tensor([float(v)]), "n": torch.tensor(i)} for i, v in enumerate(values)
    }


@pytest.mark.parametrize(
    "strict,kept", [(False, ["m0", "m1", "m3", "m4"]), (True, ["m0", "m1", "m4"])]
)
def test_greedy_picks_the_scripted_subset(strict, kept):
    sds = _scalar_sds([1, 2, 3, 4, 5])
    scripted = iter([0.91, 0.89, 0.91, 0.95])  # candidate soups, in call order; the start is 0.90
    tried = []

    def evaluate(sd):
        tried.append(sd["w"].item())
        return {"acc": next(scripted), "loss": 0.0}

    steps_seen = []
    sd, got, steps = soup.greedy_soup(
        list(sds),
        evaluate,
        start_metrics={"acc": 0.90, "loss": 0.0},
        load_fn=lambda p: sds[p],
        keep=soup.keep_rule("acc", strict),
        on_step=steps_seen.append,
    )
    assert got == kept
    vals = [sds[p]["w"].item() for p in kept]
    assert sd["w"].item() == pytest.approx(sum(vals) / len(vals))
    # integer buffers follow models.interpolate_state: the last kept ingredient's
    assert sd["n"].item() == int(kept[-1][1:]) and sd["w"].dtype == torch.float32
    # each candidate is the running uniform average of the kept ones plus the new one
    assert tried[:2] == pytest.approx([1.5, 2.0])
    assert [s["accepted"] for s in steps] == [True] + [p in kept for p in list(sds)[1:]]
    assert steps == steps_seen and steps[0]["candidate"] == "m0"
    assert steps[-1]["soup_val_acc"] == 0.95 and steps[2]["val_acc"] == 0.89
    assert sds["m1"]["w"].item() == 2.0  # ingredients untouched


def test_greedy_evaluates_the_start_when_not_given():
    sds = _scalar_sds([1, 3])
    sd, kept, steps = soup.greedy_soup(
        ["m0", "m1"], lambda sd: {"acc": -sd["w"].item()}, load_fn=lambda p: sds[p]
    )
    assert kept == ["m0"] and sd["w"].item() == 1.0 and steps[0]["val_acc"] == -1.0


def test_greedy_order():
    metrics = [
        {"acc": 0.8, "loss": 0.5},
        {"acc": 0.9, "loss": 0.4},
        {"acc": 0.9, "loss": 0.3},
        {"acc": 0.7, "loss": 0.1},
    ]
    assert soup.greedy_order(metrics) == [2, 1, 0, 3]  # ties: lower loss first
    r = soup.greedy_order(metrics, "random", seed=3)
    assert sorted(r) == [0, 1, 2, 3] and r == soup.greedy_order(metrics, "random", seed=3)


def test_recalibrate_bn_is_the_plain_average_over_batches():
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Dropout(0.5))
    nn.init.ones_(model[0].weight)
    model[1].running_mean.fill_(5.0)
    model.eval()
    images = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8)
    n_bn = soup.recalibrate_bn(
        model, images, [0.0], [1.0], replace(train.CPU_FP32, eval_batch_size=4)
    )
    x = images.float() / 255
    assert n_bn == 1 and not model[1].training and model[1].momentum == 0.1  # restored
    assert model[1].running_mean.item() == pytest.approx(x.mean().item(), abs=1e-6)
    var = sum(x[i : i + 4].var(unbiased=True).item() for i in (0, 4, 8)) / 3
    assert model[1].running_var.item() == pytest.approx(var, rel=1e-5)
    assert model[1].num_batches_tracked.item() == 3


def test_expand_ingredients(tmp_path):
    for name in ("i10", "i2", "i1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.pt").write_bytes(b"x")
    got = soup.expand_ingredients([f"{tmp_path}/*/best.pt", str(tmp_path / "i2" / "best.pt")])
    assert [Path(p).parent.name for p in got] == ["i1", "i2", "i10"]  # natural order, no dups
    with pytest.raises(soup.UserError, match="matched no files"):
        soup.expand_ingredients([f"{tmp_path}/*/last.pt"])


# ---------------------------------------------------------------------------
# CLI on tiny ingredients: one short training run + perturbed copies (same start)


@pytest.fixture(scope="module")
def ing(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    x, y = make_patterns(150)
    write_idx(root / "tiny", "train", x[:120], y[:120])
    write_idx(root / "tiny", "t10k", x[120:], y[120:])
    cache = root / "cache"
    train.main(
        ["--data", str(root / "tiny"), "--out", str(root / "runs"), "--name", "base"]
        + ["--model", "smallnet_s", "--batch-size", "32", "--epochs", "2", "--lr", "0.05"]
        + ["--val-ratio", "0.25", "--quiet", "--threads", "1", "--cache-dir", str(cache)]
    )
    ck = models.load_checkpoint(root / "runs" / "base" / "best.pt")
    meta = {k: v for k, v in ck.items() if k not in ("state_dict", "format", "created", "torch")}
    paths = []
    for k in range(4):
        g = torch.Generator().manual_seed(k)
        sd = {
            n: v + 0.05 * k * v.std() * torch.randn(v.shape, generator=g)
            if v.is_floating_point() and v.numel() > 1 and "running" not in n
            else v.clone()
            for n, v in ck["state_dict"].items()
        }
        args = {**meta["args"], "i": k, "random_seed": k, "weights": "start.pt"}
        path = root / "ft" / f"i{k}_s{k}" / "best.pt"
        models.save_checkpoint(path, sd, {**meta, "args": args})
        paths.append(path)
    return SimpleNamespace(root=root, data=root / "tiny", cache=cache, paths=paths, meta=meta)


def run_soup(ing, out, *extra, ingredients=None):
    pats = ingredients or [str(ing.root / "ft" / "*" / "best.pt")]
    argv = ["--ingredients", *map(str, pats), "--out", str(out), "--quiet", "--threads", "1"]
    argv += ["--cache-dir", str(ing.cache), "--eval-batch-size", "16", *extra]
    return soup.main(argv)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_end_to_end(ing, tmp_path, capsys):
    out = tmp_path / "soup"
    modes = ["--eval-individual", "--uniform", "--greedy", "--plot"]
    summary = run_soup(ing, out, *modes, "--learned", "--learned-steps", "2")
    for f in ("individual.jsonl", "greedy.jsonl", "uniform_soup.pt", "greedy_soup.pt"):
        assert (out / f).exists(), f
    assert (out / "learned_soup.pt").exists() and (out / "soup.png").stat().st_size > 1000
    ind = rows(out / "individual.jsonl")
    assert [r["i"] for r in ind] == [0, 1, 2, 3] and [r["seed"] for r in ind] == [0, 1, 2, 3]
    assert all(0 <= r["val_acc"] <= 1 and r["val_loss"] > 0 for r in ind)
    assert all(r["grid"] == {} for r in ind)  # the ingredients differ only in i and seed
    # the unperturbed copy scores exactly what training recorded for it (same data, same eval)
    assert ind[0]["val_acc"] == pytest.approx(ind[0]["recorded_val_acc"])

    steps = rows(out / "greedy.jsonl")
    assert len(steps) == 4 and steps[0]["accepted"] and steps[0]["step"] == 0
    assert {"candidate", "accepted", "soup_val_acc", "val_acc", "n_kept"} <= set(steps[1])
    model, ck = models.load_model(out / "greedy_soup.pt")
    assert ck["soup"]["method"] == "greedy" and ck["classes"] == ing.meta["classes"]
    kept = ck["soup"]["ingredients"]
    assert len(kept) == steps[-1]["n_kept"] and sum(ck["soup"]["weights"]) == pytest.approx(1)
    assert (
        kept[0] == steps[0]["candidate"] and ck["metrics"]["val_acc"] == steps[-1]["soup_val_acc"]
    )
    # the greedy soup is the uniform average of the ingredients it kept
    exp = soup.average_state_dicts(models.load_state_dict_file(p) for p in kept)
    for k, v in ck["state_dict"].items():
        torch.testing.assert_close(v, exp[k])

    uni = models.load_checkpoint(out / "uniform_soup.pt")
    exp = soup.average_state_dicts(models.load_state_dict_file(p) for p in ing.paths)
    assert all(torch.equal(uni["state_dict"][k], exp[k]) for k in exp)
    assert uni["soup"]["ingredients"] == [str(p) for p in ing.paths]
    lrn = models.load_checkpoint(out / "learned_soup.pt")
    assert sum(lrn["soup"]["weights"]) == pytest.approx(1) and len(lrn["soup"]["weights"]) == 4

    s = json.loads((out / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    assert s["greedy"]["n_kept"] == len(kept) and "delta_vs_best" in s["uniform"]
    assert s["evaluations"] == 4 + 1 + 3 + 1  # ingredients, uniform, greedy candidates, learned
    text = capsys.readouterr().out
    assert "best ingredient" in text and "greedy soup" in text and "vs best" in text
    with pytest.raises(SystemExit) as e:  # a finished soup is not overwritten by accident
        run_soup(ing, out, "--uniform")
    assert e.value.code == 2
    run_soup(ing, out, "--uniform", "--overwrite")
    assert not (out / "greedy_soup.pt").exists()


def test_cli_bn_recalib_changes_bn_stats(ing, tmp_path):
    run_soup(ing, tmp_path / "plain", "--uniform")
    extra = ["--greedy-order", "random", "--metric", "f1", "--batch-size", "16"]
    run_soup(ing, tmp_path / "bn", "--uniform", "--greedy", "--bn-recalib", "2", *extra)
    plain = models.load_checkpoint(tmp_path / "plain" / "uniform_soup.pt")["state_dict"]
    bn = models.load_checkpoint(tmp_path / "bn" / "uniform_soup.pt")
    assert bn["soup"]["bn_recalib"] == 2
    sd = bn["state_dict"]
    key = "stem.1.running_mean"
    assert not torch.allclose(sd[key], plain[key])
    assert sd["stem.1.num_batches_tracked"].item() == 2
    assert torch.equal(sd["stem.0.weight"], plain["stem.0.weight"])  # weights untouched
    # the saved soup (with its re-estimated stats) scores what it records
    val, _ = data.load_split(
        ing.data, "val", how=data.SplitSpec(val_ratio=0.25), opts=data.Opts(cache_dir=ing.cache)
    )
    model, _ = models.load_model(tmp_path / "bn" / "uniform_soup.pt")
    m = train.evaluate(model, val.images, val.labels, bn)
    assert m["acc"] == pytest.approx(bn["metrics"]["val_acc"])
    steps = rows(tmp_path / "bn" / "greedy.jsonl")
    assert all("val_f1" in r and "soup_val_f1" in r for r in steps)
    greedy = models.load_checkpoint(tmp_path / "bn" / "greedy_soup.pt")["soup"]
    assert sorted(greedy["order"]) == sorted(map(str, ing.paths))


def _variant(ing, tmp_path, name, **changes):
    ck = models.load_checkpoint(ing.paths[1])
    meta = {k: v for k, v in ck.items() if k not in ("state_dict", "format", "created", "torch")}
    sd = ck["state_dict"]
    if changes.pop("arch", None):
        m = models.create_model("smallnet", 3, in_chans=1, img_size=16)
        sd, meta["arch"] = m.state_dict(), "smallnet"
    meta.update(changes)
    path = tmp_path / name / "best.pt"
    models.save_checkpoint(path, sd, meta)
    return path


@pytest.mark.parametrize(
    "change,words",
    [
        ({"arch": True}, "architecture"),
        ({"split": {"seed": 0, "val_ratio": 0.25, "val_hash": "0" * 16}}, "different splits"),
        ({"classes": ["a", "b", "c"]}, "classes"),
    ],
)
def test_cli_refuses_mismatched_ingredients(ing, tmp_path, capsys, change, words):
    bad = _variant(ing, tmp_path, "bad", **change)
    with pytest.raises(SystemExit) as e:
        run_soup(ing, tmp_path / "o", "--uniform", ingredients=[ing.paths[0], bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert str(ing.paths[0]) in err and str(bad) in err
    assert not (tmp_path / "o" / "uniform_soup.pt").exists()


def test_cli_data_changed_and_other_holdout(ing, tmp_path, capsys):
    split = {"seed": 0, "val_ratio": 0.25, "val_hash": "f" * 16}
    a = _variant(ing, tmp_path, "a", split=split)
    b = _variant(ing, tmp_path, "b", split=split, args={**ing.meta["args"], "weights": "other.pt"})
    with pytest.raises(SystemExit) as e:
        run_soup(ing, tmp_path / "o", "--uniform", ingredients=[a, b])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "data changed" in err and "warning" in err and "different weights" in err
    # another labelled set: the data set's own test part
    s = run_soup(
        ing,
        tmp_path / "o",
        "--eval-individual",
        "--holdout",
        str(ing.data),
        "--holdout-split",
        "test",
        ingredients=[a, b],
    )
    assert "30 images" in s["holdout"] and len(rows(tmp_path / "o" / "individual.jsonl")) == 2


def test_cli_needs_a_mode(ing, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_soup(ing, tmp_path / "o")
    assert e.value.code == 2 and "nothing to do" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Guarantees: one output transaction, outputs never on inputs, the soup's own training args


def _exit2(fn, capsys):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err, err
    return err[-1]


def test_seed_flags_and_greedy_records_the_kept_ingredients_args(ing, tmp_path):
    seed = next(s for s in range(50) if soup.greedy_order([{}] * 4, "random", seed=s)[0] != 0)
    order = soup.greedy_order([{}] * 4, "random", seed=seed)
    out = tmp_path / "s"
    run_soup(ing, out, "--eval-individual-models", "--uniform-soup", "--greedy-soup", "--plot",
             "--greedy-order", "random", "--seed", str(seed), "--metric", "macro-f1")  # fmt: skip
    assert all((out / f).exists() for f in ("individual.jsonl", "uniform_soup.pt", "soup.png"))
    ck = models.load_checkpoint(out / "greedy_soup.pt")
    kept = ck["soup"]["ingredients"]
    assert kept[0] == str(ing.paths[order[0]])  # the start: not the first file (i0)
    assert ck["args"]["i"] == order[0] != 0
    assert [a["i"] for a in ck["soup"]["ingredient_args"]] == [
        int(Path(p).parent.name[1]) for p in kept
    ]
    uni = models.load_checkpoint(out / "uniform_soup.pt")
    assert [a["i"] for a in uni["soup"]["ingredient_args"]] == [0, 1, 2, 3]


def test_soup_meta_keeps_only_the_augmentations_all_ingredients_had(ing):
    base = soup.read_ingredient(ing.paths[0])
    a = base._replace(meta=replace(base.meta, args={**base.meta.args, "aug": "flip,rot90", "i": 2}))
    b = base._replace(meta=replace(base.meta, args={**base.meta.args, "aug": ["rot90"], "i": 4}))
    args = soup.build_parser().parse_args(["--ingredients", "x"])
    meta = soup.soup_meta([a, b], {"method": "greedy"}, {"acc": 0.5, "loss": 1.0}, args)
    assert meta.args["aug"] == "rot90" and meta.args["i"] == 2
    assert (
        meta.metrics == {"val_acc": 0.5, "val_loss": 1.0}
        and meta.extra["soup"]["method"] == "greedy"
    )
    c = b._replace(meta=replace(b.meta, args={**b.meta.args, "aug": "flip"}))
    assert soup.soup_meta([a, c], {}, {}, args).args["aug"] == "flip"
    d = b._replace(meta=replace(b.meta, args={**b.meta.args, "aug": "crop"}))
    assert soup.soup_meta([a, d], {}, {}, args).args["aug"] == "none"


def test_mean_std_check_has_a_tolerance(ing):
    base = soup.read_ingredient(ing.paths[0])
    near = base._replace(meta=replace(base.meta, mean=[m + 1e-9 for m in base.meta.mean]))
    far = base._replace(meta=replace(base.meta, std=[s + 0.05 for s in base.meta.std]))
    assert not [w for w in soup.start_warnings([base, near]) if "mean/std" in w]
    assert any("mean/std" in w for w in soup.start_warnings([base, far]))


def test_failing_plot_leaves_the_previous_soup(ing, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    run_soup(ing, out, "--uniform", "--greedy")
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def broken(*a, **k):
        raise soup.UserError("soup.png: cannot write (disk full?)")

    monkeypatch.setattr(soup, "plot_soup", broken)
    err = _exit2(lambda: run_soup(ing, out, "--uniform", "--plot", "--overwrite"), capsys)
    assert "soup.png" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing replaced
    fresh = tmp_path / "fresh"
    _exit2(lambda: run_soup(ing, fresh, "--uniform", "--plot"), capsys)
    assert not fresh.exists() or not [f for f in fresh.iterdir() if not f.name.startswith(".")]


def test_out_holding_an_ingredient_is_refused(ing, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    inside = out / "uniform_soup.pt"
    inside.write_bytes(ing.paths[1].read_bytes())
    err = _exit2(
        lambda: run_soup(ing, out, "--uniform", ingredients=[ing.paths[0], inside]), capsys
    )
    assert "is the input --ingredients" in err
    assert inside.read_bytes() == ing.paths[1].read_bytes()


@pytest.mark.parametrize(
    "flag,value,words",
    [
        ("--bn-recalib", "-1", ">= 0"),
        ("--batch-size", "1", ">= 2"),
        ("--learned-lr", "0", "> 0"),
        ("--learned-steps", "0", ">= 1"),
        ("--eval-batch-size", "nan", "not a whole number"),
        ("--metric", "auc", "accuracy"),
        ("--seed", "-1", "out of range"),
    ],
)
def test_bad_numbers_are_one_line_errors(tmp_path, capsys, flag, value, words):
    argv = ["--ingredients", "x.pt", "--uniform", flag, value, "--out", str(tmp_path / "o")]
    err = _exit2(lambda: soup.main(argv), capsys)
    assert flag in err and words in err


def test_directory_as_ingredient_says_so(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    argv = ["--ingredients", str(tmp_path / "run"), "--uniform", "--out", str(tmp_path / "o")]
    assert "is a directory" in _exit2(lambda: soup.main(argv), capsys)


def test_second_soup_on_the_same_out_is_refused(ing, tmp_path, capsys):
    out = tmp_path / "s"
    with soup.DirLock(out):  # another command holds --out (here: this process)
        err = _exit2(lambda: run_soup(ing, out, "--uniform"), capsys)
    assert "in use by another command" in err and not (out / "uniform_soup.pt").exists()
    out.mkdir()
    (out / ".uniform_soup.pt.x1y2.tmp.pt").write_bytes(b"half")  # left by a killed soup
    run_soup(ing, out, "--uniform")  # released: runs, and clears the dead temp file
    assert (out / "uniform_soup.pt").exists() and not list(out.glob(".*tmp*"))


def test_individual_rows_show_the_args_that_differ(ing):
    base = soup.read_ingredient(ing.paths[0])
    a = base._replace(meta=replace(base.meta, args={**base.meta.args, "lr": 0.1, "name": "a"}))
    b = base._replace(meta=replace(base.meta, args={**base.meta.args, "lr": 0.2, "name": "b"}))
    assert soup.varying_args([a, b]) == ["lr"]
    assert soup.individual_row(b, {"acc": 1.0}, ["lr"])["grid"] == {"lr": 0.2}


def test_kill_during_overwrite_leaves_the_previous_soup(ing, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    run_soup(ing, out, "--uniform", "--greedy")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    argv = [sys.executable, str(Path(soup.__file__)), "--ingredients", *map(str, ing.paths)]
    argv += ["--out", str(out), "--uniform", "--eval-individual", "--overwrite", "--quiet"]
    argv += ["--threads", "1", "--cache-dir", str(ing.cache), "--eval-batch-size", "16"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and not list(out.glob(".*.tmp*")) and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # the new outputs are being staged: none committed yet
    assert proc.wait() == -signal.SIGKILL
    assert {f.name: f.read_bytes() for f in out.iterdir() if not f.name.startswith(".")} == before
    run_soup(ing, out, "--uniform", "--overwrite")  # the next run clears the dead temp files
    assert not list(out.glob(".*")) and not (out / "greedy_soup.pt").exists()
