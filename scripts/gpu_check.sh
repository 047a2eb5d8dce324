#!/usr/bin/env bash
# The GPU check of greenmim's hot path: one call, at most 8 minutes on one NVIDIA H100/H200, on a machine
# with only torch (CUDA), timm, triton and numpy (no hydra-core, omegaconf, pycocotools, tensorboard,
# matplotlib; pytest optional: without it the CUDA tests are skipped, with the reason in the summary).
# Stages, in order of value, each with its own time limit inside one 465 s budget:
#   1. Swin-B W7 b128 bf16 eager, greenmim vs simmim;  2. a torch.profiler kernel table of 3 greenmim steps
#   (OUT/profile_swin_b_w7.txt);  3. each method's compiled step (cold inductor cache), then both side by side;
#   4. greenmim with --attention flex beside SDPA;  5. Swin-L W14, Twins-L, shared masks;  6. the CUDA tests.
# Every stage appends its figures (or why it failed) to OUT/summary.json as soon as it ends; a table ends the run.
# Details: scripts/gpu_check.py (the driver: standard library only).
#
# Usage, from a checkout (installed with `pip install -e .`, or not: the checkout goes on PYTHONPATH):
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT or ./gpu_check_out
# GPU_CHECK_SMOKE=1 runs every stage on the CPU with tiny models (a test runs it so, with those packages blocked).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s.%N)}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "${1:-${OUT:-gpu_check_out}}"
