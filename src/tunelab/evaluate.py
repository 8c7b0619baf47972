"""Loss and perplexity over a data split: mean cross-entropy per supervised token, and exp of it."""

import math

from tunelab.data.batching import eval_batches


def loss_and_ppl(engine, model, examples, batch_size, max_batches=-1):
    total, count = 0.0, 0
    for batch in eval_batches(examples, batch_size, max_batches):
        loss_sum, n = engine.eval_loss(model, batch)
        total += loss_sum
        count += n
    loss = total / max(count, 1)
    return loss, math.exp(loss)


def format_test(loss, ppl):
    return f"Test loss {loss:.3f}, Test ppl {ppl:.3f}."
