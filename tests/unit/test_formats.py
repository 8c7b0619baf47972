import json

import pytest

from tests.conftest import write_jsonl
from tunelab.data.formats import read_rows
from tunelab.errors import UserError

CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_reads_each_format(tmp_path):
    for rows, fmt in [([CHAT, CHAT], "chat"), ([{"prompt": "p", "completion": "c"}], "completions"),
                      ([{"text": "t"}], "text")]:
        got, name = read_rows(write_jsonl(tmp_path / f"{fmt}.jsonl", rows))
        assert name == fmt and got == rows


def test_every_bad_line_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}',
        '{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": 3}]}',
        '{"text": "switching format"}',
        '{"hello": 1}',
        '{"messages": [{"role": "user", "content": "q"}]}',
    ]) + "\n")
    with pytest.raises(UserError) as e:
        read_rows(path)
    problems = e.value.problems
    assert problems[0].startswith(f"{path}:2: not valid JSON")
    assert f"{path}:3: messages[0].role: 'robot' is not one of" in problems[1]
    assert f"{path}:3: messages[1].content: expected a string, got int" == problems[2]
    assert f"{path}:4: this row is text but earlier rows are chat" in problems[3]
    assert f"{path}:5: unknown row format" in problems[4]
    assert f"{path}:6: messages: the last message must be the assistant's answer" == problems[5]
    assert len(problems) == 6


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="has no rows"):
        read_rows(tmp_path / "empty.jsonl")


def user(text="q"):
    return {"role": "user", "content": text}


def assistant(text="a"):
    return {"role": "assistant", "content": text}


CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


# One bad row per message: (row, the field and what the message says).
BAD_ROWS = [
    ({"messages": "hi"}, "messages: expected a non-empty list"),
    ({"messages": []}, "messages: expected a non-empty list"),
    ({"messages": ["hi", assistant()]}, "messages[0]: expected an object with role and content"),
    ({"messages": [{"role": "robot", "content": "q"}, assistant()]}, "messages[0].role: 'robot' is not one of"),
    ({"messages": [{"role": "user"}, assistant()]}, "messages[0].content: missing"),
    ({"messages": [user(""), assistant()]}, "messages[0].content: empty: remove the message or give it text"),
    ({"messages": [user(), assistant(" ")]}, "messages[1].content: empty"),
    ({"messages": [user(), {"role": "assistant", "content": ["a"]}]}, "messages[1].content: expected a string, got list"),
    ({"messages": [user(), assistant(), assistant()]}, "messages[2].role: assistant cannot follow assistant"),
    ({"messages": [assistant()]}, "messages[0].role: assistant cannot follow the start"),
    ({"messages": [user(), {"role": "system", "content": "s"}, assistant()]},
     "messages[1].role: system cannot follow user"),
    ({"messages": [user(), assistant(), {"role": "tool", "content": "1"}, assistant()]},
     "messages[2].role: tool result without a tool call"),
    ({"messages": [user()]}, "messages: the last message must be the assistant's answer"),
    ({"messages": [user(), CALL, {"role": "tool", "content": "1"}, assistant()]},
     "tools: missing: a row with tool calls needs the list of tools"),
    ({"tools": [], "messages": [user(), assistant()]}, "tools: expected a non-empty list"),
    ({"tools": [{"type": "function", "function": {}}], "messages": [user(), assistant()]},
     "tools[0].function.name: expected the tool's name"),
    ({"tools": TOOLS, "messages": [user(), {"role": "assistant", "tool_calls": []}]},
     "messages[1].tool_calls: expected a non-empty list"),
    ({"tools": TOOLS, "messages": [user(), {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     "messages[1].tool_calls[0].function.name: expected the called function's name"),
    ({"tools": TOOLS, "messages": [user(), {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": 3}}]}]}, "messages[1].tool_calls[0].function.arguments: expected an object"),
    ({"prompt": "p"}, "completion: missing"),
    ({"prompt": 1, "completion": "c"}, "prompt: expected a string, got int"),
    ({"prompt": "p", "completion": ""}, "completion: empty: there is nothing to train on"),
    ({"text": ""}, "text: expected a non-empty string"),
    ({"hello": 1}, "unknown row format: expected a 'messages'"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in
                                                         enumerate(BAD_ROWS)])
def test_each_bad_row_gets_its_message_with_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT if "messages" in row or "tools" in row else row, row])
    with pytest.raises(UserError) as e:
        read_rows(path)
    assert any(p.startswith(f"{path}:2: {message}") for p in e.value.problems), e.value.problems


def test_tools_rows_and_chat_rows_share_a_file(tmp_path):
    tools_row = {"tools": TOOLS, "messages": [user(), CALL, {"role": "tool", "content": "1"}, assistant()]}
    rows, fmt = read_rows(write_jsonl(tmp_path / "t.jsonl", [CHAT, tools_row]))
    assert fmt == "tools" and rows[1] == tools_row
    with pytest.raises(UserError, match=":2: this row is text but earlier rows are tools"):
        read_rows(write_jsonl(tmp_path / "m.jsonl", [tools_row, {"text": "x"}]))


def test_line_breaks_inside_strings_do_not_split_rows(tmp_path):
    """JSON Lines ends lines at \\n only; \\x85 and \\u2028 are text (str.splitlines would split there)."""
    row = {"messages": [user("a\x85b\u2028c"), assistant("d\u2029e")]}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_rows(path)[0] == [row]
