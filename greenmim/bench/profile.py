"""Where a training step's time goes: the top operators of one profiled step of each method and,
on CUDA, the top kernels by GPU time with their launch counts."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from ..plan.collate import MIMBatch
from .step import TrainStep, synchronize

PHASES = ("forward", "backward", "optimizer")


def quiet_profiler(device: torch.device) -> None:
    """Without a GPU, keep the profiler's C++ side (kineto) from printing ``USDT: profiler_start``
    / ``gpuGetDeviceCount failed`` lines on stderr: it reads ``KINETO_LOG_LEVEL`` when first used
    (a value set by the user is kept). On CUDA its messages (CUPTI errors) are kept."""
    if device.type != "cuda":
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above every level it logs at


def profile_steps(step: TrainStep, batches: Sequence[MIMBatch], rows: int = 20) -> Dict[str, Any]:
    """Profile one full step per batch and return, per step, its phases' time and the top ``rows``
    operators by self time (CPU self time on CPU; CUDA self time when the step runs on a GPU),
    plus the encoder's grouping time (host) of those steps.

    Phases are :class:`TrainStep`'s profiler ranges: ``forward`` (the model call, host-side grouping
    included), ``backward`` and ``optimizer`` (step + zero_grad). An operator's *self* time excludes
    its children, so the host-side grouping shows up as the ``forward`` range's own self time.

    On CUDA, ``kernels`` lists the top ``rows`` device activities (kernels, copies, fills) by GPU
    time per step with their count per step, and ``launches`` counts them all (a step with many
    small kernels is host-bound once the host spends more per launch than the GPU does).
    """
    device = step.device
    quiet_profiler(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    grouping_ms = 0.0
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
            synchronize(device)
            grouping_ms += float(step.grouping["ms"]) if "ms" in step.grouping else 0.0
    n = len(batches)
    cuda = device.type == "cuda"
    events = prof.key_averages()
    ops = [e for e in events if not _on_device(e)]  # host operators (their kernels are listed apart)
    total_self = sum(_self_time(e, cuda) for e in ops)
    phases = {e.key: e.cpu_time_total / 1e3 / n for e in ops if e.key in PHASES}
    top: List[Dict[str, Any]] = []
    for e in sorted(ops, key=lambda e: _self_time(e, cuda), reverse=True)[:rows]:
        t = _self_time(e, cuda)
        top.append({"name": e.key, "self_ms": t / 1e3 / n, "share": t / max(total_self, 1e-9), "calls": e.count // n})
    out: Dict[str, Any] = {"steps": n}
    if cuda:
        device_events = [e for e in events if _on_device(e)]
        device_total = sum(_self_time(e, True) for e in device_events)
        out["launches"] = sum(e.count for e in device_events) // n
        out["device_total_ms"] = device_total / 1e3 / n
        out["kernels"] = [
            {"name": e.key, "ms": _self_time(e, True) / 1e3 / n, "share": _self_time(e, True) / max(device_total, 1e-9), "count": e.count // n}
            for e in sorted(device_events, key=lambda e: _self_time(e, True), reverse=True)[:rows]
        ]
    return {
        **out,
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


def _on_device(event) -> bool:
    """Whether a profiler entry is a device activity (a kernel, a copy, a fill) rather than a host operator."""
    device_type = getattr(event, "device_type", None)
    return device_type is not None and device_type != torch.autograd.DeviceType.CPU
