"""Move each batch to the device one step ahead, off the training thread.

:class:`DevicePrefetcher` wraps a DataLoader whose batches have ``.to(device)`` (a
:class:`~greenmim.plan.collate.MIMBatch`: the images' copy, the plan's copy and the pair tensors
derived from it on the device). A background thread takes the loader's next batch and issues that
work, on a side CUDA stream on GPUs, while the training thread runs the current step; the training
thread only makes its stream wait for the copy (no host synchronisation) and marks the tensors as
used on its stream, so the caching allocator does not hand their memory back to the side stream early.

The wrapper is only an iterable of batches (and their count, ``len()``): the DataLoader it wraps is
:attr:`DevicePrefetcher.loader`, where its ``sampler``, ``batch_size`` and workers are set and read
(the trainer keeps the DataLoader and iterates the prefetcher, see
:meth:`~greenmim.engine.task.TrainTask.device_batches`). The loader's errors (a corrupt image, a data
error) are re-raised in the training thread.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Any, Iterator, List, Optional

import torch

_DONE = object()
log = logging.getLogger("greenmim")


def tensors_of(obj: Any) -> List[torch.Tensor]:
    """Every tensor inside ``obj`` (tensors, dataclasses, lists, tuples, dicts, nested)."""
    if torch.is_tensor(obj):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensors_of(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_of(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_of(item)]
    return []


class DevicePrefetcher:
    """``for batch in DevicePrefetcher(loader, device)``: ``loader``'s batches, already ``.to(device)``.

    Args:
        loader: a DataLoader whose batches have ``.to(device)``.
        device: the training device.
        depth: batches moved ahead (2: the next one is ready while the one after is being copied).

    The loader should have worker processes: its main-process part then runs no dataset code
    (see :func:`maybe_prefetch`). ``len()`` is the loader's; anything else of it is read and set on
    :attr:`loader` itself.
    """

    def __init__(self, loader, device: torch.device, depth: int = 2):
        self.loader = loader
        self.device = torch.device(device)
        self.depth = depth

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        ready: "queue.Queue" = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self.loader:
                    if stop.is_set():
                        return
                    if cuda:
                        with torch.cuda.stream(side):
                            moved = batch.to(self.device)
                            event = torch.cuda.Event()
                            event.record(side)
                    else:
                        moved, event = batch.to(self.device), None
                    ready.put((moved, event))
                ready.put((_DONE, None))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                ready.put((exc, None))

        worker = threading.Thread(target=produce, name="greenmim-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item, event = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)  # the GPU waits for the copy; the host does not
                    for t in tensors_of(item):
                        if t.is_cuda:
                            t.record_stream(current)
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue, then let it end
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)


def maybe_prefetch(loader, device: torch.device, enabled: Optional[bool] = None):
    """``loader`` wrapped in a :class:`DevicePrefetcher` (default: on CUDA devices), else as is.

    Only a loader with worker processes is wrapped: with ``num_workers=0`` the dataset would run in
    the prefetch thread, and its seeded augmentation (which forks the process-wide torch RNG, see
    :class:`~greenmim.engine.sampler.SeededDataset`) would race with the training thread's dropout."""
    enabled = torch.device(device).type == "cuda" if enabled is None else bool(enabled)
    if enabled and getattr(loader, "num_workers", 0) == 0:
        log.info("data.device_prefetch is off: it needs data.num_workers > 0")
        enabled = False
    return DevicePrefetcher(loader, device) if enabled else loader
