"""Untrusted inputs are refused with a UserError before anything loads them: model folders that need custom
code, damaged weight files and configs, missing shards, and LM Studio names that would leave its folder."""

import ast
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import tunelab
from tunelab import models
from tunelab.errors import UserError
from tunelab.export import places

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10}


def model_folder(root, config=None, weights=("model.safetensors",)):
    """A folder with config.json and small but well-formed safetensors files."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    for name in weights:
        save_file({"model.norm.weight": np.ones(8, np.float32), "lm_head.weight": np.zeros((10, 8), np.float32)},
                  str(root / name))
    return root


def test_a_sound_folder_resolves(tmp_path):
    folder = model_folder(tmp_path / "m")
    assert models.resolve(str(folder)) == folder
    assert models.weight_shapes(folder) == {"model.norm.weight": (8,), "lm_head.weight": (10, 8)}


# ---- custom code ----------------------------------------------------------------------------------

AUTO_MAP = {"AutoConfig": "configuration_mylm.MyLMConfig", "AutoModelForCausalLM": "modeling_mylm.MyLMForCausalLM"}


def test_a_model_that_needs_its_own_code_is_refused_before_loading(tmp_path):
    folder = model_folder(tmp_path / "custom", {**LLAMA_CONFIG, "model_type": "mylm", "auto_map": AUTO_MAP})
    (folder / "modeling_mylm.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(UserError) as e:
        models.resolve(str(folder))
    assert str(e.value) == (f"{folder}/config.json: auto_map: this model needs its own Python code, which tunelab "
                            "never runs; use a model of a supported architecture")


def test_auto_map_beside_an_architecture_transformers_has_is_accepted(tmp_path):
    folder = model_folder(tmp_path / "m", {**LLAMA_CONFIG, "auto_map": AUTO_MAP})
    assert models.resolve(str(folder)) == folder


def test_a_tokenizer_that_needs_its_own_code_is_refused(tmp_path):
    folder = model_folder(tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "MyLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_mylm.MyLMTokenizer", None]}}))
    with pytest.raises(UserError, match=r"tokenizer_config.json: auto_map: this model needs its own Python code"):
        models.resolve(str(folder))


LOADERS = ("from_pretrained", "from_config")
AUTO_CLASSES = ("AutoConfig", "AutoTokenizer", "AutoModel", "AutoModelForCausalLM", "AutoProcessor")


def _untrusting_calls(path):
    """Lines of calls to transformers' Auto* loaders in `path` that do not pass trust_remote_code=False."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADERS
                and isinstance(node.func.value, ast.Name) and node.func.value.id in AUTO_CLASSES):
            continue
        given = {k.arg: k.value for k in node.keywords}
        value = given.get("trust_remote_code")
        if not (isinstance(value, ast.Constant) and value.value is False):
            lines.append(node.lineno)
    return lines


SOURCES = sorted(Path(tunelab.__file__).parent.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(Path(tunelab.__file__).parent)) for p in SOURCES])
def test_every_transformers_load_says_trust_remote_code_false(path):
    assert _untrusting_calls(path) == []


# ---- damaged weights and configs -------------------------------------------------------------------

def test_a_truncated_weight_file_is_named_with_its_size(tmp_path):
    folder = model_folder(tmp_path / "m")
    weights = folder / "model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[:-7])
    with pytest.raises(UserError) as e:
        models.resolve(str(folder))
    assert str(e.value) == (f"{weights}: truncated or not a safetensors file: {len(full) - 7} bytes, "
                            f"expected at least {len(full)}")


@pytest.mark.parametrize("content, detail", [
    (b"", "0 bytes, expected at least 8"),
    (b"\x10\x00\x00", "3 bytes, expected at least 8"),
    (b"<html>not found</html>\n", r"23 bytes, expected at least \d+"),
    (struct.pack("<Q", 6) + b"{{{{{{", r"its header is not JSON"),
    (struct.pack("<Q", 2) + b"[]", "its header is not a JSON object"),
    (struct.pack("<Q", 19) + b'{"w": {"shape": 1}}', "tensor 'w' has no valid shape and data_offsets"),
])
def test_an_empty_or_garbled_weight_file_is_named(tmp_path, content, detail):
    folder = model_folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(UserError, match=rf"model.safetensors: truncated or not a safetensors file: {detail}"):
        models.resolve(str(folder))


def test_invalid_json_in_config_is_named_by_line_and_column(tmp_path):
    folder = model_folder(tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }\n')
    with pytest.raises(UserError) as e:
        models.resolve(str(folder))
    assert str(e.value) == f"{folder}/config.json:2:18: invalid JSON: Expecting value"


def test_a_missing_config_is_named(tmp_path):
    folder = model_folder(tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json: not a Hugging Face model folder"):
        models.resolve(str(folder))


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    folder = model_folder(tmp_path / "m", weights=shards[:1])
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": shards[0],
                                                                "lm_head.weight": shards[1]}}))
    with pytest.raises(UserError) as e:
        models.resolve(str(folder))
    assert str(e.value) == f"{index}: names shard files that are missing: {shards[1]}"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(UserError, match="shard names must be plain file names beside it: ../elsewhere.safetensors"):
        models.resolve(str(folder))


def test_every_problem_of_a_folder_is_reported_at_once(tmp_path):
    folder = model_folder(tmp_path / "m", weights=("a.safetensors", "b.safetensors"))
    (folder / "a.safetensors").write_bytes(b"")
    (folder / "b.safetensors").write_bytes(b"garbage!garbage!")
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(UserError) as e:
        models.resolve(str(folder))
    assert [p.split(": ")[0] for p in e.value.problems] == [
        f"{folder}/a.safetensors", f"{folder}/b.safetensors", f"{folder}/model.safetensors.index.json:1:2"]


# ---- LM Studio names ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, problem", [
    ("../x", "'.' and '..' are not names"),
    ("/abs/x", "an absolute path is not a name"),
    ("a/../../b", "4 parts, expected at most two"),
    ("a\\b", "a backslash is not allowed"),
    ("a/b/c", "3 parts, expected at most two"),
    ("a/", "an empty part"),
    ("pub/..", "'.' and '..' are not names"),
    ("pub/mo del", "a character that is not a letter, digit"),
])
def test_lmstudio_names_that_could_leave_its_folder_are_refused(tmp_path, monkeypatch, name, problem):
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(tmp_path / "lmstudio"))
    with pytest.raises(UserError, match=re.escape(f"--lmstudio {name!r}: {problem}")):
        places.lmstudio_target(tmp_path / "out.gguf", name)


def test_lmstudio_names_that_are_names_are_placed_inside_its_folder(tmp_path, monkeypatch):
    root = tmp_path / "lmstudio"
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(root))
    assert places.lmstudio_target(tmp_path / "out.gguf", "pub/model") == root / "pub" / "model" / "out.gguf"
    assert places.lmstudio_target(tmp_path / "out.gguf", "") == root / "tunelab" / "out" / "out.gguf"
    assert places.lmstudio_target(tmp_path / "out.gguf", "model") == root / "tunelab" / "model" / "out.gguf"


def test_an_lmstudio_publisher_folder_linking_outside_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "lmstudio"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "pub").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(root))
    with pytest.raises(UserError, match="outside LM Studio's models folder"):
        places.lmstudio_target(tmp_path / "out.gguf", "pub/model")
