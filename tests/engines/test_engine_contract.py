"""The engine contract (engines/base.py), one set of tests run on every engine, with tiny Llama and
Qwen2 models made by the tests."""

import numpy as np
import pytest

from tests.engines.engine_params import NAMES, engine_module
from tunelab import adapters
from tunelab.data.batching import collate, eval_batches, training_batches
from tunelab.data.templates import encode_row
from tunelab.errors import UserError

ROWS = [{"messages": [{"role": "system", "content": "CREATE TABLE t (a INTEGER, b VARCHAR)"},
                      {"role": "user", "content": f"What is a when b is {w}?"},
                      {"role": "assistant", "content": f"SELECT a FROM t WHERE b = '{w}'"}]}
        for w in ("x", "yy", "zzz long value")]


@pytest.fixture(params=NAMES)
def engine(request):
    return engine_module(request.param)


def load(engine, folder):
    return engine.load(folder, device="cpu", dtype="float32", log=lambda *_: None)


def batch_for(model, mask_prompt=True):
    return collate([encode_row(model.tokenizer, r, "chat", mask_prompt) for r in ROWS])


def random_adapter(spec, shapes, seed=0):
    """Adapter tensors with B nonzero (fresh adapters have B = 0 and change nothing)."""
    gen = np.random.default_rng(seed)
    return {m: (a, gen.standard_normal(b.shape).astype(np.float32) * 0.2) for m, (a, b) in shapes.items()}


def with_adapter(engine, folder, seed=0, randomize_b=True):
    model = load(engine, folder)
    spec = adapters.spec_for(1, 2, 4, 2.0, 0.0)
    engine.attach_lora(model, spec, seed=seed)
    if randomize_b:
        engine.set_adapter(model, spec, random_adapter(spec, engine.adapter_tensors(model), seed))
    return model, spec


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_fresh_adapter_reproduces_base_logits(engine, tiny_model):
    base = load(engine, tiny_model)
    tokens = batch_for(base).tokens
    tuned, _ = with_adapter(engine, tiny_model, randomize_b=False)
    np.testing.assert_array_equal(engine.logits(base, tokens), engine.logits(tuned, tokens))
    assert not np.allclose(engine.logits(with_adapter(engine, tiny_model)[0], tokens), engine.logits(base, tokens))


def test_supervised_only_loss_equals_the_plain_computation(engine, tiny_model):
    model, _ = with_adapter(engine, tiny_model)
    for mask_prompt in (True, False):
        batch = batch_for(model, mask_prompt)
        sums, counts = engine.eval_loss(model, batch)
        full = log_softmax(engine.logits(model, batch.tokens).astype(np.float64))
        mask = batch.supervised[:, 1:]
        targets = batch.tokens[:, 1:]
        plain = -np.take_along_axis(full[:, :-1], targets[..., None], -1)[..., 0][mask].sum()
        assert counts.sum() == mask.sum()
        assert sums.sum() == pytest.approx(plain, rel=1e-5)


def test_training_lowers_loss_and_moves_only_the_adapter(engine, tiny_model):
    model = load(engine, tiny_model)
    tokens = batch_for(model).tokens
    before = engine.logits(model, tokens)
    spec = adapters.spec_for(-1, 2, 8, 20.0, 0.0)
    engine.attach_lora(model, spec)
    batch = batch_for(model)
    optimizer = engine.make_optimizer(model, 1e-2)
    first = engine.train_step(model, optimizer, batch)
    assert first.supervised_tokens == batch.supervised[:, 1:].sum()
    for _ in range(30):
        last = engine.train_step(model, optimizer, batch).loss
    assert last < first.loss * 0.7
    trained = engine.adapter_tensors(model)
    assert any(np.abs(b).max() > 0 for _, b in trained.values())
    # with B back at zero the model is the base again: no base weight moved
    engine.set_adapter(model, spec, {m: (a, np.zeros_like(b)) for m, (a, b) in trained.items()})
    np.testing.assert_allclose(engine.logits(model, tokens), before, rtol=0, atol=1e-5)


