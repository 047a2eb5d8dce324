"""FLOPs of one forward and backward pass, counted by PyTorch's ``FlopCounterMode``.

The counter sees the matrix products, convolutions and fused attention kernels that run, so
greenmim's figure is the work actually done on visible tokens and padding slots (group padding
included), and the baseline's the work on every token. Host-side work (the grouping solver) and
elementwise ops are not FLOPs here.

FlexAttention cannot run under the counter (torch's ``flex_attention`` raises there). It does the
same score and value products as SDPA on the same groups, so an ``attention="flex"`` encoder is
counted running SDPA.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..plan.collate import MIMBatch
from ..plan.planner import host_plan
from .step import TrainStep


@contextlib.contextmanager
def _countable_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Switch a flex encoder to SDPA for the count (yields whether it did), then back."""
    encoder = getattr(model, "encoder", None)
    flex = getattr(encoder, "attention", "sdpa") == "flex"
    if flex:
        encoder.attention = "sdpa"
    try:
        yield flex
    finally:
        if flex:
            encoder.attention = "flex"


def count_step_flops(step: TrainStep, batch: MIMBatch) -> int:
    """FLOPs of ``step``'s forward + backward on one batch (gradients are cleared afterwards)."""
    with _countable_attention(step.model) as switched:
        if switched:  # the device derives SDPA's pair tensors from the host plan
            batch = MIMBatch(batch.images, replace(host_plan(batch.plan), attention="sdpa"))
        with FlopCounterMode(display=False) as counter:
            step.forward_backward(batch)
    step.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
