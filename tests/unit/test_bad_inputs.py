"""Bad inputs of every kind end in a UserError naming the file, the line and the field, never a traceback,
and leave the input as it was.

Each table row builds one faulty input in a temporary folder from a good one, calls the real reader,
and checks the message and that the input's bytes did not change. A few rows go through the real CLI.
"""

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import write_jsonl
from tunelab import adapters, cli, evaluate, models
from tunelab.config import LoraOptions, read_config_file
from tunelab.data.formats import quarantine, read_rows, scan_rows
from tunelab.errors import UserError

MODULE = "model.layers.0.self_attn.q_proj"
PEFT_NAME = f"{adapters.PEFT_PREFIX}{MODULE}"
RANK, IN, OUT = 2, 8, 6


def snapshot(path):
    """Every byte of a file, or of each file in a folder."""
    path = Path(path)
    if path.is_dir():
        return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes()


def raises_user_error(call, path):
    """Run `call`; return the UserError's text after checking it names `path` and left it unchanged."""
    before = snapshot(path)
    with pytest.raises(UserError) as e:
        call()
    assert snapshot(path) == before
    text = str(e.value)
    assert str(path) in text, text
    return text


# ---- adapter folders ---------------------------------------------------------------------------

def peft_tensors(a=None, b=None, magnitude=None, drop=()):
    tensors = {f"{PEFT_NAME}.lora_A.weight": np.ones((RANK, IN), np.float32) if a is None else a,
               f"{PEFT_NAME}.lora_B.weight": np.full((OUT, RANK), 0.5, np.float32) if b is None else b}
    if magnitude is not None:
        tensors[f"{PEFT_NAME}.lora_magnitude_vector"] = magnitude
    return {name: x for name, x in tensors.items() if not any(name.endswith(d) for d in drop)}


def write_adapter(folder, config=None, tensors=None, layout=adapters.PEFT_WEIGHTS):
    """A small adapter folder; `config` is a dict, or text / bytes written as they are."""
    folder.mkdir(exist_ok=True)
    config = {"r": RANK, "lora_alpha": 4.0 * RANK, "lora_dropout": 0.0} if config is None else config
    if isinstance(config, dict):
        config = json.dumps(config)
    (folder / adapters.CONFIG).write_bytes(config if isinstance(config, bytes) else config.encode())
    save_file(peft_tensors() if tensors is None else tensors, str(folder / layout))
    return folder


def with_config(**changes):
    config = {"r": RANK, "lora_alpha": 4.0 * RANK, "lora_dropout": 0.0, **changes}
    return lambda d: write_adapter(d, {k: v for k, v in config.items() if v is not ...})


def with_tensors(**kw):
    return lambda d: write_adapter(d, tensors=peft_tensors(**kw))


