"""Models and checkpoint I/O: the built-in SmallNet, timm models, and the one safe loader.

`create_model` builds a built-in (smallnet, smallnet_s, smallnet_t, smallnet_l) or any timm model;
`CheckpointMeta` is the checkpoint format (one file, a plain dict loadable with
`torch.load(weights_only=True)`); `save_checkpoint` / `load_checkpoint` / `load_model` write and
read it.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from common import UserError, atomic_path, jsonable, size2

CHECKPOINT_FORMAT = 1
# Wrappers that other tools put around a state dict (timm, Lightning-style scripts, tutorials).
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "network")
# Key prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------------------
# Built-in model: SmallNet, after the airbench CIFAR-10 speed-record networks.


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


class ConvBlock(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU (optionally residual)."""

    def __init__(self, cin: int, cout: int, residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.GELU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pooling before BN is airbench's order: BN then sees 4x fewer pixels, same result.
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        y = self.act2(self.bn2(self.conv2(x)))
        return x + y if self.residual else y


class SmallNet(nn.Module):
    """Fast CNN for small images: full-resolution stem, a pooling conv block per width, max pool."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: tuple[int, ...] = (64, 128, 256),
        drop_rate: float = 0.0,
        residual: bool = False,
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.widths = widths
        self.num_features = widths[-1]
        self.stem = nn.Sequential(*_conv_bn(in_chans, widths[0]))
        # Block i outputs widths[i]; the stem already has widths[0] channels.
        self.blocks = nn.ModuleList(
            ConvBlock(cin, cout, residual) for cin, cout in zip(widths[:1] + widths[:-1], widths)
        )
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(widths[-1], num_classes)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: recompute the stem's and each block's activations in backward
        instead of storing them (less memory, about one more forward)."""
        self.grad_checkpointing = bool(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, N x num_features."""
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for stage in (self.stem, *self.blocks):
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(_once_bn(stage), x, use_reentrant=False)
            else:
                x = stage(x)
        return x.amax(dim=(2, 3))  # global max pool, as airbench does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.forward_features(x)))

    # timm-style names, so generic code can treat both kinds alike.
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        w = self.head.weight
        self.head = nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
        self.num_classes = num_classes


def _once_bn(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`block` as a function for torch.utils.checkpoint whose recomputation in backward leaves
    BatchNorm running statistics alone: they are updated once per step, as without it."""
    calls = [0]

    def run(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return block(x)
        bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in bns]
        try:
            for m in bns:
                m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            return block(x)
        finally:
            for m, momentum, tracked in saved:
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)

    return run


# Each block halves the resolution, so 3 blocks need images of at least 8 x 8 px.
BUILTINS: dict[str, dict] = {
    "smallnet": {"widths": (64, 128, 256)},
    "smallnet_s": {"widths": (32, 64, 128)},
    # smallnet_s with half the channels at full resolution, where most of its compute is: about
    # 2x its fp32 speed on CPU (README "Which precision and model `auto` picks")
    "smallnet_t": {"widths": (16, 64, 128)},
    "smallnet_l": {"widths": (96, 192, 384)},
}


# ---------------------------------------------------------------------------
# Creating models


def _unknown_model(arch: str) -> UserError:
    import timm

    names = sorted(BUILTINS) + timm.list_models()
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(arch.lower(), list(lower), n=6, cutoff=0.6)
    hint = f"did you mean {', '.join(lower[c] for c in close)}?" if close else "no close match"
    return UserError(
        f"unknown --model '{arch}' ({hint}); use a built-in ({', '.join(BUILTINS)}) "
        "or a timm name (timm.list_models())"
    )


def _create_timm(arch: str, num_classes, in_chans, img_size, o: ModelOpts) -> nn.Module:
    model_kwargs, pretrained = o.model_kwargs or {}, o.pretrained
    kw = {
        "num_classes": num_classes,
        "in_chans": in_chans,
        "drop_rate": o.drop_rate,
        "drop_path_rate": o.drop_path_rate,
        "img_size": img_size,
        **model_kwargs,
    }
    # Only ViT-like models take img_size; not every model takes drop rates. Drop what the
    # constructor refuses, unless the user asked for a non-default value of it.
    optional = {"img_size": None, "drop_rate": 0.0, "drop_path_rate": 0.0}
    while True:
        try:
            import timm  # lazy: importing timm costs seconds; built-ins do not need it

            return timm.create_model(arch, pretrained=pretrained, **kw)
        except TypeError as e:
            # "... unexpected keyword argument 'x'" or "... argument(s): ['x', ...]"
            m = re.search(r"unexpected keyword argument\S*:? \[?'(\w+)'", str(e))
            name = m.group(1) if m else None
            if name not in optional or name not in kw or name in model_kwargs:
                raise
            if name != "img_size" and kw[name] != optional[name]:
                raise UserError(
                    f"{arch} does not support {name}={kw[name]}; set it to 0 or use another --model"
                ) from None
            del kw[name]
        except (RuntimeError, OSError, ValueError) as e:
            if not pretrained:
                raise
            # Download failures, or no pretrained weights for this name.
            raise UserError(
                f"{arch}: cannot get pretrained weights ({str(e).splitlines()[0][:200]}); "
                "check the network / HF cache, or drop --pretrained"
            ) from None


def _forward_ok(model: nn.Module, in_chans: int, size: tuple[int, int]) -> Exception | None:
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *size))
    except (RuntimeError, ValueError, AssertionError) as e:
        return e
    return None


