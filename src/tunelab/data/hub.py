"""mlx-lm's Hugging Face data for `lora`: its `hf_dataset` key (one mapping or a list of them: path,
config, train_split, valid_split, test_split, prompt_feature, completion_feature, text_feature,
chat_feature) and `--data <dataset id>` (a dataset with train, valid and test splits).

The rows are written as a data folder (train/valid/test.jsonl in tunelab's formats: prompt and
completion, messages, or text), so every check, the data hashes and exact resume work on them
as on a folder the user made. mlx-lm's rule picks each dataset's format from its first row:
prompt and completion features, else the chat feature, else the text feature.
"""

import json
from pathlib import Path

from tunelab import atomic
from tunelab.errors import UserError

KEYS = ("path", "config", "train_split", "valid_split", "test_split", "prompt_feature", "completion_feature",
        "text_feature", "chat_feature", "name")
SPLITS = {"train": "train[:80%]", "valid": "train[-10%:]", "test": None}   # mlx-lm's defaults


def is_hub_id(data):
    """Whether --data names a Hugging Face dataset rather than a folder: not a path that exists, and
    shaped like an id (owner/name)."""
    path = Path(data)
    return not path.exists() and data.count("/") == 1 and not data.startswith((".", "/", "~"))


def check(hf_dataset):
    """Problems of an hf_dataset value, every one at once."""
    entries = hf_dataset if isinstance(hf_dataset, list) else [hf_dataset]
    problems = []
    for i, entry in enumerate(entries):
        where = "hf_dataset" + (f"[{i}]" if isinstance(hf_dataset, list) else "")
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping (path, train_split, ...), got {entry!r}")
            continue
        unknown = sorted(set(entry) - set(KEYS) - {"mask_prompt"})
        if unknown:
            problems.append(f"{where}: {', '.join(unknown)}: unknown (it takes {', '.join(KEYS)})")
        if not isinstance(entry.get("path"), str) or not entry.get("path"):
            problems.append(f"{where}.path: expected the dataset's id or folder, got {entry.get('path')!r}")
        if not isinstance(entry.get("config", {}), dict):
            problems.append(f"{where}.config: expected a mapping of load_dataset arguments, got {entry['config']!r}")
        problems += [f"{where}.{k}: expected a string, got {entry[k]!r}" for k in KEYS
                     if k not in ("path", "config") and k in entry and not isinstance(entry[k], str)]
    return problems


def _load(path, split, config):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: reading Hugging Face datasets needs the datasets package: "
                        "pip install 'tunelab[datasets]'") from None
    try:
        return datasets.load_dataset(path, split=split, **config)
    except Exception as e:   # the library raises many types; the user needs the message
        raise UserError(f"{path}: could not load split {split!r}: {type(e).__name__}: {e}") from None


def _rows(dataset, entry, where):
    """The dataset's rows in tunelab's formats, by mlx-lm's rule on the first row."""
    prompt, completion = entry.get("prompt_feature", "prompt"), entry.get("completion_feature", "completion")
    chat, text = entry.get("chat_feature", "messages"), entry.get("text_feature", "text")
    if len(dataset) == 0:
        return []
    first = dataset[0]
    if prompt in first and completion in first:
        return [{"prompt": row[prompt], "completion": row[completion]} for row in dataset]
    if chat in first:
        return [{"messages": row[chat], **({"tools": row["tools"]} if row.get("tools") else {})} for row in dataset]
    if text in first:
        return [{"text": row[text]} for row in dataset]
    raise UserError(f"{where}: its rows have {', '.join(sorted(first))}: none of {prompt} and {completion}, {chat}, "
                    f"or {text}; name the features with prompt_feature, completion_feature, chat_feature or "
                    "text_feature")


def write_folder(folder, splits, hf_dataset=None, data_id=None, log=print):
    """Write `splits` (of train, valid, test) of the hf_dataset entries, or of the dataset `data_id`, to
    `folder` (a new one) as <split>.jsonl; several entries are concatenated in order. Returns the folder."""
    entries = (hf_dataset if isinstance(hf_dataset, list) else [hf_dataset]) if hf_dataset else \
        [{"path": data_id, **{f"{s}_split": s for s in SPLITS}}]
    out = {split: [] for split in splits}
    for entry in entries:
        for split in splits:
            name = entry.get(f"{split}_split", SPLITS[split])
            if name is None:
                raise UserError(f"hf_dataset {entry['path']}: test_split: missing, and --test needs one")
            log(f"Loading Hugging Face dataset {entry['path']} ({name})")
            out[split] += _rows(_load(entry["path"], name, entry.get("config", {})), entry,
                                f"hf_dataset {entry['path']} ({name})")
    with atomic.atomic_dir(folder) as tmp:
        for split, rows in out.items():
            if not rows:
                raise UserError(f"{split} split of {', '.join(e['path'] for e in entries)}: no rows")
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n"
                                                        for row in rows), encoding="utf-8")
    log(f"Wrote {', '.join(f'{len(rows)} {split}' for split, rows in out.items())} rows to {folder}")
    return Path(folder)
