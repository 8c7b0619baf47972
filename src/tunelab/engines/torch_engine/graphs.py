"""Training steps recorded once per batch shape and replayed: CUDA graphs.

On a GPU a small model's training step is bound by launching its kernels, not by running
them: W2 (a Qwen2.5-0.5B-shaped model, batch 4, LoRA on all 24 blocks) took ~0.2 s a step on an
H100 for ~1 TFLOP of work, the time Python and PyTorch take to issue thousands of small kernels
one by one (0.22 s without graphs on an H200, 0.055-0.067 s with them). A CUDA graph records a
step's kernels once and launches them all with one call.

A graph replays fixed shapes at fixed addresses, so each batch is laid out in fixed shapes
(`layout`): positions padded to a bucket (`bucket`), the supervised targets padded to a bucket
with weight 0. Padding comes after each row's real tokens, where causal attention keeps it out
of every real position, and a target of weight 0 adds nothing to the loss or any gradient, so
the step is the plain computation at the real positions. On a GPU the padded positions cost far
less than the launches saved. The first positions every row of a batch has in common are
computed once (blocks.shared_length), as in eager steps; their count is part of a recording's
key, so batches that share a fixed system prompt keep to one recording a shape.

`Replays.run` runs the first batch of each shape eagerly (a real step, which also warms the
kernels up on a side stream, as recording needs) and records the step after it; later batches
of that shape are copied into the recorded step's input buffers and replayed. All graphs share
one memory pool. Gradients are added into .grad tensors that stay in place (the optimizer reads
them and zeroes them in place), so one recorded step serves gradient accumulation too.
"""

import os
from dataclasses import dataclass, field

import numpy as np
import torch

MAX_GRAPHS = 32     # recorded shapes kept; batches of other shapes run eagerly
POSITION_FLOOR = 16  # smallest bucket step for positions and for supervised targets
SWITCH = "TUNELAB_CUDA_GRAPHS"   # "0" turns recording off


def bucket(n, floor=POSITION_FLOOR):
    """n rounded up to a multiple of max(floor, 2^(bits(n) - 4)): from 128 on, at most an eighth more."""
    step = max(floor, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def layout(batch, total):
    """A batch's step inputs as numpy arrays {name: array} of fixed shapes.

    inputs [B, T'] token ids (0 past each row's end); for each target [N']: the place of the token
    before it in inputs flattened to [B * T'], its token id and its weight (1/total at supervised
    targets, 0 at the added ones, which point at place 0). T' and N' are buckets of the real T and N."""
    tokens = batch.tokens
    size, width = tokens.shape[0], tokens.shape[1] - 1
    rows, cols = np.nonzero(batch.supervised[:, 1:])       # row-major, as x[targeted] in torch
    inputs = np.zeros((size, bucket(width)), dtype=np.int64)
    inputs[:, :width] = tokens[:, :-1]
    count = bucket(len(rows))
    values = {"inputs": inputs}
    for name, real in (("places", rows * inputs.shape[1] + cols), ("targets", tokens[rows, cols + 1])):
        values[name] = np.zeros(count, dtype=np.int64)
        values[name][:len(rows)] = real
    values["weights"] = np.zeros(count, dtype=np.float32)
    values["weights"][:len(rows)] = 1.0 / total
    return values


def wanted(device):
    """Whether steps on `device` are recorded: CUDA, unless TUNELAB_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get(SWITCH, "1") != "0"


class CudaRecorder:
    """Eager steps on a side stream, then a CUDA graph of the same step, all in one memory pool."""

    def __init__(self):
        self.side = torch.cuda.Stream()
        self.pool = None

    def eager(self, fn):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def record(self, fn):
        """(replay, out): fn's kernels recorded, not run; replay() runs them again, refreshing out."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()
        return graph.replay, out


@dataclass
class Recorded:
    buffers: dict        # name -> tensor the recorded step reads
    replay: object
    out: torch.Tensor
    replays: int = 0


@dataclass
class Replays:
    """Steps recorded once per key (the shapes of their inputs) and replayed."""
    recorder: object
    limit: int = MAX_GRAPHS
    log: object = print
    recorded: dict = field(default_factory=dict)   # key -> Recorded
    off: str = None     # why recording stopped, once it failed

    def run(self, values, fn, device, tag=None):
        """fn(buffers) -> a scalar tensor, for buffers holding `values` (numpy arrays or tensors)
        on `device`; run eagerly, or replayed from a recording of fn on buffers of the same shapes
        and the same `tag` (what else fixes the recorded work: the positions a batch's rows share)."""
        key = (tag,) + tuple((name, tuple(value.shape), str(value.dtype)) for name, value in sorted(values.items()))
        entry = self.recorded.get(key)
        if entry is not None:
            for name, value in values.items():
                entry.buffers[name].copy_(torch.as_tensor(value))
            entry.replay()
            entry.replays += 1
            return entry.out
        buffers = {name: torch.as_tensor(value).to(device, copy=True) for name, value in values.items()}
        if self.off or len(self.recorded) >= self.limit:
            return fn(buffers)
        out = self.recorder.eager(lambda: fn(buffers))
        try:
            replay, recorded_out = self.recorder.record(lambda: fn(buffers))
        except Exception as e:   # any failure to record leaves eager steps, which are the same arithmetic
            self.off = f"{type(e).__name__}: {e}"
            self.log(f"note: recording a training step as a CUDA graph failed ({self.off}); "
                     f"training goes on without graphs")
            return out
        self.recorded[key] = Recorded(buffers, replay, recorded_out)
        if len(self.recorded) == self.limit:
            self.log(f"note: {self.limit} batch shapes recorded as CUDA graphs; batches of other shapes run "
                     f"without one")
        return out


class Rerun:
    """A recorder without a GPU, for tests: replay runs the step again on the same buffers and
    writes its result into the same output tensor, as a graph's replay does. A graph also writes
    the gradients into the tensors that were `params`' .grad when it was recorded: replay fails
    when one has been replaced since."""

    def __init__(self, params=()):
        self.params = list(params)

    def eager(self, fn):
        return fn()

    def record(self, fn):
        out, grads = torch.zeros(()), [p.grad for p in self.params]

        def replay():
            if any(p.grad is not grad for p, grad in zip(self.params, grads)):
                raise AssertionError("a gradient tensor was replaced after the step was recorded")
            out.copy_(fn())
        return replay, out
