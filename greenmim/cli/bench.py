"""``greenmim-bench``: greenmim against the all-token baseline, side by side in one process.

Examples::

    # full pretraining steps, Swin-T at 224, batch 8, on this machine's CPU (2 threads)
    greenmim-bench --model swin_tiny_patch4_window7_224 --batch-size 8 --threads 2 --out results/swin_t_cpu

    # the paper's setting on a GPU, bf16, with torch.compile
    greenmim-bench --model swin_base_patch4_window7_224 --batch-size 128 --dtype bf16 --device cuda --compile

    # greenmim alone with FlexAttention, and the CUDA kernels of 3 profiled steps
    greenmim-bench --model swin_base_patch4_window7_224 --batch-size 128 --dtype bf16 --method greenmim --attention flex --profile 3

    # speedup / memory against mask ratio and image size (PNG + JSON), on a tiny Swin
    greenmim-bench --sweep --embed-dim 32 --depths 1,1,2,1 --num-heads 1,2,4,8 --batch-size 4 --out results/sweep

    # grouping solver alone: Swin-B stage 1..4 at batch 128 (the defaults of --solver-only)
    greenmim-bench --solver-only

    # fit the solver's cost model (a, b) to measured group attention
    greenmim-bench --calibrate --model swin_base_patch4_window7_224 --batch-size 32

    # input pipeline: ms per image of the MAE reference, data.decode=cpu and data.decode=device
    greenmim-bench --loader /data/imagenet/train --img-size 224 --out results/loader

The table goes to stdout, progress to stderr; ``--out PATH`` writes ``PATH.json`` (and ``PATH.png``
for ``--sweep``).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import inspect
import logging
import os
import re
import sys
from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from ..bench.compare import (
    DEFAULT_SWEEP_RATIOS,
    DEFAULT_SWEEP_SIZES,
    BenchConfig,
    environment,
    run_comparison,
    run_sweep,
)
from ..bench.report import (
    calibration_table,
    comparison_table,
    output_paths,
    plot_sweep,
    solver_table,
    sweep_table,
    write_json,
)
from ..bench.step import METHODS
from ..engine.distributed import resolve_device
from ..engine.errors import UserError
from ..engine.precision import PRECISIONS
from ..models import check_architecture, get_spec
from ..models.pretrain import MIM_MODEL_KEYS
from ..plan.masking import DEFAULT_MASK_RATIO
from .common import output_file

ATTENTIONS = ("sdpa", "flex")
DEFAULT_MODEL = "swin_tiny_patch4_window7_224"
DEFAULT_BATCH = 8
SOLVER_MODEL = "swin_base_patch4_window7_224"
SOLVER_BATCH = 128


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_override(text: str) -> tuple:
    """``key=value`` with a Python literal value (``window_size=12``, ``depths=(2,2,6,2)``) or a bare string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override '{text}' is not of the form key=value")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip().replace("-", "_"), parsed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="greenmim-bench",
        description="Time full pretraining steps of greenmim (visible tokens only) and the simmim all-token "
        "baseline, interleaved in one process; report img/s, peak memory, FLOPs and grouping cost.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:" + (__doc__ or "").split("Examples::", 1)[-1],
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help=f"timm Swin/Twins name (default {DEFAULT_MODEL}; {SOLVER_MODEL} with --solver-only)")
    m.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    m.add_argument("--window-size", type=int, default=None, help="Swin window size override")
    m.add_argument("--embed-dim", type=int, default=None, help="embedding width override (tiny runs)")
    m.add_argument("--depths", type=_ints, default=None, help="blocks per stage, e.g. 1,1,2,1")
    m.add_argument("--num-heads", type=_ints, default=None, help="heads per stage, e.g. 1,2,4,8")
    m.add_argument("--override", type=parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="any other model argument (timm constructor or decoder_dim/decoder_depth/...); repeatable")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=None, help=f"batch size (default {DEFAULT_BATCH}; {SOLVER_BATCH} with --solver-only)")
    r.add_argument("--mask-ratio", type=float, default=DEFAULT_MASK_RATIO, help="fraction of mask units hidden (default: %(default)s)")
    r.add_argument("--dtype", choices=PRECISIONS, default="fp32", help="fp32, or autocast bf16/fp16 with fp32 weights (default: %(default)s)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    r.add_argument("--warmup", type=int, default=2, help="untimed steps per method (default: %(default)s)")
    r.add_argument("--iters", type=int, default=5, help="timed steps per method; random masks with --solver-only (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="weights, images and masks (default: %(default)s)")
    r.add_argument("--planning", choices=("workers", "inline"), default="workers",
                   help="plan masks ahead in loader workers, as training does, or inline in the timed step (default: %(default)s)")
    r.add_argument("--plan-workers", type=int, default=2, help="loader worker processes that plan ahead (default: %(default)s)")
    r.add_argument("--shared-mask", action="store_true", help="one mask per batch (the reference GreenMIM's) instead of per sample")
    r.add_argument("--method", choices=METHODS, default=None, help="time this method alone (no ratios; the GPU check "
                   "compiles each method in its own timed stage); default: both, interleaved")
    r.add_argument("--attention", choices=ATTENTIONS, default=None, help="the windowed attention's implementation, "
                   "create_encoder(attention=): sdpa (scaled_dot_product_attention, the default) or flex (FlexAttention)")
    r.add_argument("--compile", action="store_true", help="also time both steps compiled as trainer.compile=true does (static plans for both runs): the compiled ratio next to the eager one")
    r.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    r.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    r.add_argument("--profile", type=int, default=0, metavar="N", help="profile N more steps per method: top operators by self time")
    r.add_argument("--out", default=None, help="write PATH.json (and PATH.png with --sweep)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="speedup and memory ratio vs mask ratio and image size (PNG plot)")
    mode.add_argument("--calibrate", action="store_true", help="fit the grouping solver's CostModel a, b to measured group attention")
    mode.add_argument("--solver-only", action="store_true", help="grouping solver time and packing efficiency only (no training)")
    mode.add_argument("--loader", metavar="ROOT", default=None, help="input pipeline cost per image on the images under ROOT "
                      "(reference MAE pipeline vs data.decode=cpu/device) and the loader workers needed per step rate")
    r.add_argument("--loader-images", type=int, default=200, help="images timed by --loader (default: %(default)s)")
    sw = p.add_argument_group("sweep")
    sw.add_argument("--sweep-ratios", type=_floats, default=list(DEFAULT_SWEEP_RATIOS), help="mask ratios of --sweep, e.g. 0.5,0.75,0.9 "
                    f"(default: {','.join(map(str, DEFAULT_SWEEP_RATIOS))})")
    sw.add_argument("--sweep-sizes", type=_ints, default=list(DEFAULT_SWEEP_SIZES), help="image sizes of --sweep; a Swin window that does "
                    f"not tile a size becomes the unit grid (default: {','.join(map(str, DEFAULT_SWEEP_SIZES))})")
    return p


def model_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {}
    for key, attr in (("window_size", "window_size"), ("embed_dim", "embed_dim"), ("depths", "depths"), ("num_heads", "num_heads")):
        value = getattr(args, attr)
        if value is not None:
            overrides[key] = tuple(value) if isinstance(value, list) else value
    overrides.update(dict(args.override))
    return overrides


def model_name(args: argparse.Namespace) -> str:
    """``--model``, else the default of the mode (Swin-B for ``--solver-only``, Swin-T otherwise)."""
    return args.model or (SOLVER_MODEL if args.solver_only else DEFAULT_MODEL)


def batch_size(args: argparse.Namespace) -> int:
    """``--batch-size``, else the default of the mode."""
    return args.batch_size or (SOLVER_BATCH if args.solver_only else DEFAULT_BATCH)


def bench_device(name: Optional[str]) -> torch.device:
    """``--device`` as a device this machine has: the trainer's choice
    (:func:`~greenmim.engine.distributed.resolve_device`; default ``auto``: cuda when available,
    else cpu) plus a CUDA index this machine has; anything else ends in one error line."""
    if name is None:
        return resolve_device("auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name} is not a device: use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {name}: greenmim-bench runs on cpu or cuda: use --device cpu or --device cuda")
    try:
        resolved = resolve_device(device.type, device.index or 0)
    except UserError:  # CUDA asked for, none visible
        fail(f"--device {name}: CUDA is not available on this machine: use --device cpu")
    count = torch.cuda.device_count() if resolved.type == "cuda" else 0
    if resolved.type == "cuda" and resolved.index >= count:
        fail(f"--device {name}: this machine has {count} CUDA device(s): use cuda:0 .. cuda:{count - 1}")
    return device


def valid_model_arguments(model: str) -> List[str]:
    """What ``--override`` may set for ``model``: its encoder's constructor arguments (timm's and
    greenmim's) and the pretraining model's own keys; not ``num_classes`` (no classifier is built)
    nor timm's ``device``/``dtype`` (``--device`` and ``--dtype`` decide those)."""
    names = set(MIM_MODEL_KEYS)
    for cls in get_spec(model).visible_cls.__mro__:
        if cls is torch.nn.Module:
            break
        if "__init__" in vars(cls):
            names.update(p.name for p in inspect.signature(cls.__init__).parameters.values()
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")
    names.difference_update(("num_classes", "device", "dtype"))
    return sorted(names)


#: the flag that sets an encoder argument named in a :func:`~greenmim.models.check_architecture` message
ARCH_FLAGS = {"depths": "--depths", "num_heads": "--num-heads", "embed_dim": "--embed-dim", "window_size": "--window-size"}


def check_overrides(model: str, overrides: Dict[str, Any]) -> None:
    """Unknown keys (with a did-you-mean and the valid ones), then the architecture
    (:func:`~greenmim.models.check_architecture`: sizes >= 1, one value per stage, heads dividing
    widths), its message naming the flags (``--num-heads``, ``--override KEY``)."""
    valid = valid_model_arguments(model)
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            fail(f"--override {key}: {model} has no argument {key!r}: {hint}valid: {', '.join(valid)}")
    try:
        check_architecture(model, overrides)
    except ValueError as exc:
        fail(re.sub(r"model\.encoder_args\.(\w+)", lambda m: ARCH_FLAGS.get(m[1], f"--override {m[1]}"), str(exc)))


def attention_supported(model: str) -> bool:
    """Whether :func:`~greenmim.models.create_encoder` takes ``attention=`` (SDPA or FlexAttention)
    for ``model``: as its own argument or as one of the encoder's constructor arguments."""
    from ..models import create_encoder

    return "attention" in inspect.signature(create_encoder).parameters or "attention" in valid_model_arguments(model)


def check_out(out: str) -> None:
    """``--out PATH``: the folder of ``PATH.json`` must be creatable and writable (checked before the run)."""
    json_path, _ = output_paths(out)
    try:
        output_file(json_path, os.path.basename(json_path), (".json",), [], option="--out")
    except UserError as exc:
        fail(str(exc))


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's ``OutOfMemoryError``, the CPU allocator's
    "not enough memory" / ``DefaultCPUAllocator``)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(exc)
    return isinstance(exc, (oom, MemoryError)) or (isinstance(exc, RuntimeError) and ("not enough memory" in text or "DefaultCPUAllocator" in text))


def greenmim_encoder(cfg: BenchConfig):
    """The visible-only encoder of ``cfg`` (built through the pretraining model, so the same
    overrides, decoder keys included, are accepted everywhere)."""
    from ..models import create_pretrain_model

    return create_pretrain_model(cfg.model, method="greenmim", **cfg.model_kwargs()).encoder


def run_solver_only(cfg: BenchConfig) -> Dict[str, Any]:
    from ..bench.solver import solver_benchmark

    encoder = greenmim_encoder(cfg)
    result = solver_benchmark(encoder, cfg.batch_size, cfg.mask_ratio, cfg.iters, cfg.seed)
    result.update(model=cfg.model, model_kwargs=cfg.model_kwargs(), environment=environment(torch.device("cpu")))
    print(solver_table(result))
    return result


def run_calibration(cfg: BenchConfig) -> Dict[str, Any]:
    from ..bench.calibrate import calibrate_cost_model, first_window_attention
    from ..plan.masking import num_visible_units, unit_grid

    device = torch.device(cfg.device)
    encoder = greenmim_encoder(cfg)
    attn = first_window_attention(encoder)
    grid = unit_grid(tuple(encoder.patch_embed.img_size), encoder.unit)
    tokens_per_unit = (encoder.unit // encoder.patch_stride) ** 2
    slots = cfg.batch_size * num_visible_units(grid.num_units, cfg.mask_ratio) * tokens_per_unit
    result = calibrate_cost_model(
        attn.qkv.in_features, attn.num_heads, slots, device, cfg.dtype, getattr(encoder, "fused_attn", True),
        rel_bias=hasattr(attn, "relative_position_bias_table") or hasattr(attn, "cpb_mlp"),
    )
    result.update(model=cfg.model, environment=environment(device))
    print(calibration_table(result))
    return result


def fail(message: str) -> None:
    """One ``greenmim-bench: error:`` line on stderr, exit 2 (argparse's code for bad arguments)."""
    print(f"greenmim-bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args: argparse.Namespace) -> None:
    """Bad values end in one ``greenmim-bench: error:`` line (exit 2) naming the fix, before anything runs."""
    if args.model is not None:
        try:
            get_spec(args.model)
        except ValueError as exc:
            fail(str(exc))
    if not 0.0 < args.mask_ratio < 1.0:
        fail(f"--mask-ratio {args.mask_ratio} is outside (0, 1): use e.g. {DEFAULT_MASK_RATIO}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                             ("--plan-workers", args.plan_workers, 0), ("--threads", args.threads, 1), ("--img-size", args.img_size, 1)):
        if value is not None and value < low:
            fail(f"{flag} {value} must be >= {low}")
    bench_device(args.device)
    if args.method and (args.sweep or args.calibrate or args.solver_only or args.loader):
        fail("--method times one method of a comparison: drop it for --sweep, --calibrate, --solver-only and --loader")
    if args.attention not in (None, "sdpa") and not attention_supported(model_name(args)):
        fail(f"--attention {args.attention}: this checkout's create_encoder has no attention= argument (no FlexAttention "
             "implementation yet): use --attention sdpa")
    check_overrides(model_name(args), model_overrides(args))
    if args.out:
        check_out(args.out)


@contextlib.contextmanager
def progress_on_stderr() -> Iterator[None]:
    """While the benchmark runs, the INFO lines of the ``greenmim`` logger (the progress of
    :func:`~greenmim.engine.progress.progress` off a terminal) go to stderr, with the bench's own lines."""
    logger = logging.getLogger("greenmim")
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        with progress_on_stderr():
            return run(args)
    except ValueError as exc:  # a size, window or override the model refuses: its message names the fix
        fail(str(exc).splitlines()[0])
    except (RuntimeError, MemoryError) as exc:
        if not out_of_memory(exc):
            raise
        fail(f"out of memory at --batch-size {batch_size(args)} on {bench_device(args.device)}: use a smaller --batch-size")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = model_overrides(args)
    device = bench_device(args.device)
    json_path = png_path = None
    if args.out:
        json_path, png_path = output_paths(args.out)

    if args.loader:
        from ..bench.loader import loader_benchmark, loader_table

        result = loader_benchmark(args.loader, args.img_size or 224, args.loader_images, args.batch_size or 32, str(device))
        print(loader_table(result))
        return finish(result, json_path)
    cfg = BenchConfig(
        model=model_name(args),
        img_size=args.img_size,
        batch_size=batch_size(args),
        mask_ratio=args.mask_ratio,
        dtype=args.dtype,
        device=str(device),
        warmup=args.warmup,
        iters=args.iters,
        seed=args.seed,
        overrides=overrides,
        compile=args.compile,
        memory=not args.no_memory,
        flops=not args.no_flops,
        profile=args.profile,
        planning=args.planning,
        plan_workers=max(0, args.plan_workers),
        shared_mask=args.shared_mask,
        methods=(args.method,) if args.method else METHODS,
        # without attention= in create_encoder, SDPA is the only implementation: nothing to pass
        attention=args.attention if args.attention and attention_supported(model_name(args)) else None,
    )
    if args.solver_only:
        result = run_solver_only(cfg)
    elif args.calibrate:
        result = run_calibration(cfg)
    elif args.sweep:
        sweep = run_sweep(cfg, args.sweep_ratios, args.sweep_sizes)
        result = {"config": asdict(cfg), "sweep_args": {"ratios": args.sweep_ratios, "sizes": args.sweep_sizes},
                  "environment": environment(device), "sweep": sweep}
        print(sweep_table(sweep))
        if png_path:
            plot_sweep(sweep, png_path, f"greenmim vs simmim: {cfg.model} {overrides or ''} batch {cfg.batch_size} {cfg.dtype} {device}")
            print(f"plot: {png_path}")
        else:
            print("(pass --out PATH to save the plot and JSON)")
    else:
        result = run_comparison(cfg)
        print(comparison_table(result))
    return finish(result, json_path)


def finish(result: Dict[str, Any], json_path: Optional[str]) -> int:
    if json_path:
        write_json(result, json_path)
        print(f"json: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
