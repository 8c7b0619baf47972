import time

import pytest

from tunelab import metrics
from tunelab.data import builtin_sql
from tunelab.errors import UserError

SCHEMA = "CREATE TABLE table_13505192_3 (series_number INTEGER, season_number VARCHAR, title VARCHAR)"
GOLD = "SELECT series_number FROM table_13505192_3 WHERE season_number = 24"


def test_exact_and_normalized():
    assert metrics.exact("  SELECT a FROM t ", "SELECT a FROM t").correct
    assert not metrics.exact("select a from t", "SELECT a FROM t").correct
    assert metrics.normalized("select  a\nfrom t;", "SELECT a FROM t").correct
    assert not metrics.normalized("SELECT b FROM t", "SELECT a FROM t").correct


def test_sql_canonical():
    assert metrics.sql_canonical("select series_number from table_13505192_3 where season_number=24;", GOLD).correct
    assert not metrics.sql_canonical("SELECT title FROM table_13505192_3 WHERE season_number = 24", GOLD).correct
    verdict = metrics.sql_canonical("The series number is 24.", GOLD)
    assert not verdict.correct and "not a parseable SQL query" in verdict.note


def test_equivalent_queries_written_differently_match_under_sql_exec():
    for prediction in ["SELECT t.series_number FROM table_13505192_3 AS t WHERE '24' = t.season_number",
                       "SELECT series_number FROM table_13505192_3 WHERE season_number IN (24)",
                       "select series_number from table_13505192_3 where season_number = 24;"]:
        assert metrics.sql_exec(prediction, GOLD, SCHEMA).correct, prediction
    assert not metrics.sql_canonical(
        "SELECT series_number FROM table_13505192_3 WHERE season_number IN (24)", GOLD).correct


def test_a_query_right_on_one_filling_only_is_wrong():
    gold = "SELECT MAX(series_number) FROM table_13505192_3"
    # MIN agrees with MAX only on a table whose values are all equal; the fillings differ
    verdict = metrics.sql_exec("SELECT MIN(series_number) FROM table_13505192_3", gold, SCHEMA)
    assert not verdict.correct and "different result" in verdict.note
    wrong_column = "SELECT series_number FROM table_13505192_3 WHERE title = 24"
    assert not metrics.sql_exec(wrong_column, GOLD, SCHEMA).correct


def test_order_matters_only_when_the_gold_query_orders():
    unordered_gold = "SELECT series_number FROM table_13505192_3"
    reversed_pred = "SELECT series_number FROM table_13505192_3 ORDER BY series_number DESC"
    assert metrics.sql_exec(reversed_pred, unordered_gold, SCHEMA).correct
    ordered_gold = "SELECT series_number FROM table_13505192_3 ORDER BY series_number"
    assert not metrics.sql_exec(reversed_pred, ordered_gold, SCHEMA).correct
    assert metrics.sql_exec(ordered_gold, ordered_gold, SCHEMA).correct


def test_nulls_are_values_too():
    gold = "SELECT COUNT(title) FROM table_13505192_3"          # NULL titles are not counted
    assert not metrics.sql_exec("SELECT COUNT(*) FROM table_13505192_3", gold, SCHEMA).correct
    assert metrics.sql_exec("SELECT COUNT(title) FROM table_13505192_3", gold, SCHEMA).correct


def test_malformed_and_runaway_predictions_are_wrong_not_crashes():
    verdict = metrics.sql_exec("SELEC series_number FROM", GOLD, SCHEMA)
    assert not verdict.correct and "prediction fails" in verdict.note
    verdict = metrics.sql_exec("SELECT nope FROM table_13505192_3", GOLD, SCHEMA)
    assert not verdict.correct and "no such column" in verdict.note
    started = time.monotonic()
    infinite = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    verdict = metrics.sql_exec(infinite, GOLD, SCHEMA)
    assert not verdict.correct and verdict.note == "time limit exceeded"
    assert time.monotonic() - started < metrics.TIME_LIMIT_S + 2
    endless_rows = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
    assert not metrics.sql_exec(endless_rows, GOLD, SCHEMA).correct


def test_schema_is_found_wherever_it_stands():
    system = "You translate.\nSCHEMA:\nCREATE TABLE a (x VARCHAR(20), y INTEGER)\nAnswer in SQL."
    user = "Also CREATE TABLE b (z INTEGER) exists. What is x?"
    schema = metrics.find_schema(system, user)
    assert schema == "CREATE TABLE a (x VARCHAR(20), y INTEGER);\nCREATE TABLE b (z INTEGER)"
    assert metrics.sql_exec("SELECT x FROM a JOIN b ON a.y = b.z", "SELECT a.x FROM b JOIN a ON b.z = a.y",
                            schema).correct
    assert not metrics.sql_exec("SELECT x FROM a", "SELECT x FROM a", "").correct
    # the same table in the prompt and in the row's context field is created once
    assert metrics.find_schema(system, user, "CREATE TABLE a (x VARCHAR(20), y INTEGER)") == schema


def test_every_builtin_answer_matches_itself():
    for row in builtin_sql.generate(40, seed=2):
        assert metrics.sql_exec(row["answer"], row["answer"], row["context"]).correct
        assert metrics.sql_canonical(row["answer"], row["answer"]).correct


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(UserError, match="available: exact, normalized, sql-canonical, sql-exec"):
        metrics.get("bleu")