def _check_size(model: nn.Module, arch: str, in_chans: int, size: tuple[int, int]) -> None:
    """Dry-run one zero image so an unusable size fails now with a clear message."""
    was_training = model.training
    model.eval()  # batch of 1: train-mode BN would refuse it
    try:
        err = _forward_ok(model, in_chans, size)
        if err is None:
            return
        # Only on failure: find the smallest power of two that works, else the model's default.
        cfg = getattr(model, "pretrained_cfg", None) or {}
        default = int(cfg.get("input_size", (0, 224, 224))[-1])
        need = f"{default} (its default)"
        side = 8
        while side < default:
            if side > min(size) and _forward_ok(model, in_chans, (side, side)) is None:
                need = f">= {side}"
                break
            side *= 2
        why = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(
            f"image size {size[0]}x{size[1]} too small for {arch} ({why}); "
            f"use --img-size {need} or another --model"
        )
    finally:
        model.train(was_training)


@dataclass
class ModelOpts:
    """How create_model builds a network beyond its shape.

    `model_kwargs` go to the constructor (e.g. {"widths": [32, 64, 128]} for smallnet); store them
    in the checkpoint as "model_kwargs" so `load_model` can rebuild the same network.
    `grad_checkpointing` recomputes block activations in backward (timm's set_grad_checkpointing;
    SmallNet checkpoints each block); UserError for models that cannot.
    `heads` (class counts, e.g. (3, 2, 3)): a MultiHead model, the backbone's classifier with
    sum(heads) outputs split per head; `num_classes` is then the product (the joint classes).
    `check_size`: run one forward pass at the image size, UserError if the net cannot take it.
    """

    pretrained: bool = False
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    model_kwargs: dict | None = None
    grad_checkpointing: bool = False
    heads: Sequence[int] | None = None
    check_size: bool = True


def create_model(
    arch: str, num_classes: int, in_chans: int = 1, img_size=(28, 28), opts: ModelOpts | None = None
) -> nn.Module:
    """Build a built-in or timm model (see ModelOpts); UserError for unknown names or unusable
    image sizes."""
    o = opts or ModelOpts()
    pretrained, heads = o.pretrained, o.heads
    model_kwargs = dict(o.model_kwargs or {})
    size = size2(img_size) if img_size is not None else None
    if heads:
        heads = tuple(int(h) for h in heads)
        if math.prod(heads) != num_classes:
            raise ValueError(
                f"create_model: heads {heads} give {math.prod(heads)} joint classes, "
                f"not num_classes={num_classes}"
            )
        num_classes = sum(heads)
    if arch in BUILTINS:
        if pretrained:
            raise UserError(
                f"{arch} has no pretrained weights; drop --pretrained or load a file with --weights"
            )
        model = SmallNet(
            num_classes, in_chans, drop_rate=o.drop_rate, **{**BUILTINS[arch], **model_kwargs}
        )
    else:
        if arch.startswith(("hf-hub:", "hf_hub:")):
            if not pretrained:
                raise UserError(
                    f"{arch}: hub models are only fetched with --pretrained; "
                    "use the timm model name to build it without the network"
                )
        elif not _timm().is_model(arch):
            raise _unknown_model(arch)
        model = _create_timm(
            arch, num_classes, in_chans, size, replace(o, model_kwargs=model_kwargs)
        )
    if heads:
        model = MultiHead(model, heads)
    if o.check_size and size is not None:
        _check_size(model, arch, in_chans, size)
    if o.grad_checkpointing:
        set_grad_checkpointing(model, arch)
    return model


