"""Experiment trackers (`--report-to tensorboard,wandb,mlflow`, mlx-lm's flag): every number that
metrics.jsonl gets goes to each tracker too, at the same step, under the same name.

They work offline by default, everything inside the run folder:

  tensorboard  <run>/tensorboard/ event files (torch's SummaryWriter, or tensorboardX's)
  wandb        <run>/wandb/ offline run (WANDB_MODE=online to upload as it runs; `wandb sync` later)
  mlflow       <run>/mlruns/ local file store, unless MLFLOW_TRACKING_URI names a server or database

The run ids are kept in <run>/trackers.json: `--resume` continues the same wandb and mlflow runs, and
tensorboard drops the events past the checkpoint's step, so each step's numbers appear once.
"""

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from tunelab import atomic
from tunelab.errors import UserError

NAMES = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
IDS = "trackers.json"


def parse(report_to):
    """The tracker names of a --report-to value ("wandb,mlflow"); UserError naming an unknown or missing one."""
    if not report_to:
        return []
    names = [n.strip().lower() for n in str(report_to).split(",") if n.strip()]
    problems = [f"--report-to {n}: not a tracker tunelab reports to (it has {', '.join(NAMES)})"
                for n in names if n not in NAMES]
    for name in (n for n in names if n in NAMES):
        module = "torch.utils.tensorboard" if name == "tensorboard" else name
        if name == "tensorboard":
            ready = _found("tensorboard") and (_found("torch") or _found("tensorboardX"))
        else:
            ready = _found(module)
        if not ready:
            problems.append(f"--report-to {name}: the {PACKAGES[name]} package is not installed: "
                            f"pip install {PACKAGES[name]} (or pip install 'tunelab[tracking]')")
    UserError.raise_if(problems)
    return list(dict.fromkeys(names))


def _found(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _numbers(values):
    """The finite numbers among `values` (metrics.jsonl also holds words, such as why a step was skipped)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flat(options, prefix=""):
    """Nested options as one level of dotted keys, values as they are or as text."""
    out = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


class _TensorBoard:
    def __init__(self, run_dir, project, options, saved, resumed_at):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from tensorboardX import SummaryWriter
        # purge_step: a resumed run drops the events logged after its checkpoint
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=resumed_at + 1 if resumed_at is not None else None)
        if resumed_at is None:
            self.writer.add_text("options", "\n".join(f"    {k}: {v}" for k, v in _flat(options).items()), 0)
        self.id = None

    def log(self, step, values):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir, project, options, saved, resumed_at):
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(project=project, name=Path(run_dir).resolve().name, dir=str(run_dir), mode=mode,
                              id=saved, resume="allow" if saved else None, config=_flat(options),
                              settings=wandb.Settings(silent=True, console="off"))
        self.id = self.run.id

    def log(self, step, values):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class _Mlflow:
    def __init__(self, run_dir, project, options, saved, resumed_at):
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:   # MLflow 3 keeps its file store working behind this switch (it is "in maintenance mode")
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(run_dir).resolve() / "mlruns").as_uri()
        self.client = mlflow.tracking.MlflowClient(uri)
        if saved:
            self.id = saved
        else:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            self.id = self.client.create_run(experiment_id, run_name=Path(run_dir).resolve().name).info.run_id
            for key, value in _flat(options).items():
                self.client.log_param(self.id, key, "" if value is None else str(value)[:6000])

    def log(self, step, values):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self):
        self.client.set_terminated(self.id)


_KINDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class Trackers:
    """The run's trackers; `log` takes what metrics.jsonl takes."""

    def __init__(self, names, run_dir, project, options, resumed_at=None, log=print):
        self.run_dir = Path(run_dir)
        saved = self._saved() if resumed_at is not None else {}
        self.open = {}
        try:
            for name in names:
                self.open[name] = _KINDS[name](run_dir, project or "tunelab", options, saved.get(name), resumed_at)
        except Exception as e:
            self.close()
            raise UserError(f"--report-to {name}: could not start the tracker: {type(e).__name__}: {e}") from None
        if self.open:
            atomic.write_json(self.run_dir / IDS, {n: t.id for n, t in self.open.items() if t.id})
            log(f"Reporting to {', '.join(self.open)} ({', '.join(_where(n, self.run_dir) for n in self.open)})")

    def _saved(self):
        try:
            saved = json.loads((self.run_dir / IDS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in saved.items() if isinstance(v, str)} if isinstance(saved, dict) else {}

    def log(self, step, values):
        numbers = _numbers(values)
        if numbers:
            for tracker in self.open.values():
                tracker.log(step, numbers)

    def close(self):
        for tracker in self.open.values():
            tracker.close()
        self.open = {}


def _where(name, run_dir):
    if name == "tensorboard":
        return f"tensorboard --logdir {run_dir / 'tensorboard'}"
    if name == "wandb":
        return f"wandb {os.environ.get('WANDB_MODE', 'offline')} in {run_dir / 'wandb'}"
    return f"mlflow at {os.environ.get('MLFLOW_TRACKING_URI') or run_dir / 'mlruns'}"
