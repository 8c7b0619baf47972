"""Where `prepare` reads source rows from: builtin:sql, a local file, or a Hugging Face dataset
(by id, or a local folder copy of a dataset repository).

Each source yields a list of flat dicts (column name -> value).
"""

import csv
import json
from pathlib import Path

from tunelab.data.formats import json_lines
from tunelab.errors import UserError, utf8_text

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _read_json_file(path):
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, list):  # JSON Lines, also accepted under .json
        objects, problems = json_lines(path, text)
        UserError.raise_if([text for _, text in problems])
        return [obj for _, obj in objects]
    UserError.raise_if([f"{path}: item {i}: expected a JSON object" for i, r in enumerate(data)
                        if not isinstance(r, dict)])
    return data


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_parquet(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_local(path):
    path = Path(path)
    readers = {".jsonl": _read_json_file, ".json": _read_json_file, ".csv": _read_csv,
               ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}: use one of {', '.join(LOCAL_SUFFIXES)}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a data file")
    if path.suffix != ".parquet":   # text: checked whole, so a bad byte is named at its place in the file
        utf8_text(path)
    try:
        rows = readers[path.suffix](path)
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to read: write each row as a flat JSON object") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    if not rows:
        raise UserError(f"{path}: the file has no rows")
    return rows


def read_hub(dataset_id, split, dataset_config=None, revision=None):
    """Load a Hugging Face dataset split (the datasets library's cache and offline mode apply)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{dataset_id}: reading Hugging Face datasets needs the datasets package: "
                        "pip install 'tunelab[datasets]'") from None
    try:
        dataset = datasets.load_dataset(dataset_id, name=dataset_config, split=split, revision=revision)
    except Exception as e:  # the library raises many types; the user needs the message
        raise UserError(f"{dataset_id}: could not load split {split!r} of this Hugging Face dataset: "
                        f"{type(e).__name__}: {e}") from None
    return [dict(row) for row in dataset]


def read_source(source, split="train", seed=0, num_rows=150, dataset_config=None, revision=None):
    """Return the rows of `source` as a list of dicts."""
    if source.startswith("builtin:"):
        from tunelab.data import builtin_sql

        name = source.split(":", 1)[1]
        if name != "sql":
            raise UserError(f"{source}: unknown builtin source (available: builtin:sql)")
        return builtin_sql.generate(max(num_rows, 1) if num_rows >= 0 else 1000, seed)
    path = Path(source)
    if path.is_dir():  # a local copy of a dataset repository: the datasets library reads it
        return read_hub(str(path), split, dataset_config, revision)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.exists():
            raise UserError(f"{path}: source file not found")
        return read_local(path)
    return read_hub(source, split, dataset_config, revision)
