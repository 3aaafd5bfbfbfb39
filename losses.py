"""Classification losses by name: `build_loss("focal", gamma=2.0)(logits, targets)`.

Torch only and self-contained, so this file can be copied into any project.
Every loss takes logits [N, K] and targets either as int64 class indices [N] or
as float soft / multi-hot targets [N, K] (what mixup and cutmix produce), and
returns the scalar mean. Single-label losses (ce, label-smoothing, focal, f1)
treat float targets as soft class distributions; multi-label losses (bce, asl)
treat int targets as one-hot rows. The contrastive loss (supcon) works on an
embedding [N, D]: `loss(embedding, target)` alone, or, built with a weight,
`loss(logits, target, embedding=embedding)` = CE + weight * SupCon; both have
`needs_embedding = True` so a training loop knows to pass the embedding.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("ce", "label-smoothing", "focal", "f1", "bce", "asl", "supcon")

# Common spellings (e.g. the model-soups `--loss-fn CrossEntropyLoss`) map to the names above.
_ALIASES = {
    "cross-entropy": "ce",
    "crossentropy": "ce",
    "crossentropyloss": "ce",
    "smoothing": "label-smoothing",
    "ls": "label-smoothing",
    "focal-loss": "focal",
    "soft-f1": "f1",
    "macro-f1": "f1",
    "bce-with-logits": "bce",
    "bcewithlogitsloss": "bce",
    "asymmetric": "asl",
    "asymmetricloss": "asl",
    "focalloss": "focal",
    "contrastiveloss": "supcon",  # the model-soups seed's --loss-fn ContrastiveLoss
    "contrastive": "supcon",
    "supconloss": "supcon",
    "sup-con": "supcon",
}


def _as_2d(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targets as float [N, K]: one-hot for class indices, unchanged for soft / multi-hot."""
    if target.dim() == 1 and not target.is_floating_point():
        return F.one_hot(target.long(), logits.shape[1]).to(logits.dtype)
    if target.shape != logits.shape:
        raise ValueError(
            f"targets of shape {tuple(target.shape)} do not fit logits {tuple(logits.shape)}: "
            "pass int64 class indices [N] or float targets [N, K]"
        )
    return target.to(logits.dtype)


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy for int or soft targets, with optional label smoothing (torch semantics)."""
    logits = logits.float()
    if target.dim() == 1 and not target.is_floating_point():
        return F.cross_entropy(logits, target.long(), label_smoothing=smoothing)
    t = _as_2d(logits, target)
    if smoothing:
        t = t * (1.0 - smoothing) + smoothing / logits.shape[1]
    return -(t * F.log_softmax(logits, dim=1)).sum(1).mean()


class CrossEntropy(nn.Module):
    """Cross-entropy (softmax), optionally label-smoothed; soft targets allowed."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, target, self.smoothing)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017): mean of -alpha_y (1 - p_y)^gamma log p_y.

    Soft targets t give sum_k t_k alpha_k (1 - p_k)^gamma (-log p_k); gamma=0, alpha=None is CE.
    `alpha` is None, one float (a scale) or K per-class weights (for rare classes).
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None):
        super().__init__()
        if not 0 <= gamma < float("inf"):
            raise ValueError(f"focal gamma must be a finite number >= 0, got {gamma}")
        self.gamma = float(gamma)
        alpha_k = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if alpha_k is not None and (
            alpha_k.dim() > 1 or not torch.isfinite(alpha_k).all() or (alpha_k < 0).any()
        ):
            raise ValueError(f"focal alpha must be one number or K numbers >= 0, got {alpha}")
        self.register_buffer("alpha", alpha_k)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        t = _as_2d(logits, target)
        log_p = F.log_softmax(logits, dim=1)
        # (1 - p)^gamma; the floor keeps pow's gradient finite for gamma < 1 when p rounds to 1.
        w = (-torch.expm1(log_p)).clamp(min=1e-12) ** self.gamma
        loss = -(t * w * log_p)
        if self.alpha is not None:
            if self.alpha.dim() == 1 and self.alpha.numel() != logits.shape[1]:
                raise ValueError(
                    f"alpha has {self.alpha.numel()} weights but logits have "
                    f"{logits.shape[1]} classes"
                )
            loss = loss * self.alpha
        return loss.sum(1).mean()