def test_adapter_files_round_trip_to_identical_logits(engine, tiny_model, tmp_path):
    model, spec = with_adapter(engine, tiny_model)
    tokens = batch_for(model).tokens
    adapters.save(tmp_path, spec, engine.adapter_tensors(model))
    again = load(engine, tiny_model)
    engine.set_adapter(again, *adapters.load(tmp_path))
    np.testing.assert_array_equal(engine.logits(model, tokens), engine.logits(again, tokens))
    # the mlx-lm copy alone gives the same model
    (tmp_path / adapters.PEFT_WEIGHTS).unlink()
    third = load(engine, tiny_model)
    engine.set_adapter(third, *adapters.load(tmp_path))
    np.testing.assert_array_equal(engine.logits(model, tokens), engine.logits(third, tokens))


def test_adapter_for_another_model_is_refused(engine, tiny_model):
    model, spec = with_adapter(engine, tiny_model)
    wrong = {m: (np.zeros((4, 3), np.float32), b) for m, (_, b) in engine.adapter_tensors(model).items()}
    with pytest.raises(UserError, match="trained on another base model"):
        engine.set_adapter(model, spec, wrong)
    with pytest.raises(UserError, match="no module"):
        engine.attach_lora(load(engine, tiny_model), adapters.spec_for(1, 2, 4, 2.0, 0.0, keys=["mlp.nothing"]))


