"""The embedded SmolLM2-135M-Instruct: GGUF import, its chat template and loss mask, the demo."""

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_gguf_import_matches_transformers_own_gguf_loader(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab import models
    from tunelab.engines import torch_engine as engine

    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    ours = engine.load(smollm2_dir, device="cpu", dtype="float32", log=lambda *_: None)
    gguf = models.embedded_gguf("smollm2")
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = ours.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             tokenize=False, add_generation_prompt=True)
    tokens = np.array([ours.tokenizer.encode(ids, add_special_tokens=False)])
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(engine.logits(ours, tokens), expected, rtol=0, atol=1e-4)

    from tunelab.data.templates import end_of_turn_ids

    answer = ours.tokenizer.decode(list(engine.generate(ours, tokens[0].tolist(), max_tokens=30,
                                                        stop_ids=end_of_turn_ids(ours.tokenizer))))
    assert answer == "The capital of France is Paris."


def test_imported_tokenizer_splits_digits_as_smollm2_does(smollm2_dir):
    """The GGUF names the 'smollm' pre-tokenizer: every digit is a token of its own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tokenizer.tokenize("laps = 1202")[-4:] == ["1", "2", "0", "2"]


def test_multi_turn_and_tools_masks_with_the_embedded_tokenizer(smollm2_dir):
    """The same token-by-token checks as tests/unit/test_masks.py, on SmolLM2's own tokenizer."""
    import copy

    from transformers import AutoTokenizer

    from tests.conftest import MULTI_TURN, TOOLS_ROW, TOOLS_TEMPLATE
    from tests.unit.test_masks import check_masks, runs
    from tunelab.data.templates import check_renders_tools
    from tunelab.errors import UserError

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert len(runs(check_masks(tokenizer, MULTI_TURN, "chat"))) == 2
    with pytest.raises(UserError, match="train tools rows on a model whose template supports tools"):
        check_renders_tools(tokenizer)            # SmolLM2's own template has no tools
    with_tools = copy.deepcopy(tokenizer)
    with_tools.chat_template = TOOLS_TEMPLATE
    assert len(runs(check_masks(with_tools, TOOLS_ROW, "tools"))) == 2


def test_mask_counts_exactly_the_assistant_tokens_with_the_real_template(smollm2_dir):
    from transformers import AutoTokenizer

    from tunelab.data import builtin_sql
    from tunelab.data.templates import encode_row

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for row in builtin_sql.generate(20, seed=5):
        chat = {"messages": [{"role": "system", "content": row["context"]},
                             {"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}]}
        ex = encode_row(tokenizer, chat, "chat", mask_prompt=True)
        assert tokenizer.decode(ex.tokens[ex.supervised].tolist()) == row["answer"] + "<|im_end|>"
        assert int(ex.supervised.sum()) == len(tokenizer.encode(row["answer"], add_special_tokens=False)) + 1


def test_demo_lowers_test_loss_raises_sql_exec_and_fused_answers_like_the_adapter(tmp_path, smollm2_dir):
    from tunelab.config import DemoOptions
    from tunelab.demo import demo

    result = demo(DemoOptions(out=str(tmp_path / "demo"), iters=40, max_tokens=40), log=lambda *_: None)
    assert result["after"]["test_loss"] < 0.6 * result["before"]["test_loss"]
    assert result["answers"]["fused"] == result["answers"]["tuned"]
    assert (tmp_path / "demo" / "fused_model" / "model.safetensors").is_file()
    models = result["eval"]["models"]
    exec_accuracy = {label: models[label]["metrics"]["sql-exec"]["correct"] for label in models}
    assert exec_accuracy["tuned"] > exec_accuracy["base"], exec_accuracy
    # The exported f16 file answers like base + adapter (f16 rounding may flip a rare near-tie).
    samples = [json.loads(line) for line in (tmp_path / "demo" / "eval" / "samples.jsonl").read_text().splitlines()]
    assert sum(s["answers"]["gguf"] == s["answers"]["tuned"] for s in samples) >= len(samples) - 2
    assert abs(exec_accuracy["gguf"] - exec_accuracy["tuned"]) <= 2
    assert models["tuned"]["metrics"]["loss"]["value"] == pytest.approx(result["after"]["test_loss"], rel=1e-4)
    assert (tmp_path / "demo" / "report.html").is_file() and (tmp_path / "demo" / "eval" / "samples.jsonl").is_file()


def test_smollm2_export_loads_in_transformers_and_its_modelfile_matches_the_template(tmp_path, smollm2_dir):
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from tests.engines.test_gguf_export import modelfile_template, render_go_template
    from tunelab.config import ExportOptions
    from tunelab.engines import torch_engine as engine
    from tunelab.export import export

    written = export(ExportOptions(model="smollm2", outtype="f32", out=str(tmp_path / "s.gguf"), ollama=True),
                     log=lambda *_: None)
    ours = engine.load(smollm2_dir, device="cpu", dtype="float32", log=lambda *_: None)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = ours.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokens = [ours.tokenizer.encode(text, add_special_tokens=False)]
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="s.gguf", dtype=torch.float32)
    with torch.no_grad():
        got = theirs(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, engine.logits(ours, tokens), rtol=0, atol=1e-3)
    # SmolLM2's template adds its own system prompt when there is none; the Modelfile's SYSTEM does the same.
    modelfile = written["modelfile"].read_text()
    system = re.search(r'SYSTEM """(.*?)"""', modelfile, re.S).group(1)
    assert "SmolLM" in system
    rendered = render_go_template(modelfile_template(modelfile), {"System": system, "Prompt": messages[0]["content"]})
    assert rendered == text
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_mlx_loads_the_q4_1_file_quantized_without_loss(smollm2_dir):
    """Q4_1 blocks (w = d * q + m, 32 weights) are MLX's 4-bit affine groups of 32: loaded as they are,
    they dequantize to exactly the weights the float32 import holds (Q/K row order undone)."""
    from safetensors.numpy import load_file

    from tests.engines.engine_params import engine_module

    mlx_engine = engine_module("mlx")
    import mlx.core as mx
    import mlx.nn as nn

    lines = []
    model = mlx_engine.load(smollm2_dir, device="cpu", dtype="float32", log=lines.append, quantize=(4, 32))
    assert any("210 taken as they are from the GGUF file" in line for line in lines)
    imported = load_file(str(smollm2_dir / "model.safetensors"))
    layers = [(p, m) for p, m in model.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(layers) == 30 * 7
    for path, layer in layers:
        weight = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, 32, 4))
        np.testing.assert_array_equal(weight, imported[f"{path}.weight"], err_msg=path)
