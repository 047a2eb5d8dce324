"""Mixed precision: ``bf16`` | ``fp16`` | ``fp32`` through :func:`torch.autocast`.

``fp16`` uses a :class:`torch.amp.GradScaler` (dynamic loss scaling; steps with inf/nan gradients
are skipped by the scaler); ``bf16`` and ``fp32`` need none. The same object runs on CPU and CUDA.
The training step (:class:`~greenmim.engine.step.TrainingStep`) reads ``mode``, ``dtype`` and
``scaler``; evaluation code uses :meth:`Precision.autocast`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict

import torch

#: ``trainer.precision``'s values (checked with the config: :mod:`greenmim.cli.validate`)
PRECISIONS = ("bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Precision:
    """Autocast dtype and the fp16 loss scaler of one run (``mode``: one of :data:`PRECISIONS`)."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device = torch.device(device)
        self.dtype = _DTYPES[mode]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(mode == "fp16"))

    def autocast(self):
        """The autocast context of this precision (none for fp32)."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def state_dict(self) -> Dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
