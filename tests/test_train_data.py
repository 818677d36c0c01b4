"""lorakit.train.data: JSONL formats, exact loss masks, truncation, packing, batching, errors with line numbers."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny_lm import tiny_tokenizer, write_jsonl
from lorakit.train.data import (IGNORE, Batches, DataError, Example, collate, detect_format, encode, load_examples,
                                pack, read_jsonl, split_records)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, ex: Example) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    runs, cur = [], []
    for i, y in zip(ex.input_ids, ex.labels):
        if y != IGNORE:
            assert y == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


# ------------------------------------------------------------------------------ formats and masks
def test_text_trains_on_every_token_and_ends_with_eos(tok):
    ex = encode({"text": "the quick brown fox"}, "text", tok)
    assert ex.input_ids == ids(tok, "the quick brown fox") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_prompt_completion_masks_the_prompt_exactly(tok):
    ex = encode({"prompt": "Translate to SQL:", "completion": " SELECT name"}, "prompt_completion", tok)
    p, c = ids(tok, "Translate to SQL:"), ids(tok, " SELECT name")
    assert ex.input_ids == p + c + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(p) + c + [tok.eos_token_id]


def test_alpaca_masks_the_template_and_instruction(tok):
    rec = {"instruction": "Count", "input": "Sales", "output": "42"}
    ex = encode(rec, "alpaca", tok)
    assert trained_text(tok, ex) == ["42<|im_end|>"]
    prompt = tok.decode([i for i, y in zip(ex.input_ids, ex.labels) if y == IGNORE])
    assert "### Instruction:\nCount" in prompt and "### Input:\nSales" in prompt and prompt.endswith("### Response:\n")
    no_input = encode({"instruction": "Count", "output": "42"}, "alpaca", tok)
    assert "### Input" not in tok.decode(no_input.input_ids)


def test_messages_train_on_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many?"},
            {"role": "assistant", "content": "SELECT 1"}, {"role": "user", "content": "And Sales?"},
            {"role": "assistant", "content": "SELECT 2"}]
    ex = encode({"messages": msgs}, "messages", tok)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    assert trained_text(tok, ex) == ["SELECT 1<|im_end|>", "SELECT 2<|im_end|>"]
    # the prompt part is exactly what generation is given: the rendered prefix, tokenized alone
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    first = ex.labels.index(next(y for y in ex.labels if y != IGNORE))
    assert ex.input_ids[:first] == ids(tok, prompt)


def test_messages_need_a_chat_template_and_an_assistant_turn(tok):
    plain = tiny_tokenizer(chat_template=False)
    with pytest.raises(DataError, match="chat template"):
        encode({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
               "messages", plain, "f.jsonl:3")
    with pytest.raises(DataError, match="f.jsonl:4: no assistant"):
        encode({"messages": [{"role": "user", "content": "a"}]}, "messages", tok, "f.jsonl:4")
    with pytest.raises(DataError, match=r"messages\[1\]"):
        encode({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, "messages", tok)


def test_template_that_rewrites_history_is_refused(tok):
    import copy
    t = copy.deepcopy(tok)
    # renders earlier assistant turns differently once the conversation goes on
    t.chat_template = ("{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }}"
                       "{% else %}X{% endif %}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(DataError, match="prefixes"):
        encode({"messages": msgs}, "messages", t, "x.jsonl:1")


def test_detect_format():
    assert detect_format({"text": "a"}) == "text"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format({"question": "a"}, "d.jsonl:7")


# ------------------------------------------------------------------------------ bad files name the line
def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(p)


def test_non_object_and_wrong_types_name_the_line(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a JSON object"):
        read_jsonl(p)
    write_jsonl(p, [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: 'completion' must be a string"):
        load_examples(p, tok)
    write_jsonl(p, [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: prompt_completion record needs key 'completion'"):
        load_examples(p, tok)


def test_missing_and_empty_files(tmp_path, tok):
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        read_jsonl(tmp_path / "e.jsonl")


# ------------------------------------------------------------------------------ lengths
def test_truncation_right_and_drop(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " the quick brown fox jumps"},
                                           {"prompt": "a", "completion": " b"}])
    full, _ = load_examples(p, tok, max_length=100)
    cut, stats = load_examples(p, tok, max_length=5)
    assert stats.truncated == 1 and stats.dropped == 0
    assert cut[0].input_ids == full[0].input_ids[:5] and cut[0].labels == full[0].labels[:5]
    kept, stats = load_examples(p, tok, max_length=5, truncation="drop")
    assert stats.dropped == 1 and [e.input_ids for e in kept] == [full[1].input_ids]


def test_examples_without_trained_tokens_are_dropped(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the quick brown fox", "completion": " x"},
                                           {"prompt": "a", "completion": " b"}])
    n_prompt = len(ids(tok, "the quick brown fox"))
    kept, stats = load_examples(p, tok, max_length=n_prompt)
    assert stats.dropped == 1 and len(kept) == 1
    with pytest.raises(DataError, match="no usable example"):
        load_examples(p, tok, max_length=1)


# ------------------------------------------------------------------------------ batches
def test_collate_pads_right_with_ignored_labels():
    a, b = Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packing_restarts_positions_and_never_splits_an_example():
    exs = [Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5], [4, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])]
    blocks = pack(exs, max_length=6)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert blocks[0].positions == [0, 1, 2, 0, 1]
    assert blocks[0].labels == [IGNORE, 2, 3, 4, 5]
    batch = collate(blocks, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]


def test_packed_examples_do_not_attend_to_each_other(tok):
    """Without a cache (as in training) transformers reads restarting position ids as separate
    sequences: the second example's logits are the same as when it runs alone."""
    from _tiny_lm import tiny_causal_lm
    model = tiny_causal_lm(len(tok))
    a, b = Example([10, 11, 12], [10, 11, 12]), Example([13, 14], [13, 14])
    packed = collate(pack([a, b], 8), 0)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([[13, 14]])).logits
    torch.testing.assert_close(together[0, 3:5], alone[0], rtol=1e-5, atol=1e-5)


