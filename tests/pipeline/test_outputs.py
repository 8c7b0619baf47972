"""Outputs never destroy what the user had: a target is new, or replaced only with --overwrite, only when it
is the same command's earlier output, and never when it is an input of the same call."""

import os

import pytest

from tests.engines.test_export_safety import random_adapter
from tunelab import atomic, fuse
from tunelab.config import DemoOptions, FuseOptions
from tunelab.demo import demo
from tunelab.errors import UserError


def quiet(*_):
    pass


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_fuse(model, adapter, save_path, **kw):
    return fuse.fuse(FuseOptions(model=str(model), adapter_path=str(adapter), save_path=str(save_path), **kw),
                     log=quiet)


@pytest.fixture
def adapter(tiny_llama, tmp_path):
    return random_adapter(tmp_path / "adapter", tiny_llama)


def test_fuse_refuses_a_folder_the_user_had(tiny_llama, adapter, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists and is not empty"):
        run_fuse(tiny_llama, adapter, mine)
    with pytest.raises(UserError, match="not made by `tunelab fuse`"):
        run_fuse(tiny_llama, adapter, mine, overwrite=True)
    assert snapshot(mine) == {mine.relative_to(mine) / "notes.txt": b"keep"}


@pytest.mark.parametrize("target", ["adapter", "model", "parent of adapter"])
def test_fuse_never_writes_over_its_own_inputs(tiny_llama, adapter, tmp_path, target):
    paths = {"adapter": adapter, "model": tiny_llama, "parent of adapter": adapter.parent}
    before = {name: snapshot(path) for name, path in (("adapter", adapter), ("model", tiny_llama))}
    with pytest.raises(UserError, match="which this command reads"):
        run_fuse(tiny_llama, adapter, paths[target], overwrite=True)
    assert {name: snapshot(path) for name, path in (("adapter", adapter), ("model", tiny_llama))} == before


def test_fuse_overwrite_replaces_an_earlier_fused_folder(tiny_llama, adapter, tmp_path):
    out = tmp_path / "fused"
    run_fuse(tiny_llama, adapter, out)
    (out / "stale").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        run_fuse(tiny_llama, adapter, out)
    assert (out / "stale").exists()
    run_fuse(tiny_llama, adapter, out, overwrite=True)
    assert not (out / "stale").exists() and (out / "model.safetensors").is_file()


def test_a_target_that_appears_during_the_write_is_not_replaced(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(UserError, match="appeared while this command was writing"):
        with atomic.atomic_dir(dest, replace=False) as tmp:
            (tmp / "new").write_text("new")
            dest.mkdir()
            (dest / "theirs").write_text("theirs")
    assert snapshot(dest) == {dest.relative_to(dest) / "theirs": b"theirs"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(UserError, match="appeared"):
        with atomic.atomic_path(tmp_path / "f.txt", replace=False) as tmp:
            tmp.write_text("new")
            (tmp_path / "f.txt").write_text("theirs")
    assert (tmp_path / "f.txt").read_text() == "theirs"


def test_files_get_the_modes_the_umask_gives_and_stale_temporaries_are_removed(tmp_path):
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "f.txt", "x")
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "g").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    dead = tmp_path / ".f.txt.999999.abc.tmp"   # no process 999999: a killed writer's
    live = tmp_path / f".f.txt.{os.getpid()}.abc.tmp"
    dead.write_text("half")
    live.write_text("in progress")
    atomic.write_text(tmp_path / "f.txt", "z")
    assert not dead.exists() and live.exists()


def test_demo_checks_its_options_before_touching_an_earlier_demo(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".tunelab-demo").write_text("made by tunelab demo")
    (out / "report.html").write_text("earlier")
    with pytest.raises(UserError, match="--iters: must be at least 1"):
        demo(DemoOptions(out=str(out), iters=0), log=quiet)
    assert (out / "report.html").read_text() == "earlier"
    with pytest.raises(UserError):   # a failure later on: the earlier demo comes back whole
        demo(DemoOptions(out=str(out), model=str(tmp_path / "no-such-model")), log=quiet)
    assert (out / "report.html").read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_eval_replaces_its_own_report_and_never_a_users_file(tmp_path):
    import json

    from tests.conftest import builtin_sql_data
    from tunelab.config import EvalOptions
    from tunelab.evaluate import evaluate

    data = builtin_sql_data(tmp_path / "data", 20)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"index": i, "answer": "SELECT 1"}) + "\n" for i in range(5)))
    opts = EvalOptions(no_base=True, predictions=[str(answers)], data=str(data), run_dir=str(tmp_path / "run"))
    evaluate(opts, log=quiet)
    evaluate(opts, log=quiet)   # its own earlier output: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("<html>my own report</html>")
    with pytest.raises(UserError, match="not written by `tunelab eval`"):
        evaluate(EvalOptions(no_base=True, predictions=[str(answers)], data=str(data), run_dir=str(mine)), log=quiet)
    assert (mine / "report.html").read_text() == "<html>my own report</html>"
    assert sorted(p.name for p in mine.iterdir()) == ["report.html"]
