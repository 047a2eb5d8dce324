"""Helpers shared by the Hydra entry points.

* :data:`CONFIG_PATH`: where Hydra finds ``configs/`` — the installed ``greenmim.configs`` package, so
  it works from a checkout (editable install) and from a plain ``pip install .`` alike.
* :func:`trainer_config`, :func:`optim_config`, :func:`sched_config`: the ``trainer``/``optim``/``sched``
  config nodes as engine objects (unknown keys are errors that list the valid ones).
* :func:`report_errors`: turns :class:`~greenmim.engine.errors.UserError` (bad data, bad config)
  and non-finite losses into one ``<prog>: error: ...`` line on stderr and exit code 2/3.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from ..engine.distributed import cleanup_distributed
from ..engine.errors import ConfigError, NonFiniteLossError, UserError, one_line
from ..engine.trainer import OptimConfig, TrainerConfig

CONFIG_PATH = "pkg://greenmim.configs"
_TOP_LEVEL = ("output_dir", "resume", "seed", "config", "task")


def to_dict(node: Any) -> Dict[str, Any]:
    """A resolved plain-python copy of a config node."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _dataclass_from(cls, values: Dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hints.append(f"{where}.{key}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown config key(s) {', '.join(hints)}; valid: {', '.join(sorted(names - set(_TOP_LEVEL)))}")
    return cls(**values)


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    """``TrainerConfig`` from ``cfg.trainer`` plus the top-level ``output_dir``, ``resume`` and ``seed``."""
    values = to_dict(cfg.trainer)
    values.update(output_dir=str(cfg.output_dir), resume=cfg.get("resume"), seed=int(cfg.get("seed", 0)))
    values["config"] = to_dict(cfg)
    return _dataclass_from(TrainerConfig, values, "trainer")


def optim_config(cfg: DictConfig) -> OptimConfig:
    return _dataclass_from(OptimConfig, to_dict(cfg.optim), "optim")


def sched_config(cfg: DictConfig) -> Dict[str, Any]:
    return to_dict(cfg.sched)


def launch(prog: str, task: str, hydra_app) -> None:
    """Console entry point of a Hydra CLI: one-line errors for config typos, then the app."""
    precheck_overrides(prog, task, sys.argv[1:])
    hydra_app()


def run_app(prog: str, task: str, cfg: DictConfig, run) -> None:
    """Run ``run(cfg)`` with one-line errors, after checking the config is a ``task`` recipe (every
    root config and experiment sets ``task``: an experiment of another entry point is refused)."""
    with report_errors(prog):
        if cfg.get("task", task) != task:
            raise ConfigError(
                f"this experiment is a {cfg.task} recipe, not a {task} one: run it with greenmim-{cfg.task}"
            )
        run(cfg)


@contextlib.contextmanager
def report_errors(prog: str):
    """Print user errors as one line and exit (2: bad input, 3: non-finite loss); always leave the process group."""
    try:
        yield
    except UserError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLossError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        cleanup_distributed()


_SKIP_PRECHECK = ("-m", "--multirun", "-h", "--help", "--hydra-help", "--info", "-cn", "--config-name", "-cp",
                  "--config-path", "-cd", "--config-dir", "--shell-completion", "-sc", "--experimental-rerun")


def _friendly_composition_error(exc: BaseException, config_name: str, overrides: list) -> str:
    """One line for a failed composition: unknown keys get a did-you-mean from the composed config."""
    import re

    from hydra import compose

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

    names = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if not names:
        return None
    path = resources.files(CONFIG_PATH.replace("pkg://", "")) / "experiment" / f"{names[-1]}.yaml"
    if not path.is_file():
        return None
    return OmegaConf.create(path.read_text()).get("task")
