"""What is the mlx engine's own: its frozen-prefix cache. The shared contract is in
test_engine_contract.py, the comparison with torch in test_cross_engine.py."""

import numpy as np

from tests.engines.engine_params import engine_module
from tests.engines.test_engine_contract import ROWS, load
from tunelab import adapters
from tunelab.data.batching import collate, training_batches
from tunelab.data.templates import encode_row

mlx = engine_module("mlx")


def test_frozen_prefix_cache_gives_the_plain_losses_and_updates(tiny_model):
    """Top block adapted, bottom block frozen: cached bottom-block outputs change nothing."""
    examples = [encode_row(load(mlx, tiny_model).tokenizer, r, "chat", True) for r in ROWS]
    eval_batch = collate(examples, keys=[("v", i) for i in range(3)])
    runs = {}
    for cached in (True, False):
        model = load(mlx, tiny_model)
        mlx.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0), seed=0)
        assert model.prefix is not None and model.prefix.first == 1
        if not cached:
            model.prefix = None
        optimizer = mlx.make_optimizer(model, 1e-2)
        batches = training_batches(examples, 2, seed=0)
        losses = [mlx.train_step(model, optimizer, next(batches)).loss for _ in range(6)]   # 3 epochs
        sums, _ = mlx.eval_loss(model, eval_batch)
        again, _ = mlx.eval_loss(model, eval_batch)
        runs[cached] = (losses, mlx.adapter_tensors(model), sums, again, model.prefix)
    (cached_losses, cached_tensors, cached_sums, cached_again, cache), (losses, tensors, sums, _, _) = \
        runs[True], runs[False]
    assert len(cache.rows) == 3 + 3 and cache.used > 0            # the training rows and the eval rows
    np.testing.assert_allclose(cached_losses, losses, rtol=1e-6)
    np.testing.assert_allclose(cached_sums, sums, rtol=1e-6)
    np.testing.assert_array_equal(cached_again, cached_sums)
    for module, (a, b) in tensors.items():
        np.testing.assert_allclose(cached_tensors[module][0], a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(cached_tensors[module][1], b, rtol=1e-5, atol=1e-7)
    # the cached values are what the step uses: change them and the loss changes
    model = load(mlx, tiny_model)
    mlx.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0))
    first, _ = mlx.eval_loss(model, eval_batch)
    for key in model.prefix.rows:
        model.prefix.rows[key] = model.prefix.rows[key] * 0.5
    assert not np.allclose(mlx.eval_loss(model, eval_batch)[0], first)
    assert "frozen-prefix cache: blocks 0-0" in mlx.savings(model, 3, 300)[-1]


def test_prefix_cache_stops_at_its_budget_and_is_off_with_every_block_adapted(tiny_model):
    model = load(mlx, tiny_model)
    mlx.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0))
    model.prefix.budget = 1
    examples = [encode_row(model.tokenizer, r, "chat", True) for r in ROWS]
    mlx.eval_loss(model, collate(examples, keys=[("r", i) for i in range(3)]))
    assert model.prefix.full and model.prefix.rows == {}
    every = load(mlx, tiny_model)
    mlx.attach_lora(every, adapters.spec_for(-1, 2, 4, 20.0, 0.0))
    assert every.prefix is None
