"""One side-by-side benchmark of greenmim against the all-token baseline, and sweeps of it."""
from __future__ import annotations

import datetime
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..models import get_spec
from .flops import count_step_flops
from .memory import measure_step_memory
from .step import METHODS, BatchSource, TrainStep, build_models, time_interleaved

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class BenchConfig:
    """What to benchmark. ``overrides`` are the model's constructor arguments (``window_size``,
    ``embed_dim``, ...); ``img_size`` None means the model's own size."""

    model: str = "swin_tiny_patch4_window7_224"
    img_size: Optional[int] = None
    batch_size: int = 8
    mask_ratio: float = 0.75
    dtype: str = "fp32"
    device: str = "cpu"
    warmup: int = 2
    iters: int = 5
    seed: int = 0
    overrides: Dict[str, Any] = field(default_factory=dict)
    compile: bool = False
    memory: bool = True
    flops: bool = True

    def model_kwargs(self) -> Dict[str, Any]:
        kwargs = dict(self.overrides)
        if self.img_size is not None:
            kwargs["img_size"] = self.img_size
        return kwargs

    def resolved_img_size(self) -> int:
        if self.img_size is not None:
            return self.img_size
        size = self.overrides.get("img_size", get_spec(self.model).args.get("img_size", 224))
        return size if isinstance(size, int) else int(size[0])


