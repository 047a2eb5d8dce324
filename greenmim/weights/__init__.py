"""Pretrained weights into timm models, shared by fine-tuning, frozen-feature evaluation and detection.

* :mod:`.loading`: greenmim pretraining checkpoints, exported encoders and timm checkpoints into
  ``timm.create_model(...)`` or a detection trunk, with an exact report of missing/unexpected keys;
* :mod:`.export`: a pretraining checkpoint's encoder in timm's layout (``greenmim-export``);
* :mod:`.official_swin`: a timm Swin state in the official Swin layout (``python -m greenmim.cli.official_swin``);
* :mod:`.layer_decay`: layer-wise lr decay parameter groups for Swin and Twins;
* :func:`transfer_kwargs`: the timm constructor arguments of a ``model`` config's architecture.
"""
from .layer_decay import layer_id_fn, layer_map, param_groups_layer_decay
from .loading import LoadReport, load_pretrained, read_checkpoint
from .transfer import transfer_kwargs

__all__ = [
    "LoadReport", "load_pretrained", "read_checkpoint", "layer_id_fn", "layer_map", "param_groups_layer_decay",
    "transfer_kwargs",
]
