"""Looking at results: the step table and AP-by-frequency plot, the study report, weight-norm plots, drawings."""

from stepwise.analysis.draw import Style, class_color, display_scale, draw_boxes, enlarge

__all__ = ["Style", "class_color", "display_scale", "draw_boxes", "enlarge"]
