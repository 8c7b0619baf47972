"""GGUF files for llama.cpp, LM Studio and Ollama: a whole model, or a LoRA adapter alone.

Weights come from a Hugging Face folder (safetensors, read with numpy; bf16 included), with an
adapter merged in on the way (W + scale * B @ A) when one is given. Tensor names come from the
gguf package's name tables; llama's Q/K rows are interleaved as llama.cpp expects; a model
with tied embeddings gets no separate output tensor. The tokenizer (byte-level BPE: tokens,
types, merges, pre-tokenizer, special ids, add-bos) and the chat template go into the metadata.

`verify` re-reads a written file and checks every tensor's name, shape and values and the
tokenizer and template keys against what was meant to be written.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunelab import adapters, models
from tunelab.errors import UserError
from tunelab.export import chat_template

# outtype -> (GGML type of 2-D weight matrices, gguf.LlamaFileType name)
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
}

LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")   # what a GGUF LoRA file is written as

# HF architecture class -> GGUF architecture (the families whose tensors share llama's layout)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

@dataclass
class Source:
    """What goes into a model file: config, float32 weights by HF name, tokenizer metadata."""
    config: dict
    arch: str
    weights: dict
    tokenizer: dict = field(default_factory=dict)


# ---- reading the model folder ----------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path):
    """{name: float32 array} of one safetensors file, bf16 included (numpy has no bfloat16)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":
            array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[info["dtype"]]).astype(np.float32)
        else:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which GGUF export cannot read")
        out[name] = array.reshape(info["shape"])
    return out


def _rope_theta(config):
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def check_architecture(config, where):
    arch_class = (config.get("architectures") or ["?"])[0]
    if arch_class not in ARCHITECTURES:
        raise UserError(f"{where}: architecture {arch_class} cannot be exported to GGUF yet (supported: "
                        f"{', '.join(f'{c} ({a})' for c, a in ARCHITECTURES.items())})")
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", None):
        raise UserError(f"{where}: rope scaling {rope_type!r} is not supported by the GGUF export yet")
    return ARCHITECTURES[arch_class]


def merge_adapter(weights, spec, tensors):
    """Fuse adapter tensors into float32 weights in place, as `fuse` does: W + scale * B @ A, and for DoRA
    that scaled row by row to the trained magnitude M: M / ||W + scale B A|| (norm over each row). A full
    fine-tune's weights replace the base's."""
    if spec.full:
        for name, value in tensors.items():
            if name not in weights:
                raise UserError(f"the fine-tune has {name}, which the model does not have: trained on another base?")
            weights[name] = np.asarray(value, np.float32)
        return
    for module, (a, b, *magnitude) in tensors.items():
        name = f"{module}.weight"
        if name not in weights:
            raise UserError(f"the adapter adapts {module}, which the model does not have: trained on another base?")
        merged = weights[name] + spec.scale * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))
        if magnitude:
            merged = merged * (np.asarray(magnitude[0], np.float32) / np.linalg.norm(merged, axis=1))[:, None]
        weights[name] = merged


def _layer_of(module):
    parts = module.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit() else None


