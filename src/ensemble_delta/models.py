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
