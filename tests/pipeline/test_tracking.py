"""--report-to: each tracker's own files, read back with the tracker's own reader, hold the numbers of
metrics.jsonl at the same steps, offline; a resumed run continues them without repeating a step."""

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import builtin_sql_data
from tunelab import runs, train
from tunelab.config import LoraOptions
from tunelab.engines import torch_engine
from tunelab.errors import UserError

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return builtin_sql_data(tmp_path_factory.mktemp("tracking") / "data", 20)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def options(model, data, run, **changes):
    base = dict(model=str(model), data=str(data), train=True, iters=8, batch_size=2, num_layers=1, mask_prompt=True,
                learning_rate=1e-3, steps_per_report=2, steps_per_eval=4, save_every=3, val_batches=-1,
                adapter_path=str(run), dtype="float32", engine="torch", report_to="tensorboard,wandb,mlflow",
                project_name="tests")
    return replace(LoraOptions(), **{**base, **changes})


def logged(run):
    """{name: {step: value}} of metrics.jsonl's numbers."""
    out = {}
    for record in runs.read_metrics(run):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(key, {})[record["step"]] = value
    return out


def tensorboard_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run) / "tensorboard")).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_metrics(run):
    from mlflow.tracking import MlflowClient

    ids = json.loads((Path(run) / "trackers.json").read_text())
    client = MlflowClient((Path(run).resolve() / "mlruns").as_uri())
    found = client.get_run(ids["mlflow"])
    assert found.data.params["learning_rate"] == "0.001" and found.info.status == "FINISHED"
    assert client.get_experiment(found.info.experiment_id).name == "tests"      # --project-name
    return {key: [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)]
            for key in found.data.metrics}


def wandb_history(run):
    """wandb's history records of the run's offline .wandb files, in the order written: the file is
    LevelDB's log format (32 KiB blocks of records, each a 7-byte header: CRC, length, type) after wandb's
    7-byte header, each record one of wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(Path(run, "wandb").glob("offline-run-*/run-*.wandb")):
        raw, at, pending = path.read_bytes(), 7, b""
        assert raw[:4] == b":W&B"
        while at + 7 <= len(raw):
            left = 32768 - at % 32768
            if left < 7:
                at += left
                continue
            length, kind = struct.unpack("<HB", raw[at + 4:at + 7])
            pending += raw[at + 7:at + 7 + length]
            at += 7 + length
            if kind in (1, 4):          # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or item.nested_key[0]: json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


def by_step(pairs):
    return {step: value for step, value in pairs}


def test_every_tracker_holds_the_numbers_of_metrics_jsonl(tiny_llama, data, tmp_path):
    run = tmp_path / "run"
    lines = []
    train.lora(options(tiny_llama, data, run), log=lines.append)
    assert any(line.startswith("Reporting to tensorboard, wandb, mlflow") for line in lines)
    expected = logged(run)
    assert {"train_loss", "val_loss", "learning_rate", "grad_norm", "tokens_per_s"} <= expected.keys()
    board, flow = tensorboard_scalars(run), mlflow_metrics(run)
    for name, values in expected.items():
        assert by_step(board[name]) == pytest.approx(values, rel=1e-6), name     # float32 events
        assert by_step(flow[name]) == pytest.approx(values, rel=1e-12), name
    history = wandb_history(run)
    for name, values in expected.items():
        seen = {row["_step"]: row[name] for row in history if name in row}
        assert seen == pytest.approx(values, rel=1e-12), name


def test_a_resumed_run_continues_its_trackers_without_repeating_a_step(tiny_llama, data, tmp_path, monkeypatch):
    class Crash(BaseException):
        pass

    real, calls = torch_engine.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:   # steps 7 and 8 were reported and validated after the checkpoint of step 6
            raise Crash()
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(torch_engine, "train_step", step)
    with pytest.raises(Crash):
        train.lora(options(tiny_llama, data, run, iters=10), log=lambda *_: None)
    monkeypatch.setattr(torch_engine, "train_step", real)
    assert max(tensorboard_scalars(run)["val_loss"])[0] == 8
    first = json.loads((run / "trackers.json").read_text())
    train.lora(options(tiny_llama, data, run, iters=10, resume=True), log=lambda *_: None)
    assert json.loads((run / "trackers.json").read_text()) == first     # the same wandb and mlflow runs
    expected = logged(run)
    board = tensorboard_scalars(run)
    for name, values in expected.items():
        steps = [s for s, _ in board[name]]
        assert len(steps) == len(set(steps)) and by_step(board[name]) == pytest.approx(values, rel=1e-6), name
    assert by_step(mlflow_metrics(run)["val_loss"]) == pytest.approx(expected["val_loss"], rel=1e-12)


def test_an_unknown_tracker_is_named_before_any_work(tiny_llama, data, tmp_path):
    with pytest.raises(UserError, match="--report-to swanlab: not a tracker tunelab reports to"):
        train.lora(options(tiny_llama, data, tmp_path / "run", report_to="wandb,swanlab"), log=lambda *_: None)
    assert not (tmp_path / "run").exists()