def truncated(d):
    write_adapter(d)
    data = (d / adapters.PEFT_WEIGHTS).read_bytes()
    (d / adapters.PEFT_WEIGHTS).write_bytes(data[:len(data) // 2])


def mlx_only(d, tensors):
    write_adapter(d, {"fine_tune_type": "lora", "lora_parameters": {"rank": RANK, "scale": 4.0}},
                  tensors=tensors, layout=adapters.MLX_WEIGHTS)


def hashes_from_another_save(d):
    write_adapter(d)
    config = json.loads((d / adapters.CONFIG).read_text())
    config["tunelab"] = {"files": {adapters.PEFT_WEIGHTS: hashlib.sha256(b"an older save").hexdigest()}}
    (d / adapters.CONFIG).write_text(json.dumps(config))


NAN_A = np.ones((RANK, IN), np.float32)
NAN_A[1, 3] = np.nan
DIVERGED = "holds NaN or infinite values: the run that wrote it diverged; use an earlier checkpoint"

ADAPTER_FAULTS = [
    ("zero-byte PEFT weights", lambda d: (write_adapter(d), (d / adapters.PEFT_WEIGHTS).write_bytes(b"")),
     f"{adapters.PEFT_WEIGHTS}: truncated or not a safetensors file"),
    ("truncated PEFT weights", truncated, f"{adapters.PEFT_WEIGHTS}: truncated or not a safetensors file"),
    ("zero-byte mlx-lm weights", lambda d: (mlx_only(d, {}), (d / adapters.MLX_WEIGHTS).write_bytes(b"")),
     f"{adapters.MLX_WEIGHTS}: truncated or not a safetensors file"),
    ("config not valid JSON", lambda d: write_adapter(d, '{"r": 2,\n "lora_alpha": }'),
     f"{adapters.CONFIG}:2: not valid JSON (Expecting value at column 16)"),
    ("config not an object", lambda d: write_adapter(d, "[2, 8.0]"),
     "expected a JSON object of adapter settings, got list"),
    ("config not UTF-8", lambda d: write_adapter(d, b'{"r": 2,\n"lora_alpha": 8, "base_model_name_or_path": "\xff"}'),
     f"{adapters.CONFIG}:2: not UTF-8 text (byte 0xff at byte offset 54)"),
    ("config nested too deeply", lambda d: write_adapter(d, "[" * 100_000), "nested too deeply"),
    ("r missing", with_config(r=...), "r: missing: add the LoRA rank, a whole number such as 8"),
    ("r zero", with_config(r=0), "r: expected a whole number of at least 1 (the LoRA rank), got 0"),
    ("r negative", with_config(r=-2), "r: expected a whole number of at least 1 (the LoRA rank), got -2"),
    ("r a string", with_config(r="2"), "r: expected a whole number of at least 1 (the LoRA rank), got '2'"),
    ("r a fraction", with_config(r=2.5), "got 2.5"),
    ("lora_alpha missing", with_config(lora_alpha=...), "lora_alpha: missing: add the LoRA scale times r"),
    ("lora_alpha not a number", with_config(lora_alpha="lots"), "lora_alpha: expected a number, got 'lots'"),
    ("lora_A without lora_B", with_tensors(drop=["lora_B.weight"]),
     f"{MODULE}: has lora_A.weight but not {PEFT_NAME}.lora_B.weight: the file is incomplete"),
    ("lora_B without lora_A", with_tensors(drop=["lora_A.weight"]),
     f"{MODULE}: has lora_B.weight but not {PEFT_NAME}.lora_A.weight"),
    ("DoRA without magnitude", with_config(use_dora=True), f"{MODULE}: has lora_A.weight, lora_B.weight but not "
     f"{PEFT_NAME}.lora_magnitude_vector (the DoRA magnitude)"),
    ("DoRA magnitude of the wrong length", lambda d: write_adapter(
        d, {"r": RANK, "lora_alpha": 4, "use_dora": True}, peft_tensors(magnitude=np.ones(OUT + 1, np.float32))),
     f"{PEFT_NAME}.lora_magnitude_vector (7,): expected (6,)"),
    ("A rows differ from B columns", with_tensors(b=np.ones((OUT, RANK + 1), np.float32)),
     "(2, 8) and " f"{PEFT_NAME}.lora_B.weight (6, 3): their ranks differ (2 and 3)"),
    ("rank differs from the config's r", with_config(r=4), "rank 2, but adapter_config.json says 4"),
    ("NaN in lora_A", with_tensors(a=NAN_A), f"{PEFT_NAME}.lora_A.weight: {DIVERGED}"),
    ("inf in mlx-lm lora_b", lambda d: mlx_only(d, {f"{MODULE}.lora_a": np.ones((IN, RANK), np.float32),
                                                   f"{MODULE}.lora_b": np.full((RANK, OUT), np.inf, np.float32)}),
     f"{adapters.MLX_WEIGHTS}: {MODULE}.lora_b: {DIVERGED}"),
    ("no tensors at all", lambda d: write_adapter(d, tensors={}), "no tensors at all"),
    ("tensor outside the decoder blocks", lambda d: write_adapter(d, tensors={
        f"{adapters.PEFT_PREFIX}lm_head.lora_A.weight": np.ones((RANK, IN), np.float32)}),
     "lm_head.lora_A.weight: expected a module inside the decoder blocks"),
    ("files from different saves", hashes_from_another_save,
     f"tunelab.files: {adapters.PEFT_WEIGHTS}: sha256 differs from the one recorded: the adapter files in "),
]


@pytest.mark.parametrize("make, message", [pytest.param(m, msg, id=name) for name, m, msg in ADAPTER_FAULTS])
def test_bad_adapter_folder(tmp_path, make, message):
    folder = tmp_path / "adapter"
    folder.mkdir()
    make(folder)
    text = raises_user_error(lambda: adapters.load(folder), folder)
    assert message in text, text
    assert "come from different saves" not in text or \
        f"run `tunelab lora --train --resume --adapter-path {folder}` with the run's options" in text


def test_good_adapter_folders_still_load(tmp_path):
    plain = write_adapter(tmp_path / "plain")
    spec, tensors = adapters.load(plain)
    assert spec.rank == RANK and spec.scale == 4.0 and spec.layers == [0]
    np.testing.assert_array_equal(tensors[MODULE][1], np.full((OUT, RANK), 0.5))
    hashed = write_adapter(tmp_path / "hashed")
    config = json.loads((hashed / adapters.CONFIG).read_text())
    digest = hashlib.sha256((hashed / adapters.PEFT_WEIGHTS).read_bytes()).hexdigest()
    config["tunelab"] = {"files": {adapters.PEFT_WEIGHTS: digest, adapters.MLX_WEIGHTS: "absent files are skipped"}}
    (hashed / adapters.CONFIG).write_text(json.dumps(config))
    assert adapters.load(hashed)[0].rank == RANK


def test_bfloat16_weights_are_read_as_float32(tmp_path):
    folder = write_adapter(tmp_path / "bf16")
    header = {f"{PEFT_NAME}.lora_A.weight": {"dtype": "BF16", "shape": [RANK, IN], "data_offsets": [0, 2 * RANK * IN]},
              f"{PEFT_NAME}.lora_B.weight": {"dtype": "F32", "shape": [OUT, RANK],
                                             "data_offsets": [2 * RANK * IN, 2 * RANK * IN + 4 * OUT * RANK]}}
    text = json.dumps(header).encode()
    a = np.full(RANK * IN, 0x3FC0, "<u2").tobytes()                     # bfloat16 1.5
    b = np.full(OUT * RANK, 0.5, "<f4").tobytes()
    (folder / adapters.PEFT_WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text + a + b)
    tensors = adapters.load(folder)[1]
    assert tensors[MODULE][0].dtype == np.float32 and (tensors[MODULE][0] == 1.5).all()


def test_check_finite_names_every_bad_tensor():
    good = np.zeros((2, 2), np.float32)
    with pytest.raises(UserError) as e:
        adapters.check_finite({"m1": (NAN_A, good), "m2": (good, np.full((2, 2), -np.inf)), "m3": (good, good)},
                              "run/adapters")
    assert str(e.value) == f"run/adapters: m1.lora_A, m2.lora_B: {DIVERGED}"
    adapters.check_finite({"x": good}, "fine")


# ---- data files ----------------------------------------------------------------------------------

DATA_FAULTS = [
    ("line not UTF-8", b'{"text": "a"}\n{"text": "\xff"}\n', ":2: not UTF-8 text (byte 0xff at byte offset 24 "
                                                                "of the file): save the file as UTF-8"),
    ("nested too deeply", b"[" * 100_000 + b"\n", ":1: nested too deeply to read"),
    ("line an array", b'[{"text": "a"}]\n', ":1: expected a JSON object, got an array: write one JSON object per line"),
    ("line a string", b'"text"\n', ":1: expected a JSON object, got a string"),
    ("empty file", b"", ": the file has no rows"),
    ("binary garbage", bytes(range(256)) * 4, ": a binary file, not JSON Lines text"),
    ("UTF-16 text", '{"text": "a"}\n'.encode("utf-16"), ": a binary file (UTF-16 text), not JSON Lines text"),
    ("high bytes only", bytes(range(128, 256)), ":1: not UTF-8 text (byte 0x80 at byte offset 0"),
]


@pytest.mark.parametrize("content, message", [pytest.param(c, m, id=name) for name, c, m in DATA_FAULTS])
def test_bad_data_file(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    assert f"{path}{message}" in raises_user_error(lambda: read_rows(path), path)


def test_data_file_that_is_a_folder(tmp_path):
    (tmp_path / "train.jsonl").mkdir()
    assert "is a folder, not a data file" in raises_user_error(lambda: read_rows(tmp_path / "train.jsonl"), tmp_path)


def test_skip_invalid_sets_a_line_that_is_not_utf8_aside(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "b"}\n')
    before = path.read_bytes()
    rows, fmt, problems = scan_rows(path)
    assert [line for line, _ in rows] == [1, 3] and fmt == "text"
    assert [line for line, _ in problems] == [2] and "not UTF-8" in problems[0][1]
    assert quarantine(path, problems, tmp_path / "rejected.jsonl") == 1
    rejected = json.loads((tmp_path / "rejected.jsonl").read_text())
    assert rejected["line"] == 2 and rejected["text"] == '{"text": "caf\\xe9"}'
    assert path.read_bytes() == before


# ---- config files --------------------------------------------------------------------------------

CONFIG_FAULTS = [
    ("not UTF-8", b"train: true\nmodel: \xff\n", ":2: not UTF-8 text (byte 0xff at byte offset 19): save the file "
                                                "as UTF-8"),
    ("a list", b"- train\n- test\n", ": expected a mapping of option names to values (`option: value` lines), "
                                     "got a list"),
    ("a scalar", b"train\n", ": expected a mapping of option names to values (`option: value` lines), "
                             "got a single value"),
    ("nested too deeply", b"[" * 100_000, ": nested too deeply to read"),
    ("not valid YAML", b"train: true\nbatch_size: [1\n", ":3: not valid YAML"),
    ("quoted number", b"learning_rate: '1e-5'\n", ": learning_rate: expected float, got '1e-5'"),
    ("not a finite number", b"learning_rate: .nan\n", ": learning_rate: expected finite float, got nan"),
    ("nested keys not a mapping", b"lora_parameters: 8\n", ": lora_parameters: expected a mapping of rank, scale"),
    ("a float for a count", b"iters: 1e3\n", ": iters: expected int, got 1000.0"),
]


@pytest.mark.parametrize("content, message", [pytest.param(c, m, id=name) for name, c, m in CONFIG_FAULTS])
def test_bad_config_file(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert f"{path}{message}" in raises_user_error(lambda: read_config_file(path, LoraOptions), path)


def test_config_file_that_is_a_folder(tmp_path):
    (tmp_path / "c.yaml").mkdir()
    assert "is a folder, not a config file" in raises_user_error(
        lambda: read_config_file(tmp_path / "c.yaml", LoraOptions), tmp_path)


def test_numbers_mlx_lm_reads_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nlora_parameters: {scale: 2e1, rank: 8}\n")
    assert read_config_file(path, LoraOptions) == {"learning_rate": 1e-5, "lora_scale": 20.0, "lora_rank": 8}


# ---- prediction files ----------------------------------------------------------------------------

def eval_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "SELECT 1"}]}
            for q in ("first?", "second?")]
    return evaluate.load_rows(write_jsonl(tmp_path / "data" / "test.jsonl", rows))[2]


