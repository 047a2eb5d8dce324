"""Process-group setup for ``torchrun`` and small collective helpers.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init_distributed`
reads them, picks the backend (``nccl`` on CUDA, ``gloo`` on CPU) and returns a :class:`DistInfo`.
Without those variables everything runs as a single process and every helper here is a no-op.
Only rank 0 writes files (checkpoints, logs, TensorBoard, images): test ``dist.is_main``.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as tdist

from .errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` -> ``cuda:<local_rank>``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer=cpu (or trainer.device=cpu)")
        return torch.device("cuda", local_rank)
    if device in ("cpu", "mps"):
        return torch.device(device)
    raise ConfigError(f"trainer.device must be auto, cpu or cuda, got '{device}'")


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the ``torchrun`` process group if one is set up in the environment.

    Backend: ``nccl`` when the device is CUDA, ``gloo`` otherwise. Sets the current CUDA device to
    ``LOCAL_RANK``. Idempotent: a second call returns the same information.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Destroy the process group (if any)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if is_dist():
        tdist.barrier()


def all_reduce_mean(value: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Mean over ranks of a number or tensor; returns the same kind it was given."""
    if not is_dist():
        return value
    as_float = not torch.is_tensor(value)
    t = torch.tensor(float(value), dtype=torch.float64) if as_float else value.detach().clone()
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    t = t / tdist.get_world_size()
    return float(t) if as_float else t


def all_reduce_all_finite(value: torch.Tensor) -> torch.Tensor:
    """A device bool tensor: ``value`` is finite on every rank. No host read (nccl reduces on the
    device; gloo reduces a CPU copy), so a training step can branch on it without a sync."""
    finite = torch.isfinite(value).all()
    if not is_dist():
        return finite
    t = finite.to(torch.float32).reshape(1)
    if tdist.get_backend() != "nccl":
        t = t.cpu()
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return (t > 0).to(value.device).reshape(())


def all_reduce_max(value: int, device: Optional[torch.device] = None) -> int:
    """The largest ``value`` over ranks (e.g. a pending signal number, 0 for none)."""
    if not is_dist():
        return int(value)
    t = torch.tensor([float(value)], device=device if tdist.get_backend() == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as held by rank ``src`` (e.g. a time-stamped output folder resolved on rank 0)."""
    if not is_dist():
        return obj
    box: List[Any] = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch with ``seed + rank`` (per-rank streams); returns that seed."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


def get_rng_state() -> Dict[str, Any]:
    """Global RNG states of python, numpy, torch (CPU) and CUDA (all devices), for checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA only when the device count matches)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if torch.is_tensor(state["torch"]) else state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