def environment(device: torch.device) -> Dict[str, Any]:
    """Where the numbers come from."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def run_comparison(cfg: BenchConfig, log: Log = _stderr) -> Dict[str, Any]:
    """Build both models with the same weights, time interleaved full steps, then measure peak
    memory and FLOPs of each (and, with ``cfg.compile``, the compiled encoders' steps)."""
    device = torch.device(cfg.device)
    models = build_models(cfg.model, device, cfg.seed, METHODS, **cfg.model_kwargs())
    steps = {m: TrainStep(models[m], device, cfg.dtype, cfg.mask_ratio) for m in METHODS}
    unit = models["greenmim"].unit
    batches = BatchSource(cfg.batch_size, cfg.resolved_img_size(), unit, cfg.mask_ratio, device, cfg.seed)
    log(f"[bench] {cfg.model} img {cfg.resolved_img_size()} batch {cfg.batch_size} mask {cfg.mask_ratio} "
        f"{cfg.dtype} {device}: {cfg.warmup} warm-up + {cfg.iters} timed steps per method, interleaved")
    times = time_interleaved(steps, batches, cfg.warmup, cfg.iters, on_step=_progress(log))
    methods: Dict[str, Dict[str, Any]] = {m: times[m].summary(cfg.batch_size) for m in METHODS}
    for m in METHODS:
        methods[m]["params"] = sum(p.numel() for p in models[m].parameters())
    if cfg.memory:
        for m in METHODS:
            mask = batches.next_mask()
            stats = measure_step_memory(lambda: steps[m](batches.images, mask), models[m], steps[m].optimizer, device)
            methods[m]["memory"] = stats.as_dict()
    if cfg.flops:
        mask = batches.next_mask()
        for m in METHODS:
            methods[m]["flops"] = count_step_flops(steps[m], batches.images, mask)
    result: Dict[str, Any] = {
        "config": asdict(cfg),
        "environment": environment(device),
        "methods": methods,
        "ratios": ratios(methods),
    }
    if cfg.compile:
        result["compile"] = compiled_comparison(steps, batches, cfg, methods, log)
    return result


def ratios(methods: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """greenmim relative to simmim: speedup (img/s ratio), memory and FLOPs ratios."""
    g, s = methods["greenmim"], methods["simmim"]
    out = {"speedup": g["img_per_s"] / s["img_per_s"]}
    if "memory" in g and "memory" in s:
        out["peak_memory_ratio"] = g["memory"]["peak_bytes"] / s["memory"]["peak_bytes"]
        out["peak_memory_reduction"] = 1.0 - out["peak_memory_ratio"]
        out["step_memory_ratio"] = g["memory"]["step_peak_bytes"] / max(s["memory"]["step_peak_bytes"], 1)
    if "flops" in g and "flops" in s:
        out["flops_ratio"] = g["flops"] / s["flops"]
    return out


def compiled_comparison(steps: Dict[str, TrainStep], batches: BatchSource, cfg: BenchConfig, eager: Dict[str, Dict[str, Any]], log: Log) -> Dict[str, Any]:
    """``torch.compile`` each encoder in place, time the steps again and report the gain over eager."""
    out: Dict[str, Any] = {}
    for m, step in steps.items():
        step.model.encoder.compile()
        t0 = time.perf_counter()
        step(batches.images, batches.next_mask())  # compiles
        out[m] = {"compile_s": time.perf_counter() - t0}
    log("[bench] compiled encoders: timing again")
    times = time_interleaved(steps, batches, cfg.warmup, cfg.iters, on_step=_progress(log))
    for m in steps:
        summary = times[m].summary(cfg.batch_size)
        out[m].update(summary, gain=summary["img_per_s"] / eager[m]["img_per_s"])
    out["speedup"] = out["greenmim"]["img_per_s"] / out["simmim"]["img_per_s"]
    return out


def _progress(log: Log) -> Callable[[str, int, float], None]:
    def on_step(method: str, i: int, seconds: float) -> None:
        log(f"[bench]   {method:9s} step {i}: {seconds * 1e3:.0f} ms")

    return on_step


# -- sweeps -----------------------------------------------------------------------------------------
DEFAULT_SWEEP_RATIOS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
DEFAULT_SWEEP_SIZES = (224, 384, 512)


def window_for(cfg: BenchConfig, img_size: int) -> Optional[int]:
    """Window size for ``img_size``: the configured one when the unit grid is a multiple of it,
    otherwise the unit grid itself (img/32 for Swin: 12 at 384, 16 at 512, as timm's *_window12_384
    models do), so every stage's grid is tiled by whole windows. None for models without windows."""
    args = {**get_spec(cfg.model).args, **cfg.overrides}
    if "window_size" not in args:
        return None
    window = int(args["window_size"])
    unit = int(args.get("patch_size", 4)) * 2 ** (len(args["depths"]) - 1)
    units = img_size // unit
    return window if units % window == 0 else units


def run_sweep(
    cfg: BenchConfig,
    mask_ratios: Sequence[float] = DEFAULT_SWEEP_RATIOS,
    img_sizes: Sequence[int] = DEFAULT_SWEEP_SIZES,
    log: Log = _stderr,
) -> Dict[str, List[Dict[str, Any]]]:
    """Speedup and memory ratio against mask ratio (at ``cfg``'s image size) and against image size
    (at ``cfg``'s mask ratio). FLOPs are skipped at each point to keep the sweep short."""
    base = replace(cfg, flops=False, compile=False)
    base_size = cfg.resolved_img_size()

    def point(mask_ratio: float, img_size: int) -> Dict[str, Any]:
        overrides = dict(base.overrides)
        window = window_for(base, img_size)
        if window is not None:
            overrides["window_size"] = window
        res = run_comparison(replace(base, mask_ratio=mask_ratio, img_size=img_size, overrides=overrides), log)
        row = {"mask_ratio": mask_ratio, "img_size": img_size, "window_size": window, **res["ratios"]}
        for m in METHODS:
            row[f"{m}_img_per_s"] = res["methods"][m]["img_per_s"]
            if "memory" in res["methods"][m]:
                row[f"{m}_peak_bytes"] = res["methods"][m]["memory"]["peak_bytes"]
        if "grouping_ms" in res["methods"]["greenmim"]:
            row["grouping_share"] = res["methods"]["greenmim"]["grouping_share"]
        return row

    return {
        "by_mask_ratio": [point(r, base_size) for r in mask_ratios],
        "by_img_size": [point(cfg.mask_ratio, s) for s in img_sizes],
    }
