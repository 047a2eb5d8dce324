"""Atomic checkpoints, retention, ``resume=auto|PATH`` resolution, and the checkpoint format.

Layout: ``<output_dir>/checkpoints/step-00001234.pt`` (rolling, the newest ``keep_last`` kept) and
``epoch-0004-step-00001234.pt`` (periodic, never pruned). Every file is written to a temporary name
in the same folder, flushed to disk and then renamed with :func:`os.replace`, so a run killed at
any moment leaves either the previous file set or the new one, never a truncated "latest".

**Format, version 3** (:data:`VERSION`; written by :meth:`greenmim.engine.Trainer.state_dict`, a
``torch.save`` dict; every key is read back by :meth:`~greenmim.engine.Trainer.load` unless noted):

==================  ==========================================================================
``format``          ``"greenmim-checkpoint"`` (:data:`FORMAT`): what :func:`load_checkpoint` accepts
``version``         the format version; older ones are upgraded on load (:func:`upgrade_checkpoint`)
``model``           the unwrapped model's ``state_dict`` (also read by fine-tune, detection,
                    ``greenmim-export`` and ``greenmim-visualize``)
``optimizer``       the optimizer's ``state_dict``
``scaler``          the fp16 ``GradScaler`` state (empty dict for bf16/fp32)
``epoch``           0-based epoch to continue in (the next one after an epoch-end checkpoint)
``step``            optimizer steps done; the lr schedule is rebuilt from it and the config
``batch_in_epoch``  micro-batches of ``epoch`` already consumed (the sampler skips them)
``skipped_steps``   steps skipped for a non-finite loss so far (``trainer.nonfinite=skip``)
``world_size``      processes of the run that wrote it; per-rank state is restored only when the
                    resuming run has as many (else RNG streams are re-seeded, with a warning)
``rank_states``     per rank: ``{"rng": torch/numpy/python/CUDA RNG states, "task": task.state_dict()}``
``task_shared``     ``task.shared_state_dict()`` (e.g. EMA weights), stored once
``config``          the resolved run config (also ``config.yaml``; read by the CLIs that rebuild
                    the model from a checkpoint)
``micro_batch``     the per-process micro-batch (``loader.batch_size``) and ``accum_steps``: a
``accum_steps``     resume with other values is refused (positions and steps count these batches)
``lr_schedule``     ``{"total_steps", "resumed_at", "progress_at_resume", "rewarm_at", "rewarm_steps"}``:
                    the lr schedule's length, where a resume with a changed length re-timed it
                    (:meth:`~greenmim.engine.schedule.LRSchedule.retimed`) and where an extension
                    re-warmed it (:meth:`~greenmim.engine.schedule.LRSchedule.rewarmed`; absent: never)
==================  ==========================================================================

**After evaluation**: the epoch's checkpoint is written once, before its evaluation; what evaluation
and ``on_epoch_end`` change (the task's per-rank state, e.g. the best accuracy, and the RNG streams)
goes to a small sidecar ``step-<step>.after-eval`` (``{"step", "rank_states", "metrics"}``) that
:meth:`~greenmim.engine.Trainer.load` applies over the checkpoint's ``rank_states``.

**Changing the format**: bump :data:`VERSION`, write the new keys in ``Trainer.state_dict``, and add
an ``_upgrade_v<N>`` function to :data:`UPGRADES` that turns a version-N dict into version N+1
(new keys with the value an old run implies, dropped keys popped). :func:`load_checkpoint` applies
the chain, so every reader sees the current version and old checkpoints keep loading.

Version 2 lacked ``micro_batch``, ``accum_steps`` and ``lr_schedule`` (taken from the config when it
has them). Version 1 (before this table) also wrote ``schedule`` (``{step, total_steps, peak_lr}``, never
read: the schedule is a function of ``step`` and the config) and its first releases lacked
``batch_in_epoch``, ``skipped_steps``, ``world_size`` and ``task_shared``.
"""
from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .config import stored_config
from .errors import UserError, one_line
from .files import atomic_write, temporary_name

log = logging.getLogger(__name__)

FORMAT = "greenmim-checkpoint"
VERSION = 3
CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step-(\d+)\.pt$")
AFTER_EVAL_SUFFIX = ".after-eval"
_AFTER_EVAL_RE = re.compile(r"^step-(\d+)" + re.escape(AFTER_EVAL_SUFFIX) + "$")
#: what a file of another greenmim format is, and what to do with it instead of resuming it
FOREIGN_FORMATS = {
    "greenmim-classifier": "a fine-tuned classifier (like checkpoints/best.pt), not a training checkpoint: evaluate it with "
                           "greenmim-finetune eval_only=true checkpoint=PATH, fine-tune from it with pretrained=PATH, or "
                           "resume from the run's checkpoints/step-*.pt",
}


