#!/usr/bin/env bash
# Does the pretraining pay off? greenmim (A) vs simmim (B) vs no pretraining (C) on hymenoptera:
# pretraining on the train images only, then k-NN, linear probe and fine-tune per arm, 3 seeds each;
# writes runs/study_pretraining/{summary.md,summary.json} and docs/study_pretraining.png.
#
#   scripts/study_pretraining.sh                                   # the README's study (CPU, one thread per run)
#   scripts/study_pretraining.sh --seeds 0 --pretrain-epochs 10    # any scripts/study_pretraining.py option
#   DATA=/my/class_folders OUT=runs/mine scripts/study_pretraining.sh --png runs/mine/study.png
#
# Every run is niced and single-threaded (a shared machine keeps responding, and timings of the two
# methods are taken under the same conditions, interleaved seed by seed); finished runs are skipped on
# a rerun, so an interrupted study continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/hymenoptera}
OUT=${OUT:-runs/study_pretraining}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec nice -n "${NICE:-10}" python scripts/study_pretraining.py --data "$DATA" --out "$OUT" --threads "$OMP_NUM_THREADS" "$@"
