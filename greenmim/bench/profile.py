"""Where a training step's time goes: the top operators of one profiled step of each method."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from ..planning import HostPlan
from .step import TrainStep, synchronize

PHASES = ("forward", "backward", "optimizer")


def profile_steps(step: TrainStep, images: torch.Tensor, plans: Sequence[HostPlan], rows: int = 15) -> Dict[str, Any]:
    """Profile one full step per plan and return, per step, its phases' time and the top ``rows``
    operators by self time (CPU self time on CPU; CUDA self time when the step runs on a GPU),
    plus the encoder's grouping time (host) of those steps.

    Phases are :class:`TrainStep`'s profiler ranges: ``forward`` (the model call, host-side grouping
    included), ``backward`` and ``optimizer`` (step + zero_grad). An operator's *self* time excludes
    its children, so the host-side grouping shows up as the ``forward`` range's own self time.
    """
    device = images.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    grouping_ms = 0.0
    with profile(activities=activities) as prof:
        for plan in plans:
            step(images, plan)
            synchronize(device)
            grouping_ms += float(step.grouping.get("ms", 0.0))
    n = len(plans)
    cuda = device.type == "cuda"
    events = prof.key_averages()
    total_self = sum(_self_time(e, cuda) for e in events)
    phases = {e.key: e.cpu_time_total / 1e3 / n for e in events if e.key in PHASES}
    top: List[Dict[str, Any]] = []
    for e in sorted(events, key=lambda e: _self_time(e, cuda), reverse=True)[:rows]:
        t = _self_time(e, cuda)
        top.append({"name": e.key, "self_ms": t / 1e3 / n, "share": t / max(total_self, 1e-9), "calls": e.count // n})
    return {
        "steps": n,
        "phases_ms": phases,
        "grouping_ms": grouping_ms / n,
        "self_total_ms": total_self / 1e3 / n,
        "time": "cuda self" if cuda else "cpu self",
        "top": top,
    }


def _self_time(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return float(event.self_cpu_time_total)