PREDICTION_FAULTS = [
    ("not UTF-8", b'{"index": 0, "answer": "\xff"}\n', ":1: not UTF-8 text (byte 0xff"),
    ("not valid JSON", b'{"index": 0, "answer": }\n', ":1: not valid JSON"),
    ("not an object", b"3\n", ":1: expected a JSON object, got a number"),
    ("answer missing", b'{"index": 0}\n', ":1: answer: expected a string (the model's answer to the row), got nothing"),
    ("answer not a string", b'{"index": 0, "answer": ["x"]}\n', ':1: answer: expected a string (the model\'s '
                                                                'answer to the row), got ["x"]'),
    ("index out of range", b'{"index": 7, "answer": "x"}\n', ":1: index: expected a row number from 0 to 1, got 7"),
    ("index not an int", b'{"index": 0.5, "answer": "x"}\n', ":1: index: expected a row number from 0 to 1, got 0.5"),
    ("empty file", b"", ": no answers"),
]


@pytest.mark.parametrize("content, message", [pytest.param(c, m, id=name) for name, c, m in PREDICTION_FAULTS])
def test_bad_predictions_file(tmp_path, content, message):
    rows = eval_rows(tmp_path)
    path = tmp_path / "answers.jsonl"
    path.write_bytes(content)
    assert f"{path}{message}" in raises_user_error(lambda: evaluate.from_file(path, rows), path)


