"""Progress lines, a log file, TensorBoard scalars and a JSON-lines metrics file (rank 0 only).

* :func:`setup_logging`: the ``greenmim`` logger prints to stdout and appends to ``<output_dir>/train.log``
  on rank 0; other ranks only print warnings, prefixed with their rank. A record logged with
  ``extra=FILE_ONLY`` (a library's long report, e.g. pycocotools' AP tables) goes to the file only.
* :class:`MetricsWriter`: ``add_scalars(step, {...})`` to TensorBoard (``<output_dir>/tb``) and to
  ``<output_dir>/metrics.jsonl`` (one JSON object per call, with ``step``), ``add_image`` for figures.
* :class:`Throughput`: images/s and ETA from wall time; :func:`peak_memory_gb`.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

LOGGER_NAME = "greenmim"
#: ``log.info(..., extra=FILE_ONLY)``: the record goes to ``train.log`` only, not to stdout
FILE_ONLY = {"file_only": True}


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def printable(text: str) -> str:
    """``text`` with the bytes of a non-UTF-8 file name (which ``os.listdir`` returns as lone surrogates,
    unencodable) written as ``\\xNN`` escapes, so any stream or file can take it."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class PrintableFormatter(logging.Formatter):
    """A formatter whose lines are always encodable (:func:`printable`): a file name with invalid
    bytes in a message must not make the handler fail."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(output_dir: Optional[Path], rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configure the ``greenmim`` logger for this process (idempotent: handlers are replaced)."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    fmt = PrintableFormatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream.addFilter(_not_file_only)
    logger.addHandler(stream)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    if rank == 0 and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / "train.log")
        fh.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(fh)
    return logger


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory on ``device``, or the process' peak resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Throughput:
    """Images per second over the last window and ETA for the remaining steps."""

    def __init__(self):
        self.t0 = self.t_window = time.perf_counter()
        self.images = 0
        self.steps = 0

    def update(self, images: int, steps: int = 1) -> None:
        self.images += images
        self.steps += steps

    def read(self, remaining_steps: int) -> Dict[str, float]:
        """``img_per_s``, ``s_per_step`` over the window since the last read, and ``eta_s``; resets the window."""
        now = time.perf_counter()
        dt = max(now - self.t_window, 1e-9)
        out = {
            "img_per_s": self.images / dt,
            "s_per_step": dt / max(self.steps, 1),
        }
        out["eta_s"] = out["s_per_step"] * remaining_steps
        self.t_window, self.images, self.steps = now, 0, 0
        return out


class MetricsWriter:
    """TensorBoard + ``metrics.jsonl`` writer; a no-op object on ranks other than 0."""

    def __init__(self, output_dir: Optional[Path], enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled and output_dir is not None
        self.tb = None
        self.jsonl = None
        if not self.enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tb"))

    def add_scalars(self, step: int, scalars: Dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for key, value in scalars.items():
            value = float(value)
            row[f"{prefix}/{key}" if prefix else key] = value
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{key}" if prefix else key, value, step)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def add_image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        """``image_chw``: ``(3, H, W)`` floats in [0, 1]."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image_chw, step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
