"""Full pretraining steps of greenmim and its all-token baseline, timed side by side.

A :class:`TrainStep` is the trainer's own step (:class:`~greenmim.engine.step.TrainingStep`: the
pretraining loss under the requested precision, the non-finite check, backward with the gradient
scaler, clipping, the fused AdamW step skipped on the device when non-finite, ``zero_grad``), plus
what the training thread does with the loader's plan; :meth:`TrainStep.compile` compiles it as
``trainer.compile=true`` does. :func:`build_models` makes the
greenmim and simmim models of one backbone with the same weights, and :func:`time_interleaved`
times their steps alternately in one process, so that slow drifts of a shared machine (other
jobs, thermal state, allocator warm-up) hit both methods alike.

Batches come as in training: :func:`~greenmim.data.datasets.build_train_loader` over fixed uint8
images, its ``collate_fn`` running one :class:`~greenmim.plan.collate.MaskCollator` per method on
the same seeded samples (so each compared pair of steps sees the same images and masks), in
DataLoader worker processes ahead of the step (``planning="workers"``), so the timed step pays only
the copy of the plan to the device. ``planning="inline"`` plans inside the timed step instead, on
the training thread (what greenmim did before planning moved to the loader), to show what that costs.

Per step the benchmark records the wall time (bracketed by device synchronisation), the training
thread's *host* time until the step's last kernel is queued, the GPU time between CUDA events
around the step, the planning time (and where it ran) and the time the training thread spent on
the plan. A step whose host time is close to its wall time is host-bound.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.profiler import record_function
from torch.utils.data import Dataset

from ..data.datasets import build_train_loader
from ..data.prefetch import maybe_prefetch
from ..engine.config import OptimConfig
from ..engine.distributed import DistInfo
from ..engine.optim import build_optimizer
from ..engine.precision import Precision
from ..engine.progress import progress
from ..engine.step import TrainingStep, compile_mode
from ..models import create_pretrain_model
from ..plan.collate import MaskCollator, MIMBatch, planner_for
from ..plan.masking import unit_grid
from ..plan.planner import DevicePlan, HostPlan, as_device_plan, planned_mask
from ..tasks.pretrain.loss import pretrain_loss

METHODS = ("greenmim", "simmim")
PLANNING = ("workers", "inline")


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


def make_optimizer(model: nn.Module, optim: Optional[OptimConfig] = None) -> torch.optim.Optimizer:
    """The trainer's optimizer with the ``optim.*`` settings (default: the pretraining recipe's,
    :class:`~greenmim.engine.config.OptimConfig`) at ``optim.lr``, else ``optim.blr``: a timed step
    costs the same at any rate, so the base rate needs no batch scaling here."""
    o = optim or OptimConfig.from_group()
    return build_optimizer(model, o.lr if o.lr is not None else o.blr, o.weight_decay, o.betas, o.eps, o.name)


def engine_step(model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision, clip_grad: Optional[float],
                compile_mode: Optional[str] = None) -> TrainingStep:
    """The trainer's step over ``model``: the one place the benchmark builds it."""
    return TrainingStep(model, optimizer, precision, clip_grad, compile_mode=compile_mode)