class MultiHead(nn.Module):
    """Several classifier heads on one backbone (the mask competition's mask/gender/age model).

    `net` is any backbone (SmallNet, timm) whose classifier has sum(sizes) outputs, split in
    order into one logit block per head. forward() returns the joint log-probabilities of the
    heads taken as independent, N x prod(sizes): log p1(i) + log p2(j) + ... at the row-major
    index (i, j, ...) (for sizes 3/2/3: mask * 6 + gender * 3 + age). Every caller that
    softmaxes model outputs (train.predict, TTA, soups, ensembles) so gets the product of the
    heads' softmaxes, and its argmax is each head's argmax combined. `head_logits(x)` gives
    the raw per-head logits; `marginals(out)` recovers each head's log-probs from forward's
    output (exactly: the joint is a product), which is what the per-head losses train on.
    """

    def __init__(self, net: nn.Module, sizes: Sequence[int]):
        super().__init__()
        self.net = net
        self.sizes = tuple(int(k) for k in sizes)
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueError(f"MultiHead: need >= 2 heads of >= 1 class each, got {self.sizes}")

    def head_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net(x).split(self.sizes, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return joint_log_probs(self.head_logits(x))

    def marginals(self, joint: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return head_marginals(joint, self.sizes)

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        fn = getattr(self.net, "set_grad_checkpointing", None)
        if fn is None:
            raise NotImplementedError("its backbone has no set_grad_checkpointing")
        fn(enable)


def joint_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """N x prod(K_h) joint log-probs of independent heads (N x K_h logits each), row-major:
    column (i * K2 + j) * K3 + k = log_softmax(h1)[i] + log_softmax(h2)[j] + log_softmax(h3)[k]."""
    out = None
    for z in logits:
        lp = torch.log_softmax(z.float(), 1)
        out = lp if out is None else (out[:, :, None] + lp[:, None, :]).flatten(1)
    return out


def head_marginals(joint: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Each head's log-probs (N x K_h) from N x prod(sizes) joint log-probs (logsumexp over the
    other heads); for a joint made by joint_log_probs this is each head's log_softmax."""
    sizes = tuple(sizes)
    j = joint.float().reshape(len(joint), *sizes)
    dims = range(1, len(sizes) + 1)
    return tuple(j.logsumexp([d for d in dims if d != h]) for h in dims)


def head_sizes(model: nn.Module) -> tuple[int, ...] | None:
    """The head class counts of a MultiHead model (through DDP/compile wrappers), else None."""
    m = unwrap(model)
    return m.sizes if isinstance(m, MultiHead) else None


def set_grad_checkpointing(model: nn.Module, arch: str = "") -> None:
    """Turn on gradient checkpointing, or UserError naming the model when it has none."""
    fn = getattr(unwrap(model), "set_grad_checkpointing", None)
    why = "it has no set_grad_checkpointing"
    if fn is not None:
        try:
            fn(True)
            return
        except (AssertionError, NotImplementedError, RuntimeError, TypeError) as e:
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
    name = arch or type(unwrap(model)).__name__
    raise UserError(
        f"--grad-checkpointing: {name} does not support it ({why}); drop the flag or use a "
        "model that does (smallnet, resnet*, efficientnet*, vit_*, convnext*, ...)"
    )


# ---------------------------------------------------------------------------
# Devices and mixed precision


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """auto|cpu|cuda|cuda:N|mps -> torch.device; UserError when that device is absent."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); "
                "use cuda:0..cuda:N-1"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"unsupported --device '{name}'; use auto, cpu, cuda or cuda:N")
    return dev


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(device: str | torch.device, amp: str | None) -> str:
    """Resolve --amp auto: bf16 where it is fast (CUDA with bf16, CPUs where cpu_bf16 says so)."""
    if amp != "auto":
        return amp or "none"
    dev_type = torch.device(device).type
    if dev_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dev_type == "cpu" and cpu_bf16()[0]:
        return "bf16"
    return "none"


# --model when not given, by device, precision and run length (README "Which precision and
# model `auto` picks"). GPUs and short runs: the wide smallnet, which learns more per step
# (3,000 letters x 3 epochs in fp32: 84.4% test in 35 s against smallnet_t's 64.0% in 12 s).
# CPU with fast bf16 (AMX): smallnet_s, ahead at equal time (Fashion-MNIST, 2-core Xeon with AMX:
# 16 epochs 94.1% test in 347 s against smallnet's 5 epochs 93.4% in 302 s). CPU in fp32:
# smallnet_t, a seventh of smallnet's multiply-adds (11M against 78M at 28 px), the soonest to
# a given accuracy (torch's kernels limited to AVX2: 92.0% test in 225 s, smallnet_s 318 s).
DEFAULT_ARCH_FAST, DEFAULT_ARCH_BF16_CPU, DEFAULT_ARCH_FP32 = "smallnet", "smallnet_s", "smallnet_t"
SHORT_RUN_IMAGES = 50_000  # training images seen (images x epochs) below which a run is short


def default_arch(device: str | torch.device, amp: str, images_seen: int | None = None) -> str:
    """The default --model for this device, --amp (auto is resolved here) and run length."""
    device = torch.device(device)
    if device.type != "cpu" or (images_seen is not None and images_seen < SHORT_RUN_IMAGES):
        return DEFAULT_ARCH_FAST
    return DEFAULT_ARCH_FP32 if resolve_amp(device, amp) == "none" else DEFAULT_ARCH_BF16_CPU


def cpu_bf16(
    flags: Sequence[str] | None = None, capability: str | None = None, vendor: str | None = None
) -> tuple[bool, str]:
    """(is bf16 autocast faster than fp32 on this CPU, why), measured on our nets (README "Which
    precision and model `auto` picks"): yes with AMX (amx_bf16; a 2-core EPYC with AMX trains
    smallnet_s about 2.5x faster in bf16) and on AMD CPUs with AVX512-BF16 (Zen 4: a 2-core EPYC
    without AMX, 1.44x / 1.57x / 1.68x for smallnet_t / smallnet_s / smallnet); no on an Intel
    Xeon with AVX512-BF16 but no AMX (Cooper Lake: smallnet_s 794 against 1,007 images/s in
    fp32, smallnet 219 against 318), and never when torch's kernels run below AVX512
    (ATEN_CPU_CAPABILITY=avx2, or an AVX2-only build)."""
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return False, f"torch's CPU kernels are {capability}, bf16 needs AVX512"
    if flags is None or vendor is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        first = text.split("\n\n", 1)[0].splitlines()  # the first processor's block
        fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in first)}
        flags = fields.get("flags", "").split() if flags is None else flags
        vendor = fields.get("vendor_id", "") if vendor is None else vendor
    if "amx_bf16" in flags:
        return True, "bf16 is fast with AMX"
    if "avx512_bf16" not in flags:
        return False, "no AVX512-BF16 or AMX here, bf16 is not faster"
    if vendor == "AuthenticAMD":
        return True, "bf16 is fast with AVX512-BF16 on AMD"
    return False, "AVX512-BF16 without AMX, bf16 is not faster"


def autocast(device: str | torch.device, amp: str | None):
    """torch.autocast for amp "bf16"/"fp16", or a null context for None/"none"."""
    amp = resolve_amp(device, amp)
    if amp in (None, "", "none", "no", "off", "fp32"):
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise UserError(f"unknown --amp '{amp}'; use none, bf16 or fp16")
    dev_type = torch.device(device).type
    dtype = AMP_DTYPES[amp]
    if dev_type == "cpu" and dtype == torch.float16:
        # fp16 on CPU is slow or unsupported on most CPUs; bf16 needs no loss scaling either.
        warnings.warn("--amp fp16 on CPU: using bf16 instead", stacklevel=2)
        dtype = torch.bfloat16
    if dev_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16")
    return torch.autocast(dev_type, dtype=dtype)


# ---------------------------------------------------------------------------
# Heads and feature blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel/DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def capture_embedding(model: nn.Module) -> Iterator[dict]:
    """While open, every forward of `model` leaves the classifier's input (the pooled embedding,
    N x D) in the yielded dict under "embedding": for losses with `needs_embedding` (SupCon)."""
    head = unwrap(model).get_classifier()
    head = head[0] if isinstance(head, tuple) else head
    store: dict = {}
    handle = head.register_forward_pre_hook(
        lambda _m, args: store.__setitem__("embedding", args[0])
    )
    try:
        yield store
    finally:
        handle.remove()


def head_names(model: nn.Module) -> list[str]:
    """state_dict key prefixes of the classifier, e.g. ["head."] or ["fc."]."""
    model = unwrap(model)
    if isinstance(model, MultiHead):
        return ["net." + h for h in head_names(model.net)]
    if isinstance(model, SmallNet):
        return ["head."]
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or []
    names = [names] if isinstance(names, str) else list(names)
    keys = model.state_dict().keys()
    prefixes = [n + "." for n in names if any(k.startswith(n + ".") for k in keys)]
    if not prefixes and hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        clf = clf[0] if isinstance(clf, tuple) else clf
        prefixes = [n + "." for n, m in model.named_modules() if m is clf and n]
    return prefixes


def _quarters(items: list) -> list:
    n = len(items)
    idx = sorted({max(0, round(n * q / 4) - 1) for q in (1, 2, 3, 4)})
    return [items[i] for i in idx]


def feature_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs whose outputs feed per-block linear evaluation (RotNet).

    Outputs are N x C x H x W for CNNs and N x tokens x D for transformer blocks.
    """
    model = unwrap(model)
    if isinstance(model, SmallNet):
        return [("stem", model.stem)] + [(f"block{i + 1}", b) for i, b in enumerate(model.blocks)]
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all("module" in d for d in info):
        blocks = [(d["module"], model.get_submodule(d["module"])) for d in info]
    else:
        stages = [
            (n, m)
            for n, m in model.named_children()
            if isinstance(m, (nn.Sequential, nn.ModuleList))
        ]
        if len(stages) == 1:  # one container holding the stages: use its children
            n, m = stages[0]
            stages = [(f"{n}.{i}", c) for i, c in enumerate(m)]
        blocks = stages
    # Transformers list every block; their quarters are enough for a linear-probe curve.
    return _quarters(blocks) if len(blocks) > 6 else blocks


# ---------------------------------------------------------------------------
# Checkpoints


def strip_prefixes(state_dict: dict) -> dict:
    """Remove DDP `module.` and torch.compile `_orig_mod.` prefixes (when every key has one)."""
    changed = True
    while changed and state_dict:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in state_dict):
                state_dict = {k[len(p) :]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


# What torch.load(weights_only=True) accepts. Exact types: subclasses such as numpy.float64
# (a float) or torch's TorchVersion (a str) pickle as their own class and would be refused.
_SCALARS = (str, int, float, bool, type(None))
_TORCH = (torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_plain(obj, where: str) -> None:
    """Fail at save time, not at resume time, on values weights_only loading would refuse."""
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in _SCALARS:
                raise TypeError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif type(obj) not in _SCALARS and not isinstance(obj, _TORCH):
        raise TypeError(
            f"checkpoint {where}: {type(obj).__name__} would not load with weights_only=True; "
            "convert it to tensors, lists or plain numbers"
        )


def _arrays_to_lists(obj):
    # Before jsonable: a 1-element tensor must stay a list (mean [0.5]), not become 0.5.
    if isinstance(obj, dict):
        return {k: _arrays_to_lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_arrays_to_lists(v) for v in obj]
    return obj.tolist() if hasattr(obj, "tolist") else obj


# The keys of the checkpoint format; any other key of a file is kept in CheckpointMeta.extra.
META_KEYS = (
    "arch", "num_classes", "in_chans", "img_size", "classes", "multi_label", "mean", "std",
    "split", "args", "metrics", "task", "created", "torch", "heads", "model_kwargs", "saturation",
)  # fmt: skip
_NOT_META = ("format", "state_dict")


@dataclass
class CheckpointMeta:
    """What a checkpoint says about its model and data: the one typed view of the format.

    `from_checkpoint(d)` is the one reader (defaults for keys older files lack), `to_dict()` the
    one writer (used by save_checkpoint). Keys outside the format (last.pt's training state,
    soup records) stay in `extra`, so reading then writing loses nothing. On disk it remains a
    plain dict loadable with `torch.load(weights_only=True)`.
    """

    arch: str
    num_classes: int | None = None  # None: unknown (the file cannot be rebuilt)
    in_chans: int | None = None
    img_size: list[int] | None = None  # [H, W] it trained at
    classes: list[str] = field(default_factory=list)
    multi_label: bool = False
    mean: list[float] = field(default_factory=list)  # per channel, on the 0..1 scale
    std: list[float] = field(default_factory=list)
    split: dict = field(default_factory=dict)  # {"seed", "val_ratio", "val_hash"} (+ kfold, fold)
    args: dict = field(default_factory=dict)  # the training flags
    metrics: dict = field(default_factory=dict)
    task: str = "classify"  # or "rotation"
    created: str = ""
    torch: str = ""
    heads: dict[str, list[str]] | None = None  # head name -> its classes (multi-head models)
    model_kwargs: dict | None = None
    saturation: bool = False  # channel 2 is the saturation plane (train.py --saturation-channel)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, source: str = "checkpoint") -> CheckpointMeta:
        """The metadata of a loaded checkpoint dict (or of a meta dict); UserError naming
        `source` when a key has the wrong type."""
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("arch"), str):
            raise UserError(f"{source}: no 'arch' in the checkpoint; it cannot be rebuilt")
        try:
            num_classes = _opt_int(ckpt.get("num_classes"))
            classes = [str(c) for c in (ckpt.get("classes") or [])]
            if num_classes is None and classes:
                num_classes = len(classes)
            if not classes and num_classes:
                classes = [str(i) for i in range(num_classes)]
            in_chans = _opt_int(ckpt.get("in_chans"))
            size = ckpt.get("img_size")
            img_size = None if size is None else list(size2(size))
            mean = [float(v) for v in _as_list(ckpt.get("mean"))]
            std = [float(v) for v in _as_list(ckpt.get("std"))]
            if in_chans is not None and not mean:  # older files: no normalisation stats
                mean, std = [0.0] * in_chans, [1.0] * in_chans
            heads = ckpt.get("heads")
            if heads is not None:
                heads = {str(k): [str(c) for c in v] for k, v in dict(heads).items()}
            dicts = {k: dict(ckpt.get(k) or {}) for k in ("split", "args", "metrics")}
            model_kwargs = ckpt.get("model_kwargs")
            model_kwargs = None if model_kwargs is None else dict(model_kwargs)
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"{source}: damaged checkpoint metadata ({e}); re-save it") from None
        return cls(
            arch=ckpt["arch"],
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            classes=classes,
            multi_label=bool(ckpt.get("multi_label", False)),
            mean=mean,
            std=std,
            task=str(ckpt.get("task") or "classify"),
            created=str(ckpt.get("created") or ""),
            torch=str(ckpt.get("torch") or ""),
            heads=heads,
            model_kwargs=model_kwargs,
            saturation=bool(ckpt.get("saturation", False)),
            extra={k: v for k, v in ckpt.items() if k not in META_KEYS and k not in _NOT_META},
            **dicts,
        )

    def to_dict(self) -> dict:
        """The plain dict written into the file (without format and state_dict)."""
        d = {k: getattr(self, k) for k in META_KEYS if k not in ("heads", "model_kwargs")}
        for k in ("heads", "model_kwargs"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return {**self.extra, **d}


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def _as_list(v) -> list:
    if v is None:
        return []
    if hasattr(v, "tolist"):
        v = v.tolist()
    return list(v) if isinstance(v, list | tuple) else [v]


def read_meta(ckpt_or_path, source: str | None = None) -> CheckpointMeta:
    """CheckpointMeta of a checkpoint file or of a checkpoint dict already loaded."""
    if isinstance(ckpt_or_path, CheckpointMeta):
        return ckpt_or_path
    if isinstance(ckpt_or_path, dict):
        return CheckpointMeta.from_checkpoint(ckpt_or_path, source or "checkpoint")
    return CheckpointMeta.from_checkpoint(load_checkpoint(ckpt_or_path), str(ckpt_or_path))


def save_checkpoint(
    path,
    model_or_state_dict: nn.Module | dict,
    meta: CheckpointMeta | dict,
    extra: dict | None = None,
) -> None:
    """Write a checkpoint atomically: `meta` (a CheckpointMeta, or a dict of its keys) plus the
    weights and, in `extra`, anything else (e.g. last.pt's training state)."""
    if isinstance(meta, dict):
        if "arch" not in meta:
            raise ValueError("save_checkpoint: meta needs 'arch'")
        meta = CheckpointMeta.from_checkpoint(_arrays_to_lists(meta), str(path))
    sd = model_or_state_dict
    if isinstance(sd, nn.Module):
        sd = unwrap(sd).state_dict()
    sd = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in strip_prefixes(sd).items()}
    meta = replace(
        meta,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=str(torch.__version__),  # TorchVersion is not a plain str
    )
    ckpt = {"format": CHECKPOINT_FORMAT, **jsonable(_arrays_to_lists(meta.to_dict()))}
    ckpt["format"] = CHECKPOINT_FORMAT
    ckpt["state_dict"] = sd
    for k, v in (extra or {}).items():
        if k in ("format", "state_dict", "arch"):
            raise ValueError(f"save_checkpoint: extra may not override '{k}'")
        ckpt[k] = v
    _check_plain(ckpt, Path(path).name)
    with atomic_path(path) as tmp:
        try:
            torch.save(ckpt, tmp)
        except OSError as e:
            raise UserError(
                f"{path}: cannot write checkpoint ({e.strerror or e}); free disk space or "
                "choose another --out"
            ) from None


