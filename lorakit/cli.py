"""The ``lorakit`` command: a thin layer over typed functions.

Each subcommand lives in its own module under ``lorakit/commands/`` (imported only when
that subcommand runs) and exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .errors import LoraError

# name -> (module, one-line help)
COMMANDS = {
    "train": ("lorakit.commands.train", "fine-tune LoRA adapters on a causal LM from JSONL data"),
    "generate": ("lorakit.commands.generate", "generate text with the base model and one or more adapters"),
    "merge": ("lorakit.commands.merge", "merge an adapter into the base model and write a full model folder"),
    "info": ("lorakit.commands.info", "describe an adapter folder"),
    "analyze": ("lorakit.commands.analyze", "rank analysis of the update between two checkpoints"),
    "extract": ("lorakit.commands.extract", "extract a LoRA adapter from a full fine-tune (truncated SVD)"),
    "demo": ("lorakit.commands.demo", "run a demo: the main job (default) or the classic digits experiment"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(_load(args._module).run(args) or 0)
    except LoraError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
