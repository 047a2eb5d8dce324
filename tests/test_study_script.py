"""A tiny end-to-end run of scripts/study_pretraining.py (the study itself is not run in CI): both
pretraining methods, k-NN for every arm, the summary table and the PNG."""
import json
import os
import subprocess
import sys
from pathlib import Path

from finetune_helpers import make_folders

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_pretraining.py"


def test_study_script_smoke(tmp_path):
    data = make_folders(tmp_path / "data", per_class=(6, 4), size=(72, 80))
    out, png = tmp_path / "study", tmp_path / "study.png"
    cmd = [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out), "--png", str(png), "--seeds", "0",
           "--evals", "knn", "--cache-size", "72", "--img-size", "64", "--batch-size", "6", "--pretrain-epochs", "1",
           "--pretrain-warmup", "0", "--bench-iters", "0", "--eval-override", "data.num_workers=0", "--num-workers", "0"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["pretrain"]) == {"greenmim", "simmim"}
    assert summary["pretrain"]["greenmim"]["steps"] == 3  # 18 train images / batch 6, one epoch
    assert summary["measured_ratio"]["train_loop"] > 0
    assert set(summary["eval"]) == {"A", "B", "C"} and all(set(v) == {"knn"} for v in summary["eval"].values())
    assert summary["majority_acc1"] > 0
    table = (out / "summary.md").read_text()
    assert "| A: greenmim |" in table and "simmim / greenmim wall time" in table
    assert png.is_file() and png.stat().st_size > 10_000


def load_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_pretraining", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_label_subset_is_balanced_seeded_and_links_only(tmp_path):
    study = load_study()
    data = tmp_path / "data"
    for cls, n in (("a", 30), ("b", 12), ("c", 18)):
        for split in ("train", "val"):
            (data / split / cls).mkdir(parents=True)
            for i in range(n):
                (data / split / cls / f"{i:03d}.JPEG").write_bytes(b"x")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    sub = study.label_subset(data, tmp_path / "sub", 0.25, seed=0)
    files = (sub / "files.txt").read_text().split()
    assert len(files) == 15 and {f.split("/")[0] for f in files} == {"a", "b", "c"}  # round(0.25 x 60 / 3) per class
    assert all(sum(f.startswith(c + "/") for f in files) == 5 for c in "abc")
    assert all((sub / "train" / f).is_symlink() and (sub / "train" / f).resolve() == (data / "train" / f).resolve() for f in files)
    assert (sub / "val").resolve() == (data / "val").resolve()
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written into the data
    assert study.label_subset(data, tmp_path / "again", 0.25, seed=0) and (tmp_path / "again" / "files.txt").read_text().split() == files
    other = study.label_subset(data, tmp_path / "other", 0.25, seed=1)
    assert (other / "files.txt").read_text().split() != files


def test_targets_and_command_line():
    study = load_study()
    ev = {"A": [30.0, 31.0, 32.0], "B": [33.0, 33.5, 34.0], "C": [26.0, 27.0, 28.0]}
    summary = {"eval": {arm: {"finetune_10pct": study.mean_std(v)} for arm, v in ev.items()},
               "pretrain": {"greenmim": {"train_loop_s": {"mean": 40.0}}, "simmim": {"train_loop_s": {"mean": 100.0}}}}
    t = study.targets(summary)
    assert t["finetune_10pct_A_vs_C"]["met"] and abs(t["finetune_10pct_A_vs_C"]["difference"] - 4.0) < 1e-9
    assert not t["finetune_10pct_A_vs_B"]["met"]  # 2 points behind, SE of the difference 0.65 -> margin 1.5
    assert abs(t["finetune_10pct_A_vs_B"]["margin"] - 1.5) < 1e-9
    assert t["pretrain_wall_A_over_B"]["met"] and abs(t["pretrain_wall_A_over_B"]["ratio"] - 0.4) < 1e-9
    args = study.parse_args(["--data", "d", "--seeds", "0,1", "--pretrain-seeds", "0", "--evals", "knn,finetune_10pct",
                             "--eval-override", "data.num_workers=0", "--json", "x.json"])
    import shlex

    again = study.parse_args(shlex.split(study.command_line(args))[2:])
    assert vars(again) == vars(args)
    assert study.eval_seeds(args, "C", "knn") == [0] and study.eval_seeds(args, "A", "finetune_10pct") == [0, 1]
