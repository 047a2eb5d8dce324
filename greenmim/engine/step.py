"""One optimisation step, the one way to do it: the trainer runs it, the benchmark times it.

A :class:`TrainingStep` holds the model (DDP-wrapped and/or compiled), the optimizer, the
:class:`~greenmim.engine.precision.Precision` and the clipping threshold, and does:

* :meth:`TrainingStep.micro_step`: the task's forward under autocast, the loss's finiteness
  all-reduced on the device, backward of ``loss / accum_steps`` (zero when non-finite; ``no_sync``
  under DDP except on the window's last micro-batch);
* :meth:`TrainingStep.optimizer_step`: unscale, clip, step (skipped *on the device* when the window
  was non-finite: the fused AdamW's ``found_inf``), ``zero_grad(set_to_none=True)``.

Nothing here reads a device value on the host (with bf16/fp32 and the fused optimizer). The phases
are profiler ranges ``forward``, ``backward`` and ``optimizer``.

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
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from .distributed import all_reduce_all_finite
from .errors import ConfigError
from .precision import Precision

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

#: what a micro-step runs: ``forward(model) -> (loss, metrics)``
Forward = Callable[[nn.Module], Tuple[torch.Tensor, Dict[str, Any]]]


def compile_mode(mode: str, device: torch.device, distributed: bool = False, accum_steps: int = 1) -> str:
    """The ``torch.compile`` mode for ``trainer.compile_mode`` (see the module docstring for ``auto``)."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{mode}'")
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


def _ddp(model: nn.Module) -> Optional[DistributedDataParallel]:
    """The DDP wrapper of ``model`` (inside a compiled wrapper too), or None."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, DistributedDataParallel) else None


class TrainingStep:
    """Micro-steps and the optimizer step of one model (see the module docstring).

    Args:
        model: the training model (as called: DDP-wrapped and/or compiled).
        optimizer: its optimizer (from :func:`~greenmim.engine.optim.build_optimizer`).
        precision: autocast, loss scaling and the clipped, skippable step.
        clip_grad: max total gradient norm, or None.
        accum_steps: micro-batches per optimizer step (each loss is divided by it).
        compile_mode: a resolved ``torch.compile`` mode (:func:`compile_mode`) to run ``model``
            compiled (:func:`compile_model`; ``self.model`` is then the compiled wrapper), or None.
            With CUDA graphs each optimizer step begins a new graph step
            (:func:`torch.compiler.cudagraph_mark_step_begin`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 clip_grad: Optional[float] = None, accum_steps: int = 1, compile_mode: Optional[str] = None):
        self.model = compile_model(model, compile_mode) if compile_mode else model
        self.optimizer = optimizer
        self.precision = precision
        self.clip_grad = clip_grad
        self.accum_steps = accum_steps
        self.cudagraphs = compile_mode in CUDAGRAPH_MODES
        self._ddp = _ddp(self.model)

    def params(self):
        """The parameters the optimizer step clips (those of the unwrapped module)."""
        return unwrap(self.model).parameters()

    def begin(self) -> None:
        """Start an optimizer step's window (a new CUDA-graph step when compiled with graphs)."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def micro_step(self, forward: Forward, sync: bool = True) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        """``forward(model)`` under autocast, then backward. Returns ``(loss, finite, metrics)``:
        the detached loss and whether it was finite on every rank (device tensors). A non-finite loss
        contributes no gradient; under DDP gradients are all-reduced only when ``sync``."""
        no_sync = self._ddp.no_sync() if self._ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            with record_function("forward"), self.precision.autocast():
                loss, metrics = forward(self.model)
            with record_function("backward"):
                finite = all_reduce_all_finite(loss.detach())
                self.precision.backward(torch.where(finite, loss, torch.zeros_like(loss)) / self.accum_steps)
        return loss.detach(), finite, metrics

    def optimizer_step(self, skip: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Unscale, clip and step unless ``skip`` (device bool) or the norm is non-finite; zero the
        gradients. Returns ``(grad_norm, skipped)`` (device tensors; the norm is None without clipping)."""
        with record_function("optimizer"):
            grad_norm, skipped = self.precision.step(self.optimizer, self.params(), self.clip_grad, skip)
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped
