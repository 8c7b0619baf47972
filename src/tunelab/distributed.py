"""Training in several processes started by torchrun (torch engine: one per GPU or CPU socket) or by
mlx.launch (mlx engine: one per Mac), engine-neutral.

Every process (rank) builds the same global batches, in the same order, from the same seed; rank r
takes rows r, r + N, r + 2N, ... of each (the rows of a batch are the same every epoch, so each row
stays on one rank and its frozen-prefix cache entry with it). The engine averages exactly: each rank's
loss is divided by the global batch's supervised-token count, and the gradients are summed over the
ranks, so a step equals one process's step over the whole batch (up to float32 summation order).
Only rank 0 writes files, the progress line and the log; the others follow its decisions.
"""

import os
from dataclasses import dataclass

import numpy as np

from tunelab.data.batching import Batch, _length_groups


TIMEOUT = 60    # seconds a process waits for the others in one exchange before it gives up


def timeout():
    """TIMEOUT, or TUNELAB_COLLECTIVE_TIMEOUT seconds: raise it where rank 0's checkpoint writes (which the
    others wait for at their next exchange) take longer, as for full fine-tunes of large models."""
    return int(os.environ.get("TUNELAB_COLLECTIVE_TIMEOUT") or TIMEOUT)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0


SINGLE = World()


@dataclass(frozen=True)
class MlxWorld(World):
    """A world started by mlx.launch (the mlx engine)."""


def from_env():
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), or the one mlx.launch
    started (MLX_RANK and its hostfile: the size comes from MLX's own group), or a single process."""
    if os.environ.get("MLX_RANK") is not None and os.environ.get("MLX_HOSTFILE"):
        import mlx.core as mx

        group = mx.distributed.init()
        return MlxWorld(group.rank(), group.size()) if group.size() > 1 else SINGLE
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def of(model):
    """The world a loaded model trains in."""
    return getattr(model, "world", None) or SINGLE


def shard(batch, world):
    """This rank's rows of a global batch (possibly none: a batch smaller than the world)."""
    if world.size == 1:
        return batch
    rows = np.arange(world.rank, batch.tokens.shape[0], world.size)
    keys = tuple(batch.keys[i] for i in rows) if batch.keys is not None else None
    width = int(batch.lengths[rows].max()) if len(rows) else 1
    return Batch(batch.tokens[rows, :width], batch.supervised[rows, :width], batch.lengths[rows], keys)


def rows_of(examples, batch_size, world):
    """Indices of the training rows this rank takes, every epoch."""
    return sorted(int(i) for group in _length_groups(examples, batch_size) for i in group[world.rank::world.size])
