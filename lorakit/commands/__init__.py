"""One module per ``lorakit`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``.

Modules import their heavy dependencies (transformers, matplotlib, ...) inside ``run``.
"""
