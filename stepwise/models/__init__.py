"""Deformable DETR: backbone, position encoding, deformable transformer, detector, matcher, criterion."""
