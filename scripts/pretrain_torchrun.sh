#!/usr/bin/env bash
# GreenMIM pretraining on one node with torchrun (DDP, one process per GPU).
# The recipe is a configs/experiment/ file; this script only fills in paths and the batch arithmetic.
#
#   scripts/pretrain_torchrun.sh /datasets/imagenet runs/pretrain_b_w7                  # Swin-B W7, 800 epochs
#   EXPERIMENT=swin_large_w14_800ep ACCUM=4 scripts/pretrain_torchrun.sh /datasets/imagenet runs/pretrain_l_w14
#   scripts/pretrain_torchrun.sh /datasets/imagenet runs/b7 trainer.epochs=100         # extra Hydra overrides
#
# Experiments: swin_base_w7_800ep, swin_base_w14_800ep (128 img/GPU), swin_large_w14_800ep,
# twins_large_100ep (64 img/GPU). The published batch is 2048 = img/GPU x GPUS x ACCUM: 8 GPUs need
# ACCUM=2 at 128 img/GPU, ACCUM=4 at 64 (lr = optim.blr x effective batch / 256 either way).
# Running the same command again continues from the latest checkpoint in the output folder (resume=auto).
set -euo pipefail
DATA=${1:?usage: $0 DATA_ROOT OUTPUT_DIR [hydra overrides...]}
OUT=${2:?usage: $0 DATA_ROOT OUTPUT_DIR [hydra overrides...]}
shift 2
EXPERIMENT=${EXPERIMENT:-swin_base_w7_800ep}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
ACCUM=${ACCUM:-2}

exec torchrun --standalone --nproc_per_node="$GPUS" -m greenmim.cli.pretrain \
    experiment="$EXPERIMENT" data.root="$DATA" output_dir="$OUT" trainer.accum_steps="$ACCUM" resume=auto "$@"
