"""timm backbone with frozen BatchNorm returning strides 8/16/32 (C3-C5) and the padding mask per level."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

# Keys a classification checkpoint carries that a features_only backbone lacks.
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "global_pool.", "head_drop.")
# Stem + first stage of timm / torchvision ResNets (timm's deep-stem variants keep the names conv1/bn1).
RESNET_FROZEN_PREFIXES = ("conv1", "bn1", "layer1")


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a frozen copy (statistics and affine fixed); returns it.

    Plain BatchNorm2d/SyncBatchNorm become torchvision's FrozenBatchNorm2d; timm's fused BN+activation
    layers become timm's frozen equivalent so the activation is kept.
    """
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return timm.layers.freeze_batch_norm_2d(module)
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _feature_indices(name: str, strides: Sequence[int]) -> tuple[list[int], list[int]]:
    """timm ``out_indices`` and channels of the feature maps of ``name`` at ``strides`` (built on meta)."""
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, features_only=True)
    reductions = probe.feature_info.reduction()
    channels = probe.feature_info.channels()
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise ValueError(f"backbone {name!r} has no feature map at stride(s) {missing}; it offers {reductions}")
    idx = [reductions.index(s) for s in strides]
    return idx, [channels[i] for i in idx]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A backbone state dict from a file (plain, or under 'model'/'state_dict'; 'module.' prefixes stripped)."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read backbone weights from {path}: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"backbone weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class Backbone(nn.Module):
    """A timm ``features_only`` model; frozen BN (by default); some stages frozen; feature maps + per-level masks.

    Args:
        name: any timm model name offering the requested strides.
        weights: None (random init), a local file path, or "hub" (timm pretrained; random with a warning
            when it cannot be downloaded).
        strides: output strides (8, 16, 32 for C3-C5; (32,) for a single level).
        frozen_prefixes: parameter-name prefixes of the timm model to freeze; None = stem + layer1 for
            ResNets (names conv1/bn1/layer1), nothing otherwise.
        freeze_bn: replace BatchNorm by frozen BatchNorm (right for pretrained weights); a backbone trained
            from random weights needs live BatchNorm to learn.
    """

    def __init__(self, name: str, weights: str | None = None, strides: Sequence[int] = (8, 16, 32),
                 frozen_prefixes: Sequence[str] | None = None, freeze_bn: bool = True):
        super().__init__()
        out_indices, self.num_channels = _feature_indices(name, strides)
        self.strides = list(strides)
        self.body = self._create(name, weights, out_indices)
        if freeze_bn:
            freeze_batch_norm(self.body)
        if frozen_prefixes is None:
            names = {n for n, _ in self.body.named_children()}
            frozen_prefixes = RESNET_FROZEN_PREFIXES if {"conv1", "layer1"} <= names else ()
        self.frozen_prefixes = tuple(frozen_prefixes)
        for pname, param in self.body.named_parameters():
            if any(pname == p or pname.startswith(p + ".") for p in self.frozen_prefixes):
                param.requires_grad_(False)

    @staticmethod
    def _create(name: str, weights: str | None, out_indices: list[int]) -> nn.Module:
        kwargs = dict(features_only=True, out_indices=tuple(out_indices))
        if weights == "hub":
            try:
                return timm.create_model(name, pretrained=True, **kwargs)
            except Exception as err:  # no network, no cache, hub error: keep going from random weights
                warnings.warn(f"backbone {name!r}: could not load pretrained weights from the hub ({err}); "
                              "starting from RANDOM weights", RuntimeWarning, stacklevel=3)
                return timm.create_model(name, pretrained=False, **kwargs)
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights:
            path = Path(weights)
            state = _read_state_dict(path)
            state = {k: v for k, v in state.items()
                     if not k.startswith(_CLASSIFIER_PREFIXES) and not k.endswith("num_batches_tracked")}
            try:
                result = model.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shape mismatches
                raise ValueError(f"backbone weights {path} do not fit {name!r}: {err}") from err
            if result.missing_keys:
                raise ValueError(f"backbone weights {path} lack {len(result.missing_keys)} key(s) of "
                                 f"{name!r}, e.g. {result.missing_keys[:5]}")
            if result.unexpected_keys:
                warnings.warn(f"backbone weights {path}: ignored {len(result.unexpected_keys)} key(s) not in "
                              f"{name!r}, e.g. {result.unexpected_keys[:5]}", stacklevel=3)
        return model

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images (B, 3, H, W), masks (B, H, W) bool True = padding ->
        (feature maps (B, C_l, H_l, W_l) per stride, masks (B, H_l, W_l) bool per stride)."""
        features = self.body(images)
        return features, [downsample_mask(masks, f.shape[-2:]) for f in features]


def downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, H, W) bool padding mask -> (B, h, w) bool by nearest interpolation, as DETR."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
