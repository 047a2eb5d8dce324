"""Encoders (visible-only and all-token) and pretraining models, by timm backbone name."""
from . import pvt_v2, swin, swinv2, twins  # noqa: F401  (importing them registers the Swin, Swin V2, Twins and PVTv2 names)
from .pretrain import MIMPretrainModel, create_pretrain_model, patchify, unpatchify
from .registry import UnknownModelError, check_architecture, create_encoder, get_spec, list_encoders, timm_args

__all__ = [
    "create_encoder", "create_pretrain_model", "list_encoders", "get_spec", "UnknownModelError", "timm_args", "check_architecture",
    "MIMPretrainModel", "patchify", "unpatchify",
]