class TrainStep:
    """One full pretraining step of ``model``, run by the trainer's :class:`~greenmim.engine.step.TrainingStep`.

    ``dtype`` is a ``trainer.precision`` (:class:`~greenmim.engine.precision.Precision`: fp32 in full
    precision; bf16 and fp16 under autocast, weights and optimizer in fp32, fp16 with a gradient
    scaler). ``clip_grad`` as ``trainer.clip_grad`` (the pretraining recipe's is None);
    ``static_plans`` as :func:`~greenmim.plan.collate.planner_for`; ``optim`` as
    :func:`make_optimizer`. ``planning="inline"`` re-plans the batch's mask inside the step, on
    the calling thread.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: str = "fp32", planning: str = "workers",
                 clip_grad: Optional[float] = None, static_plans: Optional[bool] = None, optim: Optional[OptimConfig] = None):
        if planning not in PLANNING:
            raise ValueError(f"planning must be one of {', '.join(PLANNING)}, got '{planning}'")
        self.precision = Precision(dtype, device)  # refuses an unknown dtype, naming the choices
        self.model = model
        self.device = device
        self.dtype = dtype
        self.planning = planning
        self.planner = planner_for(model, device, static_plans)
        self.optimizer = make_optimizer(model, optim)
        self.clip_grad = clip_grad
        self.engine = engine_step(model, self.optimizer, self.precision, clip_grad)
        self.plan_thread_ms = 0.0  # training-thread time spent on the last step's plan

    def compile(self, mode: str = "auto") -> str:
        """Run the model compiled as ``trainer.compile=true`` with ``trainer.compile_mode=mode`` does;
        returns the resolved mode. :meth:`eager` undoes it."""
        resolved = compile_mode(mode, self.device)
        self.engine = engine_step(self.model, self.optimizer, self.precision, self.clip_grad, resolved)
        return resolved

    def eager(self) -> None:
        """Back to the eager model (after a failed compilation); gradients are cleared."""
        self.engine = engine_step(self.model, self.optimizer, self.precision, self.clip_grad)
        self.optimizer.zero_grad(set_to_none=True)

    def device_plan(self, plan: "HostPlan | DevicePlan"):
        """What the training thread does with a loader's plan: copy it unless the prefetcher already
        did (re-plan it from the host mask when inline)."""
        t0 = time.perf_counter()
        if self.planner is not None:
            if self.planning == "inline":
                plan = self.planner.plan(planned_mask(plan))
                plan.inline = True
            plan = as_device_plan(plan, self.device)
        self.plan_thread_ms = (time.perf_counter() - t0) * 1e3
        return plan

    def forward_backward(self, batch: MIMBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """The trainer's step on one batch (:class:`~greenmim.engine.step.TrainingStep`): ``(loss, finite)``, device tensors."""
        with record_function("plan"):
            batch = MIMBatch(batch.images, self.device_plan(batch.plan))
        out = self.engine([batch], self._loss)
        return out.loss, ~out.skipped

    def _loss(self, model: nn.Module, batch: MIMBatch) -> Tuple[torch.Tensor, Dict[str, Any]]:
        return pretrain_loss(model, batch, self.device), {}

    def __call__(self, batch: MIMBatch) -> torch.Tensor:
        """One step; its phases are profiler ranges ``plan``, ``forward``, ``backward`` and ``optimizer``."""
        return self.forward_backward(batch)[0]

    @property
    def grouping(self) -> Dict[str, float]:
        """The encoder's last grouping statistics (``{}`` for encoders without grouping)."""
        return dict(getattr(self.model.encoder, "last_grouping", {}) or {})


@dataclass
class MethodBatches:
    """One step's batch for every method (``{method: MIMBatch}``), movable like a batch."""

    batches: Dict[str, MIMBatch]

    def __getitem__(self, method: str) -> MIMBatch:
        return self.batches[method]

    def pin_memory(self) -> "MethodBatches":
        return MethodBatches({m: b.pin_memory() for m, b in self.batches.items()})

    def to(self, device: torch.device) -> "MethodBatches":
        return MethodBatches({m: b.to(device) for m, b in self.batches.items()})


@dataclass
class MethodCollator:
    """``collate_fn`` running every method's :class:`~greenmim.plan.collate.MaskCollator` on the same
    ``(image, seed)`` samples: the same images and masks, each planned for its method."""

    collators: Dict[str, MaskCollator]

    def __call__(self, samples) -> MethodBatches:
        return MethodBatches({m: collate(samples) for m, collate in self.collators.items()})


class _FixedImages(Dataset):
    """``length`` samples cycling over ``images`` (uint8 ``(n, 3, H, W)``): the benchmark times the
    step, not the input pipeline (``greenmim-bench --loader`` does that)."""

    def __init__(self, images: torch.Tensor, length: int):
        self.images, self.length = images, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i % len(self.images)]


