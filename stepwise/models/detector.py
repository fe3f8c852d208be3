"""Deformable DETR detector: backbone -> input_proj -> deformable transformer -> per-layer class/box heads."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stepwise.heads import ClassifierHead, build_head
from stepwise.models.backbone import Backbone, downsample_mask
from stepwise.models.criterion import SetCriterion, build_criterion
from stepwise.models.deformable_transformer import DeformableTransformer, inverse_sigmoid
from stepwise.models.outputs import DetectorOutput
from stepwise.models.position_encoding import PositionEmbeddingSine
from stepwise.models.postprocess import PostProcess


class MLP(nn.Module):
    """A small feed-forward net (ReLU between layers): (..., in_dim) -> (..., out_dim)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DeformableDETR(nn.Module):
    """Deformable DETR with an exchangeable classifier head (see stepwise.heads).

    Attribute names follow the original repository (``input_proj``, ``transformer``, ``query_embed``,
    ``class_embed``, ``bbox_embed``). With box refinement every decoder layer has its own class head and box
    MLP; otherwise one of each is shared by all layers. In two-stage, one extra (last) class head and box MLP
    score and regress the encoder proposals.
    """

    def __init__(self, backbone: Backbone, transformer: DeformableTransformer, class_head: nn.Module,
                 num_queries: int, num_feature_levels: int, with_box_refine: bool = False,
                 two_stage: bool = False):
        super().__init__()
        d = transformer.d_model
        self.num_queries, self.num_feature_levels = num_queries, num_feature_levels
        self.with_box_refine, self.two_stage = with_box_refine, two_stage
        self.backbone = backbone
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True)
        self.input_proj = self._make_input_proj(backbone.num_channels, d, num_feature_levels)
        self.transformer = transformer
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, d * 2)

        bbox_embed = MLP(d, d, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_head] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            for box in self.bbox_embed:
                nn.init.constant_(box.layers[-1].bias[2:], 0.0)

    @staticmethod
    def _make_input_proj(in_channels: Sequence[int], d: int, num_levels: int) -> nn.ModuleList:
        """1x1 conv + GN per backbone level, then 3x3 stride-2 conv + GN for each extra level."""
        if d % 32:
            raise ValueError(f"d_model ({d}) must be a multiple of 32 for GroupNorm(32, d_model)")
        layers = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in in_channels]
        c = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            layers.append(nn.Sequential(nn.Conv2d(c, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            c = d
        for proj in layers:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        return nn.ModuleList(layers)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> DetectorOutput:
        """images (B, 3, H, W) normalised; masks (B, H, W) bool, True on padding (None = no padding).

        Returns a DetectorOutput: per decoder layer logits (B, Q, K), boxes (B, Q, 4) cxcywh in [0, 1] of
        the unpadded image and query features (B, Q, D); input_proj outputs (B, D, H_l, W_l) and masks
        per level; the two-stage encoder proposals (B, S, K) / (B, S, 4) or None.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if masks is None:
            masks = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        if masks.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"masks must be (B, H, W) = {(images.shape[0], *images.shape[-2:])}, "
                             f"got {tuple(masks.shape)}")
        features, feat_masks = self.backbone(images, masks.bool())
        srcs, proj_masks = [], []
        for lvl, (feat, mask) in enumerate(zip(features, feat_masks)):
            srcs.append(self.input_proj[lvl](feat))
            proj_masks.append(mask)
        for lvl in range(len(features), self.num_feature_levels):
            srcs.append(self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1]))
            proj_masks.append(downsample_mask(masks.bool(), srcs[-1].shape[-2:]))
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, proj_masks)]

        n_dec = self.transformer.decoder.num_layers
        hs, init_ref, inter_refs, enc_logits, enc_coord_logits = self.transformer(
            srcs, proj_masks, pos, None if self.two_stage else self.query_embed.weight,
            refine_bbox_embed=self.bbox_embed if self.with_box_refine else None,
            enc_class_embed=self.class_embed[n_dec] if self.two_stage else None,
            enc_bbox_embed=self.bbox_embed[n_dec] if self.two_stage else None)

        logits, boxes = [], []
        for lvl in range(n_dec):
            reference = inverse_sigmoid(init_ref if lvl == 0 else inter_refs[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(coord.sigmoid())
        return DetectorOutput(
            logits=logits, boxes=boxes, query_features=list(hs.unbind(0)), proj_features=srcs,
            proj_masks=proj_masks, enc_logits=enc_logits,
            enc_boxes=enc_coord_logits.sigmoid() if enc_coord_logits is not None else None)


def final_class_head(model: nn.Module) -> ClassifierHead:
    """The final decoder layer's class head (``class_embed[num_decoder_layers - 1]``) of a
    ``DeformableDETR``, also when wrapped by DDP: the head the criterion and post-processing use."""
    return decoder_class_heads(model)[-1]


def decoder_class_heads(model: nn.Module) -> list[ClassifierHead]:
    """The class head of every decoder layer, first to last (not the two-stage encoder's)."""
    model = getattr(model, "module", model)
    return list(model.class_embed[:model.transformer.decoder.num_layers])


def build_network(cfg_model, cfg_head, categories_or_num_classes: Any) -> DeformableDETR:
    """The DeformableDETR network alone (what :func:`build_detector` wraps), from ``cfg.model`` and
    ``cfg.head`` for a CategoryMap (anything with len) or a number of classes. Grouped heads get
    ``categories=`` as build context."""
    if isinstance(categories_or_num_classes, int):
        num_classes, context = categories_or_num_classes, {}
    else:
        num_classes, context = len(categories_or_num_classes), {"categories": categories_or_num_classes}
    if num_classes < 1:
        raise ValueError(f"build_detector: need at least one class, got {num_classes}")
    levels = int(cfg_model.num_feature_levels)
    if levels == 2:
        raise ValueError("model.num_feature_levels must be 1 (C5 only) or >= 3 (C3-C5 + extra levels)")
    backbone = Backbone(cfg_model.backbone_name, weights=cfg_model.backbone_weights,
                        strides=(8, 16, 32) if levels > 1 else (32,),
                        frozen_prefixes=cfg_model.backbone_frozen_prefixes,
                        freeze_bn=bool(cfg_model.backbone_freeze_bn))
    two_stage = bool(cfg_model.two_stage)
    transformer = DeformableTransformer(
        d_model=cfg_model.d_model, nhead=cfg_model.nheads, num_encoder_layers=cfg_model.enc_layers,
        num_decoder_layers=cfg_model.dec_layers, dim_feedforward=cfg_model.dim_feedforward,
        dropout=cfg_model.dropout, activation=cfg_model.activation, num_feature_levels=levels,
        dec_n_points=cfg_model.dec_n_points, enc_n_points=cfg_model.enc_n_points, two_stage=two_stage,
        two_stage_num_proposals=cfg_model.num_queries,
        # .get: configs saved in checkpoints written before the key existed lack it
        msda_low_precision=bool(cfg_model.get("msda_low_precision", False)))
    head = build_head(cfg_head, cfg_model.d_model, num_classes, **context)
    return DeformableDETR(backbone, transformer, head, num_queries=cfg_model.num_queries,
                          num_feature_levels=levels, with_box_refine=bool(cfg_model.with_box_refine),
                          two_stage=two_stage)


@dataclass
class Detector:
    """What :func:`build_detector` returns, as DETR's ``build()`` returns model, criterion and
    post-processors: the network, the set criterion that trains it and the post-processing that turns its
    output into detections, both talking to the network's own (final decoder layer's) class head.

    ``model, criterion, postprocess = build_detector(...)`` unpacks it. Callers never look the heads up
    in the network themselves: ``head`` (final layer: weight rows, tau, scores), ``class_heads`` (every
    decoder layer's, for distillation) and ``scores(outputs)`` are here.
    """

    model: DeformableDETR
    criterion: SetCriterion | None  # None when built without a loss config
    postprocess: PostProcess

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.criterion, self.postprocess))

    @classmethod
    def of(cls, model: nn.Module, cfg_loss: Any = None,
           reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, num_top: int = 300) -> "Detector":
        """The criterion (with ``cfg_loss``) and post-processing around an existing network: a freshly built
        one, a loaded checkpoint's, a tau-normalised copy. ``reduce_fn`` averages the box count over
        processes (see ``SetCriterion``)."""
        net = getattr(model, "module", model)
        head = final_class_head(net)
        criterion = None
        if cfg_loss is not None:
            criterion = build_criterion(cfg_loss, head, num_layers=net.transformer.decoder.num_layers,
                                        two_stage=bool(net.two_stage), reduce_fn=reduce_fn)
        return cls(model, criterion, PostProcess(num_top=num_top, head=head))

    @property
    def head(self) -> ClassifierHead:
        """The final decoder layer's class head (the one the criterion and the post-processing use)."""
        return final_class_head(self.model)

    @property
    def class_heads(self) -> list[ClassifierHead]:
        """The class head of every decoder layer, first to last (not the two-stage encoder's)."""
        return decoder_class_heads(self.model)

    def scores(self, outputs: DetectorOutput) -> torch.Tensor:
        """Final-layer class probabilities (B, Q, C), float32 (the head's ``scores``)."""
        return self.postprocess.scores(outputs)


def build_detector(cfg_model, cfg_head, categories_or_num_classes: Any, cfg_loss: Any = None,
                   reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, num_top: int = 300) -> Detector:
    """The detector of ``cfg.model``/``cfg.head`` for a CategoryMap (anything with len) or a number of
    classes, with its criterion (from ``cfg.loss`` when given; ``reduce_fn`` see ``SetCriterion``) and its
    post-processing (``num_top`` detections per image). Only the network's construction draws random
    numbers: the criterion and the post-processing hold no parameters of their own."""
    return Detector.of(build_network(cfg_model, cfg_head, categories_or_num_classes), cfg_loss, reduce_fn, num_top)


LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def param_groups(model: nn.Module, cfg: Mapping) -> list[dict]:
    """AdamW parameter groups as Deformable DETR: backbone at ``lr_backbone``; names containing
    ``reference_points``/``sampling_offsets`` at ``lr * lr_linear_proj_mult`` (0.1); the rest at ``lr``.

    ``cfg`` needs ``lr``, ``lr_backbone``, ``weight_decay``; optional ``lr_linear_proj_mult``. Only
    trainable parameters are included, each once; empty groups are dropped. Each group carries a "name".
    """
    for key in ("lr", "lr_backbone", "weight_decay"):
        if key not in cfg:
            raise KeyError(f"param_groups: optimiser config lacks {key!r}")
    lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
    mult = float(cfg.get("lr_linear_proj_mult", 0.1))
    groups = {"backbone": [], "linear_proj": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif any(k in name for k in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(p)
        else:
            groups["other"].append(p)
    lrs = {"backbone": float(cfg["lr_backbone"]), "linear_proj": lr * mult, "other": lr}
    return [{"name": k, "params": v, "lr": lrs[k], "weight_decay": wd} for k, v in groups.items() if v]


def trainable_only(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Freeze every parameter except those whose name is or starts with ``prefix + "."`` for a prefix.

    Returns the names left trainable. Raises ValueError naming a prefix that matches no parameter.
    """
    prefixes = [p.rstrip(".") for p in prefixes]
    used, trainable = set(), []
    for name, p in model.named_parameters():
        hit = [pre for pre in prefixes if name == pre or name.startswith(pre + ".")]
        p.requires_grad_(bool(hit))
        used.update(hit)
        if hit:
            trainable.append(name)
    unused = [p for p in prefixes if p not in used]
    if unused:
        raise ValueError(f"trainable_only: no parameter name starts with {unused}")
    return trainable
