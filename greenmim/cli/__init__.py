"""Command-line tools: ``greenmim-pretrain`` (Hydra), ``greenmim-visualize``, ``greenmim-export``.

:mod:`greenmim.cli.common` holds what every Hydra entry point shares (config -> engine objects,
one-line user errors), for the fine-tuning and detection CLIs too.
"""
