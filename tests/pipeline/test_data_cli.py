"""`tunelab data check` and the data options of `lora`, through the real CLI on a tiny model."""

import json

from tests.conftest import MULTI_TURN, write_jsonl
from tests.pipeline.test_cli import error_of, run_cli


def test_data_check_reports_each_split_and_marks_the_supervised_tokens(tiny_llama, tmp_path):
    r = run_cli("prepare", "--out", "data", "--num-rows", "40", "--valid-rows", "5", "--test-rows", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("data", "check", "--data", "data", "--model", tiny_llama, "--mask-prompt", "--max-seq-length", "100",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for split, rows in (("train", 30), ("valid", 5), ("test", 5)):
        assert f"data/{split}.jsonl: {rows} rows, format chat" in r.stdout
    assert "tokens per row: min" in r.stdout and "supervised: " in r.stdout and "#" in r.stdout
    assert "longer than --max-seq-length 100:" in r.stdout and "Duplicates and leakage: none" in r.stdout
    first = json.loads((tmp_path / "data" / "train.jsonl").read_text().split("\n")[0])
    assert f"[[{first['messages'][-1]['content']}<|im_end|>]]" in r.stdout


def test_lora_counts_and_drops_long_rows_and_trains_every_turn(tiny_llama, tmp_path):
    data = tmp_path / "data"
    short = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "SELECT a FROM t"}]}
    long = {"messages": [{"role": "user", "content": "What is a? " * 40}, {"role": "assistant", "content": "SELECT 1"}]}
    write_jsonl(data / "train.jsonl", [short, MULTI_TURN, long])
    write_jsonl(data / "valid.jsonl", [short])
    common = ["lora", "--train", "--model", tiny_llama, "--data", data, "--iters", "2", "--batch-size", "1",
              "--num-layers", "1", "--mask-prompt", "--max-seq-length", "120"]
    r = run_cli(*common, "--adapter-path", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train.jsonl: truncated 1 of 3 rows longer than --max-seq-length 120" in r.stdout
    r = run_cli(*common, "--adapter-path", tmp_path / "run2", "--long-rows", "drop", "--train-on", "last", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train.jsonl: dropped 1 of 3 rows" in r.stdout


def test_a_model_without_chat_template_gets_a_suggestion_and_the_flag_works(tiny_llama, tmp_path, capsys):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "data"
    row = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "SELECT a FROM t"}]}
    write_jsonl(data / "train.jsonl", [row])
    write_jsonl(data / "valid.jsonl", [row])
    common = ["lora", "--train", "--model", plain, "--data", data, "--iters", "1", "--batch-size", "1",
              "--num-layers", "1", "--adapter-path", tmp_path / "run"]
    err = error_of(capsys, *common)
    assert f"{data / 'train.jsonl'}: the model's tokenizer has no chat template" in err
    assert err.count("no chat template") == 1
    assert "--chat-template chatml" in err
    r = run_cli(*common, "--chat-template", "chatml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_lora_skip_invalid_sets_bad_lines_aside(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data"
    good = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "SELECT a FROM t"}]}
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join([json.dumps(good), "{broken", json.dumps({"messages": [
        {"role": "user", "content": "a?"}]}), json.dumps(good)]) + "\n")
    write_jsonl(data / "valid.jsonl", [good])
    common = ["lora", "--train", "--model", tiny_llama, "--data", data, "--iters", "1", "--batch-size", "1",
              "--num-layers", "1", "--adapter-path", tmp_path / "run"]
    err = error_of(capsys, *common)
    assert ":2: not valid JSON" in err and ":3: messages: the last message must be the assistant's answer" in err
    r = run_cli(*common, "--skip-invalid", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train.jsonl: skipped 2 invalid rows" in r.stdout
    rejected = [json.loads(line) for line in (tmp_path / "run" / "rejected-train.jsonl").read_text().split("\n") if line]
    assert [r["line"] for r in rejected] == [2, 3] and rejected[0]["text"] == "{broken"
