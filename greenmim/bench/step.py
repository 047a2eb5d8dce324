"""Full pretraining steps of greenmim and its all-token baseline, timed side by side.

A :class:`TrainStep` is the trainer's own step (:class:`~greenmim.engine.step.TrainingStep`: the
pretraining loss under the requested precision, the non-finite check, backward with the gradient
scaler, clipping, the fused AdamW step skipped on the device when non-finite, ``zero_grad``), plus
what the training thread does with the loader's plan; :meth:`TrainStep.compile` compiles it as
``trainer.compile=true`` does. :func:`build_models` makes the
greenmim and simmim models of one backbone with the same weights, and :func:`time_interleaved`
times their steps alternately in one process, so that slow drifts of a shared machine (other
jobs, thermal state, allocator warm-up) hit both methods alike.

Masks are planned as in training: by :class:`PlannedBatches`, in DataLoader worker processes ahead
of the step (``planning="workers"``), so the timed step pays only the copy of the plan to the
device. ``planning="inline"`` plans inside the timed step instead, on the training thread (what
greenmim did before planning moved to the loader), to show what that costs.

Per step the benchmark records the wall time (bracketed by device synchronisation), the training
thread's *host* time until the step's last kernel is queued, the GPU time between CUDA events
around the step, the planning time (and where it ran) and the time the training thread spent on
the plan. A step whose host time is close to its wall time is host-bound.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset

from ..plan.collate import MIMBatch, plan_masks, planner_for

from ..tasks.pretrain.loss import pretrain_loss
from ..engine.optim import build_optimizer
from ..engine.precision import Precision
from ..engine.step import TrainingStep, compile_mode
from ..plan.masking import seeded_masks, unit_grid
from ..models import create_pretrain_model
from ..data.prefetch import maybe_prefetch
from ..plan.planner import DevicePlan, HostPlan, VisiblePlanner, as_device_plan, planned_mask

METHODS = ("greenmim", "simmim")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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


def make_optimizer(model: nn.Module, lr: float = 1.5e-4, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    """GreenMIM's pretraining optimizer, exactly as the trainer builds it: AdamW (0.9, 0.95), wd 0.05
    with the usual no-decay groups (docs/design.md, recipes)."""
    return build_optimizer(model, lr, weight_decay=weight_decay, betas=(0.9, 0.95))


class TrainStep:
    """One full pretraining step of ``model``, run by the trainer's :class:`~greenmim.engine.step.TrainingStep`.

    ``dtype`` fp32 runs in full precision; bf16 and fp16 run under autocast (weights and optimizer
    stay fp32, as in mixed-precision training), fp16 with a gradient scaler. ``clip_grad`` as
    ``trainer.clip_grad`` (the pretraining recipe's is None); ``static_plans`` as
    :func:`~greenmim.plan.collate.planner_for`. ``planning="inline"`` re-plans the
    batch's mask inside the step, on the calling thread.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: str = "fp32", planning: str = "workers",
                 clip_grad: Optional[float] = None, static_plans: Optional[bool] = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        if planning not in PLANNING:
            raise ValueError(f"planning must be one of {', '.join(PLANNING)}, got '{planning}'")
        self.model = model
        self.device = device
        self.dtype = dtype
        self.planning = planning
        self.planner = planner_for(model, device, static_plans)
        self.optimizer = make_optimizer(model)
        self.precision = Precision(dtype, device)
        self.clip_grad = clip_grad
        self.engine = TrainingStep(model, self.optimizer, self.precision, clip_grad)
        self.plan_thread_ms = 0.0  # training-thread time spent on the last step's plan

    def compile(self, mode: str = "auto") -> str:
        """Run the model compiled as ``trainer.compile=true`` with ``trainer.compile_mode=mode`` does;
        returns the resolved mode. :meth:`eager` undoes it."""
        resolved = compile_mode(mode, self.device)
        self.engine = TrainingStep(self.model, self.optimizer, self.precision, self.clip_grad, compile_mode=resolved)
        return resolved

    def eager(self) -> None:
        """Back to the eager model (after a failed compilation); gradients are cleared."""
        self.engine = TrainingStep(self.model, self.optimizer, self.precision, self.clip_grad)
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

    def forward_backward(self, images: torch.Tensor, plan: HostPlan) -> Tuple[torch.Tensor, torch.Tensor]:
        """The trainer's step on one batch (:class:`~greenmim.engine.step.TrainingStep`): ``(loss, finite)``, device tensors."""
        with record_function("plan"):
            plan = self.device_plan(plan)
        out = self.engine([MIMBatch(images, plan)], self._loss)
        return out.loss, ~out.skipped

    def _loss(self, model: nn.Module, batch: MIMBatch) -> Tuple[torch.Tensor, Dict[str, Any]]:
        return pretrain_loss(model, batch, self.device), {}

    def __call__(self, images: torch.Tensor, plan: HostPlan) -> torch.Tensor:
        """One step; its phases are profiler ranges ``plan``, ``forward``, ``backward`` and ``optimizer``."""
        return self.forward_backward(images, plan)[0]

    @property
    def grouping(self) -> Dict[str, float]:
        """The encoder's last grouping statistics (``{}`` for encoders without grouping)."""
        return dict(getattr(self.model.encoder, "last_grouping", {}) or {})


@dataclass
class MethodPlans:
    """One step's masks planned for every method (``{method: plan}``), movable like a batch."""

    plans: Dict[str, Any]

    def __getitem__(self, method: str):
        return self.plans[method]

    def pin_memory(self) -> "MethodPlans":
        return MethodPlans({m: p.pin_memory() for m, p in self.plans.items()})

    def to(self, device: torch.device) -> "MethodPlans":
        return MethodPlans({m: p.to(device) for m, p in self.plans.items()})


class _PlanDataset(Dataset):
    """Item ``i``: the masks of step ``i`` (from seeds ``(seed, i, sample)``), planned for every method."""

    def __init__(self, planners: Mapping[str, Optional[VisiblePlanner]], grid, batch_size: int, mask_ratio: float,
                 shared: bool, seed: int, length: int):
        self.planners, self.grid, self.batch_size = dict(planners), grid, batch_size
        self.mask_ratio, self.shared, self.seed, self.length = mask_ratio, shared, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> MethodPlans:
        seeds = [hash((self.seed, i, b)) & (2**63 - 1) for b in range(self.batch_size)]
        mask = seeded_masks(seeds, self.grid.num_units, self.mask_ratio, shared=self.shared)
        return MethodPlans({m: plan_masks(mask, self.grid, planner) for m, planner in self.planners.items()})


class PlannedBatches:
    """Fixed random images on the device and, per step, one mask batch planned for every method
    (each compared pair of steps sees the same masks), planned ahead in ``workers`` DataLoader
    worker processes (0: in the calling thread, before the step), pinned on CUDA and, as the
    trainer does there, copied to the device one step ahead (:func:`~greenmim.data.prefetch.maybe_prefetch`)."""

    def __init__(
        self,
        batch_size: int,
        img_size,
        unit: int,
        mask_ratio: float,
        device: torch.device,
        planners: Mapping[str, Optional[VisiblePlanner]],
        steps: int,
        seed: int = 0,
        shared: bool = False,
        workers: int = 2,
    ):
        grid = unit_grid(img_size, unit)
        gen = torch.Generator().manual_seed(seed)
        # uint8 pixels, as the loader hands them to the trainer's step (which normalises them on the device)
        self.images = torch.randint(0, 256, (batch_size, 3, *grid.img_size), generator=gen, dtype=torch.uint8).to(device)
        self.workers = workers
        dataset = _PlanDataset(planners, grid, batch_size, mask_ratio, shared, seed, steps)
        self._loader = DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        self._loader = maybe_prefetch(self._loader, device)
        self._it: Iterator[MethodPlans] = iter(self._loader)

    def next_plans(self) -> MethodPlans:
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


def timed_step(step: TrainStep, images: torch.Tensor, plan: HostPlan, rec: Optional[StepTimes]) -> float:
    """Run one step bracketed by device synchronisation; record wall, host and GPU time into ``rec``."""
    device = images.device
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    step(images, plan)
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
            rec.efficiency.append(float(grouping.get("efficiency", float("nan"))))
    return wall


def time_interleaved(
    steps: Mapping[str, TrainStep],
    batches: PlannedBatches,
    warmup: int,
    iters: int,
    on_step: Optional[Callable[[str, int, float], None]] = None,
    on_warm: Optional[Callable[[], None]] = None,
) -> Dict[str, StepTimes]:
    """Time ``iters`` steps of every method after ``warmup`` untimed ones, interleaved.

    Iteration ``i`` takes one planned mask batch and runs every method on it; the order of the
    methods is reversed on odd iterations (A B, B A, A B, ...) so neither method always runs right
    after the other. ``on_step(method, i, seconds)`` is called after each step (progress), ``i``
    counting the timed steps from 0 (warm-up steps: ``i < 0``); ``on_warm()`` once after the warm-up steps.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    names = list(steps)
    times = {name: StepTimes() for name in names}
    for i in range(warmup + iters):
        if i == warmup and on_warm is not None:
            on_warm()
        plans = batches.next_plans()
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            dt = timed_step(steps[name], batches.images, plans[name], times[name] if i >= warmup else None)
            if on_step is not None:
                on_step(name, i - warmup, dt)
    return times
