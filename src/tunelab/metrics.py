"""Task metrics on generated answers: one registry, each metric defined once.

A metric takes (prediction, gold, schema) and returns a Verdict. `schema` is the SQL of the
row's CREATE TABLE statements (see find_schema); string metrics ignore it.

  exact          exact string match after trimming
  normalized     case, whitespace and trailing-semicolon insensitive
  sql-canonical  both queries parsed and printed by sqlglot (SQLite dialect) and compared
  sql-exec       execution accuracy over several random fillings of the schema's tables, in the
                 manner of test-suite accuracy (Zhong et al., 2020): every filling must agree

sql-exec runs untrusted SQL (the model's answer; the schema and gold query from the data) in a
sandbox: a fresh in-memory SQLite database per filling, never a file, with an authorizer per phase.

  schema    the row's CREATE TABLE (and CREATE INDEX) statements, nothing else: no SELECT, so no
            CREATE TABLE ... AS SELECT, and no rows written
  fill      tunelab's own random rows: reads and row writes, no CREATE, DROP or ALTER
  queries   the gold query and the answer may only read: SELECT, WITH (recursive too), functions
            and the read-only PRAGMAs in READ_PRAGMAS; an answer that writes is a wrong answer
  never     ATTACH and DETACH (so no VACUUM INTO either), any database but main and temp, other
            PRAGMAs, views, triggers, virtual tables (table-valued functions such as json_each
            and pragma_table_info fail too), and the functions in DENIED_FUNCTIONS: load_extension,
            readfile, writefile, edit, fts3_tokenizer, fts5, and printf / format, whose `%.*c`
            loops for seconds inside one call; extension loading is off where Python allows it

Limits (SQLITE_LIMITS; Python 3.10's sqlite3 has no setlimit, so there only the time, page and
result limits hold): strings, blobs and rows of at most 5,000 bytes in the fill and the queries
(100,000 while the schema runs, for its CREATE TABLE text), statements of 10,000 bytes (a schema
100,000), no attached database, 1,000 columns, expression depth 200, 50 compound SELECTs, 100
function arguments, LIKE/GLOB patterns of 200 bytes, 1,000 parameters, 50,000 VM instructions per
statement, no worker threads; the database holds at most 2,500 pages (10 MB). The time limit
(TIME_LIMIT_S = 2 s for each query and for the set-up of a filling) is checked by a progress
handler every 100 VM instructions, but SQLite only calls it between loop steps, never inside a
function call: the small string limit is what keeps one call short (the worst, a two-argument
trim on the longest strings, takes about 2 ms; instr and replace well under 1 ms). A result holds
at most 10,000 rows and 10 MB of text and blobs. Sorts, DISTINCT and materialized subqueries stay in
memory (temp_store = MEMORY, never SQLite's temporary files), under SQLite's hard heap limit of
HEAP_LIMIT = 256 MB, set for the process at the first sql-exec (SQLite can lower that limit but never
lift it again; tunelab uses SQLite for nothing else): past it a query fails, and counts as wrong.
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
TIME_LIMIT_S = 2.0    # per query, and for the set-up (schema and fill) of one filling
MAX_RESULT_ROWS = 10_000
MAX_RESULT_BYTES = 10_000_000  # of the str and bytes values in one result
# what running untrusted SQL may raise: sqlite3's errors, its Warning (several statements, Python 3.10),
# ValueError (a lone surrogate or a NUL in the text) and OverflowError (an integer past 64 bits)
SQL_ERRORS = (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError)


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


# ---- the sandbox sql-exec runs in (see the module docstring) ----------------------------------

PROGRESS_EVERY = 100  # VM instructions between two looks at the clock
MAX_DB_PAGES = 2_500  # of 4 KiB: 10 MB of tables
HEAP_LIMIT = 256 * 1024**2   # bytes SQLite may hold in this process (its hard heap limit)
SQLITE_LIMITS = {     # sqlite3 constant name -> value, for the fill and the queries
    "SQLITE_LIMIT_LENGTH": 5_000,       # bytes in a string, blob or row
    "SQLITE_LIMIT_SQL_LENGTH": 10_000,  # bytes in a statement
    "SQLITE_LIMIT_ATTACHED": 0,
    "SQLITE_LIMIT_COLUMN": 1_000,
    "SQLITE_LIMIT_EXPR_DEPTH": 200,
    "SQLITE_LIMIT_COMPOUND_SELECT": 50,
    "SQLITE_LIMIT_FUNCTION_ARG": 100,
    "SQLITE_LIMIT_LIKE_PATTERN_LENGTH": 200,
    "SQLITE_LIMIT_VARIABLE_NUMBER": 1_000,
    "SQLITE_LIMIT_VDBE_OP": 50_000,
    "SQLITE_LIMIT_TRIGGER_DEPTH": 10,
    "SQLITE_LIMIT_WORKER_THREADS": 0,
}
SCHEMA_LIMITS = {     # while the schema runs: a wide table's CREATE TABLE text is long
    "SQLITE_LIMIT_LENGTH": 100_000,
    "SQLITE_LIMIT_SQL_LENGTH": 100_000,
}
DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "fts5", "printf", "format"}
READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}

_READING = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE,
            sqlite3.SQLITE_PRAGMA}
_WRITING = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}


def _authorizer(actions, writable=None):
    """An authorizer (sqlite3.Connection.set_authorizer) allowing only `actions` on main and temp.

    `writable`: the only tables INSERT, UPDATE and DELETE may touch; None for any.
    """
    def authorize(action, arg1, arg2, db_name, trigger_or_view):
        if action not in actions or db_name not in (None, "main", "temp"):
            return sqlite3.SQLITE_DENY
        if action in _WRITING and writable is not None and arg1 not in writable:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and arg2.lower() in DENIED_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_PRAGMA and arg1.lower() not in READ_PRAGMAS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK
    return authorize


# CREATE TABLE and CREATE INDEX write sqlite_master (and sqlite_sequence, for AUTOINCREMENT) themselves
_authorize_schema = _authorizer({sqlite3.SQLITE_CREATE_TABLE, sqlite3.SQLITE_CREATE_INDEX, sqlite3.SQLITE_REINDEX,
                                 sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_TRANSACTION,
                                 *_WRITING}, writable={"sqlite_master", "sqlite_sequence"})
_authorize_fill = _authorizer(_READING | _WRITING | {sqlite3.SQLITE_TRANSACTION})
_authorize_query = _authorizer(_READING)


def _set_limits(db, limits):
    if not hasattr(db, "setlimit"):  # Python 3.10
        return
    for name, value in limits.items():
        if hasattr(sqlite3, name):
            db.setlimit(getattr(sqlite3, name), value)


def _sandbox():
    """A fresh in-memory database with SQLITE_LIMITS and MAX_DB_PAGES and no authorizer yet."""
    db = sqlite3.connect(":memory:")
    _set_limits(db, SQLITE_LIMITS)
    if hasattr(db, "enable_load_extension"):  # absent when Python was built without it
        db.enable_load_extension(False)
    db.execute(f"PRAGMA max_page_count = {MAX_DB_PAGES}")
    db.execute("PRAGMA temp_store = MEMORY")
    db.execute(f"PRAGMA hard_heap_limit = {HEAP_LIMIT}")   # only ever lowers the process's limit
    return db


class _TimeLimit:
    """Interrupts statements on `db` once TIME_LIMIT_S have passed since `with` was entered."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        deadline = time.monotonic() + TIME_LIMIT_S
        self.db.set_progress_handler(lambda: int(time.monotonic() > deadline), PROGRESS_EVERY)

    def __exit__(self, *exc):
        self.db.set_progress_handler(None, 0)


