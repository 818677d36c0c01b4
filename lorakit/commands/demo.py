"""``lorakit demo [tasks|digits]``: the main job (default) or the classic digits experiment."""

from __future__ import annotations

import importlib

DEMOS = {
    "tasks": ("lorakit.demos.tasks", "fine-tune the embedded default LLM on two tasks and switch adapters (default)"),
    "digits": ("lorakit.demos.digits", "the classic LoRA experiment: an oversized MLP on handwritten digits"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="demo", metavar="DEMO")
    for name, (module, help_text) in DEMOS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_demo_module=module)
        importlib.import_module(module).add_arguments(p)


def run(args) -> int:
    module = getattr(args, "_demo_module", None)
    if module is None:  # `lorakit demo` alone runs the main job with its defaults
        from ..cli import build_parser
        args = build_parser().parse_args(["demo", "tasks"])
        module = args._demo_module
    return importlib.import_module(module).run(args)
