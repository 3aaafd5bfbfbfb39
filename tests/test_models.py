"""Tests for models.py: model creation, devices, heads, feature blocks and checkpoint I/O."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from common import UserError


def _randomize_bn(model: nn.Module) -> None:
    """Give BN layers non-trivial running stats so eval outputs depend on them."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _meta(arch="smallnet", num_classes=3, in_chans=1, img_size=(28, 28)) -> dict:
    return {
        "arch": arch,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "img_size": img_size,
        "classes": [str(i) for i in range(num_classes)],
        "multi_label": False,
        "mean": torch.tensor([0.5]),  # tensors in meta must become plain lists
        "std": [0.25],
        "split": {"seed": 0, "val_ratio": 0.1, "val_hash": "abc"},
        "args": {"lr": 0.1, "out": Path("runs")},
        "metrics": {"val_acc": 0.5, "epoch": 1},
        "task": "classify",
    }


# ---------------------------------------------------------------------------
# Creating models


@pytest.mark.parametrize(
    "arch,width", [("smallnet", 256), ("smallnet_s", 128), ("smallnet_l", 384)]
)
def test_smallnet_variants_forward(arch, width):
    torch.manual_seed(0)
    model = models.create_model(arch, num_classes=10, in_chans=1, img_size=28)
    assert isinstance(model, models.SmallNet) and model.training
    assert isinstance(model.blocks, nn.ModuleList) and isinstance(model.head, nn.Linear)
    x = torch.randn(4, 1, 28, 28)
    assert model(x).shape == (4, 10)
    assert model.forward_features(x).shape == (4, width)


def test_smallnet_kwargs_channels_last_and_residual():
    model = models.create_model(
        "smallnet",
        5,
        in_chans=3,
        img_size=(32, 32),
        opts=models.ModelOpts(
            drop_rate=0.2, model_kwargs={"widths": [8, 16, 24, 32], "residual": True}
        ),
    )
    assert model.widths == (8, 16, 24, 32) and len(model.blocks) == 4
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert model(x).shape == (2, 5)


def test_timm_model_forward():
    model = models.create_model("resnet10t", num_classes=3, in_chans=1, img_size=(32, 32))
    assert model.training
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert models.head_names(model) == ["fc."]


def test_timm_vit_gets_img_size_and_quarter_blocks():
    model = models.create_model("vit_tiny_patch16_224", num_classes=3, in_chans=1, img_size=32)
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 3)
    names = [n for n, _ in models.feature_blocks(model)]
    assert names == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert models.head_names(model) == ["head."]


def test_unknown_model_suggests_close_match():
    with pytest.raises(UserError, match="resnet18"):
        models.create_model("resnet19", num_classes=3)
    with pytest.raises(UserError, match="smallnet"):
        models.create_model("smalnet", num_classes=3)


def test_image_too_small():
    with pytest.raises(UserError, match=r"image size 4x4 too small for smallnet.*--img-size >= 8"):
        models.create_model("smallnet", num_classes=3, img_size=4)
    assert models.create_model("smallnet", 3, img_size=8).training  # smallest size that works


def test_builtin_pretrained_is_user_error():
    with pytest.raises(UserError, match="no pretrained weights"):
        models.create_model("smallnet", 3, opts=models.ModelOpts(pretrained=True))


def test_unsupported_drop_path_is_user_error():
    # DLA's constructor has no drop_path_rate: silently dropped at 0, refused otherwise.
    models.create_model(
        "dla46_c", 3, in_chans=1, img_size=32, opts=models.ModelOpts(check_size=False)
    )
    with pytest.raises(UserError, match="drop_path_rate"):
        models.create_model(
            "dla46_c", 3, in_chans=1, img_size=32, opts=models.ModelOpts(drop_path_rate=0.1)
        )


# ---------------------------------------------------------------------------
# Devices and AMP


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_without_cuda():
    assert models.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        models.resolve_device("cuda")
    with pytest.raises(UserError, match="CUDA"):
        models.resolve_device("cuda:1")


def test_resolve_device_names():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match="--device"):
        models.resolve_device("tpu9")


def test_autocast():
    model = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with models.autocast("cpu", None):
        assert model(x).dtype == torch.float32
    with models.autocast(torch.device("cpu"), "bf16"):
        assert model(x).dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="bf16"), models.autocast("cpu", "fp16"):
        assert model(x).dtype == torch.bfloat16
    with pytest.raises(UserError, match="--amp"):
        models.autocast("cpu", "fp8")