def test_fused_folder_equals_base_plus_adapter(engine, tiny_model, tmp_path):
    model, _ = with_adapter(engine, tiny_model)
    tokens = batch_for(model).tokens
    expected = engine.logits(model, tokens)
    engine.fuse(model, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and any(tmp_path.glob("*.safetensors"))
    np.testing.assert_allclose(engine.logits(load(engine, tmp_path), tokens), expected, rtol=0, atol=1e-4)


def test_per_row_losses_equal_each_row_alone(engine, tiny_model):
    model, _ = with_adapter(engine, tiny_model)
    examples = [encode_row(model.tokenizer, r, "chat", True) for r in ROWS]
    sums, counts = engine.eval_loss(model, collate(examples))
    for row, ex in enumerate(examples):
        alone_sum, alone_count = engine.eval_loss(model, collate([ex]))
        assert counts[row] == alone_count[0] == ex.supervised[1:].sum()
        assert sums[row] == pytest.approx(alone_sum[0], rel=1e-5)


def test_generation_follows_greedy_logits_and_stops(engine, tiny_model):
    model, _ = with_adapter(engine, tiny_model)
    prompt = model.tokenizer.encode("SELECT a", add_special_tokens=False)
    free = list(engine.generate(model, prompt, max_tokens=8))
    assert len(free) == 8
    # each token is the argmax of the full forward pass over everything before it
    for k in range(len(free)):
        assert free[k] == int(engine.logits(model, [prompt + free[:k]])[0, -1].argmax())
    stopped = list(engine.generate(model, prompt, max_tokens=8, stop_ids={free[3]}))
    assert stopped == free[:free.index(free[3])]


def test_batched_generation_equals_one_prompt_at_a_time(engine, tiny_model):
    model, _ = with_adapter(engine, tiny_model)
    encode = model.tokenizer.encode
    prompts = [encode(text, add_special_tokens=False) for text in
               ("SELECT a", "What is the value of b when a is large and c is small?", "t")]
    assert len({len(p) for p in prompts}) == 3          # left padding is exercised where there is batching
    alone = [list(engine.generate(model, p, max_tokens=12)) for p in prompts]
    assert engine.generate_batch(model, prompts, max_tokens=12) == alone
    # a stop token ends only the rows that produce it
    stop = alone[0][4]
    stopped = engine.generate_batch(model, prompts, max_tokens=12, stop_ids={stop})
    assert stopped == [a[:a.index(stop)] if stop in a else a for a in alone]
    assert len(stopped[0]) < len(alone[0])
    # sampling is reproducible from the seed and differs from greedy at a high temperature
    sampled = engine.generate_batch(model, prompts, max_tokens=12, temp=5.0, seed=3)
    assert sampled == engine.generate_batch(model, prompts, max_tokens=12, temp=5.0, seed=3)
    assert sampled != alone


def test_peak_memory_is_reported(engine, tiny_model):
    load(engine, tiny_model)
    assert engine.peak_memory() > 0


def test_gradient_accumulation_equals_one_batch_of_every_row(engine, tiny_model):
    """Micro-batches of 1 and 2 rows give the step that one batch of all 3 gives: the loss is the mean
    over all supervised tokens (not a mean of micro-batch means), and so is the update."""
    runs = []
    for split in (False, True):
        model, spec = with_adapter(engine, tiny_model)
        examples = [encode_row(model.tokenizer, r, "chat", True) for r in ROWS]
        batches = [collate(examples[:1]), collate(examples[1:])] if split else collate(examples)
        optimizer = engine.make_optimizer(model, 1e-3)
        results = [engine.train_step(model, optimizer, batches) for _ in range(4)]
        runs.append((results, engine.adapter_tensors(model)))
    (whole, whole_tensors), (micro, micro_tensors) = runs
    assert [r.supervised_tokens for r in micro] == [r.supervised_tokens for r in whole]
    np.testing.assert_allclose([r.loss for r in micro], [r.loss for r in whole], rtol=1e-5)
    # the test can tell the two means apart: the mean of the micro-batch means is another number
    fresh, _ = with_adapter(engine, tiny_model)
    sums, counts = engine.eval_loss(fresh, collate(examples))
    mean_of_means = (sums[0] / counts[0] + sums[1:].sum() / counts[1:].sum()) / 2
    assert whole[0].loss == pytest.approx(sums.sum() / counts.sum(), rel=1e-5)
    assert mean_of_means != pytest.approx(whole[0].loss, rel=1e-3)
    for module, (a, b) in whole_tensors.items():
        np.testing.assert_allclose(micro_tensors[module][0], a, rtol=0, atol=1e-6)
        np.testing.assert_allclose(micro_tensors[module][1], b, rtol=0, atol=1e-6)


def with_dora(engine, folder, seed=0):
    """A DoRA adapter on the top block with B and the magnitudes moved away from their start."""
    model = load(engine, folder)
    spec = adapters.spec_for(1, 2, 4, 2.0, 0.0, kind="dora")
    engine.attach_lora(model, spec, seed=seed)
    gen = np.random.default_rng(seed)
    tensors = {m: (a, gen.standard_normal(b.shape).astype(np.float32) * 0.2,
                   mag * (1 + 0.3 * gen.standard_normal(mag.shape).astype(np.float32)))
               for m, (a, b, mag) in engine.adapter_tensors(model).items()}
    engine.set_adapter(model, spec, tensors)
    return model, spec


def test_fresh_dora_reproduces_base_logits_and_its_files_round_trip(engine, tiny_model, tmp_path):
    base = load(engine, tiny_model)
    tokens = batch_for(base).tokens
    fresh = load(engine, tiny_model)
    engine.attach_lora(fresh, adapters.spec_for(1, 2, 4, 2.0, 0.0, kind="dora"))
    magnitudes = [t[2] for t in engine.adapter_tensors(fresh).values()]
    assert len(magnitudes) == 7 and all(m.ndim == 1 for m in magnitudes)
    np.testing.assert_allclose(engine.logits(fresh, tokens), engine.logits(base, tokens), rtol=0, atol=1e-5)
    model, spec = with_dora(engine, tiny_model)
    expected = engine.logits(model, tokens)
    assert not np.allclose(expected, engine.logits(base, tokens), atol=1e-3)
    adapters.save(tmp_path, spec, engine.adapter_tensors(model))
    config = adapters.load(tmp_path)[0]
    assert config.dora
    for drop in (None, adapters.PEFT_WEIGHTS):             # both layouts, then the mlx-lm copy alone
        if drop:
            (tmp_path / drop).unlink()
        again = load(engine, tiny_model)
        engine.set_adapter(again, *adapters.load(tmp_path))
        np.testing.assert_array_equal(engine.logits(again, tokens), expected)
    with pytest.raises(UserError, match="fine-tune type"):   # a LoRA model refuses DoRA tensors
        engine.set_adapter(with_adapter(engine, tiny_model)[0], spec, adapters.load(tmp_path)[1])


def test_dora_trains_and_fuses(engine, tiny_model, tmp_path):
    from tunelab.export.gguf_file import merge_adapter

    model, spec = with_dora(engine, tiny_model)
    batch = batch_for(model)
    optimizer = engine.make_optimizer(model, 1e-2)
    before = engine.adapter_tensors(model)
    first = engine.train_step(model, optimizer, batch).loss
    for _ in range(10):
        last = engine.train_step(model, optimizer, batch).loss
    assert last < first
    after = engine.adapter_tensors(model)
    assert all(not np.allclose(after[m][2], before[m][2]) for m in after)   # the magnitudes train too
    tokens = batch.tokens
    expected = engine.logits(model, tokens)
    engine.fuse(model, tmp_path / "fused")
    np.testing.assert_allclose(engine.logits(load(engine, tmp_path / "fused"), tokens), expected, rtol=0, atol=1e-4)
    # the export's numpy merge gives the fused weights
    from safetensors.numpy import load_file

    weights = {k: v.astype(np.float32) for k, v in load_file(str(next(tiny_model.glob("*.safetensors")))).items()}
    merge_adapter(weights, spec, after)
    fused = {k: v.astype(np.float32) for k, v in load_file(str(next((tmp_path / "fused").glob("*.safetensors")))).items()}
    for module in after:
        np.testing.assert_allclose(weights[f"{module}.weight"], fused[f"{module}.weight"], rtol=0, atol=1e-5)


def test_frozen_prefix_cache_gives_the_plain_losses_and_updates(engine, tiny_model):
    """Top block adapted, bottom block frozen: cached bottom-block outputs change nothing."""
    examples = [encode_row(load(engine, tiny_model).tokenizer, r, "chat", True) for r in ROWS]
    eval_batch = collate(examples, keys=[("v", i) for i in range(3)])
    runs = {}
    for cached in (True, False):
        model = load(engine, tiny_model)
        engine.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0), seed=0)
        assert model.prefix is not None and model.prefix.first == 1
        if not cached:
            model.prefix = None
        optimizer = engine.make_optimizer(model, 1e-2)
        batches = training_batches(examples, 2, seed=0)
        losses = [engine.train_step(model, optimizer, next(batches)).loss for _ in range(6)]   # 3 epochs
        sums, _ = engine.eval_loss(model, eval_batch)
        again, _ = engine.eval_loss(model, eval_batch)
        runs[cached] = (losses, engine.adapter_tensors(model), sums, again, model.prefix)
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
    model = load(engine, tiny_model)
    engine.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0))
    first, _ = engine.eval_loss(model, eval_batch)
    for key in model.prefix.rows:
        model.prefix.rows[key] = model.prefix.rows[key] * 0.5
    assert not np.allclose(engine.eval_loss(model, eval_batch)[0], first)
    assert "frozen-prefix cache: blocks 0-0" in engine.savings(model, 3, 300)[-1]