def _set_up(db, schema, rng, strings, numbers):
    """Runs the schema, fills its tables and leaves `db` read-only; raises one of SQL_ERRORS."""
    with _TimeLimit(db):
        _set_limits(db, SCHEMA_LIMITS)
        db.set_authorizer(_authorize_schema)
        db.executescript(schema)
        _set_limits(db, SQLITE_LIMITS)
        db.set_authorizer(_authorize_fill)
        _fill(db, rng, strings, numbers)
        db.commit()
    db.set_authorizer(_authorize_query)


def _run(db, sql):
    """Rows of `sql`, or raise one of SQL_ERRORS; a query past the time or result limits is stopped."""
    rows, size = [], 0
    with _TimeLimit(db):
        for row in db.execute(sql):
            rows.append(tuple(round(v, 6) if isinstance(v, float) else v for v in row))
            size += sum(len(v) for v in row if isinstance(v, (str, bytes)))
            if len(rows) > MAX_RESULT_ROWS:
                raise sqlite3.OperationalError(f"more than {MAX_RESULT_ROWS} result rows")
            if size > MAX_RESULT_BYTES:
                raise sqlite3.OperationalError(f"more than {MAX_RESULT_BYTES} bytes of results")
    return rows


def sql_exec(prediction, gold, schema, seed=0):
    if not schema:
        return Verdict(False, "no CREATE TABLE schema found for this row")
    prediction = _sql_text(prediction).rstrip(";")
    gold_tree = _parse(gold)
    strings, numbers = _gold_literals(gold_tree)
    ordered = gold_tree is not None and gold_tree.args.get("order") is not None
    for filling in range(FILLINGS):
        db = _sandbox()
        try:
            try:
                _set_up(db, schema, random.Random(f"{seed}-{filling}"), strings, numbers)
            except SQL_ERRORS as e:
                return Verdict(False, f"schema does not run in SQLite: {e}")
            try:
                expected = _run(db, gold)
            except SQL_ERRORS as e:
                return Verdict(False, f"gold query fails: {e}")
            try:
                got = _run(db, prediction)
            except SQL_ERRORS as e:
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
