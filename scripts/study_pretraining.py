"""Does the pretraining pay off? greenmim vs simmim vs no pretraining on a small labelled folder.

Arms (every arm runs every seed; seed ``s`` pretrains with ``seed=s`` and evaluates with ``seed=s``):

* ``A``: ``greenmim-pretrain model=greenmim_<model>`` on the *train* images, then k-NN, linear probe, fine-tune;
* ``B``: ``greenmim-pretrain model=simmim_<model>``: the same model, data, steps and recipe, all-token encoder;
* ``C``: no pretraining (random initialisation), the same three evaluations and fine-tune budget.

Stages (``--stage``; ``all`` runs them in order, and every finished run is skipped when rerun, so an
interrupted study continues where it stopped):

1. ``prepare``: a resized copy of the dataset (shorter side ``--cache-size`` px, RGB JPEG q95) so that
   JPEG decoding of 500 px photos does not dominate a CPU step and dilute the wall-time ratio; the
   128 px crops seen by the models are the same up to resampling.
2. ``pretrain``: A and B per seed, interleaved (A s0, B s0, A s1, ...) so that load drift on a shared
   machine hits both methods alike. ``trainer.log_every=1``: ``metrics.jsonl`` holds the loss of every
   step and its throughput, from which the cumulative training wall time per step is computed
   (``batch / img_per_s``); ``wall.json`` adds the whole process' wall time.
3. ``evaluate``: ``greenmim-finetune experiment={knn,linear_probe,finetune_small_data}`` per arm and seed.
4. ``report``: ``summary.json``, ``summary.md`` (the README table) and one PNG (``--png``): loss vs step,
   loss vs wall time, and downstream top-1 (mean +- std over seeds) of A, B, C.

Usage (what ``scripts/study_pretraining.sh`` runs)::

    python scripts/study_pretraining.py --data ../shared/data/hymenoptera --out runs/study_pretraining \
        --png docs/study_pretraining.png
    python scripts/study_pretraining.py --stage evaluate --arms C ...      # one stage / some arms only

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
EVALS = ("knn", "linear_probe", "finetune_small_data")
EVAL_LABELS = {"knn": "k-NN (k=20)", "linear_probe": "linear probe", "finetune_small_data": "fine-tune"}
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


# -- running commands -------------------------------------------------------------------------------
def run_logged(cmd: Sequence[str], log_path: Path, env: Dict[str, str]) -> float:
    """Run ``cmd`` with output to ``log_path``; return its wall time; exit with its log tail on failure."""
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"study: command failed (exit {proc.returncode}), log {log_path}:\n{tail}")
    return wall


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
    for seed in args.seeds:
        for arm in arms:
            run = pretrain_dir(out, arm, seed)
            if (run / "wall.json").is_file():
                continue
            if run.exists():  # an interrupted run: start it again from scratch (its timings would be mixed)
                import shutil

                shutil.rmtree(run)
            wall = run_logged(pretrain_cmd(args, METHODS[arm], seed, root, run), run.with_suffix(".log"), child_env(args.threads))
            (run / "wall.json").write_text(json.dumps({"process_wall_s": wall, "method": METHODS[arm], "seed": seed}))


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


# -- command line -----------------------------------------------------------------------------------
def csv_list(text: str) -> List[str]:
    return [t for t in text.split(",") if t]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/hymenoptera", help="folder-per-class dataset (train/, val/)")
    p.add_argument("--out", default="runs/study_pretraining", help="where every run goes")
    p.add_argument("--png", default="docs/study_pretraining.png", help="the figure")
    p.add_argument("--stage", default="all", choices=("all", "prepare", "pretrain", "evaluate", "report"))
    p.add_argument("--arms", type=csv_list, default=["A", "B", "C"], help="comma-separated subset of A,B,C")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in csv_list(s)], default=[0, 1, 2])
    p.add_argument("--evals", type=csv_list, default=list(EVALS), help="comma-separated subset of " + ",".join(EVALS))
    p.add_argument("--cache-size", type=int, default=160, help="shorter side of the resized copy (0: use --data as is)")
    p.add_argument("--model", default="swin_micro", help="model config suffix: greenmim_<model> / simmim_<model>")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="pretraining batch")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--pretrain-epochs", type=int, default=150)
    p.add_argument("--pretrain-max-steps", type=int, default=-1)
    p.add_argument("--pretrain-blr", type=float, default=2e-2, help="lr = blr x batch / 256")
    p.add_argument("--pretrain-warmup", type=int, default=10, help="warmup epochs")
    p.add_argument("--pretrain-override", action="append", default=[], help="extra greenmim-pretrain override (repeatable)")
    p.add_argument("--eval-override", action="append", default=[], help="extra greenmim-finetune override for every evaluation (repeatable)")
    args = p.parse_args(argv)
    bad = sorted(set(args.arms) - {"A", "B", "C"}) + sorted(set(args.evals) - set(EVALS))
    if bad:
        p.error(f"unknown arm(s)/evaluation(s) {bad}: arms are A,B,C; evaluations are {','.join(EVALS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    root = prepare(data, out / "data", args.cache_size) if args.cache_size > 0 else data
    if args.stage in ("all", "pretrain"):
        pretrain(args, root, out)
    if args.stage in ("all", "evaluate"):
        evaluate(args, root, out)
    if args.stage in ("all", "report"):
        report(args, out)


if __name__ == "__main__":
    main()
