#!/usr/bin/env bash
# Mask R-CNN transfer to COCO on one node with torchrun (Swin's Mask R-CNN recipe).
# The recipe is a configs/experiment/ file; this script only fills in paths.
#
#   scripts/detect_torchrun.sh /data/coco runs/pretrain_b_w7/checkpoints/step-XXXXXXXX.pt runs/det_1x
#   EXPERIMENT=detect_coco_3x scripts/detect_torchrun.sh /data/coco PRETRAINED runs/det_3x
#   scripts/detect_torchrun.sh /data/coco PRETRAINED runs/det_1x model=greenmim_twins_svt_large   # the pretrained model
#
# Experiments: detect_coco_1x (12 epochs), detect_coco_3x (36 epochs, multi-scale); 2 img/GPU x 8 GPUs
# = 16 with AdamW lr 1e-4 (scaled linearly on other batches). data.root holds train2017/, val2017/ and
# annotations/. The backbone is model=greenmim_swin_base_w7 unless overridden: it must be the model= the
# checkpoint was pretrained with. COCO bbox/segm AP is written to OUTPUT_DIR/coco_metrics.json.
# Running the same command again continues from the latest checkpoint in the output folder (resume=auto).
set -euo pipefail
DATA=${1:?usage: $0 COCO_ROOT PRETRAINED OUTPUT_DIR [hydra overrides...]}
PRETRAINED=${2:?usage: $0 COCO_ROOT PRETRAINED OUTPUT_DIR [hydra overrides...]}
OUT=${3:?usage: $0 COCO_ROOT PRETRAINED OUTPUT_DIR [hydra overrides...]}
shift 3
EXPERIMENT=${EXPERIMENT:-detect_coco_1x}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}

exec torchrun --standalone --nproc_per_node="$GPUS" -m greenmim.cli.detect \
    experiment="$EXPERIMENT" data.root="$DATA" pretrained="$PRETRAINED" output_dir="$OUT" resume=auto "$@"
