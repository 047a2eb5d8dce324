"""Atomic writes of the files a run shares (checkpoints, exports, pictures, reports): the one writer.

Each file is written to a temporary name in its own folder (``.<name>.tmp<pid>``), flushed to disk,
given the mode a plain ``open()`` would give a new file (``0o666`` minus the umask, e.g. ``0644``
under umask ``022``) and only then renamed over the target with :func:`os.replace`. So a process
killed at any moment, or a full disk, leaves either the previous file or the new one, never a
truncated one, and the file is readable by whoever the umask allows (temporary-file helpers such as
safetensors' own writer create ``0600`` files).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, List, Mapping, Union

PathLike = Union[str, os.PathLike]
Writer = Callable[[BinaryIO], None]


def shared_file_mode() -> int:
    """``0o666 & ~umask``: the mode of a new file meant to be shared, read without changing the umask
    (``/proc/self/status`` on Linux; elsewhere ``os.umask`` is set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_name(path: PathLike) -> Path:
    """The temporary file :func:`atomic_write` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(files: Mapping[PathLike, Writer]) -> List[Path]:
    """Write ``{path: write}`` as one unit: ``write(f)`` fills each binary file object, then every
    temporary file is renamed to its path, in order. Folders are created.

    Raises the :class:`OSError` (or the writer's exception) of the first failure, after removing the
    temporary files; no target has been touched then. Returns the paths written.
    """
    staged: List[Path] = []
    targets = [Path(p) for p in files]
    try:
        for path, write in zip(targets, files.values()):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_name(path)
            staged.append(tmp)
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), shared_file_mode())  # a temp left by a crashed run may have another mode
        for tmp, path in zip(staged, targets):
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            if tmp.exists():
                tmp.unlink()
    return targets


def write_bytes(data: bytes) -> Writer:
    """A writer for :func:`atomic_write` that writes ``data``."""
    return lambda f: f.write(data)
