#!/usr/bin/env python
"""Wall time of one Mask R-CNN training iteration (forward + backward + AdamW step) and of one
inference pass, on generated images, for the README's figures::

    python scripts/detection_timing.py --model swin_tiny_patch4_window7_224 --short-side 800 --iters 3
    python scripts/detection_timing.py --model micro --short-side 800       # the quick config's micro Swin

Images are ``short_side x round(short_side * 4/3)`` (COCO's typical 4:3), with a few boxes and masks;
the detector resizes to ``--short-side`` (long side <= 1333) and pads to a multiple of 32 as in
training. The first iteration (allocations, mkldnn set-up) is reported separately.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def model_config(name: str):
    """``(timm name, encoder arguments)``: a timm name as is, or a greenmim model config (``micro`` =
    ``model=greenmim_swin_micro``) read from the installed configs, so no architecture is copied here."""
    if "_patch" in name or name.startswith("twins_"):
        return name, {}
    from importlib.resources import files

    from omegaconf import OmegaConf

    config = "greenmim_swin_micro" if name == "micro" else name
    cfg = OmegaConf.to_container(OmegaConf.load(files("greenmim.configs") / "model" / f"{config}.yaml"))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in (cfg.get("encoder_args") or {}).items()}
    return cfg["name"], args


def fake_batch(n: int, h: int, w: int, objects: int = 3):
    images, targets = [], []
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g))
        boxes, masks = [], torch.zeros(objects, h, w, dtype=torch.uint8)
        for k in range(objects):
            x1, y1 = int(w * (0.1 + 0.25 * k)), int(h * 0.2)
            x2, y2 = x1 + w // 5, y1 + h // 3
            boxes.append([x1, y1, x2, y2])
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(1, objects + 1), "masks": masks})
    return images, targets


def main(argv=None) -> None:
    from greenmim.tasks.detect import build_maskrcnn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="swin_tiny_patch4_window7_224", help="timm swin_*/twins_* name, or a configs/model name ('micro': greenmim_swin_micro)")
    p.add_argument("--short-side", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--classes", type=int, default=80)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name, kw = model_config(args.model)
    torch.manual_seed(0)
    model = build_maskrcnn(name, args.classes, min_size=args.short_side, max_size=args.max_size, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    h = args.short_side
    images, targets = fake_batch(args.batch, h, round(h * 4 / 3))
    model.train()
    times = []
    for i in range(args.iters + 1):
        t0 = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        print(f"train iter {i}: {times[-1]:.2f} s (loss {float(loss.detach()):.3f})", flush=True)
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        model(images)
        infer = time.perf_counter() - t0
    steady = times[1:] or times
    print(f"{args.model} @ short side {h} (image {h}x{round(h * 4 / 3)}), batch {args.batch}, {torch.get_num_threads()} threads: "
          f"train {statistics.median(steady):.2f} s/iter (median of {len(steady)}, first {times[0]:.2f} s), "
          f"inference {infer:.2f} s/batch; params {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M")


if __name__ == "__main__":
    main()
