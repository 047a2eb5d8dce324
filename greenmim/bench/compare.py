"""One side-by-side benchmark of greenmim against the all-token baseline, and sweeps of it."""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..models import get_spec
from ..models.registry import TIMM_IMG_SIZE, mask_unit
from ..plan.masking import DEFAULT_MASK_RATIO
from .flops import count_step_flops
from .memory import measure_step_memory
from .profile import profile_steps
from ..engine.step import compile_counters
from .step import METHODS, PlannedBatches, TrainStep, build_models, time_interleaved, timed_step

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
    mask_ratio: float = DEFAULT_MASK_RATIO
    dtype: str = "fp32"
    device: str = "cpu"
    warmup: int = 2
    iters: int = 5
    seed: int = 0
    overrides: Dict[str, Any] = field(default_factory=dict)
    compile: bool = False  # also time the steps compiled as trainer.compile=true does
    compile_mode: str = "auto"  # trainer.compile_mode
    clip_grad: Optional[float] = None  # trainer.clip_grad (the pretraining recipe's: none)
    memory: bool = True
    flops: bool = True
    profile: int = 0  # profiled steps per method (0: no profile)
    planning: str = "workers"  # where masks are planned: "workers" (ahead, as in training) or "inline"
    plan_workers: int = 2  # DataLoader worker processes planning ahead (0: the main thread, between steps)
    shared_mask: bool = False  # one mask per batch instead of one per sample
    methods: Tuple[str, ...] = METHODS  # one method alone: its figures, no ratios
    attention: Optional[str] = None  # create_encoder(attention=): "sdpa" or "flex"; None: the encoder's default

    def model_kwargs(self) -> Dict[str, Any]:
        """Constructor arguments: the overrides, the image size, and for a Swin whose window does
        not tile the new size the window from :func:`window_for`."""
        kwargs = dict(self.overrides)
        if self.attention is not None:
            kwargs["attention"] = self.attention
        if self.shared_mask:  # the model's planner then broadcasts one sample's layouts
            kwargs["shared_mask"] = True
        if self.img_size is not None:
            kwargs["img_size"] = self.img_size
            window = window_for(self.model, self.overrides, self.img_size)
            if window is not None:
                kwargs[window_key(self.model, self.overrides)] = window
        return kwargs

    def resolved_img_size(self) -> int:
        if self.img_size is not None:
            return self.img_size
        args = {**get_spec(self.model).args, **self.overrides}
        size = args["img_size"] if "img_size" in args else TIMM_IMG_SIZE
        return size if isinstance(size, int) else int(size[0])


def environment(device: torch.device) -> Dict[str, Any]:
    """Where the numbers come from."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    commit = _git_commit()
    if commit:
        env["git"] = commit
    # other jobs on a shared machine make step times noisy (None: this platform cannot tell)
    env["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    env["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return env


def _git_commit() -> str:
    """``<short hash>[+dirty]`` of the source tree the package runs from, or '' outside a checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_comparison(cfg: BenchConfig, log: Log = _stderr) -> Dict[str, Any]:
    """Build both models (or ``cfg.methods``' one) with the same weights, time interleaved full
    steps, then measure peak memory and FLOPs of each (and, with ``cfg.compile``, the compiled steps)."""
    device = torch.device(cfg.device)
    env = environment(device)  # before the run: the load average says how busy the machine was
    methods_run = tuple(cfg.methods)
    kwargs = cfg.model_kwargs()
    key = window_key(cfg.model, cfg.overrides)
    configured = {**get_spec(cfg.model).args, **cfg.overrides}.get(key)
    if key and tuple(np.atleast_1d(kwargs.get(key, configured))) != tuple(np.atleast_1d(configured)):
        log(f"[bench] window {configured} does not tile {cfg.img_size} px: using {key}={kwargs[key]}")
    log(f"[bench] building {' and '.join(methods_run)} {cfg.model} ...")
    models = build_models(cfg.model, device, cfg.seed, methods_run, **kwargs)
    # a compiled step needs static plan shapes (CUDA's default); eager and compiled then time the same plans
    static = True if cfg.compile else None
    steps = {m: TrainStep(models[m], device, cfg.dtype, cfg.planning, cfg.clip_grad, static) for m in methods_run}
    unit = models[methods_run[0]].unit
    extra = 2 + cfg.profile + (cfg.warmup + cfg.iters + 3) * cfg.compile
    batches = PlannedBatches(
        cfg.batch_size, cfg.resolved_img_size(), unit, cfg.mask_ratio, device,
        {m: steps[m].planner for m in methods_run}, steps=cfg.warmup + cfg.iters + extra, seed=cfg.seed,
        shared=cfg.shared_mask, workers=cfg.plan_workers,
    )
    log(f"[bench] {cfg.model} img {cfg.resolved_img_size()} batch {cfg.batch_size} mask {cfg.mask_ratio} "
        f"({'shared' if cfg.shared_mask else 'per-sample'}) {cfg.dtype} {device}, planning {cfg.planning}"
        f"{f' ({cfg.plan_workers} workers)' if cfg.planning == 'workers' else ''}: "
        f"{cfg.warmup} warm-up + {cfg.iters} timed steps per method" + (", interleaved" if len(methods_run) > 1 else ""))
    t0 = time.perf_counter()
    times = time_interleaved(steps, batches, cfg.warmup, cfg.iters, what="[bench] timing")
    log(f"[bench] timing: {cfg.warmup + cfg.iters} steps per method in {time.perf_counter() - t0:.0f} s")
    methods: Dict[str, Dict[str, Any]] = {m: times[m].summary(cfg.batch_size) for m in methods_run}
    for m in methods_run:
        methods[m]["params"] = sum(p.numel() for p in models[m].parameters())
    if cfg.memory:
        log("[bench] peak memory of one step per method ...")
        batch = batches.next_batches()
        for m in methods_run:
            stats = measure_step_memory(lambda: steps[m](batch[m]), models[m], steps[m].optimizer, device)
            methods[m]["memory"] = stats.as_dict()
    if cfg.flops:
        log("[bench] counting FLOPs ...")
        batch = batches.next_batches()
        for m in methods_run:
            methods[m]["flops"] = count_step_flops(steps[m], batch[m])
    result: Dict[str, Any] = {
        "config": {**asdict(cfg), "model_kwargs": kwargs},
        "environment": env,
        "methods": methods,
        "ratios": ratios(methods),
    }
    if cfg.profile:
        log(f"[bench] profiling {cfg.profile} step(s) per method ...")
        profiled = [batches.next_batches() for _ in range(cfg.profile)]
        result["profile"] = {m: profile_steps(steps[m], [b[m] for b in profiled]) for m in methods_run}
    if cfg.compile:
        result["compile"] = compiled_comparison(steps, batches, cfg, methods, log)
    return result


