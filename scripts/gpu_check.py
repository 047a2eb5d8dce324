"""The GPU check (``bash scripts/gpu_check.sh [OUT]``, which runs this file): greenmim's hot path on
one H100/H200 in one call of at most 8 minutes, on a machine with only torch (CUDA), timm, triton
and numpy. This driver needs the standard library alone (greenmim and torch are imported by the
stages), so whatever breaks in a stage is written down as that stage's reason.

Stages, in order of value, each a child process with its own time limit (and all within one
budget, ``GPU_CHECK_BUDGET_S``, 465 s by default; a stage that would not fit is recorded as skipped):

1. ``swin_b_w7``: Swin-B W7, batch 128, bf16, 224 px, mask 0.75, eager, greenmim vs simmim
   (per-sample masks, plans from loader workers, the trainer's own step);
2. ``profile_swin_b_w7``: ``torch.profiler`` over 3 greenmim steps: the top 20 CUDA kernels by
   GPU time with their counts, written to ``OUT/profile_swin_b_w7.txt``;
3. ``compile_greenmim``, ``compile_simmim``: each method's step compiled as ``trainer.compile=true``
   does (CUDA graphs), its own stage with a budget for a cold inductor cache; compile seconds,
   graphs and graph breaks; then ``swin_b_w7_compiled`` puts the two side by side;
4. ``flex_swin_b_w7``: greenmim with ``--attention flex`` (FlexAttention) beside stage 1's SDPA;
5. ``swin_l_w14``, ``twins_l``, ``swin_b_w7_shared`` (one mask per batch);
6. ``cuda_tests``: ``tests/test_hot_path.py`` on CUDA when pytest is installed (skipped, with the
   reason, when it is not).

Every stage appends its entry to ``OUT/summary.json`` as soon as it ends: ``greenmim_ms``,
``simmim_ms``, ``speedup`` (simmim's step time over greenmim's), ``mem_ratio`` (peak memory),
``host_ms`` and ``gpu_ms`` per method, or ``status`` ``failed``/``timeout``/``skipped`` with the
``reason``; a later timeout or crash keeps what came before. Each stage's output is ``OUT/<stage>.log``,
its full result ``OUT/<stage>.json`` (``greenmim-bench --out``). A table of all stages ends the run.

Stages run as forked children of this process, which has imported torch and greenmim once but never
touched CUDA (so each child initialises CUDA itself); should a child fail to initialise CUDA after
the fork, the check goes on with a fresh interpreter per stage (``GPU_CHECK_ISOLATION=subprocess``
asks for that from the start).

``GPU_CHECK_SMOKE=1`` runs every stage on the CPU with tiny models (a test does, with hydra-core,
omegaconf, pycocotools, tensorboard, matplotlib and pytest made unimportable). Knobs:
``GPU_CHECK_BUDGET_S`` (counted from ``GPU_CHECK_T0``, the wrapper's start, so the imports count),
``GPU_CHECK_COMPILE_S`` (each compile stage's limit), ``GPU_CHECK_PLAN_WORKERS``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

#: when the check started (the wrapper script's clock, so the imports before this module count too)
T0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
SWIN_B = ["--model", "swin_base_patch4_window7_224"]
#: log lines of a child that could not use CUDA after the fork: rerun in a fresh interpreter
FORK_CUDA_ERRORS = ("Cannot re-initialize CUDA in forked subprocess", "CUDA error: initialization error",
                    "cudaErrorInitializationError")


@dataclass
class Stage:
    """One stage: ``greenmim-bench`` with ``argv`` (after the common arguments), or the CUDA tests."""

    name: str
    what: str
    limit: float  # seconds
    argv: List[str] = field(default_factory=list)
    kind: str = "bench"  # bench, tests
    min_s: float = 20.0  # not started with less of the budget left


def stages(smoke: bool, compile_s: float) -> List[Stage]:
    tiny_swin = ["--embed-dim", "16"] if smoke else []
    tiny_twins = ["--override", "embed_dims=(16,16,16,16)"] if smoke else []
    return [
        Stage("swin_b_w7", "Swin-B W7, eager", 75, SWIN_B + tiny_swin + ["--warmup", "3", "--iters", "10"]),
        Stage("profile_swin_b_w7", "Swin-B W7 greenmim, 3 profiled steps", 50,
              SWIN_B + tiny_swin + ["--method", "greenmim", "--no-memory", "--warmup", "2", "--iters", "2", "--profile", "3"]),
        Stage("compile_greenmim", "Swin-B W7 greenmim, compiled (cold cache)", compile_s,
              SWIN_B + tiny_swin + ["--method", "greenmim", "--compile", "--no-memory", "--warmup", "2", "--iters", "6"], min_s=60),
        Stage("compile_simmim", "Swin-B W7 simmim, compiled (cold cache)", compile_s,
              SWIN_B + tiny_swin + ["--method", "simmim", "--compile", "--no-memory", "--warmup", "2", "--iters", "6"], min_s=60),
        # FlexAttention compiles its kernel for each group shape on first use: more than an eager stage
        Stage("flex_swin_b_w7", "Swin-B W7 greenmim, FlexAttention (vs stage 1's SDPA)", 100,
              SWIN_B + tiny_swin + ["--method", "greenmim", "--attention", "flex", "--warmup", "3", "--iters", "10"], min_s=30),
        Stage("swin_l_w14", "Swin-L W14, eager", 60,
              ["--model", "swin_large_patch4_window7_224", "--window-size", "14"] + tiny_swin + ["--warmup", "2", "--iters", "6"]),
        Stage("twins_l", "Twins-L (SVT-L), eager", 50, ["--model", "twins_svt_large"] + tiny_twins + ["--warmup", "2", "--iters", "6"]),
        Stage("swin_b_w7_shared", "Swin-B W7, shared masks, eager", 45,
              SWIN_B + tiny_swin + ["--shared-mask", "--warmup", "2", "--iters", "6"]),
        Stage("cuda_tests", "tests/test_hot_path.py" + (" -k meta" if smoke else " (CUDA)"), 90, kind="tests"),
    ]


def common_args(smoke: bool, workers: int) -> List[str]:
    if smoke:  # tiny models on the CPU; the stage's own step counts are cut to one below
        return ["--device", "cpu", "--dtype", "fp32", "--batch-size", "2", "--img-size", "64", "--depths", "1,1,1,1",
                "--num-heads", "1,1,1,1", "--override", "decoder_dim=32", "--override", "decoder_heads=2",
                "--no-flops", "--plan-workers", str(workers)]
    return ["--device", "cuda", "--dtype", "bf16", "--batch-size", "128", "--img-size", "224", "--no-flops",
            "--plan-workers", str(workers)]


# -- children ---------------------------------------------------------------------------------------
def child_main(kind: str, argv: List[str]) -> int:
    """What a stage's child runs: ``preflight`` (device, versions) or ``bench`` (``greenmim-bench argv``)."""
    if kind == "preflight":
        import torch

        cuda = "--device" in argv and argv[argv.index("--device") + 1] == "cuda"
        print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
        if cuda:
            if not torch.cuda.is_available():
                print("gpu_check: no CUDA device here: run it on a GPU machine, or GPU_CHECK_SMOKE=1 for the CPU smoke run")
                return 2
            torch.zeros(1, device="cuda").add_(1)
            print(f"device: {torch.cuda.get_device_name()}")
        return 0
    from greenmim.cli.bench import main

    return int(main(argv) or 0)


