"""Does the pretraining pay off? greenmim vs simmim vs no pretraining on a small labelled folder.

Arms (every arm runs every seed; seed ``s`` pretrains with ``seed=s`` and evaluates with ``seed=s``, or,
with ``--pretrain-seeds 0``, one pretraining per method that every evaluation seed starts from):

* ``A``: ``greenmim-pretrain model=greenmim_<model>`` on the *train* images, then k-NN, linear probe, fine-tune;
* ``B``: ``greenmim-pretrain model=simmim_<model>``: the same model, data, steps and recipe, all-token encoder;
* ``C``: no pretraining (random initialisation), the same three evaluations and fine-tune budget.

Stages (``--stage``; ``all`` runs them in order, and every finished run is skipped when rerun, so an
interrupted study continues where it stopped):

1. ``prepare``: a resized copy of the dataset (shorter side ``--cache-size`` px, RGB JPEG q95) so that
   JPEG decoding of 500 px photos does not dominate a CPU step and dilute the wall-time ratio; the
   128 px crops seen by the models are the same up to resampling (``--cache-size 0``: none, for data
   that is small already, e.g. Imagewoof at 160 px). With ``finetune_10pct`` among ``--evals``, also
   the fixed label subset (:func:`label_subset`: links, no copies) in ``<out>/labels_<pct>pct_s<seed>``.
2. ``pretrain``: A and B per seed, interleaved (A s0, B s0, A s1, ...) so that load drift on a shared
   machine hits both methods alike. ``trainer.log_every=1``: ``metrics.jsonl`` holds the loss of every
   step and its throughput, from which the cumulative training wall time per step is computed
   (``batch / img_per_s``); ``wall.json`` adds the whole process' wall time.
3. ``evaluate``: ``greenmim-finetune experiment={knn,linear_probe,finetune_small_data}`` per arm and seed,
   plus the small-data recipe at 30 epochs / lr 1e-3 (``finetune_30ep``, its first version); or
   (``--evals``) ``finetune_10pct``: the small-data recipe for ``--ft-epochs`` on the label subset,
   validated on the full val split, and ``finetune_full`` (the same on every train label).
4. ``report``: ``summary.json``, ``summary.md`` (the README table) and one PNG (``--png``): loss vs step,
   loss vs wall time, and downstream top-1 (mean +- std over seeds) of A, B, C; with ``--json`` also the
   study file (:func:`study_file`: per-arm lists of per-seed top-1, pretraining seconds, the targets).

Usage (what ``scripts/study_pretraining.sh`` runs)::

    python scripts/study_pretraining.py --data ../shared/data/hymenoptera --out runs/study_pretraining \
        --png docs/study_pretraining.png
    python scripts/study_pretraining.py --stage evaluate --arms C ...      # one stage / some arms only
    STUDY=imagewoof scripts/study_pretraining.sh                           # the Imagewoof study (README)

Every command is printed before it runs, and each run's stdout/stderr go to ``<run dir>.log``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

METHODS = {"A": "greenmim", "B": "simmim"}
#: evaluation name -> (greenmim-finetune experiment, extra overrides). ``finetune_30ep`` is the small-data
#: recipe's first version (30 epochs at lr 1e-3), kept because it behaves differently with pretrained weights.
#: ``finetune_10pct`` / ``finetune_full``: the low-label protocol on the fixed label subset (``--label-fraction``
#: of the train split, see :func:`label_subset`) / all train labels, ``--ft-epochs`` epochs, validated at the end.
EVAL_RECIPES = {
    "knn": ("knn", []),
    "linear_probe": ("linear_probe", []),
    "finetune_small_data": ("finetune_small_data", []),
    "finetune_30ep": ("finetune_small_data", ["trainer.epochs=30", "optim.blr=1.6e-2", "sched.warmup_epochs=3", "eval_every=5"]),
    "finetune_10pct": ("finetune_small_data", ["eval_every=0"]),
    "finetune_full": ("finetune_small_data", ["eval_every=0"]),
}
EVALS = tuple(EVAL_RECIPES)
#: the README study's evaluations (hymenoptera); the Imagewoof study passes ``--evals knn,linear_probe,finetune_10pct``.
DEFAULT_EVALS = ("knn", "linear_probe", "finetune_small_data", "finetune_30ep")
#: evaluations on the label subset (``<out>/labels_<pct>pct``) instead of ``--data``
SUBSET_EVALS = ("finetune_10pct",)
#: evaluations whose epochs / warmup come from ``--ft-epochs`` / ``--ft-warmup``
SCHEDULED_EVALS = ("finetune_10pct", "finetune_full")
EVAL_LABELS = {"knn": "k-NN (k=20)", "linear_probe": "linear probe", "finetune_small_data": "fine-tune 60 ep, lr 3e-3",
               "finetune_30ep": "fine-tune 30 ep, lr 1e-3", "finetune_10pct": "fine-tune, 10% labels",
               "finetune_full": "fine-tune, all labels"}
ARM_LABELS = {"A": "A: greenmim", "B": "B: simmim", "C": "C: random init"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


# -- stage 1: the resized copy -----------------------------------------------------------------------
def prepare(data: Path, cache: Path, size: int) -> Path:
    """Copy ``data/{train,val}/<class>/*`` to ``cache`` with the shorter side resized to ``size`` px."""
    from PIL import Image

    marker = cache / ".done"
    if marker.is_file() and marker.read_text() == f"{data.resolve()} {size}":
        return cache
    n = 0
    for src in sorted(data.rglob("*")):
        if not src.is_file() or src.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = src.relative_to(data)
        if rel.parts[0] not in ("train", "val"):
            continue
        dst = (cache / rel).with_suffix(".jpg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            if scale < 1:
                im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
            im.save(dst, quality=95)
        n += 1
    if n == 0:
        raise SystemExit(f"study: no images under {data}/train or {data}/val: pass --data pointing at a folder-per-class dataset")
    marker.write_text(f"{data.resolve()} {size}")
    print(f"study: {n} images resized to a {size} px shorter side in {cache}", flush=True)
    return cache


# -- the low-label subset --------------------------------------------------------------------------
def label_subset(data: Path, out: Path, fraction: float, seed: int) -> Path:
    """A class-balanced, seeded subset of ``data/train``: ``round(fraction x train images / classes)`` images
    per class (the same number for every class), drawn with ``random.Random(seed)`` from each class' sorted
    file list. Written as ``out/train/<class>/<file>`` symbolic links (nothing is copied, nothing is written
    into ``data``), ``out/val`` a link to ``data/val`` and ``out/files.txt`` (one ``<class>/<file>`` a line).
    Returns ``out`` (a ``data.root`` for greenmim-finetune); an existing subset of the same draw is reused."""
    import random

    classes = sorted(d.name for d in (data / "train").iterdir() if d.is_dir()) if (data / "train").is_dir() else []
    files = {c: sorted(f.name for f in (data / "train" / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    total = sum(map(len, files.values()))
    if not total:
        raise SystemExit(f"study: no images under {data}/train: pass --data pointing at a folder-per-class dataset")
    per_class = max(1, round(fraction * total / len(classes)))
    short = [c for c in classes if len(files[c]) < per_class]
    if short:
        raise SystemExit(f"study: class(es) {short} have fewer than {per_class} train images: lower --label-fraction")
    chosen = [f"{c}/{name}" for c in classes for name in sorted(random.Random(f"{seed}:{c}").sample(files[c], per_class))]
    listing = "\n".join(chosen) + "\n"
    if (out / "files.txt").is_file() and (out / "files.txt").read_text() == listing and (out / "val").exists():
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    for rel in chosen:
        link = out / "train" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(data / "train" / rel)
    (out / "val").symlink_to(data / "val", target_is_directory=True)
    (out / "files.txt").write_text(listing)
    print(f"study: {len(chosen)} of {total} train images ({per_class} per class, seed {seed}) linked in {out}", flush=True)
    return out


def subset_root(args, out: Path) -> Path:
    return out / f"labels_{round(100 * args.label_fraction)}pct_s{args.label_seed}"


# -- running commands -------------------------------------------------------------------------------
def run_logged(cmd: Sequence[str], log_path: Path, env: Dict[str, str]) -> Dict[str, float]:
    """Run ``cmd`` with output to ``log_path``; exit with its log tail on failure.

    Returns ``{"process_wall_s", "process_cpu_s", "load_avg_1m_start", "load_avg_1m_end"}``: the child's
    wall time, its CPU time (user + system of the child and its loader workers, from ``getrusage``: unlike
    the wall time, barely changed by other users' load on a shared machine) and the 1-minute load average
    before and after it."""
    import resource

    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"study: command failed (exit {proc.returncode}), log {log_path}:\n{tail}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"process_wall_s": wall, "process_cpu_s": cpu, "load_avg_1m_start": load0, "load_avg_1m_end": os.getloadavg()[0]}


def child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    return env


# -- stage 2: pretraining ---------------------------------------------------------------------------
def pretrain_cmd(args, method: str, seed: int, root: Path, out: Path) -> List[str]:
    return [
        sys.executable, "-m", "greenmim.cli.pretrain", "~experiment",
        f"model={method}_{args.model}", "data=imagefolder", f"data.root={root}",
        f"data.img_size={args.img_size}", f"data.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}",
        f"optim.blr={args.pretrain_blr}", f"sched.warmup_epochs={args.pretrain_warmup}",
        f"trainer.epochs={args.pretrain_epochs}", f"trainer.max_steps={args.pretrain_max_steps}",
        "trainer.log_every=1", "trainer.ckpt_every_epochs=1000000", "trainer.keep_last=1", "trainer.tensorboard=false",
        "vis.every_epochs=0", f"seed={seed}", f"output_dir={out}", *args.pretrain_override,
    ]


def pretrain_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "pretrain" / f"{METHODS[arm]}_s{seed}"


def last_checkpoint(run: Path) -> Optional[Path]:
    ckpts = sorted((run / "checkpoints").glob("step-*.pt"))
    return ckpts[-1] if ckpts else None


def pretrain(args, root: Path, out: Path) -> None:
    arms = [a for a in ("A", "B") if a in args.arms]
    for seed in args.pretrain_seeds:
        for arm in arms:
            run = pretrain_dir(out, arm, seed)
            if (run / "wall.json").is_file():
                continue
            if run.exists():  # an interrupted run: start it again from scratch (its timings would be mixed)
                import shutil

                shutil.rmtree(run)
            times = run_logged(pretrain_cmd(args, METHODS[arm], seed, root, run), run.with_suffix(".log"), child_env(args.threads))
            (run / "wall.json").write_text(json.dumps({**times, "method": METHODS[arm], "seed": seed}))


def read_jsonl(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(run: Path, batch: int) -> Dict[str, List[float]]:
    """``{"step", "loss", "time_s"}`` per logged step; ``time_s`` is the cumulative training-loop time."""
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r and "train/img_per_s" in r]
    steps, losses, times, t = [], [], [], 0.0
    for r in rows:
        t += batch / max(r["train/img_per_s"], 1e-9)
        steps.append(r["step"])
        losses.append(r["train/loss"])
        times.append(t)
    return {"step": steps, "loss": losses, "time_s": times}



# -- stage 3: evaluations ---------------------------------------------------------------------------
def eval_dir(out: Path, arm: str, seed: int, kind: str) -> Path:
    return out / "eval" / f"{arm}_s{seed}" / kind


def eval_cmd(args, kind: str, seed: int, root: Path, run: Path, checkpoint: Optional[Path]) -> List[str]:
    """``greenmim-finetune experiment=<kind>`` with the pretraining architecture (``model=greenmim_<model>``:
    the classifier is timm's model either way) and the pretrained encoder, or random init."""
    schedule = [f"trainer.epochs={args.ft_epochs}", f"sched.warmup_epochs={args.ft_warmup}"] if kind in SCHEDULED_EVALS else []
    return [
        sys.executable, "-m", "greenmim.cli.finetune", f"experiment={EVAL_RECIPES[kind][0]}", f"model=greenmim_{args.model}",
        f"data.root={root}", f"data.img_size={args.img_size}", f"pretrained={checkpoint if checkpoint else 'null'}",
        f"seed={seed}", f"output_dir={run}", "trainer.tensorboard=false", *EVAL_RECIPES[kind][1], *schedule, *args.eval_override,
    ]


def eval_seeds(args, arm: str, kind: str) -> List[int]:
    """The seeds an evaluation runs with. k-NN has no randomness of its own: with one pretraining per
    method (``--pretrain-seeds`` a single seed) it runs once per arm, with the first seed (arm C's
    random encoder then is that seed's); with a pretraining per seed, every seed runs."""
    return args.seeds[:1] if kind == "knn" and len(args.pretrain_seeds) == 1 else list(args.seeds)


def pretrain_seed(args, seed: int) -> int:
    """The pretraining an evaluation seed uses: its own if pretrained per seed, else the only one."""
    return seed if seed in args.pretrain_seeds else args.pretrain_seeds[0]


def evaluate(args, root: Path, out: Path, subset: Optional[Path] = None) -> None:
    """Every (seed, arm, evaluation) not finished yet, in that order; ``subset``: the label subset's root."""
    for seed in args.seeds:
        for arm in args.arms:
            checkpoint = None
            if arm in METHODS:
                pre = pretrain_dir(out, arm, pretrain_seed(args, seed))
                checkpoint = last_checkpoint(pre)
                if checkpoint is None or not (pre / "wall.json").is_file():
                    print(f"study: skipping arm {arm} seed {seed}: its pretraining has not finished (run --stage pretrain)", flush=True)
                    continue
            for kind in args.evals:
                if seed not in eval_seeds(args, arm, kind):
                    continue
                run = eval_dir(out, arm, seed, kind)
                if (run / "results.json").is_file():
                    continue
                if run.exists():  # an interrupted evaluation: start it again (a run never writes into another's folder)
                    import shutil

                    shutil.rmtree(run)
                data_root = subset if kind in SUBSET_EVALS else root
                times = run_logged(eval_cmd(args, kind, seed, data_root, run, checkpoint), run.with_suffix(".log"), child_env(args.threads))
                (run / "times.json").write_text(json.dumps(times))


def eval_top1(run: Path) -> Optional[float]:
    """Val top-1 of a finished evaluation: k-NN / probe ``metrics.acc1``; fine-tune: the *last* epoch's
    (not the best epoch's, which would select on the val split)."""
    path = run / "results.json"
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    if "metrics" in res:
        return float(res["metrics"]["acc1"])
    return float(res["last"]["val_acc1"])


# -- the predicted ratio ----------------------------------------------------------------------------
def bench_cmd(args, out: Path) -> List[str]:
    """``greenmim-bench`` for the study's model, image size and batch, on this machine's CPU, one thread."""
    from omegaconf import OmegaConf

    import greenmim

    cfg_dir = Path(greenmim.__file__).resolve().parent.parent / "configs" / "model"
    path = cfg_dir / f"greenmim_{args.model}.yaml"
    if not path.is_file():  # an installed package: configs ship as greenmim.configs
        from importlib import resources

        path = Path(str(resources.files("greenmim.configs") / "model" / f"greenmim_{args.model}.yaml"))
    cfg = OmegaConf.load(path)
    enc = dict(cfg.get("encoder_args") or {})
    cmd = [sys.executable, "-m", "greenmim.cli.bench", "--model", cfg.name, "--img-size", str(args.img_size),
           "--batch-size", str(args.batch_size), "--device", "cpu", "--threads", str(args.threads),
           "--warmup", "2", "--iters", str(args.bench_iters), "--no-memory", "--out", str(out / "bench")]
    names = {"window_size": "--window-size", "embed_dim": "--embed-dim", "depths": "--depths", "num_heads": "--num-heads"}
    for key, value in enc.items():
        if key in names:
            cmd += [names[key], ",".join(map(str, value)) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else str(value)]
    for key in ("decoder_dim", "decoder_heads", "decoder_depth"):
        if key in cfg:
            cmd += ["--override", f"{key}={cfg[key]}"]
    return cmd


def bench(args, out: Path) -> None:
    if args.bench_iters <= 0 or (out / "bench.json").is_file():
        return
    run_logged(bench_cmd(args, out), out / "bench.log", child_env(args.threads))


# -- stage 4: report --------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> Dict[str, float]:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def median(values: Sequence[float]) -> float:
    v = sorted(values)
    return float("nan") if not v else (v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2]))


def selected_evals(args) -> List[str]:
    """``--evals`` in the table's order."""
    return [k for k in EVALS if k in args.evals]


def collect(args, out: Path) -> dict:
    """Everything the table and the figure show, from the run folders (``summary.json``)."""
    summary: dict = {"machine": machine(), "settings": {k: v for k, v in vars(args).items()}, "pretrain": {}, "eval": {},
                     "evals": selected_evals(args)}
    for arm, method in METHODS.items():
        curves, walls, cpus, loads, loops, steps_ms, final = [], [], [], [], [], [], []
        for seed in args.pretrain_seeds:
            run = pretrain_dir(out, arm, seed)
            if not (run / "wall.json").is_file():
                continue
            c = loss_curve(run, args.batch_size)
            curves.append(c)
            times = json.loads((run / "wall.json").read_text())
            walls.append(times["process_wall_s"])
            if "process_cpu_s" in times:  # runs of the first version of this script lack it
                cpus.append(times["process_cpu_s"])
                loads.append(0.5 * (times["load_avg_1m_start"] + times["load_avg_1m_end"]))
            loops.append(c["time_s"][-1])
            steps_ms.append(1000 * median([b - a for a, b in zip([0.0] + c["time_s"][:-1], c["time_s"])]))
            tail = c["loss"][-max(1, len(c["loss"]) // 20):]
            final.append(sum(tail) / len(tail))
        if curves:
            summary["pretrain"][method] = {
                "seeds": len(curves), "steps": len(curves[0]["step"]), "process_wall_s": mean_std(walls),
                "train_loop_s": mean_std(loops), "median_step_ms": mean_std(steps_ms), "final_loss": mean_std(final),
                "curves": curves,
            }
            if cpus:
                summary["pretrain"][method]["process_cpu_s"] = mean_std(cpus)
                summary["pretrain"][method]["load_avg_1m"] = mean_std(loads)
    g, s = summary["pretrain"].get("greenmim"), summary["pretrain"].get("simmim")
    if g and s:
        summary["measured_ratio"] = {
            "train_loop": s["train_loop_s"]["mean"] / g["train_loop_s"]["mean"],
            "median_step": s["median_step_ms"]["mean"] / g["median_step_ms"]["mean"],
            "process_wall": s["process_wall_s"]["mean"] / g["process_wall_s"]["mean"],
        }
        if "process_cpu_s" in g and "process_cpu_s" in s:
            summary["measured_ratio"]["process_cpu"] = s["process_cpu_s"]["mean"] / g["process_cpu_s"]["mean"]
    bench_json = out / "bench.json"
    if bench_json.is_file():
        b = json.loads(bench_json.read_text())
        summary["bench"] = {k: b["ratios"].get(k) for k in ("speedup", "speedup_mean", "flops_ratio")}
        summary["bench"]["load_avg_1m"] = b.get("environment", {}).get("load_avg_1m")
        summary["bench"]["command"] = " ".join(shlex.quote(c) for c in bench_cmd(args, out)[2:]).replace("greenmim.cli.bench", "greenmim-bench", 1)
    majority = None
    for arm in ("A", "B", "C"):
        for kind in summary["evals"]:
            vals, seeds, runs = [], [], []
            for seed in eval_seeds(args, arm, kind):
                run = eval_dir(out, arm, seed, kind)
                top1 = eval_top1(run)
                if top1 is None:
                    continue
                vals.append(top1)
                seeds.append(seed)
                times = json.loads((run / "times.json").read_text()) if (run / "times.json").is_file() else {}
                runs.append({"seed": seed, "top1": top1, "run": str(run), **times})
                if majority is None:
                    majority = json.loads((run / "results.json").read_text()).get("majority_acc1")
            if vals:
                summary["eval"].setdefault(arm, {})[kind] = {**mean_std(vals), "seeds": seeds, "runs": runs}
    summary["majority_acc1"] = majority
    return summary


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def table(summary: dict) -> str:
    """The README table (markdown)."""
    evals = summary["evals"]
    lines = ["| arm | " + " | ".join(f"{EVAL_LABELS[k]} top-1 (%)" for k in evals) + " |", "|---|" + "---|" * len(evals)]
    for arm in ("A", "B", "C"):
        row = summary["eval"].get(arm, {})
        cells = []
        for k in evals:
            m = row.get(k)
            cells.append(f"{m['mean']:.1f} ± {m['std']:.1f} (n={m['n']})" if m else "—")
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    if summary.get("majority_acc1") is not None:
        lines.append("| majority class | " + " | ".join(f"{summary['majority_acc1']:.1f}" for _ in evals) + " |")
    pre = summary["pretrain"]
    if pre:
        lines += ["", "| pretraining | steps | training-loop wall (s) | median step (ms) | process wall (s) | process CPU (s) | final loss |",
                  "|---|---|---|---|---|---|---|"]
        for method, p in pre.items():
            cpu = p.get("process_cpu_s")
            lines.append(
                f"| {method} | {p['steps']} | {p['train_loop_s']['mean']:.0f} ± {p['train_loop_s']['std']:.0f} | "
                f"{p['median_step_ms']['mean']:.0f} ± {p['median_step_ms']['std']:.0f} | "
                f"{p['process_wall_s']['mean']:.0f} ± {p['process_wall_s']['std']:.0f} | "
                + (f"{cpu['mean']:.0f} ± {cpu['std']:.0f} | " if cpu else "— | ")
                + f"{p['final_loss']['mean']:.4f} ± {p['final_loss']['std']:.4f} |"
            )
    r = summary.get("measured_ratio")
    if r:
        lines += ["", f"simmim / greenmim wall time: training loop {r['train_loop']:.2f}x, median step {r['median_step']:.2f}x, "
                      f"whole process {r['process_wall']:.2f}x" + (f"; process CPU time {r['process_cpu']:.2f}x" if "process_cpu" in r else "")]
    if summary.get("bench"):
        lines += [f"greenmim-bench prediction: {summary['bench']['speedup']:.2f}x (`{summary['bench']['command']}`)"]
    return "\n".join(lines) + "\n"


def smooth(values: Sequence[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(summary: dict, png: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"greenmim": "tab:green", "simmim": "tab:blue", "A": "tab:green", "B": "tab:blue", "C": "tab:gray"}
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for method, p in summary["pretrain"].items():
        curves = p["curves"]
        n = min(len(c["loss"]) for c in curves)
        losses = [smooth(c["loss"][:n], window) for c in curves]
        mean = [sum(col) / len(col) for col in zip(*losses)]
        lo = [min(col) for col in zip(*losses)]
        hi = [max(col) for col in zip(*losses)]
        steps = curves[0]["step"][:n]
        label = f"{method} ({p['seeds']} seed{'s' if p['seeds'] > 1 else ''})"
        axes[0].plot(steps, mean, color=colors[method], label=label)
        axes[0].fill_between(steps, lo, hi, color=colors[method], alpha=0.2)
        for i, (c, curve) in enumerate(zip(curves, losses)):
            axes[1].plot([t / 60 for t in c["time_s"][:n]], curve, color=colors[method], alpha=0.8, lw=1,
                         label=label if i == 0 else None)
    axes[0].set(xlabel="pretraining step", ylabel=f"loss (norm-pix MSE, {window}-step mean)", title="pretraining loss vs step (band: min-max over seeds)")
    axes[1].set(xlabel="training-loop wall time (min)", ylabel="loss", title="pretraining loss vs wall time (one line per seed)")
    r = summary.get("measured_ratio")
    if r:
        note = f"simmim/greenmim time: {r['train_loop']:.2f}x" + (f"\n(process CPU time: {r['process_cpu']:.2f}x)" if "process_cpu" in r else "")
        if summary.get("bench"):
            note += f"\ngreenmim-bench predicts {summary['bench']['speedup']:.2f}x"
        axes[1].text(0.98, 0.97, note, transform=axes[1].transAxes, ha="right", va="top", fontsize=9)
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[2]
    width = 0.27
    evals = summary["evals"]
    for i, arm in enumerate(("A", "B", "C")):
        row = summary["eval"].get(arm, {})
        xs = [j + (i - 1) * width for j, k in enumerate(evals) if k in row]
        ms = [row[k] for k in evals if k in row]
        if not ms:
            continue
        ax.bar(xs, [m["mean"] for m in ms], width, yerr=[m["std"] for m in ms], capsize=3, color=colors[arm], alpha=0.75, label=ARM_LABELS[arm])
        for x, m in zip(xs, ms):
            ax.plot([x] * len(m["values"]), m["values"], "k.", ms=4)
    if summary.get("majority_acc1") is not None:
        ax.axhline(summary["majority_acc1"], color="tab:red", ls="--", lw=1, label=f"majority class {summary['majority_acc1']:.1f}%")
    ax.set_xticks(range(len(evals)), [EVAL_LABELS[k].replace(", ", "\n") for k in evals])
    ax.set(ylabel="val top-1 (%)", title="downstream accuracy (mean ± std over seeds; dots: seeds)")
    values = [v for row in summary["eval"].values() for m in row.values() for v in m["values"]]
    lows = values + [summary.get("majority_acc1") or 50]
    ax.set_ylim(max(0.0, min(40.0, min(lows) - 5)), min(100.0, max(values + [40.0]) + 10))
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


#: the study file's arm names (``docs/study_imagewoof.json``, read by tooling)
ARM_NAMES = {"A": "greenmim", "B": "simmim", "C": "scratch"}
#: the study file's per-arm lists: field -> evaluation
STUDY_FIELDS = {"finetune_10pct_top1": "finetune_10pct", "linear_probe_top1": "linear_probe", "knn_top1": "knn",
                "finetune_full_top1": "finetune_full"}


def count_images(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0


def targets(summary: dict) -> dict:
    """The issue's three targets on the 10%-label fine-tune and the pretraining wall time (``None``: not
    measured yet). Standard error of a mean: sample std / sqrt(n); of the A - B difference: the root sum
    of both squared (Welch)."""
    ev = {arm: summary["eval"].get(arm, {}).get("finetune_10pct") for arm in ("A", "B", "C")}
    out: dict = {}
    if ev["A"] and ev["C"]:
        gap = ev["A"]["mean"] - ev["C"]["mean"]
        out["finetune_10pct_A_vs_C"] = {"rule": "A >= C + 3 points", "difference": gap, "met": gap >= 3.0,
                                        "n": [ev["A"]["n"], ev["C"]["n"]]}
    if ev["A"] and ev["B"]:
        gap = ev["A"]["mean"] - ev["B"]["mean"]
        se = math.sqrt(ev["A"]["std"] ** 2 / ev["A"]["n"] + ev["B"]["std"] ** 2 / ev["B"]["n"])
        margin = max(1.5, 2 * se)
        out["finetune_10pct_A_vs_B"] = {"rule": "A >= B - max(1.5, 2 SE of the difference)", "difference": gap,
                                        "se_difference": se, "margin": margin, "met": gap >= -margin,
                                        "n": [ev["A"]["n"], ev["B"]["n"]]}
    g, s = summary["pretrain"].get("greenmim"), summary["pretrain"].get("simmim")
    if g and s:
        ratio = g["train_loop_s"]["mean"] / s["train_loop_s"]["mean"]
        out["pretrain_wall_A_over_B"] = {"rule": "A's training-loop wall time <= 0.5 x B's", "ratio": ratio, "met": ratio <= 0.5}
        if "process_cpu_s" in g and "process_cpu_s" in s:
            out["pretrain_wall_A_over_B"]["cpu_ratio"] = g["process_cpu_s"]["mean"] / s["process_cpu_s"]["mean"]
    return out


def study_file(args, summary: dict, out: Path) -> dict:
    """The study file (``--json``): ``data.{train,val}_images``; per arm (``greenmim``, ``simmim``,
    ``scratch``) the per-seed top-1 lists ``finetune_10pct_top1``, ``linear_probe_top1``, ``knn_top1``
    (``finetune_full_top1`` when run) and ``pretrain_seconds`` (training-loop wall time; null for scratch);
    plus seeds, runs, CPU times, targets, the command and versions."""
    import torch

    data = Path(args.data).resolve()
    arms: dict = {}
    for arm, name in ARM_NAMES.items():
        row = summary["eval"].get(arm, {})
        entry: dict = {}
        for field, kind in STUDY_FIELDS.items():
            if kind in args.evals:
                entry[field] = [round(v, 2) for v in row[kind]["values"]] if kind in row else []
                entry[field.replace("_top1", "_seeds")] = row[kind]["seeds"] if kind in row else []
        pre = summary["pretrain"].get(METHODS.get(arm, ""))
        entry["pretrain_seconds"] = round(pre["train_loop_s"]["mean"], 1) if pre else None
        if pre:
            entry["pretrain"] = {"train_loop_s": pre["train_loop_s"]["mean"], "process_wall_s": pre["process_wall_s"]["mean"],
                                 "process_cpu_s": pre.get("process_cpu_s", {}).get("mean"),
                                 "load_avg_1m": pre.get("load_avg_1m", {}).get("mean"), "steps": pre["steps"],
                                 "median_step_ms": pre["median_step_ms"]["mean"], "final_loss": pre["final_loss"]["mean"]}
        entry["runs"] = {kind: m["runs"] for kind, m in row.items()}
        arms[name] = entry
    import timm

    return {
        "data": {"train_images": count_images(data / "train"), "val_images": count_images(data / "val"), "root": args.data,
                 "label_subset": {"fraction": args.label_fraction, "seed": args.label_seed,
                                  "train_images": count_images(subset_root(args, out) / "train"),
                                  "files": str(subset_root(args, out) / "files.txt")}},
        "arms": arms,
        "targets": targets(summary),
        "majority_acc1": summary["majority_acc1"],
        "measured_ratio_simmim_over_greenmim": summary.get("measured_ratio"),
        "command": command_line(args),
        "settings": {k: v for k, v in vars(args).items() if k not in ("stage",)},
        "versions": {"machine": summary["machine"], "torch": torch.__version__, "timm": timm.__version__,
                     "greenmim_commit": git_commit()},
    }


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def report(args, out: Path) -> dict:
    summary = collect(args, out)
    text = table(summary)
    slim = {**summary, "pretrain": {m: {k: v for k, v in p.items() if k != "curves"} for m, p in summary["pretrain"].items()}}
    (out / "summary.json").write_text(json.dumps(slim, indent=2, default=str))
    (out / "summary.md").write_text(text)
    plot(summary, Path(args.png), window=max(1, args.smooth))
    print(text + f"\nfigure: {args.png}\nsummary: {out / 'summary.json'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(study_file(args, summary, out), indent=2, default=str) + "\n")
        print(f"study file: {args.json}", flush=True)
    return slim


# -- command line -----------------------------------------------------------------------------------
def csv_list(text: str) -> List[str]:
    return [t for t in text.split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/hymenoptera", help="folder-per-class dataset (train/, val/)")
    p.add_argument("--out", default="runs/study_pretraining", help="where every run goes")
    p.add_argument("--png", default="docs/study_pretraining.png", help="the figure")
    p.add_argument("--stage", default="all", choices=("all", "prepare", "pretrain", "bench", "evaluate", "report"))
    p.add_argument("--arms", type=csv_list, default=["A", "B", "C"], help="comma-separated subset of A,B,C")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in csv_list(s)], default=[0, 1, 2], help="evaluation seeds")
    p.add_argument("--pretrain-seeds", type=lambda s: [int(x) for x in csv_list(s)], default=None,
                   help="pretraining seeds (default: --seeds; one seed: every evaluation seed uses that pretraining)")
    p.add_argument("--evals", type=csv_list, default=list(DEFAULT_EVALS), help="comma-separated subset of " + ",".join(EVALS))
    p.add_argument("--label-fraction", type=float, default=0.1, help="finetune_10pct: fraction of the train labels kept")
    p.add_argument("--label-seed", type=int, default=0, help="finetune_10pct: seed of the (fixed) label subset")
    p.add_argument("--ft-epochs", type=int, default=30, help="finetune_10pct / finetune_full: epochs")
    p.add_argument("--ft-warmup", type=int, default=3, help="finetune_10pct / finetune_full: warmup epochs")
    p.add_argument("--cache-size", type=int, default=160, help="shorter side of the resized copy (0: use --data as is)")
    p.add_argument("--model", default="swin_micro", help="model config suffix: greenmim_<model> / simmim_<model>")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="pretraining batch")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--pretrain-epochs", type=int, default=60)
    p.add_argument("--pretrain-max-steps", type=int, default=-1)
    p.add_argument("--pretrain-blr", type=float, default=2e-2, help="lr = blr x batch / 256")
    p.add_argument("--pretrain-warmup", type=int, default=10, help="warmup epochs")
    p.add_argument("--pretrain-override", action="append", default=[], help="extra greenmim-pretrain override (repeatable)")
    p.add_argument("--bench-iters", type=int, default=10, help="timed steps per method of the greenmim-bench prediction (0: skip it)")
    p.add_argument("--smooth", type=int, default=7, help="moving-average window (steps) of the plotted losses")
    p.add_argument("--eval-override", action="append", default=[], help="extra greenmim-finetune override for every evaluation (repeatable)")
    p.add_argument("--json", default=None, help="also write the study file (e.g. docs/study_imagewoof.json)")
    return p


def command_line(args) -> str:
    """``python scripts/study_pretraining.py`` with every option of ``args`` spelled out (``--stage`` left
    out: the default runs every stage, skipping what is finished), the command that reproduces a study."""
    words = ["python", "scripts/study_pretraining.py"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in ("help", "stage"):
            continue
        value = getattr(args, action.dest)
        if value is None:
            continue
        if action.dest in ("pretrain_override", "eval_override"):
            for v in value:
                words += [action.option_strings[0], v]
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        words += [action.option_strings[0], text]
    return " ".join(shlex.quote(w) for w in words)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    bad = sorted(set(args.arms) - {"A", "B", "C"}) + sorted(set(args.evals) - set(EVALS))
    if bad:
        p.error(f"unknown arm(s)/evaluation(s) {bad}: arms are A,B,C; evaluations are {','.join(EVALS)}")
    if args.pretrain_seeds is None:
        args.pretrain_seeds = list(args.seeds)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    root = prepare(data, out / "data", args.cache_size) if args.cache_size > 0 else data
    if args.stage in ("all", "pretrain"):
        pretrain(args, root, out)
    if args.stage in ("all", "bench"):
        bench(args, out)
    subset = None
    if any(k in SUBSET_EVALS for k in args.evals) and args.stage in ("all", "prepare", "evaluate"):
        subset = label_subset(data, subset_root(args, out), args.label_fraction, args.label_seed)
    if args.stage in ("all", "evaluate"):
        evaluate(args, root, out, subset)
    if args.stage in ("all", "report"):
        report(args, out)


if __name__ == "__main__":
    main()
