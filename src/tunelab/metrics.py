"""Task metrics on generated answers: one registry, each metric defined once.

A metric takes (prediction, gold, schema) and returns a Verdict. `schema` is the SQL of the
row's CREATE TABLE statements (see find_schema); string metrics ignore it.

  exact          exact string match after trimming
  normalized     case, whitespace and trailing-semicolon insensitive
  sql-canonical  both queries parsed and printed by sqlglot (SQLite dialect) and compared
  sql-exec       execution accuracy over several random fillings of the schema's tables, in the
                 manner of test-suite accuracy (Zhong et al., 2020): every filling must agree
"""

import math
import random
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass

from tunelab.errors import UserError


@dataclass
class Verdict:
    correct: bool
    note: str = ""


def exact(prediction, gold, schema=None):
    return Verdict(prediction.strip() == gold.strip())


def _normalize(text):
    return re.sub(r"\s+", " ", text.strip().rstrip(";").strip()).lower()


def normalized(prediction, gold, schema=None):
    return Verdict(_normalize(prediction) == _normalize(gold))


def _sql_text(answer):
    """The SQL of an answer: the inside of a ```sql fenced block when there is one."""
    fenced = re.search(r"```[ \t]*(?:sql|sqlite)?[ \t]*\n?(.*?)```", answer, flags=re.IGNORECASE | re.DOTALL)
    return (fenced.group(1) if fenced else answer).strip()


def _parse(sql):
    """sqlglot's tree of one SQLite query, or None when it is not one."""
    import sqlglot
    from sqlglot import exp

    try:
        trees = [t for t in sqlglot.parse(sql.strip().rstrip(";"), read="sqlite") if t is not None]
    except sqlglot.errors.SqlglotError:
        return None
    if len(trees) != 1 or not isinstance(trees[0], exp.Query):
        return None
    return trees[0]


def _canonical(tree):
    return tree.sql(dialect="sqlite", normalize=True, pretty=True)


def sql_canonical(prediction, gold, schema=None):
    pred_tree, gold_tree = _parse(_sql_text(prediction)), _parse(gold)
    if pred_tree is None:
        return Verdict(False, "prediction is not a parseable SQL query")
    if gold_tree is None:
        return Verdict(False, "gold answer is not a parseable SQL query")
    return Verdict(_canonical(pred_tree) == _canonical(gold_tree))


# ---- execution accuracy ------------------------------------------------------------------

FILLINGS = 5          # random databases per row; a match must hold on all of them
ROWS_PER_TABLE = 12
TIME_LIMIT_S = 2.0    # per query
MAX_RESULT_ROWS = 10_000


def find_schema(*texts):
    """Every CREATE TABLE statement in the texts (balanced parentheses), joined with ';'.

    A table met twice (the schema in the prompt and again in a `context` field) is kept once.
    """
    statements = {}
    for text in texts:
        for match in re.finditer(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([`\"\[]?[\w.]+)", text or "",
                                 flags=re.IGNORECASE):
            start = match.start()
            open_at = text.find("(", match.end())
            if open_at == -1:
                continue
            depth = 0
            for i in range(open_at, len(text)):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    statements.setdefault(match.group(1).strip('`"[').lower(), text[start:i + 1])
                    break
    return ";\n".join(statements.values())


def _gold_literals(tree):
    """Literals the gold query's tree mentions, by kind, so fillings hold rows its WHERE selects."""
    from sqlglot import exp

    strings, numbers = [], []
    if tree is not None:
        for literal in tree.find_all(exp.Literal):
            if literal.is_string:
                strings.append(literal.this)
            else:
                try:
                    numbers.append(float(literal.this) if "." in literal.this else int(literal.this))
                except ValueError:
                    pass
    return strings, numbers


def _random_value(rng, sql_type, strings, numbers):
    if rng.random() < 0.08:
        return None
    numeric = any(t in sql_type.upper() for t in ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC"))
    if numeric:
        if numbers and rng.random() < 0.4:
            return rng.choice(numbers)
        return rng.randint(-5, 60) if "INT" in sql_type.upper() else round(rng.uniform(-5, 60), 2)
    if strings and rng.random() < 0.4:
        return rng.choice(strings)
    if numbers and rng.random() < 0.15:  # text columns compared with numbers (common in WikiSQL)
        return str(rng.choice(numbers))
    return rng.choice(["alpha", "beta", "gamma", "delta", "x", "y", "z", "Alpha", "10", "3"])


def _fill(db, rng, strings, numbers):
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        columns = db.execute(f'PRAGMA table_info("{table}")').fetchall()  # (cid, name, type, ...)
        rows = [[_random_value(rng, c[2] or "", strings, numbers) for c in columns]
                for _ in range(ROWS_PER_TABLE)]
        marks = ", ".join("?" * len(columns))
        db.executemany(f'INSERT INTO "{table}" VALUES ({marks})', rows)


def _run(db, sql):
    """Rows of `sql`, or raise sqlite3.Error; a query past the time limit is interrupted."""
    deadline = time.monotonic() + TIME_LIMIT_S
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = db.execute(sql).fetchmany(MAX_RESULT_ROWS + 1)
    finally:
        db.set_progress_handler(None, 0)
    if len(rows) > MAX_RESULT_ROWS:
        raise sqlite3.OperationalError(f"more than {MAX_RESULT_ROWS} result rows")
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


def sql_exec(prediction, gold, schema, seed=0):
    if not schema:
        return Verdict(False, "no CREATE TABLE schema found for this row")
    prediction = _sql_text(prediction).rstrip(";")
    gold_tree = _parse(gold)
    strings, numbers = _gold_literals(gold_tree)
    ordered = gold_tree is not None and gold_tree.args.get("order") is not None
    for filling in range(FILLINGS):
        db = sqlite3.connect(":memory:")
        try:
            try:
                db.executescript(schema)
            except sqlite3.Error as e:
                return Verdict(False, f"schema does not run in SQLite: {e}")
            _fill(db, random.Random(f"{seed}-{filling}"), strings, numbers)
            try:
                expected = _run(db, gold)
            except sqlite3.Error as e:
                return Verdict(False, f"gold query fails: {e}")
            try:
                got = _run(db, prediction)
            except sqlite3.Error as e:
                note = "time limit exceeded" if "interrupted" in str(e) else f"prediction fails: {e}"
                return Verdict(False, note)
            same = got == expected if ordered else Counter(got) == Counter(expected)
            if not same:
                return Verdict(False, f"different result on filling {filling + 1}")
        finally:
            db.close()
    return Verdict(True)


def wilson_interval(correct, total, z=1.96):
    """95% Wilson score interval of a proportion (sound at 0/n and n/n, unlike the normal one)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


METRICS = {
    "exact": exact,
    "normalized": normalized,
    "sql-canonical": sql_canonical,
    "sql-exec": sql_exec,
}


LOSS = "loss"  # not a verdict on the answer: mean cross-entropy of the gold answer (and its ppl)


def check_names(names):
    unknown = [n for n in names if n not in METRICS and n != LOSS]
    if unknown:
        raise UserError(f"--metric: unknown metric {', '.join(map(repr, unknown))} "
                        f"(available: {', '.join([*METRICS, LOSS])})")


def get(name):
    if name not in METRICS:
        raise UserError(f"unknown metric {name!r} (available: {', '.join(METRICS)})")
    return METRICS[name]
