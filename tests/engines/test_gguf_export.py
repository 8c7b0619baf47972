"""GGUF export: round trips through the file, transformers' own GGUF loader, the LoRA file, the
read-back check, Ollama's template and LM Studio's folder."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from tunelab import adapters, models
from tunelab.config import ExportOptions
from tunelab.engines import torch_engine as engine
from tunelab.errors import UserError
from tunelab.export import export, gguf_file, places

PROMPT = [{"role": "system", "content": "CREATE TABLE t (a INTEGER)"}, {"role": "user", "content": "What is a?"}]

# Largest |logit difference| between the exported file loaded by transformers and the source model,
# relative to the largest |logit| (a wrong Q/K order or a lost bias moves logits by about that much).
LOGIT_TOLERANCE = {"f32": 1e-5, "f16": 0.02, "bf16": 0.1, "q8_0": 0.1}


def load(folder):
    return engine.load(folder, device="cpu", dtype="float32", log=lambda *_: None)


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-untied"])
def fused(request, tiny_llama, tiny_qwen2, tmp_path_factory):
    """A fused folder (tiny base + a random adapter) of each layout, and the adapter."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    base = {"llama": tiny_llama, "qwen2": tiny_qwen2, "llama-untied": tiny_llama}[request.param]
    if request.param == "llama-untied":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.3)
        model.save_pretrained(str(root / "base"), safe_serialization=True)
        for f in tiny_llama.glob("*"):
            if f.name.startswith(("tokenizer", "chat_template")):
                shutil.copy(f, root / "base")
        base = root / "base"
    m = load(base)
    spec = adapters.spec_for(-1, 2, 4, 2.0, 0.0)
    engine.attach_lora(m, spec)
    rng = np.random.default_rng(1)
    tensors = {k: (a, rng.standard_normal(b.shape).astype(np.float32) * 0.2)
               for k, (a, b) in engine.adapter_tensors(m).items()}
    engine.set_adapter(m, spec, tensors)
    adapters.save(root / "adapter", spec, tensors)
    engine.fuse(m, root / "fused")
    return {"root": root, "base": base, "fused": root / "fused", "adapter": root / "adapter"}


def run_export(tmp_path, **kw):
    return export(ExportOptions(**{"out": str(tmp_path / "out.gguf"), **kw}), log=lambda *_: None)


