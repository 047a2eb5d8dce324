"""FLOPs of one forward and backward pass, counted by PyTorch's ``FlopCounterMode``.

The counter sees the matrix products, convolutions and fused attention kernels that run, so
greenmim's figure is the work actually done on visible tokens and padding slots (group padding
included), and the baseline's the work on every token. Host-side work (the grouping solver) and
elementwise ops are not FLOPs here.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..planning import HostPlan
from .step import TrainStep


def count_step_flops(step: TrainStep, images: torch.Tensor, plan: HostPlan) -> int:
    """FLOPs of ``step``'s forward + backward on one batch (gradients are cleared afterwards)."""
    with FlopCounterMode(display=False) as counter:
        step.forward_backward(images, plan)
    step.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