def test_prefix_cache_stops_at_its_budget_and_is_off_with_every_block_adapted(engine, tiny_model):
    model = load(engine, tiny_model)
    engine.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0))
    model.prefix.budget = 1
    examples = [encode_row(model.tokenizer, r, "chat", True) for r in ROWS]
    engine.eval_loss(model, collate(examples, keys=[("r", i) for i in range(3)]))
    assert model.prefix.full and model.prefix.rows == {}
    every = load(engine, tiny_model)
    engine.attach_lora(every, adapters.spec_for(-1, 2, 4, 20.0, 0.0))
    assert every.prefix is None


def test_filling_the_prefix_cache_ahead_caches_what_training_would(engine, tiny_model):
    """fill_prefix over several-row batches stores, under the keys training uses, the rows that one-row
    training steps would store."""
    filled, stepped = load(engine, tiny_model), load(engine, tiny_model)
    examples = [encode_row(filled.tokenizer, r, "chat", True) for r in ROWS]
    for model in (filled, stepped):
        engine.attach_lora(model, adapters.spec_for(1, 2, 4, 20.0, 0.0))
    engine.fill_prefix(filled, eval_batches(examples, 2))
    optimizer = engine.make_optimizer(stepped, 1e-3)
    batches = training_batches(examples, 1, seed=0)
    for _ in range(3):
        engine.train_step(stepped, optimizer, next(batches))
    assert len(stepped.prefix.rows) == 3 and filled.prefix.rows.keys() == stepped.prefix.rows.keys()
    for key, row in stepped.prefix.rows.items():
        np.testing.assert_allclose(np.asarray(filled.prefix.rows[key]), np.asarray(row), rtol=1e-5, atol=1e-6)
    filled.prefix.budget = filled.prefix.used = 0
    filled.prefix.rows, filled.prefix.full = {}, True
    engine.fill_prefix(filled, eval_batches(examples, 2))     # a full cache takes nothing more
    assert filled.prefix.rows == {}