def _load_torch_file(path) -> object:
    """The only torch.load in the toolkit: weights_only, CPU, errors as UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such checkpoint; check the path (e.g. runs/NAME/best.pt)")
    if p.is_dir():
        raise UserError(f"{path}: is a directory; pass a checkpoint file such as {p / 'best.pt'}")
    with open(p, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch zip or raw pickle
        raise UserError(
            f"{path}: corrupt or not a PyTorch checkpoint file; pass a .pt from torch.save"
        )
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise before our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise UserError(
                f"{path}: not a safe checkpoint (it needs code beyond tensors and plain types "
                "to load), refused without running it; re-save it with "
                "torch.save(model.state_dict(), ...) from a trusted source"
            ) from None
        raise UserError(f"{path}: corrupt or not a PyTorch file ({e}); re-save it") from None
    except MemoryError:
        raise
    except Exception as e:  # truncated zip, garbage bytes (KeyError), EOFError, ...
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: corrupt, truncated or not a PyTorch file ({why}); re-save or re-copy it"
        ) from None


def load_checkpoint(path) -> dict:
    """Load and validate a checkpoint written by save_checkpoint (weights_only, on CPU)."""
    ckpt = _load_torch_file(path)
    if not isinstance(ckpt, dict):
        missing = "not a dict"
    else:
        missing = next((k for k in ("arch", "state_dict", "format") if k not in ckpt), None)
    if missing:
        what = missing if missing == "not a dict" else f"missing '{missing}'"
        raise UserError(
            f"{path}: not a checkpoint of this toolkit ({what}); use --weights for plain state dicts"
        )
    if not isinstance(ckpt["format"], int) or ckpt["format"] > CHECKPOINT_FORMAT:
        raise UserError(
            f"{path}: checkpoint format {ckpt['format']!r} is newer than this toolkit "
            f"({CHECKPOINT_FORMAT}); update the toolkit"
        )
    if not isinstance(ckpt["state_dict"], dict) or not isinstance(ckpt["arch"], str):
        raise UserError(f"{path}: damaged checkpoint ('state_dict' or 'arch' has the wrong type)")
    return ckpt


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """State dict from our checkpoint, a plain/wrapped .pt/.pth state dict, or .safetensors."""
    p = Path(path)
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise UserError(f"{path}: no such weights file; check --weights")
        from safetensors.torch import load_file  # a timm dependency; only needed here

        try:
            return strip_prefixes(load_file(str(p), device="cpu"))
        except Exception as e:
            raise UserError(f"{path}: cannot read safetensors file ({e}); re-save it") from None
    obj = _load_torch_file(p)
    if isinstance(obj, dict) and "format" in obj and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict):
        for k in STATE_DICT_KEYS:
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: no state dict of tensors found (has: {keys}); check --weights")
    return strip_prefixes({k: v for k, v in obj.items() if torch.is_tensor(v)})


def _preview(keys: list, n: int = 3) -> str:
    return ", ".join(map(str, keys[:n])) + (", ..." if len(keys) > n else "")


def load_weights(
    model: nn.Module,
    state_dict: dict,
    allow_partial: bool = False,
    skip_head: bool = False,
    source: str = "weights",
) -> dict:
    """Load `state_dict` into `model`, reporting missing/unexpected/shape-mismatched keys.

    Mismatches raise UserError (naming `source`) unless allow_partial: then what fits is loaded.
    skip_head leaves the classifier as initialised (e.g. a different number of classes).
    """
    target = unwrap(model)
    sd = {k: v for k, v in strip_prefixes(dict(state_dict)).items() if torch.is_tensor(v)}
    own = {k: v for k, v in target.state_dict().items() if torch.is_tensor(v)}
    if skip_head:
        heads = tuple(head_names(target))
        if heads:
            sd = {k: v for k, v in sd.items() if not k.startswith(heads)}
            own = {k: v for k, v in own.items() if not k.startswith(heads)}
    # BN step counters are absent from some older state dicts and never matter for inference.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shape = [
        (k, tuple(sd[k].shape), tuple(own[k].shape))
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    report = {"missing": missing, "unexpected": unexpected, "shape": shape}
    if (missing or unexpected or shape) and not allow_partial:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_preview(unexpected)})")
        if shape:
            s = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in shape[:3])
            parts.append(f"{len(shape)} shape mismatches ({s}{'; ...' if len(shape) > 3 else ''})")
        heads = tuple(head_names(target))
        only_head = heads and all(
            k.startswith(heads) for k in missing + unexpected + [s[0] for s in shape]
        )
        fix = (
            "only the classifier differs (other number of classes): skip the head"
            if only_head
            else "check --model/--in-chans match the file, or pass --allow-partial to load what fits"
        )
        raise UserError(f"{source}: does not fit the model: {', '.join(parts)}; {fix}")
    fits = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    target.load_state_dict(fits, strict=False)
    report["loaded"] = len(fits)
    return report


def model_from_checkpoint(ckpt: dict | CheckpointMeta, state_dict: dict | None = None) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (train mode, CPU).

    `ckpt` is a loaded checkpoint dict, or its CheckpointMeta plus `state_dict`."""
    meta = read_meta(ckpt)
    if state_dict is None:
        state_dict = ckpt["state_dict"]
    for k in ("num_classes", "in_chans"):
        if getattr(meta, k) is None:
            raise UserError(f"checkpoint of {meta.arch}: missing '{k}'; it cannot be rebuilt")
    model = create_model(
        meta.arch,
        meta.num_classes,
        meta.in_chans,
        meta.img_size,
        ModelOpts(
            model_kwargs=meta.model_kwargs,
            heads=[len(c) for c in meta.heads.values()] if meta.heads else None,
            check_size=False,  # it trained at this size
        ),
    )
    load_weights(model, state_dict, source=f"checkpoint of {meta.arch}")
    return model


