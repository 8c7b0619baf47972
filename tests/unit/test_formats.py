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
    assert f"{path}:3: messages[1].content: expected a string" == problems[2]
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
