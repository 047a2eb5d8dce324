"""``scripts/gpu_check.sh`` on a bare machine: ``GPU_CHECK_SMOKE=1`` runs every stage on the CPU with
tiny models while hydra-core, omegaconf, pycocotools, tensorboard, matplotlib and pytest cannot be
imported (a meta-path blocker on ``PYTHONPATH``, in the script and every stage it starts), and
every stage leaves its entry in ``summary.json``. The compile stages get a 1 s limit (a cold inductor
compile on a CPU takes minutes; tests/test_compiled_step.py runs that path): they must be recorded
as timeouts, with the stages after them still run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("hydra", "omegaconf", "pycocotools", "tensorboard", "matplotlib", "pytest")
BLOCKER = f'''
import sys

class _Bare:
    """A GPU machine's Python: these packages are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the gpu_check test)", name=name)
        return None

sys.meta_path.insert(0, _Bare())
'''


def test_smoke_run_on_a_bare_machine_fills_the_summary(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable, "GPU_CHECK_SMOKE": "1",
           "GPU_CHECK_COMPILE_S": "1", "OMP_NUM_THREADS": "1"}
    blocked = subprocess.run([sys.executable, "-c", "import omegaconf"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked by the gpu_check test" in blocked.stderr  # the blocker works
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    entries = {e["stage"]: e for e in summary["stages"]}
    assert list(entries) == ["swin_b_w7", "profile_swin_b_w7", "compile_greenmim", "compile_simmim", "swin_b_w7_compiled",
                             "flex_swin_b_w7", "swin_l_w14", "twins_l", "swin_b_w7_shared", "cuda_tests", "end"]
    for name in ("swin_b_w7", "swin_l_w14", "twins_l", "swin_b_w7_shared"):
        e = entries[name]
        assert e["status"] == "ok", e
        assert e["greenmim_ms"] > 0 and e["simmim_ms"] > 0 and e["speedup"] > 0 and 0 < e["mem_ratio"]
        assert set(e["host_ms"]) == {"greenmim", "simmim"}
    assert entries["profile_swin_b_w7"]["status"] == "ok" and entries["profile_swin_b_w7"]["greenmim_ms"] > 0
    assert "profile greenmim" in (out / "profile_swin_b_w7.txt").read_text()
    for name in ("compile_greenmim", "compile_simmim"):
        assert entries[name]["status"] == "timeout" and "stopped at its 1 s limit" in entries[name]["reason"]
    assert entries["swin_b_w7_compiled"]["status"] == "failed"
    flex = entries["flex_swin_b_w7"]
    assert flex["status"] == "ok" or "--attention flex" in flex["reason"], flex
    assert entries["cuda_tests"]["status"] == "skipped" and "pytest is not installed" in entries["cuda_tests"]["reason"]
    logs = "".join(p.read_text() for p in out.glob("*.log"))
    assert "ModuleNotFoundError" not in logs and "USDT" not in logs and "gpuGetDeviceCount" not in logs
    assert "swin_b_w7" in proc.stdout and "speedup" in proc.stdout  # the closing table
