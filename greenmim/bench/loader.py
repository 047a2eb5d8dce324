"""``greenmim-bench --loader ROOT``: what one image costs the pretraining input pipeline.

Times, per image and interleaved over the same files (so machine load hits every pipeline alike),
on one thread (a DataLoader worker's setting):

* ``reference``: the MAE-style PIL pipeline (open, convert RGB, RandomResizedCrop(0.2-1, bicubic),
  flip, ToTensor, Normalize: fp32 out);
* ``decode.cpu``: a ``data.decode=cpu`` worker (DCT-scaled decode, crop, uint8 out);
* ``decode.device``: a ``data.decode=device`` worker (bytes, header and crop plan only), and the
  main process' batched decode + crop of those samples (``main_ms_per_image``, on ``device``).

From these it derives the loader workers needed to feed given step rates (img/s).
:func:`write_photos` makes large synthetic JPEGs (e.g. 12 MP camera-sized) to measure on.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ..data.datasets import list_folder
from ..data.device_decode import DeviceCrop, EncodedBatch
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainCrop
from .step import synchronize

DEFAULT_RATES = (1000, 2000, 3400)


def reference_pipeline(img_size: int) -> Callable[[str], torch.Tensor]:
    """The MAE pretraining input pipeline on one file path (fp32 normalised ``(3, H, W)``)."""
    transform = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

    def run(path: str) -> torch.Tensor:
        with open(path, "rb") as f:
            return transform(Image.open(f).convert("RGB"))

    return run


def loader_benchmark(root: str, img_size: int = 224, max_images: int = 200, batch_size: int = 32, device: str = "cpu",
                     rates: Sequence[int] = DEFAULT_RATES, seed: int = 0) -> Dict[str, Any]:
    """Per-image costs of the three pipelines on up to ``max_images`` files under ``root`` (spread
    over the sorted list), and the workers each needs per step rate; see the module doc. Raises
    ValueError (one line naming the fix) for counts below 1."""
    for flag, value in (("--loader-images", max_images), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    paths = list_folder(root, "--loader")
    paths = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, min(max_images, len(paths))).round())]
    device = torch.device(device)
    pipelines = {"reference": reference_pipeline(img_size), "cpu": PretrainCrop(img_size).from_file, "device": DeviceCrop(img_size).from_file}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        totals = {name: 0.0 for name in pipelines}
        encoded: List[Any] = []
        for i, path in enumerate(paths[:3] + paths):  # the first three again untimed: warm-up
            for name, run in pipelines.items():
                torch.manual_seed(seed + i)
                t0 = time.perf_counter()
                sample = run(path)
                if i >= 3:
                    totals[name] += time.perf_counter() - t0
                    if name == "device":
                        encoded.append(sample)
        batches = [EncodedBatch(encoded[i:i + batch_size]) for i in range(0, len(encoded), batch_size)]
        batches[0].to(device)  # warm-up (CUDA decoder handles)
        synchronize(device)
        t0 = time.perf_counter()
        for batch in batches:
            batch.to(device)
        synchronize(device)
        main_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    n = len(paths)
    ms = {name: totals[name] / n * 1e3 for name in pipelines}
    main_ms = main_s / n * 1e3
    return {
        "root": os.path.abspath(root), "img_size": img_size, "images": n, "batch_size": batch_size, "threads": 1,
        "load_average": list(os.getloadavg()),
        "reference_ms_per_image": ms["reference"],
        "decode": {
            "cpu": {"worker_ms_per_image": ms["cpu"], "speedup_vs_reference": ms["reference"] / ms["cpu"]},
            "device": {"worker_ms_per_image": ms["device"], "worker_cost_vs_reference": ms["device"] / ms["reference"],
                       "main_ms_per_image": main_ms, "main_device": str(device)},
        },
        "workers_needed": {str(rate): {name: math.ceil(rate * ms[name] / 1e3) for name in pipelines} for rate in rates},
        "device_main_thread_share": {str(rate): rate * main_ms / 1e3 for rate in rates},
    }


def loader_table(result: Dict[str, Any]) -> str:
    """The benchmark as text: ms per image, speedups, and workers needed per step rate."""
    dec, ref = result["decode"], result["reference_ms_per_image"]
    lines = [
        f"input pipeline on {result['images']} images of {result['root']} -> {result['img_size']} px, one thread "
        f"(load average {result['load_average'][0]:.2f})",
        f"  reference (MAE PIL, fp32)     {ref:8.2f} ms/image",
        f"  data.decode=cpu     worker    {dec['cpu']['worker_ms_per_image']:8.2f} ms/image  ({dec['cpu']['speedup_vs_reference']:.2f}x faster)",
        f"  data.decode=device  worker    {dec['device']['worker_ms_per_image']:8.2f} ms/image  ({dec['device']['worker_cost_vs_reference']:.3f}x the reference)",
        f"                      main      {dec['device']['main_ms_per_image']:8.2f} ms/image  (batched decode + crop on {dec['device']['main_device']})",
        "workers needed per step rate:",
    ]
    for rate, need in result["workers_needed"].items():
        share = result["device_main_thread_share"][rate]
        lines.append(f"  {int(rate):5d} img/s: reference {need['reference']:3d}, cpu {need['cpu']:3d}, device {need['device']:3d} "
                     f"(+ main process busy {share:.2f} s/s decoding on {dec['device']['main_device']}; must stay < 1)")
    return "\n".join(lines)


def write_photos(folder: str, count: int = 8, hw: Sequence[int] = (3000, 4000), seed: int = 0, quality: int = 90) -> List[str]:
    """``count`` synthetic camera-like JPEGs of ``hw`` (height, width) pixels in ``folder``: smooth
    random colour fields with a fine +-4 level grain (about 1.7 MB at 12 MP, quality 90). The grain
    sets the entropy-decoding cost, which no DCT scale reduces: noisier files gain less from drafts."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = int(hw[0]), int(hw[1])
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 200), max(2, w // 200), 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        texture = rng.integers(-4, 5, (h, w, 1), dtype=np.int16)
        path = os.path.join(folder, f"photo_{i:03d}.jpg")
        Image.fromarray(np.clip(field + texture, 0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths
