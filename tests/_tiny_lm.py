"""A tiny causal LM and tokenizer built in the test (never downloaded), for the training and CLI tests.

The tokenizer is a byte-level BPE trained in a few milliseconds on a small corpus, wrapped in
PreTrainedTokenizerFast with a ChatML chat template (as SmolLM2 / Qwen use); the model is a
2-layer Llama whose vocabulary matches it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "SELECT name FROM employees WHERE dept = 'Sales' AND age > 30",
    "How many employees work in Sales? List the names of orders. user assistant system",
    "the quick brown fox jumps over the lazy dog 0123456789 {\"a\": 1, \"b\": [2, 3]}",
    "Translate to SQL: what is the average salary in Berlin? Answer: yes no maybe",
]


def tiny_tokenizer(chat_template: bool = True, bos: bool = False):
    """``bos``: the tokenizer puts <|endoftext|> before every text it encodes (as Llama's adds <s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                           special_tokens=[("<|endoftext|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
                                   pad_token="<pad>", bos_token="<|endoftext|>" if bos else None)
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_causal_lm(vocab: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=2, pad_token_id=3, bos_token_id=None,
                      initializer_range=0.3)   # large enough that a frozen random head can express a fit
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama + tokenizer saved as a Hugging Face model folder."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm(len(tok), seed)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sql_records(n: int, seed: int = 0) -> list[dict]:
    """A toy prompt/completion task the tiny model can learn a little of in a few steps."""
    g = torch.Generator().manual_seed(seed)
    depts = ["Sales", "HR", "IT", "Ops"]
    out = []
    for i in range(n):
        d = depts[int(torch.randint(0, len(depts), (1,), generator=g))]
        a = int(torch.randint(20, 60, (1,), generator=g))
        out.append({"prompt": f"How many employees work in {d} over {a}? SQL:",
                    "completion": f" SELECT COUNT(*) FROM employees WHERE dept = '{d}' AND age > {a}"})
    return out
