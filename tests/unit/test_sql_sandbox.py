"""sql-exec's sandbox: untrusted SQL (answers, schemas from the data) cannot write files, load code,
grow past its limits or run past its time limit, and a failed attempt is a wrong answer, not a crash."""

import sqlite3
import time

import pytest

from tunelab import metrics

SCHEMA = "CREATE TABLE t (a INTEGER, b VARCHAR)"
GOLD = "SELECT a, b FROM t WHERE a > 3"
NOTHING = "SELECT a FROM t WHERE 0"  # an empty result, which a statement that writes also returns


@pytest.fixture
def short_time_limit(monkeypatch):
    monkeypatch.setattr(metrics, "TIME_LIMIT_S", 0.3)
    return 0.3


@pytest.mark.parametrize("answer", [
    "ATTACH DATABASE '{path}' AS x",
    "ATTACH DATABASE 'file:{path}?mode=rwc' AS x",
    "VACUUM INTO '{path}'",
])
def test_an_answer_cannot_create_a_file(tmp_path, answer):
    path = tmp_path / "made.db"
    verdict = metrics.sql_exec(answer.format(path=path), GOLD, SCHEMA)
    assert not verdict.correct and "authoriz" in verdict.note
    assert not path.exists()


@pytest.mark.parametrize("schema", [
    SCHEMA + "; ATTACH DATABASE '{path}' AS x; CREATE TABLE x.stolen (a INTEGER)",
    SCHEMA + "; VACUUM INTO '{path}'",
    # find_schema counts parentheses inside quotes too, so a row's context can smuggle statements through it
    metrics.find_schema(SCHEMA + """; CREATE TABLE x AS SELECT 1 AS "("; ATTACH DATABASE '{path}' AS y; """
                        """CREATE TABLE y.z (")" INTEGER)"""),
])
def test_a_schema_from_the_data_cannot_create_a_file(tmp_path, schema):
    path = tmp_path / "made.db"
    verdict = metrics.sql_exec(GOLD, GOLD, schema.format(path=path))
    assert not verdict.correct and verdict.note.startswith("schema does not run in SQLite: ")
    assert "authoriz" in verdict.note
    assert not path.exists()


@pytest.mark.parametrize("answer", [
    "ATTACH DATABASE '{path}' AS x",
    "VACUUM INTO '{path}'",
])
def test_the_attach_limit_alone_still_stops_a_file(tmp_path, monkeypatch, answer):
    monkeypatch.setattr(metrics, "_authorize_query", lambda *args: sqlite3.SQLITE_OK)
    path = tmp_path / "made.db"
    verdict = metrics.sql_exec(answer.format(path=path), GOLD, SCHEMA)
    assert not verdict.correct and "too many attached databases" in verdict.note
    assert not path.exists()


@pytest.mark.parametrize("answer, function", [
    ("SELECT load_extension('{tmp}/evil')", "load_extension"),
    ("SELECT fts3_tokenizer('simple')", "fts3_tokenizer"),
    ("SELECT length(printf('%.*c', 2147483647, 'x'))", "printf"),  # seconds inside one call
    ("SELECT length(format('%.*c', 2147483647, 'x'))", "format"),
])
def test_dangerous_functions_are_denied(tmp_path, answer, function):
    verdict = metrics.sql_exec(answer.format(tmp=tmp_path), GOLD, SCHEMA)
    assert not verdict.correct and verdict.note == f"prediction fails: not authorized to use function: {function}"


