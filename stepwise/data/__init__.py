"""Data: LVIS/COCO-format datasets, transforms, samplers and the built-in synthetic long-tailed set."""

from stepwise.data.categories import CategoryMap
from stepwise.data.collate import ImageBatch, collate
from stepwise.data.loaders import build_dataset, build_eval_loader, build_train_loader
from stepwise.data.lvis_dataset import DataWarning, LVISDetection, image_path
from stepwise.data.samplers import (RepeatFactorSampler, repeat_factors_from_dataset,
                                    repeat_factors_from_image_classes)
from stepwise.data.transforms import build_transforms

__all__ = ["CategoryMap", "DataWarning", "ImageBatch", "LVISDetection", "RepeatFactorSampler", "build_dataset",
           "build_eval_loader", "build_train_loader", "build_transforms", "collate", "image_path",
           "repeat_factors_from_dataset", "repeat_factors_from_image_classes"]
