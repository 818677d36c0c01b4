"""``lorakit generate``: the same prompts through the base model and each adapter, side by side.

    lorakit generate --adapter runs/sql/adapter --prompt "How many Sales employees are in Oslo?"
    lorakit generate --model my-model/ --adapter sql=runs/sql/adapter --adapter json=runs/json/adapter \\
                     --prompts-file prompts.txt --sample --temperature 0.8

The base is loaded once; each adapter is loaded onto it under its name and selected with
``lorakit.set_adapter`` (a pointer switch: no weight is copied); the base's answers come
from ``lorakit.disable_adapters``. ``--prompts-file``: one prompt per line, or JSONL records
with "prompt" or "messages".
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from ..errors import LoraError


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="base model: HF folder, .gguf file or hub id (default: the embedded "
                                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="an adapter folder (repeatable); NAME defaults to the folder's name")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text file (one prompt per line) or JSONL (prompt / messages)")
    parser.add_argument("--system", help="system message for chat prompts")
    parser.add_argument("--chat", action=argparse_bool(), default=None,
                        help="render prompts with the chat template (default: when the tokenizer has one)")
    parser.add_argument("--no-base", action="store_true", help="do not show the base model's answers")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def argparse_bool():
    import argparse
    return argparse.BooleanOptionalAction


def run(args) -> int:
    import lorakit
    from ..models import complete, load_base, render_prompt
    prompts = read_prompts(args.prompt, args.prompts_file)
    adapters = parse_adapters(args.adapter)
    if args.no_base and not adapters:
        raise LoraError("--no-base needs at least one --adapter")
    if args.max_new_tokens < 1:
        raise LoraError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    lm = load_base(args.model, args.dtype, args.device)
    for name, path in adapters:
        lorakit.load_adapter(lm.model, path, name=name)
    texts = [render_prompt(lm.tokenizer, p, args.chat, args.system) for p in prompts]
    gen = dict(max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
               top_p=args.top_p, seed=args.seed)
    answers: dict[str, list[str]] = {}
    if not args.no_base:
        if adapters:
            with lorakit.disable_adapters(lm.model):
                answers["base"] = complete(lm.model, lm.tokenizer, texts, **gen)
        else:
            answers["base"] = complete(lm.model, lm.tokenizer, texts, **gen)
    for name, _ in adapters:
        lorakit.set_adapter(lm.model, name)
        answers[name] = complete(lm.model, lm.tokenizer, texts, **gen)
    print_side_by_side(prompts, answers, as_json=args.json)
    return 0


def read_prompts(prompts: list[str], path: str | None) -> list:
    """The prompts: --prompt values, then those of --prompts-file (strings or message lists)."""
    out: list = list(prompts)
    if path:
        p = Path(path)
        if p.suffix == ".jsonl":
            from ..train.data import read_jsonl       # errors name the file and line
            for n, rec in read_jsonl(p):
                if isinstance(rec.get("prompt"), str):
                    out.append(rec["prompt"])
                elif isinstance(rec.get("messages"), list):
                    out.append(rec["messages"])
                else:
                    raise LoraError(f"{p}:{n}: expected an object with 'prompt' (string) or 'messages' (list)")
        else:
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise LoraError(f"{p}: cannot read the prompts file: {e}") from None
            out += [line for line in lines if line.strip()]
    if not out:
        raise LoraError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    return out


def parse_adapters(values: list[str]) -> list[tuple[str, str]]:
    """[NAME=]DIR values -> [(name, dir)], names unique and never "base"."""
    out, seen = [], set()
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            path = v
            p = Path(v.rstrip("/"))
            name = p.parent.name if p.name == "adapter" and p.parent.name else p.name
        name = name.replace(".", "_") or "adapter"
        if name == "base" or name in seen:
            raise LoraError(f"--adapter {v!r}: the name {name!r} is taken; use NAME=DIR with a unique name")
        seen.add(name)
        out.append((name, path))
    return out


def print_side_by_side(prompts: list, answers: dict[str, list[str]], as_json: bool = False, width: int = 100,
                       file=None) -> None:
    """Each prompt, then one row per variant (base, adapters) with its answer."""
    import sys
    file = file or sys.stdout
    label_w = max(len(k) for k in answers)
    for i, prompt in enumerate(prompts):
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"] if prompt else ""
        if as_json:
            print(json.dumps({"prompt": prompt, "answers": {k: v[i] for k, v in answers.items()}},
                             ensure_ascii=False), file=file)
            continue
        print(f"[{i + 1}] {shown}", file=file)
        for name, outs in answers.items():
            lines = textwrap.wrap(outs[i].replace("\n", " ⏎ "), max(20, width - label_w - 5)) or ["(empty)"]
            print(f"    {name:<{label_w}} | {lines[0]}", file=file)
            for cont in lines[1:]:
                print(f"    {'':<{label_w}} | {cont}", file=file)
        print(file=file)
