"""Recorded training steps (graphs.py): fixed shapes, padding that changes no loss or gradient,
recordings replayed on new batches. Without a GPU a recorder that runs the step again stands in
for CUDA graphs; on a CUDA machine the real graphs are checked against eager steps."""

import numpy as np
import pytest
import torch

from tunelab import adapters
from tunelab.data.batching import collate
from tunelab.data.templates import encode_row
from tunelab.engines import torch_engine as engine
from tunelab.engines.torch_engine import graphs
from tests.engines.test_torch_engine import ROWS, with_adapter

OTHER_ROWS = [{"messages": [{"role": "system", "content": "CREATE TABLE t (a INTEGER, b VARCHAR)"},
                            {"role": "user", "content": f"What is b when a is {w}?"},
                            {"role": "assistant", "content": f"SELECT b FROM t WHERE a = '{w}'"}]}
              for w in ("x", "yy", "zzz long value")]


def two_batches(model):
    """Two batches of different rows that take the same recorded shapes, their rows sharing as many
    first positions (38: the chat template's start, the system prompt and the question's start)."""
    first, second = (collate([encode_row(model.tokenizer, r, "chat", True) for r in rows]) for rows in (ROWS, OTHER_ROWS))
    assert not np.array_equal(first.tokens, second.tokens)
    assert all(graphs.layout(first, 1)[name].shape == graphs.layout(second, 1)[name].shape
               for name in graphs.layout(first, 1))
    assert engine._shared(first) == engine._shared(second) == 38
    return first, second


def trained_grads(model):
    return {n: p.grad.detach().float().cpu().numpy().copy() for n, p in model.model.named_parameters() if p.requires_grad}


def test_buckets_hold_n_and_waste_at_most_an_eighth_beyond_the_floor():
    sizes = list(range(1, 5000))
    buckets = [graphs.bucket(n) for n in sizes]
    assert all(b >= n and b % graphs.POSITION_FLOOR == 0 for n, b in zip(sizes, buckets))
    assert all(b - n < max(graphs.POSITION_FLOOR, n / 8) for n, b in zip(sizes, buckets))
    assert buckets == sorted(buckets) and len(set(buckets)) < 60


def test_layout_pads_after_the_real_positions_and_weighs_added_targets_zero(tiny_llama):
    model, _ = with_adapter(tiny_llama)
    batch, _ = two_batches(model)
    values = graphs.layout(batch, total=7)
    width, count = batch.tokens.shape[1] - 1, int(batch.supervised[:, 1:].sum())
    np.testing.assert_array_equal(values["inputs"][:, :width], batch.tokens[:, :-1])
    assert not values["inputs"][:, width:].any() and values["inputs"].shape[1] > width
    rows, cols = np.divmod(values["places"][:count], values["inputs"].shape[1])
    assert not values["places"][count:].any()
    assert batch.supervised[rows, cols + 1].all()
    np.testing.assert_array_equal(values["targets"][:count], batch.tokens[rows, cols + 1])
    np.testing.assert_array_equal(values["weights"], np.r_[np.full(count, 1 / 7, np.float32),
                                                           np.zeros(len(values["weights"]) - count, np.float32)])


def test_steps_of_the_same_shapes_and_another_tag_are_recorded_apart():
    """The tag (a batch's shared positions) is part of a recording's key: a step is replayed only
    for inputs of its shapes and its tag."""
    replays = graphs.Replays(graphs.Rerun())
    values = {"x": np.arange(4.0)}
    outs = [float(replays.run(values, lambda buffers, tag=tag: buffers["x"].sum() * tag, "cpu", tag=tag))
            for tag in (1, 2, 1, 2)]
    assert outs == [6.0, 12.0, 6.0, 12.0]
    assert [entry.replays for entry in replays.recorded.values()] == [1, 1]


