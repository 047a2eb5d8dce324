"""``python -m greenmim.cli.official_swin SOURCE OUT.pth``: write a Swin encoder in the official
(Microsoft Swin-Transformer) key layout, for mmdetection and detectron2 users (the conversion:
:mod:`greenmim.weights.official_swin`).

``SOURCE``: a greenmim pretraining checkpoint, an exported encoder (``.safetensors``), a timm
checkpoint, a fine-tuning checkpoint, or a ``greenmim-detect`` checkpoint (its trunk and output
norms are exported). ``--model`` is only checked to be a Swin.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional

import torch

from ..engine.checkpoint import atomic_save
from ..engine.errors import UserError
from ..weights.loading import read_checkpoint, unwrap_state_dict
from ..weights.official_swin import timm_encoder_state, timm_to_official_swin
from .common import check_replaceable, output_file, report_errors

PROG = "python -m greenmim.cli.official_swin"


def export_official(source: str, out_path: str, model: Optional[str] = None, force: bool = False) -> Dict[str, torch.Tensor]:
    """Read ``source`` (any greenmim/timm checkpoint), convert, write ``{"model": ...}`` to ``out_path``
    (a ``.pth``/``.pt`` file that is not ``source``, replaced only with ``force``; checked before
    ``source`` is read, written atomically)."""
    out = output_file(out_path, "swin_official.pth", (".pth", ".pt"), [source], option="OUT")
    check_replaceable(out, [out], force, option="OUT")
    state = timm_encoder_state(unwrap_state_dict(read_checkpoint(source)))
    if (model and not model.startswith("swin_")) or any(k.startswith("patch_embeds.") for k in state):
        raise UserError("only Swin needs a layout conversion: timm's Twins keys are the official ones (use the encoder as is)")
    if not any(k.startswith("layers.") for k in state):
        raise UserError(f"{source} holds no Swin encoder (no 'layers.*' keys)")
    official = timm_to_official_swin(state)
    atomic_save({"model": official}, out, then="then run the command again", elsewhere="OUT")
    return official


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Write a Swin encoder in the official Swin key layout (mmdetection / detectron2).")
    parser.add_argument("source", help="greenmim pretraining / fine-tuning / detection checkpoint, exported encoder or timm checkpoint")
    parser.add_argument("out", help="output .pth ({'model': official-layout state dict})")
    parser.add_argument("--model", default=None, help="timm model name (only checked to be a Swin)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    with report_errors(PROG):
        official = export_official(args.source, args.out, args.model, force=args.force)
    print(f"wrote {len(official)} tensors in the official Swin layout to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
