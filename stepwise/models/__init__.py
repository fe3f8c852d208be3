"""Deformable DETR: backbone, position encoding, deformable transformer, detector, matcher, criterion.

``build_detector(cfg.model, cfg.head, categories, cfg.loss) -> Detector(model, criterion, postprocess)``."""

from stepwise.models.backbone import Backbone, freeze_batch_norm
from stepwise.models.deformable_transformer import DeformableTransformer, MSDeformAttn, inverse_sigmoid
from stepwise.models.detector import (MLP, DeformableDETR, Detector, build_detector, build_network, decoder_class_heads,
                                      final_class_head, param_groups, trainable_only)
from stepwise.models.interop import load_hf_deformable_detr, load_original_deformable_detr
from stepwise.models.outputs import DetectorOutput
from stepwise.models.position_encoding import PositionEmbeddingSine

__all__ = [
    "Backbone", "DeformableDETR", "DeformableTransformer", "Detector", "DetectorOutput", "MLP", "MSDeformAttn",
    "PositionEmbeddingSine", "build_detector", "build_network", "decoder_class_heads", "final_class_head", "freeze_batch_norm",
    "inverse_sigmoid",
    "load_hf_deformable_detr", "load_original_deformable_detr", "param_groups", "trainable_only",
]
