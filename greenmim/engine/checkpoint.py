"""Atomic checkpoints, retention and ``resume=auto|PATH`` resolution.

Layout: ``<output_dir>/checkpoints/step-00001234.pt`` (rolling, the newest ``keep_last`` kept) and
``epoch-0004-step-00001234.pt`` (periodic, never pruned). Every file is written to a temporary name
in the same folder, flushed to disk and then renamed with :func:`os.replace`, so a run killed at
any moment leaves either the previous file set or the new one, never a truncated "latest".

A checkpoint is a dict (see :meth:`greenmim.engine.Trainer.state_dict`)::

    {"format": "greenmim-checkpoint", "version": 1, "model": ..., "optimizer": ..., "scaler": ...,
     "schedule": ..., "epoch": int, "step": int, "batch_in_epoch": int,
     "rank_states": [{"rng": ..., "task": ...}, ...], "config": dict, "metrics": dict}
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .errors import UserError

log = logging.getLogger(__name__)

FORMAT = "greenmim-checkpoint"
CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step-(\d+)\.pt$")


def atomic_save(obj: Any, path: os.PathLike) -> Path:
    """``torch.save`` to ``path`` via a temporary file and :func:`os.replace` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: os.PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by the trainer; raises :class:`UserError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (pass resume=auto to continue from output_dir, or an existing .pt file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a greenmim training checkpoint (no '{FORMAT}' marker)")
    return ckpt


def checkpoint_step(path: os.PathLike) -> int:
    """The optimizer step encoded in a checkpoint's file name (-1 if none)."""
    m = _STEP_RE.search(Path(path).name)
    return int(m.group(1)) if m else -1


def list_checkpoints(output_dir: os.PathLike) -> List[Path]:
    """Checkpoints in ``output_dir/checkpoints``, newest step first (rolling before periodic on ties)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.pt") if checkpoint_step(p) >= 0]
    return sorted(files, key=lambda p: (checkpoint_step(p), p.name.startswith("step-")), reverse=True)


def find_latest(output_dir: os.PathLike) -> Optional[Path]:
    """The newest checkpoint in ``output_dir`` that loads; unreadable ones are skipped with a warning."""
    for path in list_checkpoints(output_dir):
        try:
            load_checkpoint(path)
            return path
        except UserError as exc:
            log.warning("skipping unreadable checkpoint: %s", exc)
    return None


def resolve_resume(resume: Optional[str], output_dir: os.PathLike) -> Optional[Path]:
    """``None``/``""``/``false`` -> no resume; ``auto`` -> the latest valid checkpoint in ``output_dir``
    (``None`` when there is none: a fresh start); anything else -> that file, which must exist."""
    if resume in (None, "", False, "false", "False", "none", "null"):
        return None
    if str(resume) == "auto":
        return find_latest(output_dir)
    path = Path(str(resume)).expanduser()
    if path.is_dir():  # an output folder
        latest = find_latest(path)
        if latest is None:
            raise UserError(f"resume={resume}: no checkpoint in {path / CHECKPOINT_DIR}")
        return latest
    if not path.is_file():
        raise UserError(f"resume={resume}: no such file (use resume=auto to continue from output_dir)")
    return path


class CheckpointManager:
    """Writes checkpoints into ``output_dir/checkpoints`` and prunes old rolling ones.

    Args:
        output_dir: the run's folder.
        keep_last: rolling ``step-*.pt`` files to keep (>= 1).
        keep_every_epochs: also keep a permanent ``epoch-*.pt`` copy at the end of every
            ``keep_every_epochs``-th epoch (0: never).
    """

    def __init__(self, output_dir: os.PathLike, keep_last: int = 2, keep_every_epochs: int = 0):
        self.folder = Path(output_dir) / CHECKPOINT_DIR
        self.keep_last = max(1, int(keep_last))
        self.keep_every_epochs = int(keep_every_epochs)

    def save(self, state: Dict[str, Any], step: int, epoch_completed: Optional[int] = None) -> Path:
        """Write ``state`` as ``step-<step>.pt``; at a periodic epoch end also ``epoch-<e>-step-<step>.pt``
        (a hard link when the file system allows). ``epoch_completed`` is 1-based. Returns the rolling path."""
        path = atomic_save(state, self.folder / f"step-{step:08d}.pt")
        if epoch_completed and self.keep_every_epochs > 0 and epoch_completed % self.keep_every_epochs == 0:
            periodic = self.folder / f"epoch-{epoch_completed:04d}-step-{step:08d}.pt"
            tmp = periodic.with_name(f".{periodic.name}.tmp{os.getpid()}")
            try:
                os.link(path, tmp)
                os.replace(tmp, periodic)
            except OSError:
                atomic_save(state, periodic)
        self.prune()
        return path

    def prune(self) -> None:
        rolling = sorted(self.folder.glob("step-*.pt"), key=checkpoint_step, reverse=True)
        for old in rolling[self.keep_last :]:
            old.unlink(missing_ok=True)
