"""GGUF import round trip: tiny HF models written as GGUF files (as llama.cpp lays them out),
imported back by tunelab, give the same logits."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tunelab import models
from tunelab.engines import torch_engine as engine

_TENSOR_NAMES = {v: k for k, v in models._TOP_TENSORS.items()}


def _gguf_name(hf_name):
    if hf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    inverse = {v: k for k, v in models.BLOCK_TENSORS.items()}
    return f"blk.{layer}.{inverse[rest]}"


def _permute(w, n_head):
    """llama.cpp's conversion order of Q/K rows (the inverse of what the importer undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder, path, arch):
    import gguf

    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(added["<|im_start|>"])
    writer.add_eos_token_id(added["<|im_end|>"])
    writer.add_pad_token_id(added["<|endoftext|>"])
    writer.add_add_bos_token(False)
    template = tok_config.get("chat_template") or (folder / "chat_template.jinja").read_text()
    writer.add_chat_template(template)
    for name, w in load_file(str(folder / "model.safetensors")).items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = _permute(w, config["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = _permute(w, config["num_key_value_heads"])
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_round_trip_gives_the_same_logits(arch, tiny_llama, tiny_qwen2, tmp_path):
    folder = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    write_gguf(folder, tmp_path / "tiny.gguf", arch)
    imported = models.resolve(str(tmp_path / "tiny.gguf"), log=lambda *_: None)
    original = engine.load(folder, device="cpu", dtype="float32", log=lambda *_: None)
    again = engine.load(imported, device="cpu", dtype="float32", log=lambda *_: None)
    text = again.tokenizer.apply_chat_template([{"role": "user", "content": "What is a?"}], tokenize=False,
                                               add_generation_prompt=True)
    assert text == original.tokenizer.apply_chat_template([{"role": "user", "content": "What is a?"}],
                                                          tokenize=False, add_generation_prompt=True)
    ids = original.tokenizer.encode(text, add_special_tokens=False)
    assert again.tokenizer.encode(text, add_special_tokens=False) == ids
    np.testing.assert_allclose(engine.logits(again, np.array([ids])), engine.logits(original, np.array([ids])),
                               rtol=0, atol=1e-5)
    assert models.resolve(str(tmp_path / "tiny.gguf"), log=lambda *_: None) == imported  # cached


def test_unsupported_gguf_architecture_lists_the_supported(tmp_path):
    import gguf

    from tunelab.errors import UserError

    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="'mamba' is not supported \\(supported: llama, qwen2\\)"):
        models.resolve(str(tmp_path / "x.gguf"), log=lambda *_: None)