def _captured_gradients(engine, model, optimizer):
    """Each optimizer step's gradients as they reach it, [{name: array}], through a wrapper on its step."""
    seen = []
    if engine.name == "torch":
        real = optimizer.step

        def step(*args, **kwargs):
            seen.append([p.grad.detach().clone().numpy() for g in optimizer.param_groups for p in g["params"]])
            return real(*args, **kwargs)
        optimizer.step = step
    else:
        from mlx.utils import tree_flatten

        real = optimizer.update

        def update(module, grads):
            seen.append([np.array(g) for _, g in tree_flatten(grads)])
            return real(module, grads)
        optimizer.update = update
    return seen


def test_clipping_scales_the_gradients_to_the_norm_and_reports_it(engine, tiny_model):
    model, _ = with_adapter(engine, tiny_model)
    batch = batch_for(model)
    optimizer = engine.make_optimizer(model, 0.0)
    seen = _captured_gradients(engine, model, optimizer)
    free = engine.train_step(model, optimizer, batch)
    norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in seen[0])))
    assert free.grad_norm == pytest.approx(norm, rel=1e-5)
    clipped = engine.train_step(model, optimizer, batch, max_grad_norm=norm / 4)   # lr 0: the same gradients
    assert clipped.grad_norm == pytest.approx(norm, rel=1e-5)
    for before, after in zip(seen[0], seen[1]):
        np.testing.assert_allclose(after, before * (norm / 4) / (norm + 1e-6), rtol=1e-5, atol=1e-9)
    engine.train_step(model, optimizer, batch, max_grad_norm=norm * 4)
    for before, after in zip(seen[0], seen[2]):
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=0)


def test_a_step_runs_at_the_learning_rate_it_is_given(engine, tiny_model):
    results = []
    for made, given in ((1e-3, None), (5e-2, 1e-3)):
        model, _ = with_adapter(engine, tiny_model)
        optimizer = engine.make_optimizer(model, made)
        engine.train_step(model, optimizer, batch_for(model), learning_rate=given)
        results.append(engine.adapter_tensors(model))
    for module, arrays in results[0].items():
        for a, b in zip(arrays, results[1][module]):
            np.testing.assert_array_equal(a, b)


def test_adamw_decays_the_adapter_weights(engine, tiny_model):
    after = {}
    for decay in (0.0, 0.5):
        model, _ = with_adapter(engine, tiny_model)
        optimizer = engine.make_optimizer(model, 1e-2, "adamw", weight_decay=decay)
        engine.train_step(model, optimizer, batch_for(model))
        after[decay] = engine.adapter_tensors(model)
    model, _ = with_adapter(engine, tiny_model)
    adam = engine.make_optimizer(model, 1e-2)
    engine.train_step(model, adam, batch_for(model))
    for module, (a, b) in engine.adapter_tensors(model).items():
        np.testing.assert_allclose(after[0.0][module][1], b, rtol=1e-6, atol=1e-7)   # AdamW without decay is Adam
    start, _ = with_adapter(engine, tiny_model)
    for module, (a, b) in engine.adapter_tensors(start).items():   # (1 - lr * decay) on top of Adam's step
        np.testing.assert_allclose(after[0.5][module][1], after[0.0][module][1] - 1e-2 * 0.5 * b, rtol=1e-5, atol=1e-6)


