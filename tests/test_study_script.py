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
