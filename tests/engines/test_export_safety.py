"""Export refuses what llama.cpp, LM Studio or Ollama would choke on later, before writing any file: a chat
template that does not render, an adapter trained on another base model, NaN or infinite weights. Files it
does write get the modes the umask gives."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tunelab import adapters, models
from tunelab.config import ExportOptions
from tunelab.errors import UserError
from tunelab.export import export


def run_export(out_dir, **kw):
    return export(ExportOptions(**{"out": str(out_dir / "out.gguf"), **kw}), log=lambda *_: None)


def random_adapter(folder, base, layers=None, seed=0):
    """An adapter (rank 4, every block linear, on `layers` or all of them) that fits `base`, with random A and B."""
    shapes = models.weight_shapes(base)
    spec = adapters.spec_for(-1, models.read_config(base)["num_hidden_layers"], 4, 2.0, 0.0)
    if layers is not None:
        spec.layers, spec.num_layers = list(layers), len(layers)
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in spec.modules():
        out_features, in_features = shapes[f"{module}.weight"]
        tensors[module] = (rng.standard_normal((4, in_features)).astype(np.float32) * 0.1,
                           rng.standard_normal((out_features, 4)).astype(np.float32) * 0.1)
    adapters.save(folder, spec, tensors)
    return folder


def copy_model(source, dest, **config_changes):
    """A copy of a model folder, with config.json keys changed."""
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dest


def resized_model(tiny_llama, dest, **sizes):
    """A llama of other sizes (and random weights) with tiny_llama's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig.from_pretrained(str(tiny_llama), trust_remote_code=False)
    for key, value in sizes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(dest), safe_serialization=True)
    for f in tiny_llama.glob("*"):
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, dest)
    return dest


# ---- chat templates --------------------------------------------------------------------------------

BROKEN = "{% for m in messages %}{{ m['content'] }"
FAILS_TO_RENDER = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}{{ no_such_function() }}"


