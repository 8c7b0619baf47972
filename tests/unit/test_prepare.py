import csv
import json
import sqlite3

import pytest

from tests.conftest import write_jsonl
from tunelab.config import PrepareOptions
from tunelab.data import builtin_sql
from tunelab.data.prepare import prepare
from tunelab.errors import UserError


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def test_builtin_sql_rows_are_valid_sqlite_and_deterministic():
    rows = builtin_sql.generate(500, seed=3)
    assert rows == builtin_sql.generate(500, seed=3)
    assert rows != builtin_sql.generate(500, seed=4)
    for row in rows:
        db = sqlite3.connect(":memory:")
        db.execute(row["context"])
        db.execute(row["answer"]).fetchall()
    answers = " ".join(r["answer"] for r in rows)
    for piece in ("COUNT(", "MIN(", "MAX(", "AVG(", "SUM(", "ORDER BY", "LIMIT", " AND ", " > ", " < "):
        assert piece in answers
    assert len({r["question"] for r in rows}) > 450


def test_default_prepare_reproduces_the_tutorial_split(tmp_path):
    counts = prepare(PrepareOptions(out=str(tmp_path / "d")), log=lambda *_: None)
    assert counts == {"train": 100, "valid": 25, "test": 25}
    train = read(tmp_path / "d" / "train.jsonl")
    roles = [m["role"] for m in train[0]["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert train[0]["messages"][0]["content"].startswith("You are an text to SQL query translator.")
    assert "CREATE TABLE" in train[0]["messages"][0]["content"]
    again = tmp_path / "e"
    prepare(PrepareOptions(out=str(again)), log=lambda *_: None)
    assert read(again / "train.jsonl") == train


def test_refuses_to_replace_existing_output(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        prepare(PrepareOptions(out=str(out)), log=lambda *_: None)
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(UserError, match="not made by `tunelab prepare`"):   # --overwrite: only prepare's own output
        prepare(PrepareOptions(out=str(out), overwrite=True), log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_overwrite_replaces_an_earlier_output_and_never_the_source(tmp_path):
    out = tmp_path / "d"
    prepare(PrepareOptions(out=str(out), seed=1), log=lambda *_: None)
    first = (out / "train.jsonl").read_text()
    with pytest.raises(UserError, match="already exists"):
        prepare(PrepareOptions(out=str(out), seed=2), log=lambda *_: None)
    assert (out / "train.jsonl").read_text() == first
    prepare(PrepareOptions(out=str(out), seed=2, overwrite=True), log=lambda *_: None)
    assert (out / "train.jsonl").read_text() != first
    source = out / "train.jsonl"
    with pytest.raises(UserError, match="holds the source"):
        prepare(PrepareOptions(source=str(source), out=str(out), overwrite=True, num_rows=-1, valid_rows=0.2,
                               test_rows=0.2, system="", user="{messages}", assistant="x"), log=lambda *_: None)
    assert source.is_file()


def write_csv(path, rows):
    """A CSV file with a header row: the keys of the first row."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_local_csv_with_custom_templates(tmp_path):
    src = write_csv(tmp_path / "src.csv", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(10)])
    opts = PrepareOptions(source=str(src), out=str(tmp_path / "d"), system="", user="Q: {q}",
                          assistant="{a}", num_rows=10, valid_rows=2, test_rows=2)
    assert prepare(opts, log=lambda *_: None) == {"train": 6, "valid": 2, "test": 2}
    rows = sum((read(tmp_path / "d" / f"{s}.jsonl") for s in ("train", "valid", "test")), [])
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(f"Q: question {i}" for i in range(10))
    assert all(len(r["messages"]) == 2 for r in rows)


def test_missing_column_named_with_what_the_file_has(tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"question": "q", "sql": "s"}] * 10)
    opts = PrepareOptions(source=str(src), out=str(tmp_path / "d"), num_rows=10, valid_rows=2, test_rows=2)
    with pytest.raises(UserError) as e:
        prepare(opts, log=lambda *_: None)
    assert "context: field missing from the source row (it has: question, sql)" in e.value.problems[0]
    assert not (tmp_path / "d").exists()


def test_contradicting_counts():
    with pytest.raises(UserError, match="leave no training rows"):
        prepare(PrepareOptions(num_rows=40, valid_rows=20, test_rows=20), log=lambda *_: None)


def test_dataset_folder_goes_through_the_datasets_library(tmp_path):
    """A local copy of a dataset repository (here: sql-create-context's columns) is read by `datasets`."""
    pytest.importorskip("datasets")
    repo = tmp_path / "sql-create-context"
    write_jsonl(repo / "sql_create_context.jsonl", builtin_sql.generate(30, seed=9))
    opts = PrepareOptions(source=str(repo), out=str(tmp_path / "d"), num_rows=30, valid_rows=5, test_rows=5)
    assert prepare(opts, log=lambda *_: None) == {"train": 20, "valid": 5, "test": 5}
    row = read(tmp_path / "d" / "test.jsonl")[0]
    assert row["messages"][0]["content"].endswith(")") and "CREATE TABLE" in row["messages"][0]["content"]
    with pytest.raises(UserError, match="could not load split 'validation'"):
        prepare(PrepareOptions(source=str(repo), out=str(tmp_path / "e"), split="validation", num_rows=30,
                               valid_rows=5, test_rows=5), log=lambda *_: None)


def sql_rows(n, repeats=()):
    rows = [{"context": f"CREATE TABLE t{i} (a INTEGER)", "question": f"What is a in t{i}?",
             "answer": f"SELECT a FROM t{i}"} for i in range(n)]
    return rows + [dict(rows[i]) for i in repeats]


def test_overlap_is_reported_and_dedupe_drops_it(tmp_path):
    # rows 0-4 appear twice: the shuffle puts some copies in test/valid and their twins in train
    src = write_jsonl(tmp_path / "src.jsonl", sql_rows(30, repeats=range(10)))
    logged = []
    opts = PrepareOptions(source=str(src), out=str(tmp_path / "d"), num_rows=-1, valid_rows=8, test_rows=8)
    prepare(opts, log=logged.append)
    manifest = json.loads((tmp_path / "d" / "tunelab_data.json").read_text())
    found = manifest["overlap_before_dedupe"]
    leaked = found["test_prompt_in_train"] + found["valid_prompt_in_train"]
    assert leaked > 0 and "also in train" in logged[0] and "--dedupe drops them" in logged[0]
    prepare(PrepareOptions(**{**vars(opts), "out": str(tmp_path / "e"), "dedupe": True}), log=lambda *_: None)
    splits = {s: read(tmp_path / "e" / f"{s}.jsonl") for s in ("train", "valid", "test")}
    prompts = {s: [json.dumps(r["messages"][:-1]) for r in rows] for s, rows in splits.items()}
    assert not (set(prompts["test"]) | set(prompts["valid"])) & set(prompts["train"])
    assert all(len(p) == len(set(p)) for p in prompts.values())
    assert sum(len(r) for r in splits.values()) == 30        # each of the 30 distinct rows once


def test_skip_invalid_sets_bad_rows_aside(tmp_path):
    rows = sql_rows(20)
    rows[3]["answer"] = ""
    del rows[7]["context"]
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    opts = PrepareOptions(source=str(src), out=str(tmp_path / "d"), num_rows=-1, valid_rows=3, test_rows=3)
    with pytest.raises(UserError) as e:
        prepare(opts, log=lambda *_: None)
    text = "\n".join(e.value.problems)
    assert "row 4: assistant: the answer is empty" in text and "row 8: context: field missing" in text
    assert "--skip-invalid" in text and not (tmp_path / "d").exists()
    logged = []
    counts = prepare(PrepareOptions(**{**vars(opts), "skip_invalid": True}), log=logged.append)
    assert sum(counts.values()) == 18 and "Skipped 2 invalid rows" in logged[0]
    rejected = read(tmp_path / "d" / "rejected.jsonl")
    assert sorted(r["source_row"] for r in rejected) == [4, 8]
    assert rejected[0]["row"] in (rows[3], rows[7]) and rejected[0]["problems"]


def test_empty_source_file(tmp_path):
    (tmp_path / "src.jsonl").write_text("")
    with pytest.raises(UserError, match="the file has no rows"):
        prepare(PrepareOptions(source=str(tmp_path / "src.jsonl"), out=str(tmp_path / "d")), log=lambda *_: None)


def test_random_valid_rows_round_trip_through_prepare(tmp_path_factory):
    """Whatever the text (unicode, quotes, braces, newlines), prepare keeps every row's content intact."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)

    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.tuples(text, text, text), min_size=4, max_size=12))
    def round_trip(triples):
        folder = tmp_path_factory.mktemp("prop")
        src = write_jsonl(folder / "src.jsonl", [{"c": c, "q": q, "a": a} for c, q, a in triples])
        prepare(PrepareOptions(source=str(src), out=str(folder / "d"), system="{c}", user="{q}", assistant="{a}",
                               num_rows=-1, valid_rows=1, test_rows=1), log=lambda *_: None)
        out = sum((read(folder / "d" / f"{s}.jsonl") for s in ("train", "valid", "test")), [])
        got = sorted(tuple(m["content"] for m in r["messages"]) for r in out)
        assert got == sorted(triples)

    round_trip()


def test_the_sources_own_splits_are_kept(tmp_path):
    pytest.importorskip("datasets")
    repo = tmp_path / "dataset"
    for name, n, seed in (("train", 12, 1), ("validation", 4, 2), ("test", 3, 3)):
        write_jsonl(repo / f"{name}.jsonl", builtin_sql.generate(n, seed=seed))
    counts = prepare(PrepareOptions(source=str(repo), out=str(tmp_path / "d"), keep_splits=True, num_rows=-1),
                     log=lambda *_: None)
    assert counts == {"train": 12, "valid": 4, "test": 3}
    tests = sorted(r["messages"][-1]["content"] for r in read(tmp_path / "d" / "test.jsonl"))
    assert tests == sorted(r["answer"] for r in builtin_sql.generate(3, seed=3))
    with pytest.raises(UserError, match="--keep-splits: builtin:sql has no splits of its own"):
        prepare(PrepareOptions(out=str(tmp_path / "e"), keep_splits=True), log=lambda *_: None)


def test_split_sizes_by_share_or_count(tmp_path):
    counts = prepare(PrepareOptions(out=str(tmp_path / "d"), num_rows=50, valid_rows=0.1, test_rows=0.2),
                     log=lambda *_: None)
    assert counts == {"train": 35, "valid": 5, "test": 10}
    with pytest.raises(UserError, match="--valid-rows: a count \\(25\\) or a share below 1 \\(0.1\\), got 2.5"):
        prepare(PrepareOptions(out=str(tmp_path / "e"), valid_rows=2.5), log=lambda *_: None)


def test_csv_column_named_by_the_mapping_but_missing(tmp_path):
    src = write_csv(tmp_path / "src.csv", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    with pytest.raises(UserError) as e:
        prepare(PrepareOptions(source=str(src), out=str(tmp_path / "d"), num_rows=10, valid_rows=2, test_rows=2),
                log=lambda *_: None)
    assert f"{src}: row " in e.value.problems[0]
    assert "context: field missing from the source row (it has: answer, question); change --system" \
        in e.value.problems[0]