def test_batches_are_seeded_and_resume_from_their_state():
    exs = [Example([i, i + 1], [i, i + 1]) for i in range(10)]
    a = Batches(exs, 3, seed=7, pad_id=0)
    seq = [a.next()["input_ids"].tolist() for _ in range(7)]      # crosses an epoch (3 batches each)
    b = Batches(exs, 3, seed=7, pad_id=0)
    for _ in range(4):
        b.next()
    c = Batches(exs, 3, seed=7, pad_id=0)
    c.load_state(b.state())
    assert [c.next()["input_ids"].tolist() for _ in range(3)] == seq[4:]
    assert Batches(exs, 3, seed=8, pad_id=0).next()["input_ids"].tolist() != seq[0]
    with pytest.raises(DataError, match="same data and seed"):
        Batches(exs[:5], 3, seed=7, pad_id=0).load_state(b.state())


def test_ranks_take_disjoint_batches():
    exs = [Example([i], [i]) for i in range(12)]
    r0, r1 = Batches(exs, 2, 0, 0, rank=0, world_size=2), Batches(exs, 2, 0, 0, rank=1, world_size=2)
    seen0 = {x for _ in range(3) for x in r0.next()["input_ids"].flatten().tolist()}
    seen1 = {x for _ in range(3) for x in r1.next()["input_ids"].flatten().tolist()}
    assert not seen0 & seen1 and len(seen0 | seen1) == 12


def test_split_records_is_seeded_and_disjoint():
    recs = [(i, {"text": str(i)}) for i in range(1, 41)]
    tr, va = split_records(recs, 0.1, seed=3)
    assert len(va) == 4 and len(tr) == 36 and not {r[0] for r in tr} & {r[0] for r in va}
    assert split_records(recs, 0.1, seed=3) == (tr, va)
    assert split_records(recs, 0.0, seed=3) == (recs, [])


def test_load_examples_auto_detects_per_file(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": "i", "output": str(k)}) for k in range(3)))
    exs, stats = load_examples(p, tok)
    assert stats.format == "alpaca" and stats.examples == 3 and exs[2].source.endswith("d.jsonl:3")