def _forked(kind: str, argv: List[str], log: str) -> None:
    os.setsid()  # its own process group: a timeout ends its loader and compile workers too
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        code = child_main(kind, argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_child(kind: str, argv: List[str], log: Path, limit: float, isolation: str, cmd: Optional[List[str]] = None) -> Optional[int]:
    """Run one child for at most ``limit`` seconds; its exit code, or None when it was killed at the limit."""
    if cmd is None and isolation == "fork":
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is its log
            _forked(kind, argv, str(log))
        return _wait(pid, limit)
    cmd = cmd or [sys.executable, os.path.abspath(__file__), "--child", kind, *argv]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            return None


def _wait(pid: int, limit: float) -> Optional[int]:
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.2)


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
            return
        except (ProcessLookupError, PermissionError):
            continue


# -- entries ----------------------------------------------------------------------------------------
def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def bench_entry(result: Dict[str, Any]) -> Dict[str, Any]:
    """A stage's figures from its ``greenmim-bench --out`` JSON."""
    methods, r = result["methods"], result.get("ratios", {})
    entry: Dict[str, Any] = {f"{m}_ms": round(v["step_ms"], 2) for m, v in methods.items()}
    if "speedup" in r:
        entry["speedup"] = round(r["speedup"], 3)
    if "peak_memory_ratio" in r:
        entry["mem_ratio"] = round(r["peak_memory_ratio"], 3)
    entry["host_ms"] = {m: round(v["host_ms"], 2) for m, v in methods.items()}
    gpu = {m: round(v["gpu_ms"], 2) for m, v in methods.items() if "gpu_ms" in v}
    if gpu:
        entry["gpu_ms"] = gpu
    c = result.get("compile")
    if c:
        for m in methods:
            if "error" in c.get(m, {}):
                entry.update(status="failed", reason=f"torch.compile failed: {c[m]['error']}")
            elif m in c:
                entry.update(eager_ms=entry[f"{m}_ms"], **{f"{m}_ms": round(c[m]["step_ms"], 2)}, compile_s=round(c[m]["compile_s"], 1),
                             mode=c[m]["mode"], graphs=c[m]["graphs"], graph_breaks=c[m]["graph_breaks"],
                             graphs_after_warmup=c.get("graphs_after_warmup"), host_ms={m: round(c[m]["host_ms"], 2)})
                if "gpu_ms" in c[m]:
                    entry["gpu_ms"] = {m: round(c[m]["gpu_ms"], 2)}
    p = result.get("profile", {}).get("greenmim")
    if p and "launches" in p:
        entry.update(kernel_launches=p["launches"], kernel_ms=round(p["device_total_ms"], 2))
    return entry