@pytest.mark.parametrize("kind", ["syntax", "render"])
def test_a_chat_template_that_does_not_render_is_refused_and_nothing_is_written(tiny_llama, tmp_path, kind):
    model = copy_model(tiny_llama, tmp_path / "model")
    (model / "chat_template.jinja").write_text(BROKEN if kind == "syntax" else FAILS_TO_RENDER)
    out = tmp_path / "out"
    expected = (r"chat_template.jinja: the chat template line 1 does not render: TemplateSyntaxError: unexpected '}'"
                if kind == "syntax" else
                r"chat_template.jinja: the chat template does not render: UndefinedError: 'no_such_function' is "
                r"undefined")
    with pytest.raises(UserError, match=expected):
        run_export(out, model=str(model), outtype="f32")
    with pytest.raises(UserError, match=expected):
        run_export(out, model=str(model), outtype="f32", ollama=True)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_broken_template_in_tokenizer_config_is_named_there(tiny_llama, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": BROKEN}))
    with pytest.raises(UserError, match=r"tokenizer_config.json: the chat template line 1 does not render"):
        run_export(tmp_path / "out", model=str(model), outtype="f32")
    assert not (tmp_path / "out").exists()


def test_a_template_that_refuses_system_messages_by_design_is_exported(tiny_llama, tmp_path):
    from gguf import GGUFReader

    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = copy_model(tiny_llama, tmp_path / "model")
    (model / "chat_template.jinja").write_text(template)
    out = run_export(tmp_path / "out", model=str(model), outtype="f32")["gguf"]
    assert GGUFReader(str(out)).fields["tokenizer.chat_template"].contents() == template


# ---- adapters on another base ----------------------------------------------------------------------

@pytest.mark.parametrize("to", ["gguf-lora", "gguf"])
def test_an_adapter_of_another_base_is_refused_naming_the_module_and_shapes(tiny_llama, tmp_path, to):
    adapter = random_adapter(tmp_path / "adapter", tiny_llama)
    narrow = resized_model(tiny_llama, tmp_path / "narrow", hidden_size=32, head_dim=8)
    with pytest.raises(UserError) as e:
        run_export(tmp_path / "out", model=str(narrow), adapter_path=str(adapter), to=to, outtype="f32")
    assert str(e.value).startswith(
        f"{adapter}: adapter module model.layers.0.mlp.down_proj: A (4, 128) and B (64, 4) do not fit the base "
        "model's model.layers.0.mlp.down_proj.weight of shape (32, 128) (expected A (r, 128) and B (32, r)) "
        "(and 13 more modules that do not fit): trained on another base model?")
    assert not (tmp_path / "out").exists()


def test_an_adapter_on_layers_the_base_lacks_is_refused(tiny_llama, tmp_path):
    adapter = random_adapter(tmp_path / "adapter", tiny_llama)
    shallow = resized_model(tiny_llama, tmp_path / "shallow", num_hidden_layers=1)
    with pytest.raises(UserError, match=r"adapter module model.layers.1.mlp.down_proj is on layer 1, but the base "
                                        r"model .*shallow has 1 layers \(0-0\) \(and 6 more modules"):
        run_export(tmp_path / "out", model=str(shallow), adapter_path=str(adapter), to="gguf-lora", outtype="f32")
    assert not (tmp_path / "out").exists()


def test_an_adapter_that_fits_still_exports(tiny_llama, tmp_path):
    adapter = random_adapter(tmp_path / "adapter", tiny_llama, layers=[1])
    out = run_export(tmp_path / "out", model=str(tiny_llama), adapter_path=str(adapter), to="gguf-lora",
                     outtype="f32")["gguf"]
    assert out.is_file()


# ---- NaN and infinite values ------------------------------------------------------------------------

@pytest.mark.parametrize("to", ["gguf-lora", "gguf"])
def test_an_adapter_holding_nan_is_refused_naming_the_tensor(tiny_llama, tmp_path, to):
    adapter = random_adapter(tmp_path / "adapter", tiny_llama)
    for weights, key in ((adapters.PEFT_WEIGHTS, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
                         (adapters.MLX_WEIGHTS, "model.layers.1.self_attn.v_proj.lora_b")):
        tensors = load_file(str(adapter / weights))
        tensors[key][2, 1] = np.nan
        save_file(tensors, str(adapter / weights))
    config = json.loads((adapter / adapters.CONFIG).read_text())
    config.pop("tunelab", None)    # the recorded hashes, as an adapter from another tool has none
    (adapter / adapters.CONFIG).write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.v_proj\.lora_B.*NaN or infinite values"):
        run_export(tmp_path / "out", model=str(tiny_llama), adapter_path=str(adapter), to=to, outtype="f32")
    assert not (tmp_path / "out").exists()


def poisoned_copy(source, dest, name, value):
    """A copy of a model folder with one value of weight `name` set to `value` (NaN, inf)."""
    model = copy_model(source, dest)
    weights = load_file(str(model / "model.safetensors"))
    weights[name][0, 0] = value
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def test_model_weights_holding_inf_are_refused_naming_the_tensor(tiny_llama, tmp_path):
    model = poisoned_copy(tiny_llama, tmp_path / "model", "model.layers.0.mlp.up_proj.weight", np.inf)
    with pytest.raises(UserError, match=r"the model's weights: model\.layers\.0\.mlp\.up_proj\.weight: holds NaN or "
                                        r"infinite values: nothing was exported"):
        run_export(tmp_path / "out", model=str(model), outtype="f32")
    assert not (tmp_path / "out").exists()


def test_generate_and_fuse_refuse_weights_holding_nan(tiny_llama, tmp_path):
    from tunelab import fuse, generate
    from tunelab.config import FuseOptions, GenerateOptions

    model = poisoned_copy(tiny_llama, tmp_path / "model", "model.layers.1.self_attn.o_proj.weight", np.nan)
    with pytest.raises(UserError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight hold NaN"):
        generate.generate(GenerateOptions(model=str(model), prompt="hi", max_tokens=2), log=lambda *_: None)
    adapter = random_adapter(tmp_path / "adapter", tiny_llama)
    with pytest.raises(UserError, match="nothing was written"):
        fuse.fuse(FuseOptions(model=str(model), adapter_path=str(adapter), save_path=str(tmp_path / "fused")),
                  log=lambda *_: None)
    assert not (tmp_path / "fused").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fused.")]


# ---- file modes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_exported_files_get_the_modes_the_umask_gives(tiny_llama, tmp_path, monkeypatch, mask):
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(tmp_path / "lmstudio"))
    old = os.umask(mask)
    try:
        written = run_export(tmp_path / "out", model=str(tiny_llama), outtype="f32", ollama=True, lmstudio="me/tiny")
    finally:
        os.umask(old)
    for path in written.values():
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~mask), path
