import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import LOSS_NAMES, build_loss  # noqa: E402

torch.manual_seed(0)
LOGITS = torch.randn(6, 4)
Y = torch.tensor([0, 1, 2, 3, 1, 0])
Y_MULTI = torch.tensor(
    [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0]],
    dtype=torch.float32,
)


def test_ce_matches_torch_for_indices_and_soft_targets():
    loss = build_loss("ce")
    assert torch.allclose(loss(LOGITS, Y), F.cross_entropy(LOGITS, Y))
    onehot = F.one_hot(Y, 4).float()
    assert torch.allclose(loss(LOGITS, onehot), F.cross_entropy(LOGITS, Y))
    soft = torch.softmax(torch.randn(6, 4), 1)  # a mixup-like soft target
    assert torch.allclose(loss(LOGITS, soft), F.cross_entropy(LOGITS, soft))


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_matches_torch(smoothing):
    loss = build_loss("label-smoothing", smoothing=smoothing)
    ref = F.cross_entropy(LOGITS, Y, label_smoothing=smoothing)
    assert torch.allclose(loss(LOGITS, Y), ref)
    assert torch.allclose(loss(LOGITS, F.one_hot(Y, 4).float()), ref, atol=1e-6)
    soft = torch.softmax(torch.randn(6, 4), 1)
    ref_soft = F.cross_entropy(LOGITS, soft, label_smoothing=smoothing)
    assert torch.allclose(loss(LOGITS, soft), ref_soft, atol=1e-6)


def test_label_smoothing_default_is_0_1():
    ref = F.cross_entropy(LOGITS, Y, label_smoothing=0.1)
    assert torch.allclose(build_loss("label_smoothing")(LOGITS, Y), ref)


def test_focal_gamma0_is_ce():
    loss = build_loss("focal", gamma=0.0)
    assert torch.allclose(loss(LOGITS, Y), F.cross_entropy(LOGITS, Y), atol=1e-6)
    soft = torch.softmax(torch.randn(6, 4), 1)
    assert torch.allclose(loss(LOGITS, soft), F.cross_entropy(LOGITS, soft), atol=1e-6)


def test_focal_hand_value_two_samples():
    # Sample 1: logits (0, ln 3) -> p = (1/4, 3/4), y = 1: (1/4)^2 * -ln(3/4)
    # Sample 2: logits (0, 0)    -> p = (1/2, 1/2), y = 0: (1/2)^2 * -ln(1/2)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    y = torch.tensor([1, 0])
    want = ((1 / 16) * -math.log(0.75) + (1 / 4) * -math.log(0.5)) / 2
    assert build_loss("focal")(logits, y).item() == pytest.approx(want, rel=1e-5)
    # per-class alpha weights each sample by alpha of its class
    want_a = ((1 / 16) * -math.log(0.75) * 0.75 + (1 / 4) * -math.log(0.5) * 0.25) / 2
    got = build_loss("focal", alpha=[0.25, 0.75])(logits, y).item()
    assert got == pytest.approx(want_a, rel=1e-5)
    got_scalar = build_loss("focal", alpha=0.5)(logits, y).item()
    assert got_scalar == pytest.approx(want * 0.5, rel=1e-5)


def test_soft_f1_perfect_prediction_is_zero():
    logits = 30.0 * F.one_hot(Y, 4).float()
    assert build_loss("f1")(logits, Y).item() == pytest.approx(0.0, abs=1e-5)
    logits_ml = 30.0 * (2 * Y_MULTI - 1)
    loss_ml = build_loss("f1", multi_label=True)(logits_ml, Y_MULTI)
    assert loss_ml.item() == pytest.approx(0.0, abs=1e-5)


def test_soft_f1_hand_value():
    # Two samples, two classes, p = (0.5, 0.5) for both, y = (0, 1).
    # Class 0: tp=.5 fp=.5 fn=.5 -> F1 = 1/(1+.5+.5) = 0.5; class 1 the same -> loss 0.5.
    logits = torch.zeros(2, 2)
    y = torch.tensor([0, 1])
    assert build_loss("f1")(logits, y).item() == pytest.approx(0.5, abs=1e-6)
    # p = (0.75, 0.25) both rows, y = (0, 1):
    # class 0: tp=.75 fp=.75 fn=.25 -> 1.5/2.5 = 0.6; class 1: tp=.25 fp=.25 fn=.75 -> .5/1.5
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    want = 1 - (0.6 + 1 / 3) / 2
    assert build_loss("f1")(logits, y).item() == pytest.approx(want, abs=1e-6)


