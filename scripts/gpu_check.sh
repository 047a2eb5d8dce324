#!/usr/bin/env bash
# The GPU check of greenmim's hot path, on one NVIDIA H100/H200 in under 8 minutes:
#   1. the CUDA tests: a pretraining step (Swin, Twins, per-sample and shared masks) under
#      torch.cuda.set_sync_debug_mode("error"), fp32 bias gradients, timm equality at mask 0 and the
#      masked-dense reference at 0.75 in fp32 (TF32 off), CUDA = CPU;
#   2. greenmim-bench, bf16, 224 px, mask 0.75, batch 128, timing the trainer's own step: Swin-B W7
#      (per-sample and shared masks, eager; then eager and compiled, trainer.compile's
#      torch.compile with CUDA graphs, both methods), Swin-L W14, Twins-L (SVT-L);
#   3. one short table last (the README's GPU table), compiled rows marked "(compiled)".
# Each step has its own timeout; they add up to under 8 minutes.
#
# Usage, from a checkout (installed with `pip install -e .`, or not: the checkout goes on PYTHONPATH):
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT or ./gpu_check_out
# Needs torch with CUDA, timm, pytest; not hydra-core or pycocotools.
# GPU_CHECK_SMOKE=1 runs the same steps on the CPU with tiny models in seconds (a test runs it so).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
workers=${GPU_CHECK_PLAN_WORKERS:-6}

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  run=(--device cpu --dtype fp32 --batch-size 2 --img-size 64 --warmup 0 --iters 1 --depths 1,1,1,1
       --num-heads 1,1,1,1 --override decoder_dim=32 --override decoder_heads=2)
  swin=(--embed-dim 16)
  twins=(--override "embed_dims=(16,16,16,16)")
  tests=(-k meta)
  workers=1
  compile_limit=900  # a cold inductor compile on a CPU takes minutes
else
  $py - <<'EOF' || exit 2
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (GPU_CHECK_SMOKE=1 runs it on the CPU)"
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
EOF
  run=(--device cuda --dtype bf16 --batch-size 128 --img-size 224 --warmup 3 --iters 10)
  swin=()
  twins=()
  tests=()
  compile_limit=190
fi

echo "== 1. CUDA tests"
timeout 90 $py -m pytest -q -p no:cacheprovider tests/test_hot_path.py "${tests[@]}" 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== 2. greenmim-bench (bf16, 224 px, mask 0.75, batch 128)"
bench() {  # name, timeout, extra arguments
  local name=$1 limit=$2
  shift 2
  timeout "$limit" $py -m greenmim.cli.bench "${run[@]}" --no-flops --plan-workers "$workers" --out "$out/$name" "$@" 2>&1 \
    | tail -n 12 | tee "$out/$name.log"
}
bench swin_b_w7 50 --model swin_base_patch4_window7_224 "${swin[@]}"
bench swin_b_w7_shared 40 --model swin_base_patch4_window7_224 --shared-mask "${swin[@]}"
bench swin_b_w7_compile "$compile_limit" --model swin_base_patch4_window7_224 --compile --no-memory --iters 6 "${swin[@]}"
bench swin_l_w14 60 --model swin_large_patch4_window7_224 --window-size 14 "${swin[@]}"
bench twins_l 40 --model twins_svt_large "${twins[@]}"

echo "== 3. summary"
$py - "$out" "$tests_rc" <<'EOF'
import json, sys
from pathlib import Path

out, tests_rc = Path(sys.argv[1]), int(sys.argv[2])
runs = ["swin_b_w7", "swin_b_w7_shared", "swin_b_w7_compile", "swin_l_w14", "twins_l"]
print(f"CUDA tests: {'passed' if tests_rc == 0 else f'FAILED (exit {tests_rc})'}")
head = f"{'run':18s} {'greenmim ms':>11s} {'simmim ms':>9s} {'speedup':>7s} {'mem':>5s} {'host ms g/s':>12s} {'gpu ms g/s':>12s} {'plan ms':>7s} {'on path':>7s}"
print(head)
print("-" * len(head))
for name in runs:
    path = out / f"{name}.json"
    if not path.is_file():
        print(f"{name:18s} did not finish (see {name}.log)")
        continue
    r = json.loads(path.read_text())
    g, s, q = r["methods"]["greenmim"], r["methods"]["simmim"], r["ratios"]
    gpu = f"{g.get('gpu_ms', 0):.0f}/{s.get('gpu_ms', 0):.0f}"
    print(f"{name:18s} {g['step_ms']:11.1f} {s['step_ms']:9.1f} {q['speedup']:6.2f}x {q.get('peak_memory_ratio', float('nan')):5.2f} "
          f"{g['host_ms']:5.0f}/{s['host_ms']:<6.0f} {gpu:>12s} {g.get('grouping_ms', 0):7.1f} "
          f"{'yes' if g.get('grouping_on_critical_path') else 'no':>7s}")
    c = r.get("compile")
    if c is None:
        continue
    if "speedup" not in c:
        errors = "; ".join(f"{m}: {c[m]['error']}" for m in ("greenmim", "simmim") if "error" in c.get(m, {}))
        print(f"{'  (compiled)':18s} FAILED: {errors}")
        continue
    cg, cs = c["greenmim"], c["simmim"]
    cgpu = f"{cg.get('gpu_ms', 0):.0f}/{cs.get('gpu_ms', 0):.0f}"
    print(f"{'  (compiled)':18s} {cg['step_ms']:11.1f} {cs['step_ms']:9.1f} {c['speedup']:6.2f}x {'':>5s} "
          f"{cg['host_ms']:5.0f}/{cs['host_ms']:<6.0f} {cgpu:>12s}   mode {cg['mode']}, compile {cg['compile_s']:.0f}/{cs['compile_s']:.0f} s, "
          f"graph breaks {cg['graph_breaks']}/{cs['graph_breaks']}, graphs after warm-up {c['graphs_after_warmup']}")
print(f"device: {r['environment'].get('device_name', '?')}, torch {r['environment']['torch']}, {r['environment']['date_utc']}")
EOF