class Summary:
    """``OUT/summary.json``, rewritten (atomically) every time a stage ends."""

    def __init__(self, out: Path, info: Dict[str, Any]):
        self.path = out / "summary.json"
        self.data: Dict[str, Any] = {**info, "stages": []}
        self._write()

    def add(self, entry: Dict[str, Any]) -> None:
        self.data["stages"].append(entry)
        self._write()

    def entry(self, name: str) -> Dict[str, Any]:
        return next((e for e in self.data["stages"] if e["stage"] == name), {})

    def _write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


def compiled_pair(summary: Summary) -> Dict[str, Any]:
    """Both compiled steps side by side (two stages, two processes, the same masks and weights)."""
    g, s = summary.entry("compile_greenmim"), summary.entry("compile_simmim")
    entry: Dict[str, Any] = {"stage": "swin_b_w7_compiled", "what": "Swin-B W7 compiled: compile_greenmim vs compile_simmim"}
    missing = [e.get("stage", name) for e, name in ((g, "compile_greenmim"), (s, "compile_simmim")) if e.get("status") != "ok"]
    if missing:
        return {**entry, "status": "failed", "reason": f"{' and '.join(missing)} gave no compiled step"}
    entry.update(status="ok", greenmim_ms=g["greenmim_ms"], simmim_ms=s["simmim_ms"],
                 speedup=round(s["simmim_ms"] / g["greenmim_ms"], 3),
                 host_ms={**g["host_ms"], **s["host_ms"]}, compile_s={"greenmim": g["compile_s"], "simmim": s["compile_s"]},
                 graph_breaks={"greenmim": g["graph_breaks"], "simmim": s["graph_breaks"]})
    if "gpu_ms" in g and "gpu_ms" in s:
        entry["gpu_ms"] = {**g["gpu_ms"], **s["gpu_ms"]}
    eager = summary.entry("swin_b_w7")
    if "speedup" in eager:
        entry["best_speedup"] = max(entry["speedup"], eager["speedup"])
    return entry


def flex_vs_sdpa(entry: Dict[str, Any], summary: Summary) -> None:
    sdpa = summary.entry("swin_b_w7").get("greenmim_ms")
    if entry.get("status") == "ok" and sdpa:
        entry.update(sdpa_greenmim_ms=sdpa, flex_speedup_over_sdpa=round(sdpa / entry["greenmim_ms"], 3))