# ---------------------------------------------------------------------------
# Heads and feature blocks


def test_reset_classifier_and_head_names():
    small = models.create_model("smallnet_s", 10, opts=models.ModelOpts(check_size=False))
    small.reset_classifier(4)  # the timm-style name both kinds of model share
    assert small.head.out_features == 4 and small.num_classes == 4
    assert models.head_names(small) == ["head."]
    res = models.create_model("resnet18", 10, in_chans=1, opts=models.ModelOpts(check_size=False))
    models.unwrap(nn.DataParallel(res)).reset_classifier(2)  # wrappers are looked through
    assert res.fc.out_features == 2 and models.head_names(res) == ["fc."]
    assert res.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 2)


@pytest.mark.parametrize(
    "arch,names",
    [
        ("smallnet_s", ["stem", "block1", "block2", "block3"]),
        ("resnet18", ["act1", "layer1", "layer2", "layer3", "layer4"]),
    ],
)
def test_feature_blocks_hooks_fire(arch, names):
    model = models.create_model(arch, 3, in_chans=1, img_size=32).eval()
    blocks = models.feature_blocks(model)
    assert [n for n, _ in blocks] == names
    seen = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out.shape))
        for n, m in blocks
    ]
    with torch.no_grad():
        model(torch.zeros(2, 1, 32, 32))
    for h in handles:
        h.remove()
    assert list(seen) == names
    assert all(len(s) == 4 and s[0] == 2 for s in seen.values())


# ---------------------------------------------------------------------------
# Checkpoints


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.create_model("smallnet_s", 3, img_size=28)
    _randomize_bn(model)
    path = tmp_path / "run" / "best.pt"
    models.save_checkpoint(path, model, _meta("smallnet_s"), extra={"epoch": 3})
    assert os.listdir(path.parent) == ["best.pt"]  # no temp file left behind

    # The file is a plain dict: weights_only loading works without our code.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 1 and raw["arch"] == "smallnet_s" and raw["epoch"] == 3
    assert raw["img_size"] == [28, 28] and raw["mean"] == [0.5] and raw["args"]["out"] == "runs"
    assert raw["torch"] == torch.__version__ and raw["created"].startswith("20")

    loaded, ckpt = models.load_model(path)
    assert not loaded.training and ckpt["classes"] == ["0", "1", "2"]
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_round_trip_with_model_kwargs_and_timm(tmp_path):
    model = models.create_model(
        "smallnet", 2, img_size=16, opts=models.ModelOpts(model_kwargs={"widths": [8, 16]})
    )
    meta = {**_meta("smallnet", 2, img_size=(16, 16)), "model_kwargs": {"widths": [8, 16]}}
    models.save_checkpoint(tmp_path / "a.pt", model, meta)
    loaded, _ = models.load_model(tmp_path / "a.pt", device="cpu")
    assert loaded.widths == (8, 16)

    res = models.create_model("resnet10t", 3, in_chans=1, img_size=32)
    _randomize_bn(res)
    models.save_checkpoint(tmp_path / "r.pt", res.state_dict(), _meta("resnet10t", img_size=32))
    loaded, _ = models.load_model(str(tmp_path / "r.pt"))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(res.eval()(x), loaded(x))


def test_wrapper_prefixes_stripped(tmp_path):
    model = models.create_model("smallnet_s", 3, opts=models.ModelOpts(check_size=False))
    sd = model.state_dict()
    prefixed = {f"module._orig_mod.{k}": v for k, v in sd.items()}  # DDP around torch.compile
    models.save_checkpoint(tmp_path / "p.pt", prefixed, _meta("smallnet_s"))
    assert list(models.load_checkpoint(tmp_path / "p.pt")["state_dict"]) == list(sd)
    models.save_checkpoint(tmp_path / "d.pt", nn.DataParallel(model), _meta("smallnet_s"))
    assert list(models.load_checkpoint(tmp_path / "d.pt")["state_dict"]) == list(sd)
    compiled = torch.compile(model)  # compiles lazily: nothing runs here
    assert list(compiled.state_dict())[0].startswith("_orig_mod.")
    models.save_checkpoint(tmp_path / "c.pt", compiled, _meta("smallnet_s"))
    assert list(models.load_checkpoint(tmp_path / "c.pt")["state_dict"]) == list(sd)
    other = models.create_model("smallnet_s", 3, opts=models.ModelOpts(check_size=False))
    assert models.unwrap(torch.compile(other)) is other
    report = models.load_weights(other, {f"_orig_mod.{k}": v for k, v in sd.items()})
    assert report["missing"] == report["unexpected"] == report["shape"] == []
    assert torch.equal(other.stem[0].weight, model.stem[0].weight)