@pytest.mark.parametrize("num_layers", [1, 2])
def test_recorded_steps_give_the_plain_losses_and_gradients(tiny_model, monkeypatch, num_layers):
    """The padded step, run eagerly and then replayed on another batch of the same shapes, against
    blocks.py's unpadded step: one adapted block (the frozen prefix as input) or both; the rows'
    common first positions computed once in the recorded step too."""
    from tunelab.engines.torch_engine import blocks

    plain, _ = with_adapter(tiny_model, num_layers=num_layers)
    expected = []
    for batch in two_batches(plain):
        total = int(batch.supervised[:, 1:].sum())
        losses, _ = engine._token_losses(plain, batch)
        (losses.sum() / total).backward()
        expected.append((float(losses.detach().sum()) / total, trained_grads(plain)))
        plain.model.zero_grad(set_to_none=True)
    model, _ = with_adapter(tiny_model, num_layers=num_layers)
    replays = graphs.Replays(graphs.Rerun())
    for p in model.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    pack, padded = blocks._pack, []
    monkeypatch.setattr(blocks, "_pack",
                        lambda hidden, common: padded.append((hidden.shape, common)) or pack(hidden, common))
    for batch, (loss, grads) in zip(two_batches(model), expected):
        total = int(batch.supervised[:, 1:].sum())
        assert float(engine._replayed_loss(model, replays, batch, total)) == pytest.approx(loss, rel=1e-6)
        width = graphs.layout(batch, total)["inputs"].shape[1]
        assert [common for shape, common in padded if shape[1] == width] == [38]    # the eager step, or the replay
        padded.clear()
        got = trained_grads(model)
        assert got.keys() == grads.keys() and len(grads) == 2 * 7 * num_layers
        for name, grad in grads.items():
            assert np.abs(grad).max() > 0, name
            np.testing.assert_allclose(got[name], grad, rtol=1e-5, atol=1e-6 * np.abs(grad).max(), err_msg=name)
        model.model.zero_grad(set_to_none=False)
    assert [entry.replays for entry in replays.recorded.values()] == [1]


def train(model, batches, replays):
    model.graphs = replays
    optimizer = engine.make_optimizer(model, 1e-3)
    losses = [engine.train_step(model, optimizer, batch).loss for batch in batches]
    return losses, engine.adapter_tensors(model)


def test_training_on_recorded_steps_follows_eager_training(tiny_model):
    """Adam steps on replayed gradients (zeroed in place between steps, accumulated over
    micro-batches) give the losses and adapter weights of eager training."""
    model, _ = with_adapter(tiny_model, num_layers=2)
    first, second = two_batches(model)
    batches = [first, second, [first, second], second]
    eager = train(model, batches, False)
    model, _ = with_adapter(tiny_model, num_layers=2)
    replays = graphs.Replays(graphs.Rerun([p for p in model.model.parameters() if p.requires_grad]))
    recorded = train(model, batches, replays)
    np.testing.assert_allclose(recorded[0], eager[0], rtol=1e-5)
    for name, weights in eager[1].items():
        for got, want in zip(recorded[1][name], weights):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert sum(entry.replays for entry in replays.recorded.values()) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_give_the_eager_losses_and_gradients(tiny_model, monkeypatch, dtype):
    """Real CUDA graphs on the GPU: recorded once, replayed on other batches and micro-batches, with
    the losses and gradients of eager steps at every step (learning rate 0: the same weights
    throughout, so bfloat16 rounding cannot steer the two runs apart; the CPU test above covers
    Adam steps between replays)."""
    def run(switch):
        monkeypatch.setenv(graphs.SWITCH, switch)
        model = engine.load(tiny_model, device="cuda", dtype=dtype, log=lambda *_: None)
        engine.attach_lora(model, adapters.spec_for(2, 2, 4, 2.0, 0.0))
        with torch.no_grad():
            for name, p in model.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        first, second = two_batches(model)
        optimizer, seen = engine.make_optimizer(model, 0.0), []
        step = optimizer.step
        optimizer.step = lambda: seen.append(trained_grads(model)) or step()
        losses = [engine.train_step(model, optimizer, b).loss for b in [first, second, [first, second], second]]
        return losses, seen, model.graphs

    torch.manual_seed(0)
    eager = run("0")
    torch.manual_seed(0)
    recorded = run("1")
    assert eager[2] is False and recorded[2].off is None
    assert sum(entry.replays for entry in recorded[2].recorded.values()) == 4
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(recorded[0], eager[0], rtol=tolerance)
    for got, want in zip(recorded[1], eager[1]):
        for name, grad in want.items():
            assert np.abs(grad).max() > 0, name
            np.testing.assert_allclose(got[name], grad, rtol=tolerance, atol=tolerance * np.abs(grad).max(),
                                       err_msg=name)
