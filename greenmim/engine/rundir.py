"""A run folder belongs to one run at a time: an exclusive lock, and the folders a run never writes into.

* :func:`run_folder` (a context manager): ``output_dir`` created and probed for writing, then held
  under an exclusive POSIX lock (``fcntl.lockf``) on ``output_dir/.lock`` until the block ends. The
  lock file holds ``<pid> <host>`` of its holder, for the message a second process gets; the lock
  itself is the kernel's, so it is released when the holder exits or is killed (``kill -9``
  included): a stale ``.lock`` file from a crash never blocks a later run (its pid is not trusted,
  only the lock). A POSIX lock belongs to the process, not to the descriptor: forked DataLoader
  workers do not inherit it (a ``flock`` would stay held by them after their parent's death), and it
  works on NFS; the price: closing *any* descriptor of ``.lock`` in the holding process drops the lock,
  so nothing but this module opens that file. The
  file is deleted on release, so a refused run leaves the folder as it was; a lock taken on a file
  that was deleted meanwhile is retried on the new one (:func:`_open_locked`). **One owner**: the
  block yields a :class:`RunFolder` that the owner hands on (the CLIs enter :func:`run_folder` once
  and give it to the :class:`~greenmim.engine.Trainer`; a Trainer given none enters it itself); a
  second lock of a folder this process holds is a bug, refused. Under DDP only rank 0 writes, so
  only rank 0 locks (``enabled``). A folder the run created is removed again when the run fails
  before writing any of its files (:func:`undo_start`).
* :func:`check_outside_data`: ``output_dir`` must not lie inside ``data.root`` (symlinks resolved).
* :func:`check_no_other_run`: a frozen-feature evaluation refuses a folder holding another run.
* :func:`remove_orphan_temps`: temporary files of a checkpoint write killed half-way.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, List, Optional

from .errors import UserError

LOCK_NAME = ".lock"
#: files a run leaves in its folder; one of them there means the folder holds a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "eval.json")
#: files a run writes while it starts (before any of :data:`RUN_FILES`): removed with the folder of a run refused then
START_FILES = ("train.log",)
#: temporary names (``.<name>.tmp<pid>``) of :func:`~greenmim.engine.checkpoint.atomic_save` for the files of
#: a run's checkpoints folder: rolling and periodic checkpoints, their sidecars, fine-tuning's ``best.pt``
ORPHAN_TEMP_RE = re.compile(r"^\.(?:(?:epoch-\d+-)?step-\d+\.(?:pt|after-eval)|best\.pt)\.tmp\d+$")


class RunFolder:
    """A run folder held by :func:`run_folder`: ``path``, whether this process holds its lock
    (``enabled``: rank 0) and the start marks of its log (:func:`start_marks`)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.marks: Dict[str, Optional[int]] = start_marks(path) if enabled else {}

    def check(self, check: Callable[[], None]) -> None:
        """Run ``check()`` (which raises :class:`UserError`) on the rank holding the folder, under its
        lock; its error is raised on every rank (once the process group is up), so that none waits."""
        from .distributed import broadcast_object

        error = None
        if self.enabled:
            try:
                check()
            except UserError as exc:
                error = str(exc)
        error = broadcast_object(error)
        if error:
            raise UserError(error)

    def undo_start(self) -> None:
        """A run refused while it starts (a checkpoint it cannot resume, bad data) leaves the folder's
        log as it found it (:func:`undo_start`; rank 0, under the lock)."""
        if self.enabled:
            undo_start(self.path, self.marks)


_HELD: Dict[str, IO[str]] = {}  # resolved output_dir -> the open lock file held by this process


