"""Encoders (visible-only and all-token) and pretraining models, by timm backbone name."""
from . import swin  # noqa: F401  (registers the Swin names)
from .pretrain import MIMPretrainModel, create_pretrain_model, patchify, unpatchify
from .registry import create_encoder, get_spec, list_encoders

try:  # Twins registers itself when its module exists
    from . import twins  # noqa: F401
except ImportError as exc:  # pragma: no cover - only while twins is absent
    if "twins" not in str(exc):
        raise

__all__ = ["create_encoder", "create_pretrain_model", "list_encoders", "get_spec", "MIMPretrainModel", "patchify", "unpatchify"]