def prompt_tokens(folder):
    tokenizer = load(folder).tokenizer
    return [tokenizer.encode(tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)]


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_gguf_loader_reads_the_export_with_the_fused_logits(fused, tmp_path, outtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_export(tmp_path, model=str(fused["fused"]), outtype=outtype)["gguf"]
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    tokens = prompt_tokens(fused["fused"])
    with torch.no_grad():
        got = theirs(input_ids=torch.tensor(tokens)).logits.numpy()
    expected = engine.logits(load(fused["fused"]), tokens)
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE[outtype] * np.abs(expected).max()
    their_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = their_tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert their_tokenizer.encode(text, add_special_tokens=False) == tokens[0]


def test_base_plus_adapter_exports_the_same_file_as_the_fused_folder(fused, tmp_path):
    from gguf import GGUFReader

    a = run_export(tmp_path / "a", model=str(fused["fused"]), outtype="f32")["gguf"]
    b = run_export(tmp_path / "b", model=str(fused["base"]), adapter_path=str(fused["adapter"]), outtype="f32")["gguf"]
    ta, tb = ({t.name: np.array(t.data) for t in GGUFReader(str(p)).tensors} for p in (a, b))
    assert ta.keys() == tb.keys()
    assert ("output.weight" in ta) == fused["base"].name.endswith("base")   # only the untied model has one
    for name in ta:
        np.testing.assert_allclose(ta[name], tb[name], rtol=0, atol=2e-6, err_msg=name)


def test_importing_the_export_gives_back_the_weights(fused, tmp_path):
    from safetensors.numpy import load_file

    out = run_export(tmp_path, model=str(fused["fused"]), outtype="f32")["gguf"]
    again = models.import_gguf(out, dest=tmp_path / "imported", log=lambda *_: None)
    source = load_file(str(fused["fused"] / "model.safetensors"))
    back = load_file(str(again / "model.safetensors"))
    for name, w in source.items():
        if name == "lm_head.weight" and name not in back:
            continue
        np.testing.assert_array_equal(back[name], w, err_msg=name)


def test_gguf_lora_applied_to_the_base_file_equals_the_fused_file(fused, tmp_path):
    from gguf import GGUFReader

    base = GGUFReader(str(run_export(tmp_path / "base", model=str(fused["base"]), outtype="f32")["gguf"]))
    fused_file = GGUFReader(str(run_export(tmp_path / "fused", model=str(fused["fused"]), outtype="f32")["gguf"]))
    lora = GGUFReader(str(run_export(tmp_path / "lora", model=str(fused["base"]), adapter_path=str(fused["adapter"]),
                                     to="gguf-lora", outtype="f32")["gguf"]))
    assert lora.fields["general.type"].contents() == "adapter"
    assert lora.fields["adapter.type"].contents() == "lora"
    spec, _ = adapters.load(fused["adapter"])
    alpha = lora.fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(spec.scale * spec.rank)
    pieces = {t.name: np.array(t.data) for t in lora.tensors}
    merged = {t.name: np.array(t.data) for t in base.tensors}
    for name in {n.rsplit(".", 1)[0] for n in pieces}:
        a, b = pieces[f"{name}.lora_a"], pieces[f"{name}.lora_b"]       # [r, in], [out, r]
        merged[name] = merged[name] + alpha / a.shape[0] * (b @ a)       # what llama.cpp computes
    for t in fused_file.tensors:
        np.testing.assert_allclose(merged[t.name], np.array(t.data), rtol=0, atol=1e-5, err_msg=t.name)


@pytest.mark.parametrize("outtype", ["q4_0", "q4_1"])
def test_four_bit_exports_read_back_within_their_error(tiny_llama, tmp_path, outtype):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = run_export(tmp_path, model=str(tiny_llama), outtype=outtype)["gguf"]
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == outtype.upper()
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    original = load(tiny_llama).model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    up = tensors["blk.0.ffn_up.weight"]
    error = np.abs(dequantize(up.data, up.tensor_type) - original).max()
    assert 0 < error <= 0.1 * np.abs(original).max()


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_the_pre_tokenizer_is_named_as_llama_cpp_names_it(tiny_llama, tmp_path, pre):
    tokenizer = load(tiny_llama).tokenizer
    tokenizer.backend_tokenizer.pre_tokenizer = models.pre_tokenizer(pre)
    tokenizer.save_pretrained(str(tmp_path))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert gguf_file._pre_tokenizer_name(spec["pre_tokenizer"], "t") == pre
    with pytest.raises(UserError, match="pre-tokenizer \\(Whitespace\\) is not one the GGUF export knows"):
        gguf_file._pre_tokenizer_name({"type": "Whitespace"}, "t")


def test_read_back_check_catches_a_damaged_file(tiny_llama, tmp_path):
    source = gguf_file.read_source(tiny_llama)
    written = gguf_file.write_model(tmp_path / "m.gguf", source, "f32", "m")
    meta = gguf_file.expected_model_metadata(source, "f32")
    assert "read back and checked" in gguf_file.verify(tmp_path / "m.gguf", written, meta)
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    data[-100:-96] = np.float32(1234.5).tobytes()            # a value in the last tensor
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    with pytest.raises(UserError, match="values read back differ"):
        gguf_file.verify(tmp_path / "m.gguf", written, meta)
    with pytest.raises(UserError, match="tokenizer.ggml.pre"):
        gguf_file.verify(tmp_path / "m.gguf", {}, {**meta, "tokenizer.ggml.pre": "qwen2"})


def test_a_failed_export_leaves_no_file_and_keeps_an_existing_one(tiny_llama, tmp_path, monkeypatch):
    def broken(*_):
        raise UserError("read-back check failed: simulated")

    monkeypatch.setattr(gguf_file, "verify", broken)
    with pytest.raises(UserError):
        run_export(tmp_path, model=str(tiny_llama))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out.gguf").write_text("an older export")
    with pytest.raises(UserError, match="exists; choose another name or pass --overwrite"):
        run_export(tmp_path, model=str(tiny_llama))
    with pytest.raises(UserError):
        run_export(tmp_path, model=str(tiny_llama), overwrite=True)
    assert (tmp_path / "out.gguf").read_text() == "an older export"


def test_unsupported_architecture_lists_the_supported_ones(tiny_llama, tmp_path):
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match=r"GPT2LMHeadModel cannot be exported to GGUF yet \(supported: "
                                        r"LlamaForCausalLM \(llama\), Qwen2ForCausalLM \(qwen2\)\)"):
        run_export(tmp_path, model=str(folder))


