"""Mixed precision: ``bf16`` | ``fp16`` | ``fp32`` through :func:`torch.autocast`.

``fp16`` uses a :class:`torch.amp.GradScaler` (dynamic loss scaling; steps with inf/nan gradients
are skipped by the scaler); ``bf16`` and ``fp32`` need none. The same object runs on CPU and CUDA.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Optional

import torch

from .errors import ConfigError

PRECISIONS = ("bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Precision:
    """Autocast context, loss scaling and the optimizer step with optional gradient clipping.

    Usage per micro-batch::

        with precision.autocast():
            loss = ...
        precision.backward(loss / accum_steps)
        if last_micro_batch:
            grad_norm = precision.step(optimizer, params, clip_grad)   # unscale, clip, step, update
            optimizer.zero_grad(set_to_none=True)
    """

    def __init__(self, mode: str, device: torch.device):
        if mode not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got '{mode}'")
        self.mode = mode
        self.device = torch.device(device)
        self.dtype = _DTYPES[mode]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(mode == "fp16"))

    def autocast(self):
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], clip_grad: Optional[float] = None) -> Optional[float]:
        """Unscale, clip (if ``clip_grad``), step and update the scale. Returns the total grad norm
        before clipping when clipping, else ``None``."""
        norm = None
        if clip_grad:
            self.scaler.unscale_(optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(list(params), clip_grad))
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm

    def state_dict(self) -> Dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