def check_adapter_fits(model_dir, config, tensors, adapter_path, full=False):
    """UserError unless every adapter module adapts a weight the base model has, on a layer it has, with
    A [r, in] and B [out, r] (and DoRA's M [out]) of that weight's [out, in] shape (read from its safetensors
    headers); for a full fine-tune (`full`), unless each weight is one of the base's, of its shape. Names the
    first module that does not fit, in layer order."""
    shapes = models.weight_shapes(model_dir)
    n_layers = config.get("num_hidden_layers")
    problems = []
    if full:
        problems = [f"{adapter_path}: fine-tuned weight {name} {np.shape(value)}: the base model {model_dir} has "
                    + (f"it as {shapes[name]}" if name in shapes else "no such weight")
                    for name, value in sorted(tensors.items()) if shapes.get(name) != np.shape(value)]
    for module in sorted(tensors if not full else (),
                         key=lambda m: (_layer_of(m) if _layer_of(m) is not None else -1, m)):
        a, b, *magnitude = (np.shape(x) for x in tensors[module])
        weight, layer = f"{module}.weight", _layer_of(module)
        where = f"{adapter_path}: adapter module {module}"
        if layer is not None and n_layers is not None and layer >= n_layers:
            problems.append(f"{where} is on layer {layer}, but the base model {model_dir} has {n_layers} layers "
                            f"(0-{n_layers - 1})")
        elif weight not in shapes:
            problems.append(f"{where}: the base model {model_dir} has no weight {weight}")
        elif (len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != shapes[weight]
              or (magnitude and magnitude[0] != (b[0],))):
            have = f"A {a} and B {b}" + (f" and M {magnitude[0]}" if magnitude else "")
            problems.append(f"{where}: {have} do not fit the base model's {weight} of shape {shapes[weight]} "
                            f"(expected A (r, {shapes[weight][1]}) and B ({shapes[weight][0]}, r))")
    if problems:
        more = f" (and {len(problems) - 1} more modules that do not fit)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}: trained on another base model? Pass the model it was trained on "
                        "as --model")


def read_source(model_dir, adapter=None):
    """The model folder's config, weights (with `adapter` = (spec, tensors) merged) and tokenizer."""
    model_dir = Path(model_dir)
    config = models.read_config(model_dir)
    arch = check_architecture(config, model_dir)
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(read_safetensors(path))
    adapters.check_finite(weights, f"{model_dir}: the model's weights",
                          fix="nothing was exported; export from an intact copy of the model")
    if adapter is not None:
        merge_adapter(weights, *adapter)
    return Source(config, arch, weights, read_tokenizer(model_dir, config))


# ---- the tokenizer -------------------------------------------------------------------------------

def _pre_tokenizer_name(pre, where):
    """llama.cpp's name for the pre-tokenizer in tokenizer.json, or a UserError."""
    parts = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = parts[0].get("pattern", {}).get("Regex")
        if pattern == models.LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == models.QWEN2_SPLIT:
            return "qwen2"
    raise UserError(f"{where}: tokenizer.json's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one "
                    "the GGUF export knows (GPT-2, SmolLM, Qwen2, Llama 3 byte-level BPE)")


def read_tokenizer(model_dir, config):
    """Everything the GGUF tokenizer keys need, from tokenizer.json and transformers' tokenizer."""
    from transformers import AutoTokenizer

    from tunelab.data.templates import END_OF_TURN_TOKENS

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback"):
        fallback = " with byte fallback" if spec["model"].get("byte_fallback") else ""
        raise UserError(f"{path}: only byte-level BPE tokenizers can be exported to GGUF yet (this one is "
                        f"{spec['model']['type']}{fallback})")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    chat_template.check(tokenizer, model_dir)
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    vocab.update({content: t["id"] for content, t in added.items()})
    size = max(int(config.get("vocab_size") or 0), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size                                    # gguf.TokenType.UNUSED
    for content, i in vocab.items():
        tokens[i] = content
        types[i] = (3 if added[content].get("special") else 4) if content in added else 1  # CONTROL/USER_DEFINED/NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    def token_id(text):
        return vocab.get(text) if isinstance(text, str) else None

    first = tokenizer.encode("a", add_special_tokens=True)
    eot = next((vocab[t] for t in END_OF_TURN_TOKENS if t in added and added[t].get("special")), None)
    return {
        "pre": _pre_tokenizer_name(spec.get("pre_tokenizer"), path),
        "tokens": tokens, "types": types, "merges": merges,
        "bos": token_id(tokenizer.bos_token), "eos": token_id(tokenizer.eos_token),
        "unk": token_id(tokenizer.unk_token), "pad": token_id(tokenizer.pad_token), "eot": eot,
        "add_bos": tokenizer.bos_token_id is not None and first[:1] == [tokenizer.bos_token_id],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


# ---- writing ---------------------------------------------------------------------------------------

def _gguf_name(name_map, hf_name):
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise UserError(f"tensor {hf_name} has no GGUF name in the gguf package's tables")
    return gguf_name


def model_tensors(source):
    """[(gguf name, float32 array)] in file order, llama's Q/K rows interleaved, tied output left out."""
    import gguf

    c = source.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, source.arch.upper()), c["num_hidden_layers"])
    tied = c.get("tie_word_embeddings", False)
    out = []
    for hf_name, w in source.weights.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        out.append((_gguf_name(name_map, hf_name), _llama_rows(c, source.arch, hf_name.removesuffix(".weight"), w)))
    return sorted(out, key=lambda t: _file_order(t[0]))


