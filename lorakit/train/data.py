"""Training data: JSONL records -> token ids with loss masks -> padded or packed batches.

Four record formats (``format: auto`` picks one per file from the first record's keys):

    text               {"text": "..."}                                  loss on every token
    prompt_completion  {"prompt": "...", "completion": "..."}           loss on the completion
    messages           {"messages": [{"role": "user", "content": ...},   loss on assistant turns,
                                     {"role": "assistant", ...}]}        rendered with the chat template
    alpaca             {"instruction", "input" (optional), "output"}    loss on the output

An example is two equal-length lists: ``input_ids`` and ``labels``, where ``labels[t]`` is
``input_ids[t]`` when token t is trained on and -100 (ignored) otherwise. Prompt and answer
are tokenized separately and concatenated, which is exactly what generation sees (the
prompt is tokenized alone, answer tokens follow). Answers end with the EOS token (or the
chat template's end-of-turn token) so the model learns to stop.

Chat templates: the assistant span of turn i is the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``,
minus trailing whitespace; a template whose renderings are not prefixes of each other
is refused with the file and line.

Batches: ``padding`` pads each batch on the right to its longest sequence
(attention_mask marks real tokens); ``packing`` concatenates examples into blocks of
max_length tokens with position ids restarting at each example, which transformers turns
into a block-diagonal causal mask (examples do not attend to each other).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..errors import LoraError

IGNORE = -100
FORMATS = ("text", "prompt_completion", "messages", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


class DataError(LoraError):
    """A data file or record is malformed (the message names the file and line)."""


@dataclass
class Example:
    """One tokenized sequence: ``labels[t]`` is ``input_ids[t]`` where trained, else -100."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""                               # "file:line", for error messages
    positions: Optional[list[int]] = field(default=None, repr=False)   # set by packing


@dataclass
class DataStats:
    """What loading did, for the log and the README."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    format: str = ""


# ------------------------------------------------------------------------------ reading
def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the data file: {e}") from None
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append((n, rec))
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def detect_format(record: dict, where: str = "record") -> str:
    """The format a record's keys say it is in."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise DataError(f"{where}: cannot tell the format from the keys {sorted(record)}; expected one of "
                    "{'text'}, {'prompt', 'completion'}, {'messages'}, {'instruction', 'input', 'output'}")


def check_record(record: dict, fmt: str, where: str) -> None:
    """Raise DataError naming ``where`` when ``record`` is not a valid ``fmt`` record."""
    def need_str(key: str, optional: bool = False) -> None:
        if key not in record:
            if not optional:
                raise DataError(f"{where}: {fmt} record needs key {key!r}; keys: {sorted(record)}")
        elif not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")

    if fmt == "text":
        need_str("text")
    elif fmt == "prompt_completion":
        need_str("prompt"), need_str("completion")
    elif fmt == "alpaca":
        need_str("instruction"), need_str("input", optional=True), need_str("output")
    elif fmt == "messages":
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': string}}, "
                                f"got {m!r}"[:300])
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
    else:
        raise DataError(f"{where}: unknown format {fmt!r}; formats: {FORMATS}")


# ------------------------------------------------------------------------------ tokenizing
def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before plain text (e.g. BOS), found by encoding with and without."""
    with_sp = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    return list(with_sp[:n]) if n > 0 and with_sp[n:n + len(without)] == without else []


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def segments(record: dict, fmt: str, tokenizer, where: str) -> list[tuple[str, bool]]:
    """The record as (text, trained) pieces, in order, before tokenizing."""
    if fmt == "text":
        return [(record["text"], True)]
    if fmt == "prompt_completion":
        return [(record["prompt"], False), (record["completion"], True)]
    if fmt == "alpaca":
        inp = record.get("input") or ""
        prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if inp else "",
                                      instruction=record["instruction"],
                                      input=f"### Input:\n{inp}\n\n" if inp else "")
        return [(prompt, False), (record["output"], True)]
    return chat_segments(record["messages"], tokenizer, where)


def chat_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    """Split a rendered conversation into prompt pieces and assistant answers (see module doc)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' records need a tokenizer with a chat template; this tokenizer has "
                        "none (use the prompt/completion format instead)")

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{where}: the chat template does not render conversation prefixes as prefixes "
                            f"(turn {i}), so assistant tokens cannot be located; use prompt/completion records")
        answer = full[len(prompt):].rstrip()
        out += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    rest = render(messages, False)[len(done):]
    if rest:
        out.append((rest, False))
    return out


def encode(record: dict, fmt: str, tokenizer, where: str = "record") -> Example:
    """Tokenize one record: prompt pieces get label -100, trained pieces their own ids, and
    non-chat answers end with EOS (trained)."""
    check_record(record, fmt, where)
    ids: list[int] = [] if fmt == "messages" else special_prefix(tokenizer)
    labels = [IGNORE] * len(ids)
    for text, trained in segments(record, fmt, tokenizer, where):
        piece = _ids(tokenizer, text)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if fmt != "messages" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids, labels, where)


