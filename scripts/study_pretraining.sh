#!/usr/bin/env bash
# Does the pretraining pay off? greenmim (A) vs simmim (B) vs no pretraining (C) on hymenoptera:
# pretraining on the train images only, then k-NN, linear probe and fine-tune per arm, 3 seeds each;
# writes runs/study_pretraining/{summary.md,summary.json} and docs/study_pretraining.png.
#
#   scripts/study_pretraining.sh                                   # the README's study (CPU, one thread per run)
#   scripts/study_pretraining.sh --seeds 0 --pretrain-epochs 10    # any scripts/study_pretraining.py option
#   DATA=/my/class_folders OUT=runs/mine scripts/study_pretraining.sh --png runs/mine/study.png
#   STUDY=imagewoof scripts/study_pretraining.sh                   # the README's headline study (Imagewoof, ~3 h)
#
# Every run is niced and single-threaded (a shared machine keeps responding, and timings of the two
# methods are taken under the same conditions, interleaved seed by seed); finished runs are skipped on
# a rerun, so an interrupted study continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "${STUDY:-hymenoptera}" = imagewoof ]; then
  # one pretraining per method (seed 0), 3 evaluation seeds, the 10%-label fine-tune, probe and k-NN
  DATA=${DATA:-../shared/data/imagewoof160}
  OUT=${OUT:-runs/study_imagewoof}
  set -- --cache-size 0 --seeds 0,1,2 --pretrain-seeds 0 --evals finetune_10pct,linear_probe,knn \
    --batch-size 64 --pretrain-epochs 3 --pretrain-warmup 1 --pretrain-blr 0.01 --ft-epochs 10 --ft-warmup 1 \
    --num-workers 1 --bench-iters 0 --png docs/study_imagewoof.png --json docs/study_imagewoof.json "$@"
fi
DATA=${DATA:-../shared/data/hymenoptera}
OUT=${OUT:-runs/study_pretraining}
exec nice -n "${NICE:-10}" python scripts/study_pretraining.py --data "$DATA" --out "$OUT" --threads "$OMP_NUM_THREADS" "$@"
