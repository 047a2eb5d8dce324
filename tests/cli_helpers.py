"""Running a Hydra entry point in-process and checking its one-line errors (shared by the fault tests)."""
import importlib
import re
import sys

import pytest


def run_cli(monkeypatch, capsys, module, prog, *args):
    """Run ``greenmim.cli.<module>.main`` with ``argv = [prog, *args]``; returns (exit code, stderr lines)."""
    main = importlib.import_module(f"greenmim.cli.{module}").main
    monkeypatch.setattr(sys, "argv", [prog, *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code, err, prog, pattern, exit_code=2, prefix="error: "):
    """Exactly one stderr line ``<prog>: <prefix>...`` matching ``pattern``, and the exit code."""
    assert code == exit_code, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: {prefix}"), err
    assert re.search(pattern, err[0]), err[0]