def _llama_rows(config, arch, module, w):
    """`w` (rows = the output features of `module`) with llama.cpp's Q/K row interleaving where it applies."""
    if arch == "llama" and module.endswith("self_attn.q_proj"):
        return models.permute_rows(w, config["num_attention_heads"])
    if arch == "llama" and module.endswith("self_attn.k_proj"):
        return models.permute_rows(w, config.get("num_key_value_heads", config["num_attention_heads"]))
    return w


def _file_order(name):
    parts = name.split(".")
    return (1, int(parts[1]), name) if parts[0] == "blk" else (0 if name.startswith("token_embd") else 2, 0, name)


def encode(w, outtype):
    """(data to write, its GGML type name) for one tensor: 2-D weights in the outtype, the rest float32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    qtype = OUTTYPES[outtype][0]
    if w.ndim != 2 or qtype == "F32":
        return np.ascontiguousarray(w, dtype=np.float32), "F32"
    if qtype == "F16":
        return w.astype(np.float16), "F16"
    block = {"BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32}[qtype]
    if w.shape[1] % block:   # rows that do not split into blocks stay at 16 bits, as llama.cpp does
        return w.astype(np.float16), "F16"
    return quantize(np.ascontiguousarray(w, dtype=np.float32), getattr(GGMLQuantizationType, qtype)), qtype


def _add_model_metadata(writer, source, name, outtype):
    import gguf

    c, tok = source.config, source.tokenizer
    n_head = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_head
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, OUTTYPES[outtype][1]).value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(c.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(c.get("num_key_value_heads", n_head))
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != c["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(len(tok["tokens"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key in ("bos", "eos", "unk", "pad", "eot"):
        if tok[key] is not None:
            getattr(writer, f"add_{key}_token_id")(tok[key])
    writer.add_add_bos_token(bool(tok["add_bos"]))
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _write(writer, tensors, outtype):
    """Add the tensors in the outtype and write the file; return {gguf name: (source, written data, type)}."""
    from gguf import GGMLQuantizationType

    written = {}
    for gguf_name, w in tensors:
        data, qtype = encode(w, outtype)
        writer.add_tensor(gguf_name, data, raw_dtype=GGMLQuantizationType[qtype] if data.dtype == np.uint8 else None)
        written[gguf_name] = (w, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def write_model(path, source, outtype, name):
    """Write the model GGUF to `path`; return what was written, for `verify`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), source.arch)
    _add_model_metadata(writer, source, name, outtype)
    return _write(writer, model_tensors(source), outtype)


def lora_tensors(config, arch, spec, tensors):
    """[(gguf name, float32 array)]: `<weight>.lora_a` = A [r, in], `<weight>.lora_b` = B [out, r],
    with llama's Q/K interleaving applied to B's rows (the rows of the weight it adds to)."""
    import gguf

    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config["num_hidden_layers"])
    out = []
    for module, (a, b) in tensors.items():
        a, b = np.asarray(a, np.float32), _llama_rows(config, arch, module, np.asarray(b, np.float32))
        base = _gguf_name(name_map, f"{module}.weight")
        out += [(f"{base}.lora_a", a), (f"{base}.lora_b", b)]
    return sorted(out, key=lambda t: _file_order(t[0]))