def atomic_save(obj: Any, path: os.PathLike, **write_error_args: str) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`~greenmim.engine.files.atomic_write`: a temporary
    file, fsync, the umask's mode, :func:`os.replace`).

    On failure an existing ``path`` is left as it was; a full disk or a read-only folder raises
    :class:`UserError` ("no space left on <folder>" / "cannot write"; ``write_error_args``: the
    ``then``/``elsewhere`` of :func:`write_error`, for callers other than training).
    """
    path = Path(path)
    try:
        atomic_write({path: lambda f: torch.save(obj, f)})
    except OSError as exc:
        raise write_error(exc, path, **write_error_args) from exc
    except RuntimeError as exc:  # torch.save wraps the OSError of a failed write in a RuntimeError
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            raise write_error(cause, path, **write_error_args) from exc
        raise
    return path


def write_error(exc: OSError, path: os.PathLike, then: str = "then continue with resume=auto",
                elsewhere: str = "output_dir=") -> UserError:
    """The one-line error for a failed write of ``path`` (the file that was being replaced is intact).
    ``then``: how to carry on once there is space; ``elsewhere``: the option that picks another place."""
    folder = Path(path).parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on {folder} while writing {Path(path).name}; the previous files are kept: "
                         f"free some space, {then}")
    return UserError(f"cannot write {path} ({exc.strerror or exc}): check the permissions of {folder} or choose another {elsewhere}")


def load_checkpoint(path: os.PathLike, map_location: Any = "cpu", contents: Any = None) -> Dict[str, Any]:
    """Load a checkpoint written by the trainer; raises :class:`UserError` naming the problem.
    ``contents``: the file's contents if already read (only checked and upgraded then)."""
    path = Path(path)
    ckpt = contents
    if ckpt is None:
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path} (pass the path of an existing checkpoints/step-*.pt file)")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:  # truncated or foreign file
            raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        foreign = FOREIGN_FORMATS.get(ckpt.get("format")) if isinstance(ckpt, dict) else None
        if foreign:
            raise UserError(f"{path} is {foreign}")
        raise UserError(f"{path} is not a greenmim training checkpoint (no '{FORMAT}' marker)")
    return upgrade_checkpoint(ckpt, path)