def test_load_checkpoint_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "arch": "smallnet", "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(UserError, match="not a safe checkpoint.*refused"):
        models.load_checkpoint(path)
    with pytest.raises(UserError, match="not a safe checkpoint"):
        models.load_state_dict_file(path)
    assert not marker.exists()


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        models.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="is a directory"):
        models.load_checkpoint(tmp_path)

    plain = tmp_path / "plain.pt"
    torch.save(
        models.create_model("smallnet_s", 3, opts=models.ModelOpts(check_size=False)).state_dict(),
        plain,
    )
    with pytest.raises(
        UserError, match=r"not a checkpoint of this toolkit \(missing 'arch'\).*--weights"
    ):
        models.load_checkpoint(plain)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a checkpoint of this toolkit"):
        models.load_checkpoint(tmp_path / "list.pt")

    good = tmp_path / "good.pt"
    models.save_checkpoint(good, {"w": torch.zeros(3)}, {"arch": "smallnet"})
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        models.load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        models.load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="corrupt"):
        models.load_checkpoint(tmp_path / "empty.pt")


def test_save_failures(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        models.save_checkpoint(blocker / "best.pt", {"w": torch.zeros(1)}, {"arch": "smallnet"})
    # Values weights_only would refuse fail at save time, not at resume time.
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="weights_only"):
        models.save_checkpoint(
            tmp_path / "last.pt", {"w": torch.zeros(1)}, {"arch": "x"}, extra={"rng": np.zeros(2)}
        )
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_load_state_dict_file_formats(tmp_path):
    model = models.create_model("smallnet_s", 3, opts=models.ModelOpts(check_size=False))
    sd = model.state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"model": sd, "epoch": 2}, tmp_path / "wrapped.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    models.save_checkpoint(tmp_path / "ours.pt", model, _meta("smallnet_s"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in ["plain.pth", "wrapped.pt", "ddp.pt", "ours.pt", "w.safetensors"]:
        got = models.load_state_dict_file(tmp_path / name)
        assert sorted(got) == sorted(sd), name
        assert all(torch.equal(got[k], sd[k]) for k in sd), name

    torch.save({"epoch": 2, "lr": 0.1}, tmp_path / "nosd.pt")
    with pytest.raises(UserError, match="no state dict"):
        models.load_state_dict_file(tmp_path / "nosd.pt")
    with pytest.raises(UserError, match="no such"):
        models.load_state_dict_file(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="safetensors"):
        models.load_state_dict_file(tmp_path / "bad.safetensors")


def test_load_weights_mismatch_partial_and_skip_head():
    torch.manual_seed(0)
    src = models.create_model("smallnet_s", 10, opts=models.ModelOpts(check_size=False))
    sd = dict(src.state_dict())
    sd["extra.weight"] = torch.zeros(2)
    dst = models.create_model("smallnet_s", 3, opts=models.ModelOpts(check_size=False))
    head_before = dst.head.weight.clone()

    with pytest.raises(UserError, match=r"mine\.pt: .*1 unexpected \(extra\.weight\).*2 shape"):
        models.load_weights(dst, sd, source="mine.pt")
    assert not torch.equal(dst.stem[0].weight, src.stem[0].weight)  # nothing loaded

    report = models.load_weights(dst, sd, allow_partial=True)
    assert report["missing"] == [] and report["unexpected"] == ["extra.weight"]
    assert report["shape"] == [("head.weight", (10, 128), (3, 128)), ("head.bias", (10,), (3,))]
    assert torch.equal(dst.stem[0].weight, src.stem[0].weight)
    assert torch.equal(dst.head.weight, head_before)

    del sd["extra.weight"]
    with pytest.raises(UserError, match="skip the head"):
        models.load_weights(dst, sd)
    report = models.load_weights(dst, sd, skip_head=True)
    assert report["missing"] == report["unexpected"] == report["shape"] == []

    del sd["stem.1.running_mean"]
    with pytest.raises(UserError, match=r"1 missing \(stem\.1\.running_mean\)"):
        models.load_weights(dst, sd, skip_head=True)


