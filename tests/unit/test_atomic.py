import pytest

from tunelab import atomic


def test_failed_folder_write_leaves_the_old_folder(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(dest) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert (dest / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_successful_folder_write_replaces(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "stale").write_text("x")
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_file_write_leaves_the_old_file(tmp_path):
    dest = tmp_path / "f.json"
    atomic.write_json(dest, {"v": 1})
    with pytest.raises(TypeError):
        atomic.write_json(dest, {"v": object()})
    assert dest.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
