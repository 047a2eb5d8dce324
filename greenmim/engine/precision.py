"""Mixed precision: ``bf16`` | ``fp16`` | ``fp32`` through :func:`torch.autocast`.

``fp16`` uses a :class:`torch.amp.GradScaler` (dynamic loss scaling; steps with inf/nan gradients
are skipped by the scaler); ``bf16`` and ``fp32`` need none. The same object runs on CPU and CUDA.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Optional, Tuple

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
            grad_norm, skipped = precision.step(optimizer, params, clip_grad, skip)   # device tensors
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

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.nn.Parameter],
        clip_grad: Optional[float] = None,
        skip: Optional[torch.Tensor] = None,
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Unscale, clip (if ``clip_grad``), step and update the scale, unless ``skip`` (a bool tensor
        on the device: the window had a non-finite loss) or the gradient norm is non-finite.

        Returns ``(grad_norm, skipped)`` as device tensors (the norm before clipping, None without
        clipping): nothing is read back. With bf16/fp32 and a fused optimizer the skip happens on
        the device (the optimizer's ``found_inf``), so the step never waits for the GPU; other
        optimizers read the flag once.
        """
        params = list(params)
        skipped = skip if skip is not None else torch.zeros((), dtype=torch.bool, device=self.device)
        norm = None
        if self.scaler.is_enabled():  # fp16: the scaler skips inf/nan gradients itself
            if clip_grad:
                self.scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
            if not bool(skipped):
                self.scaler.step(optimizer)
            self.scaler.update()
            return norm, skipped
        if clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
            skipped = skipped | ~torch.isfinite(norm)
        if _fused(optimizer):
            optimizer.found_inf = skipped.to(torch.float32)
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not bool(skipped):
            optimizer.step()
        return norm, skipped

    def state_dict(self) -> Dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every group of ``optimizer`` runs a fused kernel, which honours ``found_inf`` on the device."""
    return bool(optimizer.param_groups) and all(g.get("fused") for g in optimizer.param_groups)
