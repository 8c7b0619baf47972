"""W1's loss curve with tunelab's Llama-family loss (blocks.py) against transformers' + PEFT's own
forward, in float32: same rows, same order, same initial adapters. Prints the largest relative
difference of the 10-step mean losses (what `lora` logs) and of single steps.

    python bench/lean_vs_plain.py 200
"""
import sys
import tempfile
from pathlib import Path

import torch

from tunelab import adapters, models
from tunelab.config import PrepareOptions
from tunelab.data.prepare import prepare
from tunelab.data.batching import training_batches
from tunelab.data.formats import read_rows
from tunelab.data.templates import encode_rows
from tunelab.engines import torch_engine as E

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
d = Path(tempfile.mkdtemp()) / "data"
prepare(PrepareOptions(source="builtin:sql", out=str(d), num_rows=130), log=lambda *_: None)
md = models.resolve("smollm2", log=lambda *_: None)
runs = {}
for lean in (True, False):
    torch.manual_seed(0)
    m = E.load(md, "cpu", "float32", lambda *_: None)
    m.lean = m.lean and lean
    rows, fmt = read_rows(d / "train.jsonl")
    ex, _ = encode_rows(m.tokenizer, rows, fmt, True, 2048, "x")
    E.attach_lora(m, adapters.spec_for(4, 30, 8, 20.0, 0.0))
    opt = E.make_optimizer(m, 1e-4)
    b = training_batches(ex[:100], 1, 0)
    runs[lean] = [E.train_step(m, opt, next(b)).loss for _ in range(steps)]
a, p = runs[True], runs[False]


def win(xs):
    return [sum(xs[i:i + 10]) / 10 for i in range(0, len(xs), 10)]


rel = [abs(x - y) / abs(y) for x, y in zip(win(a), win(p))]
print("10-step means: max relative difference %.2e, at window %d; lean %s plain %s" % (max(rel), rel.index(max(rel)), win(a)[-1], win(p)[-1]))
print("per step: max relative difference %.2e" % max(abs(x - y) / abs(y) for x, y in zip(a, p)))
