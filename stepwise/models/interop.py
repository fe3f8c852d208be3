"""Load Deformable DETR weights from Hugging Face transformers or the original repository into DeformableDETR.

Both loaders rename keys onto this model's layout (which follows the original repository), check that
every key is accounted for and every shape fits, and raise a ValueError naming the offending keys.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch
from torch import nn

# HF's own ResNet (use_timm_backbone=False) -> timm/torchvision ResNet names.
_BLOCK = r"^encoder\.stages\.(\d+)\.layers\.(\d+)\."
_HF_RESNET_RULES = [
    (re.compile(r"^embedder\.embedder\.convolution\.(.*)$"), r"conv1.\1"),
    (re.compile(r"^embedder\.embedder\.normalization\.(.*)$"), r"bn1.\1"),
    (re.compile(_BLOCK + r"shortcut\.convolution\.(.*)$"), "layer{s}.{b}.downsample.0.{r}"),
    (re.compile(_BLOCK + r"shortcut\.normalization\.(.*)$"), "layer{s}.{b}.downsample.1.{r}"),
    (re.compile(_BLOCK + r"layer\.(\d+)\.convolution\.(.*)$"), "layer{s}.{b}.conv{k}.{r}"),
    (re.compile(_BLOCK + r"layer\.(\d+)\.normalization\.(.*)$"), "layer{s}.{b}.bn{k}.{r}"),
]

_ENCODER_LAYER = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "mlp.fc1": "linear1", "fc2": "linear2",
                  "mlp.fc2": "linear2", "final_layer_norm": "norm2"}
_DECODER_LAYER = {"self_attn_layer_norm": "norm2", "encoder_attn_layer_norm": "norm1", "fc1": "linear1",
                  "mlp.fc1": "linear1", "fc2": "linear2", "mlp.fc2": "linear2", "final_layer_norm": "norm3",
                  "self_attn.o_proj": "self_attn.out_proj", "self_attn.out_proj": "self_attn.out_proj",
                  "encoder_attn": "cross_attn"}
_TRANSFORMER_TOP = ("reference_points", "enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")


def _hf_resnet_to_timm(name: str) -> str:
    for pattern, repl in _HF_RESNET_RULES:
        m = pattern.match(name)
        if m is None:
            continue
        if "{" not in repl:
            return pattern.sub(repl, name)
        g = m.groups()
        if len(g) == 3:
            return repl.format(s=int(g[0]) + 1, b=g[1], r=g[2])
        return repl.format(s=int(g[0]) + 1, b=g[1], k=int(g[2]) + 1, r=g[3])
    return name  # timm backbones already use timm names


def _rename_layer(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module path of ``rest`` (e.g. 'mlp.fc1.weight') with ``table``, longest first."""
    for old in sorted(table, key=len, reverse=True):
        if rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


def _head_linear_prefix(model: nn.Module) -> str:
    """The name of the single Linear in ``model.class_embed[0]`` (the only head layout a checkpoint fits)."""
    head = model.class_embed[0]
    keys = list(head.state_dict())
    prefixes = {k.rsplit(".", 1)[0] for k in keys}
    if len(keys) != 2 or len(prefixes) != 1 or not isinstance(head.get_submodule(next(iter(prefixes))), nn.Linear):
        raise ValueError("only a head made of one Linear layer (head=sigmoid) can take Deformable DETR class_embed "
                         f"weights; this head has keys {keys}")
    return next(iter(prefixes))


