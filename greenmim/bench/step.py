"""Full pretraining steps of greenmim and its all-token baseline, timed side by side.

A :class:`TrainStep` is one optimisation step of a pretraining model (forward, backward,
``optimizer.step``, ``zero_grad``) under the requested precision. :func:`build_models` makes the
greenmim and simmim models of one backbone with the same weights, and :func:`time_interleaved`
times their steps alternately in one process, so that slow drifts of a shared machine (other
jobs, thermal state, allocator warm-up) hit both methods alike.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch.profiler import record_function

from ..engine.optim import build_optimizer
from ..masking import random_mask, unit_grid
from ..models import create_pretrain_model

METHODS = ("greenmim", "simmim")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host timers measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - no MPS in CI
        torch.mps.synchronize()


def build_models(
    name: str,
    device: torch.device,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    **overrides: Any,
) -> Dict[str, nn.Module]:
    """The pretraining models of ``name`` for each method, on ``device``, in train mode.

    The first model is built from ``seed``; every later one loads its weights wherever names and
    shapes match (the whole encoder and decoder for Swin), so both methods start from the same
    point and differ only in what their encoder computes on.
    """
    models: Dict[str, nn.Module] = {}
    reference: Optional[Dict[str, torch.Tensor]] = None
    for method in methods:
        torch.manual_seed(seed)
        model = create_pretrain_model(name, method=method, **dict(overrides))
        if reference is not None:
            own = model.state_dict()
            shared = {k: v for k, v in reference.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(shared, strict=False)
        else:
            reference = model.state_dict()
        models[method] = model.to(device).train()
    return models


def make_optimizer(model: nn.Module, lr: float = 1.5e-4, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    """GreenMIM's pretraining optimizer, exactly as the trainer builds it: AdamW (0.9, 0.95), wd 0.05
    with the usual no-decay groups (DESIGN.md section 8)."""
    return build_optimizer(model, lr, weight_decay=weight_decay, betas=(0.9, 0.95))


class TrainStep:
    """One full pretraining step of ``model``: forward, backward, ``optimizer.step``, ``zero_grad``.

    ``dtype`` fp32 runs in full precision; bf16 and fp16 run under autocast (weights and optimizer
    stay fp32, as in mixed-precision training), fp16 with a gradient scaler.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: str = "fp32", mask_ratio: float = 0.75):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        self.model = model
        self.device = device
        self.dtype = dtype
        self.mask_ratio = mask_ratio
        self.optimizer = make_optimizer(model)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None

    def autocast(self):
        """The forward's precision context (a no-op for fp32)."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])

    def forward_backward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with record_function("forward"), self.autocast():
            loss, _, _ = self.model(images, mask_ratio=self.mask_ratio, mask=mask)
        with record_function("backward"):
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def __call__(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One step; its phases are profiler ranges ``forward``, ``backward`` and ``optimizer``."""
        loss = self.forward_backward(images, mask)
        with record_function("optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    @property
    def grouping(self) -> Dict[str, float]:
        """The encoder's last grouping statistics (``{}`` for encoders without grouping)."""
        return dict(getattr(self.model.encoder, "last_grouping", {}) or {})


class BatchSource:
    """Fixed random images on the device and a fresh seeded mask per step, shared by both methods
    (so each compared pair of steps sees the same mask)."""

    def __init__(self, batch_size: int, img_size, unit: int, mask_ratio: float, device: torch.device, seed: int = 0):
        grid = unit_grid(img_size, unit)
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, 3, *grid.img_size, generator=gen).to(device)
        self.num_units = grid.num_units
        self.mask_ratio = mask_ratio
        self.generator = torch.Generator().manual_seed(seed + 1)

    def next_mask(self) -> torch.Tensor:
        # drawn on the host, as the training loop does: the grouping solver plans there
        return random_mask(self.images.shape[0], self.num_units, self.mask_ratio, generator=self.generator)


@dataclass
class StepTimes:
    """Per-step measurements of one method."""

    seconds: List[float] = field(default_factory=list)
    grouping_ms: List[float] = field(default_factory=list)
    efficiency: List[float] = field(default_factory=list)

    def summary(self, batch_size: int) -> Dict[str, Any]:
        s = sorted(self.seconds)
        med = statistics.median(s)
        out: Dict[str, Any] = {
            "step_ms": med * 1e3,
            "step_ms_p25": _quantile(s, 0.25) * 1e3,
            "step_ms_p75": _quantile(s, 0.75) * 1e3,
            "step_ms_mean": statistics.fmean(s) * 1e3,
            "img_per_s": batch_size / med,
            "img_per_s_mean": batch_size / statistics.fmean(s),
            "steps": len(s),
        }
        if self.grouping_ms:
            g = statistics.median(self.grouping_ms)
            out.update(
                grouping_ms=g,
                grouping_ms_mean=statistics.fmean(self.grouping_ms),
                grouping_ms_max=max(self.grouping_ms),
                grouping_share=g / (med * 1e3),
                packing_efficiency=statistics.fmean(self.efficiency),
            )
        return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_interleaved(
    steps: Mapping[str, TrainStep],
    batches: BatchSource,
    warmup: int,
    iters: int,
    on_step: Optional[Callable[[str, int, float], None]] = None,
) -> Dict[str, StepTimes]:
    """Time ``iters`` steps of every method after ``warmup`` untimed ones, interleaved.

    Iteration ``i`` draws one mask and runs every method on it; the order of the methods is
    reversed on odd iterations (A B, B A, A B, ...) so neither method always runs right after the
    other. Each step is bracketed by device synchronisation. ``on_step(method, i, seconds)`` is
    called after each timed step (progress output).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    names = list(steps)
    times = {name: StepTimes() for name in names}
    device = batches.images.device
    for i in range(warmup + iters):
        mask = batches.next_mask()
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            step = steps[name]
            synchronize(device)
            t0 = time.perf_counter()
            step(batches.images, mask)
            synchronize(device)
            dt = time.perf_counter() - t0
            if i < warmup:
                continue
            rec = times[name]
            rec.seconds.append(dt)
            grouping = step.grouping
            if "ms" in grouping:
                rec.grouping_ms.append(float(grouping["ms"]))
                rec.efficiency.append(float(grouping.get("efficiency", float("nan"))))
            if on_step is not None:
                on_step(name, i - warmup, dt)
    return times
