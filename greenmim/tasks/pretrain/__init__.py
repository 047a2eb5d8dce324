"""Masked image modeling pretraining (``greenmim-pretrain``).

* :mod:`.task`: :class:`PretrainTask`, what the shared trainer runs (model, loader, step, checkpoints);
* :mod:`.loss`: the loss of one planned batch (the trainer's and the benchmark's);
* :mod:`.reconstructions`: image grids of input, mask and reconstruction (``greenmim-visualize``).
"""
