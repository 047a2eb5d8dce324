"""Two processes on CPU under torchrun (gloo): one output folder, rank-0 writing, per-rank masks, effective batch."""
import json
import os
import subprocess
import sys


from conftest import TINY_PRETRAIN_ARGS as TINY
from greenmim.engine import load_checkpoint


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "greenmim.cli.pretrain", *TINY, "trainer=cpu", "data=synthetic", "data.num_samples=32",
           "data.num_workers=0", "trainer.epochs=1", "output_dir=outputs/pretrain/${now:%H-%M-%S-%f}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "pretrain").iterdir())
    assert len(runs) == 1, runs  # rank 0's time-stamped folder is used by both ranks
    out = runs[0]
    # 32 images / 2 ranks / batch 4 = 4 steps; effective batch 8
    assert "micro-batch 4 x accum 1 x world 2 = 8" in proc.stdout
    assert proc.stdout.count("epoch 1/1 step 4/4") == 1  # progress lines from rank 0 only
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    ckpt = load_checkpoint(out / "checkpoints" / "step-00000004.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rank_states"]) == 2
    assert (out / "reconstructions" / "epoch_0001.png").is_file()
