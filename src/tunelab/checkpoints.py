"""The run folder as the unit of trust: one writer at a time, checkpoints committed whole, resume.

  <run>/.tunelab.lock                      advisory lock (flock) held by the one run writing here
  <run>/checkpoints/step-0000100/          one committed checkpoint:
      adapter_config.json, adapter_model.safetensors, adapters.safetensors   the adapter (both layouts)
      trainer_state.safetensors            optimizer state and random generator states (engine arrays)
      trainer_state.json                   step (and so the data position), metrics offset, report window, options
      COMMITTED                            written last: a folder without it is not a checkpoint
  <run>/adapter_config.json, ...           the newest committed checkpoint's adapter, copied up

A checkpoint is written in a temporary folder, flushed, marked, then renamed into place, so a
kill at any moment leaves either no new checkpoint or a whole one. The top-level adapter is then
copied up file by file, weights first; its config lists the SHA-256 of both weight files, so a
folder left between two steps by a kill is detected (adapters.load) and repaired by the next run
in the folder (`repair`). Old checkpoints are removed only after a newer one is committed.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tunelab import adapters, atomic, runs
from tunelab.errors import UserError

LOCK = ".tunelab.lock"
FOLDER = "checkpoints"
MARKER = "COMMITTED"
STATE_ARRAYS = "trainer_state.safetensors"
STATE = "trainer_state.json"
ADAPTER_FILES = (adapters.PEFT_WEIGHTS, adapters.MLX_WEIGHTS, adapters.CONFIG)

# Options that may differ between a checkpoint and the run that resumes it: they change nothing of
# the training computation or its files.
# A run folder moved elsewhere resumes there (adapter_path), and data read from another folder is the same data
# when its files' hashes are the checkpoint's (compared on their own).
RESUMABLE_CHANGES = {"train", "test", "test_batches", "resume", "resume_adapter_file", "keep_checkpoints",
                     "save_every", "skip_invalid", "device", "adapter_path", "data"}


class RunLock:
    """An exclusive advisory lock on a run folder, held from `acquire` until the process ends or `release`."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.file = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:   # no flock (Windows): one writer is the user's to ensure
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.run_dir / LOCK, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise UserError(f"--adapter-path {self.run_dir}: another tunelab run ({holder}) is writing to this "
                            "folder; wait for it to finish or choose another --adapter-path") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()
        return self

    def release(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def run_contents(run_dir):
    """What a run folder holds besides the lock and stale temporaries (names)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK and not p.name.endswith((".tmp", ".old")))


def clean(run_dir):
    """Remove temporaries of killed saves in the run folder and its checkpoints folder (under the lock)."""
    count = atomic.remove_stale(run_dir)
    count += atomic.remove_stale(Path(run_dir) / FOLDER)
    for folder in _listed(run_dir):
        if not (folder / MARKER).is_file():   # a folder renamed without its marker is never used
            shutil.rmtree(folder, ignore_errors=True)
            count += 1
    return count


def _listed(run_dir):
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and
                  p.name[5:].isdigit())


def committed(run_dir):
    """Committed checkpoint folders, oldest first."""
    return [p for p in _listed(run_dir) if (p / MARKER).is_file()]


def write(run_dir, step, spec, tensors, state_arrays, state, keep):
    """Commit the checkpoint of `step` and copy its adapter up to the run folder; keep the newest `keep`."""
    run_dir = Path(run_dir)
    dest = run_dir / FOLDER / f"step-{step:07d}"
    with atomic.atomic_dir(dest) as tmp:
        adapters.save(tmp, spec, tensors, extra_config={"tunelab": {"step": step}})
        atomic.save_safetensors({k: np.ascontiguousarray(v) for k, v in state_arrays.items()}, tmp / STATE_ARRAYS)
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        atomic.fsync_tree(tmp)
        (tmp / MARKER).write_text(f"step {step}\n", encoding="utf-8")
    publish(run_dir, dest)
    for old in committed(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def publish(run_dir, checkpoint):
    """Copy a committed checkpoint's adapter to the top of the run folder, weights first, config last."""
    for name in ADAPTER_FILES:   # a full fine-tune has no PEFT file
        if (Path(checkpoint) / name).is_file():
            atomic.copy_file(Path(checkpoint) / name, Path(run_dir) / name)


def _same_files(a, b):
    for name in ADAPTER_FILES:
        pa, pb = Path(a) / name, Path(b) / name
        if not pa.is_file() and not pb.is_file():
            continue
        if not pa.is_file() or not pb.is_file() or pa.stat().st_size != pb.stat().st_size:
            return False
        if pa.read_bytes() != pb.read_bytes():
            return False
    return True


def repair(run_dir, log=print):
    """Make the top-level adapter the newest committed checkpoint's again, when a kill left it otherwise."""
    done = committed(run_dir)
    if done and not _same_files(done[-1], run_dir):
        publish(run_dir, done[-1])
        log(f"{run_dir}: the top-level adapter was restored from {done[-1].name} (a save had been interrupted)")


def _unreadable(checkpoint, e):
    return UserError(f"{checkpoint}: trainer state unreadable ({e}); resume from an earlier checkpoint by moving "
                     "this one away")


def read_state(checkpoint):
    """The trainer_state.json of a committed checkpoint (step, options, data hashes, ...)."""
    try:
        state = json.loads((Path(checkpoint) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _unreadable(checkpoint, e) from None
    if not isinstance(state, dict):
        raise _unreadable(checkpoint, "not a JSON object")
    return state


def read(checkpoint):
    """(adapter spec, adapter tensors, state arrays, state) of a committed checkpoint."""
    checkpoint = Path(checkpoint)
    spec, tensors = adapters.load(checkpoint)
    state = read_state(checkpoint)
    try:
        arrays = load_file(str(checkpoint / STATE_ARRAYS))
    except Exception as e:   # OSError, and safetensors' own error type
        raise _unreadable(checkpoint, e) from None
    return spec, tensors, arrays, state


def differences(saved, current):
    """'--name: was X, now Y' for each training option that differs between a checkpoint and this run."""
    out = []
    for name in sorted(set(saved) | set(current)):
        if name in RESUMABLE_CHANGES:
            continue
        if name == "iters" and saved.get("epochs") is not None and saved.get("epochs") == current.get("epochs"):
            continue   # the run's length came from --epochs
        if saved.get(name) != current.get(name):
            out.append(f"--{name.replace('_', '-')}: was {saved.get(name)!r}, now {current.get(name)!r}")
    return out


def truncate_metrics(run_dir, size):
    """Drop the metrics lines written after a checkpoint (their steps run again)."""
    path = Path(run_dir) / runs.METRICS
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)