def ratios(methods: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """greenmim relative to simmim: speedup (img/s ratio), memory and FLOPs ratios ({} when one
    method ran alone)."""
    if not all(m in methods for m in METHODS):
        return {}
    g, s = methods["greenmim"], methods["simmim"]
    out = {"speedup": g["img_per_s"] / s["img_per_s"], "speedup_mean": g["img_per_s_mean"] / s["img_per_s_mean"]}
    if "memory" in g and "memory" in s:
        out["peak_memory_ratio"] = g["memory"]["peak_bytes"] / s["memory"]["peak_bytes"]
        out["peak_memory_reduction"] = 1.0 - out["peak_memory_ratio"]
        out["step_memory_ratio"] = g["memory"]["step_peak_bytes"] / max(s["memory"]["step_peak_bytes"], 1)
    if "flops" in g and "flops" in s:
        out["flops_ratio"] = g["flops"] / s["flops"]
    return out


def compiled_comparison(steps: Dict[str, TrainStep], batches: PlannedBatches, cfg: BenchConfig, eager: Dict[str, Dict[str, Any]], log: Log) -> Dict[str, Any]:
    """Compile each method's step as ``trainer.compile=true`` does (:meth:`TrainStep.compile`), time
    both again, interleaved on the same masks, and report per method the img/s, the gain over eager,
    the compile time, the graphs and graph breaks compiled and the graphs compiled after warm-up
    (recompiles, 0 with static plans), and ``speedup`` next to the eager run's ``speedup_eager``.

    A method whose compiled step fails (graph capture or code generation) gets its error recorded
    and goes back to eager, so one failure does not hide the other method's figures.
    """
    out: Dict[str, Any] = {}
    compiled: Dict[str, TrainStep] = {}
    for m, step in steps.items():
        mode = step.compile(cfg.compile_mode)
        log(f"[bench] compiling {m}'s step (torch.compile mode {mode}; a cold cache takes minutes) ...")
        before = compile_counters()
        t0 = time.perf_counter()
        try:
            timed_step(step, batches.next_batches()[m], None)  # compiles forward and backward
        except Exception as exc:  # noqa: BLE001 - any compiler failure is a result to report
            step.eager()
            message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
            out[m] = {"mode": mode, "error": message}
            log(f"[bench] torch.compile failed for {m}: {message}")
            continue
        counts = compile_counters()
        out[m] = {"mode": mode, "compile_s": time.perf_counter() - t0, "graphs": counts["graphs"] - before["graphs"],
                  "graph_breaks": counts["graph_breaks"] - before["graph_breaks"]}
        log(f"[bench] compiled {m} in {out[m]['compile_s']:.0f} s: {out[m]['graphs']} graph(s), {out[m]['graph_breaks']} graph break(s)")
        compiled[m] = step
    if compiled:
        modes = ", ".join(f"{m} mode {out[m]['mode']}" for m in compiled)
        log(f"[bench] compiled steps ({modes}): timing again")
        warm: Dict[str, int] = {}
        t0 = time.perf_counter()
        times = time_interleaved(compiled, batches, cfg.warmup, cfg.iters, on_warm=lambda: warm.update(compile_counters()),
                                 what="[bench] timing compiled")
        log(f"[bench] timing compiled: {cfg.warmup + cfg.iters} steps per method in {time.perf_counter() - t0:.0f} s")
        recompiles = compile_counters()["graphs"] - warm["graphs"]
        for m in compiled:
            summary = times[m].summary(cfg.batch_size)
            out[m].update(summary, gain=summary["img_per_s"] / eager[m]["img_per_s"])
        out["graphs_after_warmup"] = recompiles  # both methods together (dynamo's counters are process-wide)
    if all(m in eager for m in METHODS):
        out["speedup_eager"] = eager["greenmim"]["img_per_s"] / eager["simmim"]["img_per_s"]
        if all(m in compiled for m in METHODS):
            out["speedup"] = out["greenmim"]["img_per_s"] / out["simmim"]["img_per_s"]
    return out


# -- sweeps -----------------------------------------------------------------------------------------
DEFAULT_SWEEP_RATIOS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
DEFAULT_SWEEP_SIZES = (224, 384, 512)


def window_for(model: str, overrides: Dict[str, Any], img_size: int) -> Any:
    """Window size(s) for ``img_size``: the configured one when the unit grid is a multiple of it,
    otherwise the unit grid itself (img/32: 12 at 384, 16 at 512, as timm's *_window12_384 models
    do), so every stage's grid is tiled by whole windows. Swin's ``window_size`` gives an int,
    Twins' per-stage ``wss`` a tuple; None for models without windows."""
    args = {**get_spec(model).args, **overrides}
    key = "window_size" if "window_size" in args else "wss" if args.get("wss") else None
    if key is None:
        return None
    unit = mask_unit(model, overrides)
    units = img_size // unit

    def fit(window: int) -> int:
        return window if units % window == 0 else units

    return fit(int(args[key])) if key == "window_size" else tuple(fit(int(w)) for w in args[key])


def window_key(model: str, overrides: Dict[str, Any]) -> Optional[str]:
    """The constructor argument holding the attention window: Swin's ``window_size``, Twins' ``wss``."""
    args = {**get_spec(model).args, **overrides}
    return "window_size" if "window_size" in args else "wss" if args.get("wss") else None


def run_sweep(
    cfg: BenchConfig,
    mask_ratios: Sequence[float] = DEFAULT_SWEEP_RATIOS,
    img_sizes: Sequence[int] = DEFAULT_SWEEP_SIZES,
    log: Log = _stderr,
) -> Dict[str, List[Dict[str, Any]]]:
    """Speedup and memory ratio against mask ratio (at ``cfg``'s image size) and against image size
    (at ``cfg``'s mask ratio). FLOPs are skipped at each point to keep the sweep short."""
    base = replace(cfg, flops=False, compile=False, profile=0)
    base_size = cfg.resolved_img_size()

    def point(mask_ratio: float, img_size: int) -> Dict[str, Any]:
        point_cfg = replace(base, mask_ratio=mask_ratio, img_size=img_size)
        res = run_comparison(point_cfg, log)
        window = point_cfg.model_kwargs().get(window_key(point_cfg.model, point_cfg.overrides) or "")
        row = {"mask_ratio": mask_ratio, "img_size": img_size, "window_size": window, **res["ratios"]}
        for m in METHODS:
            row[f"{m}_img_per_s"] = res["methods"][m]["img_per_s"]
            if "memory" in res["methods"][m]:
                row[f"{m}_peak_bytes"] = res["methods"][m]["memory"]["peak_bytes"]
        if "grouping_ms" in res["methods"]["greenmim"]:
            row["grouping_share"] = res["methods"]["greenmim"]["grouping_share"]
        return row

    done: Dict[tuple, Dict[str, Any]] = {}  # the (mask ratio, size) shared by both axes runs once

    def cached(mask_ratio: float, img_size: int) -> Dict[str, Any]:
        if (mask_ratio, img_size) not in done:
            done[(mask_ratio, img_size)] = point(mask_ratio, img_size)
        return done[(mask_ratio, img_size)]

    return {
        "by_mask_ratio": [cached(r, base_size) for r in mask_ratios],
        "by_img_size": [cached(cfg.mask_ratio, s) for s in img_sizes],
    }
