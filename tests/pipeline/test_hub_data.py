"""mlx-lm's Hugging Face data for lora (hf_dataset, --data <dataset id>), through the datasets library on
local files: the rows become a data folder in the run folder, in tunelab's formats."""

import json

import pytest

from tests.conftest import write_jsonl
from tunelab import runs
from tunelab.cli import main

pytest.importorskip("datasets")

ROWS = [{"question": f"What is a when b is {w}?", "sql": f"SELECT a FROM t WHERE b = '{w}'",
         "chat": [{"role": "user", "content": f"b is {w}"}, {"role": "assistant", "content": f"a for {w}"}],
         "body": f"a b {w}"} for w in ("x", "yy", "zzz", "w", "vv", "uuu", "t", "ss", "rrr", "q")]


@pytest.fixture
def source(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", ROWS)


def config(tmp_path, model, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {model}\ntrain: true\niters: 2\nbatch_size: 2\nnum_layers: 1\nsteps_per_eval: 2\n"
                    f"adapter_path: {tmp_path / 'run'}\n{text}")
    return path


@pytest.mark.parametrize("features, expected", [
    ("prompt_feature: question\n  completion_feature: sql", {"prompt", "completion"}),
    ("chat_feature: chat", {"messages"}),
    ("text_feature: body", {"text"}),
])
def test_hf_dataset_rows_are_written_as_a_data_folder_and_trained_on(tiny_llama, tmp_path, source, features,
                                                                       expected, capsys):
    path = config(tmp_path, tiny_llama, f"test: true\nhf_dataset:\n  path: json\n  config: {{data_files: {source}}}\n"
                                        f"  train_split: 'train[:6]'\n  valid_split: 'train[6:8]'\n"
                                        f"  test_split: 'train[8:]'\n  {features}\n")
    assert not main(["lora", "-c", str(path)])
    data = tmp_path / "run" / "data"
    counts = {split: len((data / f"{split}.jsonl").read_text().splitlines()) for split in ("train", "valid", "test")}
    assert counts == {"train": 6, "valid": 2, "test": 2}
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == expected
    assert runs.read_manifest(tmp_path / "run")["options"]["data"] == str(data)
    assert "Test loss" in capsys.readouterr().out


def test_several_hf_datasets_are_concatenated_and_a_resume_reuses_their_rows(tiny_llama, tmp_path, source):
    entry = (f"  - path: json\n    config: {{data_files: {source}}}\n    prompt_feature: question\n"
             f"    completion_feature: sql\n    train_split: 'train[:4]'\n    valid_split: 'train[4:5]'\n")
    path = config(tmp_path, tiny_llama, "hf_dataset:\n" + entry * 2)
    assert not main(["lora", "-c", str(path)])
    assert len((tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()) == 8
    before = (tmp_path / "run" / "data" / "train.jsonl").read_bytes()
    path.write_text(path.read_text().replace("iters: 2", "iters: 4"))
    assert main(["lora", "-c", str(path), "--resume"]) == 2     # other options: refused, the rows untouched
    assert (tmp_path / "run" / "data" / "train.jsonl").read_bytes() == before


def test_data_as_a_dataset_id_and_bad_hf_dataset_values(tiny_llama, tmp_path, monkeypatch, capsys):
    """--data owner/name loads that dataset's train, valid and test splits (here a local folder, as the hub
    is not reachable from the tests: the same load_dataset call)."""
    import datasets

    folder = tmp_path / "files"
    write_jsonl(folder / "train.jsonl", [{"prompt": r["question"], "completion": r["sql"]} for r in ROWS])
    write_jsonl(folder / "valid.jsonl", [{"prompt": r["question"], "completion": r["sql"]} for r in ROWS[:2]])
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split, **kw: calls.append((path, split)) or real(
        "json", data_files=str(folder / f"{split}.jsonl"), split="train"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert not main(["lora", "--train", "--model", str(tiny_llama), "--data", "owner/name", "--iters", "1",
                     "--num-layers", "1", "--batch-size", "2", "--adapter-path", "run"])
    assert calls == [("owner/name", "train"), ("owner/name", "valid")]
    assert main(["lora", "--train", "--model", str(tiny_llama), "--hf-dataset", '{"path": 3, "splitt": "x"}',
                 "--adapter-path", "run2"]) == 2
    err = capsys.readouterr().err
    assert "hf_dataset: splitt: unknown" in err and "hf_dataset.path: expected the dataset's id" in err
    assert not (tmp_path / "work" / "run2").exists()