def _upgrade_v1(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """Version 1 -> 2: drop ``schedule`` (never read); fill the keys early version-1 files lacked
    with the values their runs implied (a single process, no skipped steps, epoch-aligned)."""
    ckpt.pop("schedule", None)
    ckpt.setdefault("scaler", {})
    ckpt.setdefault("batch_in_epoch", 0)
    ckpt.setdefault("skipped_steps", 0)
    ckpt.setdefault("task_shared", {})
    ckpt.setdefault("rank_states", [])
    ckpt.setdefault("world_size", len(ckpt["rank_states"]) or 1)
    ckpt.setdefault("config", {})
    return ckpt


def _upgrade_v2(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """Version 2 -> 3: the batch sizes from the stored config when it has them (else None: unchecked),
    no schedule record (the resuming run's schedule is taken as the checkpoint's)."""
    ckpt.setdefault("micro_batch", stored_config(ckpt, "data").get("batch_size"))
    ckpt.setdefault("accum_steps", stored_config(ckpt, "trainer").get("accum_steps"))
    ckpt.setdefault("lr_schedule", None)
    return ckpt


#: ``version -> function`` turning a checkpoint of that version into the next version.
UPGRADES = {1: _upgrade_v1, 2: _upgrade_v2}


def upgrade_checkpoint(ckpt: Dict[str, Any], path: Any = "checkpoint") -> Dict[str, Any]:
    """Bring a loaded checkpoint dict to :data:`VERSION` (in place; a missing ``version`` is 1).
    A checkpoint from a newer greenmim raises :class:`UserError`."""
    version = int(ckpt.get("version", 1))
    if version > VERSION:
        raise UserError(f"{path} has checkpoint format version {version}; this greenmim reads up to {VERSION}: "
                        "upgrade greenmim to resume or load it")
    while version < VERSION:
        ckpt = UPGRADES[version](ckpt)
        version += 1
        ckpt["version"] = version
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


def scan_latest(output_dir: os.PathLike) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """``(newest readable checkpoint or None, [(newer unreadable checkpoint, why), ...])``.

    Raises :class:`UserError` listing them when checkpoints exist but none can be read: a resume
    must never silently restart from scratch over them.
    """
    skipped: List[Tuple[Path, str]] = []
    for path in list_checkpoints(output_dir):
        try:
            load_checkpoint(path)
            return path, skipped
        except UserError as exc:
            skipped.append((path, one_line(exc)))
    if skipped:
        names = ", ".join(p.name for p, _ in skipped[:4]) + (" ..." if len(skipped) > 4 else "")
        raise UserError(
            f"none of the {len(skipped)} checkpoint(s) in {Path(output_dir) / CHECKPOINT_DIR} can be read ({names}; "
            f"{skipped[0][1]}); nothing was deleted: restore a good copy there, or start over with a fresh output_dir="
        )
    return None, skipped


def find_latest(output_dir: os.PathLike) -> Optional[Path]:
    """The newest checkpoint in ``output_dir`` that loads (None when there is none); newer unreadable
    ones are skipped with a warning, and all of them unreadable is an error (see :func:`scan_latest`)."""
    latest, skipped = scan_latest(output_dir)
    for path, why in skipped:
        log.warning("skipping unreadable checkpoint %s: %s", path, why)
    return latest


def is_no_resume(resume: Any) -> bool:
    return resume in (None, "", False, "false", "False", "none", "null")


def resolve_resume(resume: Optional[str], output_dir: os.PathLike) -> Optional[Path]:
    """``None``/``""``/``false`` -> no resume; ``auto`` -> the latest valid checkpoint in ``output_dir``
    (``None`` when there is none: a fresh start); anything else -> that file, which must exist."""
    if is_no_resume(resume):
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


def set_aside(unreadable: List[Tuple[Path, str]]) -> List[Path]:
    """Move unreadable checkpoints (``(path, why)`` pairs) to ``checkpoints/unreadable/``: never delete
    what could not be read, and keep rotation and later ``resume=auto`` clear of them. Returns the new paths."""
    moved = []
    for path, why in unreadable:
        target = _free_name(path.parent / "unreadable" / path.name)
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        log.warning("skipped unreadable checkpoint %s (%s); moved it to %s", path.name, why, target)
        moved.append(target)
    return moved


def _free_name(path: Path) -> Path:
    """``path``, or ``<stem>.<n><suffix>`` with the first ``n`` not taken (an earlier file is never replaced)."""
    n = 1
    target = path
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}.{n}{path.suffix}")
    return target


def after_eval_path(checkpoint: os.PathLike) -> Path:
    """The sidecar holding the post-evaluation state of the checkpoint of that step (see the format notes)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / after_eval_name(checkpoint_step(checkpoint))


def after_eval_name(step: int) -> str:
    """The file name of step ``step``'s post-evaluation sidecar."""
    return f"step-{step:08d}{AFTER_EVAL_SUFFIX}"


def load_after_eval(checkpoint: os.PathLike) -> Optional[Dict[str, Any]]:
    """The sidecar of ``checkpoint`` when there is a readable one for its step, else None (a run killed
    during the evaluation resumes from the checkpoint as it is)."""
    path = after_eval_path(checkpoint)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated sidecar: the checkpoint alone is still a valid position
        log.warning("ignoring unreadable %s (%s): resuming with the state saved before that evaluation", path, one_line(exc))
        return None
    return state if isinstance(state, dict) and state.get("step") == checkpoint_step(checkpoint) else None


def check_output_dir(output_dir: os.PathLike) -> None:
    """Create ``output_dir`` and write a probe file in it; raises :class:`UserError` when it cannot."""
    folder = Path(output_dir)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on {folder}: free some space or choose another output_dir=") from None
        raise UserError(f"output_dir={folder} cannot be created or written ({exc.strerror or exc}): choose another output_dir=") from None


def check_one_run(output_dir: os.PathLike, resume: Optional[str], resume_path: Optional[Path], ignore: Sequence[Path] = ()) -> None:
    """Refuse to mix two runs in one folder: a fresh run into a folder holding checkpoints, or a
    resume from a checkpoint older than the folder's newest (rotation would then delete the new files).
    ``ignore``: checkpoints about to be set aside as unreadable."""
    existing = [p for p in list_checkpoints(output_dir) if p not in set(ignore)]
    if not existing:
        return
    newest = existing[0]
    if is_no_resume(resume):
        raise UserError(
            f"output_dir={output_dir} already holds checkpoints of another run (newest {newest.name}): "
            "continue it with resume=auto, or choose a fresh output_dir="
        )
    if resume_path is not None and checkpoint_step(resume_path) < checkpoint_step(newest):
        raise UserError(
            f"resume={resume} is older than {newest.name} in output_dir={output_dir}: continuing there would mix the "
            "two histories; use resume=auto to continue from the newest, or a fresh output_dir= to branch"
        )


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
            tmp = temporary_name(periodic)
            try:
                os.link(path, tmp)
                os.replace(tmp, periodic)
            except OSError:
                atomic_save(state, periodic)
        self.prune()
        return path

    def save_after_eval(self, state: Dict[str, Any], step: int) -> Path:
        """Write the post-evaluation sidecar of step ``step`` (``state`` holds ``step``, ``rank_states``, ``metrics``)."""
        return atomic_save(state, self.folder / after_eval_name(step))

    def prune(self) -> None:
        """Delete the rolling checkpoints beyond the newest ``keep_last``, and sidecars of steps no
        checkpoint holds any more."""
        rolling = sorted(self.folder.glob("step-*.pt"), key=checkpoint_step, reverse=True)
        for old in rolling[self.keep_last :]:
            old.unlink(missing_ok=True)
        kept = {checkpoint_step(p) for p in self.folder.glob("*.pt")}
        for sidecar in self.folder.glob(f"step-*{AFTER_EVAL_SUFFIX}"):
            m = _AFTER_EVAL_RE.match(sidecar.name)  # a file of another name is not ours to delete
            if m and int(m.group(1)) not in kept:
                sidecar.unlink(missing_ok=True)