@pytest.mark.parametrize("answer", [
    "SELECT randomblob(400000000)",
    "SELECT length(randomblob(400000000))",
    "SELECT length(zeroblob(400000000))",
    "SELECT length(hex(zeroblob(50000000)))",
    # quadratic in one call, which no time limit can stop: seconds on 1 MB strings
    "SELECT instr(hex(zeroblob(500000)), hex(zeroblob(250000)) || '1')",
    "SELECT length(replace(hex(zeroblob(500000)), hex(zeroblob(250000)) || '1', 'x'))",
    "SELECT length(trim(hex(zeroblob(49000)), replace(hex(zeroblob(4000)), '0', 'b') || '0'))",
    "WITH RECURSIVE c(x) AS (SELECT zeroblob(10000) UNION ALL SELECT x || x FROM c) SELECT count(*) FROM c",
])
def test_giant_values_fail_fast(answer):
    started = time.monotonic()
    verdict = metrics.sql_exec(answer, GOLD, SCHEMA)
    assert not verdict.correct and verdict.note == "prediction fails: string or blob too big"
    assert time.monotonic() - started < 1.0


def test_results_are_bounded_in_bytes():
    four_copies = "(SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4)"
    answer = f"SELECT hex(zeroblob(2400)) FROM t t1, t t2, t t3, {four_copies}"  # 6,912 rows of 4,800 bytes
    verdict = metrics.sql_exec(answer, GOLD, SCHEMA)
    assert not verdict.correct
    assert verdict.note == f"prediction fails: more than {metrics.MAX_RESULT_BYTES} bytes of results"


@pytest.mark.parametrize("answer", [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "SELECT count(*) FROM t t1, t t2, t t3, t t4, t t5, t t6, t t7",  # 35 million rows
    # long calls in every row: the clock is read between rows
    "WITH v(x, y) AS (SELECT hex(zeroblob(2300)), replace(hex(zeroblob(100)), '0', 'b') || '0') "
    "SELECT " + ", ".join(["length(trim(v.x || t1.a, v.y))"] * 50) + " FROM v, t t1, t t2",
])
def test_runaway_queries_stop_at_the_time_limit(short_time_limit, answer):
    started = time.monotonic()
    verdict = metrics.sql_exec(answer, GOLD, SCHEMA)
    assert not verdict.correct and verdict.note == "time limit exceeded"
    assert time.monotonic() - started < short_time_limit + 0.5


@pytest.mark.parametrize("answer", [
    "DROP TABLE t",
    "DELETE FROM t",
    "INSERT INTO t VALUES (1, 'x')",
    "UPDATE t SET a = 1",
    "CREATE TABLE u (x INTEGER)",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN DELETE FROM t; END",
    "PRAGMA writable_schema = ON",
    "BEGIN",
])
def test_an_answer_that_writes_is_wrong_and_changes_nothing(answer):
    verdict = metrics.sql_exec(answer, NOTHING, SCHEMA)
    assert not verdict.correct and verdict.note == "prediction fails: not authorized"
    assert metrics.sql_exec(GOLD, GOLD, SCHEMA).correct
    assert metrics.sql_exec(NOTHING, NOTHING, SCHEMA).correct


@pytest.mark.parametrize("answer", [
    "SELECT a, b FROM t WHERE 3 < a",
    "SELECT a, b FROM (SELECT * FROM t) AS s WHERE s.a > 3",
    "WITH big(a, b) AS (SELECT a, b FROM t WHERE a > 3) SELECT * FROM big",
    "SELECT a, b FROM t WHERE a IN (WITH RECURSIVE n(x) AS (SELECT 4 UNION ALL SELECT x + 1 FROM n WHERE x < 100) "
    "SELECT x FROM n)",
    "SELECT a, b FROM t EXCEPT SELECT a, b FROM t WHERE a <= 3 OR a IS NULL",
    "SELECT a, substr(b, 1, 100) FROM t WHERE abs(a) > 3 AND a = round(a)",
])
def test_right_answers_still_score_right(answer):
    assert metrics.sql_exec(answer, GOLD, SCHEMA).correct, answer


def test_a_wide_table_whose_create_statement_is_longer_than_a_value_may_be():
    columns = [f"column_with_a_rather_long_name_{i}" for i in range(250)]
    schema = f"CREATE TABLE wide ({', '.join(c + ' VARCHAR' for c in columns)})"
    assert len(schema) > metrics.SQLITE_LIMITS["SQLITE_LIMIT_LENGTH"]
    gold = f"SELECT {columns[3]} FROM wide ORDER BY {columns[200]}"
    assert metrics.sql_exec(gold, gold, schema).correct