# -- the run ----------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1], argv[2:])
    out = Path(argv[0] if argv else os.environ.get("OUT", "gpu_check_out"))
    out.mkdir(parents=True, exist_ok=True)
    smoke = os.environ.get("GPU_CHECK_SMOKE", "0") == "1"
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", 3600 if smoke else 465))
    compile_s = float(os.environ.get("GPU_CHECK_COMPILE_S", 900 if smoke else 170))
    workers = int(os.environ.get("GPU_CHECK_PLAN_WORKERS", 1 if smoke else 6))
    isolation = os.environ.get("GPU_CHECK_ISOLATION", "fork")
    if isolation not in ("fork", "subprocess"):
        print(f"gpu_check: GPU_CHECK_ISOLATION={isolation}: use fork or subprocess", file=sys.stderr)
        return 2
    common = common_args(smoke, workers)
    if isolation == "fork":  # imported once here, never initialising CUDA: every forked stage starts warm
        try:
            import greenmim.cli.bench  # noqa: F401
        except BaseException as exc:  # noqa: BLE001 - each stage then fails with this error as its reason
            print(f"gpu_check: importing greenmim-bench failed ({type(exc).__name__}: {exc}): every stage will say why")
    summary = Summary(out, {"mode": "smoke (CPU, tiny models)" if smoke else "gpu", "budget_s": budget,
                            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})

    def left() -> float:
        return budget - (time.time() - T0)

    log = out / "preflight.log"
    rc = run_child("preflight", common, log, min(60.0, left()), isolation)
    text = log.read_text(errors="replace") if log.exists() else ""
    if rc != 0 and isolation == "fork" and any(e in text for e in FORK_CUDA_ERRORS):
        print("gpu_check: CUDA failed to start in a forked child: one fresh interpreter per stage from now on")
        isolation = "subprocess"
        rc = run_child("preflight", common, log, min(60.0, left()), isolation)
        text = log.read_text(errors="replace") if log.exists() else ""
    print(text.strip())
    summary.data["preflight"] = text.strip().splitlines()
    if rc != 0:
        summary.add({"stage": "preflight", "status": "failed", "reason": _last_line(log) or f"exit {rc}"})
        print(f"gpu_check: preflight failed (see {log})")
        return 2

    plan = stages(smoke, compile_s)
    for i, stage in enumerate(plan, 1):
        entry: Dict[str, Any] = {"stage": stage.name, "what": stage.what}
        limit = max(min(stage.limit, left()), 0.0)
        print(f"== [{i}/{len(plan)}] {stage.name}: {stage.what} (limit {limit:.0f} s)", flush=True)
        if left() < min(stage.min_s, stage.limit):
            entry.update(status="skipped", reason=f"the {budget:.0f} s budget is spent: {max(left(), 0):.0f} s left, "
                         f"the stage needs at least {stage.min_s:.0f} s")
        elif stage.kind == "tests":
            entry.update(run_tests(stage, out, limit, smoke))
        else:
            entry.update(run_bench(stage, common, out, limit, smoke, isolation))
            if rc_is_fork_cuda_error(entry, out / f"{stage.name}.log", isolation):
                isolation = "subprocess"
                entry = {"stage": stage.name, "what": stage.what, **run_bench(stage, common, out, min(stage.limit, left()), smoke, isolation)}
        if stage.name == "flex_swin_b_w7":
            flex_vs_sdpa(entry, summary)
        summary.add(entry)
        print(f"   {describe(entry)}", flush=True)
        if stage.name == "compile_simmim":
            pair = compiled_pair(summary)
            summary.add(pair)
            print(f"   {describe(pair)}", flush=True)
    summary.data["total_s"] = round(time.time() - T0, 1)
    summary.add({"stage": "end", "status": "ok", "total_s": summary.data["total_s"]})
    print(table(summary.data))
    return 0


def rc_is_fork_cuda_error(entry: Dict[str, Any], log: Path, isolation: str) -> bool:
    if isolation != "fork" or entry.get("status") != "failed" or not log.exists():
        return False
    return any(e in log.read_text(errors="replace") for e in FORK_CUDA_ERRORS)


def run_bench(stage: Stage, common: List[str], out: Path, limit: float, smoke: bool, isolation: str) -> Dict[str, Any]:
    argv = common + stage.argv + ["--out", str(out / stage.name)]
    if smoke:  # one step of each kind is enough to run every code path
        argv += ["--warmup", "0", "--iters", "1"] + (["--profile", "1"] if "--profile" in stage.argv else [])
    log, result_path = out / f"{stage.name}.log", out / f"{stage.name}.json"
    if result_path.exists():
        result_path.unlink()
    t0 = time.monotonic()
    rc = run_child("bench", argv, log, limit, isolation)
    entry: Dict[str, Any] = {"seconds": round(time.monotonic() - t0, 1), "command": "greenmim-bench " + " ".join(argv)}
    if rc is None:
        return {**entry, "status": "timeout", "reason": f"stopped at its {limit:.0f} s limit (last line: {_last_line(log)})"}
    if rc != 0 or not result_path.exists():
        return {**entry, "status": "failed", "reason": f"exit {rc}: {_last_line(log)}"}
    result = json.loads(result_path.read_text())
    entry["status"] = "ok"
    entry.update(bench_entry(result))  # a failed compilation sets status failed
    if "profile" in result:
        from greenmim.bench.report import profile_table

        profile = out / f"{stage.name}.txt"
        profile.write_text(profile_table(result["profile"]) + "\n")
        entry["profile"] = profile.name
    return entry