def load_examples(path: str | Path, tokenizer, fmt: str = "auto", max_length: int = 512,
                  truncation: str = "right", records: Optional[list[tuple[int, dict]]] = None
                  ) -> tuple[list[Example], DataStats]:
    """Read and tokenize a JSONL file (or the given (line, record) pairs from it).

    Sequences over ``max_length`` are cut at the end ("right") or dropped ("drop");
    examples left without any trained token are dropped. Both are counted in the stats.
    """
    records = read_jsonl(path) if records is None else records
    if fmt == "auto":
        fmt = detect_format(records[0][1], f"{path}:{records[0][0]}")
    stats = DataStats(records=len(records), format=fmt)
    examples = []
    for line, rec in records:
        ex = encode(rec, fmt, tokenizer, f"{path}:{line}")
        if len(ex.input_ids) > max_length:
            stats.truncated += 1
            if truncation == "drop":
                stats.dropped += 1
                continue
            ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
        n_trained = sum(1 for y in ex.labels[1:] if y != IGNORE)
        if n_trained == 0:
            stats.dropped += 1
            continue
        stats.tokens += len(ex.input_ids)
        stats.trained_tokens += n_trained
        examples.append(ex)
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable example ({stats.dropped} of {stats.records} dropped: over max_length="
                        f"{max_length} or nothing to train on)")
    return examples, stats


def split_records(records: list[tuple[int, dict]], fraction: float, seed: int
                  ) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """(train, valid): a seeded random ``fraction`` of the records held out (at least one when > 0)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    n_valid = min(len(records) - 1, max(1, round(fraction * len(records))))
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_valid])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ------------------------------------------------------------------------------ batching
def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate examples (in order) into blocks of at most max_length tokens; each block's
    ``positions`` restart at 0 at every example boundary. An example never straddles blocks."""
    blocks, cur = [], Example([], [], "packed", [])
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_length:
            blocks.append(cur)
            cur = Example([], [], "packed", [])
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels
        cur.positions += list(range(len(ex.input_ids)))
    if cur.input_ids:
        blocks.append(cur)
    return blocks


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: input_ids, labels (B, T); attention_mask (B, T) for plain
    examples, or position_ids (B, T) for packed blocks (padding gets its own positions)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    packed = examples[0].positions is not None
    extra = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        if packed:
            extra[i, :n] = torch.tensor(e.positions)
            extra[i, n:] = torch.arange(T - n)
        else:
            extra[i, :n] = 1
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


class Batches:
    """An endless, resumable stream of batches: epoch e visits the examples in the order
    ``randperm(n, seed + e)``; ``state()`` / ``load_state()`` save and restore the position.
    With ``world_size`` > 1 each rank takes every world_size-th batch."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if not examples:
            raise DataError("no examples to batch")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0          # index: next batch of this epoch (global batch count)
        self._order: Optional[list[int]] = None

    def batches_per_epoch(self) -> int:
        return max(1, len(self.examples) // self.batch_size) if len(self.examples) >= self.batch_size else 1

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.examples), generator=g).tolist()
        return self._order

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch for this rank (full batches only; the epoch's remainder is skipped)."""
        while True:
            if self.index >= self.batches_per_epoch():
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
            i = self.index
            self.index += 1
            if i % self.world_size == self.rank:
                order = self._epoch_order()[i * self.batch_size:(i + 1) * self.batch_size]
                return collate([self.examples[j] for j in order], self.pad_id)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": len(self.examples)}

    def load_state(self, state: dict[str, int]) -> None:
        if state.get("n") != len(self.examples) or state.get("seed") != self.seed:
            raise DataError(f"the checkpoint's data position is for {state.get('n')} examples with seed "
                            f"{state.get('seed')}, but the data now has {len(self.examples)} with seed {self.seed}; "
                            "resume with the same data and seed")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


def eval_batches(examples: list[Example], batch_size: int, pad_id: int, limit: int = 0
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """The validation set in file order, ``limit`` batches at most (0: all)."""
    n_batches = (len(examples) + batch_size - 1) // batch_size
    if limit:
        n_batches = min(n_batches, limit)
    for i in range(n_batches):
        yield collate(examples[i * batch_size:(i + 1) * batch_size], pad_id)


def describe(stats: DataStats) -> dict[str, Any]:
    return dict(stats.__dict__)


__all__ = ["DataError", "Example", "DataStats", "read_jsonl", "detect_format", "check_record", "encode",
           "load_examples", "split_records", "pack", "collate", "Batches", "eval_batches", "IGNORE", "FORMATS"]
