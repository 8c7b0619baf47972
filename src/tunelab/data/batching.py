"""Numpy batches for the engines: rows grouped by length, right-padded, with exact loss masks."""

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    tokens: np.ndarray      # [B, T] int64, right-padded with 0
    supervised: np.ndarray  # [B, T] bool, False on padding
    lengths: np.ndarray     # [B] int64, real tokens per row
    keys: tuple = None      # one hashable key per row, the same every time the row comes back (for caches)

    @property
    def attention_mask(self):  # [B, T] int64
        return (np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]).astype(np.int64)

    @property
    def real_tokens(self):
        return int(self.lengths.sum())

    @property
    def supervised_tokens(self):
        return int(self.supervised.sum())


def common_start(sequences):
    """How many tokens every sequence of token ids begins with (a fixed system prompt, say)."""
    first = np.asarray(sequences[0])
    common = len(first)
    for tokens in sequences[1:]:
        size = min(common, len(tokens))
        differ = np.flatnonzero(np.asarray(tokens[:size]) != first[:size])
        common = int(differ[0]) if len(differ) else size
    return common


def collate(examples, keys=None):
    width = max(len(ex.tokens) for ex in examples)
    tokens = np.zeros((len(examples), width), dtype=np.int64)
    supervised = np.zeros((len(examples), width), dtype=bool)
    for row, ex in enumerate(examples):
        tokens[row, :len(ex.tokens)] = ex.tokens
        supervised[row, :len(ex.tokens)] = ex.supervised
    return Batch(tokens, supervised, np.array([len(ex.tokens) for ex in examples], dtype=np.int64),
                 tuple(keys) if keys is not None else None)


def _length_groups(examples, batch_size):
    order = np.argsort([len(ex.tokens) for ex in examples], kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def training_batches(examples, batch_size, seed, start=0):
    """Endless batches: rows of similar length together, batch order reshuffled every epoch.

    `start`: how many batches to pass over first (a resumed run continues the same sequence)."""
    groups = _length_groups(examples, batch_size)
    rng = np.random.default_rng(seed)
    for _ in range(start // len(groups)):
        rng.permutation(len(groups))
    skip = start % len(groups)
    while True:
        for g in rng.permutation(len(groups))[skip:]:
            yield collate([examples[i] for i in groups[g]], keys=[(id(examples), int(i)) for i in groups[g]])
        skip = 0


def eval_batches(examples, batch_size, max_batches=-1, rows=None):
    """One pass in a fixed order; max_batches=-1 covers every row; `rows`: only these indices of `examples`."""
    groups = _length_groups(examples, batch_size)
    if rows is not None:
        picked = np.asarray(rows, dtype=np.int64)
        order = picked[np.argsort([len(examples[i].tokens) for i in picked], kind="stable")]
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches != -1:
        groups = groups[:max_batches]
    for g in groups:
        yield collate([examples[i] for i in g], keys=[(id(examples), int(i)) for i in g])
