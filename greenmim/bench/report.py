"""Text tables, JSON and plots of benchmark results."""
from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any, Dict, List, Optional, Tuple

MiB = 2 ** 20


def output_paths(out: str) -> Tuple[str, str]:
    """``--out`` as ``(json_path, png_path)``: ``x.json`` -> ``x.json, x.png``; ``x`` -> ``x.json, x.png``."""
    root, ext = os.path.splitext(out)
    if ext.lower() not in (".json", ".png"):
        root = out
    return root + ".json", root + ".png"


def write_json(result: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=_jsonable)
        f.write("\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _fmt(value: Optional[float], spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _scaled(value: Optional[float], unit: float) -> Optional[float]:
    return None if value is None else value / unit


def comparison_table(result: Dict[str, Any]) -> str:
    """The side-by-side table of :func:`~greenmim.bench.compare.run_comparison`'s result."""
    cfg, env, methods, r = result["config"], result["environment"], result["methods"], result["ratios"]
    size = cfg["img_size"] or "default"
    device = env["device_name"]
    lines = [
        f"greenmim-bench  {cfg['model']}  img {size}  batch {cfg['batch_size']}  mask {cfg['mask_ratio']}  "
        f"{cfg['dtype']}  {device} ({env['threads']} threads, load {env['load_avg_1m'] if env['load_avg_1m'] is not None else '?'})  torch {env['torch']}  {env['date_utc']}",
        f"full step = forward + backward + AdamW step + zero_grad; {cfg['warmup']} warm-up, median of "
        f"{cfg['iters']} interleaved steps; masks {'shared per batch' if cfg.get('shared_mask') else 'per sample'}, "
        f"planned {_planning(cfg)}",
        "host ms: training thread until the step's last kernel is queued; gpu ms: CUDA events around the step; "
        "plan ms: planning (where it ran); thread: training-thread time on the plan",
    ]
    if cfg["overrides"]:
        lines.append(f"overrides: {cfg['overrides']}")
    columns = (("method", 9), ("step ms", 9), ("(p25-p75)", 13), ("host ms", 8), ("gpu ms", 8), ("img/s", 8),
               ("peak MiB", 9), ("step MiB", 9), ("GFLOP", 8), ("plan ms med/max", 16), ("on path", 7),
               ("thread", 7), ("packing", 7))
    header = " ".join(f"{name:>{width}s}" if i else f"{name:{width}s}" for i, (name, width) in enumerate(columns))
    lines += [header, "-" * len(header)]
    for name, m in methods.items():
        mem = m["memory"] if "memory" in m else {}
        cells = [
            name,
            _fmt(m["step_ms"], ".1f"),
            f"({m['step_ms_p25']:.0f}-{m['step_ms_p75']:.0f})",
            _fmt(m.get("host_ms"), ".1f"),
            _fmt(m.get("gpu_ms"), ".1f"),
            _fmt(m["img_per_s"], ".2f"),
            _fmt(_scaled(mem.get("peak_bytes"), MiB), ".0f"),
            _fmt(_scaled(mem.get("step_peak_bytes"), MiB), ".0f"),
            _fmt(_scaled(m.get("flops"), 1e9), ".1f"),
            f"{m['grouping_ms']:.1f}/{m['grouping_ms_max']:.0f}" if "grouping_ms" in m else "-",
            ("yes" if m["grouping_on_critical_path"] else "no") if "grouping_ms" in m else "-",
            _fmt(m.get("plan_thread_ms"), ".2f"),
            _fmt(m.get("packing_efficiency"), ".3f"),
        ]
        lines.append(" ".join(f"{c:>{w}s}" if i else f"{c:{w}s}" for i, (c, (_, w)) in enumerate(zip(cells, columns))))
    summary = (f"greenmim vs simmim: speedup {r['speedup']:.2f}x (of mean step times: {r['speedup_mean']:.2f}x)" if r
               else f"{', '.join(methods)} alone: no ratios")
    if "peak_memory_ratio" in r:
        red = 100 * r["peak_memory_reduction"]
        summary += f", peak memory {r['peak_memory_ratio']:.2f}x ({abs(red):.0f}% {'less' if red >= 0 else 'more'})"
        summary += f", step memory {r['step_memory_ratio']:.2f}x"
    if "flops_ratio" in r:
        summary += f", FLOPs {r['flops_ratio']:.2f}x"
    lines.append(summary)
    if "simmim" in methods and "memory" in methods["simmim"]:
        lines.append(f"memory: peak = resident (weights, buffers, AdamW state) + step peak; measured by {methods['simmim']['memory']['measure']}")
    if "profile" in result:
        lines.append(profile_table(result["profile"]))
    if "compile" in result:
        lines.append(compile_line(result["compile"]))
    return "\n".join(lines)


def _planning(cfg: Dict[str, Any]) -> str:
    if cfg["planning"] == "inline":
        return "inline (on the training thread, inside the step)"
    workers = cfg["plan_workers"]
    return f"ahead in {workers} loader worker(s)" if workers else "ahead, between steps (main process)"


def compile_line(c: Dict[str, Any]) -> str:
    """The compiled steps (``trainer.compile=true``): per method img/s, gain over eager, mode, compile
    time, graphs and graph breaks (or the error); the compiled speedup next to the eager one and the
    graphs compiled after warm-up (recompiles)."""
    parts = []
    for m in ("greenmim", "simmim"):
        if "error" in c.get(m, {}):
            parts.append(f"{m} FAILED ({c[m]['error']})")
        elif m in c:
            parts.append(f"{m} {c[m]['step_ms']:.1f} ms, {c[m]['img_per_s']:.2f} img/s ({c[m]['gain']:.2f}x eager; "
                         f"{c[m]['mode']}, compile {c[m]['compile_s']:.0f} s, {c[m]['graphs']} graphs, "
                         f"{c[m]['graph_breaks']} graph breaks)")
    line = "torch.compile (the trainer's step): " + ", ".join(parts)
    if "speedup" in c:
        line += f"; speedup compiled {c['speedup']:.2f}x (eager {c['speedup_eager']:.2f}x)"
    if "graphs_after_warmup" in c:
        line += f"; graphs compiled after warm-up: {c['graphs_after_warmup']}"
    return line


def profile_table(profiles: Dict[str, Dict[str, Any]]) -> str:
    """Top operators by self time of each method's profiled steps."""
    lines = []
    for method, p in profiles.items():
        phases = ", ".join(f"{k} {v:.0f} ms" for k, v in p["phases_ms"].items())
        lines.append(f"profile {method} (per step, mean of {p['steps']}): {phases}; grouping (host) {p['grouping_ms']:.1f} ms; "
                     f"total {p['time']} {p['self_total_ms']:.0f} ms")
        lines.append(f"  {'operator':52s} {'self ms':>9s} {'share':>6s} {'calls':>6s}")
        for op in p["top"]:
            lines.append(f"  {op['name'][:52]:52s} {op['self_ms']:9.1f} {100 * op['share']:5.1f}% {op['calls']:6d}")
        if "kernels" in p:
            lines.append(f"  top {len(p['kernels'])} CUDA kernels of {method} by GPU time (per step): {p['launches']} launches, "
                         f"{p['device_total_ms']:.1f} ms of GPU time")
            lines.append(f"  {'kernel':80s} {'ms':>8s} {'share':>6s} {'count':>6s}")
            for k in p["kernels"]:
                lines.append(f"  {k['name'][:80]:80s} {k['ms']:8.2f} {100 * k['share']:5.1f}% {k['count']:6d}")
    return "\n".join(lines)


def solver_table(result: Dict[str, Any]) -> str:
    """Per-partition solver time and packing efficiency (:func:`~greenmim.bench.solver.solver_benchmark`)."""
    lines = [
        f"grouping solver: {result['model']}  img {result['img_size'][0]}x{result['img_size'][1]}  batch {result['batch_size']}  "
        f"mask {result['mask_ratio']} (per-sample)  {result['masks']} random masks",
    ]
    header = f"{'stage':>5s} {'shift':>6s} {'windows':>8s} {'g':>5s} {'groups':>7s} {'packing':>8s} {'solve ms med':>12s} {'p90':>8s} {'max':>8s} {'windows ms':>10s} {'optimal':>8s}"
    lines += [header, "-" * len(header)]
    for p in result["partitions"]:
        lines.append(
            f"{p['stage']:5d} {p['shift'][0]:6d} {p['windows']:8.0f} {p['group_size']:5.0f} {p['num_groups']:7.0f} {p['efficiency']:8.3f} "
            f"{p['solve_ms']['median']:12.2f} {p['solve_ms']['p90']:8.2f} {p['solve_ms']['max']:8.2f} "
            f"{p['stage_windows_ms']['median']:10.2f} {100 * p['optimal_fraction']:7.0f}%"
        )
    s = result["solve_ms_per_step"]
    lines.append(f"solver per step (all partitions): median {s['median']:.1f} ms, p90 {s['p90']:.1f} ms, max {s['max']:.1f} ms")
    b = result["plan_ms"]
    lines.append(
        f"whole plan per batch (one loader worker: windows, solver, slots, neighbours): median {b['median']:.1f} ms, "
        f"p90 {b['p90']:.1f} ms, max {b['max']:.1f} ms; packing efficiency {result['plan_efficiency']:.3f}"
    )
    return "\n".join(lines)


def calibration_table(result: Dict[str, Any]) -> str:
    lines = [
        f"cost model calibration: group attention fwd+bwd, dim {result['dim']}, heads {result['heads']}, "
        f"~{result['slots']} slots, {result['dtype']}, fused={result['fused']}",
        f"{'g':>5s} {'groups':>7s} {'ms':>9s} {'fit ms':>9s}",
    ]
    for p in result["points"]:
        lines.append(f"{p['group_size']:5d} {p['num_groups']:7d} {p['seconds'] * 1e3:9.2f} {p['fitted_seconds'] * 1e3:9.2f}")
    cm = result["cost_model"]
    lines.append(
        f"fit: time = a*n_g*g^2 + b*n_g*g + c with a = {result['a_seconds']:.3e} s, b = {result['b_seconds']:.3e} s, "
        f"c = {result['c_seconds']:.3e} s (max rel. error {100 * result['max_relative_error']:.0f}%)"
    )
    if cm is None:
        lines.append("=> no cost model: the quadratic term fitted to 0 (use more slots: a larger --batch-size)")
    else:
        lines.append(f"=> CostModel(a=1.0, b={cm['b']:.1f})  (only b/a matters to the solver)")
    return "\n".join(lines)


def _window(window: Any) -> str:
    """An int window, or a per-stage tuple shown by its distinct values (Twins' ``wss``)."""
    if window is None:
        return "-"
    if isinstance(window, (list, tuple)):
        return "/".join(str(w) for w in dict.fromkeys(window))
    return str(window)


def sweep_table(sweep: Dict[str, List[Dict[str, Any]]]) -> str:
    header = f"{'mask':>5s} {'img':>5s} {'window':>6s} {'green img/s':>11s} {'simmim img/s':>12s} {'speedup':>8s} {'mem ratio':>9s} {'group share':>11s}"
    lines = ["sweep", header, "-" * len(header)]
    for key in ("by_mask_ratio", "by_img_size"):
        for p in sweep[key]:
            lines.append(
                f"{p['mask_ratio']:5.2f} {p['img_size']:5d} {_window(p['window_size']):>6s} {p['greenmim_img_per_s']:11.2f} "
                f"{p['simmim_img_per_s']:12.2f} {p['speedup']:7.2f}x {_fmt(p.get('peak_memory_ratio'), '9.2f'):>9s} "
                f"{_fmt(_scaled(p.get('grouping_share'), 0.01), '10.1f'):>10s}%"
            )
    return "\n".join(lines)


def plot_sweep(sweep: Dict[str, List[Dict[str, Any]]], path: str, title: str = "") -> None:
    """Two panels (against mask ratio, against image size): speedup on the left axis, peak-memory
    ratio greenmim/simmim on the right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, xkey, xlabel in (
        (axes[0], "by_mask_ratio", "mask_ratio", "mask ratio"),
        (axes[1], "by_img_size", "img_size", "image size (px)"),
    ):
        rows = sweep[key]
        xs = [p[xkey] for p in rows]
        ax.plot(xs, [p["speedup"] for p in rows], "o-", color="tab:green", label="speedup (img/s ratio)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("greenmim / simmim throughput", color="tab:green")
        ax.grid(alpha=0.3)
        if all("peak_memory_ratio" in p for p in rows):
            ax2 = ax.twinx()
            ax2.plot(xs, [p["peak_memory_ratio"] for p in rows], "s--", color="tab:purple", label="peak memory ratio")
            ax2.set_ylabel("greenmim / simmim peak memory", color="tab:purple")
            ax2.set_ylim(0, max(1.0, max(p["peak_memory_ratio"] for p in rows) * 1.1))
        ax.set_ylim(0, max(p["speedup"] for p in rows) * 1.2)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