@pytest.mark.parametrize("answer", [
    "SELECT a FROM t; DROP TABLE t",
    "SELECT a FROM t WHERE b = '\ud800'",
    "SELECT a FROM t WHERE b = ?",
    "SELECT CAST(x'ff' AS TEXT) FROM t",
])
def test_answers_python_cannot_run_are_wrong_not_crashes(answer):
    verdict = metrics.sql_exec(answer, GOLD, SCHEMA)
    assert not verdict.correct and verdict.note.startswith("prediction fails: ")


def test_the_database_is_capped_in_pages():
    schema = ";\n".join(f"CREATE TABLE t{i} (a INTEGER)" for i in range(3_000))  # a page or more each
    verdict = metrics.sql_exec("SELECT a FROM t1", "SELECT a FROM t1", schema)
    assert not verdict.correct and verdict.note == "schema does not run in SQLite: database or disk is full"


OK, DENY = sqlite3.SQLITE_OK, sqlite3.SQLITE_DENY


@pytest.mark.parametrize("phase, action, arg1, arg2, db_name, expected", [
    ("schema", sqlite3.SQLITE_CREATE_TABLE, "t", None, "main", OK),
    ("schema", sqlite3.SQLITE_INSERT, "sqlite_master", None, "main", OK),  # CREATE TABLE's own bookkeeping
    ("schema", sqlite3.SQLITE_INSERT, "t", None, "main", DENY),
    ("schema", sqlite3.SQLITE_SELECT, None, None, None, DENY),
    ("schema", sqlite3.SQLITE_CREATE_TABLE, "t", None, "elsewhere", DENY),
    ("fill", sqlite3.SQLITE_INSERT, "t", None, "main", OK),
    ("fill", sqlite3.SQLITE_INSERT, "t", None, "elsewhere", DENY),
    ("query", sqlite3.SQLITE_READ, "t", "a", "main", OK),
    ("query", sqlite3.SQLITE_READ, "t", "a", "temp", OK),
    ("query", sqlite3.SQLITE_READ, "t", "a", "elsewhere", DENY),
    ("query", sqlite3.SQLITE_INSERT, "t", None, "main", DENY),
    ("query", sqlite3.SQLITE_ATTACH, "/tmp/x.db", None, None, DENY),
    ("query", sqlite3.SQLITE_DETACH, "x", None, None, DENY),
    ("query", sqlite3.SQLITE_PRAGMA, "table_info", "t", None, OK),
    ("query", sqlite3.SQLITE_PRAGMA, "journal_mode", "off", None, DENY),
    ("query", sqlite3.SQLITE_FUNCTION, None, "upper", None, OK),
    ("query", sqlite3.SQLITE_FUNCTION, None, "Load_Extension", None, DENY),
])
def test_each_phase_allows_only_its_own_actions(phase, action, arg1, arg2, db_name, expected):
    authorize = getattr(metrics, f"_authorize_{phase}")
    assert authorize(action, arg1, arg2, db_name, None) == expected


def test_big_sorts_stay_in_memory_under_the_heap_limit_and_score_wrong():
    import sqlite3
    import time

    from tunelab import metrics

    schema = "CREATE TABLE t (a INTEGER)"
    started = time.monotonic()
    verdict = metrics.sql_exec("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 50000000) "
                               "SELECT count(DISTINCT x || 'padding to make every row long') FROM c",
                               "SELECT count(*) FROM t", schema)
    assert not verdict.correct
    assert time.monotonic() - started < metrics.TIME_LIMIT_S + 1.5
    db = sqlite3.connect(":memory:")
    assert db.execute("PRAGMA hard_heap_limit").fetchone()[0] == metrics.HEAP_LIMIT
    sandbox = metrics._sandbox()
    assert sandbox.execute("PRAGMA temp_store").fetchone()[0] == 2   # MEMORY