class SoftF1Loss(nn.Module):
    """1 - soft macro-F1 over the batch: per class 2TP / (2TP + FP + FN) on probabilities.

    Softmax probabilities for single-label, sigmoid with `multi_label=True`. Classes absent from
    the batch count as F1 0, so use batches that cover the classes (or combine with CE).
    """

    def __init__(self, multi_label: bool = False, eps: float = 1e-7):
        super().__init__()
        self.multi_label = bool(multi_label)
        self.eps = float(eps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        t = _as_2d(logits, target)
        p = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
        tp = (p * t).sum(0)
        fp = (p * (1 - t)).sum(0)
        fn = ((1 - p) * t).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.eps)
        return 1.0 - f1.mean()


class BCELoss(nn.Module):
    """BCE-with-logits for multi-label; mean over all N x K entries (int targets -> one-hot)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, _as_2d(logits, target))


class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label (Ridnik et al. 2021), mean over all N x K entries.

    Positives: -(1 - p)^gamma_pos log p. Negatives: -p_m^gamma_neg log(1 - p_m) with the shifted
    probability p_m = max(p - clip, 0), which discards easy negatives. gamma 0, clip 0 is BCE.
    (The reference code sums; the mean keeps the scale of BCE so learning rates carry over.)
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
        super().__init__()
        finite = all(v < float("inf") for v in (gamma_neg, gamma_pos))
        if not (finite and gamma_neg >= 0 and gamma_pos >= 0 and 0.0 <= clip < 1.0):
            raise ValueError(
                f"asl needs finite gamma_neg >= 0, gamma_pos >= 0 and 0 <= clip < 1, got "
                f"gamma_neg={gamma_neg}, gamma_pos={gamma_pos}, clip={clip}"
            )
        self.gamma_neg, self.gamma_pos, self.clip = float(gamma_neg), float(gamma_pos), float(clip)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        t = _as_2d(logits, target)
        p = torch.sigmoid(logits)
        # logsigmoid instead of log(p): exact and finite for large |logits|.
        pos = F.logsigmoid(logits)
        if self.gamma_pos:
            pos = pos * (1 - p) ** self.gamma_pos
        if self.clip > 0:
            p_m = (p - self.clip).clamp(min=0.0)
            neg = torch.log1p(-p_m)  # 1 - p_m >= clip > 0, so finite
        else:
            p_m = p
            neg = F.logsigmoid(-logits)
        if self.gamma_neg:
            neg = neg * p_m**self.gamma_neg
        return -(t * pos + (1 - t) * neg).mean()


def _class_of(target: torch.Tensor) -> torch.Tensor:
    """Class index per sample: int targets as they are, soft (mixup) rows by their argmax."""
    if target.dim() == 1 and not target.is_floating_point():
        return target.long()
    if target.dim() != 2 or (target.sum(1) > 1 + 1e-4).any():
        raise ValueError(
            "supcon needs single-label targets (class indices or soft rows summing to 1), "
            f"got shape {tuple(target.shape)}; multi-label data is not supported"
        )
    return target.argmax(1)


def supcon_loss(
    embedding: torch.Tensor, target: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Supervised contrastive loss, the L_out form of Khosla et al. 2020 (eq. 2):

    z = embedding / |embedding|;  for each anchor i with positives P(i) = {p != i, y_p = y_i}:
    l_i = -1/|P(i)| sum_p log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) );
    the loss is the mean of l_i over anchors that have a positive (0 when none has).
    """
    z = F.normalize(embedding.float().flatten(1), dim=1)
    y = _class_of(target)
    n = len(z)
    sim = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    # log-softmax over a != i: the anchor itself is left out of the denominator
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return sim.sum() * 0.0  # no pairs in this batch: no signal, but keeps the graph
    per_anchor = -(log_prob * pos).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


