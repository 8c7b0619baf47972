"""Row formats of the data files (the ones mlx-lm reads) and their validation.

A data file is JSON Lines: one object a line, in one of the formats of FORMATS. Every row
is checked, not only the first, and every problem is reported with its file, line and field.
"""

import json
from pathlib import Path

from tunelab.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def _check_chat(row):
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return [("messages", "expected a non-empty list of {role, content} objects")]
    problems = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append((where, "expected an object with role and content"))
            continue
        if m.get("role") not in ROLES:
            problems.append((f"{where}.role", f"{m.get('role')!r} is not one of {', '.join(ROLES)}"))
        if not isinstance(m.get("content"), str):
            problems.append((f"{where}.content", "expected a string"))
    if not problems and messages[-1]["role"] != "assistant":
        problems.append(("messages", "the last message must be the assistant's answer"))
    return problems


def _check_completions(row):
    return [(key, "expected a string") for key in ("prompt", "completion")
            if not isinstance(row.get(key), str)]


def _check_text(row):
    if not isinstance(row.get("text"), str) or not row["text"]:
        return [("text", "expected a non-empty string")]
    return []


# Format name -> (the key that identifies it, the row check).
FORMATS = {
    "chat": ("messages", _check_chat),
    "completions": ("prompt", _check_completions),
    "text": ("text", _check_text),
}


def detect_format(row):
    for name, (key, _) in FORMATS.items():
        if key in row:
            return name
    return None


def json_lines(path, text):
    """The JSON objects of JSON Lines `text`, as (line number, object); and (line number, problem)
    for each bad line."""
    objects, problems = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((line_no, f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}): "
                                      "write one JSON object per line"))
            continue
        if not isinstance(obj, dict):
            problems.append((line_no, f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}"))
            continue
        objects.append((line_no, obj))
    return objects, problems


def read_rows(path):
    """Read and validate a JSONL data file; return (rows, format name)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    objects, problems = json_lines(path, path.read_text(encoding="utf-8"))
    rows, file_format = [], None
    for line_no, row in objects:
        name = detect_format(row)
        if name is None:
            problems.append((line_no, f"{path}:{line_no}: unknown row format: expected a 'messages', "
                                      "'prompt'/'completion' or 'text' field"))
            continue
        if file_format is None:
            file_format = name
        elif name != file_format:
            problems.append((line_no, f"{path}:{line_no}: this row is {name} but earlier rows are "
                                      f"{file_format}: use one format per file"))
            continue
        problems += [(line_no, f"{path}:{line_no}: {field}: {what}") for field, what in FORMATS[name][1](row)]
        rows.append(row)
    if not rows and not problems:
        problems.append((0, f"{path}: the file has no rows"))
    UserError.raise_if([text for _, text in sorted(problems, key=lambda p: p[0])])
    return rows, file_format