class PlannedBatches:
    """Per step, one :class:`MethodBatches` from the training loader
    (:func:`~greenmim.data.datasets.build_train_loader`, see the module docstring): fixed random
    uint8 images (as the loader hands them to the trainer's step, which normalises them on the
    device) with masks drawn from the sampler's per-sample seeds and planned for every method, in
    ``workers`` DataLoader worker processes (0: in the calling thread, before the step), pinned on
    CUDA and, as the trainer does there, copied to the device one step ahead
    (:func:`~greenmim.data.prefetch.maybe_prefetch`). ``planners`` are the methods' planners
    (:attr:`TrainStep.planner`; None for the all-token baseline)."""

    def __init__(
        self,
        batch_size: int,
        img_size,
        unit: int,
        mask_ratio: float,
        device: torch.device,
        planners: Mapping[str, Any],
        steps: int,
        seed: int = 0,
        shared: bool = False,
        workers: int = 2,
    ):
        grid = unit_grid(img_size, unit)
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch_size, 3, *grid.img_size), generator=gen, dtype=torch.uint8)
        collate = MethodCollator({m: MaskCollator(grid, mask_ratio, planner, shared, batch_size) for m, planner in planners.items()})
        self.workers = workers
        loader = build_train_loader(_FixedImages(images, steps * batch_size), batch_size, DistInfo(device=torch.device(device)),
                                    seed, num_workers=workers, shuffle=False, collate_fn=collate)
        self._loader = maybe_prefetch(loader, device)
        self._it: Iterator[MethodBatches] = iter(self._loader)

    def next_batches(self) -> MethodBatches:
        try:
            return next(self._it)
        except StopIteration:  # more steps than planned (extra measurements): start over
            self._it = iter(self._loader)
            return next(self._it)


@dataclass
class StepTimes:
    """Per-step measurements of one method."""

    seconds: List[float] = field(default_factory=list)
    host_ms: List[float] = field(default_factory=list)
    gpu_ms: List[float] = field(default_factory=list)
    plan_thread_ms: List[float] = field(default_factory=list)
    grouping_ms: List[float] = field(default_factory=list)
    grouping_inline: List[float] = field(default_factory=list)
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
            "host_ms": statistics.median(self.host_ms),
            "plan_thread_ms": statistics.median(self.plan_thread_ms),
        }
        if self.gpu_ms:
            out["gpu_ms"] = statistics.median(self.gpu_ms)
        if self.grouping_ms:
            g = statistics.median(self.grouping_ms)
            inline = bool(statistics.fmean(self.grouping_inline) > 0.5)
            out.update(
                grouping_ms=g,
                grouping_ms_mean=statistics.fmean(self.grouping_ms),
                grouping_ms_max=max(self.grouping_ms),
                grouping_on_critical_path=inline,
                grouping_share=(g / (med * 1e3)) if inline else 0.0,
                packing_efficiency=statistics.fmean(self.efficiency),
            )
        return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def timed_step(step: TrainStep, batch: MIMBatch, rec: Optional[StepTimes]) -> float:
    """Run one step bracketed by device synchronisation; record wall, host and GPU time into ``rec``."""
    device = step.device
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    step(batch)
    host = time.perf_counter() - t0  # the last kernel is queued: the host's part of the step
    if cuda:
        end.record()
    synchronize(device)
    wall = time.perf_counter() - t0
    if rec is not None:
        rec.seconds.append(wall)
        rec.host_ms.append(host * 1e3)
        rec.plan_thread_ms.append(step.plan_thread_ms)
        if cuda:
            rec.gpu_ms.append(start.elapsed_time(end))
        grouping = step.grouping
        if "ms" in grouping:
            rec.grouping_ms.append(float(grouping["ms"]))
            rec.grouping_inline.append(float(step.planning == "inline"))
            rec.efficiency.append(float(grouping["efficiency"]) if "efficiency" in grouping else float("nan"))
    return wall


def time_interleaved(
    steps: Mapping[str, TrainStep],
    batches: PlannedBatches,
    warmup: int,
    iters: int,
    on_warm: Optional[Callable[[], None]] = None,
    what: Optional[str] = None,
) -> Dict[str, StepTimes]:
    """Time ``iters`` steps of every method after ``warmup`` untimed ones, interleaved.

    Iteration ``i`` takes one step's batches (the same images and masks) and runs every method on
    it; the order of the methods is reversed on odd iterations (A B, B A, A B, ...) so neither
    method always runs right after the other. ``on_warm()`` is called once after the warm-up steps.
    With ``what``, the iterations show progress as every long phase does
    (:func:`~greenmim.engine.progress.progress`: a bar on a terminal, else a line every few seconds).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    names = list(steps)
    times = {name: StepTimes() for name in names}
    iterations: Iterable[int] = range(warmup + iters)
    if what is not None:
        iterations = progress(iterations, what, unit="steps per method")
    for i in iterations:
        if i == warmup and on_warm is not None:
            on_warm()
        batch = batches.next_batches()
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            timed_step(steps[name], batch[name], times[name] if i >= warmup else None)
    return times
