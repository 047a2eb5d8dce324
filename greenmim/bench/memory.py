"""Peak memory of one training step, measured the same way for every method.

Both models live in one process, so a device-wide peak would count the other model's weights.
Each method's figure is therefore split into

* ``resident_bytes``: its own parameters, buffers and optimizer state (counted from the tensors);
* ``step_peak_bytes``: the peak of memory allocated during one step above what was allocated when
  the step began (activations, gradients, autocast weight copies, temporaries);

and ``peak_bytes = resident_bytes + step_peak_bytes`` is what that model alone needs.

How the step peak is measured:

* CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at the start (allocated bytes, not reserved ones, so allocator caching and
  fragmentation do not blur the comparison).
* CPU: the PyTorch profiler with ``profile_memory=True`` reports every allocation and free of the
  CPU allocator with its size; the running sum of those events in time order gives the exact peak
  of tensor bytes allocated during the step. Process RSS growth was not used: the system
  allocator keeps freed pages and the other model's history leaks into it, so it is noisy and
  order-dependent. Host-side numpy arrays (the grouping layouts) are not tensors and are not
  counted; they are a few MB at most.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable

import torch
import torch.nn as nn


@dataclass
class MemoryStats:
    peak_bytes: int
    step_peak_bytes: int
    resident_bytes: int
    measure: str

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, buffers and optimizer state of one model."""
    state = (v for s in optimizer.state.values() for v in s.values())
    return tensor_bytes([*model.parameters(), *model.buffers(), *state])


def measure_step_memory(step: Callable[[], object], model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> MemoryStats:
    """Run ``step()`` once and report its peak memory (see the module docstring)."""
    resident = resident_bytes(model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        step_peak = torch.cuda.max_memory_allocated(device) - start
        measure = "cuda max_memory_allocated"
    elif device.type == "cpu":
        step_peak = _profiled_cpu_step_peak(step)
        measure = "torch.profiler profile_memory (CPU allocator events)"
    else:
        raise ValueError(f"peak memory is measured on cpu and cuda devices only, got {device}")
    return MemoryStats(resident + step_peak, step_peak, resident, measure)


def _profiled_cpu_step_peak(step: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    from .profile import quiet_profiler

    quiet_profiler(torch.device("cpu"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        step()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:  # pragma: no cover - depends on the torch build
        raise RuntimeError("this PyTorch's profiler exposes no allocation events: rerun with --no-memory")
    # `device_type()` is a DeviceType enum; compare by name to stay independent of its module
    events = [e for e in results.events() if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak
