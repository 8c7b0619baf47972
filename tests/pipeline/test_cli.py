"""The real CLI end to end on a tiny model, and its answers to bad input."""

import json
import subprocess
import sys

import pytest

from tests.conftest import write_jsonl
from tunelab.cli import main


def run_cli(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "tunelab", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_prepare_train_test_fuse_generate(tiny_llama, tmp_path):
    r = run_cli("prepare", "--out", "data", "--num-rows", "40", "--valid-rows", "5", "--test-rows", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("lora", "--train", "--test", "--model", tiny_llama, "--data", "data", "--iters", "12",
                "--batch-size", "2", "--num-layers", "1", "--mask-prompt", "--learning-rate", "1e-3",
                "--steps-per-report", "4", "--steps-per-eval", "6", "--save-every", "6", "--val-batches", "-1",
                "--adapter-path", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Test loss " in r.stdout and ", Test ppl " in r.stdout
    run = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapters.safetensors", "metrics.jsonl",
                 "tunelab_run.json"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train_loss" in m] == [4, 8, 12]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 6, 12]
    manifest = json.loads((run / "tunelab_run.json").read_text())
    assert manifest["chosen"]["device"] == "cpu" and "data/train.jsonl" in manifest["data"]

    r = run_cli("lora", "--test", "--model", tiny_llama, "--data", "data", "--adapter-path", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Test loss" in r.stdout

    r = run_cli("fuse", "--model", tiny_llama, "--adapter-path", "run", "--save-path", "fused", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["rope_theta"] == 10000.0
    assert (tmp_path / "fused" / "chat_template.jinja").is_file() or \
        "chat_template" in json.loads((tmp_path / "fused" / "tokenizer_config.json").read_text())

    r = run_cli("generate", "--model", "fused", "--prompt", "What is a?", "--max-tokens", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def error_of(capsys, *argv):
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_missing_data_folder(capsys, tiny_llama, tmp_path):
    err = error_of(capsys, "lora", "--train", "--model", tiny_llama, "--data", tmp_path / "nowhere")
    assert f"--data {tmp_path / 'nowhere'}: folder not found" in err


def test_malformed_json_line_names_file_and_line(capsys, tiny_llama, tmp_path):
    data = tmp_path / "data"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    write_jsonl(data / "valid.jsonl", [row])
    (data / "train.jsonl").write_text(json.dumps(row) + "\n{not json\n")
    err = error_of(capsys, "lora", "--train", "--model", tiny_llama, "--data", data, "--iters", "1",
                   "--adapter-path", tmp_path / "run")
    assert f"{data / 'train.jsonl'}:2: not valid JSON" in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_unknown_model(capsys, tmp_path):
    err = error_of(capsys, "generate", "--model", tmp_path / "no-such-model", "--prompt", "hi")
    assert "unknown model" in err
    err = error_of(capsys, "generate", "--model", tmp_path / "missing.gguf")
    assert "GGUF file not found" in err


def test_contradicting_flags_all_reported(capsys, tmp_path):
    err = error_of(capsys, "lora", "--iters", "0", "--num-layers", "0", "--data", tmp_path)
    assert "nothing to do" in err and "--iters: must be at least 1" in err and "--num-layers" in err


def test_test_without_adapter_is_an_error_not_a_silent_base_run(capsys, tiny_llama, tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": "x"}])
    err = error_of(capsys, "lora", "--test", "--model", tiny_llama, "--data", tmp_path,
                   "--adapter-path", tmp_path / "none")
    assert "no adapter there to test" in err


def test_fuse_failure_keeps_an_existing_folder(capsys, tiny_llama, tmp_path):
    keep = tmp_path / "fused"
    keep.mkdir()
    (keep / "model.safetensors").write_text("a good model")
    error_of(capsys, "fuse", "--model", tiny_llama, "--adapter-path", tmp_path / "none", "--save-path", keep)
    assert (keep / "model.safetensors").read_text() == "a good model"


def test_hub_id_resolves_from_the_local_hub_cache_offline(tiny_llama, tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub: here its cache, with HF_HUB_OFFLINE=1."""
    import shutil

    from tunelab import models
    from tunelab.errors import UserError

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert models.resolve("someone/tiny-llama") == repo / "snapshots" / commit
    with pytest.raises(UserError, match="could not get it from the Hugging Face hub or its local cache"):
        models.resolve("someone/not-cached")