def test_predictions_file_that_is_a_folder(tmp_path):
    rows = eval_rows(tmp_path)
    (tmp_path / "answers.jsonl").mkdir()
    assert "is a folder, not a predictions file" in raises_user_error(
        lambda: evaluate.from_file(tmp_path / "answers.jsonl", rows), tmp_path)


# ---- prepare's source files ---------------------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("s.csv", b'question,answer,context\n"a\xff",b,c\n', "s.csv:2: not UTF-8 text"),
    ("s.jsonl", b'{"question": "a", "answer": "b", "context": "c"}\n{"question": "a\xff"}\n', "s.jsonl:2: not UTF-8"),
    ("s.json", b"[" * 100000, "nested too deeply"),
], ids=["csv not utf-8", "jsonl not utf-8", "json nested"])
def test_bad_prepare_source(tmp_path, name, content, message):
    from tunelab.config import PrepareOptions
    from tunelab.data.prepare import prepare

    path = tmp_path / name
    path.write_bytes(content)
    text = raises_user_error(lambda: prepare(PrepareOptions(source=str(path), out=str(tmp_path / "out")),
                                             log=lambda *_: None), path)
    assert message in text
    assert not (tmp_path / "out").exists()


# ---- GGUF model files ------------------------------------------------------------------------

def _gguf_header():
    """A GGUF file's first bytes as the gguf package writes them: magic, version 3, no tensors, no keys."""
    return b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (0).to_bytes(8, "little")


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF" + b"x" * 40, _gguf_header()[:18], b"\0" * 100],
                         ids=["empty", "magic only", "bad version", "cut in the header", "zeros"])