class SupConLoss(nn.Module):
    """SupCon on an embedding [N, D] (Khosla et al. 2020): `loss(embedding, target)`.

    Called as `loss(logits, target, embedding=e)` (the loop's uniform call) it uses `e`.
    """

    needs_embedding = True

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not 0 < temperature < float("inf"):
            raise ValueError(f"supcon temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(
        self, x: torch.Tensor, target: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        return supcon_loss(x if embedding is None else embedding, target, self.temperature)


class SupConCE(nn.Module):
    """Cross-entropy on the logits plus `weight` x SupCon on the embedding:
    `loss(logits, target, embedding=e)`."""

    needs_embedding = True

    def __init__(self, weight: float = 0.5, temperature: float = 0.1, smoothing: float = 0.0):
        super().__init__()
        if not 0 <= weight < float("inf"):
            raise ValueError(f"supcon weight must be a finite number >= 0, got {weight}")
        self.weight = float(weight)
        self.ce = CrossEntropy(smoothing)
        self.supcon = SupConLoss(temperature)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        if embedding is None:
            raise ValueError("supcon with a weight needs loss(logits, target, embedding=...)")
        return self.ce(logits, target) + self.weight * self.supcon(embedding, target)


def _supcon(temperature: float = 0.1, weight: float | None = None, smoothing: float = 0.0):
    """weight None: SupCon alone on the embedding; else CE + weight * SupCon."""
    if weight is None:
        if smoothing:
            raise ValueError("supcon smoothing applies to the cross-entropy: give a weight too")
        return SupConLoss(temperature)
    return SupConCE(weight, temperature, smoothing)


_BUILDERS = {
    "ce": lambda smoothing=0.0: CrossEntropy(smoothing),
    "label-smoothing": lambda smoothing=0.1: CrossEntropy(smoothing),
    "focal": lambda gamma=2.0, alpha=None: FocalLoss(gamma, alpha),
    "f1": lambda multi_label=False, eps=1e-7: SoftF1Loss(multi_label, eps),
    "bce": lambda: BCELoss(),
    "asl": lambda gamma_neg=4.0, gamma_pos=0.0, clip=0.05: AsymmetricLoss(
        gamma_neg, gamma_pos, clip
    ),
    "supcon": _supcon,
}


def loss_name(name: str) -> str:
    """The canonical name of a loss (aliases such as ContrastiveLoss resolved); ValueError."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _BUILDERS:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(LOSS_NAMES)}")
    return key


def loss_params(name: str) -> dict[str, object]:
    """The settings a loss takes and their defaults, e.g. {"gamma": 2.0, "alpha": None}: a CLI
    passes exactly these of its flags to build_loss."""
    sig = inspect.signature(_BUILDERS[loss_name(name)])
    return {k: p.default for k, p in sig.parameters.items()}


def build_loss(name: str, **kw) -> nn.Module:
    """Loss module by name (see LOSS_NAMES); kw are that loss's settings, e.g. smoothing=0.1."""
    key = loss_name(name)
    allowed = list(loss_params(key))
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(
            f"loss '{key}' does not take {unknown}; it accepts: {', '.join(allowed) or 'nothing'}"
        )
    return _BUILDERS[key](**kw)


class MultiHeadLoss(nn.Module):
    """Sum of one loss per head of a multi-head model (models.MultiHead).

    `loss(joint, target)`: `joint` is the model's N x prod(sizes) joint log-probs and `target`
    the joint class index (mask: mask * 6 + gender * 3 + age); each head's loss gets that head's
    log-probs (the marginal of the joint, equal to its log_softmax, so a valid logit input for
    every loss here) and its own class index (the row-major digits of the target).
    """

    def __init__(self, head_losses: Sequence[nn.Module], sizes: Sequence[int]):
        super().__init__()
        if len(head_losses) != len(sizes):
            raise ValueError(f"{len(head_losses)} losses for {len(sizes)} heads")
        self.losses = nn.ModuleList(head_losses)
        self.sizes = tuple(int(k) for k in sizes)

    def split_target(self, target: torch.Tensor) -> list[torch.Tensor]:
        """Per-head class indices of joint indices (row-major digits over `sizes`)."""
        out, rest = [], target.long()
        for k in reversed(self.sizes):
            out.append(rest % k)
            rest = rest // k
        return out[::-1]

    def forward(self, joint: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import models  # lazy: losses.py stays importable without the model code

        if target.ndim != 1:
            raise ValueError("multi-head losses take class indices (no mixup/cutmix soft targets)")
        parts = [
            fn(lp, t)
            for fn, lp, t in zip(
                self.losses, models.head_marginals(joint, self.sizes), self.split_target(target)
            )
        ]
        return torch.stack(parts).sum()