def test_bce_matches_torch_and_accepts_indices():
    loss = build_loss("bce")
    assert torch.allclose(
        loss(LOGITS, Y_MULTI), F.binary_cross_entropy_with_logits(LOGITS, Y_MULTI)
    )
    ref = F.binary_cross_entropy_with_logits(LOGITS, F.one_hot(Y, 4).float())
    assert torch.allclose(loss(LOGITS, Y), ref)


def test_asl_gamma0_clip0_is_bce():
    loss = build_loss("asl", gamma_neg=0, gamma_pos=0, clip=0)
    ref = F.binary_cross_entropy_with_logits(LOGITS, Y_MULTI)
    assert torch.allclose(loss(LOGITS, Y_MULTI), ref, atol=1e-6)
    big = LOGITS * 50  # logsigmoid keeps this exact where log(sigmoid) would underflow
    ref_big = F.binary_cross_entropy_with_logits(big, Y_MULTI)
    assert torch.allclose(loss(big, Y_MULTI), ref_big, rtol=1e-5)


def test_asl_hand_value():
    # One positive with p = .5 (gamma_pos 0): -ln .5.  One negative with p = .75, clip .05:
    # p_m = .7 -> -(.7^4) ln(.3).  A negative with p = .04 < clip contributes 0.
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.tensor([[0.0, logit(0.75), logit(0.04)]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    want = (-math.log(0.5) - 0.7**4 * math.log(0.3) + 0.0) / 3
    assert build_loss("asl")(logits, y).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_scalar_and_finite_gradients(name):
    x = (LOGITS * 20).clone().requires_grad_(True)  # saturated logits too
    targets = [Y, F.one_hot(Y, 4).float() * 0.7 + 0.075]
    targets += [Y_MULTI] if name != "supcon" else []  # supcon: single-label only
    for t in targets:
        out = build_loss(name)(x, t)
        assert out.dim() == 0 and torch.isfinite(out)
        (g,) = torch.autograd.grad(out, x)
        assert torch.isfinite(g).all(), (name, t)


def test_half_precision_logits_give_float32_loss():
    out = build_loss("focal")(LOGITS.bfloat16(), Y)
    assert out.dtype == torch.float32


def test_unknown_name_and_bad_settings():
    with pytest.raises(ValueError, match="ce, label-smoothing, focal, f1, bce, asl"):
        build_loss("hinge")
    with pytest.raises(ValueError, match="accepts: gamma, alpha"):
        build_loss("focal", smoothing=0.1)
    with pytest.raises(ValueError, match="do not fit"):
        build_loss("ce")(LOGITS, torch.zeros(6, 3))
    assert isinstance(build_loss("CrossEntropyLoss"), type(build_loss("ce")))


# ---------------------------------------------------------------------------
# Supervised contrastive loss (Khosla et al. 2020)


def test_supcon_hand_value():
    # z0 = z1 = (1, 0) share class 0, z2 = (0, 1) is class 1 (no positive: not an anchor).
    # Anchor 0: -log(e^(1/t) / (e^(1/t) + e^0)) = log(1 + e^(-1/t)); anchor 1 the same.
    emb = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 5.0]])  # lengths do not matter
    y = torch.tensor([0, 0, 1])
    for t in (1.0, 0.5):
        want = math.log(1 + math.exp(-1 / t))
        got = build_loss("supcon", temperature=t)(emb, y).item()
        assert got == pytest.approx(want, rel=1e-5)
    # Three anchors of one class, one other: z = (1,0), (1,0), (0.6,0.8), (0,1) at t = 1.
    # Anchor 0: positives 1 (dot 1), 2 (dot .6); denominator e^1 + e^.6 + e^0.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    y = torch.tensor([1, 1, 1, 0])
    den0 = math.exp(1) + math.exp(0.6) + 1
    l0 = -(math.log(math.exp(1) / den0) + math.log(math.exp(0.6) / den0)) / 2
    den2 = 2 * math.exp(0.6) + math.exp(0.8)  # anchor 2: dots .6, .6, .8
    l2 = -2 * math.log(math.exp(0.6) / den2) / 2
    want = (2 * l0 + l2) / 3  # anchors 0 and 1 are alike; anchor 3 has no positive
    got = build_loss("ContrastiveLoss", temperature=1.0)(emb, y).item()
    assert got == pytest.approx(want, rel=1e-5)
    # soft (mixup) targets count as their argmax class
    soft = torch.tensor([[0.1, 0.9], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    assert build_loss("supcon", temperature=1.0)(emb, soft).item() == pytest.approx(want, rel=1e-5)


def test_supcon_added_to_ce_with_a_weight():
    emb = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 0, 1])
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [1.0, 1.0]])
    ce = (-math.log(0.25) - math.log(0.5) - math.log(0.5)) / 3
    want = ce + 0.5 * math.log(1 + math.exp(-1.0))
    loss = build_loss("supcon", weight=0.5, temperature=1.0)
    assert loss.needs_embedding and loss(logits, y, embedding=emb).item() == pytest.approx(want)
    alone = build_loss("supcon", temperature=1.0)
    assert alone(logits, y, embedding=emb).item() == pytest.approx(math.log(1 + math.exp(-1)))
    with pytest.raises(ValueError, match="embedding="):
        loss(logits, y)
    # one sample per class: no positive pair, a zero loss that still backpropagates
    e = torch.randn(3, 4, requires_grad=True)
    out = alone(e, torch.tensor([0, 1, 2]))
    out.backward()
    assert out.item() == 0.0 and e.grad is not None