def load_model(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint file alone; returns (model in eval mode, checkpoint)."""
    ckpt = load_checkpoint(path)
    try:
        model = model_from_checkpoint(ckpt)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval(), ckpt


def _timm():
    import timm  # lazy: importing timm costs seconds; built-in models do not need it

    return timm


# ---------------------------------------------------------------------------
# Runtime settings, the one flag group and set-up every script uses: where and how fast to run
# (device, mixed precision, memory layout, threads, evaluation batch, torch.compile). --quiet
# comes with common.add_common_flags. Nothing here changes what is computed beyond rounding.

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def add_runtime_flags(parser, eval_batch_size: int = 256, compile_flag: bool = True):
    """Add the "runtime" flag group (--device --amp --channels-last --threads --eval-batch-size
    [--compile]) to an argparse parser; returns the group so a script can add its own."""
    import argparse

    from common import positive_int, threads_int

    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps")
    g.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision; auto = bf16 on GPUs (fp16 without bf16) and on CPUs with AMX, else none",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last memory layout (faster convolutions on GPUs and recent CPUs)",
    )
    g.add_argument("--threads", type=threads_int, default=None, help="CPU threads (default: all)")
    g.add_argument(
        "--eval-batch-size", type=positive_int, default=eval_batch_size, help="images per forward"
    )
    if compile_flag:
        g.add_argument("--compile", action="store_true", help="torch.compile the model")
    return g


@dataclass(frozen=True)
class Runtime:
    """Resolved runtime settings (`setup_runtime`), taken by train.predict / train.evaluate;
    `dataclasses.replace(rt, quiet=True)` for a variant."""

    device: torch.device
    amp: str  # resolved: none | bf16 | fp16
    channels_last: bool = False
    eval_batch_size: int = 256
    quiet: bool = False
    compile: bool = False


def setup_runtime(args, local_rank: int | None = None) -> Runtime:
    """Apply --threads, resolve --device (cuda:LOCAL_RANK under torchrun) and --amp auto."""
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(getattr(args, "device", "auto"))
    if local_rank is not None and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Runtime(
        device=device,
        amp=resolve_amp(device, getattr(args, "amp", "auto")),
        channels_last=bool(getattr(args, "channels_last", False)),
        eval_batch_size=int(getattr(args, "eval_batch_size", 256) or 256),
        quiet=bool(getattr(args, "quiet", False)),
        compile=bool(getattr(args, "compile", False)),
    )


# ---------------------------------------------------------------------------
# Weight interpolation: the one rule for EMA updates, model soups (uniform / greedy running
# averages) and WiSE-FT.


@torch.no_grad()
def interpolate_state(dst: dict, src: dict, weight: float, inplace: bool = False) -> dict:
    """dst + weight * (src - dst) for every floating tensor (torch.lerp, in dst's dtype).

    Integer and bool tensors (BatchNorm num_batches_tracked) cannot be interpolated: they are
    taken from src when weight > 0 and kept from dst at weight 0. Keys missing from dst or of
    another shape (a new classifier head in WiSE-FT) are taken from src. inplace=True updates
    dst's tensors (e.g. an EMA model's state_dict()) and returns dst; otherwise a new dict with
    src's keys is returned and neither input is changed.
    """
    same = [k for k, v in src.items() if k in dst and tuple(dst[k].shape) == tuple(v.shape)]
    floats = [k for k in same if dst[k].is_floating_point()]
    if inplace:
        if floats:
            d = [dst[k] for k in floats]
            torch._foreach_lerp_(d, [src[k].to(dst[k].dtype) for k in floats], float(weight))
        for k, v in src.items():
            if k in floats:
                continue
            if k not in same:
                dst[k] = v.clone()
            elif weight > 0:
                dst[k].copy_(v)
        return dst
    out = {}
    for k, v in src.items():
        if k in floats:
            out[k] = torch.lerp(dst[k], v.to(dst[k].dtype), float(weight))
        elif k in same and weight == 0:
            out[k] = dst[k].clone()
        else:
            out[k] = v.clone()
    return out
