"""Fine-tuning pretrained Swin/Twins encoders as timm classifiers (``greenmim-finetune``).

* :mod:`.checkpoint_loading`: greenmim pretraining checkpoints, exported encoders and timm
  checkpoints into ``timm.create_model(...)``, with an exact report of missing/unexpected keys;
* :mod:`.layer_decay`: layer-wise lr decay parameter groups for Swin and Twins;
* :mod:`.data`: ImageNet-layout class folders, timm transforms, Mixup/CutMix and losses;
* :mod:`.evaluate`: top-1/top-5/loss with an exact distributed reduction;
* :mod:`.task`: the fine-tuning task run by the shared :class:`greenmim.engine.Trainer`.
"""
from .checkpoint_loading import LoadReport, load_pretrained
from .layer_decay import layer_map, param_groups_layer_decay
from .model import create_classifier

__all__ = ["LoadReport", "load_pretrained", "create_classifier", "layer_map", "param_groups_layer_decay"]
