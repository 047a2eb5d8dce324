"""CPU thread policy: how many intra-op threads torch may use next to the data-loader workers."""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("greenmim")


def leave_cores_for_loader_workers(num_workers: int, world_size: int) -> None:
    """On CPU, give torch's intra-op threads only the cores that data-loader workers and other ranks
    leave free. Oversubscribed OpenMP threads spin-wait on each other: a Swin-T step with 2 threads
    and one loader worker on 2 cores ran 5x slower than with 1 thread. An explicit OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    free = max(1, (os.cpu_count() or 1) // max(world_size, 1) - num_workers)
    if free < torch.get_num_threads():
        log.info("cpu: %d intra-op thread(s), leaving cores to %d loader worker(s) (set OMP_NUM_THREADS to override)",
                 free, num_workers)
        torch.set_num_threads(free)
