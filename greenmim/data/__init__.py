"""Pretraining data: unlabelled image datasets, transforms, and the distributed loader."""
from .datasets import (
    DATASETS,
    ImageFiles,
    SyntheticImages,
    build_pretrain_dataset,
    build_train_loader,
    list_folder,
    list_imagefolder,
)
from .images import IMAGE_EXTENSIONS, CorruptImageError, DataError, load_rgb, to_rgb
from .transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, eval_transform, image_hw, pretrain_transform

__all__ = [
    "DATASETS", "ImageFiles", "SyntheticImages", "build_pretrain_dataset", "build_train_loader", "list_folder",
    "list_imagefolder", "IMAGE_EXTENSIONS", "CorruptImageError", "DataError", "load_rgb", "to_rgb",
    "IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "eval_transform", "image_hw", "pretrain_transform",
]
