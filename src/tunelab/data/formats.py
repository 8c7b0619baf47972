"""Row formats of the data files (the ones mlx-lm reads) and their validation.

A data file is JSON Lines: one object a line, in one of the formats of FORMATS. Every row
is checked, not only the first, and every problem is reported with its file, line and field.
"""

import json
from pathlib import Path

from tunelab.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def _check_tool_calls(calls, where):
    if not isinstance(calls, list) or not calls:
        return [(where, "expected a non-empty list of {type: function, function: {name, arguments}}")]
    problems = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append((f"{where}[{j}].function.name", "expected the called function's name"))
        elif not isinstance(fn.get("arguments", {}), (dict, str)):
            problems.append((f"{where}[{j}].function.arguments", "expected an object (or a JSON string)"))
    return problems


def _check_message(m, where):
    """Problems of one message; an assistant message may hold tool_calls instead of content."""
    if not isinstance(m, dict):
        return [(where, "expected an object with role and content")]
    if m.get("role") not in ROLES:
        return [(f"{where}.role", f"{m.get('role')!r} is not one of {', '.join(ROLES)}: use one of these roles")]
    if m["role"] == "assistant" and "tool_calls" in m:
        problems = _check_tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if m.get("content") not in (None, "") and not isinstance(m.get("content"), str):
            problems.append((f"{where}.content", "expected a string (or nothing, beside tool_calls)"))
        return problems
    if "content" not in m:
        return [(f"{where}.content", "missing: every message needs its text")]
    if not isinstance(m["content"], str):
        return [(f"{where}.content", f"expected a string, got {type(m['content']).__name__}")]
    if not m["content"].strip():
        return [(f"{where}.content", "empty: remove the message or give it text")]
    return []


# role -> the roles that may come right before it (None: first message)
_MAY_FOLLOW = {"system": (None,), "user": (None, "system", "assistant", "tool"),
               "assistant": ("user", "tool"), "tool": ("assistant", "tool")}


def _check_order(messages):
    problems = []
    for i, m in enumerate(messages):
        before = messages[i - 1] if i else None
        previous = before["role"] if before else None
        if previous not in _MAY_FOLLOW[m["role"]]:
            problems.append((f"messages[{i}].role", f"{m['role']} cannot follow "
                             f"{previous or 'the start'}: order turns as system?, user, assistant, ..."))
        elif m["role"] == "tool" and previous == "assistant" and "tool_calls" not in before:
            problems.append((f"messages[{i}].role", "tool result without a tool call in the assistant "
                             "message before it"))
    return problems


def _check_chat(row):
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return [("messages", "expected a non-empty list of {role, content} objects")]
    problems = []
    for i, m in enumerate(messages):
        problems += _check_message(m, f"messages[{i}]")
    if problems:
        return problems
    problems += _check_order(messages)
    if messages[-1]["role"] != "assistant":
        problems.append(("messages", "the last message must be the assistant's answer"))
    uses_tools = any(m["role"] == "tool" or "tool_calls" in m for m in messages)
    if "tools" in row:
        problems += _check_tools(row["tools"])
    elif uses_tools:
        problems.append(("tools", "missing: a row with tool calls needs the list of tools the model may call"))
    return problems


def _check_tools(tools):
    if not isinstance(tools, list) or not tools:
        return [("tools", "expected a non-empty list of {type: function, function: {name, parameters}}")]
    problems = []
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append((f"tools[{j}].function.name", "expected the tool's name"))
    return problems


def _check_completions(row):
    problems = []
    for key in ("prompt", "completion"):
        if key not in row:
            problems.append((key, "missing"))
        elif not isinstance(row[key], str):
            problems.append((key, f"expected a string, got {type(row[key]).__name__}"))
        elif key == "completion" and not row[key].strip():
            problems.append((key, "empty: there is nothing to train on"))
    return problems


def _check_text(row):
    if not isinstance(row.get("text"), str) or not row["text"]:
        return [("text", "expected a non-empty string")]
    return []


# Format name -> (the key that identifies it, the row check). `tools` rows are chat rows with a
# `tools` list (and assistant `tool_calls`, `tool` results); they may share a file with chat rows.
FORMATS = {
    "tools": ("tools", _check_chat),
    "chat": ("messages", _check_chat),
    "completions": ("prompt", _check_completions),
    "text": ("text", _check_text),
}
_FAMILY = {"tools": "chat", "chat": "chat", "completions": "completions", "text": "text"}


def detect_format(row):
    for name, (key, _) in FORMATS.items():
        if key in row:
            return name
    return None


_JSON_TYPES = {"list": "an array", "str": "a string", "int": "a number", "float": "a number",
               "bool": "true or false", "NoneType": "null"}


