import pytest

from tunelab.data.batching import collate, common_start, eval_batches, training_batches
from tunelab.data.templates import encode_row, encode_rows
from tunelab.errors import UserError

ROW = {"messages": [{"role": "system", "content": "SCHEMA: CREATE TABLE t (a INTEGER)"},
                    {"role": "user", "content": "What is a?"},
                    {"role": "assistant", "content": "SELECT a FROM t"}]}


def test_mask_prompt_supervises_exactly_the_answer_and_its_end_of_turn(tiny_tokenizer):
    ex = encode_row(tiny_tokenizer, ROW, "chat", mask_prompt=True)
    answer = tiny_tokenizer.encode("SELECT a FROM t", add_special_tokens=False)
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ex.supervised.sum() == len(answer) + 1
    assert ex.tokens[ex.supervised].tolist() == answer + [eot]
    # the supervised tokens are the last ones: nothing after the end-of-turn token
    assert ex.supervised[-(len(answer) + 1):].all() and ex.tokens[-1] == eot


def test_without_mask_every_token_after_the_first_is_supervised(tiny_tokenizer):
    ex = encode_row(tiny_tokenizer, ROW, "chat", mask_prompt=False)
    assert not ex.supervised[0] and ex.supervised[1:].all()


def test_completions_render_as_a_chat_turn(tiny_tokenizer):
    ex = encode_row(tiny_tokenizer, {"prompt": "What is a?", "completion": "SELECT a FROM t"},
                    "completions", mask_prompt=True)
    text = tiny_tokenizer.decode(ex.tokens[ex.supervised].tolist())
    assert text == "SELECT a FROM t<|im_end|>"


def test_long_rows_are_truncated_keeping_the_answer_or_dropped_and_counted(tiny_tokenizer):
    full = encode_row(tiny_tokenizer, ROW, "chat", mask_prompt=True)
    limit = len(full.tokens) - 3
    examples, report = encode_rows(tiny_tokenizer, [ROW, ROW], "chat", True, limit, "f.jsonl")
    assert report.truncated == 2 and len(examples[0].tokens) == limit
    # the window ends where the answer ends: every answer token but none of the first 3 prompt tokens
    assert examples[0].tokens.tolist() == full.tokens[3:].tolist()
    assert examples[0].supervised.sum() == full.supervised.sum()
    examples, report = encode_rows(tiny_tokenizer, [ROW], "chat", True, limit, "f.jsonl", long_rows="drop")
    assert examples == [] and report.dropped == 1
    short = encode_rows(tiny_tokenizer, [ROW], "chat", True, len(full.tokens), "f.jsonl")[1]
    assert short.truncated == short.dropped == 0


def test_no_chat_template_is_a_clear_error(tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        encode_row(plain, ROW, "chat", mask_prompt=True)


def test_batches_pad_without_supervising_padding(tiny_tokenizer):
    rows = [ROW, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "SELECT 1"}]}]
    examples = [encode_row(tiny_tokenizer, r, "chat", True) for r in rows]
    batch = collate(examples)
    assert batch.supervised.sum() == sum(ex.supervised.sum() for ex in examples)
    for i, ex in enumerate(examples):
        assert not batch.supervised[i, len(ex.tokens):].any()
        assert batch.attention_mask[i].sum() == len(ex.tokens)
    assert sum(b.tokens.shape[0] for b in eval_batches(examples * 3, 4)) == 6
    stream = training_batches(examples * 3, 2, seed=0)
    assert sum(next(stream).tokens.shape[0] for _ in range(6)) == 12


def test_common_start_counts_the_tokens_every_example_begins_with(tiny_tokenizer):
    rows = [dict(ROW, messages=[dict(ROW["messages"][0])] + ROW["messages"][1:]) for _ in range(3)]
    rows[1]["messages"][-1] = {"role": "assistant", "content": "SELECT 2"}
    rows[2]["messages"][0]["content"] += " and more"
    examples = [encode_row(tiny_tokenizer, r, "chat", True) for r in rows]
    tokens = [ex.tokens for ex in examples]
    system = tiny_tokenizer.apply_chat_template(rows[0]["messages"][:1], tokenize=False)
    assert 0 < common_start(tokens) <= len(tiny_tokenizer(system)["input_ids"])
    assert common_start(tokens[:2]) > common_start(tokens)
    assert common_start(tokens[:1]) == len(examples[0].tokens)
    assert all((ex.tokens[:common_start(tokens)] == examples[0].tokens[:common_start(tokens)]).all()
               for ex in examples)
    assert len({int(ex.tokens[common_start(tokens)]) for ex in examples
                if len(ex.tokens) > common_start(tokens)}) > 1