def test_checkpoint_meta_one_reader_one_writer(tmp_path):
    model = models.create_model("smallnet_s", 3, img_size=28)
    meta = models.CheckpointMeta.from_checkpoint(_meta("smallnet_s"))
    assert meta.num_classes == 3 and meta.img_size == [28, 28] and meta.mean == [0.5]
    meta.heads = {"mask": ["wear", "incorrect", "not_worn"]}
    path = tmp_path / "m.pt"
    models.save_checkpoint(path, model, meta, extra={"epoch": 2})
    raw = torch.load(path, weights_only=True)  # still a plain dict on disk
    assert raw["heads"] == {"mask": ["wear", "incorrect", "not_worn"]} and raw["epoch"] == 2
    back = models.read_meta(path)
    assert back.split == {"seed": 0, "val_ratio": 0.1, "val_hash": "abc"}
    assert back.extra == {"epoch": 2} and back.created == raw["created"]
    assert back.torch == torch.__version__ and back.args["out"] == "runs"
    # Reading then writing loses nothing: the same keys and values come back.
    models.save_checkpoint(tmp_path / "again.pt", raw["state_dict"], back)
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert {k: v for k, v in again.items() if k not in ("created", "state_dict")} == {
        k: v for k, v in raw.items() if k not in ("created", "state_dict")
    }


def test_checkpoint_meta_defaults_for_older_files():
    old = {"format": 1, "arch": "smallnet", "num_classes": 2, "in_chans": 3, "state_dict": {}}
    m = models.CheckpointMeta.from_checkpoint(old)
    assert m.classes == ["0", "1"] and m.mean == [0.0] * 3 and m.std == [1.0] * 3
    assert (m.task, m.multi_label, m.split, m.heads, m.img_size) == (
        "classify",
        False,
        {},
        None,
        None,
    )
    assert models.CheckpointMeta.from_checkpoint({"arch": "x", "classes": ["a"]}).num_classes == 1
    with pytest.raises(UserError, match="old.pt: damaged checkpoint metadata"):
        models.CheckpointMeta.from_checkpoint({"arch": "x", "img_size": "big"}, "old.pt")
    with pytest.raises(UserError, match="no 'arch'"):
        models.CheckpointMeta.from_checkpoint({"num_classes": 3})
    with pytest.raises(UserError, match="missing 'in_chans'"):
        models.model_from_checkpoint({"arch": "smallnet", "num_classes": 2, "state_dict": {}})


def test_grad_checkpointing_smallnet_same_step_as_without():
    torch.manual_seed(0)
    plain = models.create_model("smallnet_s", 3, img_size=16)
    ckpt = models.create_model(
        "smallnet_s", 3, img_size=16, opts=models.ModelOpts(grad_checkpointing=True)
    )
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    calls = []
    hook = ckpt.blocks[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    for m in (plain, ckpt):
        nn.functional.cross_entropy(m.train()(x), y).backward()
    hook.remove()
    assert len(calls) == 2  # the block ran again in backward: it was checkpointed
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    # BN running statistics are updated once, as without checkpointing
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), name
    with torch.no_grad():  # eval: no checkpointing, same outputs
        assert torch.allclose(plain.eval()(x), ckpt.eval()(x), atol=1e-6)


def test_grad_checkpointing_timm_and_refusal():
    res = models.create_model(
        "resnet10t", 3, img_size=32, opts=models.ModelOpts(grad_checkpointing=True)
    )
    assert res.grad_checkpointing
    with pytest.raises(UserError, match=r"--grad-checkpointing: dla46x_c does not support it"):
        models.create_model(
            "dla46x_c", 3, img_size=32, opts=models.ModelOpts(grad_checkpointing=True)
        )
    with pytest.raises(UserError, match="Linear does not support it"):
        models.set_grad_checkpointing(nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["smallnet_s", "resnet10t"])
def test_capture_embedding_is_the_classifier_input(arch):
    model = models.create_model(arch, 3, img_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    with models.capture_embedding(nn.DataParallel(model)) as got, torch.no_grad():
        logits = model(x)
    emb = got["embedding"]
    assert emb.shape == (2, model.num_features)
    head = model.get_classifier()
    assert torch.allclose(head(emb), logits, atol=1e-5)
    model(x)  # the hook is gone after the block
    assert got["embedding"] is emb


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grad_checkpointing_smallnet_on_cuda():
    m = models.create_model(
        "smallnet_s", 3, img_size=16, opts=models.ModelOpts(grad_checkpointing=True)
    ).cuda()
    with models.autocast("cuda", "bf16"):
        loss = m(torch.randn(4, 1, 16, 16, device="cuda")).float().logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
