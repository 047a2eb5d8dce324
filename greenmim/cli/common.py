"""Helpers shared by the Hydra entry points.

* :data:`CONFIG_PATH`: where Hydra finds ``configs/`` — the installed ``greenmim.configs`` package, so
  it works from a checkout (editable install) and from a plain ``pip install .`` alike.
* :func:`trainer_config`, :func:`optim_config`, :func:`sched_config`: the ``trainer``/``optim``/``sched``
  config nodes as engine objects (from :mod:`greenmim.engine.config`, the schema).
* :func:`report_errors`: turns :class:`~greenmim.engine.errors.UserError` (bad data, bad config),
  non-finite losses and handled stop signals into one ``<prog>: ...`` line on stderr and the
  documented exit code (2, 3, 128 + signal number).
* :func:`run_app`: every ``${...}`` resolved, :mod:`.validate`'s one check of every key (ranges and choices),
  the run folder checked (outside ``data.root``, writable) and locked (:mod:`greenmim.engine.rundir`),
  then the task.
* :func:`launch`: a Ctrl-C before training (or outside it) is one line and exit 130, no traceback
  (:func:`interrupted_line`; :mod:`greenmim.cli` covers the imports before it).

omegaconf and Hydra are imported inside the functions that use them: ``greenmim-bench`` uses
:func:`output_file` and must run where only torch, timm and numpy are installed (``scripts/gpu_check.sh``).
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:  # annotations only: omegaconf is imported where it is used
    from omegaconf import DictConfig

from ..engine.checkpoint import CHECKPOINT_DIR, find_latest
from ..engine.distributed import cleanup_distributed
from ..engine.monitor import setup_logging
from ..engine.errors import (
    EXIT_NONFINITE,
    EXIT_USER_ERROR,
    ConfigError,
    NonFiniteLossError,
    Preempted,
    UserError,
    one_line,
)
from ..engine.rundir import check_outside_data, run_folder
from . import EXIT_INTERRUPTED, interrupted_line
from ..engine.config import optim_config, sched_config, to_dict, trainer_config

__all__ = ["CONFIG_PATH", "optim_config", "sched_config", "to_dict", "trainer_config", "eval_checkpoint",
           "output_file", "check_replaceable", "launch", "run_app", "check_resolves", "prepare_run_folder", "report_errors",
           "precheck_overrides"]

CONFIG_PATH = "pkg://greenmim.configs"


def eval_checkpoint(cfg: DictConfig, output_dir: Path, prefer: Optional[str] = None) -> str:
    """The checkpoint ``eval_only=true`` evaluates: ``checkpoint=``, else ``output_dir/checkpoints/<prefer>``
    (e.g. fine-tuning's ``best.pt``) when it exists, else the latest ``step-*.pt`` there."""
    if cfg.checkpoint:
        return str(cfg.checkpoint)
    if prefer and (output_dir / CHECKPOINT_DIR / prefer).is_file():
        return str(output_dir / CHECKPOINT_DIR / prefer)
    latest = find_latest(output_dir) if output_dir.is_dir() else None
    if latest is None:
        wanted = f"{prefer} or step-*.pt" if prefer else "step-*.pt"
        raise ConfigError(f"eval_only=true needs checkpoint=PATH (no {wanted} in {output_dir / CHECKPOINT_DIR})")
    return str(latest)


def output_file(output: str, default_name: str, suffixes: Sequence[str], inputs: Sequence[str], option: str = "-o") -> Path:
    """The file an ``-o`` option names: ``default_name`` inside it when it is a folder; it must end in
    one of ``suffixes`` and must not be one of the ``inputs`` (a checkpoint would be replaced). Its
    folder is created; failures are :class:`UserError` naming ``option`` (the command-line argument)."""
    out = Path(output).expanduser()
    if out.is_dir():
        out = out / default_name
    if out.suffix.lower() not in suffixes:
        raise UserError(f"{option} {output}: the output file must end in {' or '.join(suffixes)}")
    for src in inputs:
        if out.exists() and Path(src).exists() and os.path.samefile(out, src):
            raise UserError(f"{option} {output} is the input {src}, which would be replaced: choose another output file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{option} {output}: cannot create {out.parent} ({exc.strerror or exc}): choose another output file") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"{option} {output}: {out.parent} is not writable: choose another output file")
    return out


