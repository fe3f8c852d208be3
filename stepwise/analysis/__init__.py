"""Looking at trained models: predictions drawn on images, a checkpoint's detector rebuilt for inference."""

from stepwise.analysis.draw import Style, class_color, display_scale, draw_boxes, enlarge
from stepwise.analysis.trained import TrainedModel, apply_overrides, load_trained_model, run_dir_of

__all__ = ["Style", "TrainedModel", "apply_overrides", "class_color", "display_scale", "draw_boxes", "enlarge",
           "load_trained_model", "run_dir_of"]