def _to_state_dict(obj: Any, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        if "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        return dict(obj)
    raise TypeError(f"{what}: expected a state dict or a module, got {type(obj).__name__}")


def _convert(state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None],
             ) -> tuple[dict[str, torch.Tensor], list[str], dict[str, torch.Tensor]]:
    """Apply ``rename`` (None = drop) to every key; collect HF's split q/k/v for nn.MultiheadAttention."""
    out, unmapped, qkv = {}, [], {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        try:
            new = rename(key)
        except KeyError:
            unmapped.append(key)
            continue
        if new is None:
            continue
        if new.startswith("__qkv__"):
            qkv[new] = value
            continue
        out[new] = value
    return out, unmapped, qkv


def _load_checked(model: nn.Module, mapped: dict[str, torch.Tensor], unmapped: list[str], source: str) -> None:
    """Check keys, shapes and shared-parameter consistency, then load (strict)."""
    own = model.state_dict()
    # Frozen-BN checkpoints carry no BatchNorm step counters; a model with live BatchNorm starts its own.
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = torch.zeros_like(value)
    missing = [k for k in own if k not in mapped]
    unexpected = [k for k in mapped if k not in own] + unmapped
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in mapped.items() if k in own and v.shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model key(s) missing from the {source} weights: {missing[:8]}")
    if unexpected:
        problems.append(f"{len(unexpected)} {source} key(s) with no place in this model: {unexpected[:8]}")
    if wrong:
        problems.append(f"shape mismatches: {wrong[:8]}")
    if problems:
        raise ValueError("cannot load weights: " + "; ".join(problems)
                         + " (check with_box_refine, two_stage, num_feature_levels, layers, classes, backbone)")
    # Parameters this model shares across decoder layers must get equal values.
    by_storage: dict[int, str] = {}
    for key, tensor in own.items():
        first = by_storage.setdefault(tensor.data_ptr(), key)
        if first != key and tensor.numel() and not torch.equal(mapped[first], mapped[key]):
            raise ValueError(f"{source} weights differ between {first} and {key}, which this model shares; "
                             "build the model with with_box_refine=true")
    model.load_state_dict(mapped, strict=True)


def load_hf_deformable_detr(model: nn.Module, hf_state_dict_or_model: Any) -> None:
    """Load a Hugging Face ``DeformableDetrForObjectDetection`` (module or its state dict) into ``model``.

    Handles timm backbones and HF's own ResNet, transformers 4.x/5.x layer names (``fc1``/``mlp.fc1``,
    ``out_proj``/``o_proj``) and merges the decoder's split q/k/v projections into nn.MultiheadAttention's
    ``in_proj``. ``model`` must have the same architecture (layers, levels, box refine, two-stage, classes).
    """
    state = _to_state_dict(hf_state_dict_or_model, "load_hf_deformable_detr")
    linear = _head_linear_prefix(model)

    def rename(key: str) -> str | None:
        if m := re.match(r"^model\.backbone\.(?:conv_encoder\.)?model\.(.*)$", key):
            return "backbone.body." + _hf_resnet_to_timm(m.group(1))
        if m := re.match(r"^model\.input_proj\.(.*)$", key):
            return "input_proj." + m.group(1)
        if key == "model.level_embed":
            return "transformer.level_embed"
        if key == "model.query_position_embeddings.weight":
            return "query_embed.weight"
        if m := re.match(rf"^model\.({'|'.join(_TRANSFORMER_TOP)})\.(weight|bias)$", key):
            return f"transformer.{m.group(1)}.{m.group(2)}"
        if m := re.match(r"^model\.encoder\.layers\.(\d+)\.(.*)$", key):
            return f"transformer.encoder.layers.{m.group(1)}." + _rename_layer(m.group(2), _ENCODER_LAYER)
        if m := re.match(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            return f"__qkv__.{m.group(1)}.{m.group(3)}.{m.group(2)}"
        if m := re.match(r"^model\.decoder\.layers\.(\d+)\.(.*)$", key):
            return f"transformer.decoder.layers.{m.group(1)}." + _rename_layer(m.group(2), _DECODER_LAYER)
        if re.match(r"^model\.decoder\.(bbox_embed|class_embed)\.", key):
            tied = key.removeprefix("model.decoder.")
            if tied in state and not torch.equal(state[tied], state[key]):
                raise ValueError(f"HF weights: {key} differs from {tied}; this model (like the original) uses "
                                 "one set of heads for refinement and prediction")
            return None
        if m := re.match(r"^class_embed\.(\d+)\.(weight|bias)$", key):
            return f"class_embed.{m.group(1)}.{linear}.{m.group(2)}"
        if m := re.match(r"^bbox_embed\.(\d+\.layers\.\d+\.(?:weight|bias))$", key):
            return "bbox_embed." + m.group(1)
        raise KeyError(key)

    mapped, unmapped, qkv = _convert(state, rename)
    layers = sorted({k.split(".")[1] for k in qkv}, key=int)
    for layer in layers:
        for kind in ("weight", "bias"):
            parts = [qkv.get(f"__qkv__.{layer}.{kind}.{c}") for c in "qkv"]
            if any(p is None for p in parts):
                raise ValueError(f"HF weights: decoder layer {layer} lacks one of self_attn.q/k/v_proj.{kind}")
            mapped[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(parts, 0)
    _load_checked(model, mapped, unmapped, "HF")


def load_original_deformable_detr(model: nn.Module, checkpoint_state_dict: Any) -> None:
    """Load a fundamentalvision/Deformable-DETR checkpoint (``{'model': ...}`` or its state dict).

    Renames ``backbone.0.body.*`` (torchvision ResNet, whose names timm ResNets share) to
    ``backbone.body.*`` and ``class_embed.i.{weight,bias}`` into the head's Linear; drops the decoder's
    references to the detector heads (``transformer.decoder.{class,bbox}_embed``).
    """
    state = _to_state_dict(checkpoint_state_dict, "load_original_deformable_detr")
    linear = _head_linear_prefix(model)

    def rename(key: str) -> str | None:
        if m := re.match(r"^backbone\.0\.body\.(.*)$", key):
            return "backbone.body." + m.group(1)
        if re.match(r"^transformer\.decoder\.(bbox_embed|class_embed)\.", key):
            return None
        if m := re.match(r"^class_embed\.(\d+)\.(weight|bias)$", key):
            return f"class_embed.{m.group(1)}.{linear}.{m.group(2)}"
        if re.match(r"^(input_proj|transformer|bbox_embed|query_embed)\.", key):
            return key
        raise KeyError(key)

    mapped, unmapped, _ = _convert(state, rename)
    _load_checked(model, mapped, unmapped, "original Deformable DETR")