def check_replaceable(output: Path, files: Sequence[Path], force: bool, option: str = "-o",
                      ours: Optional[Callable[[Path], bool]] = None) -> None:
    """Refuse (:class:`UserError`) to write ``output`` while any of ``files`` (the output and what is
    written with it) exists, unless ``force``; with ``ours`` given, ``force`` replaces only files for
    which ``ours(path)`` is true (another program's file is never replaced)."""
    existing = [p for p in files if p.exists()]
    if not existing:
        return
    names = " and ".join(str(p) for p in existing) + (" already exists" if len(existing) == 1 else " already exist")
    if not force:
        what = "a previous export" if ours else "it"
        raise UserError(f"{option} {output}: {names}: choose another output file, or pass --force to replace {what}")
    foreign = [p for p in existing if ours is not None and not ours(p)]
    if foreign:
        raise UserError(f"{option} {output}: {foreign[0]} is not a greenmim export, so --force leaves it alone: choose another output file")


def launch(prog: str, task: str, hydra_app) -> None:
    """Console entry point of a Hydra CLI: one-line errors for config typos, then the app; a Ctrl-C
    (``KeyboardInterrupt``: the training loop turns SIGINT into a checkpoint instead) is one line, exit 130."""
    try:
        precheck_overrides(prog, task, sys.argv[1:])
        hydra_app()
    except KeyboardInterrupt:
        print(interrupted_line(prog), file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def run_app(prog: str, task: str, cfg: DictConfig, run) -> None:
    """Run ``run(cfg)`` with one-line errors, after checking the config is a ``task`` recipe (every
    root config and experiment sets ``task``: an experiment of another entry point is refused), that
    it resolves, taking the model from the ``resume=`` / ``pretrained=`` checkpoint
    (:func:`~greenmim.cli.architecture.adopt_checkpoint_architecture`), checking it is in range, and
    with its ``output_dir`` prepared (:func:`prepare_run_folder`): the folder's one owner, handed to
    ``run(cfg, folder)`` (which gives it to the :class:`~greenmim.engine.Trainer`)."""
    from .architecture import adopt_checkpoint_architecture  # both import omegaconf (see the module docstring)
    from .validate import check_config

    setup_logging(None, int(os.environ.get("RANK", "0")))  # start-up lines on stdout until the run's folder is ready
    with report_errors(prog):
        check_resolves(cfg)
        if cfg.task != task:
            raise ConfigError(
                f"this experiment is a {cfg.task} recipe, not a {task} one: run it with greenmim-{cfg.task}"
            )
        adopt_checkpoint_architecture(cfg, task)
        check_config(cfg, task)
        with prepare_run_folder(cfg) as folder:
            run(cfg, folder)


def check_resolves(cfg: DictConfig) -> None:
    """Every ``${...}`` of the config resolves; the first that does not is a :class:`ConfigError` naming its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as exc:
        key = getattr(exc, "full_key", None) or "a config value"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{key}: {msg}; fix the ${{...}} reference, or escape a literal one as \\${{...}}") from None


def prepare_run_folder(cfg: DictConfig):
    """The run's ``output_dir``: refused inside ``data.root`` (generated data aside), then created,
    checked writable and locked by rank 0 for the whole run (the lock is released on exit; see
    :func:`greenmim.engine.rundir.run_folder`). A context manager yielding the held
    :class:`~greenmim.engine.rundir.RunFolder`."""
    from omegaconf import OmegaConf

    root = OmegaConf.select(cfg, "data.root", default=None, throw_on_missing=False)
    if not OmegaConf.select(cfg, "data.synthetic", default=None) and root not in (None, "???"):
        check_outside_data(str(cfg.output_dir), root)
    return run_folder(str(cfg.output_dir), enabled=int(os.environ.get("RANK", "0")) == 0)


@contextlib.contextmanager
def report_errors(prog: str):
    """Print user errors as one line and exit with the documented code (README, "Exit codes"):
    2 bad input (config, data, paths, a full disk), 3 non-finite loss, 128 + signal number after a
    stop signal was handled (143 SIGTERM, 130 SIGINT, 138 SIGUSR1). Always leave the process group."""
    try:
        yield
    except UserError as exc:
        _exit(prog, f"error: {one_line(exc)}", EXIT_USER_ERROR)
    except NonFiniteLossError as exc:
        _exit(prog, f"error: {one_line(exc)}", EXIT_NONFINITE)
    except Preempted as exc:
        _exit(prog, one_line(exc), exc.exit_code)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = os.path.dirname(exc.filename) if exc.filename else "the output file system"
        _exit(prog, f"error: no space left on {where}: free some space, then run again (a training run: with resume=auto)", EXIT_USER_ERROR)
    finally:
        cleanup_distributed()


def _exit(prog: str, line: str, code: int) -> None:
    print(f"{prog}: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


_SKIP_PRECHECK = ("-m", "--multirun", "-h", "--help", "--hydra-help", "--info", "-cn", "--config-name", "-cp",
                  "--config-path", "-cd", "--config-dir", "--shell-completion", "-sc", "--experimental-rerun")


def _friendly_composition_error(exc: BaseException, config_name: str, overrides: list) -> str:
    """One line for a failed composition: unknown keys get a did-you-mean from the composed config."""
    import re

    from hydra import compose
    from omegaconf import DictConfig, OmegaConf

    text = " ".join(str(exc).split())
    cause = " ".join(str(exc.__cause__).split()) if exc.__cause__ is not None else ""
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in (cause + text):
        key = m.group(1)
        parent_path, _, leaf = key.rpartition(".")
        groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0] and not o.startswith(("+", "~"))]
        try:
            base = compose(config_name=config_name, overrides=groups)
            parent = OmegaConf.select(base, parent_path) if parent_path else base
            keys = sorted(parent.keys()) if isinstance(parent, DictConfig) else []
        except Exception:  # pragma: no cover - best effort
            keys = []
        close = difflib.get_close_matches(leaf, [str(k) for k in keys], n=1)
        hint = f"did you mean {parent_path + '.' if parent_path else ''}{close[0]}? " if close else ""
        return f"unknown config key '{key}': {hint}(`--cfg job` prints the config; prefix with + to add a new key)"
    m = re.search(r"LexerNoViableAltException: (\S+?)=(.*?) \^", text)
    if m:
        key, value = m.groups()
        return (f"cannot parse the override {key}={value} (a character Hydra's override grammar does not take unquoted): "
                f"quote the value, e.g. '{key}=\"{value}\"' (the single quotes are for the shell)")
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        block = str(exc).split("Available options in", 1)[-1].splitlines()[1:]
        names = []
        for line in block:
            if not line.startswith("\t"):
                break
            names.append(line.strip())
        close = difflib.get_close_matches(option, names, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"unknown {group}={option}: {hint}choose one of {', '.join(names)}"
    return text + (f" ({cause})" if cause and cause not in text else "")


def precheck_overrides(prog: str, config_name: str, argv: list) -> None:
    """Compose the config once with the command-line overrides and, if that fails (a typo in a key or
    a group option), print one line naming the fix and exit with code 2 before Hydra's own report."""
    if any(a in _SKIP_PRECHECK or a.startswith(("--config", "hydra.", "hydra/")) for a in argv):
        return
    overrides, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a in ("-c", "--cfg", "-p", "--package", "-i", "--info"):
            skip_next = True  # the flag's value is not an override
        elif not a.startswith("-"):
            overrides.append(a)
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return
    with initialize_config_module(config_module=CONFIG_PATH.replace("pkg://", ""), version_base="1.3"):
        try:
            compose(config_name=config_name, overrides=overrides)
        except Exception as exc:
            other = _experiment_task(overrides)
            if other and other != config_name:  # e.g. its data= option is another task's: name the real cause
                message = f"this experiment is a {other} recipe, not a {config_name} one: run it with greenmim-{other}"
            else:
                message = _friendly_composition_error(exc, config_name, overrides)
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)


def _experiment_task(overrides: list):
    """The ``task:`` of the ``experiment=NAME`` given on the command line, if that file exists."""
    from importlib import resources

    from omegaconf import OmegaConf

    names = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if not names:
        return None
    path = resources.files(CONFIG_PATH.replace("pkg://", "")) / "experiment" / f"{names[-1]}.yaml"
    if not path.is_file():
        return None
    return OmegaConf.create(path.read_text()).get("task")
