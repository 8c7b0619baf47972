"""Loss masks of multi-turn and tools rows, checked token by token against the rendered template."""

import copy
import json

import numpy as np
import pytest

from tests.conftest import MULTI_TURN, TOOLS_ROW, TOOLS_TEMPLATE
from tunelab.data.templates import check_renders_tools, encode_row, encode_rows
from tunelab.errors import UserError


def runs(ex):
    """The supervised tokens as contiguous runs [(start, end)]."""
    edges = np.diff(np.concatenate([[0], ex.supervised.astype(int), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def assistant_texts(messages):
    out = []
    for m in messages:
        if m["role"] == "assistant":
            calls = "".join(f"<tool_call>{json.dumps(c['function'])}</tool_call>" for c in m.get("tool_calls", []))
            out.append((m.get("content") or "") + calls + "<|im_end|>")
    return out


def check_masks(tokenizer, row, fmt, train_on="all"):
    ex = encode_row(tokenizer, row, fmt, mask_prompt=True, train_on=train_on)
    tools = row.get("tools")
    rendered = tokenizer.apply_chat_template(row["messages"], tools=tools, tokenize=False)
    expected = assistant_texts(row["messages"])
    expected = expected if train_on == "all" else expected[-1:]
    spans = runs(ex)
    # one run per trained assistant turn, each exactly that turn's text and its end-of-turn token
    assert [tokenizer.decode(ex.tokens[a:b].tolist()) for a, b in spans] == expected
    # the tokens are the template's rendering, cut after the last answer's end-of-turn token
    assert tokenizer.decode(ex.tokens.tolist()) == rendered[:rendered.rindex("<|im_end|>") + len("<|im_end|>")]
    return ex


def test_every_assistant_turn_of_a_multi_turn_row_is_trained(tiny_tokenizer):
    ex = check_masks(tiny_tokenizer, MULTI_TURN, "chat")
    last = check_masks(tiny_tokenizer, MULTI_TURN, "chat", train_on="last")
    assert len(runs(ex)) == 2 and len(runs(last)) == 1
    assert ex.supervised.sum() > last.supervised.sum()


def test_tools_row_masks_the_tool_call_and_the_final_answer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TOOLS_TEMPLATE
    ex = check_masks(tokenizer, TOOLS_ROW, "tools")
    text = tokenizer.decode(ex.tokens[~ex.supervised].tolist())
    assert "run_sql" in text and "<tool_response>[[42]]</tool_response>" in text   # tool list and result: context


def test_a_template_without_tools_is_refused_for_tools_rows(tiny_tokenizer):
    with pytest.raises(UserError, match="train tools rows on a model whose template supports tools"):
        check_renders_tools(tiny_tokenizer)
    with pytest.raises(UserError, match="train tools rows on a model whose template supports tools"):
        encode_rows(tiny_tokenizer, [TOOLS_ROW], "tools", True, 512, "t.jsonl")


def test_a_template_that_rewrites_earlier_turns_is_masked_from_offsets(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # The system line counts the messages, so no partial conversation renders as a prefix of the whole.
    tokenizer.chat_template = (
        "<|im_start|>system\nturns: {{ messages | length }}<|im_end|>\n{% for m in messages %}"
        "{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    notes = set()
    ex = encode_row(tokenizer, MULTI_TURN, "chat", mask_prompt=True, notes=notes)
    assert any("rendered offsets" in n for n in notes)
    assert [tokenizer.decode(ex.tokens[a:b].tolist()) for a, b in runs(ex)] == [
        "SELECT a FROM t<|im_end|>", "SELECT b FROM t WHERE a = 3<|im_end|>"]


def test_exactly_one_bos(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.chat_template = "{{ bos_token }}" + tiny_tokenizer.chat_template
    ex = encode_row(tokenizer, MULTI_TURN, "chat", mask_prompt=True)
    bos = tokenizer.bos_token_id
    assert ex.tokens[0] == bos and ex.tokens[1] != bos
    for doubled in ("{{ bos_token }}{{ bos_token }}", "{{ bos_token }}{{ bos_token }}{{ bos_token }}"):
        tokenizer.chat_template = doubled + tiny_tokenizer.chat_template
        again = encode_row(tokenizer, MULTI_TURN, "chat", mask_prompt=True)
        assert again.tokens.tolist() == ex.tokens.tolist() and again.supervised.tolist() == ex.supervised.tolist()
    text = encode_row(tokenizer, {"text": "<|endoftext|>SELECT a"}, "text", mask_prompt=False)
    assert text.tokens[0] == bos and text.tokens[1] != bos
