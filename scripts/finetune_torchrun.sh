#!/usr/bin/env bash
# Fine-tune a pretrained encoder as a timm classifier on one node with torchrun (SimMIM's recipe).
# The recipe is a configs/experiment/ file; this script only fills in paths.
#
#   scripts/finetune_torchrun.sh /datasets/imagenet runs/pretrain_b_w7/checkpoints/step-XXXXXXXX.pt runs/ft_b_w7
#   EXPERIMENT=finetune_swin_large_w14 scripts/finetune_torchrun.sh /datasets/imagenet PRETRAINED runs/ft_l_w14
#   scripts/finetune_torchrun.sh /datasets/imagenet PRETRAINED runs/ft_b_w7 eval_only=true   # evaluate best.pt
#
# Experiments: finetune_swin_base_w7 (96 img/GPU x 8 GPUs = 768, layer decay 0.9, drop path 0.1),
# finetune_swin_large_w14 (48 img/GPU x accum 2 x 8 GPUs, layer decay 0.8, drop path 0.3). On fewer
# GPUs add trainer.accum_steps=N to keep the batch. PRETRAINED: a greenmim-pretrain checkpoint (.pt),
# a greenmim-export .safetensors encoder or a timm checkpoint; the experiment's model= must match it.
# Running the same command again continues from the latest checkpoint in the output folder (resume=auto).
set -euo pipefail
DATA=${1:?usage: $0 DATA_ROOT PRETRAINED OUTPUT_DIR [hydra overrides...]}
PRETRAINED=${2:?usage: $0 DATA_ROOT PRETRAINED OUTPUT_DIR [hydra overrides...]}
OUT=${3:?usage: $0 DATA_ROOT PRETRAINED OUTPUT_DIR [hydra overrides...]}
shift 3
EXPERIMENT=${EXPERIMENT:-finetune_swin_base_w7}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}

exec torchrun --standalone --nproc_per_node="$GPUS" -m greenmim.cli.finetune \
    experiment="$EXPERIMENT" data.root="$DATA" pretrained="$PRETRAINED" output_dir="$OUT" resume=auto "$@"
