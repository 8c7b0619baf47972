"""Convert mlx-examples' WikiSQL files into rows shaped like b-mc2/sql-create-context, for text-to-SQL accuracy.

Source: lora/data/{train,valid,test}.jsonl of github.com/ml-explore/mlx-examples (1000 / 100 / 100 rows), read
from a checkout (--mlx-examples PATH) or, by `git show <rev>:lora/data/...`, from a bare mirror of it.
Each row there is {"text": "table: 1-10015132-11\\ncolumns: Player, No., ...\\nQ: <question>\\nA: <sql>"} with
WikiSQL's loose SQL, SELECT [MAX|MIN|COUNT|SUM|AVG] <column> FROM <table> [WHERE <column> =|>|< <value> [AND ...]]:
names unquoted (spaces, slashes, parentheses), values mostly in single quotes that are never escaped.

Each row becomes {"question", "context", "answer"} as in sql-create-context:
  {"question": "What position does the player who played for butler cc (ks) play?",
   "context": "CREATE TABLE table_10015132_11 (position VARCHAR, school_club_team VARCHAR)",
   "answer": "SELECT position FROM table_10015132_11 WHERE school_club_team = \\"Butler CC (KS)\\""}
Conventions:
  - table 1-10015132-11 -> table_10015132_11 (leading "1-" dropped, other non-alphanumerics -> "_");
  - column -> ASCII, lower case, "#" -> "number" and "%" -> "percent" as words, each run of other characters
    -> "_", no leading/trailing "_", "_" before a leading digit, "_2" appended where two columns would collide;
  - CREATE TABLE lists only the columns the query uses (select column, then where columns in order); a column
    compared with a bare number by > or < is INTEGER and its numbers are written unquoted, every other column is
    VARCHAR and its values are double-quoted strings (a double quote inside doubled), numbers included ("3");
  - aggregates are written COUNT(column).
Column names are matched against the row's `columns:` list (a ", " inside parentheses stays in one name), and a
value ends only where the rest still reads as " AND <column> <op> <value>" or the end, so "O'Bryant" parses; a value
never holds " AND <column> <op> " itself. A row with no reading or more than one, with a string value that SQLite
would read as a column name, or whose CREATE TABLE and answer do not run in an in-memory SQLite database, is
skipped and counted.

Usage:
  python bench/wikisql_rows.py --mlx-examples PATH --out DIR     # DIR/wikisql-{train,valid,test}.jsonl
Then, with tunelab (prepare shuffles; --num-rows -1 takes every row):
  tunelab prepare --source DIR --keep-splits --num-rows -1 --out wikisql-chat
      keeps mlx-examples' own splits as train/valid/test.jsonl. The folder is read by the datasets library
      (pip install 'tunelab[datasets]'), which finds the splits by the words train/valid/test in the file names:
      keep other such files out of DIR and put --out outside it.
  tunelab prepare --source DIR/wikisql-train.jsonl --num-rows -1 --valid-rows 100 --test-rows 100 --out wikisql-chat
      one file, split by prepare (counts, or shares below 1; 0 is allowed and leaves that file empty). To split all
      rows: cat DIR/wikisql-{train,valid,test}.jsonl > wikisql-all.jsonl and use that as --source.
"""

import argparse
import json
import re
import sqlite3
import subprocess
import unicodedata
from collections import Counter
from pathlib import Path

SPLITS = ("train", "valid", "test")
AGGREGATES = ("MAX", "MIN", "COUNT", "SUM", "AVG")
OPERATORS = ("=", ">", "<")
NUMBER = re.compile(r"-?\d+(\.\d+)?")
ROW = re.compile(r"table: (?P<table>[^\n]+)\ncolumns: (?P<columns>[^\n]+)\nQ: (?P<question>[^\n]*)\nA: (?P<sql>[^\n]+)")
ROWID_NAMES = {"rowid", "oid", "_rowid_"}


class Skip(Exception):
    """A row that cannot be converted; args: (kind, detail)."""


def read_lines(mlx_examples, rev, split):
    folder = Path(mlx_examples)
    path = folder / "lora" / "data" / f"{split}.jsonl"
    if path.is_file():
        return path.read_text(encoding="utf-8").splitlines()
    shown = subprocess.run(["git", "-C", str(folder), "show", f"{rev}:lora/data/{split}.jsonl"],
                           check=True, capture_output=True, text=True, encoding="utf-8")
    return shown.stdout.splitlines()


def split_columns(text):
    """The `columns:` list; a ", " inside parentheses belongs to one name ("Age (years, days)"). Then, as names
    a query may also use, two or three neighbours joined by ", " ("Amount of trees, that require replacement")."""
    columns = []
    for piece in text.split(", "):
        if columns and columns[-1].count("(") > columns[-1].count(")"):
            columns[-1] += ", " + piece
        else:
            columns.append(piece)
    joined = [", ".join(columns[i:i + n]) for n in (2, 3) for i in range(len(columns) - n + 1)]
    return columns + joined


def identifiers(columns):
    """Column name -> sql-create-context identifier, unique within the table."""
    names, taken = {}, set()
    for column in columns:
        plain = unicodedata.normalize("NFKD", column).encode("ascii", "ignore").decode().lower()
        plain = plain.replace("#", " number ").replace("%", " percent ")
        base = re.sub(r"[^a-z0-9]+", "_", plain).strip("_") or "column"
        base = "_" + base if base[0].isdigit() else base
        name, n = base, 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        names.setdefault(column, name)
    return names


