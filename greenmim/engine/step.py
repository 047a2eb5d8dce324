"""One optimisation step, the one way to do it: the trainer runs it, the benchmark times it.

A :class:`TrainingStep` is built from the model, its optimizer, a
:class:`~greenmim.engine.precision.Precision`, the clipping threshold and ``accum_steps`` (no
:class:`~greenmim.engine.Trainer` needed)::

    step = TrainingStep(model, optimizer, Precision("bf16", device), clip_grad=1.0, accum_steps=2)
    out = step(batches, loss_fn)   # loss_fn(model, batch, *args) -> (loss, metrics); batches: accum_steps of them
    out.loss, out.skipped, out.grad_norm, out.metrics   # device tensors: nothing was read on the host

One call, in order (:meth:`TrainingStep.__call__`, read it top to bottom):

1. a new CUDA-graph step (compiled with graphs: :func:`torch.compiler.cudagraph_mark_step_begin`);
2. per micro-batch: ``loss_fn`` under autocast (profiler range ``forward``); the loss's finiteness,
   all-reduced *on the device* over the ranks (every rank takes the same decision); backward of
   ``loss / accum_steps`` (zero when non-finite) under DDP's ``no_sync`` except on the last
   micro-batch (range ``backward``); the window's loss sum, finite count and metric sums, on the device;
3. the optimizer step (range ``optimizer``): unscale (fp16), clip, step, skipped *on the device*
   when a loss or the gradient norm was non-finite (the fused AdamW's ``found_inf``; fp16: the
   scaler skips inf/nan gradients itself and reads the window's flag once); zero the gradients.

With bf16/fp32 and the fused optimizer nothing here waits for the device. What follows a step
(the step counter, ``task.on_step_end``, logging, checkpoints) is the trainer's
(:meth:`greenmim.engine.Trainer.train_step`).

``torch.compile`` (``trainer.compile=true``): :func:`compile_model` compiles the model's forward,
and with it (AOTAutograd) its backward, once; ``dynamic=False``, so every plan shape is a
specialised graph: static plans (``encoder.planner(static=True)``) give one graph and no
recompiles. The optimizer step stays eager: the fused AdamW is already a few multi-tensor kernels,
and a compiled one would guard on the lr (a Python float that the schedule changes every step).
:func:`compile_mode` picks the mode for ``auto``: CUDA graphs (``reduce-overhead``) on one CUDA
process without accumulation, where the step's shapes are static and nothing else holds the
graph's outputs across replays (accumulated gradients would); ``default`` (inductor kernels,
no graphs) otherwise. Compilation wraps the module (``_orig_mod``);
:func:`unwrap` gives the module itself, so checkpoints keep timm's keys.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from .distributed import all_reduce_all_finite
from .precision import Precision

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

#: the loss of one micro-batch: ``loss_fn(model, batch, *args) -> (loss, metrics)``
LossFn = Callable[..., Tuple[torch.Tensor, Dict[str, Any]]]


def compile_mode(mode: str, device: torch.device, distributed: bool = False, accum_steps: int = 1) -> str:
    """The ``torch.compile`` mode for ``trainer.compile_mode`` (one of :data:`COMPILE_MODES`, checked
    with the config; see the module docstring for ``auto``)."""
    if mode != "auto":
        return mode
    graphs = torch.device(device).type == "cuda" and not distributed and accum_steps == 1
    return "reduce-overhead" if graphs else "default"


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``model`` compiled (forward and, through AOTAutograd, backward) with shapes specialised."""
    return torch.compile(model, mode=mode, dynamic=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def compile_counters() -> Dict[str, int]:
    """Dynamo's process-wide counts so far: ``graphs`` compiled (a recompile adds one) and
    ``graph_breaks`` met while compiling (a ``torch.compiler.disable``'d call is one); compare two
    readings, e.g. around a first compiled step, or after warm-up and after the run (0 new graphs:
    no recompiles). Free: no extra trace."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


@dataclass
class StepOutput:
    """What one optimizer step leaves on the device (nothing read back).

    Attributes:
        loss: mean finite micro-batch loss of the window; NaN if none was finite (as the skipped step is logged).
        skipped: bool, the update was skipped (a non-finite loss or gradient norm).
        grad_norm: total gradient norm before clipping, or None without clipping.
        metrics: the task's metrics averaged over the window's micro-batches.
        samples: samples in the window on this rank (``batch_size`` of each micro-batch; 0 without it).
    """

    loss: torch.Tensor
    skipped: torch.Tensor
    grad_norm: Optional[torch.Tensor]
    metrics: Dict[str, Any]
    samples: int


class TrainingStep:
    """One optimizer step of one model over ``accum_steps`` micro-batches (see the module docstring).

    Args:
        model: the training model (as called: DDP-wrapped and/or compiled).
        optimizer: its optimizer (from :func:`~greenmim.engine.optim.build_optimizer`).
        precision: autocast dtype and the fp16 loss scaler.
        clip_grad: max total gradient norm, or None.
        accum_steps: micro-batches per optimizer step (each loss is divided by it).
        compile_mode: a resolved ``torch.compile`` mode (:func:`compile_mode`) to run ``model``
            compiled (:func:`compile_model`; ``self.model`` is then the compiled wrapper), or None.
        batch_size: ``batch_size(batch) -> int`` for :attr:`StepOutput.samples` (the trainer's
            throughput), or None.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 clip_grad: Optional[float] = None, accum_steps: int = 1, compile_mode: Optional[str] = None,
                 batch_size: Optional[Callable[[Any], int]] = None):
        self.model = compile_model(model, compile_mode) if compile_mode else model
        self.optimizer = optimizer
        self.precision = precision
        self.clip_grad = clip_grad
        self.accum_steps = accum_steps
        self.batch_size = batch_size
        self.cudagraphs = compile_mode in CUDAGRAPH_MODES
        inner = getattr(self.model, "_orig_mod", self.model)
        self.ddp = inner if isinstance(inner, DistributedDataParallel) else None
        self.params = list(unwrap(self.model).parameters())  # what the step clips
        self.fused = bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)  # honours found_inf

    def __call__(self, batches: Iterable[Any], loss_fn: LossFn, *args: Any) -> StepOutput:
        """One optimizer step over ``batches`` (``accum_steps`` micro-batches): 1. a new graph step,
        2. the micro-steps, 3. the optimizer step (see the module docstring). ``loss_fn(model, batch,
        *args)`` runs under autocast and returns ``(loss, metrics)`` (metrics: numbers or device scalars)."""
        device, scaler = self.precision.device, self.precision.scaler
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        total = count = torch.zeros((), device=device)
        finite_all = torch.ones((), dtype=torch.bool, device=device)
        metrics: Dict[str, Any] = {}
        samples = n = 0
        for n, batch in enumerate(batches, 1):
            sync = self.ddp is None or n == self.accum_steps  # DDP all-reduces gradients on the last micro-batch only
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with record_function("forward"), torch.autocast(device.type, self.precision.dtype, enabled=self.precision.mode != "fp32"):
                    loss, batch_metrics = loss_fn(self.model, batch, *args)
                with record_function("backward"):
                    finite = all_reduce_all_finite(loss.detach()) if self.ddp is not None else torch.isfinite(loss.detach()).all()
                    scaler.scale(torch.where(finite, loss, torch.zeros_like(loss)) / self.accum_steps).backward()
            total = total + torch.where(finite, loss.detach().float(), 0.0)
            count = count + finite.float()
            finite_all = finite_all & finite
            for k, v in batch_metrics.items():
                v = v.detach().float() if torch.is_tensor(v) else float(v)
                metrics[k] = metrics[k] + v if k in metrics else v
            samples += self.batch_size(batch) if self.batch_size else 0
        with record_function("optimizer"):
            skipped, grad_norm = ~finite_all, None
            if self.clip_grad:
                scaler.unscale_(self.optimizer)  # a no-op without fp16's scaling
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            if scaler.is_enabled():  # fp16: the scaler skips inf/nan gradients itself
                if not bool(skipped):
                    scaler.step(self.optimizer)
                scaler.update()
            else:
                if grad_norm is not None:
                    skipped = skipped | ~torch.isfinite(grad_norm)
                if self.fused:  # skipped on the device
                    self.optimizer.found_inf = skipped.to(torch.float32)
                    try:
                        self.optimizer.step()
                    finally:
                        del self.optimizer.found_inf
                elif not bool(skipped):
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for k in metrics:
            metrics[k] = metrics[k] / n  # the mean over the window
        mean_loss = torch.where(finite_all, total / count.clamp(min=1), float("nan"))
        return StepOutput(mean_loss, skipped, grad_norm, metrics, samples)
