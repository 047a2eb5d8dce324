"""Static plans against the free solver over many random batches (the CPU evidence of issue 16).

For one encoder, batch size and mask ratio: how many batches overflow their static shapes, how many
distinct plan shapes each planner produces, and the extra attention work of the padding, summed over
every windowed block: score and value products (``n_g * g^2 * width``) and the solver's cost model
(``n_g * (a g^2 + b g) * width``, which adds the per-slot work).

    python scripts/static_plan_stats.py --model swin_base_patch4_window7_224 --batch-size 128 --group-multiple 8
"""
import argparse
import time
from collections import Counter

import numpy as np
import torch

from greenmim.plan.masking import DEFAULT_MASK_RATIO, num_visible_units
from greenmim.models import create_encoder

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", default="swin_tiny_patch4_window7_224")
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--mask-ratio", type=float, default=DEFAULT_MASK_RATIO)
p.add_argument("--group-multiple", type=int, default=1)
p.add_argument("--batches", type=int, default=500)
p.add_argument("--shared-mask", action="store_true", help="one mask per batch, layouts planned on one sample")
p.add_argument("--seed", type=int, default=123)
args = p.parse_args()

enc = create_encoder(args.model)
width = {}  # channels of each stage's attention
for name, module in enc.named_modules():
    if name.endswith("attn.qkv"):
        stage = int(name.split(".")[1])
        width.setdefault(stage, module.in_features)
blocks = Counter((part.stage, part.key) for part in enc.window_partitions())
free = enc.planner(group_multiple=args.group_multiple, shared_mask=args.shared_mask)
static = enc.planner(group_multiple=args.group_multiple, static=True, shared_mask=args.shared_mask)
units = free.grid.num_units
visible = num_visible_units(units, args.mask_ratio)  # the rounding training uses
t0 = time.perf_counter()
static.static_shapes(1 if args.shared_mask else args.batch_size, visible)
calibration_s = time.perf_counter() - t0


def work(plan, per_group):
    return sum(
        blocks[(i, key)] * s.num_groups * per_group(s.group_size) * width[i]
        for i, stage in enumerate(plan.layouts) for key, s in stage.items()
    )


def pairs(g):
    return g * g


def shapes(plan):
    return tuple((s.num_groups, s.group_size) for stage in plan.layouts for s in stage.values())


rng = np.random.default_rng(args.seed)
rows = 1 if args.shared_mask else args.batch_size
overflow, free_work, static_work = 0, np.zeros(2), np.zeros(2)
free_shapes, static_shapes = set(), set()
for _ in range(args.batches):
    mask = torch.from_numpy(rng.random((rows, units)).argsort(1).argsort(1) >= visible).expand(args.batch_size, -1)
    pf, ps = free.plan(mask), static.plan(mask)
    overflow += ps.overflow > 0
    free_shapes.add(shapes(pf))
    static_shapes.add(shapes(ps))
    free_work += [work(pf, pairs), work(pf, free.cost_model.group_cost)]
    static_work += [work(ps, pairs), work(ps, free.cost_model.group_cost)]
print(
    f"{args.model} batch {args.batch_size} mask {args.mask_ratio} group_multiple {args.group_multiple} "
    f"{'shared' if args.shared_mask else 'per-sample'} masks, {args.batches} batches: "
    f"overflowing batches {overflow} ({100 * overflow / args.batches:.1f}%), distinct shapes static "
    f"{len(static_shapes)} / free {len(free_shapes)}, attention work static/free: pair products {static_work[0] / free_work[0]:.3f}, "
    f"cost model {static_work[1] / free_work[1]:.3f}; "
    f"calibration {calibration_s:.2f} s"
)