# ---- Ollama and LM Studio ----------------------------------------------------------------------

def render_go_template(template, values):
    """The subset of Go's text/template the Modelfile uses ({{ if .X }}..{{ end }}, {{ .X }}), rendered
    up to {{ .Response }}, where Ollama starts generating."""
    template = template.split("{{ .Response }}")[0]
    out, pos, skipping = [], 0, []
    for tag in re.finditer(r"\{\{-?\s*(.*?)\s*-?\}\}", template):
        if not any(skipping):
            out.append(template[pos:tag.start()])
        pos = tag.end()
        action = tag.group(1)
        if action.startswith("if "):
            skipping.append(not values.get(action[3:].strip().lstrip(".")))
        elif action == "end":
            skipping.pop()
        elif not any(skipping):
            out.append(values[action.lstrip(".")])
    if not any(skipping):
        out.append(template[pos:])
    return "".join(out)


def modelfile_template(text):
    return re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                   " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_modelfile_template_renders_the_chat_templates_prompt(tiny_llama, family):
    tokenizer = load(tiny_llama).tokenizer
    if family == "llama3":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                    "<|eot_id|>"]})
        tokenizer.chat_template = LLAMA3_TEMPLATE
    text = places.modelfile("m.gguf", tokenizer, ["<|im_end|>"])
    assert text.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    for messages in (PROMPT, PROMPT[1:]):
        values = {"System": messages[0]["content"] if messages[0]["role"] == "system" else "",
                  "Prompt": messages[-1]["content"]}
        ours = render_go_template(modelfile_template(text), values)
        theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == theirs.removeprefix(tokenizer.bos_token if family == "llama3" else "")


def test_export_writes_a_modelfile_and_places_a_copy_for_lm_studio(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(tmp_path / "lmstudio"))
    written = run_export(tmp_path, model=str(tiny_llama), outtype="q8_0", ollama=True, lmstudio="me/tiny",
                         system_prompt="Answer in SQL.")
    assert written["lmstudio"] == tmp_path / "lmstudio" / "me" / "tiny" / "out.gguf"
    assert written["lmstudio"].read_bytes() == written["gguf"].read_bytes()
    modelfile = written["modelfile"].read_text()
    assert modelfile.startswith("FROM ./out.gguf\n") and 'SYSTEM """Answer in SQL."""' in modelfile
    with pytest.raises(UserError, match="LM Studio already has a model file here"):
        run_export(tmp_path / "again", model=str(tiny_llama), lmstudio="me/tiny")
    assert not (tmp_path / "again" / "out.gguf").exists()
    default = run_export(tmp_path / "d", model=str(tiny_llama), lmstudio="")["lmstudio"]
    assert default == tmp_path / "lmstudio" / "tunelab" / "out" / "out.gguf"