def full_tune(engine, folder, num_layers=1, steps=5, learning_rate=1e-2):
    """A model whose top `num_layers` blocks were fully fine-tuned for `steps` steps."""
    model = load(engine, folder)
    spec = adapters.spec_for(num_layers, 2, 0, 0.0, 0.0, kind="full")
    engine.attach_lora(model, spec)
    optimizer = engine.make_optimizer(model, learning_rate)
    losses = [engine.train_step(model, optimizer, batch_for(model)).loss for _ in range(steps)]
    return model, spec, losses


def test_full_fine_tuning_trains_every_weight_of_its_blocks_and_nothing_else(engine, tiny_model):
    base = load(engine, tiny_model)
    tokens = batch_for(base).tokens
    spec = adapters.spec_for(1, 2, 0, 0.0, 0.0, kind="full")
    engine.attach_lora(base, spec)
    start = engine.adapter_tensors(base)
    assert start and all(name.startswith("model.layers.1.") for name in start)
    _, trained_values, _ = engine.sizes(base)
    assert trained_values == sum(v.size for v in start.values())
    assert {n.split(".", 3)[3] for n in start} >= {"self_attn.q_proj.weight", "mlp.down_proj.weight",
                                                   "input_layernorm.weight"}
    model, _, losses = full_tune(engine, tiny_model)
    assert losses[-1] < losses[0] * 0.8
    trained = engine.adapter_tensors(model)
    assert trained.keys() == start.keys() and any(not np.array_equal(trained[n], start[n]) for n in start)
    # the trained blocks' starting weights put back: the base model again, so no other weight moved
    engine.set_adapter(model, spec, start)
    np.testing.assert_array_equal(engine.logits(model, tokens), engine.logits(load(engine, tiny_model), tokens))


def test_a_full_fine_tune_round_trips_through_its_files_and_fuses(engine, tiny_model, tmp_path):
    model, spec, _ = full_tune(engine, tiny_model)
    tokens = batch_for(model).tokens
    expected = engine.logits(model, tokens)
    adapters.save(tmp_path / "run", spec, engine.adapter_tensors(model))
    assert not (tmp_path / "run" / adapters.PEFT_WEIGHTS).exists()
    loaded_spec, tensors = adapters.load(tmp_path / "run")
    assert loaded_spec.full and loaded_spec.layers == [1] and loaded_spec.kind == "full"
    again = load(engine, tiny_model)
    engine.set_adapter(again, loaded_spec, tensors)
    np.testing.assert_array_equal(engine.logits(again, tokens), expected)
    engine.fuse(again, tmp_path / "fused")
    np.testing.assert_allclose(engine.logits(load(engine, tmp_path / "fused"), tokens), expected, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="shape"):
        engine.set_adapter(load(engine, tiny_model), loaded_spec,
                           {n: v[..., :1] if v.ndim == 2 else v for n, v in tensors.items()})


def block_runs(engine, model, monkeypatch):
    """A list that grows by one each time a trained block's computation starts (a recomputation too): its
    first norm's calls (torch), the calls of the function mx.checkpoint was given (mlx)."""
    runs = []
    if engine.name == "torch":
        for i in model.spec.layers:
            layer = engine._base_lm(model).model.layers[i]
            layer.input_layernorm.register_forward_pre_hook(lambda *_: runs.append(1))
    else:
        real = engine.mx.checkpoint
        monkeypatch.setattr(engine.mx, "checkpoint", lambda f: real(lambda *a, **k: runs.append(1) or f(*a, **k)))
    return runs


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradient_checkpointing_takes_the_same_steps(engine, tiny_model, kind, monkeypatch):
    """Blocks that run again in the backward pass give the same losses and updates (both adapted blocks; the
    top one alone, above the frozen-prefix cache)."""
    for num_layers in (2, 1):
        results = []
        for checkpointed in (False, True):
            model = load(engine, tiny_model)
            spec = adapters.spec_for(num_layers, 2, 4, 2.0, 0.0, kind=kind)
            engine.attach_lora(model, spec, seed=3)
            if checkpointed:
                engine.grad_checkpoint(model)
                runs = block_runs(engine, model, monkeypatch)
            optimizer = engine.make_optimizer(model, 1e-2)
            losses = [engine.train_step(model, optimizer, batch_for(model)).loss for _ in range(3)]
            if checkpointed:   # each trained block ran twice a step: forward, and again in the backward pass
                assert len(runs) == 3 * num_layers * 2
            results.append((losses, engine.adapter_tensors(model)))
        (plain, plain_tensors), (again, again_tensors) = results
        np.testing.assert_allclose(again, plain, rtol=1e-6)
        for key, value in plain_tensors.items():
            for x, y in zip(*(v if isinstance(v, tuple) else (v,) for v in (value, again_tensors[key]))):
                np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7, err_msg=key)


