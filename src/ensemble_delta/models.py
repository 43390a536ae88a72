"""Torchvision ResNets: building, base weights, heads, and freezing by strategy.

A model is split at the freeze point into a frozen `prefix` and a trainable `tail`
(both share the model's modules), so the engine can run the prefix once per image
and view, and train only the tail.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import UserError

# ResNet children in forward order; the tail starts at the first trainable one.
STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
FIRST_TRAINABLE = {"head": "fc", "layer4": "layer4", "layer3": "layer3", "full": "conv1"}
IMAGENET_WEIGHTS = {"imagenet": "IMAGENET1K_V2", "imagenet_v1": "IMAGENET1K_V1"}


def build(arch: str, num_outputs: int) -> nn.Module:
    """A randomly initialised torchvision ResNet with `num_outputs` outputs (torchvision's own key names)."""
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_outputs)


def backbone_param_names(model: nn.Module) -> list[str]:
    """Parameters shared with the base: everything but the head. Buffers are not parameters."""
    return [n for n, _ in model.named_parameters() if not n.startswith("fc.")]


def imagenet_state(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """Torchvision's ImageNet weights (downloaded into the torch hub cache when absent)."""
    enum_name = IMAGENET_WEIGHTS[weights]
    weights_enum = torchvision.models.get_model_weights(arch)
    if not hasattr(weights_enum, enum_name):
        raise UserError(f"model.weights: {arch} has no {enum_name} weights; use imagenet_v1 or another arch")
    try:
        return getattr(torchvision.models, arch)(weights=getattr(weights_enum, enum_name)).state_dict()
    except Exception as e:
        raise UserError(
            f"could not load {arch} {enum_name} weights ({type(e).__name__}); connect to the internet once or put the file in the torch hub cache"
        ) from None


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or torch.load(weights_only=True); never a pickle fallback."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model.weights: checkpoint {path} not found; give an existing .safetensors/.pt path")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"model.weights: cannot load {path} safely ({type(e).__name__}); save it as a plain state dict") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"model.weights: {path} does not hold a state dict; save model.state_dict()")
    return sd


_INIT_LOCK = threading.Lock()  # seeding and drawing an init use the global RNG: one thread at a time


def seeded_build(arch: str, num_outputs: int, seed: int) -> nn.Module:
    """build() with its random init drawn from `seed`, safe to call from several threads."""
    with _INIT_LOCK:
        torch.manual_seed(seed)
        return build(arch, num_outputs)


def with_head(arch: str, base_state: dict[str, torch.Tensor], num_outputs: int, seed: int) -> nn.Module:
    """The base backbone with a new head of `num_outputs` outputs, its init drawn from `seed`.

    The skeleton is built on the meta device (no random init of the backbone, which the
    base weights replace anyway) and the backbone tensors are copied in; only the head
    is initialised, as nn.Linear does.
    """
    with torch.device("meta"):
        model = build(arch, num_outputs)
    backbone = {k: v.clone() for k, v in base_state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(
            f"base weights do not fit {arch} (missing {missing[:2]}, unexpected {unexpected[:2]}); give a checkpoint of the same architecture"
        )
    with _INIT_LOCK:
        torch.manual_seed(seed)
        model.fc = nn.Linear(model.fc.in_features, num_outputs)
    return model


def split(model: nn.Module, freeze: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(frozen prefix, trainable tail) of a ResNet at the freeze point; modules are shared, not copied."""
    cut = STAGES.index(FIRST_TRAINABLE[freeze])
    mods = [(n, getattr(model, n)) for n in STAGES]
    mods.insert(STAGES.index("fc"), ("flatten", nn.Flatten(1)))
    if cut >= STAGES.index("fc"):
        cut += 1  # the head's input is the flattened pooled feature
    return nn.Sequential(OrderedDict(mods[:cut])), nn.Sequential(OrderedDict(mods[cut:]))


def freeze(model: nn.Module, freeze: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Freeze the prefix (no gradients, eval mode so BatchNorm statistics do not move)."""
    prefix, tail = split(model, freeze)
    for p in prefix.parameters():
        p.requires_grad_(False)
    prefix.eval()
    return prefix, tail


def set_train_mode(prefix: nn.Module, tail: nn.Module) -> None:
    """Tail trains; the frozen prefix stays in eval mode (its BatchNorm buffers must not move)."""
    tail.train()
    prefix.eval()


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def stack_heads(heads: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """K binary heads (weight [1, D], bias [1]) as one K-output linear layer, under torchvision's fc keys."""
    return {"fc.weight": torch.cat([w for w, _ in heads]), "fc.bias": torch.cat([b for _, b in heads])}


class WindowConv2d(nn.Conv2d):
    """A Conv2d that computes a one-pixel output as one matrix product over the taps that touch the input.

    Why: at the offline default's 32 px, ResNet's layer4 sees 2x2 and 1x1 maps, so all its
    convolutions output a single pixel. oneDNN's CPU backward for a 3x3 kernel on a 1x1
    map is 10-30x slower than its forward (it does not skip the taps that only meet
    padding), and layer4 took over half of a full fine-tuning step. A single output pixel
    is a linear layer over the input window, so this is the same convolution, exactly:
    the taps that meet only padding multiply zeros, and autograd gives them exactly zero
    gradient, as the convolution's own backward does. Any other shape runs the usual
    kernel. Parameters and state-dict keys are the Conv2d's (tests/test_models.py).
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        window = self._single_output_window(x.shape[-2:])
        if window is None:
            return super()._conv_forward(x, weight, bias)
        (i0, i1), (j0, j1) = window
        (ph, pw) = self.padding
        patch = x[:, :, i0 - ph : i1 - ph, j0 - pw : j1 - pw]  # the input under taps [i0, i1) x [j0, j1)
        return F.linear(patch.flatten(1), weight[:, :, i0:i1, j0:j1].flatten(1), bias)[:, :, None, None]

    def _single_output_window(self, hw: torch.Size) -> tuple[tuple[int, int], ...] | None:
        """The kernel taps [start, stop) per axis that overlap the input, when the output is one pixel; else None."""
        if self.groups != 1 or self.padding_mode != "zeros" or self.dilation != (1, 1) or isinstance(self.padding, str):
            return None
        window = []
        for n, k, s, p in zip(hw, self.kernel_size, self.stride, self.padding):
            if n + 2 * p - k >= s:  # more than one output position along this axis
                return None
            window.append((p, min(k, n + p)))  # output 0 reads padded positions 0..k-1, i.e. input rows -p..k-1-p
        return tuple(window)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """A MaxPool2d that pools in channels-last memory order and hands back the usual layout.

    Why: ATen's CPU max-pool kernel for contiguous (NCHW) maps is 10-15x slower than its
    channels-last one (3.8 vs 0.26 ms for ResNet's stem output [64, 64, 16, 16]); it was
    a fifth of a ResNet18 forward at 32 px. A maximum involves no rounding, and both
    kernels break ties alike, so values and gradients are bit for bit the usual ones
    (tests/test_models.py); the two layout copies cost far less than the kernel saves.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap in the CPU kernels that compute the same thing faster, in place: WindowConv2d for
    every plain Conv2d, ChannelsLastMaxPool2d for every plain MaxPool2d. Parameters,
    buffers and state-dict keys are unchanged; only the forward differs."""
    swaps = {nn.Conv2d: WindowConv2d, nn.MaxPool2d: ChannelsLastMaxPool2d}
    for m in model.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]
    return model
