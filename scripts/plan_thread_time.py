"""How much of a planned batch's work lands on the training thread (the CPU evidence of issue 10).

A Swin-B batch of 128 (224 px, mask 0.75): masks drawn and planned in 2 loader workers, the plan's
copy and pair-tensor derivation issued by the DevicePrefetcher thread (device ``meta``: every op is
dispatched, nothing is computed, as a stand-in for CUDA launches), and a simulated 60 ms step on the
training thread. Prints the worker's planning time and the training thread's time per batch.

    python scripts/plan_thread_time.py
"""
import statistics, time, torch
from torch.utils.data import DataLoader, Dataset
from greenmim.plan.collate import MaskCollator
from greenmim.data.prefetch import DevicePrefetcher
from greenmim.plan.masking import DEFAULT_MASK_RATIO, unit_grid
from greenmim.models import create_encoder

enc = create_encoder("swin_base_patch4_window7_224")
collate = MaskCollator(unit_grid((224, 224), 32), DEFAULT_MASK_RATIO, enc.planner(group_multiple=8))

class Seeds(Dataset):
    def __len__(self): return 128 * 14
    def __getitem__(self, i): return torch.zeros(3, 8, 8), i   # tiny images: this measures the plan only

loader = DataLoader(Seeds(), batch_size=128, collate_fn=collate, num_workers=2, prefetch_factor=4)
waits, worker_ms = [], []
it = iter(DevicePrefetcher(loader, torch.device("meta")))
for i in range(14):
    t0 = time.perf_counter()
    batch = next(it)
    waits.append((time.perf_counter() - t0) * 1e3)
    worker_ms.append(batch.plan.host.plan_ms)
    time.sleep(0.06)  # the step
print(f"plan per batch in a worker: median {statistics.median(worker_ms):.1f} ms; training thread per batch "
      f"(steady state, steps 5-14): median {statistics.median(waits[4:]):.3f} ms, max {max(waits[4:]):.3f} ms")