def test_clear_cache_frees_the_allocator_cache_past_its_threshold(engine, tiny_model):
    """mlx: MLX's buffer cache, freed past the threshold (0: whenever it holds anything); torch on a CPU
    keeps no such cache, and the call changes nothing."""
    model, _ = with_adapter(engine, tiny_model)
    optimizer = engine.make_optimizer(model, 1e-3)
    engine.train_step(model, optimizer, batch_for(model))
    if engine.name == "mlx":
        held = engine.mx.get_cache_memory()
        assert held > 0
        engine.clear_cache(held + 1)
        assert engine.mx.get_cache_memory() == held
        engine.clear_cache(None)
        assert engine.mx.get_cache_memory() == 0
    else:
        before = engine.adapter_tensors(model)
        engine.clear_cache(0)
        assert engine.adapter_tensors(model).keys() == before.keys()


def test_steps_of_several_prompts_each_follow_their_own_settings(engine, tiny_model):
    """generate_steps: every row what `generate` gives for it alone with its own settings (greedy, sampled with
    its seed), log-probabilities that are the model's, and a cancelled row stops while the others go on."""
    model, _ = with_adapter(engine, tiny_model)
    tok = model.tokenizer
    prompts = [tok.encode(text) for text in ("SELECT a FROM", "What is b when a", "t")]
    rows = [dict(max_tokens=6, temp=0.0, top_p=1.0, seed=0, stop_ids=()),
            dict(max_tokens=4, temp=0.9, top_p=0.8, seed=7, stop_ids=()),
            dict(max_tokens=5, temp=0.0, top_p=1.0, seed=0, stop_ids=())]
    got = [[] for _ in prompts]
    for step in engine.generate_steps(model, prompts, rows, top_logprobs=3):
        for row, (token, logprob, top) in step.items():
            got[row].append(token)
            assert len(top) == 3 and top[0][1] >= logprob - 1e-6 and logprob <= 0
            if rows[row]["temp"] == 0:
                assert top[0][0] == token
    for row, prompt in enumerate(prompts):
        settings = {k: v for k, v in rows[row].items() if k != "stop_ids"}
        alone = list(engine.generate(model, prompt, max_tokens=settings["max_tokens"], temp=settings["temp"],
                                     top_p=settings["top_p"], seed=settings["seed"]))
        assert got[row] == alone
    first = engine.logits(model, np.array([prompts[0]]))[0, -1].astype(np.float64)
    step = next(engine.generate_steps(model, prompts[:1], rows[:1], top_logprobs=1))
    assert step[0][1] == pytest.approx(log_softmax(first)[step[0][0]], abs=1e-4)
    cancelled, seen = set(), [0, 0, 0]
    for step in engine.generate_steps(model, prompts, rows, cancelled=cancelled):
        for row in step:
            seen[row] += 1
            if row == 0 and seen[0] == 2:
                cancelled.add(0)
    assert seen == [2, 4, 5]


def test_an_adapter_taken_off_leaves_the_base_as_it_was(engine, tiny_model):
    base = load(engine, tiny_model)
    tokens = batch_for(base).tokens
    expected = engine.logits(base, tokens)
    model, spec = with_adapter(engine, tiny_model)
    tensors = engine.adapter_tensors(model)
    engine.remove_adapter(model)
    np.testing.assert_array_equal(engine.logits(model, tokens), expected)
    engine.set_adapter(model, spec, tensors)
    again, _ = with_adapter(engine, tiny_model)
    np.testing.assert_array_equal(engine.logits(model, tokens), engine.logits(again, tokens))