def table_name(table_id):
    return "table_" + re.sub(r"[^0-9A-Za-z]+", "_", table_id.removeprefix("1-")).strip("_")


def value_ends(text):
    """(value, rest) for every place a value at the start of `text` ('quoted' or bare) could end."""
    if text.startswith("'"):
        return [(text[1:i], text[i + 1:]) for i in range(1, len(text)) if text[i] == "'"]
    ends = [m.start() for m in re.finditer(" AND ", text)] + [len(text)]
    return [(text[:i], text[i:]) for i in ends if i and "'" not in text[:i]]


def where_readings(text, columns):
    """Every reading of `text` as <column> <op> <value> [AND ...]: a list of condition tuples."""
    found = []
    for column in columns:
        for op in OPERATORS:
            head = f"{column} {op} "
            if not text.startswith(head):
                continue
            for value, rest in value_ends(text[len(head):]):
                if any(f" AND {other} {o} " in value for other in columns for o in OPERATORS):
                    continue  # a value never holds a further condition: 'A' AND B = 'C' is two
                condition = (column, op, value)
                if rest == "":
                    found.append((condition,))
                elif rest.startswith(" AND "):
                    found += [(condition,) + more for more in where_readings(rest[len(" AND "):], columns)]
    return found


def parse(sql, table, columns):
    """(aggregate or None, select column, conditions) of one WikiSQL query, or Skip."""
    marker = f" FROM {table}"
    if not sql.startswith("SELECT ") or sql.count(marker) != 1:
        raise Skip("sql", f"not 'SELECT ... FROM {table} ...': {sql}")
    select_text, where_text = sql[len("SELECT "):].split(marker)
    options = [(None, select_text)] + [(agg, select_text[len(agg) + 1:]) for agg in AGGREGATES
                                       if select_text.startswith(agg + " ")]
    selects = [(agg, column) for agg, column in options if column in columns]
    if len(selects) != 1:
        raise Skip("select", f"{len(selects)} readings of {select_text!r} against the columns: {sql}")
    if where_text == "":
        return selects[0] + ((),)
    if not where_text.startswith(" WHERE "):
        raise Skip("sql", f"unexpected text after the table: {sql}")
    readings = set(where_readings(where_text[len(" WHERE "):], columns))
    if len(readings) != 1:
        raise Skip("where", f"{len(readings)} readings of the WHERE clause: {sql}")
    return selects[0] + (readings.pop(),)


def sql_string(value):
    return '"' + value.replace('"', '""') + '"'


def convert(text):
    """One mlx-examples `text` -> {"question", "context", "answer"}, checked in SQLite, or Skip."""
    match = ROW.fullmatch(text)
    if not match:
        raise Skip("format", f"not 'table/columns/Q/A' lines: {text[:80]!r}")
    columns = split_columns(match["columns"])
    aggregate, select, conditions = parse(match["sql"], match["table"], columns)
    names, table = identifiers(columns), table_name(match["table"])
    numeric = {column for column, op, value in conditions if op in "<>" and NUMBER.fullmatch(value)}
    used = list(dict.fromkeys([select] + [column for column, _, _ in conditions]))
    context = f"CREATE TABLE {table} (" + ", ".join(
        f"{names[c]} {'INTEGER' if c in numeric else 'VARCHAR'}" for c in used) + ")"
    clauses = []
    for column, op, value in conditions:
        bare = column in numeric and NUMBER.fullmatch(value)
        if not bare and value.lower() in {names[c] for c in used} | ROWID_NAMES:
            raise Skip("literal", f"{sql_string(value)} would read as a column in SQLite: {match['sql']}")
        clauses.append(f"{names[column]} {op} {value if bare else sql_string(value)}")
    target = f"{aggregate}({names[select]})" if aggregate else names[select]
    answer = f"SELECT {target} FROM {table}" + (" WHERE " + " AND ".join(clauses) if clauses else "")
    db = sqlite3.connect(":memory:")
    try:
        db.execute(context)
        db.execute(answer).fetchall()
    except sqlite3.Error as e:
        raise Skip("sqlite", f"{e}: {context}; {answer}") from None
    finally:
        db.close()
    return {"question": match["question"].strip(), "context": context, "answer": answer}


def convert_file(lines, out_path):
    """Write the converted rows of `lines` to out_path; returns (rows read, rows written, [(line, kind, detail)])."""
    written, skipped = 0, []
    with open(out_path, "w", encoding="utf-8") as f:
        for number, line in enumerate(lines, 1):
            try:
                row = convert(json.loads(line)["text"])
            except Skip as e:
                skipped.append((number, *e.args))
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
    return len(lines), written, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Folder for wikisql-train/valid/test.jsonl.")
    parser.add_argument("--mlx-examples", required=True,
                        help="a checkout of github.com/ml-explore/mlx-examples, or a bare git mirror of it")
    parser.add_argument("--rev", default="HEAD", help="Revision to read from a git mirror (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        path = out / f"wikisql-{split}.jsonl"
        read, written, skipped = convert_file(read_lines(args.mlx_examples, args.rev, split), path)
        kinds = ", ".join(f"{kind} {n}" for kind, n in Counter(kind for _, kind, _ in skipped).most_common())
        print(f"{path}: read {read}, written {written}, skipped {len(skipped)}" + (f" ({kinds})" if kinds else ""))
        for number, kind, detail in skipped[:3]:
            print(f"  line {number}: {kind}: {detail}")


if __name__ == "__main__":
    main()
