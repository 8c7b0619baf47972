"""Where exported files get used: LM Studio's models folder, and an Ollama Modelfile.

LM Studio lists a GGUF found at <models folder>/<publisher>/<model>/<file>. Ollama builds a
model from a Modelfile: FROM the GGUF, a TEMPLATE in Go template syntax that renders the same
prompt text as the model's chat template, a `PARAMETER stop` per end-of-turn token and the
SYSTEM prompt (the one used in training, or the template's own default).
"""

import os
import re
import shutil
from pathlib import Path

from tunelab import atomic
from tunelab.errors import UserError

# Chat template families Ollama's legacy (System/Prompt/Response) template can express.
OLLAMA_TEMPLATES = {
    "chatml": ("<|im_start|>", "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"),
    "llama3": ("<|start_header_id|>", "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n"
               "{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n"
               "{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
               "{{ .Response }}<|eot_id|>"),
}


def lmstudio_models_dir():
    """LM Studio's models folder: $LMSTUDIO_MODELS_DIR, ~/.lmstudio/models, or the older ~/.cache/lm-studio/models."""
    if os.environ.get("LMSTUDIO_MODELS_DIR"):
        return Path(os.environ["LMSTUDIO_MODELS_DIR"]).expanduser()
    home = Path.home()
    older = home / ".cache" / "lm-studio" / "models"
    return older if older.is_dir() and not (home / ".lmstudio").is_dir() else home / ".lmstudio" / "models"


NAME_PART = r"[\w.@+-]+"   # one folder name of PUBLISHER/MODEL


def _lmstudio_name_problem(name):
    """Why `name` is not a PUBLISHER/MODEL (or MODEL) name that stays inside the models folder, or None."""
    parts = name.split("/")
    if "\\" in name:
        return "a backslash is not allowed; use / between PUBLISHER and MODEL"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "an absolute path is not a name"
    if len(parts) > 2:
        return f"{len(parts)} parts, expected at most two"
    if "" in parts:
        return "an empty part"
    if any(part in (".", "..") for part in parts):
        return "'.' and '..' are not names"
    if not all(re.fullmatch(NAME_PART, part) for part in parts):
        return "a character that is not a letter, digit or one of . _ - + @"
    return None


def lmstudio_target(gguf_path, name):
    """<models>/<publisher>/<model>/<file> for `name` ('publisher/model', 'model' for tunelab/model, or '' for
    tunelab/<the file's stem>); a UserError for a name that is not one or would lead outside the models folder."""
    given = name
    name = name or Path(gguf_path).stem
    problem = _lmstudio_name_problem(name)
    if problem:
        raise UserError(f"--lmstudio {given!r}: {problem}; use PUBLISHER/MODEL, each with letters, digits and "
                        ". _ - + @ only")
    publisher, _, model = name.rpartition("/")
    root = lmstudio_models_dir()
    target = root / (publisher or "tunelab") / model / Path(gguf_path).name
    if not target.resolve().is_relative_to(root.resolve()):
        raise UserError(f"--lmstudio {given!r}: {target} leads to {target.resolve()}, outside LM Studio's models "
                        f"folder {root.resolve()}; choose another name or fix the links there")
    return target


def refuse_existing(target, overwrite):
    if target.exists() and not overwrite:
        raise UserError(f"{target}: LM Studio already has a model file here; pass --overwrite to replace it")


def place_in_lmstudio(gguf_path, target, overwrite):
    refuse_existing(target, overwrite)
    with atomic.atomic_path(target, replace=overwrite) as tmp:
        shutil.copyfile(gguf_path, tmp)
    return target


def chat_family(tokenizer):
    """The OLLAMA_TEMPLATES family of the tokenizer's chat template, or None."""
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    for family, (marker, _) in OLLAMA_TEMPLATES.items():
        if marker in template:
            return family
    return None


def default_system_prompt(tokenizer):
    """The system text the chat template inserts when a conversation has none (SmolLM2 does), or None."""
    family = chat_family(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    if family == "chatml":
        found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, flags=re.S)
    elif family == "llama3":
        found = re.search(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", text, flags=re.S)
    else:
        found = None
    return found.group(1) if found else None


def _quoted(text):
    if '"""' in text:
        raise UserError('the system prompt contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_path, tokenizer, stop_tokens, system_prompt=None, adapter_name=None):
    """Text of an Ollama Modelfile: FROM `gguf_path` (a file name means: beside the Modelfile), with a
    GGUF LoRA adapter beside it when `adapter_name` is given."""
    family = chat_family(tokenizer)
    if family is None:
        raise UserError(f"the model's chat template is not one an Ollama template can be written for "
                        f"(known: {', '.join(OLLAMA_TEMPLATES)})")
    system_prompt = system_prompt if system_prompt is not None else default_system_prompt(tokenizer)
    lines = [f"FROM {gguf_path if Path(gguf_path).is_absolute() else './' + str(gguf_path)}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    lines.append(f"TEMPLATE {_quoted(OLLAMA_TEMPLATES[family][1])}")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    if system_prompt:
        lines.append(f"SYSTEM {_quoted(system_prompt)}")
    return "\n".join(lines) + "\n"
