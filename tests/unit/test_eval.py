"""The eval stage without a model: rows, metric choice, prediction files, intervals, the report."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import write_jsonl
from tunelab import evaluate, metrics, report, runs
from tunelab.config import EvalOptions
from tunelab.data import builtin_sql
from tunelab.errors import UserError

SCHEMA = "CREATE TABLE t (a INTEGER, b VARCHAR)"


def chat_row(question, answer, system=f"SCHEMA:\n{SCHEMA}"):
    messages = ([{"role": "system", "content": system}] if system else [])
    return {"messages": messages + [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]}


def rows_in(tmp_path, rows, name="test.jsonl"):
    write_jsonl(tmp_path / name, rows)
    return evaluate.load_rows(tmp_path / name)[2]


# ---- rows --------------------------------------------------------------------------------------

def test_rows_split_into_prompt_and_gold_with_the_schema_wherever_it_stands(tmp_path):
    rows = rows_in(tmp_path, [chat_row("What is a?", "SELECT a FROM t"),
                              chat_row(f"{SCHEMA}\nWhat is b?", "SELECT b FROM t", system=None),
                              {**chat_row("What is a?", "SELECT a FROM t", system="Answer in SQL."),
                               "context": SCHEMA},
                              {"prompt": "Say hi", "completion": "hi"}][:3])
    assert [r.gold for r in rows] == ["SELECT a FROM t", "SELECT b FROM t", "SELECT a FROM t"]
    assert [r.schema for r in rows] == [SCHEMA] * 3
    assert rows[0].prompt[-1] == {"role": "user", "content": "What is a?"} and rows[0].question == "What is a?"
    completions = rows_in(tmp_path, [{"prompt": "Say hi", "completion": "hi"}], "c.jsonl")
    assert completions[0].prompt == [{"role": "user", "content": "Say hi"}] and completions[0].gold == "hi"


def test_text_rows_cannot_be_evaluated_by_generation(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": "just text"}])
    with pytest.raises(UserError, match="eval needs rows with a prompt and an answer"):
        evaluate.load_rows(tmp_path / "test.jsonl")


def test_prepare_keeps_the_context_and_records_its_source(tmp_path):
    from tunelab.config import PrepareOptions
    from tunelab.data.prepare import prepare

    prepare(PrepareOptions(out=str(tmp_path / "data"), num_rows=30, valid_rows=5, test_rows=5), log=lambda *_: None)
    assert runs.read_data_manifest(tmp_path / "data")["source"] == "builtin:sql"
    row = json.loads((tmp_path / "data" / "test.jsonl").read_text().splitlines()[0])
    assert row["context"].startswith("CREATE TABLE") and row["context"] in row["messages"][0]["content"]


def test_default_metrics_follow_the_data(tmp_path):
    sql_rows = rows_in(tmp_path, [chat_row("q", "SELECT a FROM t")])
    plain_rows = rows_in(tmp_path, [chat_row("Say hi", "hi", system=None)], "plain.jsonl")
    assert evaluate.default_metrics(tmp_path, sql_rows) == ["sql-exec", "sql-canonical", "loss"]
    assert evaluate.default_metrics(tmp_path, plain_rows) == ["exact", "normalized", "loss"]
    (tmp_path / runs.DATA_MANIFEST).write_text(json.dumps({"source": "b-mc2/sql-create-context"}))
    assert evaluate.default_metrics(tmp_path, plain_rows) == ["sql-exec", "sql-canonical", "loss"]


# ---- which models ------------------------------------------------------------------------------

def options(**kw):
    return EvalOptions(**kw)


def test_candidates_are_labelled(tmp_path):
    predictions = tmp_path / "lmstudio.jsonl"
    predictions.write_text("")
    got = evaluate.candidates(options(adapter_path="run", compare=["fused_model", "q8=out/model.gguf"],
                                      predictions=[str(predictions), f"ollama={predictions}"]))
    assert [(c.label, c.reference, c.adapter, c.from_file) for c in got] == [
        ("base", "smollm2", None, False), ("tuned", "smollm2", "run", False),
        ("fused_model", "fused_model", None, False), ("q8", "out/model.gguf", None, False),
        ("lmstudio", str(predictions), None, True), ("ollama", str(predictions), None, True)]


def test_candidate_problems_are_reported_together(tmp_path):
    with pytest.raises(UserError) as e:
        evaluate.candidates(options(compare=["a/model", "b/model"], predictions=[str(tmp_path / "none.jsonl")]))
    assert any("two models are labelled 'model'" in p for p in e.value.problems)
    assert any("none.jsonl: file not found" in p for p in e.value.problems)
    with pytest.raises(UserError, match="nothing to evaluate"):
        evaluate.candidates(options(no_base=True))


def test_metric_flag_takes_lists_and_repeats():
    from tunelab.cli import build_parser
    from tunelab.config import resolve

    args = build_parser().parse_args(["eval", "--metric", "sql-exec,exact", "--metric", "loss"])
    assert resolve(EvalOptions, args).metric == ["sql-exec", "exact", "loss"]
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        metrics.check_names(["exact", "bleu"])


# ---- answers made elsewhere --------------------------------------------------------------------

QUESTIONS = [("What is a?", "SELECT a FROM t"), ("What is b?", "SELECT b FROM t"), ("What is a?", "SELECT a FROM t")]


def answers_from(tmp_path, lines):
    rows = rows_in(tmp_path, [chat_row(q, a) for q, a in QUESTIONS])
    path = tmp_path / "answers.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return evaluate.from_file(path, rows).answers


def test_predictions_by_index_or_unique_question(tmp_path):
    got = answers_from(tmp_path, [{"index": 2, "answer": "SELECT a FROM t"}, {"prompt": " What is b? ", "answer": "x"}])
    assert got == [None, "x", "SELECT a FROM t"]


@pytest.mark.parametrize("line, message", [
    ("{oops", ":1: not valid JSON"),
    ({"index": 0}, ":1: answer: expected a string"),
    ({"index": 0, "answer": 5}, ":1: answer: expected a string"),
    ({"index": 3, "answer": "x"}, ":1: index: expected a row number from 0 to 2, got 3"),
    ({"index": "0", "answer": "x"}, ":1: index: expected a row number from 0 to 2, got '0'"),
    ({"prompt": "What is a?", "answer": "x"}, ":1: prompt: matches rows 0, 2; give the row's \"index\" instead"),
    ({"prompt": "What is c?", "answer": "x"}, ":1: prompt: matches no row's question"),
    ({"answer": "x"}, ":1: index: missing; give the row's \"index\""),
])
def test_each_bad_prediction_line_is_named(tmp_path, line, message):
    with pytest.raises(UserError) as e:
        answers_from(tmp_path, [line])
    assert any(f"answers.jsonl{message}" in p for p in e.value.problems), e.value.problems


def test_a_row_answered_twice_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"answers.jsonl:2: index: row 1 already has an answer"):
        answers_from(tmp_path, [{"index": 1, "answer": "x"}, {"prompt": "What is b?", "answer": "y"}])


# ---- scores and intervals ----------------------------------------------------------------------

def test_wilson_interval_known_values():
    assert metrics.wilson_interval(0, 25) == pytest.approx((0.0, 0.1332), abs=1e-4)
    assert metrics.wilson_interval(25, 25) == pytest.approx((0.8668, 1.0), abs=1e-4)
    # Wilson's interval is where the score test |p_hat - p| = z sqrt(p (1 - p) / n) is at its bound.
    for k, n in ((12, 25), (3, 40), (99, 100)):
        for p in metrics.wilson_interval(k, n):
            assert abs(k / n - p) == pytest.approx(1.96 * (p * (1 - p) / n) ** 0.5, rel=1e-9)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_loss_interval_brackets_the_mean_and_collapses_when_rows_agree():
    sums, counts = np.array([2.0, 4.0, 9.0, 1.0]), np.array([2, 2, 3, 1])
    low, high = evaluate.bootstrap_loss_interval(sums, counts)
    assert low < sums.sum() / counts.sum() < high
    assert evaluate.bootstrap_loss_interval(np.array([3.0, 6.0]), np.array([1, 2])) == pytest.approx((3.0, 3.0))


def test_sql_answers_in_a_fenced_block_are_read_from_inside_it():
    answer = "Here is the query:\n```sql\nSELECT a FROM t WHERE b = 'x';\n```\nIt selects a."
    assert metrics.sql_exec(answer, "SELECT a FROM t WHERE b = 'x'", SCHEMA).correct
    assert metrics.sql_canonical(answer, "select a from t where b = 'x'").correct
    assert not metrics.exact(answer, "SELECT a FROM t WHERE b = 'x'").correct


def scored(tmp_path, answers, metric_names=("sql-exec", "exact")):
    rows = rows_in(tmp_path, [chat_row(q, a) for q, a in QUESTIONS])
    outcome = evaluate.Outcome(answers)
    evaluate.score(outcome, rows, list(metric_names), seed=0)
    return outcome


def test_scores_count_missing_answers_as_wrong(tmp_path):
    outcome = scored(tmp_path, ["SELECT a FROM t", None, "select a from t"])
    assert [v["sql-exec"].correct for v in outcome.verdicts] == [True, False, True]
    assert outcome.verdicts[1]["exact"].note == "no answer"
    summary = evaluate.summarize(evaluate.Candidate("x", "f.jsonl", from_file=True), outcome, ["sql-exec", "exact"])
    assert summary["metrics"]["sql-exec"] == {"value": 2 / 3, "correct": 2, "total": 3,
                                              "ci95": list(metrics.wilson_interval(2, 3))}
    assert summary["metrics"]["exact"]["correct"] == 1 and summary["rows_without_answer"] == 1


# ---- the report ----------------------------------------------------------------------------------

def results_and_samples(tmp_path):
    rows = rows_in(tmp_path, [chat_row(q, a) for q, a in QUESTIONS])
    names = ["sql-exec", "exact"]
    outcomes = {"base": evaluate.Outcome(["<script>alert(1)</script>", "SELECT b FROM t", "nope"]),
                "tuned": evaluate.Outcome(["SELECT a FROM t", "SELECT b FROM t", "SELECT  a FROM t"])}
    for o in outcomes.values():
        evaluate.score(o, rows, names, seed=0)
    results = {"created": "now", "data": "d/test.jsonl", "rows": 3, "metrics": names,
               "generation": {"max_tokens": 8, "temp": 0.0, "top_p": 1.0, "seed": 0, "batch_size": 2},
               "models": {label: evaluate.summarize(evaluate.Candidate(label, "m"), o, names)
                          for label, o in outcomes.items()}}
    samples = [{"index": r.index, "prompt": r.prompt, "gold": r.gold,
                "answers": {label: o.answers[i] for label, o in outcomes.items()},
                "verdicts": {label: {m: vars(v) for m, v in o.verdicts[i].items()} for label, o in outcomes.items()}}
               for i, r in enumerate(rows)]
    return results, samples


def test_report_shows_metrics_curves_and_only_the_disagreements(tmp_path):
    results, samples = results_and_samples(tmp_path)
    page = report.render(results, samples, [{"step": 0, "val_loss": 2.0}, {"step": 5, "train_loss": 1.5},
                                            {"step": 10, "train_loss": 1.0, }, {"step": 10, "val_loss": 1.2}])
    table = page.split("<table id=metrics>")[1].split("</table>")[0]
    assert table.count("<tr><th>base</th>") == 1 and "33.3% <span class=ci>(1/3;" in table
    assert table.count("<tr><th>tuned</th>") == 1 and "100.0% <span class=ci>(3/3;" in table
    assert "id=loss-plot" in page and "id=accuracy-plot" in page and "data:image/png;base64," in page
    assert "Where base and tuned disagree on sql-exec (2 of 3 rows)" in page
    assert page.count("class=example") == 2 and "row 1</p>" not in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "No training metrics" in report.render(results, samples, [])


def test_terminal_summary_has_a_line_per_model(tmp_path):
    results, _ = results_and_samples(tmp_path)
    lines = evaluate.summary_table(results).splitlines()
    assert lines[0].split() == ["sql-exec", "exact"]
    assert lines[1].split()[:2] == ["base", "33.3%"] and lines[2].split()[:2] == ["tuned", "100.0%"]


def test_every_builtin_row_scores_itself_right_under_every_metric(tmp_path):
    data = [chat_row(r["question"], r["answer"], system=f"SCHEMA:\n{r['context']}")
            for r in builtin_sql.generate(15, seed=4)]
    rows = rows_in(tmp_path, data)
    outcome = evaluate.Outcome([r.gold for r in rows])
    evaluate.score(outcome, rows, list(metrics.METRICS), seed=0)
    assert all(v.correct for verdicts in outcome.verdicts for v in verdicts.values())


def test_eval_options_problems_are_reported_together(tmp_path):
    with pytest.raises(UserError) as e:
        evaluate.check_options(SimpleNamespace(batch_size=0, max_tokens=0, num_rows=0, data=str(tmp_path),
                                               split="test", adapter_path=str(tmp_path / "none"), metric=["bleu"]))
    text = "\n".join(e.value.problems)
    for part in ("--batch-size", "--max-tokens", "--num-rows", "test.jsonl not found", "--adapter-path", "'bleu'"):
        assert part in text
