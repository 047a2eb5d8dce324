"""Fine-tuning pretrained Swin/Twins encoders as timm classifiers (``greenmim-finetune``).

Weight loading and layer decay live in :mod:`greenmim.weights` (shared with detection);
* :mod:`.data`: ImageNet-layout class folders, timm transforms, Mixup/CutMix and losses;
* :mod:`.evaluate`: top-1/top-5/loss with an exact distributed reduction;
* :mod:`.task`: the fine-tuning task run by the shared :class:`greenmim.engine.Trainer`.
* :mod:`.run`: the flows ``greenmim-finetune`` calls: fine-tuning, and evaluating a checkpoint (``eval_only``).
"""
from .model import create_classifier

__all__ = ["create_classifier"]
