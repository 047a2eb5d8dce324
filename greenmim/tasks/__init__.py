"""What the shared :class:`greenmim.engine.Trainer` runs: one package per task.

* :mod:`.pretrain`: masked image modeling (``greenmim-pretrain``);
* :mod:`.finetune`: classification fine-tuning (``greenmim-finetune``);
* :mod:`.frozen_eval`: k-NN and linear probe on frozen features (``greenmim-finetune protocol=...``);
* :mod:`.detect`: COCO detection transfer with Mask R-CNN (``greenmim-detect``).
"""
