"""``greenmim-export``: write a pretrained encoder alone, in timm's layout, as safetensors.

    greenmim-export outputs/pretrain/run/checkpoints/step-00001000.pt -o swin_b_greenmim.safetensors
    greenmim-export /official/output_dir/checkpoint-799.pth -o swin_b_official.safetensors

The source is a ``greenmim-pretrain`` checkpoint, or an **official GreenMIM** one (the reference code's
``main_pretrain.py``: ``model`` holds ``encoder.*`` in the official Swin layout and ``decoder_*``),
whose architecture is read off its weights
(:func:`~greenmim.weights.architecture.read_architecture`) and whose encoder is converted by timm's
own ``checkpoint_filter_fn`` (patch merging renumbered, ``relative_position_index`` dropped): the
same conversion ``pretrained=`` applies (:mod:`greenmim.weights.export`; this file writes the files). (The reference pretrains with LayerNorm eps 1e-6, timm and
the reference fine-tuning use 1e-5: the description names timm's constructor, so 1e-5.)

The file loads into timm without conversion (only the classifier head is missing)::

    timm.create_model("swin_base_patch4_window7_224", pretrained=True, num_classes=10,
                      pretrained_cfg_overlay=dict(file="swin_b_greenmim.safetensors"))

(``num_classes`` must differ from the pretrained config's 1000 so timm skips the absent head; with
``num_classes=1000`` use ``load_state_dict(..., strict=False)``.) The file's metadata and a sidecar
``<output>.json`` (``swin_b_greenmim.safetensors.json``) record the timm name and the constructor
arguments (``window_size``, ``embed_dim``, ...) the encoder was built with; pass the same ones to
``timm.create_model``.

The sidecar keeps the full output name so that it cannot be a neighbour's file (``-o instances_val.safetensors``
once replaced a COCO ``instances_val.json``). The two files are written as a unit (temporary files,
then renames) and an existing output or sidecar is never replaced, except with ``--force`` and only
when it is a previous greenmim export.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..engine.checkpoint import write_error
from ..engine.files import atomic_write, write_bytes
from ..weights.architecture import export_metadata
from ..weights.export import check_against_timm, timm_encoder
from .common import check_replaceable, output_file, report_errors

PROG = "greenmim-export"
#: keys of every export description (the safetensors metadata ``greenmim`` and the sidecar)
INFO_KEYS = ("timm_name", "model_args", "step", "checkpoint")


def sidecar_path(output: Path) -> Path:
    """The description written next to ``output``: its full name plus ``.json`` (``x.safetensors.json``)."""
    return output.with_name(output.name + ".json")


def is_greenmim_export(path: Path) -> bool:
    """Whether ``path`` is a file this command wrote: a safetensors file whose metadata, or a JSON
    sidecar whose object, holds the export description (:data:`INFO_KEYS`)."""
    try:
        if path.suffix == ".json":
            info = json.loads(path.read_text(encoding="utf-8"))
        else:
            with safe_open(str(path), framework="pt") as f:
                info = export_metadata(f)
    except (OSError, ValueError, SafetensorError):
        return False
    return isinstance(info, dict) and all(k in info for k in INFO_KEYS)


def export_encoder(checkpoint: str, output: Optional[str] = None, verify: bool = True, force: bool = False) -> Tuple[Path, Dict[str, Any]]:
    """Write ``checkpoint``'s encoder to ``output`` (default: next to the checkpoint, ``<name>-encoder.safetensors``).

    Returns the path and a description ``{"timm_name", "model_args", "step", "method", "checkpoint"}``
    (also written to :func:`sidecar_path` and into the safetensors metadata). The output is checked
    before the checkpoint is read: existing files are replaced only with ``force`` and only when
    they are a previous export (:func:`is_greenmim_export`).
    """
    default_name = f"{Path(checkpoint).stem}-encoder.safetensors"
    out = output_file(output or str(Path(checkpoint).with_name(default_name)), default_name, (".safetensors",), [checkpoint])
    check_replaceable(out, [out, sidecar_path(out)], force, ours=is_greenmim_export)
    name, args, state, info = timm_encoder(checkpoint)
    if verify:
        check_against_timm(name, args, state)
    info = {"timm_name": name, "model_args": args, **info, "checkpoint": str(checkpoint)}
    weights = safetensors_bytes(state, metadata={"format": "pt", "greenmim": json.dumps(info)})
    try:
        atomic_write({out: write_bytes(weights), sidecar_path(out): write_bytes((json.dumps(info, indent=2) + "\n").encode())})
    except OSError as exc:
        raise write_error(exc, out, then="then run the command again", elsewhere="-o") from exc
    return out, info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description="Export a pretrained encoder in timm's layout (safetensors).")
    parser.add_argument("checkpoint", help="a checkpoint written by greenmim-pretrain (checkpoints/step-*.pt) or by the "
                        "official GreenMIM code (checkpoint-*.pth)")
    parser.add_argument("-o", "--output", help="output .safetensors file (default: next to the checkpoint)")
    parser.add_argument("--no-verify", action="store_true", help="skip the key/shape check against timm's model")
    parser.add_argument("--force", action="store_true", help="replace the output and its .json sidecar if they are a previous greenmim export")
    args = parser.parse_args(argv)
    with report_errors(PROG):
        out, info = export_encoder(args.checkpoint, args.output, verify=not args.no_verify, force=args.force)
        margs = "".join(f", {k}={v!r}" for k, v in info["model_args"].items())
        when = f"step {info['step']}" if info.get("step") is not None else f"epoch {info.get('epoch')}"
        print(f"wrote {out} ({info['timm_name']}, {when})")
        print(f"load with: timm.create_model({info['timm_name']!r}, pretrained=True, num_classes=NUM_CLASSES{margs}, "
              f"pretrained_cfg_overlay=dict(file={str(out)!r}))")


if __name__ == "__main__":
    main()