def test_bad_gguf_file(tmp_path, content, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    text = raises_user_error(lambda: models.resolve(str(path), log=lambda *_: None), path)
    assert "not a readable GGUF file" in text or "not a GGUF file" in text
    assert not list((tmp_path / "cache").rglob("config.json"))


# ---- the real CLI ----------------------------------------------------------------------------------

def run_cli(argv, capsys, path):
    """Run `tunelab argv` in-process; return stderr after checking the exit code, the file named, no traceback
    and `path` unchanged."""
    before = snapshot(path)
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(path) in err and "Traceback" not in err, err
    assert snapshot(path) == before
    return err


def test_cli_bad_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"- train\n")
    assert "tunelab lora: error: " in run_cli(["lora", "-c", path], capsys, path)


def test_cli_bad_predictions_and_bad_data(tmp_path, capsys):
    eval_rows(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(b'{"index": 0, "answer": "\xff"}\n')
    argv = ["eval", "--data", tmp_path / "data", "--no-base", "--predictions", answers, "--metric", "exact",
            "--run-dir", tmp_path / "run"]
    assert f"{answers}:1: not UTF-8 text" in run_cli(argv, capsys, answers)
    test = tmp_path / "data" / "test.jsonl"
    test.write_bytes(test.read_bytes() + b'{"text": "\xfe"}\n')
    answers.write_text('{"index": 0, "answer": "SELECT 1"}\n')
    assert f"{test}:3: not UTF-8 text" in run_cli(argv, capsys, test)
    assert not (tmp_path / "run").exists()


def test_cli_bad_adapter_folder(tmp_path, capsys):
    folder = tmp_path / "adapter"
    truncated(write_adapter(folder))
    argv = ["export", "--to", "gguf-lora", "--adapter-path", folder, "--out", tmp_path / "a.gguf"]
    assert "truncated or not a safetensors file" in run_cli(argv, capsys, folder)
    assert not (tmp_path / "a.gguf").exists()


def failing_stage(error):
    def stage(opts):
        raise error
    return stage


@pytest.mark.parametrize("code, hint", [
    (errno.ENOSPC, "No space left on device: free some space; nothing already saved was changed"),
    (errno.EACCES, "Permission denied: check its permissions"),
    (errno.EROFS, "Read-only file system: the file system is read-only"),
])
def test_cli_names_the_file_the_system_refused(tmp_path, capsys, monkeypatch, code, hint):
    from tunelab.data import prepare

    target = tmp_path / "out" / "train.jsonl"
    monkeypatch.setattr(prepare, "prepare", failing_stage(OSError(code, os.strerror(code), str(target))))
    assert cli.main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tunelab prepare: error: {target}: {hint}") and "Traceback" not in err, err


@pytest.mark.parametrize("error", [OSError(errno.EBADF, "Bad file descriptor"), ValueError("a bug")])
def test_cli_lets_a_bug_show_its_traceback(monkeypatch, error):
    from tunelab.data import prepare

    monkeypatch.setattr(prepare, "prepare", failing_stage(error))
    with pytest.raises(type(error)):
        cli.main(["prepare"])
