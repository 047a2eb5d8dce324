"""Pretraining data: unlabelled image datasets, transforms, and the distributed loader."""
from .datasets import (
    DATASETS,
    DECODE_MODES,
    ImageFiles,
    SyntheticImages,
    build_pretrain_dataset,
    build_train_loader,
    check_decode,
    list_folder,
    list_imagefolder,
)
from .images import IMAGE_EXTENSIONS, CorruptImageError, DataError, load_rgb, to_rgb
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    image_hw,
    normalize,
    pretrain_transform,
)

__all__ = [
    "DATASETS", "DECODE_MODES", "check_decode", "ImageFiles", "SyntheticImages", "build_pretrain_dataset", "build_train_loader", "list_folder",
    "list_imagefolder", "IMAGE_EXTENSIONS", "CorruptImageError", "DataError", "load_rgb", "to_rgb",
    "IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "eval_transform", "image_hw", "normalize", "pretrain_transform",
]