def test_loss_parameters_through_build_loss():
    with pytest.raises(ValueError, match="single-label"):
        build_loss("supcon")(LOGITS, Y_MULTI)
    for name, kw, text in [
        ("supcon", {"temperature": 0}, "temperature"),
        ("supcon", {"weight": -1}, "weight"),
        ("supcon", {"smoothing": 0.1}, "give a weight"),
        ("focal", {"gamma": -1}, "gamma"),
        ("focal", {"gamma": float("inf")}, "gamma"),
        ("focal", {"alpha": [0.5, -0.1]}, "alpha"),
        ("asl", {"gamma_pos": -1}, "gamma_pos"),
        ("asl", {"clip": 1.0}, "clip"),
        ("asl", {"gamma_neg": float("nan")}, "gamma_neg"),
    ]:
        with pytest.raises(ValueError, match=text):
            build_loss(name, **kw)
    # asl with gamma_pos 1, gamma_neg 2, clip .1 on one positive p=.5 and one negative p=.75:
    # positive (1 - .5)^1 * -ln .5; negative p_m = .65: .65^2 * -ln(.35)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.tensor([[0.0, logit(0.75)]])
    y = torch.tensor([[1.0, 0.0]])
    want = (0.5 * -math.log(0.5) + 0.65**2 * -math.log(0.35)) / 2
    got = build_loss("asl", gamma_pos=1.0, gamma_neg=2.0, clip=0.1)(logits, y).item()
    assert got == pytest.approx(want, rel=1e-5)
    # focal gamma 1: sample logits (0, ln 3), y = 1 -> (1/4) * -ln(3/4)
    got = build_loss("FocalLoss", gamma=1.0)(
        torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])
    )
    assert got.item() == pytest.approx(0.25 * -math.log(0.75), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_supcon_on_cuda_matches_cpu():
    emb, y = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    cpu = build_loss("supcon", temperature=0.2)(emb, y)
    gpu = build_loss("supcon", temperature=0.2)(emb.cuda(), y.cuda())
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-5)


def test_loss_params_and_names_for_a_cli():
    from losses import loss_name, loss_params

    assert loss_name("ContrastiveLoss") == "supcon" and loss_name("Focal_Loss") == "focal"
    assert loss_params("supcon") == {"temperature": 0.1, "weight": None, "smoothing": 0.0}
    assert loss_params("focal") == {"gamma": 2.0, "alpha": None}
    assert loss_params("asl") == {"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.05}
    assert loss_params("bce") == {}
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        loss_params("hinge")