def write_lora(path, config, arch, spec, tensors, outtype, name):
    """The adapter alone as a GGUF LoRA file (llama.cpp --lora, Ollama ADAPTER); scale = alpha / r."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(spec.scale * spec.rank))
    return _write(writer, lora_tensors(config, arch, spec, tensors), outtype)


# ---- reading it back -------------------------------------------------------------------------------

# Largest |dequantized - source| allowed, relative to the tensor's largest |value|.
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.1}


def _value(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def verify(path, written, metadata):
    """Re-read `path`; check tensor names, types, shapes and values, and metadata keys. Returns a summary."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    problems = []
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(written):
        missing, extra = sorted(set(written) - set(found)), sorted(set(found) - set(written))
        problems.append(f"tensors differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (source, data, qtype) in written.items():
        t = found.get(name)
        if t is None:
            continue
        if t.tensor_type.name != qtype:
            problems.append(f"{name}: type {t.tensor_type.name}, expected {qtype}")
            continue
        values = dequantize(t.data, t.tensor_type).reshape(-1)
        if values.size != source.size or tuple(int(n) for n in reversed(t.shape.tolist())) != source.shape:
            problems.append(f"{name}: shape {tuple(reversed(t.shape.tolist()))}, expected {source.shape}")
            continue
        meant = dequantize(data, GGMLQuantizationType[qtype]).reshape(-1) if data.dtype == np.uint8 \
            else data.astype(np.float32).reshape(-1)
        if not np.array_equal(values, meant):
            problems.append(f"{name}: values read back differ from those written")
        scale = float(np.abs(source).max()) or 1.0
        if float(np.abs(values - source.reshape(-1)).max()) > TOLERANCE[qtype] * scale:
            problems.append(f"{name}: {qtype} values are further from the source than {qtype} allows")
    for key, expected in metadata.items():
        got = _value(reader, key)
        if isinstance(expected, float) and got is not None:
            same = abs(float(got) - expected) <= 1e-6 * max(abs(expected), 1.0)
        else:
            same = got == expected
        if not same:
            problems.append(f"metadata {key}: read back {str(got)[:60]!r}, expected {str(expected)[:60]!r}")
    if problems:
        raise UserError([f"{path}: read-back check failed: {p}" for p in problems])
    return f"{len(written)} tensors and {len(metadata)} metadata keys read back and checked"


def expected_model_metadata(source, outtype):
    """The metadata keys `verify` checks for a model file."""
    c, tok, arch = source.config, source.tokenizer, source.arch
    keys = {
        "general.architecture": arch,
        f"{arch}.block_count": c["num_hidden_layers"],
        f"{arch}.embedding_length": c["hidden_size"],
        f"{arch}.feed_forward_length": c["intermediate_size"],
        f"{arch}.attention.head_count": c["num_attention_heads"],
        f"{arch}.attention.head_count_kv": c.get("num_key_value_heads", c["num_attention_heads"]),
        f"{arch}.rope.freq_base": _rope_theta(c),
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.get("rms_norm_eps", 1e-6)),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": tok["pre"],
        "tokenizer.ggml.tokens": tok["tokens"],
        "tokenizer.ggml.merges": tok["merges"],
        "tokenizer.ggml.add_bos_token": bool(tok["add_bos"]),
    }
    for key in ("bos", "eos", "eot", "pad"):
        if tok[key] is not None:
            keys[f"tokenizer.ggml.{key}_token_id" if key != "pad" else "tokenizer.ggml.padding_token_id"] = tok[key]
    if tok["chat_template"]:
        keys["tokenizer.chat_template"] = tok["chat_template"]
    return keys