def run_tests(stage: Stage, out: Path, limit: float, smoke: bool) -> Dict[str, Any]:
    if not _importable("pytest"):
        return {"status": "skipped", "reason": "pytest is not installed here: the CUDA correctness tests need it "
                "(pip install pytest, then: python -m pytest tests/test_hot_path.py)"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_hot_path.py"] + (["-k", "meta"] if smoke else [])
    log = out / "cuda_tests.log"
    t0 = time.monotonic()
    rc = run_child("tests", [], log, limit, "subprocess", cmd=cmd)
    entry = {"seconds": round(time.monotonic() - t0, 1), "command": " ".join(cmd[1:])}
    if rc is None:
        return {**entry, "status": "timeout", "reason": f"stopped at its {limit:.0f} s limit"}
    return {**entry, "status": "ok" if rc == 0 else "failed", "result" if rc == 0 else "reason": _last_line(log)}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def describe(e: Dict[str, Any]) -> str:
    if e.get("status") != "ok":
        return f"{e.get('status', '?')}: {e.get('reason', '')}"
    parts = [f"{m} {e[f'{m}_ms']:.1f} ms" for m in ("greenmim", "simmim") if f"{m}_ms" in e]
    if "speedup" in e:
        parts.append(f"speedup {e['speedup']:.2f}x")
    if "mem_ratio" in e:
        parts.append(f"memory {e['mem_ratio']:.2f}x")
    if "compile_s" in e:
        parts.append(f"compile {e['compile_s']} s, graph breaks {e['graph_breaks']}")
    if "flex_speedup_over_sdpa" in e:
        parts.append(f"flex vs sdpa {e['flex_speedup_over_sdpa']:.2f}x (sdpa {e['sdpa_greenmim_ms']:.1f} ms)")
    if "kernel_launches" in e:
        parts.append(f"{e['kernel_launches']} kernels, {e['kernel_ms']:.1f} ms GPU per step")
    if "result" in e:
        parts.append(e["result"])
    return ", ".join(parts) + f" ({e.get('seconds', 0):.0f} s)" if "seconds" in e else ", ".join(parts)


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(data: Dict[str, Any]) -> str:
    """The run's table (the README's GPU table), one row per stage."""
    head = f"{'stage':20s} {'greenmim ms':>11s} {'simmim ms':>9s} {'speedup':>7s} {'mem':>5s} {'host ms g/s':>13s} {'gpu ms g/s':>13s}  notes"
    lines = [f"gpu_check ({data['mode']}, {data.get('total_s', '?')} s of a {data['budget_s']:.0f} s budget)", head, "-" * len(head)]

    def pair(d: Optional[Dict[str, float]]) -> str:
        return "/".join(f"{d[m]:.0f}" if m in d else "-" for m in ("greenmim", "simmim")) if d else "-"

    for e in data["stages"]:
        if e["stage"] == "end":
            continue
        if e.get("status") != "ok" or not any(k in e for k in ("greenmim_ms", "simmim_ms")):
            lines.append(f"{e['stage']:20s} {describe(e)}")
            continue
        g, s = e.get("greenmim_ms"), e.get("simmim_ms")
        notes = []
        if "compile_s" in e:
            notes.append(f"compile {e['compile_s']} s, {e['graph_breaks']} graph breaks, {e.get('graphs_after_warmup')} recompiles")
        if "flex_speedup_over_sdpa" in e:
            notes.append(f"flex {e['flex_speedup_over_sdpa']:.2f}x sdpa")
        if "kernel_launches" in e:
            notes.append(f"{e['kernel_launches']} kernels/step, {e['profile']}")
        if "best_speedup" in e:
            notes.append(f"best of eager/compiled {e['best_speedup']:.2f}x")
        lines.append(f"{e['stage']:20s} {_ms(g):>11s} {_ms(s):>9s} "
                     f"{(format(e['speedup'], '.2f') + 'x') if 'speedup' in e else '-':>7s} "
                     f"{format(e['mem_ratio'], '.2f') if 'mem_ratio' in e else '-':>5s} {pair(e.get('host_ms')):>13s} "
                     f"{pair(e.get('gpu_ms')):>13s}  {'; '.join(notes)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