def _holder(path: Path) -> str:
    try:
        pid, _, host = path.read_text().strip().partition(" ")
    except OSError:
        return "another process"
    if not pid:
        return "another process"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _open_locked(path: Path):
    """The lock file opened and locked (non-blocking), or None when another process holds it. A file
    replaced or deleted (by its holder's release) between our open and our lock is retried: the lock
    counts only on the file the path names."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()


def acquire_lock(output_dir: os.PathLike) -> None:
    """Take the exclusive lock of ``output_dir`` (which must exist), or raise :class:`UserError` naming
    the process that holds it; pair it with :func:`release_lock`. Not re-entrant: the folder has one
    owner (:func:`run_folder`), so a second lock in the same process is a bug (:class:`RuntimeError`)."""
    key = str(Path(output_dir).resolve())
    if key in _HELD:
        raise RuntimeError(f"{output_dir} is already locked by this process: hand its RunFolder on instead of locking it again")
    path = Path(key) / LOCK_NAME
    try:
        f = _open_locked(path)
    except OSError as exc:
        raise UserError(f"output_dir={output_dir} cannot be written ({exc.strerror or exc}): choose another output_dir=") from None
    if f is None:
        raise UserError(
            f"output_dir={output_dir} is in use by another greenmim run ({_holder(path)}): wait for it to end or stop it "
            "(then resume=auto continues it), or choose another output_dir="
        )
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {socket.gethostname()}\n")
    f.flush()
    _HELD[key] = f


def release_lock(output_dir: os.PathLike) -> None:
    """Undo :func:`acquire_lock`: delete the lock file (still holding the lock, so a process that
    opened it meanwhile retries on a new file), then release the lock."""
    key = str(Path(output_dir).resolve())
    held = _HELD.pop(key, None)
    if held is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(Path(key) / LOCK_NAME)
    held.close()  # closing the file releases the lock


@contextlib.contextmanager
def run_folder(output_dir: os.PathLike, enabled: bool = True) -> Iterator[RunFolder]:
    """The one owner of a run folder: ``output_dir`` created, checked writable and locked for the
    block by the process with ``enabled`` (rank 0; see the module docstring); yields the
    :class:`RunFolder` to hand on (a task's own checks of the folder: :meth:`RunFolder.check`). Once the process group is up (the trainer's
    or the frozen evaluation's call) every rank must enter: rank 0's :class:`UserError`, if any, is
    raised on every rank, so that none waits for it. Before it (the CLIs' early call) the broadcast is
    a no-op: only rank 0 raises, and the launcher stops the other ranks when it exits."""
    from .checkpoint import check_output_dir
    from .distributed import broadcast_object

    folder = Path(output_dir).expanduser()
    error, held, failed = None, None, False
    created = enabled and not folder.exists()  # a folder this run made is removed again if it fails empty
    marks = RunFolder(folder, enabled)  # the log's size before this run (read before anything is written)
    if enabled:
        try:
            check_output_dir(folder)
            acquire_lock(folder)
            held = marks
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error)
    try:
        if error:
            raise UserError(error)
        yield marks
    except BaseException:
        failed = True
        raise
    finally:
        if held is not None and failed and not run_contents(folder):  # nothing of a run here; still locked: no other run writes
            held.undo_start()
        if held is not None:
            release_lock(folder)
        if created and failed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a run that wrote anything keeps it


def start_marks(folder: Path) -> Dict[str, Optional[int]]:
    """The size of each of :data:`START_FILES` in ``folder`` (None: absent), for :func:`undo_start`."""
    return {name: (folder / name).stat().st_size if (folder / name).is_file() else None for name in START_FILES}


def undo_start(folder: Path, marks: Dict[str, Optional[int]]) -> None:
    """Undo what a run refused at start-up (bad data, a bad checkpoint) wrote to the :data:`START_FILES`
    since ``marks`` (:func:`start_marks`): a file it created is deleted, one it appended to is cut
    back to its earlier size, so the folder is left as the run found it (the error is on stderr).
    Call it holding the folder's lock (no other run writes there)."""
    for name, size in marks.items():
        with contextlib.suppress(OSError):
            if size is None:
                (folder / name).unlink()
            else:
                os.truncate(folder / name, size)


def check_outside_data(output_dir: os.PathLike, data_root: Optional[os.PathLike]) -> None:
    """Refuse an ``output_dir`` inside ``data_root`` (or equal to it; symlinks resolved): its checkpoints,
    logs and images would be written into the user's data and read back as training images."""
    if not data_root:
        return
    out = Path(output_dir).expanduser().resolve()
    root = Path(data_root).expanduser().resolve()
    if out == root or root in out.parents:
        raise UserError(
            f"output_dir={output_dir} is inside data.root={data_root}: a run would write its files into the dataset "
            "(and read them back as data); choose an output_dir= outside data.root"
        )


def run_contents(output_dir: os.PathLike) -> List[str]:
    """What in ``output_dir`` shows that a run wrote there: its run files and checkpoints (names)."""
    from .checkpoint import CHECKPOINT_DIR

    folder = Path(output_dir)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    ckpts = folder / CHECKPOINT_DIR
    if ckpts.is_dir():
        found += [f"{CHECKPOINT_DIR}/{p.name}" for p in sorted(ckpts.glob("*.pt"))]
    return found


def check_no_other_run(output_dir: os.PathLike, what: str) -> None:
    """Refuse to write ``what`` (e.g. ``protocol=knn``) into a folder that holds a run already: one run
    per folder, so that no other run's ``config.yaml`` is replaced nor its ``metrics.jsonl`` appended to."""
    found = run_contents(output_dir)
    if found:
        shown = ", ".join(found[:3]) + (" ..." if len(found) > 3 else "")
        raise UserError(
            f"output_dir={output_dir} already holds a run ({shown}); {what} writes a run of its own: choose a fresh output_dir="
        )


def remove_orphan_temps(folder: os.PathLike) -> List[Path]:
    """Delete the temporary files a killed checkpoint write left in ``folder`` (only names matching
    :data:`ORPHAN_TEMP_RE`; call it while holding the run's lock, so no write of ours is in flight)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and ORPHAN_TEMP_RE.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