def _parse_line(path, line_no, line):
    """One line of a JSON Lines file: (object, None), or (None, the problem with its file and line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, (f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}): "
                      "write one JSON object per line")
    except RecursionError:
        return None, (f"{path}:{line_no}: nested too deeply to read (arrays or objects inside one another "
                      "hundreds of levels deep): write each row as a flat JSON object")
    if not isinstance(obj, dict):
        got = _JSON_TYPES.get(type(obj).__name__, type(obj).__name__)
        return None, f"{path}:{line_no}: expected a JSON object, got {got}: write one JSON object per line"
    return obj, None


def json_lines(path, text):
    """The JSON objects of JSON Lines `text`, as (line number, object); and (line number, problem)
    for each bad line."""
    # JSON Lines ends lines at "\n" only: str.splitlines would also break inside strings at \x85, \u2028, ...
    return _parse_lines(path, enumerate(text.split("\n"), start=1), [])


def _parse_lines(path, numbered_lines, problems):
    """The objects of (line number, text) pairs, and `problems` with every bad line's added, in line order."""
    objects = []
    for line_no, line in numbered_lines:
        if not line.strip():
            continue
        obj, problem = _parse_line(path, line_no, line)
        if problem:
            problems.append((line_no, problem))
        else:
            objects.append((line_no, obj))
    return objects, sorted(problems, key=lambda p: p[0])


def _file_bytes(path, what):
    """The bytes of a JSON Lines file; UserError when it is missing, a folder or not text at all."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a {what}: give the path of a .jsonl file")
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    raw = path.read_bytes()
    if b"\0" in raw:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise UserError(f"{path}: a binary file{' (UTF-16 text)' if utf16 else ''}, not JSON Lines text: "
                        "save the data as UTF-8 text, one JSON object a line")
    return raw


def _utf8_lines(path, raw):
    """(numbered lines of `raw` split at b"\\n", [(line, problem)] for each line that is not UTF-8)."""
    try:
        return list(enumerate(raw.decode("utf-8").split("\n"), start=1)), []
    except UnicodeDecodeError:
        pass
    lines, problems, offset = [], [], 0
    for line_no, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append((line_no, chunk.decode("utf-8")))
        except UnicodeDecodeError as e:
            problems.append((line_no, f"{path}:{line_no}: not UTF-8 text (byte 0x{chunk[e.start]:02x} at byte "
                                      f"offset {offset + e.start} of the file): save the file as UTF-8"))
        offset += len(chunk) + 1
    return lines, problems


def read_json_lines(path, what="data file"):
    """Read a JSON Lines file: its objects [(line, object)] and its bad lines [(line, problem)] (not valid
    JSON, not an object, not UTF-8, nested too deeply). A missing, folder or binary file raises UserError."""
    lines, problems = _utf8_lines(path, _file_bytes(path, what))
    return _parse_lines(path, lines, problems)


def scan_rows(path):
    """Read and check every line of a JSONL data file: (rows [(line, row)], format name, problems
    [(line, text)]); rows with problems are left out of `rows`. A file that cannot hold rows at all
    (missing, a folder, binary, empty) raises UserError."""
    path = Path(path)
    objects, problems = read_json_lines(path)
    if not objects and not problems:
        raise UserError(f"{path}: the file has no rows: write one JSON object a line")
    rows, file_format = [], None
    for line_no, row in objects:
        name = detect_format(row)
        if name is None:
            problems.append((line_no, f"{path}:{line_no}: unknown row format: expected a 'messages' (with "
                                      "'tools' for tool calls), 'prompt'/'completion' or 'text' field"))
            continue
        if file_format is None:
            file_format = name
        elif _FAMILY[name] != _FAMILY[file_format]:
            problems.append((line_no, f"{path}:{line_no}: this row is {name} but earlier rows are "
                                      f"{file_format}: use one format per file"))
            continue
        elif name == "tools":
            file_format = "tools"
        found = [(line_no, f"{path}:{line_no}: {field}: {what}") for field, what in FORMATS[name][1](row)]
        problems += found
        if not found:
            rows.append((line_no, row))
    return rows, file_format, sorted(problems, key=lambda p: p[0])


def read_rows(path):
    """Read and validate a JSONL data file; return (rows, format name), or raise every problem at once."""
    rows, file_format, problems = scan_rows(path)
    UserError.raise_if([text for _, text in problems])
    return [row for _, row in rows], file_format


def quarantine(path, problems, dest):
    """Write the lines of `path` that have problems to `dest` (JSON Lines: line, problems, the raw text)."""
    lines = Path(path).read_bytes().decode("utf-8", errors="backslashreplace").split("\n")
    by_line = {}
    for line_no, text in problems:
        by_line.setdefault(line_no, []).append(text)
    with open(dest, "w", encoding="utf-8") as f:
        for line_no, texts in sorted(by_line.items()):
            if line_no:
                f.write(json.dumps({"line": line_no, "problems": texts, "text": lines[line_no - 1]},
                                   ensure_ascii=False) + "\n")
    return len([n for n in by_line if n])
