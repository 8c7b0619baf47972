"""The run folder (mlx-lm's --adapter-path): the only module that names artifact paths.

  <run>/adapter_config.json, adapter_model.safetensors, adapters.safetensors   the adapter
  <run>/metrics.jsonl      one JSON object per report / evaluation
  <run>/tunelab_run.json   resolved options, auto-chosen settings, versions, model and data hashes
  <run>/eval/results.json  every metric of every evaluated model, with counts and 95% intervals
  <run>/eval/samples.jsonl one line per evaluated row: prompt, gold, each model's answer and verdicts
  <run>/report.html        the self-contained report (metrics table, loss curves, disagreements)

and in a data folder made by `prepare`:

  <data>/tunelab_data.json where the rows came from (source, split, seed), so `eval` can choose metrics
"""

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from tunelab import atomic

METRICS = "metrics.jsonl"
MANIFEST = "tunelab_run.json"
EVAL_RESULTS = "eval/results.json"
EVAL_SAMPLES = "eval/samples.jsonl"
REPORT = "report.html"
DATA_MANIFEST = "tunelab_data.json"


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions():
    out = {"python": platform.python_version()}
    for package in ("tunelab", "torch", "transformers", "peft", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(run_dir, options, chosen, model_dir, data_files):
    atomic.write_json(Path(run_dir) / MANIFEST, {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": options,
        "chosen": chosen,
        "model": {"reference": options.get("model"), "folder": str(model_dir)},
        "data": {str(p): file_sha256(p) for p in data_files},
        "versions": versions(),
    })


class MetricsLog:
    """Append-only metrics.jsonl; each line is flushed as it is written, and handed to `also` (the experiment
    trackers: tracking.Trackers) when given."""

    def __init__(self, run_dir, also=None):
        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        self.also = also

    def write(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.also is not None:
            self.also.log(record.get("step"), {k: v for k, v in record.items() if k != "step"})

    def size(self):
        """Bytes written so far (the offset a checkpoint records)."""
        return self.file.tell()

    def close(self):
        self.file.close()
        if self.also is not None:
            self.also.close()


def read_metrics(run_dir):
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def read_manifest(run_dir):
    """A run folder's tunelab_run.json ({} when it has none or it is unreadable)."""
    try:
        manifest = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def read_data_manifest(data_dir):
    """The data folder's record of its source ({} when it has none or it is unreadable)."""
    path = Path(data_dir) / DATA_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
